"""``lorastack adapters``, ``lorastack runs``, ``lorastack eval`` and ``lorastack status --store``: the local store.

Each command works on a local store directory (``--store DIR``, else $LORASTACK_STORE, else ./.lorastack/store).
``adapters`` and ``runs`` with ``--outputs FILE`` (or $LORASTACK_OUTPUTS) and ``status`` without ``--store``
work on the cloud store instead, through lorastack.commands.cloud (same keys, same pure functions from
lorastack.store).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from lorastack.store import (
    EVAL_FILE,
    MANIFEST,
    NAME_RE,
    Store,
    StoreError,
    open_store,
    parse_adapter_ref,
    verify_files,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _cloud(args: argparse.Namespace, func: str) -> int | None:
    """Hand the command to the cloud implementation when a stack outputs file is named (and --store is not)."""
    if getattr(args, "store", None) or not (getattr(args, "outputs", None) or os.environ.get("LORASTACK_OUTPUTS")):
        return None
    try:
        from lorastack.commands import cloud

        handler = getattr(cloud, func)
    except (ImportError, AttributeError):
        _err(f"lorastack {args.command}: the cloud store is not available in this installation "
             "(`pip install 'lorastack[cloud]'`); use --store DIR for a local store")
        return EXIT_USAGE
    return int(handler(args) or 0)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------------------
def adapter_dirs(store: Store) -> list[str]:
    """Every adapter name with at least one published version (promoted or not)."""
    if not store.adapters_dir.is_dir():
        return []
    return sorted(
        d.name for d in store.adapters_dir.iterdir()
        if d.is_dir() and NAME_RE.fullmatch(d.name) and store.adapter_versions(d.name)
    )


def version_rows(store: Store, name: str) -> list[dict[str, Any]]:
    """One summary per published version of ``name`` (oldest first); unreadable ones say why."""
    try:
        latest = store.latest_version(name)
    except StoreError as exc:
        latest, problem = None, str(exc)
    else:
        problem = None
    rows = []
    for version in store.adapter_versions(name):
        row: dict[str, Any] = {"ref": f"{name}@{version}", "version": version, "latest": version == latest}
        try:
            m = store.adapter(row["ref"], verify=False).manifest
            if not isinstance(m, dict):
                raise StoreError("manifest is not a JSON object")
        except StoreError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        metrics, promotion = m.get("metrics") or {}, m.get("promotion") or {}
        row.update(
            published_at=m.get("published_at"),
            run_id=m.get("run_id"),
            base_model=m.get("base_model"),
            eval_loss=metrics.get("eval_loss", metrics.get("full_valid_loss")),
            steps=metrics.get("steps", metrics.get("global_step")),
            verdict=promotion.get("verdict"),
            baseline=promotion.get("baseline"),
            baseline_loss=promotion.get("baseline_loss"),
        )
        rows.append(row)
    if problem:
        rows.append({"ref": f"{name}/LATEST", "error": problem})
    return rows


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def adapters_command(args: argparse.Namespace) -> int:
    """``lorastack adapters list|show|promote|rollback|delete|pull``."""
    if (code := _cloud(args, "adapters_command")) is not None:
        return code
    store = open_store(args.store)
    action = args.adapters_command
    try:
        if action == "list":
            return _adapters_list(store, args)
        if action == "show":
            return _adapters_show(store, args)
        if action == "promote":
            name, version = _pinned(args.ref, "promote")
            store.promote(name, version, args.reason or "promoted by hand (lorastack adapters promote)")
            print(f"{name}@{version} is now LATEST")
            return EXIT_OK
        if action == "rollback":
            name, version = parse_adapter_ref(args.name)
            if version:
                raise StoreError(f"rollback takes an adapter name, not a version ({args.name!r}); "
                                 f"to serve a chosen version use `lorastack adapters promote {args.name}`")
            before = store.latest_version(name)
            target = store.rollback(name, args.reason)
            print(f"{name}: LATEST rolled back from {before} to {target}")
            return EXIT_OK
        if action == "delete":
            name, version = _pinned(args.ref, "delete")
            latest = store.delete_version(name, version, force=args.force)
            print(f"deleted {name}@{version}; LATEST is {latest or 'unset (nothing is served for ' + name + ')'}")
            return EXIT_OK
        if action == "pull":
            return _adapters_pull(store, args)
    except StoreError as exc:
        _err(f"lorastack adapters {action}: {exc}")
        return EXIT_FAILED
    raise AssertionError(action)


def _pinned(ref: str, what: str) -> tuple[str, str]:
    name, version = parse_adapter_ref(ref)
    if version is None:
        raise StoreError(f"{what} needs a version: {name}@vN (see `lorastack adapters list`)")
    return name, version


def _adapters_list(store: Store, args: argparse.Namespace) -> int:
    names = [args.name] if getattr(args, "name", None) else adapter_dirs(store)
    listing = {name: version_rows(store, name) for name in names}
    if args.json:
        _print_json(listing)
        return EXIT_OK
    if not listing:
        print(f"no adapters in {store.adapters_dir}")
        return EXIT_OK
    for name, rows in listing.items():
        latest = next((r["version"] for r in rows if r.get("latest")), None)
        print(f"{name}  (LATEST: {latest or 'none: not served'})")
        print(f"  {'':1} {'VERSION':<8} {'PUBLISHED':<21} {'STEPS':>6} {'EVAL LOSS':>10} {'VERDICT':<9} {'VS':<16} RUN")
        for r in rows:
            if "error" in r:
                print(f"  ! {r['ref']}: {r['error']}")
                continue
            vs = f"{r['baseline']} {_fmt(r['baseline_loss'])}" if r.get("baseline") else "-"
            print(f"  {'*' if r['latest'] else ' '} {r['version']:<8} {r.get('published_at') or '-':<21} "
                  f"{_fmt(r.get('steps')):>6} {_fmt(r.get('eval_loss')):>10} {r.get('verdict') or '-':<9} "
                  f"{vs:<16} {r.get('run_id') or '-'}")
    return EXIT_OK


def _adapters_show(store: Store, args: argparse.Namespace) -> int:
    name, version = parse_adapter_ref(args.ref)
    ref = f"{name}@{version}" if version else name
    adapter = store.adapter(ref, verify=False)
    m = adapter.manifest
    try:
        verify_files(adapter.path, m.get("files") or {})
        verified = "ok"
    except StoreError as exc:
        verified = str(exc)
    eval_path = adapter.path / EVAL_FILE
    evaluation = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None
    latest = store.latest_version(name)
    doc = {
        "ref": adapter.ref,
        "latest": adapter.version == latest,
        "path": str(adapter.path),
        "verified": verified,
        "manifest": {k: v for k, v in m.items() if k not in ("chat_template", "files")},
        "files": len(m.get("files") or {}),
        "eval": evaluation,
        "promotions": store.promotions(name),
    }
    if args.json:
        _print_json(doc)
        return EXIT_OK
    metrics, promotion = m.get("metrics") or {}, m.get("promotion") or {}
    print(f"{adapter.ref}{'  (LATEST)' if doc['latest'] else ''}")
    print(f"  path        {adapter.path}")
    print(f"  files       {doc['files']} ({'sha256 verified' if verified == 'ok' else 'CORRUPT: ' + verified})")
    print(f"  base        {m.get('base_model')} @ {m.get('base_revision') or '(local)'}")
    print(f"  run         {m.get('run_id')}   published {m.get('published_at')}")
    for role, sha in (m.get("dataset_sha256") or {}).items():
        print(f"  data        {role}: {sha}")
    if m.get("system_prompt"):
        print(f"  system      {m['system_prompt']}")
    print("  metrics     " + ", ".join(
        f"{k} {_fmt(metrics.get(k))}" for k in ("steps", "trained_tokens", "train_runtime_s", "first_loss",
                                                 "last_loss", "eval_loss") if k in metrics))
    if promotion:
        vs = (f" vs {_fmt(promotion.get('baseline_loss'))} for {promotion.get('baseline')}"
              if promotion.get("baseline") else "")
        print(f"  promotion   policy {promotion.get('policy')}: {promotion.get('verdict')} "
              f"(eval loss {_fmt(promotion.get('candidate_loss'))}{vs})")
    if evaluation:
        cells = ", ".join(f"{lbl} loss {_fmt(v.get('loss'))}" for lbl, v in evaluation.get("metrics", {}).items())
        print(f"  eval        {cells} ({EVAL_FILE}, {evaluation.get('created_at')})")
    for entry in doc["promotions"][-5:]:
        print(f"  history     {entry.get('at')} {entry.get('action')} {entry.get('version')}: {entry.get('reason')}")
    return EXIT_OK


def _copy_with_progress(pairs: list[tuple[Path, Path]], label: str) -> None:
    """Copy (src, dest) files with one progress bar over the bytes."""
    from tqdm.auto import tqdm

    total = sum(src.stat().st_size for src, _ in pairs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr,
              disable=None) as bar:  # None: no bar when stderr is not a terminal
        for src, dest in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
                    bar.update(len(chunk))


def _adapters_pull(store: Store, args: argparse.Namespace) -> int:
    """Copy a verified version into a plain directory (``--to``) or publish it into another store (``--to-store``)."""
    adapter = store.adapter(args.ref)  # verified before anything is copied
    files = dict(adapter.manifest.get("files") or {})
    names = [*files, MANIFEST] + [extra for extra in (EVAL_FILE,) if (adapter.path / extra).is_file()]
    if args.to_store:
        dest_store = open_store(args.to_store).init()
        staging = dest_store.root / f".tmp-pull-{uuid.uuid4().hex[:8]}"
        try:
            _copy_with_progress([(adapter.path / n, staging / n) for n in files], f"pull {adapter.ref}")
            manifest = {k: v for k, v in adapter.manifest.items() if k not in ("name", "version", "files",
                                                                                "published_at")}
            manifest["pulled_from"] = f"{store.root}:{adapter.ref}"
            published = dest_store.publish_adapter(
                adapter.name, staging, manifest, promote=args.promote, reason=f"pulled from {store.root}"
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if (adapter.path / EVAL_FILE).is_file() and not (published.path / EVAL_FILE).exists():
            shutil.copyfile(adapter.path / EVAL_FILE, published.path / EVAL_FILE)
        state = "LATEST" if dest_store.latest_version(adapter.name) == published.version else "not promoted"
        print(f"{adapter.ref} -> {dest_store.root} as {published.ref} ({state})")
        return EXIT_OK
    dest = Path(args.to).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        raise StoreError(f"{dest} exists and is not empty; pull into a new directory")
    staging = dest.with_name(f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}")
    try:
        _copy_with_progress([(adapter.path / n, staging / n) for n in names], f"pull {adapter.ref}")
        verify_files(staging, files)  # the copy is what the manifest promises
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{adapter.ref} -> {dest} ({len(files)} files, sha256 verified): load it with "
          f"PeftModel.from_pretrained(base, {str(dest)!r})")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------
# runs and status
# ------------------------------------------------------------------------------------------------------------
def run_row(store: Store, run_id: str) -> dict[str, Any]:
    """A summary of one run: status.json fields, checkpoints and who holds its lock."""
    try:
        status = store.read_status(run_id) or {}
    except StoreError as exc:
        status = {"phase": "unreadable", "error": str(exc)}
    holder = store.run_lock_holder(run_id)
    return {
        "run_id": run_id,
        "phase": status.get("phase", "prepared"),
        "step": status.get("step"),
        "max_steps": status.get("max_steps"),
        "loss": status.get("loss"),
        "valid_loss": status.get("valid_loss"),
        "attempts": status.get("attempts"),
        "adapter": status.get("adapter"),
        "updated_at": status.get("updated_at"),
        "message": status.get("message") or status.get("error"),
        "checkpoints": [s for s, _ in store.complete_checkpoints(run_id)],
        "trainer": ({"pid": holder.get("pid"), "host": holder.get("host"), "alive": holder.get("alive"),
                     "heartbeat_age_s": holder.get("heartbeat_age_s")} if holder else None),
    }


def _runs_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'RUN':<32} {'PHASE':<10} {'STEP':>9} {'LOSS':>8} {'VALID':>8} {'TRIES':>5} {'ADAPTER':<20} UPDATED")
    for r in rows:
        step = f"{r['step'] if r['step'] is not None else '-'}/{r['max_steps'] or '-'}"
        live = " (training now)" if (r["trainer"] or {}).get("alive") else ""
        print(f"{r['run_id']:<32} {r['phase']:<10} {step:>9} {_fmt(r['loss']):>8} {_fmt(r['valid_loss']):>8} "
              f"{r['attempts'] or '-':>5} {r['adapter'] or '-':<20} {r['updated_at'] or '-'}{live}")


def _run_show(store: Store, run_id: str, as_json: bool) -> int:
    if not store.run_dir(run_id).is_dir():
        raise StoreError(f"run {run_id!r} is not in the store at {store.runs_dir} (see `lorastack runs list`)")
    row = run_row(store, run_id)
    status = store.read_status(run_id) or {}
    results = store.run_dir(run_id) / "results.csv"
    steps = max(0, len(results.read_text(encoding="utf-8").splitlines()) - 1) if results.is_file() else 0
    if as_json:
        _print_json({**row, "status": status, "results_rows": steps})
        return EXIT_OK
    print(f"run {run_id}: {row['phase']}" + (f" - {row['message']}" if row["message"] else ""))
    for key in ("step", "max_steps", "loss", "valid_loss", "tokens_per_s", "trained_tokens", "attempts",
                "started_at", "finished_at", "adapter", "resumed_from", "checkpoint"):
        if status.get(key) is not None:
            print(f"  {key:<15} {_fmt(status[key])}")
    if status.get("promotion"):
        p = status["promotion"]
        print(f"  {'promotion':<15} {p.get('policy')}: {p.get('verdict')}")
    print(f"  {'checkpoints':<15} {row['checkpoints'] or 'none'}")
    print(f"  {'results.csv':<15} {steps} step rows ({results})")
    if row["trainer"]:
        t = row["trainer"]
        print(f"  {'trainer':<15} pid {t['pid']} on {t['host']}, heartbeat {t['heartbeat_age_s']}s ago"
              f"{'' if t['alive'] else ' (dead: the next trainer takes the lock over)'}")
    return EXIT_OK


def runs_command(args: argparse.Namespace) -> int:
    """``lorastack runs list|show|rm``."""
    if (code := _cloud(args, "runs_command")) is not None:
        return code
    store = open_store(args.store)
    action = args.runs_command
    try:
        if action == "list":
            rows = [run_row(store, r) for r in store.run_ids()]
            if args.json:
                _print_json(rows)
            elif not rows:
                print(f"no runs in {store.runs_dir}")
            else:
                _runs_table(rows)
            return EXIT_OK
        if action == "show":
            return _run_show(store, args.run_id, args.json)
        if action == "rm":
            store.remove_run(args.run_id, force=args.force)
            print(f"removed run {args.run_id} (its published adapters stay)")
            return EXIT_OK
    except StoreError as exc:
        _err(f"lorastack runs {action}: {exc}")
        return EXIT_FAILED
    raise AssertionError(action)


def status_command(args: argparse.Namespace) -> int:
    """``lorastack status``: a local store with ``--store``, else the cloud store (lorastack.commands.cloud)."""
    if not getattr(args, "store", None):
        from lorastack.commands.cloud import status_command as cloud_status

        return cloud_status(args)
    store = open_store(args.store)
    if not store.root.is_dir():
        _err(f"lorastack status: no store at {store.root}")
        return EXIT_FAILED
    try:
        if args.run_id:
            return _run_show(store, args.run_id, args.json)
        rows = [run_row(store, r) for r in store.run_ids()]
        adapters = {name: version_rows(store, name) for name in adapter_dirs(store)}
    except StoreError as exc:
        _err(f"lorastack status: {exc}")
        return EXIT_FAILED
    if args.json:
        _print_json({"store": str(store.root), "runs": rows, "adapters": adapters})
        return EXIT_OK
    print(f"store {store.root}")
    print()
    if rows:
        _runs_table(rows)
    else:
        print("no runs")
    print()
    for name, versions in adapters.items():
        latest = next((r["version"] for r in versions if r.get("latest")), None)
        print(f"adapter {name}: {len(versions)} version(s), LATEST {latest or 'none'}")
    if not adapters:
        print("no adapters")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------------------
def eval_command(args: argparse.Namespace) -> int:
    """``lorastack eval ADAPTER[@vN]``: base (or another version) vs the adapter on held-out data."""
    from lorastack.trainer import setup_logging

    setup_logging(bool(getattr(args, "verbose", False)))
    from lorastack.evaluate import EvalError, evaluate_adapter, format_result
    from lorastack.models import ModelLoadError

    store = open_store(args.store)
    for path in [*(args.data or []), *([args.prompts] if args.prompts else [])]:
        if not Path(path).is_file():  # local inputs first: fail before any model loads
            _err(f"lorastack eval: {path}: no such file")
            return EXIT_FAILED
    try:
        result = evaluate_adapter(
            store,
            args.adapter,
            data=[Path(p) for p in args.data or []],
            against=args.against,
            prompts=Path(args.prompts) if args.prompts else None,
            max_samples=args.samples,
            max_new_tokens=args.max_new_tokens,
        )
    except (EvalError, StoreError, ModelLoadError) as exc:
        _err(f"lorastack eval: {exc}")
        return EXIT_FAILED
    if args.json:
        _print_json(result)
    else:
        print(format_result(result))
        name, version = parse_adapter_ref(result["adapter"])
        print(f"\nsaved {store.adapters_dir / name / version / EVAL_FILE}")
    return EXIT_OK

