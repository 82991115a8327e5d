"""The store contract: atomic publishes, verified reads, content-addressed datasets, complete checkpoints."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from lorastack.store import COMPLETE, Store, StoreError, parse_adapter_ref


def _adapter_dir(tmp_path, payload: bytes = b"weights-1"):
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def test_publish_then_read_back_latest_and_pinned(store, tmp_path):
    first = store.publish_adapter("travel", _adapter_dir(tmp_path, b"one"), {"base_model": "tiny"})
    second = store.publish_adapter("travel", _adapter_dir(tmp_path, b"two"), {"base_model": "tiny"})
    assert (first.version, second.version) == ("v1", "v2")
    assert store.adapter("travel").version == "v2"
    assert store.adapter("travel@v1").path.joinpath("adapter_model.safetensors").read_bytes() == b"one"
    assert store.adapter_names() == ["travel"]
    assert [a.ref for a in store.adapters()] == ["travel@v2"]
    manifest = store.adapter("travel").manifest
    assert manifest["base_model"] == "tiny" and set(manifest["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_corrupted_adapter_is_refused(store, tmp_path):
    a = store.publish_adapter("travel", _adapter_dir(tmp_path), {"base_model": "tiny"})
    (a.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="does not match the sha256"):
        store.adapter("travel")


def test_half_published_adapter_is_invisible(store, tmp_path):
    """A writer killed after copying but before the rename leaves only a hidden staging directory."""
    staging = store.adapters_dir / "travel" / ".tmp-deadbeef"
    staging.mkdir(parents=True)
    (staging / "adapter_config.json").write_text("{}")
    assert store.adapter_names() == []
    with pytest.raises(StoreError, match="not in the store"):
        store.adapter("travel")
    # A version directory without a manifest (killed before the manifest landed) is not trusted either.
    (store.adapters_dir / "travel" / "v1").mkdir()
    with pytest.raises(StoreError, match="no manifest.json"):
        store.adapter("travel@v1")
    # The next publish skips the number already taken and works.
    assert store.publish_adapter("travel", _adapter_dir(tmp_path), {}).version == "v2"


def test_concurrent_publishers_get_distinct_versions(store, tmp_path):
    src = _adapter_dir(tmp_path)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(store.publish_adapter("x", src, {}).version)) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]


def test_publish_requires_a_peft_directory(store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="adapter_config.json"):
        store.publish_adapter("x", empty, {})
    assert store.adapter_names() == []


@pytest.mark.parametrize("ref", ["Travel", "tr avel", "", "x@3", "x@latest", "../etc"])
def test_bad_refs_say_what_is_allowed(ref):
    with pytest.raises(StoreError, match="invalid adapter"):
        parse_adapter_ref(ref)


def test_datasets_are_content_addressed(store, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"messages": []}\n')
    digest, path = store.put_dataset(f)
    assert path.name == f"{digest}.jsonl" and store.dataset_path(digest) == path
    assert store.put_dataset(f) == (digest, path)
    os.chmod(path, 0o644)
    path.write_text("changed\n")
    with pytest.raises(StoreError, match="corrupt"):
        store.dataset_path(digest)


def test_only_complete_checkpoints_are_trusted(store):
    ck = store.checkpoints_dir("run-1")
    for step in (5, 10, 15):
        (ck / f"checkpoint-{step}").mkdir(parents=True)
    Store.mark_complete(ck / "checkpoint-5")
    Store.mark_complete(ck / "checkpoint-10")
    assert store.latest_checkpoint("run-1") == ck / "checkpoint-10"
    assert (ck / "checkpoint-10" / COMPLETE).is_file()
    assert [s for s, _ in store.complete_checkpoints("run-1")] == [5, 10]
    assert store.latest_checkpoint("run-2") is None


def test_queued_runs_are_claimed_once_and_a_retry_gets_its_run_back(store):
    store.enqueue_run("a-1")
    time.sleep(0.01)
    store.enqueue_run("b-2")
    assert store.claim_run("exec-1") == "a-1"
    assert store.claim_run("exec-2") == "b-2"
    assert store.claim_run("exec-3") is None
    # ACA restarts a failed replica within the same execution: it must resume its own run.
    assert store.claim_run("exec-1") == "a-1"


def test_rollback_target_undoes_promotions_in_order_and_skips_deleted_versions():
    from lorastack.store import promotion_entry, rollback_target

    history = [promotion_entry(v, "promote", "test") for v in ("v1", "v2", "v3")]
    assert rollback_target(history, "v3", {"v1", "v2", "v3"}) == "v2"
    history.append(promotion_entry("v2", "rollback", "from v3"))
    assert rollback_target(history, "v2", {"v1", "v2", "v3"}) == "v1"  # a second rollback goes further back
    assert rollback_target(history, "v2", {"v2", "v3"}) is None  # v1 deleted: nothing to go back to
    assert rollback_target([], None, set()) is None


def test_finetune_on_an_unwritable_store_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    """Issue 11: `finetune` on a read-only store ended in a traceback. /sys refuses new directories even to root,
    standing in for a read-only mount."""
    from pathlib import Path

    from lorastack.cli import build_parser
    from lorastack.commands.train import finetune_command

    spec = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "plant-care-small.yaml"
    args = build_parser().parse_args(["finetune", str(spec), "--local", "--store", "/sys/lorastack-store"])
    assert finetune_command(args) == 1
    err = capsys.readouterr().err
    assert "the store at /sys/lorastack-store cannot be written" in err and "--store DIR" in err
    assert "Traceback" not in err
