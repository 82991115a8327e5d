"""``lorastack adapters ... --outputs`` and ``lorastack runs ... --outputs``: the store contract applied on the share
(promotions.json before LATEST, rollback order, verified pulls with the manifest last), at the HTTP boundary."""

from __future__ import annotations

import argparse
import json

from azure_fakes import FakeCredential, client_kwargs, fake, no_ambient_azure, outputs_file

from lorastack.azure.jobs import EXIT_FAILED
from lorastack.commands import cloud as cloud_cmd
from lorastack.store import Store

FIXTURES = (fake, no_ambient_azure, outputs_file)  # pytest fixtures from azure_fakes, used by name
RUN = "plant-care-e01ff66e6748"


def publish_on_share(fake, tmp_path, versions=2) -> Store:
    """Publish adapter versions with the store's own code (as the trainer does in the job), then lay the result out
    on the fake share byte for byte."""
    local = Store(tmp_path / "job-store").init()
    for i in range(versions):
        src = tmp_path / f"adapter-{i}"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA", "i": i}))
        (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (40 + i))
        local.publish_adapter("plant-care", src, {"base_model": "microsoft/Phi-3-mini-4k-instruct",
                                                  "base_revision": "abc123",
                                                  # one run per version: publishing is idempotent per run
                                                  "run_id": RUN if i == 0 else f"{RUN}-{i}",
                                                  "metrics": {"eval_loss": 1.2 - i / 10}})
    for path in local.root.rglob("*"):
        if path.is_file():
            fake.put(str(path.relative_to(local.root)), path.read_bytes())
    return local


def adapters(fake, outputs_file, action, ref=None, **extra) -> int:
    args = argparse.Namespace(action=action, ref=ref, outputs=str(outputs_file), json=False, reason=None, **extra)
    return cloud_cmd.adapters_command(args, credential=FakeCredential(), client_kwargs=client_kwargs(fake))


def runs(fake, outputs_file, action, run_id=None, **extra) -> int:
    args = argparse.Namespace(action=action, run_id=run_id, outputs=str(outputs_file), json=False, **extra)
    return cloud_cmd.runs_command(args, credential=FakeCredential(), client_kwargs=client_kwargs(fake))


def test_list_and_show(fake, outputs_file, tmp_path, capsys):
    publish_on_share(fake, tmp_path)
    fake.put("adapters/plant-care/v2/eval.json", json.dumps({"against": "base", "metrics": {"base": {"loss": 2.0}}}).encode())
    assert adapters(fake, outputs_file, "list") == 0
    assert capsys.readouterr().out.strip() == "plant-care\tv2\tv1, v2"
    assert adapters(fake, outputs_file, "show", "plant-care") == 0
    out = capsys.readouterr().out
    assert out.startswith("plant-care@v2 (LATEST: v2)") and "microsoft/Phi-3-mini-4k-instruct@abc123" in out
    assert "eval: against base" in out and "eval_loss=1.1" in out


def test_promote_writes_history_before_latest_and_rollback_goes_back(fake, outputs_file, tmp_path, capsys):
    publish_on_share(fake, tmp_path)
    fake.requests.clear()
    assert adapters(fake, outputs_file, "promote", "plant-care@v1") == 0
    assert bytes(fake.files["adapters/plant-care/LATEST"]) == b"v1\n"
    renames = [e for e in fake.log() if e.startswith("RENAME")]
    assert [e.rsplit("-> ", 1)[1] for e in renames] == ["adapters/plant-care/promotions.json",
                                                       "adapters/plant-care/LATEST"]  # history first
    history = json.loads(bytes(fake.files["adapters/plant-care/promotions.json"]))
    # the trainer's publishes promoted v1 then v2; the manual promotion is appended
    assert [(e["version"], e["action"]) for e in history] == [("v1", "promote"), ("v2", "promote"), ("v1", "promote")]
    assert adapters(fake, outputs_file, "promote", "plant-care@v2") == 0
    # rollbacks undo promotions in order: v2 -> v1 -> v2 -> v1, then nothing is left to undo
    for expected in ("v1", "v2", "v1"):
        assert adapters(fake, outputs_file, "rollback", "plant-care") == 0
        assert f"rolled back to {expected}" in capsys.readouterr().out
        assert bytes(fake.files["adapters/plant-care/LATEST"]) == f"{expected}\n".encode()
    assert adapters(fake, outputs_file, "rollback", "plant-care") == EXIT_FAILED
    assert "nothing to roll back to from v1" in capsys.readouterr().err
    assert bytes(fake.files["adapters/plant-care/LATEST"]) == b"v1\n"


def test_delete_refuses_the_promoted_version_and_removes_another(fake, outputs_file, tmp_path, capsys):
    publish_on_share(fake, tmp_path)
    assert adapters(fake, outputs_file, "delete", "plant-care@v2") == EXIT_FAILED
    assert "is the promoted version (LATEST)" in capsys.readouterr().err
    assert adapters(fake, outputs_file, "delete", "plant-care@v1") == 0
    assert not [f for f in fake.files if f.startswith("adapters/plant-care/v1/")]
    assert "adapters/plant-care/v1" not in fake.dirs
    delete_log = [e for e in fake.log() if e.startswith("DELETE adapters/plant-care/v1")]
    assert delete_log[0] == "DELETE adapters/plant-care/v1/manifest.json"  # never trusted again, even half deleted


def test_pull_copies_a_verified_version_into_the_local_store(fake, outputs_file, tmp_path, capsys):
    published = publish_on_share(fake, tmp_path)
    local_root = tmp_path / "laptop-store"
    assert adapters(fake, outputs_file, "pull", "plant-care", store=str(local_root)) == 0
    captured = capsys.readouterr()
    assert "plant-care@v2: 2 files" in captured.out and "pulling plant-care: 100%" in captured.err
    local = Store(local_root)
    adapter = local.adapter("plant-care")  # verifies every file against the manifest
    assert adapter.version == "v2" and adapter.manifest == published.adapter("plant-care@v2").manifest
    # a copy that does not match its manifest on the share is refused and nothing is kept
    fake.files["adapters/plant-care/v1/adapter_model.safetensors"][0] ^= 0xFF
    assert adapters(fake, outputs_file, "pull", "plant-care@v1", store=str(local_root)) == EXIT_FAILED
    assert "does not match the sha256 in its manifest" in capsys.readouterr().err
    assert not (local_root / "adapters" / "plant-care" / "v1").exists()
    assert not [p for p in (local_root / "adapters" / "plant-care").iterdir() if p.name.startswith(".tmp-")]


def test_runs_pull_brings_results_eval_and_the_adapter_of_a_finished_run(fake, outputs_file, tmp_path, capsys):
    publish_on_share(fake, tmp_path, versions=1)
    fake.put(f"runs/{RUN}/status.json", json.dumps({"phase": "succeeded", "adapter": "plant-care@v1"}).encode())
    fake.put(f"runs/{RUN}/results.csv", b"step,train_loss,valid_loss\n10,2.1,2.2\n20,1.4,1.6\n")
    fake.put(f"runs/{RUN}/spec.yaml", b"name: plant-care\n")
    fake.put("adapters/plant-care/v1/eval.json", b'{"against": "base"}\n')
    local_root = tmp_path / "laptop-store"
    assert runs(fake, outputs_file, "pull", RUN, store=str(local_root)) == 0
    out = capsys.readouterr().out
    assert f"run {RUN} (succeeded)" in out and "adapter plant-care@v1" in out
    assert (local_root / "runs" / RUN / "results.csv").read_text().endswith("20,1.4,1.6\n")
    assert json.loads((local_root / "adapters" / "plant-care" / "v1" / "eval.json").read_text()) == {"against": "base"}
    Store(local_root).adapter("plant-care@v1")


def test_runs_pull_refuses_a_run_still_training_and_rm_keeps_queued_runs(fake, outputs_file, tmp_path, capsys):
    fake.put(f"runs/{RUN}/status.json", json.dumps({"phase": "training", "step": 3}).encode())
    assert runs(fake, outputs_file, "pull", RUN, store=str(tmp_path / "s")) == EXIT_FAILED
    assert f"lorastack logs {RUN} --follow" in capsys.readouterr().err
    fake.put(f"queue/{RUN}", b"1\n")
    assert runs(fake, outputs_file, "rm", RUN) == EXIT_FAILED
    assert "is queued" in capsys.readouterr().err and f"runs/{RUN}/status.json" in fake.files
    fake.files.pop(f"queue/{RUN}")
    fake.put(f"runs/{RUN}/status.json", json.dumps({"phase": "failed"}).encode())
    fake.put(f"runs/{RUN}/checkpoints/checkpoint-10/COMPLETE", b"1\n")
    assert runs(fake, outputs_file, "rm", RUN) == 0
    assert not [f for f in fake.files if f.startswith(f"runs/{RUN}")]
    assert runs(fake, outputs_file, "list") == 0
    assert "no runs on share store" in capsys.readouterr().out
