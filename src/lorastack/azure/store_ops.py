"""Adapters and runs on the share: list, show, promote, roll back, delete, pull; the same keys and pure functions
as the local store (:mod:`lorastack.store`), applied over Azure Files REST.

Promotion order is the store contract: ``promotions.json`` is rewritten atomically *before* ``LATEST`` moves, so
LATEST never names a version the history does not explain. A pull copies a version into a local store with its
manifest written last and every file checked against the manifest's sha256, so a half pull is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.azure.credentials import CloudError
from lorastack.azure.share import TMP_PREFIX, ShareStore
from lorastack.store import (
    EVAL_FILE,
    LATEST,
    MANIFEST,
    PROMOTIONS,
    STATUS_FILE,
    VERSION_RE,
    StoreError,
    adapter_key,
    check_name,
    claim_key,
    parse_adapter_ref,
    promotion_entry,
    queue_key,
    rollback_target,
    run_key,
    write_bytes_atomic,
)

RESULTS_FILE = "results.csv"
RUN_DONE = ("succeeded", "failed", "stopped")
Progress = Callable[[int, int], None]


def _ref(ref: str) -> tuple[str, str | None]:
    try:
        return parse_adapter_ref(ref)
    except StoreError as exc:
        raise CloudError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------------------------
def latest(share: ShareStore, name: str) -> str | None:
    data = share.read_bytes(adapter_key(name, LATEST))
    if data is None:
        return None
    version = data.decode("utf-8", "replace").strip()
    if not VERSION_RE.match(version):
        raise CloudError(f"{adapter_key(name, LATEST)} on share {share.outputs.share_name} names {version!r}, "
                         "not a version like 'v3'")
    return version


def versions(share: ShareStore, name: str) -> list[str]:
    """Published versions (a directory with a manifest), oldest first."""
    found = [v for v, is_dir in share.list_dir(adapter_key(name)) if is_dir and VERSION_RE.match(v)]
    published = [v for v in found if share.size(adapter_key(name, v, MANIFEST)) is not None]
    return sorted(published, key=lambda v: int(v[1:]))


def history(share: ShareStore, name: str) -> list[dict[str, Any]]:
    doc = share.read_json(adapter_key(name, PROMOTIONS))
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise CloudError(f"{adapter_key(name, PROMOTIONS)} on share {share.outputs.share_name}: not a JSON list")
    return doc


def list_adapters(share: ShareStore) -> list[dict[str, Any]]:
    """[{name, latest, versions}] for every adapter directory on the share."""
    rows = []
    for name, is_dir in share.list_dir("adapters"):
        if not is_dir or name.startswith("."):
            continue
        rows.append({"name": name, "latest": latest(share, name), "versions": versions(share, name)})
    return sorted(rows, key=lambda r: r["name"])


def manifest(share: ShareStore, name: str, version: str) -> dict[str, Any]:
    doc = share.read_json(adapter_key(name, version, MANIFEST))
    if doc is None:
        raise CloudError(f"adapter {name}@{version} is not published on share {share.outputs.share_name} "
                         f"(versions: {', '.join(versions(share, name)) or 'none'})")
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise CloudError(f"{adapter_key(name, version, MANIFEST)}: not a manifest (no files map)")
    return doc


def resolve(share: ShareStore, ref: str) -> tuple[str, str]:
    """``name`` (its LATEST) or ``name@vN`` -> (name, version)."""
    name, version = _ref(ref)
    version = version or latest(share, name)
    if version is None:
        raise CloudError(f"adapter {name!r} has no promoted version on share {share.outputs.share_name}")
    return name, version


def show_adapter(share: ShareStore, ref: str) -> dict[str, Any]:
    name, version = resolve(share, ref)
    m = manifest(share, name, version)
    return {
        "adapter": f"{name}@{version}",
        "latest": latest(share, name),
        "manifest": {k: v for k, v in m.items() if k != "files"},
        "files": sorted(m["files"]),
        "promotions": history(share, name),
        "eval": share.read_json(adapter_key(name, version, EVAL_FILE)),
    }


def _move_latest(share: ShareStore, name: str, version: str, action: str, reason: str) -> dict[str, str]:
    entry = promotion_entry(version, action, reason)
    share.put_json(adapter_key(name, PROMOTIONS), [*history(share, name), entry])  # history first, then LATEST
    share.put_atomic(adapter_key(name, LATEST), f"{version}\n".encode())
    return entry


def promote(share: ShareStore, ref: str, reason: str) -> dict[str, str]:
    name, version = _ref(ref)
    if version is None:
        raise CloudError(f"promote {ref!r}: name the version to promote, e.g. {name}@v3")
    manifest(share, name, version)
    if latest(share, name) == version:
        raise CloudError(f"{name}@{version} is already the promoted version")
    return _move_latest(share, name, version, "promote", reason or "promoted with lorastack adapters promote")


def rollback(share: ShareStore, name: str, reason: str) -> dict[str, str]:
    check_name(name)
    current = latest(share, name)
    target = rollback_target(history(share, name), current, set(versions(share, name)))
    if target is None:
        raise CloudError(f"adapter {name}: nothing to roll back to from {current or 'no version'} "
                         "(the promotion history names no earlier version that is still published)")
    return _move_latest(share, name, target, "rollback", reason or f"rolled back from {current}")


def delete_version(share: ShareStore, ref: str) -> int:
    name, version = _ref(ref)
    if version is None:
        raise CloudError(f"delete {ref!r}: name the version, e.g. {name}@v2 (deleting every version is not offered)")
    if latest(share, name) == version:
        raise CloudError(f"{name}@{version} is the promoted version (LATEST): promote or roll back to another "
                         "version first")
    if share.size(adapter_key(name, version, MANIFEST)) is None and not share.list_dir(adapter_key(name, version)):
        raise CloudError(f"adapter {name}@{version} is not on share {share.outputs.share_name}")
    # The manifest goes first: a reader never trusts the version again, even if the rest is deleted only partly.
    share.delete(adapter_key(name, version, MANIFEST))
    return share.delete_tree(adapter_key(name, version))


@dataclass
class Pulled:
    adapter: str
    path: Path
    files: int
    bytes: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull_adapter(share: ShareStore, ref: str, store_root: Path, progress: Progress | None = None) -> Pulled:
    """Copy ``ref`` into the local store at ``store_root`` (``adapters/<name>/<vN>/``), verified, manifest last.

    The local LATEST is set to it when the local store has no LATEST for that adapter yet.
    """
    name, version = resolve(share, ref)
    m = manifest(share, name, version)
    files: dict[str, str] = m["files"]
    sizes = {rel: share.size(adapter_key(name, version, rel)) for rel in files}
    absent = sorted(rel for rel, size in sizes.items() if size is None)
    if absent:
        raise CloudError(f"adapter {name}@{version} on the share lacks {', '.join(absent)} (listed in its manifest)")
    total = sum(int(s or 0) for s in sizes.values())
    target = store_root / adapter_key(name, version)
    if (target / MANIFEST).is_file():
        raise CloudError(f"{target} already exists locally; delete it to pull again")
    if target.exists():  # a version directory without its manifest: never trusted, replaced by this pull
        shutil.rmtree(target)
    staging = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    done = 0
    try:
        for rel in sorted(files):
            base = done

            def hook(current: int, _total: int | None, base: int = base) -> None:
                if progress is not None:
                    progress(base + current, total)

            dest = staging / rel
            share.download(adapter_key(name, version, rel), dest, progress=hook)
            if _sha256(dest) != files[rel]:
                raise CloudError(f"{adapter_key(name, version, rel)} does not match the sha256 in its manifest: "
                                 "the copy on the share is corrupt; nothing was kept")
            done += int(sizes[rel] or 0)
            if progress is not None:
                progress(done, total)
        eval_doc = share.read_bytes(adapter_key(name, version, EVAL_FILE))
        if eval_doc is not None:
            write_bytes_atomic(staging / EVAL_FILE, eval_doc)
        write_bytes_atomic(staging / MANIFEST, (json.dumps(m, indent=2, sort_keys=True) + "\n").encode())
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (target.parent / LATEST).is_file():
        write_bytes_atomic(target.parent / LATEST, f"{version}\n".encode())
    return Pulled(f"{name}@{version}", target, len(files), total)


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def list_runs(share: ShareStore) -> list[dict[str, Any]]:
    runs = {name for name, is_dir in share.list_dir("runs") if is_dir and not name.startswith(".")}
    queued = {name for name, is_dir in share.list_dir("queue") if not is_dir and not name.startswith(".")}
    rows = []
    for run_id in sorted(runs | queued):
        status = share.read_json(run_key(run_id, STATUS_FILE)) or {}
        rows.append({
            "run_id": run_id,
            "phase": status.get("phase") or ("queued" if run_id in queued else "unknown"),
            "updated_at": status.get("updated_at"),
            "adapter": status.get("adapter"),
        })
    return rows


def results_tail(share: ShareStore, run_id: str, n: int = 5) -> list[str]:
    data = share.read_bytes(run_key(run_id, RESULTS_FILE))
    if not data:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[:1] + lines[1:][-n:]


def remove_run(share: ShareStore, run_id: str, running: Callable[[str], bool]) -> int:
    """Delete a run's directory, queue entry and claim; refuses a queued run or one an execution is training.
    Datasets stay: they are content-addressed and may serve other runs."""
    check_name(run_id, "run id")
    if share.size(queue_key(run_id)) is not None:
        raise CloudError(f"run {run_id} is queued: the next job execution would train it. It is not removed.")
    claim = share.read_bytes(claim_key(run_id))
    if claim and running(claim.decode("utf-8", "replace").strip()):
        raise CloudError(f"run {run_id} is being trained by execution {claim.decode().strip()}: stop it first "
                         f"(az containerapp job stop ...) or wait for it to end")
    if share.size(run_key(run_id, STATUS_FILE)) is None and not share.list_dir(f"runs/{run_id}"):
        raise CloudError(f"no run {run_id!r} on share {share.outputs.share_name}")
    n = share.delete_tree(f"runs/{run_id}")
    share.delete(claim_key(run_id))
    return n


def pull_run(share: ShareStore, run_id: str, store_root: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Bring a finished run's status.json, spec.yaml, results.csv and its adapter (with eval.json) to a local store."""
    check_name(run_id, "run id")
    status = share.read_json(run_key(run_id, STATUS_FILE))
    if status is None:
        raise CloudError(f"no run {run_id!r} on share {share.outputs.share_name} (see `lorastack runs list`)")
    phase = status.get("phase")
    if phase not in RUN_DONE:
        raise CloudError(f"run {run_id} is {phase or 'not started'}: pull it once it has ended "
                         f"(follow it with `lorastack logs {run_id} --follow`)")
    got: dict[str, Any] = {"run_id": run_id, "phase": phase, "files": [], "adapter": None}
    for name in (STATUS_FILE, "spec.yaml", RESULTS_FILE):
        data = share.read_bytes(run_key(run_id, name))
        if data is not None:
            write_bytes_atomic(store_root / run_key(run_id, name), data)
            got["files"].append(run_key(run_id, name))
    if status.get("adapter"):
        name, version = _ref(str(status["adapter"]))
        local = store_root / adapter_key(name, version or "")
        if version and (local / MANIFEST).is_file():
            got["adapter"] = f"{name}@{version} (already local)"
        else:
            got["adapter"] = pull_adapter(share, str(status["adapter"]), store_root, progress).adapter
    return got
