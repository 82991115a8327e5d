"""Base models and tokenizers: where they are looked for, 4-bit loading, clear errors.

One place for what the trainer, the inference app and ``lorastack validate`` all do: resolve a base model
(a local directory, or a Hugging Face Hub id looked up in a cache), load its tokenizer and load the model
itself, in 4-bit NF4 with double quantization (bitsandbytes) unless told otherwise. When the model cannot
be found, :class:`ModelLoadError` names the model, where it was looked for, whether the hub was switched
off (``HF_HUB_OFFLINE``) and what to do.

Plain values in, plain values out: callers turn their typed settings (RunSpec, server options) into
arguments. torch and transformers are imported inside the functions, so importing this module is free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_TRUE = ("1", "true", "True")


class ModelLoadError(Exception):
    """A base model or its tokenizer cannot be loaded; the message says where it was looked for and what to do."""


def hub_cache_dir(default: str | os.PathLike[str]) -> str | None:
    """The cache to pass as ``cache_dir``: ``default`` (e.g. the store's models/), unless HF_HOME or
    HF_HUB_CACHE is set, in which case the Hugging Face cache they name is used (None)."""
    if os.environ.get("HF_HOME") or os.environ.get("HF_HUB_CACHE"):
        return None
    return str(default)


def model_source(
    base_model: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[str, dict[str, Any], str]:
    """(name or path, ``from_pretrained`` kwargs, a description of where it is looked for).

    A local directory is loaded as is (no revision, cache or token). A hub id gets ``revision``,
    ``cache_dir`` and ``HF_TOKEN`` (passed through, never logged or stored).
    """
    local = Path(base_model).expanduser()
    if local.is_dir():
        return str(local), {}, f"local directory {local}"
    if base_model.startswith((".", "/", "~")):
        raise ModelLoadError(f"base_model {base_model!r} looks like a path, but there is no such directory")
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
        where = f"the model cache ({cache_dir})"
    else:
        hf = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        where = f"the Hugging Face cache ({hf})"
    return base_model, kwargs, where


def _not_found(base_model: str, where: str, exc: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") in _TRUE or os.environ.get("TRANSFORMERS_OFFLINE") in _TRUE
    hub = (
        "the hub is switched off (HF_HUB_OFFLINE=1)"
        if offline
        else "the Hugging Face Hub could not provide it"
    )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"cannot load base model {base_model!r}: not found in {where}, and {hub} ({first}). "
        "Either download it once with network access (e.g. `huggingface-cli download "
        f"{base_model}` with HF_HOME pointing at the cache; gated models need HF_TOKEN), or set base_model "
        "to a local directory holding the model."
    )


def load_tokenizer(
    base_model: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    require_chat_template: bool = True,
) -> Any:
    """The base model's tokenizer; with ``require_chat_template``, it must carry a chat template."""
    from transformers import AutoTokenizer

    name, kwargs, where = model_source(base_model, revision, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_found(name, where, exc) from None
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"base model {name!r} has no chat template in its tokenizer; lorastack trains with the model's "
            "own chat template, so use an instruct/chat model (or add chat_template.jinja to the model dir)"
        )
    return tokenizer


def compute_dtype(wanted: str = "auto", device: str | None = None) -> Any:
    """The torch dtype for ``wanted``; "auto" = bf16 where the GPU supports it, fp16 on older GPUs (T4),
    fp32 on CPU. ``device`` (e.g. "cpu", "cuda") decides GPU or CPU; None = a GPU if there is one."""
    import torch

    if wanted not in ("auto", "", "None"):
        return {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }[wanted]
    on_gpu = device.startswith("cuda") if device is not None else torch.cuda.is_available()
    if on_gpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


_compute_dtype = compute_dtype  # load_base_model's ``compute_dtype`` argument shadows the function


def load_base_model(
    base_model: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    quantize: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    device: str | None = None,
) -> tuple[Any, str | None]:
    """The base model (4-bit ``quant_type`` + double quant unless ``quantize`` is False) and the revision
    actually loaded (the hub commit; None for a local directory).

    ``device``: a ``device_map`` value ("cpu", "cuda"); None = the first GPU if there is one, else CPU.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name, kwargs, where = model_source(base_model, revision, cache_dir)
    dtype = _compute_dtype(compute_dtype, device)
    load_kwargs: dict[str, Any] = dict(kwargs, dtype=dtype)
    if quantize:
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if device is None:
        from lorastack.distributed import device_map

        device = device_map()  # this rank's GPU under torchrun (GPU 0 alone), else CPU
    load_kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **load_kwargs)
    except (OSError, ValueError) as exc:
        if "quantization" in str(exc).lower() or "bitsandbytes" in str(exc).lower():
            raise
        raise _not_found(name, where, exc) from None
    return model, getattr(model.config, "_commit_hash", None) or kwargs.get("revision")
