"""The fast path by default: packing, row length, gradient checkpointing and compute dtype from the device.

A pure function (:func:`choose`) of what the device is and has, so it is tested without the device;
:func:`detect` reads the device and :func:`shape_of_config` the model's size (on the meta device, no weights).
The trainer calls them once per run for every setting the spec leaves at "auto" (lorastack.trainer,
``choose_fast_path``). The rules follow measurements, not assumptions (``benchmarks/bench_train_defaults.py``
prints them side by side, through the real trainer):

- compute dtype: bf16 where the device has it (GPUs of compute capability >= 8; CPUs with AVX512-BF16 / AMX,
  through autocast: measured 1.18x alone and 1.18x on top of the other choices with a 4-bit base), fp16 on older
  GPUs (T4), else fp32;
- gradient checkpointing: off when the activations of one micro-batch without it fit in the memory left
  after weights, LoRA state and logits, with a 20 % margin; on otherwise (it trades ~30 % speed for memory);
- packing: on (rows that never attend across examples, lorastack.packing);
- row length: on CPU, 256 tokens (attention is quadratic in the row and CPU GEMMs saturate early), never
  shorter than the longest example (packing never cuts one) nor longer than ``max_seq_len``; on a GPU,
  ``max_seq_len`` (long rows keep the GEMMs large). A micro-batch keeps ``micro_batch x max_seq_len`` tokens:
  shorter rows mean more of them per micro-batch, so an optimizer step sees the same amount of data.
- ``padding_free`` says the device would profit from varlen attention kernels (flash-attention on CUDA); the
  images do not ship flash-attn, so the trainer records it as advice only.
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
    batch_rows: int = 1  # packed rows per micro-batch: micro_batch x max_seq_len tokens in rows of row_len


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
    longest_example: int | None = None,
    quantized: bool = True,
) -> Defaults:
    """The defaults for training a model of this shape on ``device`` (pure: no torch, no device access).

    ``micro_batch`` counts rows of ``max_seq_len`` tokens (the spec's per_device_batch_size);
    ``longest_example`` (tokens) bounds the row length from below; ``quantized`` = a 4-bit base.
    """
    reasons: list[str] = []
    if device.bf16:
        dtype, nbytes = "bfloat16", 2
        reasons.append(f"bf16: the {'GPU' if device.kind == 'cuda' else 'CPU'} computes in bf16"
                       + (" (measured 1.18x fp32 here)" if device.kind == "cpu" else ""))
    elif device.kind == "cuda" and device.fp16:
        dtype, nbytes = "float16", 2
        reasons.append("fp16: this GPU has no bf16")
    else:
        dtype, nbytes = "float32", 4
        reasons.append("fp32: no bf16 on this device")
    row = max_seq_len
    if device.kind == "cpu":
        row = min(max_seq_len, max(CPU_ROW, longest_example or 0))
        if row < max_seq_len:
            reasons.append(f"rows of {row} tokens on CPU (measured faster than rows of {max_seq_len})")
    batch_rows = micro_batch * max(1, max_seq_len // row)  # proportional: 2 ranks x b rows = 1 rank x 2b rows
    tokens = row * batch_rows
    fixed = int(params * BYTES_NF4_PER_PARAM) + 16 * lora_params + 2 * tokens * vocab * 4  # weights, LoRA, logits
    if not quantized:
        fixed += int(params * (2 - BYTES_NF4_PER_PARAM))  # 16-bit weights
    free = device.memory_bytes * 0.8 - fixed
    no_gc = activation_bytes(tokens, hidden, layers, nbytes, checkpointing=False)
    checkpointing = no_gc > free
    if checkpointing:
        reasons.append(f"gradient checkpointing on: {no_gc / 2**30:.1f} GiB of activations would not fit")
    else:
        reasons.append(f"gradient checkpointing off: {no_gc / 2**30:.2f} GiB of activations fit")
    padding_free = device.kind == "cuda"
    return Defaults(dtype, checkpointing, True, row, padding_free, reasons, batch_rows)


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


def shape_of_config(config: Any) -> dict[str, int]:
    """``params``, ``hidden``, ``layers``, ``vocab`` of the model a transformers config describes.

    The model is built on the meta device (no memory, no weights read), so the count is exact for any
    architecture, before the base model is loaded in the dtype these defaults choose.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", None) or config
    return {"params": params, "hidden": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
