"""Packing chat examples into training rows without letting them attend to each other.

:func:`pack_rows` packs pre-tokenized examples best-fit-decreasing into rows of ``max_seq_len`` tokens;
:class:`PackedCollator` batches those rows with ``position_ids`` restarting at every example and no
attention mask, from which transformers builds a block-diagonal causal mask per row. TRL's own
padding-free packing flattens the whole micro-batch into one row, which under SDPA costs
(batch x max_len)^2 attention instead of batch x max_len^2.

Pure batching logic: torch is imported only when a batch is built.
"""

from __future__ import annotations

import bisect
from typing import Any


def pack_rows(rows: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing of examples into rows of at most ``max_len`` tokens.

    Each packed row keeps ``seq_lengths`` (the example lengths) so the collator can restart
    ``position_ids`` at every example; the first label of each example is masked so no example learns
    to predict across a boundary. Examples longer than ``max_len`` are cut (encode_chat already keeps
    examples within max_seq_len).
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        n = min(len(rows[i]["input_ids"]), max_len)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = max_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for i in members:
            r_ids = rows[i]["input_ids"][:max_len]
            r_labels = list(rows[i]["labels"][:max_len])
            r_labels[0] = -100
            ids += r_ids
            labels += r_labels
            lengths.append(len(r_ids))
        packed.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return packed


class PackedCollator:
    """Batches packed rows: right-padded, ``position_ids`` restarting at each example, no attention mask.

    With ``attention_mask=None`` and restarting ``position_ids``, transformers builds a block-diagonal
    causal mask per row, so packed examples never attend to each other (tested against each example
    run alone). ``num_real_tokens`` (non-pad tokens) is consumed by the trainer for tokens/s.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids, labels, positions = [], [], []
        for e in examples:
            pad = width - len(e["input_ids"])
            ids.append(list(e["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(e["labels"]) + [-100] * pad)
            # padding forms its own block (positions restart), so it never joins a real example
            positions.append([p for n in e["seq_lengths"] for p in range(n)] + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
            "num_real_tokens": torch.tensor(sum(len(e["input_ids"]) for e in examples)),
        }
