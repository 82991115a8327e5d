"""Data-parallel training in one replica: ``lorastack train --nproc N`` under torchrun (gloo on CPU).

The slow tests train the tiny Llama for real in 2 processes: the run finishes and publishes one adapter,
written by rank 0 only; its loss curve matches one process with the same global batch (2 x 2 rows vs
1 x 4 rows) within 0.5 % per step (measured: identical first step, at most 0.12 % after, from the order
of floating-point sums in the gradient all-reduce); SIGTERM stops both ranks at the same step with one
complete checkpoint, and a single process resumes it (another world size) to the end.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorastack import distributed
from lorastack.store import Store

REPO = Path(__file__).resolve().parents[1]


# -- fast -------------------------------------------------------------------------------------------------


def test_single_process_is_rank_0_of_1_and_agreeing_is_the_identity(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert not distributed.is_distributed()
    assert distributed.agree_stop(None, False, False) == (None, False, False)
    assert distributed.agree_stop("signal", False, True) == ("signal", True, True)
    assert distributed.agree_flags(True, False) == (True, False)
    assert distributed.sum_across_ranks(7) == 7
    distributed.barrier()  # no process group: returns at once


def test_other_ranks_report_nothing(monkeypatch, store):
    """Rank 1 gets a reporter that writes nothing to the store; rank 0 the real one."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    silent = distributed.reporter_for(store, "run-x")
    silent.update("training", step=3)
    silent.record(3, train_loss=1.0)
    assert not (store.runs_dir / "run-x").exists()
    monkeypatch.setenv("RANK", "0")
    assert type(distributed.reporter_for(store, "run-x")).__name__ == "RunReporter"


def test_nproc_values_and_the_torchrun_command():
    assert distributed.resolve_nproc(None) == 1 and distributed.resolve_nproc("3") == 3
    assert distributed.resolve_nproc("auto") >= 1  # one per visible GPU; 1 without GPUs
    for bad in ("0", "two", -1):
        with pytest.raises(ValueError, match="--nproc must be a positive number or 'auto'"):
            distributed.resolve_nproc(bad)
    cmd = distributed.torchrun_command(4, ["train", "--store", "/s"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=4" in cmd
    assert cmd[-4:] == ["lorastack", "train", "--store", "/s"]


def test_train_refuses_a_bad_nproc_before_loading_anything(tmp_path, monkeypatch, capsys):
    from lorastack.cli import main

    store = Store(tmp_path / "s").init()
    (store.runs_dir / "r1").mkdir(parents=True)
    (store.runs_dir / "r1" / "spec.yaml").write_text("name: x\n")
    assert main(["train", "--store", str(store.root), "--run", "r1", "--nproc", "zero"]) == 2
    assert "--nproc must be a positive number or 'auto', not 'zero'" in capsys.readouterr().err


# -- slow: real 2-process runs -------------------------------------------------------------------------------


def _prepare(tmp_path: Path, model: Path, store_name: str, **training) -> tuple[Store, str]:
    from test_trainer import write_job

    from lorastack.trainer import prepare_run

    store = Store(tmp_path / store_name).init()
    job = write_job(tmp_path / store_name, model, name="plants", validation=None, **training)
    return store, prepare_run(store, job)


def _train(store: Store, run_id: str, nproc: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lorastack", "train", "--store", str(store.root), "--run", run_id,
           "--nproc", str(nproc)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _losses(store: Store, run_id: str) -> dict[int, float]:
    with open(store.run_dir(run_id) / "results.csv", newline="") as fh:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(fh) if r["train_loss"]}


@pytest.mark.slow
def test_two_processes_publish_one_adapter_and_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama):
    two, run2 = _prepare(tmp_path, tiny_llama, "two", max_steps=8, per_device_batch_size=2)
    one, run1 = _prepare(tmp_path, tiny_llama, "one", max_steps=8, per_device_batch_size=4)
    p2 = _train(two, run2, 2)
    out2, _ = p2.communicate(timeout=240)
    assert p2.returncode == 0, out2[-4000:]
    assert "2 processes (gloo)" in out2
    p1 = _train(one, run1, 1)
    out1, _ = p1.communicate(timeout=240)
    assert p1.returncode == 0, out1[-4000:]

    # one adapter, one version, one set of step rows: only rank 0 wrote to the store
    assert sorted(p.name for p in (two.adapters_dir / "plants").iterdir()) == ["LATEST", "promotions.json", "v1"]
    status = two.read_status(run2)
    assert status["phase"] == "succeeded" and status["adapter"] == "plants@v1"
    assert two.adapter("plants").manifest["run_id"] == run2  # verified files, complete manifest
    with open(two.run_dir(run2) / "results.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 9))

    l2, l1 = _losses(two, run2), _losses(one, run1)
    assert sorted(l2) == sorted(l1) == list(range(1, 9))
    assert abs(l2[1] - l1[1]) < 1e-4  # the same first global batch
    worst = max(abs(l2[s] - l1[s]) / l1[s] for s in l1)
    assert worst < 0.005, (l2, l1)
    assert l2[8] < l2[1]  # and it learns


@pytest.mark.slow
def test_sigterm_stops_both_ranks_at_one_step_and_one_process_resumes_it(tmp_path, tiny_llama):
    store, run_id = _prepare(tmp_path, tiny_llama, "pre", max_steps=60, per_device_batch_size=1)
    proc = _train(store, run_id, 2)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        st = store.read_status(run_id) if (store.run_dir(run_id) / "status.json").exists() else None
        if st and st.get("phase") == "training" and (st.get("step") or 0) >= 2:
            break
        time.sleep(0.1)
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # what ACA sends to the container's first process
    out, _ = proc.communicate(timeout=90)
    assert time.monotonic() - t_sig < 30, "not within ACA's default 30 s grace period"
    assert proc.returncode == 143, out[-4000:]
    status = store.read_status(run_id)
    assert status["phase"] == "preempted", status
    done = store.complete_checkpoints(run_id)
    assert len(done) == 1, done
    step, ckpt = done[0]
    assert 2 <= step < 60 and status["step"] == step
    # both ranks saved the same step: their RNG files sit in that one checkpoint, no other directory
    assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert [p.name for p in store.checkpoints_dir(run_id).glob("checkpoint-*")] == [ckpt.name]
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step

    # a different world size resumes it: one process, from that step to the end
    resumed = _train(store, run_id, 1)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-4000:]
    final = store.read_status(run_id)
    assert final["phase"] == "succeeded" and final["resumed_from"] == ckpt.name
    assert final["step"] == 60 and store.adapter("plants").ref == "plants@v1"


