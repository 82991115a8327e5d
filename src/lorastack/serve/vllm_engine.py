"""vLLM as the generation engine, behind lorastack's own API, auth, UI and wire format.

``lorastack serve --engine vllm`` (or ``LORASTACK_ENGINE=vllm``) keeps everything a client sees: the
same ``/v1`` routes and errors, the same adapter names and versions from the store (``name`` = LATEST,
``name@vN`` pinned), the same API keys and Gradio UI. Only the generation changes hands: prompts are
rendered with the base model's chat template exactly as for the built-in engine, and the token ids go to
vLLM's ``AsyncLLM`` (paged attention, continuous batching, multi-LoRA batching).

Adapters: the registry verifies an adapter in the store (every file's sha256, the manifest's base model
and revision) exactly as for the built-in engine; then, instead of loading it into a peft model, it
registers a ``LoRARequest`` pointing at ``adapters/<name>/<version>`` with vLLM (``add_lora``), so a
broken adapter is refused with a 422 at first use, not mid-generation. A new version is a new LoRA id
(hot reload); evicted ones are removed from vLLM (``remove_lora``).

vLLM's asyncio engine runs on its own event loop thread: ``submit`` is called from the server's loop, and
events reach each request's ``AsyncSink`` thread-safely, as from the built-in engine's scheduler thread.

Settings (the stack's GPU profile sets them as env vars on the inference app):
``LORASTACK_VLLM_MAX_LORAS`` (adapters in one batch, default min(4, --max-loaded-adapters)),
``LORASTACK_VLLM_MAX_LORA_RANK`` (default 64), ``LORASTACK_VLLM_GPU_MEMORY_UTILIZATION`` (default 0.9),
``LORASTACK_VLLM_DTYPE`` (default auto), ``LORASTACK_VLLM_QUANTIZATION`` (e.g. ``bitsandbytes``; default
none: vLLM serves the 16-bit base), ``LORASTACK_VLLM_ENFORCE_EAGER`` (default: on CPU only). On CPU, vLLM's
own ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache.

vLLM is imported only inside functions: it lives in its own environment (see ``make vllm-env``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .engine import BASE, EngineNotReady, Event, GenerationRequest, QueueFull
from .registry import AdapterRegistry

log = logging.getLogger("lorastack.serve")

ENV_ENGINE = "LORASTACK_ENGINE"
ENGINES = ("builtin", "vllm")


def choose_engine(flag: str | None, environ: dict[str, str] | None = None) -> str:
    """The engine for ``lorastack serve``: ``--engine``, else $LORASTACK_ENGINE, else builtin."""
    env = os.environ if environ is None else environ
    engine = (flag or env.get(ENV_ENGINE) or "builtin").strip().lower()
    if engine not in ENGINES:
        raise ValueError(f"{ENV_ENGINE}={engine!r} is not an engine; use one of: {', '.join(ENGINES)}")
    return engine


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a whole number") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number") from None


def _lora_rank_choice(rank: int) -> int:
    """vLLM accepts only some max ranks; the smallest accepted one that holds ``rank``."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ValueError(f"max LoRA rank {rank} is above vLLM's largest (512)")


def engine_settings(
    model: str,
    *,
    revision: str | None,
    download_dir: str | None,
    max_context: int,
    max_batch_size: int,
    max_loaded_adapters: int,
    on_gpu: bool,
) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` keyword arguments for serving ``model`` with LoRA (plain values, no vLLM)."""
    max_loras = max(1, _env_int("LORASTACK_VLLM_MAX_LORAS", min(4, max_loaded_adapters)))
    eager_default = "0" if on_gpu else "1"  # CPU: skip torch.compile at startup; GPU: CUDA graphs
    settings: dict[str, Any] = {
        "model": model,
        "tokenizer": model,
        "revision": revision,
        "download_dir": download_dir,
        "dtype": os.environ.get("LORASTACK_VLLM_DTYPE") or "auto",
        "max_model_len": max_context,
        "max_num_seqs": max_batch_size,
        "enable_lora": True,
        "max_loras": max_loras,
        "max_cpu_loras": max(max_loras, max_loaded_adapters),
        "max_lora_rank": _lora_rank_choice(_env_int("LORASTACK_VLLM_MAX_LORA_RANK", 64)),
        "enforce_eager": os.environ.get("LORASTACK_VLLM_ENFORCE_EAGER", eager_default) in ("1", "true", "True"),
        "disable_log_stats": True,
        "seed": 0,
    }
    if on_gpu:
        settings["gpu_memory_utilization"] = _env_float("LORASTACK_VLLM_GPU_MEMORY_UTILIZATION", 0.9)
    quant = os.environ.get("LORASTACK_VLLM_QUANTIZATION")
    if quant:
        settings["quantization"] = quant
    return {k: v for k, v in settings.items() if v is not None}


class VLLMAdapterRegistry(AdapterRegistry):
    """The store's adapters as vLLM LoRA requests: verified like the built-in registry's, then registered."""

    def __init__(self, store, base_model_id: str, *, max_lora_rank: int, **kwargs: Any):
        super().__init__(store, base_model_id, None, **kwargs)
        self.engine: VLLMEngine | None = None  # set once the engine exists
        self.max_lora_rank = max_lora_rank
        self._requests: dict[str, Any] = {}  # slot -> LoRARequest
        self._next_id = 1

    def lora_request(self, slot: str) -> Any:
        """The LoRARequest of an acquired slot (None for the base model)."""
        return None if slot == BASE else self._requests[slot]

    def _inject(self, path: Path, slot: str) -> None:
        from vllm.lora.request import LoRARequest

        try:
            rank = int(json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("r", 0))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path / 'adapter_config.json'} is not readable: {exc}") from None
        if rank > self.max_lora_rank:
            raise ValueError(
                f"its LoRA rank {rank} is above the server's max_lora_rank {self.max_lora_rank}; "
                "raise LORASTACK_VLLM_MAX_LORA_RANK"
            )
        request = LoRARequest(lora_name=slot, lora_int_id=self._next_id, lora_path=str(path))
        self._next_id += 1  # ids are never reused: a new version is a new id (vLLM caches by id)
        if self.engine is None:
            raise EngineNotReady("the vLLM engine is not running")
        self.engine.call(self.engine.llm.add_lora(request), timeout=300)  # load now: errors are a 422
        self._requests[slot] = request

    def _unload(self, slot: str) -> None:
        request = self._requests.pop(slot, None)
        if request is not None and self.engine is not None:
            self.engine.call(self.engine.llm.remove_lora(request.lora_int_id), timeout=60)


class VLLMEngine:
    """vLLM's AsyncLLM on a loop thread, with the built-in engine's interface (submit/stop/queue stats)."""

    def __init__(
        self,
        settings: dict[str, Any],
        registry: VLLMAdapterRegistry,
        *,
        eos_ids: set[int],
        max_batch_size: int,
        max_queue: int,
    ):
        self.settings = settings
        self.registry = registry
        self.eos_ids = sorted(eos_ids)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._active: dict[str, GenerationRequest] = {}  # vLLM request id -> request
        self._stopping = False
        self._request_seconds = 2.0
        self.stats = {"finished": 0, "cancelled": 0, "tokens": 0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lorastack-vllm", daemon=True)
        self.llm: Any = None

    def call(self, coro, timeout: float | None = None) -> Any:
        """Run ``coro`` on the engine's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> VLLMEngine:
        """Start the loop thread and vLLM's engine (loads the model; minutes on a GPU for a large one)."""
        self._thread.start()

        async def make():
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.settings))
            asyncio.get_running_loop().create_task(self._watch_cancelled())
            return llm

        try:
            self.llm = self.call(make())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        return self

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            active = list(self._active.values())
        for r in active:
            r.cancel()
        if self.llm is not None:
            try:
                self.llm.shutdown()
            except Exception:  # shutting down anyway: log and go on
                log.exception("vLLM shutdown failed")
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # the built-in engine's interface ---------------------------------------------------------------
    def model_changed(self) -> None:  # the registry calls this after loads; vLLM keeps its own state
        pass

    @property
    def running(self) -> int:
        return min(len(self._active), self.max_batch_size)

    @property
    def queue_depth(self) -> int:
        return max(0, len(self._active) - self.max_batch_size)

    def retry_after(self) -> int:
        batches_ahead = self.queue_depth / max(1, self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._request_seconds))

    def submit(self, req: GenerationRequest) -> None:
        """Hand ``req`` to vLLM; QueueFull when ``max_batch_size + max_queue`` requests are in flight."""
        if self._stopping or self.llm is None:
            raise EngineNotReady("the server is shutting down")
        rid = f"lorastack-{uuid.uuid4().hex}"
        with self._lock:
            if len(self._active) >= self.max_batch_size + self.max_queue:
                raise QueueFull(self.retry_after())
            self._active[rid] = req
        asyncio.run_coroutine_threadsafe(self._generate(rid, req), self._loop)

    # on the engine's loop -----------------------------------------------------------------------
    def _sampling(self, req: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = req.params
        return SamplingParams(
            max_tokens=p.max_tokens,
            temperature=max(0.0, p.temperature),
            top_p=p.top_p,
            stop=list(p.stop) or None,
            stop_token_ids=self.eos_ids,  # the template's end-of-turn tokens, as the built-in engine stops
            seed=p.seed,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    async def _generate(self, rid: str, req: GenerationRequest) -> None:
        from vllm.inputs import TokensPrompt

        completion = 0
        reason: str | None = None
        error: BaseException | None = None
        try:
            lora = self.registry.lora_request(req.adapter)
            stream = self.llm.generate(
                TokensPrompt(prompt_token_ids=list(req.prompt_ids)), self._sampling(req), rid, lora_request=lora
            )
            async for out in stream:
                o = out.outputs[0]
                completion += len(o.token_ids)
                if o.text:
                    req.sink(Event("delta", text=o.text))
                if o.finish_reason is not None:
                    reason = {"abort": "cancelled"}.get(o.finish_reason, o.finish_reason)
                if req.cancelled:
                    reason = "cancelled"
                    await self.llm.abort(rid)
                    break
        except asyncio.CancelledError:
            reason = "cancelled"
        except Exception as exc:  # a failed request fails alone, never the server
            log.exception("vLLM generation failed")
            error, reason = exc, "error"
        finally:
            self._finish(rid, req, reason or ("cancelled" if req.cancelled else "stop"), completion, error)

    def _finish(self, rid: str, req: GenerationRequest, reason: str, completion: int, error) -> None:
        with self._lock:
            self._active.pop(rid, None)
        req.finished = True
        self.stats["tokens"] += completion
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        else:
            self.stats["finished"] += 1
            self._request_seconds = 0.9 * self._request_seconds + 0.1 * (time.monotonic() - req.submitted_at)
        try:
            if error is not None:
                req.sink(Event("error", error=error, finish_reason="error"))
            else:
                req.sink(
                    Event("done", finish_reason=reason, prompt_tokens=len(req.prompt_ids), completion_tokens=completion)
                )
        finally:
            if req.on_finish is not None:
                try:  # releases the adapter pin; may evict, which calls back into this loop: run it off-loop
                    self._loop.run_in_executor(None, req.on_finish)
                except RuntimeError:
                    req.on_finish()

    async def _watch_cancelled(self) -> None:
        """Abort requests whose client went away, also while they still wait in vLLM's queue."""
        while not self._stopping:
            await asyncio.sleep(0.2)
            with self._lock:
                gone = [rid for rid, r in self._active.items() if r.cancelled]
            if gone:
                await self.llm.abort(gone)


def load_vllm(state) -> None:
    """``ServerState.load`` for ``--engine vllm``: tokenizer, registry and the vLLM engine on ``state``.

    Records a failure in ``state.load_error`` (``/readyz`` says so) instead of raising.
    """
    try:
        from transformers import AutoConfig, GenerationConfig

        from lorastack import models
        from lorastack.chat import end_of_turn_ids

        from .engine import context_length, eos_token_ids

        t0 = time.monotonic()
        cache_dir = models.hub_cache_dir(state.store.models_dir)
        name, kwargs, _where = models.model_source(state.base_model_id, state.base_revision, cache_dir)
        tokenizer = models.load_tokenizer(state.base_model_id, state.base_revision, cache_dir, require_chat_template=False)
        config = AutoConfig.from_pretrained(name, **kwargs)
        try:
            gen = GenerationConfig.from_pretrained(name, **kwargs)
        except OSError:  # no generation_config.json: the tokenizer's eos is enough
            gen = GenerationConfig()

        class _Shape:  # what context_length / eos_token_ids read from a model
            pass

        shape = _Shape()
        shape.config, shape.generation_config = config, gen
        eos = eos_token_ids(shape, tokenizer)
        try:
            eos |= set(end_of_turn_ids(tokenizer))
        except ValueError as exc:
            log.info("no end-of-turn tokens from the chat template (%s)", exc)
        max_context = context_length(shape, tokenizer)
        on_gpu = _on_gpu()
        settings = engine_settings(
            name,
            revision=kwargs.get("revision"),
            download_dir=kwargs.get("cache_dir"),
            max_context=max_context,
            max_batch_size=state.max_batch_size,
            max_loaded_adapters=state.max_loaded_adapters,
            on_gpu=on_gpu,
        )
        registry = VLLMAdapterRegistry(
            state.store,
            state.base_model_id,
            max_lora_rank=settings["max_lora_rank"],
            base_revision=state.base_revision or getattr(config, "_commit_hash", None),
            max_loaded=state.max_loaded_adapters,
        )
        engine = VLLMEngine(
            settings, registry, eos_ids=eos, max_batch_size=state.max_batch_size, max_queue=state.max_queue
        ).start()
        registry.engine = engine
        from .prompts import PromptRenderer  # prompts render off the event loop, as with the built-in engine

        state.tokenizer = tokenizer
        state.max_context = max_context
        state.renderer = PromptRenderer(
            tokenizer,
            max_context,
            timeout=state.render_timeout,
            max_waiting=max(16, state.max_queue + state.max_batch_size),
        )
        state.info = {
            "engine": "vllm",
            "device": "cuda" if on_gpu else "cpu",
            "dtype": str(engine.llm.model_config.dtype).replace("torch.", ""),
            "quantized": bool(settings.get("quantization")),
            "revision": state.base_revision or getattr(config, "_commit_hash", None),
            "max_loras": settings["max_loras"],
            "max_lora_rank": settings["max_lora_rank"],
        }
        state.registry = registry
        state.engine = engine
        log.info("vLLM engine for %s ready in %.1f s (%s)", state.base_model_id, time.monotonic() - t0, state.info)
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("starting the vLLM engine for %s failed", state.base_model_id)


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - vLLM brings torch
        return False
