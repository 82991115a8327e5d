"""The inference app's serving engine and vLLM's sizing, planned from the GPU profile and the stack settings.

Pure data and functions (no Pulumi): the InferenceApp component only turns :func:`plan_engine`'s environment into
container env vars, which ``lorastack.serve.launch`` (which environment runs) and ``lorastack serve --engine vllm``
(``serve/vllm_engine.engine_settings``) read.

``inference.engine: auto`` (the default) is vLLM on a GPU profile and the built-in engine on a CPU one. Every
inference profile is a GPU profile today (provisioning.gpu), so auto means vLLM on every stack; ``builtin`` keeps
the built-in engine (for a 4-bit base a 16-bit vLLM cannot fit, e.g. a 7B model on a T4's 16 GB).

Derived values (each overridable under ``inference.vllm``):

- ``gpuMemoryUtilization``: the share of one GPU's memory vLLM may use for weights, activations and KV cache. The
  replica owns its GPU (ACA gives the first container all of it), so it leaves only a fixed headroom for what vLLM
  does not budget (the CUDA context, CUDA graphs, the sampler): 1 - 2 GiB / GPU memory, at most 0.95: T4 0.86,
  A100 0.95. vLLM's own default (0.9) would leave 8 GiB of an A100 unused and overcommit a T4.
- ``maxLoras`` (distinct adapters in one batch): at most the requests one replica takes before ACA scales out
  (``concurrentRequests``: a batch cannot hold more adapters than requests), and at most what the GPU holds
  cheaply: vLLM preallocates every slot at ``maxLoraRank`` (about 0.3 GB per slot at rank 64 for a 7B model, all
  linear layers) -- 2 on a T4, 8 on an A100.
- ``maxLoraRank``: 64, four times the trainer's default rank (16); an adapter above it is refused with a 422
  naming LORASTACK_VLLM_MAX_LORA_RANK. Only vLLM's sizes are accepted (:data:`LORA_RANKS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from provisioning import contract, gpu

ENGINES = ("auto", "builtin", "vllm")
# vLLM's accepted max_lora_rank values (vllm.config.lora); serve/vllm_engine rounds up to the same list.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 64
HEADROOM_GIB = 2.0
MAX_GPU_MEMORY_UTILIZATION = 0.95
QUANTIZATIONS = ("bitsandbytes",)

# Memory of ONE GPU of each profile type, in GiB as CUDA reports it (mem_get_info total; the marketing "16 GB" of a
# T4 is 14.6 GiB there). Multi-GPU profiles: vLLM serves on one GPU (no tensor parallelism is configured).
GPU_MEMORY_GIB: dict[str, float] = {
    "Consumption-GPU-NC8as-T4": 14.6,
    "Consumption-GPU-NC24-A100": 79.2,
    "NC24-A100": 79.2,
    "NC48-A100": 79.2,
    "NC96-A100": 79.2,
}
# Adapter slots per batch the GPU holds cheaply (see the module docstring).
MAX_LORAS_CAP: dict[str, int] = {
    "Consumption-GPU-NC8as-T4": 2,
    "Consumption-GPU-NC24-A100": 8,
    "NC24-A100": 8,
    "NC48-A100": 8,
    "NC96-A100": 8,
}

ENV_ENGINE = contract.ENV_ENGINE
ENV_GPU_MEMORY_UTILIZATION = "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION"
ENV_MAX_LORAS = "LORASTACK_VLLM_MAX_LORAS"
ENV_MAX_LORA_RANK = "LORASTACK_VLLM_MAX_LORA_RANK"
ENV_QUANTIZATION = "LORASTACK_VLLM_QUANTIZATION"


@dataclass(frozen=True)
class EnginePlan:
    """The engine the app runs and the env vars that say so (name -> value, in a stable order)."""

    engine: str  # builtin | vllm
    env: dict[str, str]


def resolve_engine(engine: str, profile_type: str) -> str:
    """``auto`` -> vllm on a GPU profile, builtin otherwise; ``builtin`` / ``vllm`` as given."""
    if engine not in ENGINES:
        raise ValueError(f"{engine!r} is not an engine; allowed: {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    profile = gpu.GPU_PROFILES.get(profile_type)
    return "vllm" if profile is not None and profile.gpus > 0 else "builtin"


def gpu_memory_utilization(profile_type: str) -> float:
    """1 - HEADROOM_GIB / the GPU's memory, rounded down to 0.01, at most MAX_GPU_MEMORY_UTILIZATION."""
    total = GPU_MEMORY_GIB[profile_type]
    return min(MAX_GPU_MEMORY_UTILIZATION, math.floor((1 - HEADROOM_GIB / total) * 100) / 100)


def check_lora_rank(rank: int) -> int:
    """``rank`` if vLLM accepts it as ``max_lora_rank``; else a ValueError listing the ranks it does."""
    if rank not in LORA_RANKS:
        raise ValueError(f"{rank!r} is not a rank vLLM accepts; allowed: {', '.join(map(str, LORA_RANKS))}")
    return rank


def plan_engine(
    profile_type: str,
    engine: str = "auto",
    *,
    concurrent_requests: int = 4,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    gpu_memory_util: float | None = None,
    quantization: str | None = None,
) -> EnginePlan:
    """The app's engine env for ``profile_type`` (explicit values win over the profile's derived ones)."""
    chosen = resolve_engine(engine, profile_type)
    env = {ENV_ENGINE: chosen}
    if chosen != "vllm":
        return EnginePlan(chosen, env)
    if max_lora_rank is not None:
        check_lora_rank(max_lora_rank)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"{quantization!r} is not a quantization; allowed: {', '.join(QUANTIZATIONS)}")
    loras = max_loras if max_loras is not None else max(1, min(MAX_LORAS_CAP[profile_type], concurrent_requests))
    util = gpu_memory_util if gpu_memory_util is not None else gpu_memory_utilization(profile_type)
    env[ENV_GPU_MEMORY_UTILIZATION] = f"{util:.2f}"
    env[ENV_MAX_LORAS] = str(loras)
    env[ENV_MAX_LORA_RANK] = str(max_lora_rank if max_lora_rank is not None else DEFAULT_MAX_LORA_RANK)
    if quantization:
        env[ENV_QUANTIZATION] = quantization
    return EnginePlan(chosen, env)
