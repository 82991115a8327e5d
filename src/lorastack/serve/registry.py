"""Adapters from the store, loaded into the one base model on first use.

- ``name`` resolves to the version LATEST names *now*, ``name@v3`` to a pinned one; so a newly
  published version is served from the next request on (hot reload), while requests already running
  finish on the version they started with.
- Every load goes through ``Store.adapter(ref)``, which verifies each file's sha256 against the
  manifest; the manifest's base model and revision must match the served base. A bad adapter is
  refused (``AdapterInvalid``) and every other adapter keeps serving.
- Loaded adapters live in a bounded LRU; an adapter is evicted only when no request is using it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.store import Store, StoreError, parse_adapter_ref

from .engine import BASE

log = logging.getLogger("lorastack.serve")


class ModelNotFound(Exception):
    """No base model or adapter by that name."""


class AdapterInvalid(Exception):
    """The adapter exists but cannot be served (corrupt, or made for another base model)."""


class BadModelRef(Exception):
    """The ``model`` string is not valid adapter-reference syntax (e.g. ``travel@`` or ``travel@3``)."""


@dataclass
class Resolved:
    """What a ``model`` string resolves to: the engine's adapter slot and the served id."""

    slot: str  # peft adapter name, or BASE
    served: str  # the id echoed back as ``model`` (``name@version`` for adapters)
    ref: str | None = None  # the adapter ref when it is an adapter


def same_base(a: str, b: str) -> bool:
    """Whether two base-model identifiers name the same model (hub id or local directory)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
    except OSError:
        return False


class AdapterRegistry:
    """The base model plus a bounded LRU of peft adapters loaded from the store."""

    def __init__(
        self,
        store: Store,
        base_model_id: str,
        model: Any,
        *,
        base_revision: str | None = None,
        model_lock: threading.Lock | None = None,
        max_loaded: int = 8,
        failure_ttl: float = 30.0,
    ):
        self.store = store
        self.base_model_id = base_model_id
        self.base_revision = base_revision
        self.model = model  # becomes a PeftModel when the first adapter loads
        self.model_lock = model_lock or threading.Lock()
        self.max_loaded = max_loaded
        self.failure_ttl = failure_ttl
        self._lock = threading.RLock()  # guards the LRU bookkeeping; also serializes loads
        self._loaded: OrderedDict[str, str] = OrderedDict()  # ref -> slot
        self._refcount: dict[str, int] = {}  # slot -> requests using it
        self._failed: dict[str, tuple[Any, float, str]] = {}  # ref -> (manifest stamp, time, message)
        self._counter = 0
        self._verified: dict[str, tuple[Any, str | None]] = {}  # ref -> (stamp, reason or None), for listing
        self._reported: dict[str, str] = {}  # ref -> the reason last logged
        self.on_model_change = lambda: None  # the engine forgets its cached adapter state

    def get_model(self) -> Any:
        return self.model

    @property
    def loaded(self) -> list[str]:
        """Refs of the adapters loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    # -- listing ----------------------------------------------------------------------------------
    def public(self, message: str) -> str:
        """``message`` with the store's absolute location removed (paths shown relative to the store)."""
        root = str(self.store.root)
        return message.replace(root + os.sep, "").replace(root, "<store>")

    def catalog(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """(servable, unavailable): every adapter version that verifies and is made for this base, and
        every one that is not, each with the reason. Never raises over the store's contents.

        A servable entry: ``{"id", "name", "version", "ref", "promoted", "created", "manifest"}``; ``id``
        is ``name@vN`` for each version plus ``name`` for the one LATEST names (``promoted`` marks it).
        Verification (sha256 of every file) is cached per version until its files change.
        """
        servable: list[dict[str, Any]] = []
        unavailable: list[dict[str, str]] = []
        try:
            entries = self.store.adapter_catalog()
        except OSError as exc:  # the share itself is unreadable: report, serve the base
            self._report("adapters", f"the store cannot be listed: {exc}")
            return servable, [{"id": "adapters", "reason": self.public(f"the store cannot be listed: {exc}")}]
        for entry in entries:
            ok: dict[str, dict[str, Any]] = {}
            for version, reason in entry.errors.items():
                unavailable.append(self._unavailable(f"{entry.name}@{version}", reason))
            for version, adapter in entry.versions.items():
                reason = self._checked(adapter)
                if reason:
                    unavailable.append(self._unavailable(adapter.ref, reason))
                    continue
                ok[version] = {
                    "id": adapter.ref,
                    "name": entry.name,
                    "version": version,
                    "ref": adapter.ref,
                    "promoted": version == entry.latest,
                    "created": _timestamp(adapter.path),
                    "manifest": adapter.manifest,
                }
            if entry.latest_error:
                unavailable.append(self._unavailable(entry.name, entry.latest_error))
            elif entry.latest is not None:
                if entry.latest in ok:
                    servable.append({**ok[entry.latest], "id": entry.name})
                elif entry.latest not in entry.versions and entry.latest not in entry.errors:
                    unavailable.append(
                        self._unavailable(entry.name, f"LATEST names {entry.latest}, which is not published")
                    )
                else:
                    unavailable.append(self._unavailable(entry.name, f"LATEST names {entry.latest}, which cannot be served"))
            servable.extend(ok.values())
        return servable, unavailable

    def _unavailable(self, ref: str, reason: str) -> dict[str, str]:
        self._report(ref, reason)
        return {"id": ref, "reason": self.public(reason)}

    def _report(self, ref: str, reason: str) -> None:
        """Log why ``ref`` is not served, once per distinct reason (listing runs on every /v1/models)."""
        with self._lock:
            if self._reported.get(ref) == reason:
                return
            self._reported[ref] = reason
        log.warning("not serving %s: %s", ref, reason)

    def _checked(self, adapter) -> str | None:
        """Why ``adapter`` cannot be served (verification + base check), or None; cached by file stamp."""
        try:
            stamp = _stamp(adapter.path)
        except OSError as exc:
            return f"its directory cannot be read ({exc})"
        with self._lock:
            hit = self._verified.get(adapter.ref)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            self.store.adapter(adapter.ref)  # sha256 of every file
            self._check_base(adapter)
            reason = None
        except (StoreError, AdapterInvalid, OSError) as exc:
            reason = str(exc)
        with self._lock:
            self._verified[adapter.ref] = (stamp, reason)
            if len(self._verified) > 4096:  # bounded: forget the oldest entries
                for key in list(self._verified)[:1024]:
                    self._verified.pop(key, None)
        return reason

    def system_prompt(self, model_name: str) -> str | None:
        """The system prompt the adapter ``model_name`` was trained with (its manifest's), if any."""
        try:
            name, version = parse_adapter_ref(model_name)
            version = version or self.store.latest_version(name)
            if version is None:
                return None
            prompt = self.store.adapter(f"{name}@{version}", verify=False).manifest.get("system_prompt")
        except (StoreError, OSError):
            return None
        return prompt if isinstance(prompt, str) and prompt.strip() else None

    # -- resolving and loading -------------------------------------------------------------------
    def acquire(self, model_name: str) -> Resolved:
        """Resolve ``model_name``, loading the adapter if needed, and pin it until ``release``."""
        if model_name == self.base_model_id:
            return Resolved(BASE, self.base_model_id)
        try:
            name, version = parse_adapter_ref(model_name)
        except StoreError as exc:
            if "@" in model_name:  # meant as an adapter reference, but malformed (e.g. "travel@")
                raise BadModelRef(f"Invalid model {model_name[:100]!r}: {exc}") from None
            raise ModelNotFound(_not_found(model_name)) from None
        from_latest = version is None
        if from_latest:
            try:
                version = self.store.latest_version(name)
            except (StoreError, OSError) as exc:
                msg = f"adapter {name} cannot be served: {exc}"
                log.warning("%s", msg)
                raise AdapterInvalid(self.public(msg)) from None
            if version is None:
                raise ModelNotFound(_not_found(model_name))
            if not (self.store.adapters_dir / name / version).is_dir():
                raise AdapterInvalid(f"adapter {name} cannot be served: LATEST names {version}, which is not published")
        ref = f"{name}@{version}"
        with self._lock:
            slot = self._pin(ref)
        if slot is None:
            # Verify (hash every file) without holding the registry lock: requests for adapters already
            # loaded go on while a large adapter is checked. Loads themselves are serialized.
            adapter = self._verify(ref)
            with self._lock:
                slot = self._pin(ref)  # another request may have loaded it meanwhile
                if slot is None:
                    self._inject_checked(adapter)
                    slot = self._pin(ref)
                self._evict()
        return Resolved(slot, ref, ref)

    def _pin(self, ref: str) -> str | None:
        slot = self._loaded.get(ref)
        if slot is not None:
            self._loaded.move_to_end(ref)
            self._refcount[slot] = self._refcount.get(slot, 0) + 1
        return slot

    def release(self, slot: str) -> None:
        """Unpin an adapter slot taken by ``acquire`` (called when the request finishes)."""
        if slot == BASE:
            return
        with self._lock:
            if self._refcount.get(slot, 0) > 0:
                self._refcount[slot] -= 1
            self._evict()

    def _verify(self, ref: str):
        """The verified store adapter for ``ref``; raises ModelNotFound or AdapterInvalid (cached a while)."""
        name, version = ref.split("@")
        vdir = self.store.adapters_dir / name / version
        if not vdir.is_dir():
            raise ModelNotFound(_not_found(ref))
        try:
            stamp = _stamp(vdir)
        except OSError as exc:
            raise self._failure(ref, None, f"adapter {ref} cannot be served: {exc}") from None
        with self._lock:
            failed = self._failed.get(ref)
        if failed and failed[0] == stamp and time.monotonic() - failed[1] < self.failure_ttl:
            raise AdapterInvalid(failed[2])
        try:
            adapter = self.store.adapter(ref)  # verifies every file's sha256 against the manifest
            self._check_base(adapter)
        except (StoreError, AdapterInvalid, OSError) as exc:
            raise self._failure(ref, stamp, f"adapter {ref} cannot be served: {exc}") from None
        return adapter, stamp

    def _inject_checked(self, checked) -> None:
        adapter, stamp = checked
        slot = f"a{self._counter}"
        self._counter += 1
        t0 = time.monotonic()
        try:
            with self.model_lock:
                try:
                    self._inject(adapter.path, slot)
                except Exception:
                    if slot in getattr(self.model, "peft_config", {}):  # drop a half-injected adapter
                        self.model.delete_adapter(slot)
                        self.on_model_change()
                    raise
        except Exception as exc:  # noqa: BLE001 - peft refused the files (shapes, targets, format)
            msg = f"adapter {adapter.ref} cannot be served: loading it into the base model failed: {exc}"
            raise self._failure(adapter.ref, stamp, msg) from None
        log.info("loaded adapter %s in %.2f s", adapter.ref, time.monotonic() - t0)
        self._failed.pop(adapter.ref, None)
        self._loaded[adapter.ref] = slot
        self._refcount[slot] = 0

    def _failure(self, ref: str, stamp, msg: str) -> AdapterInvalid:
        """Log ``msg`` (with full paths, for the operator) and return it as the client sees it (without)."""
        public = self.public(msg)
        with self._lock:
            self._failed[ref] = (stamp, time.monotonic(), public)
        log.warning("%s", msg)
        return AdapterInvalid(public)

    def _check_base(self, adapter) -> None:
        base = adapter.manifest.get("base_model")
        if not base or not isinstance(base, str):
            raise AdapterInvalid(f"{adapter.path / 'manifest.json'} names no base_model")
        if not same_base(base, self.base_model_id):
            raise AdapterInvalid(
                f"it was trained on base model {base!r} but this server serves {self.base_model_id!r}; "
                f"start a server with --base-model {base} to serve it"
            )
        want = adapter.manifest.get("base_revision")
        if want and self.base_revision and want != self.base_revision:
            raise AdapterInvalid(
                f"it was trained on {base} revision {want} but this server loaded revision {self.base_revision}"
            )

    def _inject(self, path: Path, slot: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=slot, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=slot, is_trainable=False)
        self.model.eval()
        self.on_model_change()

    def _evict(self) -> None:
        while len(self._loaded) > self.max_loaded:
            victim = next((r for r, s in self._loaded.items() if self._refcount.get(s, 0) == 0), None)
            if victim is None:  # everything is in use: run over the bound until requests finish
                return
            slot = self._loaded.pop(victim)
            self._refcount.pop(slot, None)
            self._unload(slot)
            log.info("evicted adapter %s", victim)

    def _unload(self, slot: str) -> None:
        """Drop an evicted adapter's weights (the vLLM registry removes its LoRA request instead)."""
        with self.model_lock:
            self.model.delete_adapter(slot)
            self.on_model_change()


def _not_found(model_name: str) -> str:
    return f"The model `{model_name}` does not exist or you do not have access to it."


def _stamp(vdir: Path) -> tuple:
    """Changes when the version directory's files change (size or mtime), to expire a cached result."""
    out = []
    for p in sorted(vdir.rglob("*")):
        try:
            st = p.stat()
            out.append((str(p.relative_to(vdir)), st.st_size, st.st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


def _timestamp(path: Path) -> int:
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return 0
