"""The adapter store: the one contract between the CLI, the trainer and the inference app.

The store is a directory tree (an Azure Files share in the cloud, a plain directory locally)::

    <store>/
      datasets/<sha256>.jsonl            content-addressed, immutable
      models/                            Hugging Face cache for base models (HF_HOME in the cloud)
      runs/<run-id>/spec.yaml            the resolved run spec
      runs/<run-id>/status.json          phase, step, loss, tokens/s, timestamps, error
      runs/<run-id>/results.csv          per-step metrics (Azure fine-tuning column names)
      runs/<run-id>/checkpoints/checkpoint-<step>/COMPLETE
      adapters/<name>/<version>/         PEFT files + manifest.json (written last)
      adapters/<name>/LATEST             names the current (promoted) version; written last
      adapters/<name>/promotions.json    every move of LATEST, oldest first (see promotion_history)
      adapters/<name>/<version>/eval.json  `lorastack eval`'s result for that version (not in the manifest)
      queue/<run-id>                     runs submitted to the cloud job, oldest first
      claims/<run-id>                    which job execution took a queued run

Writers write into a temporary sibling and rename; markers and pointers are written last. Readers trust
nothing without the manifest and verify every file's sha256, so a killed writer never leaves a half
adapter that a reader will load. This module imports only the standard library and PyYAML.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SPEC_FILE = "spec.yaml"
STATUS_FILE = "status.json"
LATEST = "LATEST"
COMPLETE = "COMPLETE"
PROMOTIONS = "promotions.json"
EVAL_FILE = "eval.json"
DEFAULT_LOCAL_STORE = Path(".lorastack") / "store"

# \Z, not $: "$" also matches before a trailing newline, so "travel\n" would pass as a name.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
VERSION_RE = re.compile(r"^v[0-9]{1,9}\Z")
_TMP_PREFIX = ".tmp-"


class StoreError(Exception):
    """A store object is missing, malformed or does not match its manifest."""


# The layout as keys relative to the store root (POSIX). Store builds local paths from them; lorastack.azure
# writes the same keys to the Azure Files share over REST, so the layout is defined here only.
def dataset_key(digest: str) -> str:
    return f"datasets/{digest}.jsonl"


def run_key(run_id: str, name: str) -> str:
    return f"runs/{check_name(run_id, 'run id')}/{name}"


def queue_key(run_id: str) -> str:
    return f"queue/{check_name(run_id, 'run id')}"


def claim_key(run_id: str) -> str:
    return f"claims/{check_name(run_id, 'run id')}"


def adapter_key(name: str, *parts: str) -> str:
    """``adapters/<name>[/<part>...]``, e.g. ``adapter_key("travel", LATEST)`` or ``adapter_key("travel", "v3", EVAL_FILE)``."""
    return "/".join([f"adapters/{check_name(name)}", *parts])


# promotions.json is a JSON list, oldest first, of {"version": "v3", "action": "promote" | "rollback",
# "at": ISO-8601 UTC, "reason": "..."}; it is rewritten atomically *before* LATEST moves, so LATEST never names a
# version the history does not explain. Local stores and the cloud share apply the same pure functions below.
def promotion_entry(version: str, action: str, reason: str) -> dict[str, str]:
    """One promotions.json entry (``action`` is "promote" or "rollback")."""
    if action not in ("promote", "rollback"):
        raise ValueError(f"unknown promotion action {action!r}")
    return {"version": version, "action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason}


def rollback_target(history: list[dict[str, Any]], current: str | None, available: set[str]) -> str | None:
    """The version LATEST should go back to from ``current``: the one promoted before it, skipping versions
    no longer ``available`` (deleted or unverifiable). Rollbacks undo promotions in order, so rolling back
    twice goes two promotions back. None when there is nothing to go back to."""
    stack: list[str] = []
    for entry in history:
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
        elif entry.get("version"):
            stack.append(str(entry["version"]))
    if stack and stack[-1] == current:
        stack.pop()
    for version in reversed(stack):
        if version != current and version in available:
            return version
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for large datasets and weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_name(name: str, what: str = "adapter name") -> str:
    """Return ``name`` if it is a valid store name, else raise a StoreError saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid {what} {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_adapter_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name`` or ``name@version`` (e.g. ``travel@v3``) into (name, version or None)."""
    if not isinstance(ref, str):
        raise StoreError(f"invalid adapter reference {ref!r}: use 'name' or 'name@v3'")
    name, at, version = ref.partition("@")
    check_name(name)
    if at and not VERSION_RE.fullmatch(version):
        raise StoreError(f"invalid adapter version {version!r} in {ref!r}: use 'name' or 'name@v3'")
    return name, version or None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's host and pid are in the temporary name, so a leftover of a killed writer can be told apart
    # from a live writer's file (see _clean_tmp).
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{_owner_tag()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fault_point(f"write:{path.name}")
    os.replace(tmp, path)


# -- write-path helpers: fault injection, leftovers, locks ------------------------------------------------
FAULT_ENV = "LORASTACK_FAULT_AT"


def fault_point(name: str) -> None:
    """The test seam for crashes: when $LORASTACK_FAULT_AT names this point, the process SIGKILLs itself here.

    Points: ``publish:staged`` (manifest written in the staging directory), ``publish:renamed`` (version
    directory in place, LATEST not moved), ``latest:history`` (promotions.json written, LATEST not),
    ``publish:promoted`` (LATEST moved, the run not yet marked succeeded), ``write:<file>`` (a temporary file
    written, not yet renamed over <file>). Costs one environment lookup when unset.
    """
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


_LEFTOVER_MAX_AGE_S = 3600.0


def _clean_tmp(directory: Path) -> list[Path]:
    """Remove ``.tmp-*`` entries of ``directory`` left by dead writers: those whose tag names this host and a
    pid that is gone, and any older than an hour (a writer on another host, or an untagged name)."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    host = _host()
    now = time.time()
    for entry in directory.iterdir():
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        m = re.search(rf"{re.escape(host)}-(\d+)-[0-9a-f]{{8}}$", entry.name)
        try:
            old = now - entry.lstat().st_mtime > _LEFTOVER_MAX_AGE_S
        except FileNotFoundError:
            continue
        dead = m is not None and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
        if entry.name.startswith(f"{_TMP_PREFIX}deleted-"):
            dead = True  # a deletion that was cut short: finish it
        if dead or old:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class LockHeldError(StoreError):
    """Another live process holds a store lock; the message names it (pid, host, heartbeat age)."""


class StoreLock:
    """An exclusive lock file on the store: ``{"pid", "host", "what", "acquired_at", "heartbeat_at", "token"}``.

    Created with O_EXCL (atomic on a local disk and on SMB). A holder that died is detected two ways: same
    host and its pid is gone, or (any host) its heartbeat is older than ``stale_s``; such a lock is taken over.
    With ``heartbeat``, a daemon thread refreshes ``heartbeat_at`` every ``stale_s / 6`` seconds while held.
    ``wait_s``: how long ``acquire`` waits for a live holder before raising :class:`LockHeldError`.
    """

    def __init__(
        self,
        path: Path,
        what: str,
        *,
        stale_s: float | None = None,
        heartbeat: bool = False,
        wait_s: float = 0.0,
    ):
        self.path = path
        self.what = what
        self.stale_s = float(stale_s or os.environ.get("LORASTACK_LOCK_STALE_S") or 60.0)
        self.heartbeat = heartbeat
        self.wait_s = wait_s
        self.token = uuid.uuid4().hex
        self._stop: Any = None
        self._thread: Any = None

    def _info(self) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {"pid": os.getpid(), "host": _host(), "what": self.what, "token": self.token,
                "acquired_at": now, "heartbeat_at": now, "heartbeat_ts": time.time()}

    def _read(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict):
            info = {}
        with contextlib.suppress(FileNotFoundError):
            info.setdefault("heartbeat_ts", self.path.stat().st_mtime)  # unreadable lock: age by mtime
        return info

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record plus ``alive`` (False when it is dead or its heartbeat is stale)."""
        info = self._read()
        if info is None:
            return None
        return {**info, "alive": not self._is_dead(info), "heartbeat_age_s": round(self._age(info), 1)}

    def _age(self, info: dict[str, Any]) -> float:
        try:
            return time.time() - float(info.get("heartbeat_ts", 0))
        except (TypeError, ValueError):
            return float("inf")

    def _is_dead(self, info: dict[str, Any]) -> bool:
        if info.get("host") == _host() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
            return True
        return self._age(info) > self.stale_s

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read()
                if info is None:
                    continue  # released meanwhile
                if self._is_dead(info):
                    self._take_over(info)
                    continue
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise LockHeldError(
                    f"{self.what} is locked by pid {info.get('pid')} on {info.get('host')} (since "
                    f"{info.get('acquired_at')}, heartbeat {self._age(info):.0f}s ago): one trainer per run. Wait for "
                    f"it to finish, stop it, or remove {self.path} if that process is gone "
                    f"(a lock is taken over by itself once its heartbeat is {self.stale_s:.0f}s old)"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._info(), fh)
            break
        if self.heartbeat:
            self._start_heartbeat()
        return self

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a dead holder's lock, guarded so two processes never both remove a fresh one."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > 30:
                    guard.unlink()  # a taker-over died mid-way
            time.sleep(0.02)
            return
        try:
            os.close(fd)
            again = self._read()
            if again is not None and again.get("token") == stale.get("token") and self._is_dead(again):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()
        interval = max(0.05, self.stale_s / 6)

        def beat() -> None:
            while not self._stop.wait(interval):
                info = self._read()
                if not info or info.get("token") != self.token:
                    return  # taken over (we were presumed dead): never write over the new holder
                info["heartbeat_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                info["heartbeat_ts"] = time.time()
                with contextlib.suppress(OSError):
                    write_json_atomic(self.path, info)

        self._thread = threading.Thread(target=beat, name=f"lorastack-lock-{self.what}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        info = self._read()
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file; any unreadable content (bad encoding, bad JSON, absurd nesting) is a StoreError
    naming the file. A missing file stays FileNotFoundError (callers check existence first)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer over 4300 digits, nesting too deep
        raise StoreError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def check_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    """``manifest`` (read from ``path``) if it has the shape readers rely on, else a StoreError saying why:
    a JSON object whose ``files`` maps relative paths inside the version directory to sha256 strings, and
    whose ``base_model`` / ``base_revision`` / ``system_prompt``, when present, are strings."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: the manifest is a JSON {type(manifest).__name__}, not an object")
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise StoreError(f"{path}: 'files' is a {type(files).__name__}, not an object of path -> sha256")
        for rel, digest in files.items():
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise StoreError(f"{path}: 'files' entry {rel!r} is not a sha256 hex digest")
            parts = Path(rel).parts
            if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
                raise StoreError(f"{path}: 'files' entry {rel!r} is not a path inside the adapter directory")
    for key in ("base_model", "base_revision", "system_prompt", "name", "version", "run_id", "published_at"):
        value = manifest.get(key)
        if value is not None and not isinstance(value, str):
            raise StoreError(f"{path}: {key!r} is a {type(value).__name__}, not a string")
    return manifest


@dataclass(frozen=True)
class Adapter:
    """A published, verified adapter version."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def base_model(self) -> str:
        return self.manifest.get("base_model", "")

    @property
    def base_revision(self) -> str | None:
        return self.manifest.get("base_revision")


class Store:
    """A store rooted at a directory: a local path or the mount path of the Azure Files share."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- layout ---------------------------------------------------------------------------------
    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def models_dir(self) -> Path:
        """Hugging Face cache for base models (set HF_HOME here in the cloud)."""
        return self.root / "models"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    def init(self) -> Store:
        """Create the top-level directories (idempotent) and check that the store can be written.

        Raises StoreError naming the store and what to do when it cannot (a read-only mount, no permission),
        before any run is prepared: a writer must never fail half-way for that.
        """
        try:
            for d in (self.datasets_dir, self.models_dir, self.runs_dir, self.adapters_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_PREFIX}write-check.{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"the store at {self.root} cannot be written ({exc.strerror or exc}): pass --store DIR (or set "
                "LORASTACK_STORE) to a writable directory; the inference app's read-only mount is not for training"
            ) from None
        return self

    # -- datasets -------------------------------------------------------------------------------
    def put_dataset(self, src: str | os.PathLike[str]) -> tuple[str, Path]:
        """Copy a dataset file into the store under its sha256; returns (sha256, stored path).

        Idempotent: the same content is stored once, and an existing copy is never rewritten.
        """
        src = Path(src)
        digest = sha256_file(src)
        dest = self.root / dataset_key(digest)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{_TMP_PREFIX}{dest.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        return digest, dest

    def dataset_path(self, digest: str) -> Path:
        """Path of a stored dataset; verifies it exists and still has the content its name claims."""
        path = self.root / dataset_key(digest)
        if not path.is_file():
            raise StoreError(f"dataset {digest} is not in the store at {self.datasets_dir}")
        if sha256_file(path) != digest:
            raise StoreError(f"dataset {path} does not match its sha256: the store copy is corrupt")
        return path

    # -- runs -----------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / check_name(run_id, "run id")

    def checkpoints_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoints"

    def write_status(self, run_id: str, status: dict[str, Any]) -> None:
        """Atomically replace ``runs/<run-id>/status.json``."""
        write_json_atomic(self.root / run_key(run_id, STATUS_FILE), status)

    def read_status(self, run_id: str) -> dict[str, Any] | None:
        path = self.root / run_key(run_id, STATUS_FILE)
        return read_json(path) if path.exists() else None

    @staticmethod
    def mark_complete(checkpoint: Path) -> None:
        """Mark a fully written checkpoint directory as trustworthy (written last)."""
        write_bytes_atomic(checkpoint / COMPLETE, f"{time.time():.3f}\n".encode())

    def complete_checkpoints(self, run_id: str) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint holding a COMPLETE marker, oldest first."""
        found = []
        root = self.checkpoints_dir(run_id)
        if root.is_dir():
            for child in root.iterdir():
                m = re.fullmatch(r"checkpoint-(\d+)", child.name)
                if m and child.is_dir() and (child / COMPLETE).is_file():
                    found.append((int(m.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self, run_id: str) -> Path | None:
        """The newest complete checkpoint of a run, or None. Incomplete ones are ignored."""
        done = self.complete_checkpoints(run_id)
        return done[-1][1] if done else None

    # -- run queue ------------------------------------------------------------------------------
    # The ACA job template is fixed (image, mounts, secrets); starting an execution with per-run overrides
    # replaces the whole container template and may drop volume mounts. So a submitted run is queued on the
    # store and the job entrypoint (`lorastack train --run next`) claims it.
    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    def enqueue_run(self, run_id: str) -> None:
        """Queue a prepared run (its spec.yaml already on the store) for the next job execution."""
        write_bytes_atomic(self.root / queue_key(run_id), f"{time.time():.6f}\n".encode())

    def claim_run(self, claimant: str) -> str | None:
        """The run ``claimant`` (a job execution name) owns, else the oldest queued run, claimed atomically.

        A replica retried within the same execution gets the same run back, so it resumes instead of
        starting another. Returns None when nothing is queued.
        """
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        for claim in sorted(self.claims_dir.iterdir()):
            if claim.is_file() and claim.read_text(encoding="utf-8").strip() == claimant:
                return claim.name
        if not self.queue_dir.is_dir():
            return None
        entries = [e for e in self.queue_dir.iterdir() if e.is_file() and NAME_RE.match(e.name)]
        for entry in sorted(entries, key=lambda e: (e.stat().st_mtime, e.name)):
            try:  # O_EXCL: exactly one execution wins each run, on a local disk and on SMB alike
                fd = os.open(self.claims_dir / entry.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{claimant}\n")
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            return entry.name
        return None

    # -- adapters -------------------------------------------------------------------------------
    def publish_adapter(
        self,
        name: str,
        src_dir: str | os.PathLike[str],
        manifest: dict[str, Any],
        *,
        promote: bool = True,
        reason: str = "published",
    ) -> Adapter:
        """Publish the files in ``src_dir`` as the next version of adapter ``name``; LATEST moves only if ``promote``.

        Steps, each safe to be killed at: copy into a temporary sibling; write the manifest (with every
        file's sha256) last inside it; rename it to ``v<N>``; then (when promoted) append to promotions.json
        and point LATEST at it. Idempotent per run: when ``manifest["run_id"]`` is already published under
        ``name`` (a re-run after a crash at any step), that version is returned, and its promotion finished
        if it was cut short, instead of publishing a second copy. Leftovers of killed publishes are removed.
        """
        check_name(name)
        src_dir = Path(src_dir)
        adapter_root = self.adapters_dir / name
        adapter_root.mkdir(parents=True, exist_ok=True)
        self.clean_leftovers(name)
        run_id = manifest.get("run_id")
        if run_id and (existing := self.version_of_run(name, str(run_id))) is not None:
            if promote:
                self._move_latest(name, existing.version, "promote", reason, only_forward=True)
            return existing
        staging = adapter_root / f"{_TMP_PREFIX}{_owner_tag()}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src_dir, staging, ignore=shutil.ignore_patterns(MANIFEST, f"{_TMP_PREFIX}*"))
        files = {
            str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        if "adapter_config.json" not in files:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"{src_dir} has no adapter_config.json: not a PEFT adapter directory")
        while True:
            version = f"v{self._next_version_number(name)}"
            full_manifest = {
                **manifest,
                "name": name,
                "version": version,
                "files": files,
                "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_json_atomic(staging / MANIFEST, full_manifest)
            fault_point("publish:staged")
            try:
                os.rename(staging, adapter_root / version)
                break
            except OSError:  # another writer took this version number first: take the next one
                if not (adapter_root / version).exists():
                    raise
        fault_point("publish:renamed")
        if promote:
            self._move_latest(name, version, "promote", reason, only_forward=True)
        fault_point("publish:promoted")
        return Adapter(name, version, adapter_root / version, full_manifest)

    def _next_version_number(self, name: str) -> int:
        nums = [int(v[1:]) for v in self.adapter_versions(name, include_unverified=True)]
        return max(nums, default=0) + 1

    # -- adapter lifecycle: promotion, rollback, deletion, leftovers (write path) ------------------
    def version_of_run(self, name: str, run_id: str) -> Adapter | None:
        """The published version of ``name`` whose manifest records ``run_id``, if any (files not verified)."""
        for version in reversed(self.adapter_versions(name)):
            try:
                found = self.adapter(f"{name}@{version}", verify=False)
            except StoreError:
                continue
            if isinstance(found.manifest, dict) and found.manifest.get("run_id") == run_id:
                return found
        return None

    def ensure_promoted(self, name: str, version: str, reason: str) -> bool:
        """Finish an automatic promotion that a crash cut short (idempotent; never moves LATEST backwards)."""
        return self._move_latest(name, version, "promote", reason, only_forward=True)

    def promotions(self, name: str) -> list[dict[str, Any]]:
        """promotions.json of ``name`` (oldest first); [] before the first promotion."""
        path = self.adapters_dir / check_name(name) / PROMOTIONS
        if not path.is_file():
            return []
        history = read_json(path)
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise StoreError(f"{path}: must be a JSON list of promotion entries; restore it or delete it")
        return history

    def promote(self, name: str, version: str, reason: str = "promoted by hand") -> str:
        """Point LATEST at ``name@version`` (verified first), recording it in promotions.json; returns the version."""
        self.adapter(f"{name}@{version}")  # refuses a missing, unpublished or corrupt version
        self._move_latest(name, version, "promote", reason, only_forward=False)
        return version

    def rollback(self, name: str, reason: str | None = None) -> str:
        """Move LATEST back to the version promoted before the current one (see :func:`rollback_target`)."""
        with self._adapter_lock(name):
            current = self.latest_version(name)
            available = set()
            for version in self.adapter_versions(name):
                with contextlib.suppress(StoreError):
                    self.adapter(f"{name}@{version}")
                    available.add(version)
            target = rollback_target(self.promotions(name), current, available)
            if target is None:
                raise StoreError(
                    f"adapter {name!r}: nothing to roll back to (LATEST is {current or 'unset'} and no earlier "
                    "promoted version is still in the store); promote a version with `lorastack adapters promote`"
                )
            self._write_history_and_latest(
                name, target, "rollback", reason or f"rolled back from {current}", append=True
            )
        return target

    def delete_version(self, name: str, version: str, *, force: bool = False) -> str | None:
        """Delete ``name@version``. Refuses the version LATEST names unless ``force``; then LATEST rolls back
        to the previously promoted version (or is removed when there is none). Returns LATEST afterwards."""
        check_name(name)
        if not VERSION_RE.fullmatch(version or ""):
            raise StoreError(f"invalid adapter version {version!r}: versions look like 'v3'")
        path = self.adapters_dir / name / version
        if not path.is_dir():
            raise StoreError(f"adapter {name}@{version} is not in the store at {self.adapters_dir}")
        with self._adapter_lock(name):
            latest = self.latest_version(name)
            if latest == version:
                if not force:
                    raise StoreError(
                        f"{name}@{version} is the version LATEST names (it is being served); promote or roll back "
                        "to another version first, or pass --force to delete it anyway"
                    )
                others = set(self.adapter_versions(name)) - {version}
                target = rollback_target(self.promotions(name), version, others)
                if target is not None:
                    self._write_history_and_latest(
                        name, target, "rollback", f"{version} deleted", append=True
                    )
                else:
                    (self.adapters_dir / name / LATEST).unlink(missing_ok=True)
            # Rename first: readers never see a half-deleted directory that still has its manifest.
            doomed = path.with_name(f"{_TMP_PREFIX}deleted-{version}-{uuid.uuid4().hex[:8]}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return self.latest_version(name)

    def _move_latest(self, name: str, version: str, action: str, reason: str, *, only_forward: bool) -> bool:
        """Record the move in promotions.json, then point LATEST at ``version`` (under the adapter's lock).

        ``only_forward`` (automatic promotion after training): never move LATEST to an older version than it
        names now, e.g. when two runs publish concurrently and the later version was promoted first.
        Idempotent: finishing a move cut short (history written, LATEST not) does not add a second entry.
        """
        with self._adapter_lock(name):
            current = self.latest_version(name)
            if current == version and self._last_entry_is(name, version, action):
                return True
            if only_forward and current is not None and int(current[1:]) > int(version[1:]):
                return False
            self._write_history_and_latest(
                name, version, action, reason, append=not self._last_entry_is(name, version, action)
            )
            return True

    def _last_entry_is(self, name: str, version: str, action: str) -> bool:
        history = self.promotions(name)
        return bool(history) and history[-1].get("version") == version and history[-1].get("action") == action

    def _write_history_and_latest(self, name: str, version: str, action: str, reason: str, *, append: bool) -> None:
        root = self.adapters_dir / name
        if append:
            write_json_atomic(root / PROMOTIONS, [*self.promotions(name), promotion_entry(version, action, reason)])
        fault_point("latest:history")
        write_bytes_atomic(root / LATEST, f"{version}\n".encode())

    def _adapter_lock(self, name: str) -> StoreLock:
        """Serialises moves of one adapter's LATEST and promotions.json (held for milliseconds)."""
        return StoreLock(self.adapters_dir / check_name(name) / ".lock", f"adapter {name}", stale_s=30, wait_s=30)

    def clean_leftovers(self, name: str) -> list[Path]:
        """Remove what killed writers left in ``adapters/<name>/``: staging directories and ``.tmp-*`` files
        (LATEST, promotions.json) whose writer is dead, or that are older than an hour. Returns what went."""
        return _clean_tmp(self.adapters_dir / check_name(name))

    # -- runs: one trainer per run, pruning, removal (write path) ---------------------------------
    def run_lock(self, run_id: str) -> StoreLock:
        """The lock that keeps a second trainer off a run (``runs/<id>/lock``: pid, host, heartbeat)."""
        return StoreLock(self.run_dir(run_id) / "lock", f"run {run_id}", heartbeat=True)

    def run_lock_holder(self, run_id: str) -> dict[str, Any] | None:
        """Who holds the run's lock (pid, host, heartbeat_at, alive), or None when nobody does."""
        return self.run_lock(run_id).holder()

    def prune_checkpoints(self, run_id: str, keep: int = 0) -> list[Path]:
        """Delete all but the newest ``keep`` complete checkpoints of a run (and every incomplete one)."""
        removed = []
        complete = self.complete_checkpoints(run_id)
        keep_paths = {p for _, p in complete[len(complete) - keep :]} if keep > 0 else set()
        root = self.checkpoints_dir(run_id)
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if child.is_dir() and child not in keep_paths:
                    (child / COMPLETE).unlink(missing_ok=True)  # unmark first: never a marked half directory
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        return removed

    def run_ids(self) -> list[str]:
        """Every run directory's id, sorted."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(d.name for d in self.runs_dir.iterdir() if d.is_dir() and NAME_RE.fullmatch(d.name))

    def remove_run(self, run_id: str, *, force: bool = False) -> None:
        """Delete ``runs/<id>/`` (spec, status, results, checkpoints). Refuses while a live trainer holds it."""
        path = self.run_dir(run_id)
        if not path.is_dir():
            raise StoreError(f"run {run_id!r} is not in the store at {self.runs_dir}")
        holder = self.run_lock_holder(run_id)
        if holder and holder.get("alive") and not force:
            raise StoreError(
                f"run {run_id} is being trained by pid {holder.get('pid')} on {holder.get('host')} "
                "(its lock is fresh); stop it first, or pass --force"
            )
        doomed = self.runs_dir / f"{_TMP_PREFIX}deleted-{run_id[:40]}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def adapter_names(self) -> list[str]:
        """Names of adapters that have a LATEST pointer (i.e. at least one finished publish)."""
        if not self.adapters_dir.is_dir():
            return []
        return sorted(
            d.name
            for d in self.adapters_dir.iterdir()
            if NAME_RE.fullmatch(d.name) and d.is_dir() and (d / LATEST).is_file()
        )

    def adapter_versions(self, name: str, include_unverified: bool = False) -> list[str]:
        """Versions of an adapter, oldest first (those with a manifest unless include_unverified)."""
        root = self.adapters_dir / check_name(name)
        if not root.is_dir():
            return []
        versions = [
            d.name
            for d in root.iterdir()
            if VERSION_RE.fullmatch(d.name) and d.is_dir() and (include_unverified or (d / MANIFEST).is_file())
        ]
        return sorted(versions, key=lambda v: int(v[1:]))

    def latest_version(self, name: str) -> str | None:
        """The version LATEST points at, or None if the adapter was never fully published."""
        pointer = self.adapters_dir / check_name(name) / LATEST
        if not pointer.is_file():
            return None
        try:
            raw = pointer.read_bytes()
        except OSError as exc:
            raise StoreError(f"{pointer}: cannot be read ({exc.strerror or exc})") from exc
        try:
            version = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise StoreError(f"{pointer}: not UTF-8 text; it should hold a version like 'v3'") from None
        if not VERSION_RE.fullmatch(version):
            raise StoreError(f"{pointer}: names {version[:40]!r}, which is not a version like 'v3'")
        return version

    def adapter(self, ref: str, verify: bool = True) -> Adapter:
        """Resolve ``name`` (its LATEST version) or ``name@version`` to a verified adapter.

        Raises StoreError if the adapter does not exist, has no manifest, or a file's sha256 differs
        from the manifest (a corrupted or half-copied adapter is never handed out).
        """
        name, version = parse_adapter_ref(ref)
        if version is None:
            version = self.latest_version(name)
            if version is None:
                raise StoreError(f"adapter {name!r} is not in the store at {self.adapters_dir}")
        path = self.adapters_dir / name / version
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"adapter {name}@{version} has no {MANIFEST}: not published (or being published)")
        manifest = check_manifest(manifest_path, read_json(manifest_path))
        if verify:
            verify_files(path, manifest.get("files") or {})
        return Adapter(name, version, path, manifest)

    def adapters(self) -> Iterator[Adapter]:
        """The LATEST version of every adapter whose manifest can be read (hashes not checked here)."""
        for name in self.adapter_names():
            with contextlib.suppress(StoreError):
                yield self.adapter(name, verify=False)

    # -- read path for servers: every adapter and version, each readable or with the reason it is not ------
    def adapter_catalog(self) -> list[AdapterEntry]:
        """Every adapter directory (with or without LATEST), its LATEST pointer and every version that has a
        manifest, each read (not hash-verified) or with the reason it cannot be. Never raises over the
        store's contents: a malformed pointer or manifest is reported in the entry, not thrown."""
        if not self.adapters_dir.is_dir():
            return []
        entries = []
        try:
            children = sorted(self.adapters_dir.iterdir())
        except OSError:
            return []
        for d in children:
            if not NAME_RE.fullmatch(d.name) or not d.is_dir():
                continue
            entry = AdapterEntry(d.name)
            try:
                entry.latest = self.latest_version(d.name)
            except StoreError as exc:
                entry.latest_error = str(exc)
            try:
                versions = self.adapter_versions(d.name)
            except OSError:
                versions = []
            for version in versions:
                try:
                    entry.versions[version] = self.adapter(f"{d.name}@{version}", verify=False)
                except (StoreError, OSError) as exc:
                    entry.errors[version] = str(exc)
            entries.append(entry)
        return entries


@dataclass
class AdapterEntry:
    """One adapter directory as a server sees it (see ``Store.adapter_catalog``)."""

    name: str
    latest: str | None = None  # the version LATEST names (None: never promoted, or unreadable)
    latest_error: str | None = None  # why LATEST cannot be read
    versions: dict[str, Adapter] = field(default_factory=dict)  # readable manifests, oldest first
    errors: dict[str, str] = field(default_factory=dict)  # version -> why it cannot be read


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Check that every file listed in a manifest exists under ``root`` with the listed sha256."""
    if not isinstance(files, dict) or not files:
        raise StoreError(f"{root / MANIFEST} lists no files")
    resolved_root = root.resolve()
    for rel, expected in files.items():
        if not isinstance(rel, str) or not isinstance(expected, str):
            raise StoreError(f"{root / MANIFEST}: 'files' must map paths to sha256 strings")
        path = root / rel
        try:
            inside = path.resolve().is_relative_to(resolved_root)
            present = inside and path.is_file()
        except (OSError, ValueError):
            inside = present = False
        if not inside:
            raise StoreError(f"{root / MANIFEST}: 'files' entry {rel!r} points outside the adapter directory")
        if not present:
            raise StoreError(f"{path} is listed in the manifest but missing")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise StoreError(f"{path} cannot be read ({exc.strerror or exc})") from exc
        if digest != expected:
            raise StoreError(f"{path} does not match the sha256 in its manifest: the adapter is corrupt")


def open_store(root: str | os.PathLike[str] | None = None) -> Store:
    """The store at ``root``, else $LORASTACK_STORE, else ./.lorastack/store."""
    return Store(root or os.environ.get("LORASTACK_STORE") or DEFAULT_LOCAL_STORE)
