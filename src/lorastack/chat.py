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

Rendering every prefix of a conversation costs time quadratic in its length, so the prefixes are
rendered per *block* (a user turn and the answers up to the next user turn, in a small window behind the
system prompt), and the blocks' renders are used only when they tile the render of the whole conversation exactly;
otherwise the whole-conversation prefixes are rendered, within a work budget proportional to the
conversation's size (a conversation over the budget is a :class:`ChatTemplateError`, never a hang).
Truncation renders only the candidate conversations a binary search over the kept history visits. So
encoding is linear in the conversation's size for templates that render turn by turn (all the common
families), and bounded for any template.

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


# Work allowed for locating the turns of one conversation, in "units" (a rendered message counts as
# MESSAGE_UNITS characters): BUDGET_FACTOR times the conversation's own size, plus a floor. Turn-by-turn
# templates need about 6x; rendering every prefix of a long conversation needs far more.
MESSAGE_UNITS = 32
BUDGET_FACTOR = 16
BUDGET_FLOOR = 20_000_000
# Conversations with fewer blocks (user turn + answers) are located by rendering every prefix: as cheap.
WINDOW_MIN_BLOCKS = 4


def _is_trained(message: Message) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def _size(messages: Sequence[Message]) -> int:
    """Work units of rendering ``messages``: a fixed cost per message plus its content's length."""
    total = 0
    for m in messages:
        content = m.get("content")
        total += MESSAGE_UNITS + (len(content) if isinstance(content, str) else MESSAGE_UNITS)
    return total


class _Budget:
    """Render work left for one conversation; raises :class:`ChatTemplateError` once it is spent."""

    def __init__(self, messages: Sequence[Message]):
        self.n_messages = len(messages)
        self.left = BUDGET_FACTOR * _size(messages) + BUDGET_FLOOR

    def charge(self, messages: Sequence[Message]) -> None:
        self.left -= _size(messages)
        if self.left < 0:
            raise _OverBudget(
                f"this conversation ({self.n_messages} messages) is too long to locate its assistant turns "
                "under this chat template, which renders each turn differently depending on what follows; "
                "split it into shorter conversations"
            )


class _OverBudget(ChatTemplateError):
    pass


def _render(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool, budget: _Budget | None = None
) -> str:
    if budget is not None:
        budget.charge(messages)
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


def _leading_system(messages: Sequence[Message]) -> int:
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    return n


def _assistant_char_spans(
    tokenizer: Any,
    messages: Sequence[Message],
    text: str,
    budget: _Budget | None = None,
    begin: int = 0,
    stop: int | None = None,
) -> list[tuple[int, int, int]]:
    """(turn_start, content_end, turn_end) character positions in ``text`` of each trained assistant turn
    (of the messages from index ``begin`` to ``stop``), from the renders of the conversation's prefixes."""
    spans = []
    cursor = 0
    for i, msg in enumerate(messages[:stop]):
        if msg.get("role") != "assistant":
            continue
        turn_end_text = _render(tokenizer, messages[: i + 1], False, budget)
        end = _common_prefix_len(turn_end_text, text)
        if i < begin or not _is_trained(msg):
            cursor = max(cursor, end)
            continue
        prompt = _render(tokenizer, messages[:i], True, budget) if i else ""
        content = msg.get("content") or ""
        if isinstance(content, list):  # content parts: the text parts are what the template shows
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        stripped = content.strip() if isinstance(content, str) else ""
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


def _block_starts(messages: Sequence[Message], n_system: int) -> list[int]:
    """Where each block starts: the first message after the system prompt, then every later user turn."""
    return [n_system] + [k for k in range(n_system + 1, len(messages)) if messages[k].get("role") == "user"]


def _windowed_spans(
    tokenizer: Any, messages: Sequence[Message], text: str, budget: _Budget
) -> list[tuple[int, int, int]] | None:
    """The spans of :func:`_assistant_char_spans`, in time linear in the conversation's size.

    Each block (a user turn and what follows up to the next user turn) is rendered alone in a small window:
    the system prompt (a one-character stand-in after the first block, so that a long system prompt is not
    rendered once per block), the message before the block (so the block starts where the whole render
    starts it), the block, and the next block's first message (so its last turn ends as in the whole
    render). The window's prefixes are cheap to render. The blocks' texts are trusted only if, laid end to
    end, they reproduce ``text`` exactly; otherwise None (the caller renders the whole conversation's
    prefixes).
    """
    n_system = _leading_system(messages)
    starts = _block_starts(messages, n_system)
    ends = starts[1:] + [len(messages)]
    stand_in = [dict(m, content="S") if isinstance(m.get("content"), str) else m for m in messages[:n_system]]
    out: list[tuple[int, int, int]] = []
    pos = 0
    for b, (s0, s1) in enumerate(zip(starts, ends)):
        lead = list(messages[:n_system]) if b == 0 else [*stand_in, messages[s0 - 1]]
        block = list(messages[s0:s1])
        window = lead + block + list(messages[s1 : s1 + 1])
        rendered = _render(tokenizer, window, False, budget)
        # The block's text starts where the lead's render stops matching (the same rule that ends the
        # previous block's text, so the two agree on the boundary) and ends where the next message starts.
        anchor = _common_prefix_len(_render(tokenizer, lead, False, budget), rendered) if lead else 0
        if s1 < len(messages):
            block_end = _common_prefix_len(_render(tokenizer, lead + block, False, budget), rendered)
        else:
            block_end = len(rendered)
        if b == 0:
            if not text.startswith(rendered[:anchor]):
                return None
            pos = anchor
        piece = rendered[anchor:block_end]
        if not text.startswith(piece, pos):
            return None
        offset = pos - anchor
        for start, content_end, end in _assistant_char_spans(
            tokenizer, window, rendered, budget, begin=len(lead), stop=len(lead) + len(block)
        ):
            if start < anchor or end > block_end:
                return None  # the turn reaches outside its block's text: not a turn-by-turn template
            out.append((start + offset, content_end + offset, end + offset))
        pos += len(piece)
    return out if pos == len(text) else None


def _turn_spans(tokenizer: Any, messages: Sequence[Message], text: str) -> list[tuple[int, int, int]]:
    """The trained assistant turns' character spans: per block when the template allows it, else whole."""
    if not any(_is_trained(m) for m in messages):
        return []
    if len(_block_starts(messages, _leading_system(messages))) >= WINDOW_MIN_BLOCKS:
        try:
            spans = _windowed_spans(tokenizer, messages, text, _Budget(messages))
        except _OverBudget:
            raise
        except ChatTemplateError:  # e.g. a template that refuses a conversation opened mid-way
            spans = None
        if spans is not None:
            return spans
    return _assistant_char_spans(tokenizer, messages, text, _Budget(messages))


def _check_text(text: str) -> None:
    """ChatTemplateError for text no tokenizer can encode (a lone UTF-16 surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ChatTemplateError(
            f"the conversation holds a lone UTF-16 surrogate ({text[exc.start]!r}), which no tokenizer encodes"
        ) from None


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    # Templates already contain bos/eos, so no special tokens are added (as apply_chat_template does).
    _check_text(text)
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


def _mask(
    tokenizer: Any,
    messages: Sequence[Message],
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]] | None,
) -> list[int]:
    """The loss mask of ``ids`` (the tokens of ``text``, the render of ``messages``)."""
    mask = [0] * len(ids)
    spans = _turn_spans(tokenizer, messages, text)
    if not spans:
        return mask
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
    return mask


def _encode_full(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    text = _render(tokenizer, messages, add_generation_prompt=False)
    ids, offsets = _tokenize(tokenizer, text)
    return ids, _mask(tokenizer, messages, text, ids, offsets)


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

    Time is linear in the conversation's size for turn-by-turn templates, and bounded for any template
    (:class:`ChatTemplateError` when a conversation is too long to locate its turns).
    """
    messages = _check_messages(messages)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    ids, offsets = _tokenize(tokenizer, text)
    full_length = len(ids)
    if max_seq_len is None or full_length <= max_seq_len:
        return EncodedChat(ids, _mask(tokenizer, messages, text, ids, offsets), full_length=full_length)
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")

    n_system = _leading_system(messages)
    trained = [i for i, m in enumerate(messages) if _is_trained(m)]
    if not trained:  # nothing to protect: cut the end
        return EncodedChat(ids[:max_seq_len], [0] * max_seq_len, truncated=True, full_length=full_length)
    final = trained[-1]
    # Candidate starts for the kept history: the first non-system message, then each later user turn.
    starts = [n_system] + [j for j in range(n_system + 1, final) if messages[j].get("role") == "user"]
    tried: dict[int, tuple[list[int], list[int], int]] = {}

    def attempt(k: int) -> tuple[list[int], list[int], int]:
        if k not in tried:
            j = starts[k]
            kept = messages[:n_system] + messages[j : final + 1]
            if j == n_system and final == len(messages) - 1:
                c_ids, c_mask = ids, _mask(tokenizer, messages, text, ids, offsets)
            else:
                c_ids, c_mask = _encode_full(tokenizer, kept)
            tried[k] = (c_ids, c_mask, len(messages) - len(kept))
        return tried[k]

    def fits(k: int) -> bool:
        # It fits if nothing trained lies beyond the limit (trailing template tokens may be cut).
        return not any(attempt(k)[1][max_seq_len:])

    # The oldest start that fits (dropping more history never makes a conversation longer): a binary
    # search renders O(log n) candidates, mostly short ones, instead of every one.
    lo, hi = 0, len(starts) - 1
    if fits(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
    c_ids, c_mask, dropped = attempt(hi)
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
    _check_text(text)
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
