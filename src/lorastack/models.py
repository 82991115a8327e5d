"""Base models and tokenizers: where they are looked for, 4-bit loading, clear errors.

One place for what the trainer, the inference app and ``lorastack validate`` all do: resolve a base model
(a local directory, or a Hugging Face Hub id looked up in a cache), load its tokenizer and load the model
itself, in 4-bit NF4 with double quantization (bitsandbytes) unless told otherwise. When the model cannot
be found, :class:`ModelLoadError` names the model, where it was looked for, whether the hub was switched
off (``HF_HUB_OFFLINE``) or cannot be reached, and what to do.

The model cache is chosen by one rule (:func:`hub_cache_dir`, :func:`store_cache_dir`): ``HF_HUB_CACHE`` /
``HF_HOME`` when set, else the store's ``models/``. Before a hub id is looked up, a short connect check
(:func:`hub_reachable`, a few seconds at most, skipped under ``HF_HUB_OFFLINE``) decides between loading
from the cache only and failing at once, instead of the hub client's retries when there is no network.

Plain values in, plain values out: callers turn their typed settings (RunSpec, server options) into
arguments. torch and transformers are imported inside the functions, so importing this module is free.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_TRUE = ("1", "true", "True")
HUB_CONNECT_TIMEOUT_S = 3.0
_reachability: dict[str, tuple[float, bool, str]] = {}  # endpoint -> (checked at, reachable, why not)


class ModelLoadError(Exception):
    """A base model or its tokenizer cannot be loaded; the message says where it was looked for and what to do."""


def hub_cache_dir(default: str | os.PathLike[str]) -> str | None:
    """The cache to pass as ``cache_dir``: ``default`` (e.g. the store's models/), unless HF_HOME or
    HF_HUB_CACHE is set, in which case the Hugging Face cache they name is used (None)."""
    if os.environ.get("HF_HOME") or os.environ.get("HF_HUB_CACHE"):
        return None
    return str(default)


def store_cache_dir(store_root: str | os.PathLike[str] | None = None) -> str | None:
    """The model cache of the store at ``store_root`` (else $LORASTACK_STORE, else ./.lorastack/store):
    ``<store>/models`` under :func:`hub_cache_dir`'s rule. Every command that loads a base model uses
    this, so ``lorastack validate --base-model`` and ``lorastack finetune`` share one cache."""
    from lorastack.store import open_store

    return hub_cache_dir(open_store(store_root).models_dir)


def hub_offline() -> bool:
    """True when the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE") in _TRUE or os.environ.get("TRANSFORMERS_OFFLINE") in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> tuple[bool, str]:
    """(whether a TCP connection to the hub endpoint opens within ``timeout`` seconds, why not).

    Name resolution has no timeout of its own, so the check runs in a daemon thread that is given up
    on after ``timeout``. The answer is remembered for a minute (the trainer loads the tokenizer, then
    the model)."""
    endpoint = hub_endpoint()
    cached = _reachability.get(endpoint)
    if cached and time.monotonic() - cached[0] < 60:
        return cached[1], cached[2]
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    proxy = _proxy_for(url.scheme, host)
    if proxy:  # behind a proxy the hub is reached through it: check the proxy instead
        purl = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname or "", purl.port or (443 if purl.scheme == "https" else 80)
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append((True, ""))
        except OSError as exc:
            result.append((False, f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=probe, daemon=True, name="lorastack-hub-check")
    thread.start()
    thread.join(timeout + 0.5)
    answer = result[0] if result else (False, f"no connection within {timeout:g} s")
    _reachability[endpoint] = (time.monotonic(), *answer)
    return answer


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL the hub client would use for ``host`` (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, NO_PROXY)."""
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (e.strip().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    for name in (*names, "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def _hub_cached(name: str, kwargs: dict[str, Any], filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            name, filename, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
        )
    except Exception:  # noqa: BLE001 (a malformed cache or id: let from_pretrained give its own error)
        return False
    return isinstance(found, str)


def _prefer_cache_when_offline(name: str, kwargs: dict[str, Any], where: str, filename: str) -> dict[str, Any]:
    """``kwargs`` plus ``local_files_only`` when the hub cannot be reached and ``filename`` is cached;
    ModelLoadError at once when it cannot be reached and is not cached (no retries against no network)."""
    if hub_offline() or kwargs.get("local_files_only"):
        return kwargs
    reachable, why = hub_reachable()
    if reachable:
        return kwargs
    if _hub_cached(name, kwargs, filename):
        return dict(kwargs, local_files_only=True)
    unreachable = OSError(f"{hub_endpoint()} cannot be reached ({why})")
    raise _not_found(name, where, unreachable, kwargs.get("cache_dir"), unreachable=True)


def context_length(config: Any = None, tokenizer: Any = None) -> int | None:
    """The model's context in tokens: the smallest of the config's position limit
    (``max_position_embeddings``, ``n_positions``, ...) and the tokenizer's ``model_max_length`` that is
    declared; None when neither declares one."""
    limits = []
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10_000_000:
        limits.append(value)
    return min(limits) if limits else None


def load_context_length(
    base_model: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> int | None:
    """:func:`context_length` of the base model's config (config.json only; None if it has none)."""
    from transformers import AutoConfig

    name, kwargs, where = model_source(base_model, revision, cache_dir)
    if not Path(name).is_dir():
        kwargs = _prefer_cache_when_offline(name, kwargs, where, "config.json")
    try:
        return context_length(AutoConfig.from_pretrained(name, **kwargs))
    except (OSError, ValueError, KeyError):
        return None


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


def _not_found(
    base_model: str, where: str, exc: Exception, cache_dir: str | None = None, unreachable: bool = False
) -> ModelLoadError:
    if hub_offline():
        hub = "the hub is switched off (HF_HUB_OFFLINE=1)"
    elif unreachable:
        hub = "the Hugging Face Hub cannot be reached (offline?)"
    else:
        hub = "the Hugging Face Hub could not provide it"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    into = f" --cache-dir {cache_dir}" if cache_dir else ""
    return ModelLoadError(
        f"cannot load base model {base_model!r}: not found in {where}, and {hub} ({first}). "
        f"Either download it once with network access (`hf download {base_model}{into}`"
        + ("" if cache_dir else ", with HF_HOME pointing at the cache")
        + "; gated models need HF_TOKEN), or set base_model to a local directory holding the model."
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
    if not Path(name).is_dir():
        kwargs = _prefer_cache_when_offline(name, kwargs, where, "tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_found(name, where, exc, kwargs.get("cache_dir")) from None
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
    if not Path(name).is_dir():
        kwargs = _prefer_cache_when_offline(name, kwargs, where, "config.json")
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
        raise _not_found(name, where, exc, kwargs.get("cache_dir")) from None
    return model, getattr(model.config, "_commit_hash", None) or kwargs.get("revision")
