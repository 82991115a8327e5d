"""How a chat example is turned into tokens and loss labels: the one place, for every chat template.

The validator (token counts), the trainer (input ids + assistant-only loss mask) and the inference app
(prompt rendering) all call this module, so training and serving see the same template.

Real chat templates carry no ``{% generation %}`` markers, so the assistant mask is computed from the
tokenizer's *own* template by rendering the conversation incrementally:

* the text ``render(messages[:i], add_generation_prompt=True)`` ends where assistant turn ``i`` starts
  (the role header belongs to the prompt and is not trained);
* the common prefix of ``render(messages[:i+1])`` and the whole conversation ends where the turn ends;
* inside that span the trained text is the content plus everything up to and including the first
  special token after the content (the end-of-turn token: ``<|eot_id|>``, ``<|end|>``, ``<|im_end|>``),
  but not the whitespace or eos that some templates append after it.

Character spans are mapped to tokens with the fast tokenizer's offsets; a slow tokenizer (no offsets)
uses the token-prefix property instead. torch and transformers are never imported here: the caller
passes a tokenizer.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render this conversation, or its turns cannot be located."""


@dataclass
class EncodedChat:
    """One conversation as tokens, with the loss mask (1 = the token is trained on).

    ``truncated``: tokens or whole earlier turns were dropped to fit ``max_seq_len``.
    ``final_answer_cut``: even after dropping history the final trained assistant answer does not fit;
    the ids are cut at ``max_seq_len`` and the caller should drop (trainer) or report (validator) it.
    ``dropped_messages``: how many history messages were dropped to fit.
    ``full_length``: token length of the whole conversation before any truncation.
    """

    input_ids: list[int]
    assistant_mask: list[int]
    truncated: bool = False
    final_answer_cut: bool = False
    dropped_messages: int = 0
    full_length: int = 0
    n_assistant_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_assistant_tokens = sum(self.assistant_mask)

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Causal-LM labels: the token id where the mask is 1, ``ignore_index`` elsewhere."""
        return [t if m else ignore_index for t, m in zip(self.input_ids, self.assistant_mask)]


def _is_trained(message: Message) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def _render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raise_exception(), missing template, ...
        raise ChatTemplateError(
            f"the tokenizer's chat template cannot render this conversation: {exc}"
        ) from exc
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
        )
    return text


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: conversations are long and mostly shared
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return ids


def _assistant_char_spans(
    tokenizer: Any, messages: Sequence[Message], text: str
) -> list[tuple[int, int, int]]:
    """(turn_start, content_end, turn_end) character positions in ``text`` of each trained assistant turn."""
    spans = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        turn_end_text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        end = _common_prefix_len(turn_end_text, text)
        if not _is_trained(msg):
            cursor = max(cursor, end)
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        content = msg.get("content") or ""
        if isinstance(content, list):  # content parts: the text parts are what the template shows
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        stripped = content.strip()
        if i and text.startswith(prompt) and len(prompt) >= cursor:
            start = len(prompt)
        else:
            # The generation prompt is not a prefix of the conversation (e.g. templates that render
            # history differently): locate the content itself after the previous turn.
            pos = text.find(stripped, cursor) if stripped else -1
            if pos < 0:
                raise ChatTemplateError(
                    f"cannot locate assistant message {i} in the rendered conversation; "
                    "the chat template rewrites assistant content, so the loss mask cannot be derived"
                )
            start = pos
        if end <= start:
            raise ChatTemplateError(f"assistant message {i} renders to no text in the conversation")
        pos = text.find(stripped, start, end) if stripped else start
        content_end = pos + len(stripped) if pos >= 0 else start
        spans.append((start, content_end, end))
        cursor = end
    return spans


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    # Templates already contain bos/eos, so no special tokens are added (as apply_chat_template does).
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: no offsets
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
        return list(enc["input_ids"]), None


def _token_prefix_index(tokenizer: Any, text: str, ids: list[int], char_pos: int) -> int:
    """Token index at ``char_pos`` for tokenizers without offsets, via the token-prefix property."""
    prefix = tokenizer(text[:char_pos], add_special_tokens=False)["input_ids"]
    if ids[: len(prefix)] != list(prefix):
        raise ChatTemplateError(
            "this tokenizer has no offset mapping and does not tokenize prefixes consistently; "
            "use a fast tokenizer (use_fast=True)"
        )
    return len(prefix)


def _encode_full(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    text = _render(tokenizer, messages, add_generation_prompt=False)
    ids, offsets = _tokenize(tokenizer, text)
    mask = [0] * len(ids)
    spans = _assistant_char_spans(tokenizer, messages, text)
    if not spans:
        return ids, mask
    special = _special_ids(tokenizer)
    token_starts = [s for s, _ in offsets] if offsets is not None else []
    for start, content_end, end in spans:
        if offsets is not None:
            # Tokens whose text starts inside the turn belong to it; stop after the first special
            # token that starts at or after the content's end (the end-of-turn token).
            first = None
            last = None
            for t in range(bisect.bisect_left(token_starts, start), len(offsets)):
                s, e = offsets[t]
                if s >= end:
                    break
                if first is None:
                    first = t
                if s >= content_end and ids[t] in special:
                    last = t
                    break
                if e <= end and (s < content_end or not text[s:e].isspace()):
                    last = t
            if first is None or last is None:
                continue
            for t in range(first, last + 1):
                mask[t] = 1
        else:
            t0 = _token_prefix_index(tokenizer, text, ids, start)
            t_end = _token_prefix_index(tokenizer, text, ids, end)
            last = t_end - 1
            t_content = _token_prefix_index(tokenizer, text, ids, content_end)
            for t in range(t_content, t_end):
                if ids[t] in special:
                    last = t
                    break
            for t in range(t0, last + 1):
                mask[t] = 1
    return ids, mask


def _check_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    return list(messages)


def encode_chat(tokenizer: Any, messages: Sequence[Message], max_seq_len: int | None = None) -> EncodedChat:
    """Tokenize a conversation with the tokenizer's chat template and mark the tokens that get loss.

    The mask covers every assistant message's content and its end-of-turn token(s), never the role
    header; assistant messages with ``"weight": 0`` are not trained. If the conversation is longer than
    ``max_seq_len``, whole earlier turns after the leading system message(s) are dropped (oldest first)
    until it fits; the final trained assistant answer is never cut silently: if even the last exchange
    does not fit, the result is cut at ``max_seq_len`` and ``final_answer_cut`` is set.
    """
    messages = _check_messages(messages)
    ids, mask = _encode_full(tokenizer, messages)
    full_length = len(ids)
    if max_seq_len is None or full_length <= max_seq_len:
        return EncodedChat(ids, mask, full_length=full_length)
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")

    n_system = 0
    while n_system < len(messages) and messages[n_system].get("role") == "system":
        n_system += 1
    trained = [i for i, m in enumerate(messages) if _is_trained(m)]
    if not trained:  # nothing to protect: cut the end
        return EncodedChat(ids[:max_seq_len], mask[:max_seq_len], truncated=True, full_length=full_length)
    final = trained[-1]
    # Candidate starts for the kept history: the first non-system message, then each later user turn.
    starts = [n_system] + [j for j in range(n_system + 1, final) if messages[j].get("role") == "user"]
    best: tuple[list[int], list[int], int] | None = None
    for j in starts:
        kept = messages[:n_system] + messages[j : final + 1]
        c_ids, c_mask = (
            (ids, mask) if j == n_system and final == len(messages) - 1 else _encode_full(tokenizer, kept)
        )
        best = (c_ids, c_mask, len(messages) - len(kept))
        # It fits if nothing trained lies beyond the limit (trailing template tokens may be cut).
        if not any(c_mask[max_seq_len:]):
            break
    assert best is not None
    c_ids, c_mask, dropped = best
    cut = any(c_mask[max_seq_len:])
    return EncodedChat(
        c_ids[:max_seq_len],
        c_mask[:max_seq_len],
        truncated=True,
        final_answer_cut=cut,
        dropped_messages=dropped,
        full_length=full_length,
    )


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the prompt for generating the next assistant turn (``add_generation_prompt=True``).

    Tokenized exactly as :func:`encode_chat` tokenizes training examples, so inference sees the same
    tokens the adapter was trained on.
    """
    messages = _check_messages(messages)
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn under this template (for stopping generation).

    Found by rendering a one-exchange conversation and taking the special tokens of the trained span
    after the content, plus the tokenizer's eos.
    """
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ids, mask = _encode_full(tokenizer, probe)
    special = _special_ids(tokenizer)
    found = [t for t, m in zip(ids, mask) if m and t in special]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        found.append(eos)
    return sorted(set(found))
