"""Scoring an adapter against the base model (or another version): ``lorastack eval`` and the promotion gate.

One set of held-out conversations, encoded with the same masks as training (:func:`lorastack.chat.encode_chat`:
loss on assistant tokens only, end-of-turn included), is scored twice on ONE loaded base model: with the
adapter switched on and with it switched off (peft ``disable_adapter``), or with a second adapter loaded
next to the first. Per model: loss (token-weighted mean cross-entropy over the trained tokens), perplexity
(exp of that loss), token accuracy (greedy next-token prediction right on trained tokens), and chrF
(sacrebleu) of greedy generations against the reference answers for a prompt set (the held-out user turns
by default). The verdict of the promotion gate compares the two losses on the same data.

Scoring checks ``should_stop`` before every batch, so a SIGTERM during an evaluation is answered within one
batch (the trainer uses this); a stop raises :class:`ScoringInterrupted`.

torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "base"
TEXT_METRIC = "chrf"  # sacrebleu chrF: character n-gram F-score, robust on short answers
BASELINE_ADAPTER = "lorastack-baseline"


class EvalError(Exception):
    """Bad input for an evaluation (no data, unknown adapter, mismatched base); the message says what to do."""


class ScoringInterrupted(Exception):
    """``should_stop`` said stop (a signal arrived) between two batches."""


@dataclass
class Sample:
    """A prompt (the messages before a reference answer) and that reference answer."""

    prompt: list[dict[str, Any]]
    reference: str


# ------------------------------------------------------------------------------------------------------------
# Data: the same encoding as training
# ------------------------------------------------------------------------------------------------------------
def read_conversations(path: Path) -> list[list[dict[str, Any]]]:
    """The ``messages`` of every line of a chat JSONL file; a bad line is an error naming ``file:line``."""
    out = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                if not isinstance(messages, list):
                    raise TypeError("messages is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                raise EvalError(
                    f"{path}:{lineno}: not a chat example ({exc}); check it with `lorastack validate {path}`"
                ) from None
            out.append(messages)
    return out


def encode_rows(tokenizer: Any, conversations: Sequence[list[dict[str, Any]]], max_seq_len: int) -> list[dict]:
    """``input_ids`` + ``labels`` exactly as the trainer builds them (examples with nothing to score dropped)."""
    from lorastack.chat import encode_chat

    rows = []
    for messages in conversations:
        enc = encode_chat(tokenizer, messages, max_seq_len)
        if enc.final_answer_cut:
            continue
        labels = enc.labels()
        if any(lbl != -100 for lbl in labels):
            rows.append({"input_ids": list(enc.input_ids), "labels": labels})
    return rows


def samples_from(conversations: Sequence[list[dict[str, Any]]], limit: int | None = None) -> list[Sample]:
    """Prompt + reference pairs: each conversation up to its last trained assistant turn."""
    out = []
    for messages in conversations:
        trained = [
            i for i, m in enumerate(messages)
            if m.get("role") == "assistant" and m.get("weight", 1) != 0 and isinstance(m.get("content"), str)
        ]
        if not trained:
            if messages and messages[-1].get("role") == "user":  # a bare prompt (--prompts file): no reference
                out.append(Sample(list(messages), ""))
            continue
        last = trained[-1]
        out.append(Sample([dict(m) for m in messages[:last]], messages[last]["content"]))
        if limit is not None and len(out) >= limit:
            break
    return out[:limit] if limit is not None else out


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------
def _never() -> bool:
    return False


def score_rows(
    model: Any,
    rows: Sequence[dict],
    pad_token_id: int,
    *,
    batch_size: int = 4,
    should_stop: Callable[[], bool] = _never,
) -> dict[str, float | int]:
    """Loss, perplexity and token accuracy of ``model`` (as it is: adapter on or off) on encoded rows.

    Loss is the mean cross-entropy over every trained token of the set (not a mean of batch means), so two
    models scored on the same rows are compared on exactly the same tokens.
    """
    import torch

    if not rows:
        raise EvalError("nothing to score: no example has an assistant answer that fits max_seq_len")
    was_training = model.training
    model.eval()
    total_loss, total_tokens, correct, seen_tokens = 0.0, 0, 0, 0
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # less padding per batch
    try:
        for start in range(0, len(order), batch_size):
            if should_stop():
                raise ScoringInterrupted
            batch = [rows[i] for i in order[start : start + batch_size]]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[b, :n] = torch.tensor(r["input_ids"])
                labels[b, :n] = torch.tensor(r["labels"])
                mask[b, :n] = 1
                seen_tokens += n
            with torch.no_grad():
                logits = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            keep = shift_labels != -100
            if keep.any():
                total_loss += float(
                    torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="sum")
                )
                correct += int((shift_logits[keep].argmax(-1) == shift_labels[keep]).sum())
                total_tokens += int(keep.sum())
    finally:
        if was_training:
            model.train()
    loss = total_loss / max(total_tokens, 1)
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50.0)), 4),
        "token_accuracy": round(correct / max(total_tokens, 1), 6),
        "examples": len(rows),
        "tokens": total_tokens,
        "input_tokens": seen_tokens,
    }


def generate_answers(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int = 64,
    should_stop: Callable[[], bool] = _never,
) -> list[str]:
    """Greedy answers of ``model`` (as it is) to each sample's prompt, rendered with the chat template."""
    import torch

    from lorastack.chat import end_of_turn_ids, render_prompt

    stop_ids = end_of_turn_ids(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    answers = []
    for sample in samples:
        if should_stop():
            raise ScoringInterrupted
        ids = torch.tensor([render_prompt(tokenizer, sample.prompt)], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def text_metric(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus chrF (sacrebleu, 0-100) of the answers against their references; None without references."""
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r]
    if not pairs:
        return None
    from sacrebleu.metrics import CHRF

    return round(CHRF().corpus_score([h for h, _ in pairs], [[r for _, r in pairs]]).score, 4)


@contextlib.contextmanager
def as_model(model: Any, which: str) -> Iterator[None]:
    """Run the block with ``which`` active on the peft model: ``BASE`` (adapters off) or an adapter name."""
    if which == BASE:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(which)
    try:
        yield
    finally:
        model.set_adapter(previous)


def compare(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    samples: Sequence[Sample],
    models: dict[str, str],
    *,
    batch_size: int = 4,
    max_new_tokens: int = 64,
    should_stop: Callable[[], bool] = _never,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Score and sample each of ``models`` (label -> ``BASE`` or a loaded adapter name) on one peft model.

    Returns (metrics per label, samples with every label's answer beside the reference).
    """
    metrics: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    for label, which in models.items():
        with as_model(model, which):
            metrics[label] = score_rows(
                model, rows, tokenizer.pad_token_id, batch_size=batch_size, should_stop=should_stop
            )
            if samples:
                answers[label] = generate_answers(
                    model, tokenizer, samples, max_new_tokens=max_new_tokens, should_stop=should_stop
                )
                metrics[label][TEXT_METRIC] = text_metric(answers[label], [s.reference for s in samples])
            else:
                metrics[label][TEXT_METRIC] = None
    table = [
        {"prompt": s.prompt, "reference": s.reference, **{label: answers[label][i] for label in answers}}
        for i, s in enumerate(samples)
    ]
    return metrics, table


def verdict(candidate_loss: float, baseline_loss: float | None) -> bool:
    """The promotion gate: the candidate must have a strictly lower loss on the same data."""
    return baseline_loss is None or candidate_loss < baseline_loss


# ------------------------------------------------------------------------------------------------------------
# `lorastack eval`: load the base once, the adapter (and a second one) on it, compare, save eval.json
# ------------------------------------------------------------------------------------------------------------
def evaluate_adapter(
    store: Any,
    ref: str,
    *,
    data: Sequence[Path] = (),
    against: str = BASE,
    prompts: Path | None = None,
    max_samples: int = 8,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    save: bool = True,
    should_stop: Callable[[], bool] = _never,
) -> dict[str, Any]:
    """``lorastack eval``: the eval.json document (see CONTRACTS.md) for ``ref`` against ``against``."""
    from lorastack import models
    from lorastack.store import EVAL_FILE, StoreError, sha256_file, write_json_atomic

    try:
        adapter = store.adapter(ref)  # verified: a corrupt adapter is never scored
        other = store.adapter(against) if against != BASE else None
    except StoreError as exc:
        raise EvalError(str(exc)) from None
    manifest = adapter.manifest
    if other is not None and (other.base_model, other.base_revision) != (adapter.base_model, adapter.base_revision):
        raise EvalError(
            f"{other.ref} was trained on {other.base_model} ({other.base_revision}), {adapter.ref} on "
            f"{adapter.base_model} ({adapter.base_revision}): versions on different bases cannot share one model; "
            "compare each against `base` instead"
        )
    files = [Path(p) for p in data] or _default_data(store, manifest)
    conversations = [c for f in files for c in read_conversations(f)]
    spec = manifest.get("spec") or {}
    max_seq_len = int(spec.get("max_seq_len") or 2048)
    tokenizer = models.load_tokenizer(str(adapter.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = encode_rows(tokenizer, conversations, max_seq_len)
    samples = samples_from(read_conversations(prompts) if prompts else conversations, max_samples)
    quant = spec.get("quantization") or {}
    base, _ = models.load_base_model(
        adapter.base_model,
        adapter.base_revision,
        models.hub_cache_dir(store.models_dir),
        quantize=bool(quant.get("load_in_4bit", True)),
        quant_type=quant.get("quant_type", "nf4"),
        double_quant=bool(quant.get("double_quant", True)),
        compute_dtype=quant.get("compute_dtype", "auto"),
    )
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter.path), adapter_name="candidate")
    labels = {against: BASE}
    if other is not None:
        model.load_adapter(str(other.path), adapter_name=BASELINE_ADAPTER)
        labels = {other.ref: BASELINE_ADAPTER}
    labels[adapter.ref] = "candidate"
    metrics, table = compare(
        model, tokenizer, rows, samples, labels,
        batch_size=batch_size, max_new_tokens=max_new_tokens, should_stop=should_stop,
    )
    result = {
        "adapter": adapter.ref,
        "against": other.ref if other is not None else BASE,
        "data": [{"path": str(f), "sha256": sha256_file(f)} for f in files],
        "metrics": metrics,
        "samples": table,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if save:
        write_json_atomic(adapter.path / EVAL_FILE, result)
    return result


def _default_data(store: Any, manifest: dict[str, Any]) -> list[Path]:
    """The run's validation data (its file, or the held-out split) from the store."""
    from lorastack.store import StoreError

    digest = (manifest.get("dataset_sha256") or {}).get("validation")
    if not digest:
        raise EvalError(
            f"{manifest.get('name')}@{manifest.get('version')} was trained without validation data; "
            "pass --data FILE (chat JSONL, e.g. held-out examples of its domain)"
        )
    try:
        return [store.dataset_path(digest)]
    except StoreError as exc:
        raise EvalError(f"the run's validation data is not usable: {exc}; pass --data FILE") from None


def format_result(result: dict[str, Any], max_chars: int = 70) -> str:
    """The readable table: one row per metric, one column per model, then the samples side by side."""
    labels = list(result["metrics"])
    keys = ("loss", "perplexity", "token_accuracy", TEXT_METRIC, "examples", "tokens")
    width = max(14, *(len(lbl) + 2 for lbl in labels))
    shown = [d["path"] if "/datasets/" not in d["path"] else f"the run's validation data ({d['sha256'][:12]})"
             for d in result["data"]]
    lines = [f"{result['adapter']} against {result['against']} on " + ", ".join(shown), ""]
    lines.append(f"{'metric':<16}" + "".join(f"{lbl:>{width}}" for lbl in labels))
    for key in keys:
        cells = []
        for lbl in labels:
            v = result["metrics"][lbl].get(key)
            cells.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        lines.append(f"{key:<16}" + "".join(f"{c:>{width}}" for c in cells))
    a, b = labels[0], labels[-1]
    la, lb = result["metrics"][a]["loss"], result["metrics"][b]["loss"]
    better = "lower (better)" if lb < la else "not lower"
    lines += ["", f"loss of {b}: {lb:.4f} vs {la:.4f} for {a}: {better}"]
    for i, s in enumerate(result.get("samples") or [], 1):
        user = next((m.get("content") for m in reversed(s["prompt"]) if m.get("role") == "user"), "")
        lines += ["", f"[{i}] user: {_clip(str(user), max_chars)}", f"    reference: {_clip(s['reference'], max_chars)}"]
        for lbl in labels:
            lines.append(f"    {lbl}: {_clip(s.get(lbl, ''), max_chars)}")
    return "\n".join(lines)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
