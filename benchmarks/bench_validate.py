"""`lorastack validate --base-model` on one long conversation: the old turn location vs ours, side by side.

Baseline (kept below, verbatim from lorastack.chat before issue 11): every assistant turn is located by rendering
the conversation's prefix up to it (quadratic in the conversation's length), and truncation re-encodes the kept
history for every candidate start, oldest first (cubic). Ours (lorastack.chat now): prefixes rendered per block and
checked against the whole render, and a binary search over the kept history (linear).

Both run `lorastack.data.validate_file` on the same file (one conversation of N user/assistant turns behind a
system prompt), with the same tiny model's tokenizer and chat template (built offline, as in the tests), and the
same limit (the model's context, 1024 tokens, as `validate` uses by default): the baseline swaps in the old
`encode_chat`. The reports must agree; the best of --repeat runs is reported.

    python benchmarks/bench_validate.py                    # 60, 125 and 250 turns (the baseline takes ~30 s)
    python benchmarks/bench_validate.py --turns 20,40 --repeat 1   # a quick run
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorastack import chat
from lorastack.chat import ChatTemplateError, EncodedChat

Message = dict[str, Any]

# ---- the baseline: lorastack.chat's turn location before issue 11 (unchanged) ---------------------------------------


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


def baseline_encode_chat(tokenizer: Any, messages: Sequence[Message], max_seq_len: int | None = None) -> EncodedChat:
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


# ---- the benchmark ---------------------------------------------------------------------------------------------------


def conversation(turns: int) -> dict:
    msgs = [{"role": "system", "content": "You are a travel assistant. Answer briefly and politely."}]
    for i in range(turns):
        msgs += [
            {"role": "user", "content": f"Question {i}: what should I pack for a spring trip to Paris?"},
            {"role": "assistant", "content": f"Answer {i}: a light jacket, comfortable shoes and an umbrella."},
        ]
    return {"messages": msgs}


def timed_validate(path: Path, tokenizer: Any, encoder, repeat: int) -> tuple[float, Any]:
    from lorastack.data import validate_file

    saved = chat.encode_chat
    chat.encode_chat = encoder
    try:
        best, report = float("inf"), None
        for _ in range(repeat):
            t0 = time.perf_counter()
            report = validate_file(path, tokenizer=tokenizer, purpose="validation")
            best = min(best, time.perf_counter() - t0)
        return best, report
    finally:
        chat.encode_chat = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", default="60,125,250", help="comma-separated conversation lengths (turns)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours per size (best kept); baseline: 1")
    parser.add_argument("--arch", default="llama", choices=["llama", "phi3"], help="tiny model's template family")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lorastack.tinymodel import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", arch=args.arch)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        print(f"tokenizer: tiny {args.arch} (context {tokenizer.model_max_length} tokens); 1 thread")
        print(f"{'turns':>6} {'tokens':>7} {'baseline s':>11} {'ours s':>8} {'baseline/ours':>14}")
        rows = []
        for turns in [int(t) for t in args.turns.split(",")]:
            path = Path(tmp) / f"c{turns}.jsonl"
            path.write_text(json.dumps(conversation(turns)) + "\n", encoding="utf-8")
            ours, ours_report = timed_validate(path, tokenizer, chat.encode_chat, args.repeat)
            base, base_report = timed_validate(path, tokenizer, baseline_encode_chat, 1)
            a, b = ours_report.to_dict(), base_report.to_dict()
            if a != b:
                print(f"reports differ at {turns} turns:\n ours {a}\n base {b}", file=sys.stderr)
                return 1
            tokens = a["tokens"]["max"] if a["tokens"] else 0
            rows.append((turns, base, ours))
            print(f"{turns:>6} {tokens:>7} {base:>11.3f} {ours:>8.3f} {base / ours:>13.1f}x")
        if len(rows) > 1:
            (t0, b0, o0), (t1, b1, o1) = rows[0], rows[-1]
            print(
                f"scaling {t0} -> {t1} turns ({t1 / t0:.1f}x longer): baseline {b1 / b0:.1f}x slower, "
                f"ours {o1 / o0:.1f}x slower"
            )
        print(f"ratio baseline/ours at {rows[-1][0]} turns: {rows[-1][1] / rows[-1][2]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
