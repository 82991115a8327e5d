"""The fast path by default: packing, row length, gradient checkpointing and compute dtype from the device.

A pure function (:func:`choose`) of what the device is and has, so it is tested without the device;
:func:`detect` reads the device. The rules follow measurements, not assumptions
(``benchmarks/bench_train_defaults.py`` prints them side by side; issue 12 measured on a 2-core AVX512-BF16
CPU: bf16 compute 1.44x, gradient checkpointing off 1.39x for +14 % memory, rows of 256 tokens 1.23x):

- compute dtype: bf16 where the CPU (AVX512-BF16 / AMX) or GPU (compute capability >= 8) has it, fp16 on
  older GPUs (T4), else fp32;
- gradient checkpointing: off when the activations of one micro-batch without it fit in the memory left
  after weights, LoRA state and logits, with a 20 % margin; on otherwise (it trades ~30 % speed for memory);
- packing: on (rows that never attend across examples, lorastack.packing); on CUDA the attention is
  padding-free varlen (flash-attention / SDPA with ``position_ids``) so packing costs no cross-example work;
- row length: on CPU, 256 tokens (attention is quadratic in the row and CPU GEMMs saturate early), capped
  by ``max_seq_len``; on a GPU, ``max_seq_len`` (long rows keep the GEMMs large; NF4 dequantization costs
  per micro-step, not per token).

The trainer's one-line hook (lifecycle team): before building the SFTConfig,
``d = train_defaults.choose(train_defaults.detect(), **train_defaults.model_shape(model), max_seq_len=...,
micro_batch=...)`` and use ``d`` for every setting the spec leaves at "auto".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BYTES_NF4_PER_PARAM = 4.131 / 8  # NF4 + double quantization (reference note, measured)
CPU_ROW = 256


@dataclass(frozen=True)
class Device:
    """What the defaults depend on: the kind of device, its memory, and whether it computes in bf16."""

    kind: str  # "cpu" | "cuda"
    memory_bytes: int
    bf16: bool
    name: str = ""
    fp16: bool = False  # a GPU without bf16 (T4, V100)


@dataclass(frozen=True)
class Defaults:
    compute_dtype: str  # "bfloat16" | "float16" | "float32"
    gradient_checkpointing: bool
    packing: bool
    row_len: int
    padding_free: bool
    reasons: list[str] = field(default_factory=list)


def activation_bytes(tokens: int, hidden: int, layers: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Activation memory of one micro-batch of ``tokens`` tokens.

    Without checkpointing about 34 * hidden bytes per token per layer at 2-byte precision (Korthikanti et
    al. 2022, with a fused attention kernel: no score matrix); with it, the layer inputs only (2 bytes x hidden
    per token per layer) plus one layer's worth being recomputed.
    """
    scale = dtype_bytes / 2
    if checkpointing:
        return int(tokens * hidden * (2 * layers + 34) * scale)
    return int(tokens * hidden * 34 * layers * scale)


def choose(
    device: Device,
    *,
    params: int,
    hidden: int,
    layers: int,
    vocab: int,
    max_seq_len: int,
    micro_batch: int = 1,
    lora_params: int = 0,
) -> Defaults:
    """The defaults for training a model of this shape on ``device`` (pure: no torch, no device access)."""
    reasons: list[str] = []
    if device.bf16:
        dtype, nbytes = "bfloat16", 2
        reasons.append(f"bf16: the {device.kind} computes in bf16 (measured 1.44x fp32 on an AVX512-BF16 CPU)")
    elif device.kind == "cuda" and device.fp16:
        dtype, nbytes = "float16", 2
        reasons.append("fp16: this GPU has no bf16")
    else:
        dtype, nbytes = "float32", 4
        reasons.append("fp32: no bf16 on this device")
    row = min(max_seq_len, CPU_ROW) if device.kind == "cpu" else max_seq_len
    if row < max_seq_len:
        reasons.append(f"rows of {row} tokens on CPU (measured 1.23x rows of 512)")
    tokens = row * micro_batch
    fixed = int(params * BYTES_NF4_PER_PARAM) + 16 * lora_params + 2 * tokens * vocab * 4  # weights, LoRA, logits
    free = device.memory_bytes * 0.8 - fixed
    no_gc = activation_bytes(tokens, hidden, layers, nbytes, checkpointing=False)
    checkpointing = no_gc > free
    if checkpointing:
        reasons.append(f"gradient checkpointing on: {no_gc / 2**30:.1f} GiB of activations would not fit")
    else:
        reasons.append(
            f"gradient checkpointing off: {no_gc / 2**30:.2f} GiB of activations fit (measured 1.39x, +14 % memory)"
        )
    padding_free = device.kind == "cuda"
    return Defaults(dtype, checkpointing, True, row, padding_free, reasons)


def detect() -> Device:
    """The device this process trains on: the first (or this rank's) GPU, else the CPU and its RAM."""
    import os

    import torch

    if torch.cuda.is_available():
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        props = torch.cuda.get_device_properties(idx)
        return Device("cuda", int(props.total_memory), bool(torch.cuda.is_bf16_supported()), props.name, fp16=True)
    flags = _cpu_flags()
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 8 << 30
    return Device("cpu", int(mem), bf16, "cpu")


def model_shape(model: Any) -> dict[str, int]:
    """``params``, ``hidden``, ``layers``, ``vocab`` of a transformers model (its config; 4-bit aware count)."""
    import math

    cfg = model.config
    params = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        params += math.prod(qs.shape) if qs is not None else p.numel()
    return {"params": params, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
