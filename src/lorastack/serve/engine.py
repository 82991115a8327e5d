"""The base model and the batching generation loop.

One scheduler thread owns the model. Requests wait in a bounded queue; at every decoding step the
scheduler admits waiting requests (up to ``max_batch_size`` rows in flight), prefills them, merges their
KV cache into the running batch, and then decodes one token for every row in a single forward pass.
Rows name their adapter through peft's mixed-batch ``adapter_names`` (``"__base__"`` for the base model),
so requests for different adapters share every step instead of racing on ``set_adapter`` or queueing
one by one. A request that finishes, hits a stop sequence or is cancelled (client gone) leaves the
batch at the next step and its cache rows are dropped.

Tokens reach the caller through a callback (``sink``) run on the scheduler thread; ``AsyncSink`` hands
them to an asyncio queue for the HTTP and UI handlers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("lorastack.serve")

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
MIXED = "__mixed__"  # several adapters in one step: peft's adapter_names path


class QueueFull(Exception):
    """The wait queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class EngineNotReady(Exception):
    """The model is still loading (or failed to load)."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (validated at the API edge)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Event:
    """What the engine tells a request's sink: a text ``delta``, the ``done`` finish, or an ``error``."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


class GenerationRequest:
    """One chat completion in flight: prompt tokens, adapter, sampling settings and decoding state."""

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: str,
        params: SamplingParams,
        sink: Callable[[Event], None],
        on_finish: Callable[[], None] | None = None,
    ):
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.params = params
        self.sink = sink
        self.on_finish = on_finish
        self.cancelled = False
        self.generated: list[int] = []
        self.sent = ""  # text already emitted
        self.content_ids: list[int] = []  # generated tokens that are text (no end-of-turn token)
        self.text = ""  # decoded reply so far (complete characters only)
        self.prefix_offset = 0  # incremental detokenization window (see Engine._detokenize)
        self.read_offset = 0
        self.finished = False
        self.generator = None  # torch.Generator, created on the model's device at admission
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        """Stop generating for this request at the next step (client disconnected)."""
        self.cancelled = True


class AsyncSink:
    """Delivers engine events from the scheduler thread into an asyncio queue on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


# -- loading ---------------------------------------------------------------------------------------


def load_base_model(
    base_model: str,
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    quantize: bool = True,
    device: str | None = None,
):
    """Load the base model for serving (4-bit NF4 when bitsandbytes is usable, eval mode) and its tokenizer.

    Local directories and hub ids are resolved by :mod:`lorastack.models`; hub downloads land in
    ``cache_dir`` (``<store>/models``). Returns (model, tokenizer, info dict).
    """
    import torch

    from lorastack import models

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = models.compute_dtype("auto", device)  # what models.load_base_model picks for this device
    quantized = False
    if quantize:
        try:
            import bitsandbytes  # noqa: F401

            quantized = True
        except ImportError:
            log.warning("bitsandbytes is not installed: loading the base model unquantized")
    model, resolved = models.load_base_model(
        base_model, revision, cache_dir, quantize=quantized, device=device
    )
    model.eval()
    tokenizer = models.load_tokenizer(base_model, revision, cache_dir, require_chat_template=False)
    info = {
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "quantized": quantized,
        "revision": revision or resolved,
    }
    return model, tokenizer, info


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends a turn: the generation config's eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def context_length(model, tokenizer) -> int:
    """The model's context window in tokens."""
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 10**7:
        n = min(n, tml)
    return int(n)


# -- the scheduler ---------------------------------------------------------------------------------


class Engine:
    """Continuous batching over one model (plain or peft-wrapped) on a scheduler thread.

    ``get_model`` returns the current model object (the registry swaps in a ``PeftModel`` when the first
    adapter loads). ``model_lock`` is held for each step; the registry holds it to load or evict adapters,
    so the model never changes under a forward pass.
    """

    def __init__(
        self,
        get_model: Callable[[], Any],
        tokenizer,
        *,
        eos_ids: set[int],
        max_context: int,
        model_lock: threading.Lock | None = None,
        max_batch_size: int = 16,
        max_queue: int = 64,
    ):
        self.get_model = get_model
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_context = max_context
        self.model_lock = model_lock or threading.Lock()
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._pending: deque[GenerationRequest] = deque()
        self._rows: list[GenerationRequest] = []
        self._state: dict[str, Any] | None = None  # cache, mask, pos, next tokens of the running rows
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "finished": 0, "cancelled": 0, "max_rows": 0, "tokens": 0}
        self._request_seconds = 2.0  # moving average of submit-to-finish time, for Retry-After
        self.admit_group = max(1, max_batch_size // 4)
        self.admit_wait_steps = 4
        self._waited = 0
        self._active: str | None = None  # the adapter state the peft model is in (see _activate)
        self._deferred: list[Callable[[], None]] = []  # on_finish callbacks to run after the step

    # public -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorastack-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; raises QueueFull when ``max_queue`` requests are already waiting."""
        with self._cv:
            if self._stop:
                raise EngineNotReady("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._pending.append(req)
            self._cv.notify()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the waiting batches times a typical request's time."""
        batches_ahead = len(self._pending) / max(1, self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._request_seconds))

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    # scheduler ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._pending and not self._rows:
                    self._cv.wait()
                stopping = self._stop
                admitted: list[GenerationRequest] = []
                if stopping:
                    for r in [*self._pending, *self._rows]:
                        self._finish(r, "cancelled", error=EngineNotReady("the server is shutting down"))
                    self._pending.clear()
                elif self._admit_now():
                    while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
                        r = self._pending.popleft()
                        if r.cancelled:
                            self._finish(r, "cancelled")
                        else:
                            admitted.append(r)
            if stopping:
                self._run_deferred()
                return
            import torch

            with self.model_lock, torch.inference_mode():
                if admitted:
                    self._prefill_isolated(admitted)
                if self._rows:
                    try:
                        self._decode()
                    except Exception as exc:  # the batched forward failed: its cache is unusable
                        log.exception("decoding step failed for %d rows", len(self._rows))
                        for r in self._rows:
                            self._finish(r, "error", error=exc)
                        self._rows, self._state = [], None
            self._run_deferred()

    def _prefill_isolated(self, reqs: list[GenerationRequest]) -> None:
        """Prefill ``reqs`` together; if that fails, prefill each alone so only the request that fails
        alone gets the error. Rows already decoding are untouched (a prefill builds its own cache)."""
        try:
            self._prefill(reqs)
            return
        except Exception as exc:
            if len(reqs) == 1:
                log.exception("prefill failed")
                self._finish(reqs[0], "error", error=exc)
                return
            log.warning("prefill of %d requests failed (%s); retrying each alone", len(reqs), exc)
        for r in reqs:
            if r.finished:
                continue
            try:
                self._prefill([r])
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(r, "error", error=exc)

    def _run_deferred(self) -> None:
        """Run finished requests' callbacks outside the engine's locks (they take the registry's)."""
        while self._deferred:
            callback = self._deferred.pop()
            try:
                callback()
            except Exception:  # a callback must not stop the scheduler
                log.exception("request finish callback failed")

    def _admit_now(self) -> bool:
        """Whether to prefill waiting requests before this step.

        A prefill is a forward pass of its own, about as costly as a decoding step for the whole batch,
        so waiting requests are admitted in groups: at once when nothing runs, else when a group of
        them is waiting or the oldest has waited ``admit_wait_steps`` steps (a few tens of ms).
        """
        free = self.max_batch_size - len(self._rows)
        if not self._pending or free <= 0:
            return False
        if not self._rows or len(self._pending) >= min(free, self.admit_group) or self._waited >= self.admit_wait_steps:
            self._waited = 0
            return True
        self._waited += 1
        return False

    def model_changed(self) -> None:
        """Forget which adapter is active (the registry loaded or deleted one, under the model lock)."""
        self._active = None

    def _activate(self, model, adapters: list[str]) -> bool:
        """Prepare the peft model for a step; True if the step needs a mixed batch (``adapter_names``).

        peft's mixed-batch path re-registers hooks on every module at every forward; when all rows of
        a step use the same adapter (always so for a single client), switching the active adapter once
        and running the plain forward is much cheaper. The switch is cached across steps.
        """
        uniq = set(adapters)
        want = next(iter(uniq)) if len(uniq) == 1 else MIXED
        if want != self._active:
            tuner = model.base_model
            if want == BASE:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                if want != MIXED:
                    tuner.set_adapter(want, inference_mode=True)
            self._active = want
        return want == MIXED

    def _forward(self, model, input_ids, mask, pos, cache, adapters):
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": pos,
            "past_key_values": cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if hasattr(model, "peft_config") and self._activate(model, adapters):
            kwargs["adapter_names"] = adapters
        out = model(**kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, reqs: list[GenerationRequest]) -> None:
        import torch
        from transformers import DynamicCache

        model = self.get_model()
        device = model.device
        length = max(len(r.prompt_ids) for r in reqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(reqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), length), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's next token goes in the last column
            n = len(r.prompt_ids)
            ids[i, length - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, length - n :] = 1
            # any int64 seed (the API's range) maps onto the generator's unsigned 64-bit seed space
            seed = r.params.seed if r.params.seed is not None else secrets.randbits(63)
            r.generator = torch.Generator(device=device).manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Plain full-length layers (no config): rows are merged, selected and left-trimmed along the
        # sequence axis, which sliding-window layers would not allow; the attention mask still applies
        # any sliding window.
        cache = DynamicCache()
        logits, cache = self._forward(model, ids, mask, positions, cache, [r.adapter for r in reqs])
        tokens = self._sample(logits, reqs)
        keep = [i for i, (r, t) in enumerate(zip(reqs, tokens)) if not self._accept_safe(r, t, len(r.prompt_ids) + 1)]
        if not keep:
            return
        new = {
            "cache": cache,
            "mask": mask,
            "pos": torch.tensor([len(r.prompt_ids) for r in reqs], dtype=torch.long, device=device),
            "next": torch.tensor([t if t is not None else pad for t in tokens], dtype=torch.long, device=device),
        }
        if len(keep) < len(reqs):
            _select_rows(new, torch.tensor(keep, device=device))
        self._merge(new, [reqs[i] for i in keep])

    def _merge(self, new: dict[str, Any], reqs: list[GenerationRequest]) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        import torch

        if self._state is None:
            self._state, self._rows = new, list(reqs)
        else:
            old = self._state
            lo, ln = old["mask"].shape[1], new["mask"].shape[1]
            length = max(lo, ln)
            for layer_old, layer_new in zip(old["cache"].layers, new["cache"].layers):
                layer_old.keys = torch.cat([_lpad(layer_old.keys, length), _lpad(layer_new.keys, length)], 0)
                layer_old.values = torch.cat([_lpad(layer_old.values, length), _lpad(layer_new.values, length)], 0)
            old["mask"] = torch.cat([_lpad(old["mask"], length, dim=1), _lpad(new["mask"], length, dim=1)], 0)
            old["pos"] = torch.cat([old["pos"], new["pos"]])
            old["next"] = torch.cat([old["next"], new["next"]])
            self._rows.extend(reqs)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _decode(self) -> None:
        import torch

        model = self.get_model()
        st = self._state
        # drop rows cancelled since the last step before paying for them
        live = [i for i, r in enumerate(self._rows) if not r.cancelled]
        if len(live) < len(self._rows):
            for i, r in enumerate(self._rows):
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._keep(live)
            if not self._rows:
                return
            st = self._state
        mask = torch.cat([st["mask"], torch.ones_like(st["mask"][:, :1])], dim=1)
        logits, cache = self._forward(
            model, st["next"][:, None], mask, st["pos"][:, None], st["cache"], [r.adapter for r in self._rows]
        )
        st["cache"], st["mask"] = cache, mask
        st["pos"] = st["pos"] + 1
        tokens = self._sample(logits, self._rows)
        self.stats["steps"] += 1
        positions = st["pos"].tolist()
        keep = [
            i for i, (r, t) in enumerate(zip(self._rows, tokens)) if not self._accept_safe(r, t, positions[i] + 1)
        ]
        st["next"] = torch.tensor([t if t is not None else 0 for t in tokens], dtype=torch.long, device=st["next"].device)
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _keep(self, idx: list[int]) -> None:
        import torch

        self._rows = [self._rows[i] for i in idx]
        if not self._rows:
            self._state = None
            return
        st = self._state
        _select_rows(st, torch.tensor(idx, device=st["mask"].device))
        # columns that are padding for every remaining row are dead weight: cut them
        used = st["mask"].any(dim=0)
        first = int(used.long().argmax())
        if first > 0:
            st["mask"] = st["mask"][:, first:]
            for layer in st["cache"].layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _sample(self, logits, reqs: list[GenerationRequest]) -> list[int | None]:
        """One token per row; a row whose sampling fails gets None and is finished with the error (the
        other rows of the step go on)."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int | None] = []
        for i, r in enumerate(reqs):
            try:
                tokens.append(sample_token(logits[i], r.params, r.generator, greedy[i]))
            except Exception as exc:  # noqa: BLE001 - isolate the row, never the batch
                log.warning("sampling failed for one request (%s: %s); finishing it with an error",
                            type(exc).__name__, exc)
                self._finish(r, "error", error=exc)
                tokens.append(None)
        return tokens

    def _accept_safe(self, r: GenerationRequest, token: int | None, next_len: int) -> bool:
        """``_accept``, with a failure (or an earlier sampling failure) finishing only this row."""
        if token is None or r.finished:
            return True
        try:
            return self._accept(r, token, next_len)
        except Exception as exc:  # noqa: BLE001 - e.g. the tokenizer cannot decode: this row only
            log.warning("emitting a token failed for one request (%s: %s)", type(exc).__name__, exc)
            self._finish(r, "error", error=exc)
            return True

    def _accept(self, r: GenerationRequest, token: int, next_len: int) -> bool:
        """Record a sampled token for ``r``; emit text; return True if ``r`` is finished."""
        self.stats["tokens"] += 1
        if r.cancelled:
            self._finish(r, "cancelled")
            return True
        if token in self.eos_ids:
            r.generated.append(token)
            self._flush(r)
            self._finish(r, "stop")
            return True
        r.generated.append(token)
        r.content_ids.append(token)
        at_end = len(r.generated) >= r.params.max_tokens or next_len >= self.max_context
        text = self._detokenize(r, final=at_end)
        stops = r.params.stop
        if stops:
            start = max(0, len(r.sent) - max(len(s) for s in stops))
            hits = [(text.find(s, start), s) for s in stops if s]
            hits = [h for h in hits if h[0] >= 0]
            if hits:
                cut = min(h[0] for h in hits)
                self._emit(r, text[:cut])
                self._finish(r, "stop")
                return True
        if at_end:
            self._emit(r, text)
            self._finish(r, "length")
            return True
        self._emit(r, text[: len(text) - _holdback(text, stops)])
        return False

    def _flush(self, r: GenerationRequest) -> None:
        self._emit(r, self._detokenize(r, final=True))

    def _detokenize(self, r: GenerationRequest, final: bool = False) -> str:
        """The reply text so far, decoded incrementally (a small window per token, not the whole reply).

        Text is added only once it no longer ends in an incomplete UTF-8 sequence (U+FFFD), unless
        ``final``. The window starts a few tokens back so tokenizers whose decoding depends on the
        previous token (leading spaces) decode the new text as they would the whole reply.
        """
        ids = r.content_ids
        prefix = self.tokenizer.decode(ids[r.prefix_offset : r.read_offset], skip_special_tokens=True)
        new = self.tokenizer.decode(ids[r.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            r.text += new[len(prefix) :]
            r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        return r.text

    def _emit(self, r: GenerationRequest, upto: str) -> None:
        if len(upto) > len(r.sent) and upto.startswith(r.sent):
            delta = upto[len(r.sent) :]
            r.sent = upto
            r.sink(Event("delta", text=delta))

    def _finish(self, r: GenerationRequest, reason: str, error: BaseException | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        else:
            self.stats["finished"] += 1
            took = time.monotonic() - r.submitted_at
            self._request_seconds = 0.9 * self._request_seconds + 0.1 * took
        try:
            if error is not None:
                r.sink(Event("error", error=error, finish_reason=reason))
            else:
                r.sink(
                    Event(
                        "done",
                        finish_reason=reason,
                        prompt_tokens=len(r.prompt_ids),
                        completion_tokens=len(r.generated),
                    )
                )
        finally:
            if r.on_finish is not None:
                # Deferred: this runs under the model lock, and releasing an adapter may evict one,
                # which takes the registry lock and then the model lock.
                self._deferred.append(r.on_finish)


def sample_token(logits, params: SamplingParams, generator, greedy: int | None = None) -> int:
    """Sample one token id from a row of logits with temperature and nucleus (top-p) filtering.

    Numerically safe over the whole accepted range (temperature in [0, 2], top_p in (0, 1]): logits are
    shifted so the best is 0 before dividing, so a temperature of 1e-300 gives -inf for every other token
    (greedy in the limit) instead of inf - inf = NaN. Raises ValueError if the logits are not finite.
    """
    import torch

    if greedy is None:
        greedy = int(logits.argmax())
    t, top_p = float(params.temperature), float(params.top_p)
    if not (math.isfinite(t) and t >= 0 and math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"sampling settings out of range: temperature={t!r}, top_p={top_p!r}")
    if t == 0:
        return greedy
    row = logits.double()
    best = row.max()
    if not torch.isfinite(best):
        raise ValueError("the model produced non-finite logits")
    scaled = (row - best) / t  # <= 0 everywhere, 0 at the best token(s); -inf where it underflows
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p[(cum - sorted_p) >= top_p] = 0.0  # keep the smallest set reaching top_p (never empty)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError("sampling produced an invalid distribution")
    return int(torch.multinomial(probs, 1, generator=generator))


def _holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold back: a possible stop-sequence prefix or a partial UTF-8 char."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
        hold = max(hold, 1)
    return hold


def _lpad(t, length: int, dim: int = -2):
    """Left-pad ``t`` with zeros along ``dim`` to ``length``."""
    import torch

    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _select_rows(state: dict[str, Any], idx) -> None:
    for layer in state["cache"].layers:
        layer.keys = layer.keys.index_select(0, idx)
        layer.values = layer.values.index_select(0, idx)
    for key in ("mask", "pos", "next"):
        state[key] = state[key].index_select(0, idx)
