"""The adapter lifecycle on a local store: promotion, rollback, deletion, pull, runs, status, locks, crash safety.

Fast tests drive the real Store and the real `lorastack` commands on adapters published from small PEFT-shaped
directories; crash tests SIGKILL a real publishing process at each injected point (lorastack.store.fault_point)
and check that the re-run leaves exactly one version. Slow tests at the end train tiny models for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lorastack.cli import main
from lorastack.store import LATEST, LockHeldError, Store, StoreError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _src(tmp_path: Path, payload: bytes = b"w") -> Path:
    d = tmp_path / f"src-{payload.hex()[:12]}"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def _publish(store: Store, tmp_path: Path, n: int, *, promote: bool = True, name: str = "plants") -> str:
    return store.publish_adapter(
        name, _src(tmp_path, f"weights-{n}".encode()), {"run_id": f"{name}-run{n}", "base_model": "tiny"},
        promote=promote,
    ).version


def _history(store: Store, name: str = "plants") -> list[tuple[str, str]]:
    return [(e["action"], e["version"]) for e in store.promotions(name)]


# ------------------------------------------------------------------------------------------------------------
# Promotion, rollback, deletion (store)
# ------------------------------------------------------------------------------------------------------------
def test_an_unpromoted_version_is_published_but_not_served(store, tmp_path):
    assert _publish(store, tmp_path, 1) == "v1"
    assert _publish(store, tmp_path, 2, promote=False) == "v2"
    assert store.latest_version("plants") == "v1"  # the server keeps serving v1
    assert store.adapter("plants@v2").manifest["run_id"] == "plants-run2"  # but v2 is there, verified
    assert _history(store) == [("promote", "v1")]


def test_promote_then_rollback_twice_walks_back_through_promotions(store, tmp_path):
    for n in (1, 2, 3):
        _publish(store, tmp_path, n)
    store.promote("plants", "v1", "back to the first")
    assert store.latest_version("plants") == "v1"
    assert store.rollback("plants") == "v3"  # undoes the hand promotion
    assert store.rollback("plants") == "v2"
    assert store.rollback("plants") == "v1"
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback("plants")
    # promotions.json is written before LATEST moves, so it always explains LATEST
    assert store.promotions("plants")[-1]["version"] == store.latest_version("plants")


def test_delete_refuses_the_latest_version_unless_forced_and_then_latest_rolls_back(store, tmp_path):
    for n in (1, 2):
        _publish(store, tmp_path, n)
    with pytest.raises(StoreError, match="LATEST names"):
        store.delete_version("plants", "v2")
    assert store.adapter("plants").version == "v2"
    assert store.delete_version("plants", "v1") == "v2"  # an older version goes without --force
    _publish(store, tmp_path, 3)
    assert store.delete_version("plants", "v3", force=True) == "v2"
    assert store.adapter_versions("plants") == ["v2"]
    assert store.delete_version("plants", "v2", force=True) is None
    assert not (store.adapters_dir / "plants" / LATEST).exists()


def test_promote_refuses_a_corrupt_version(store, tmp_path):
    _publish(store, tmp_path, 1)
    _publish(store, tmp_path, 2, promote=False)
    (store.adapters_dir / "plants" / "v2" / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="sha256"):
        store.promote("plants", "v2")
    assert store.latest_version("plants") == "v1"


def test_publishing_the_same_run_twice_gives_one_version(store, tmp_path):
    first = store.publish_adapter("plants", _src(tmp_path, b"a"), {"run_id": "plants-abc"})
    again = store.publish_adapter("plants", _src(tmp_path, b"a"), {"run_id": "plants-abc"})
    assert first.version == again.version == "v1"
    assert store.adapter_versions("plants") == ["v1"] and _history(store) == [("promote", "v1")]


def test_concurrent_publishes_never_collide_and_latest_never_moves_backwards(store, tmp_path):
    srcs = [_src(tmp_path, f"p{i}".encode()) for i in range(8)]
    versions: list[str] = []
    threads = [
        threading.Thread(target=lambda s=s, i=i: versions.append(
            store.publish_adapter("plants", s, {"run_id": f"plants-{i}"}).version))
        for i, s in enumerate(srcs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    assert store.latest_version("plants") == "v8"
    promoted = [int(v[1:]) for a, v in _history(store) if a == "promote"]
    assert promoted == sorted(promoted)  # each move went forward


# ------------------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL at every publish step, then the re-run
# ------------------------------------------------------------------------------------------------------------
_PUBLISHER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from lorastack.store import Store
    store, src = Store(sys.argv[1]), Path(sys.argv[2])
    a = store.publish_adapter("plants", src, {"run_id": "plants-crashy", "base_model": "tiny"})
    print(a.version)
    """
)


def _run_publisher(store: Store, src: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("LORASTACK_FAULT_AT", None)
    if fault:
        env["LORASTACK_FAULT_AT"] = fault
    return subprocess.run([sys.executable, "-c", _PUBLISHER, str(store.root), str(src)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "fault", ["publish:staged", "write:manifest.json", "publish:renamed", "write:promotions.json",
              "latest:history", "write:LATEST", "publish:promoted"],
)
def test_sigkill_at_any_publish_step_then_rerun_leaves_exactly_one_version(store, tmp_path, fault):
    """Issue 11: a crash between publish steps must not duplicate the adapter, and leaves no leftovers."""
    _publish(store, tmp_path, 0, name="plants")  # an earlier version: LATEST v1 before the crashing run
    src = _src(tmp_path, b"crashy")
    killed = _run_publisher(store, src, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert store.latest_version("plants") in ("v1", "v2")  # never a half state
    rerun = _run_publisher(store, src, None)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == "v2"
    assert store.adapter_versions("plants", include_unverified=True) == ["v1", "v2"]
    assert store.adapter("plants").version == "v2"  # verified and served
    assert _history(store) == [("promote", "v1"), ("promote", "v2")]  # the move is recorded once
    leftovers = [p.name for p in (store.adapters_dir / "plants").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_leftovers_of_a_live_writer_are_kept(store, tmp_path):
    _publish(store, tmp_path, 1)
    from lorastack.store import _owner_tag

    live = store.adapters_dir / "plants" / f".tmp-{_owner_tag()}-0123abcd"  # this process: alive
    live.mkdir()
    _publish(store, tmp_path, 2)
    assert live.is_dir()


# ------------------------------------------------------------------------------------------------------------
# One trainer per run: the lock
# ------------------------------------------------------------------------------------------------------------
def test_a_second_holder_is_refused_with_who_holds_it(store):
    first = store.run_lock("plants-abc").acquire()
    try:
        with pytest.raises(LockHeldError, match=rf"pid {os.getpid()} on .*one trainer per run"):
            store.run_lock("plants-abc").acquire()
        assert store.run_lock_holder("plants-abc")["alive"] is True
    finally:
        first.release()
    assert store.run_lock_holder("plants-abc") is None


def test_a_dead_holders_lock_is_taken_over(store):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is gone
    from lorastack.store import _host

    lock_file = store.run_dir("plants-abc") / "lock"
    lock_file.parent.mkdir(parents=True)
    lock_file.write_text(json.dumps({"pid": proc.pid, "host": _host(), "token": "t", "heartbeat_ts": time.time()}))
    assert store.run_lock_holder("plants-abc")["alive"] is False
    with store.run_lock("plants-abc"):
        assert store.run_lock_holder("plants-abc")["pid"] == os.getpid()


def test_a_lock_with_a_stale_heartbeat_on_another_host_is_taken_over(store, monkeypatch):
    lock_file = store.run_dir("plants-abc") / "lock"
    lock_file.parent.mkdir(parents=True)
    lock_file.write_text(json.dumps({"pid": 1, "host": "replica-elsewhere", "token": "t",
                                     "heartbeat_ts": time.time() - 5}))
    monkeypatch.setenv("LORASTACK_LOCK_STALE_S", "60")
    with pytest.raises(LockHeldError, match="replica-elsewhere"):
        store.run_lock("plants-abc").acquire()  # fresh enough: that replica may still be training
    monkeypatch.setenv("LORASTACK_LOCK_STALE_S", "2")
    with store.run_lock("plants-abc") as lock:
        assert json.loads(lock_file.read_text())["token"] == lock.token


def test_the_heartbeat_keeps_a_held_lock_fresh(store, monkeypatch):
    monkeypatch.setenv("LORASTACK_LOCK_STALE_S", "0.6")
    with store.run_lock("plants-abc"):
        time.sleep(1.0)  # longer than the stale age: only the heartbeat keeps it
        holder = store.run_lock_holder("plants-abc")
        assert holder["alive"] and holder["heartbeat_age_s"] < 0.6


# ------------------------------------------------------------------------------------------------------------
# The commands: lorastack adapters / runs / status on a local store
# ------------------------------------------------------------------------------------------------------------
def test_adapters_commands_list_promote_rollback_delete(store, tmp_path, capsys):
    for n, promote in ((1, True), (2, True), (3, False)):
        _publish(store, tmp_path, n, promote=promote)
    s = ["--store", str(store.root)]
    assert main(["adapters", "list", *s]) == 0
    out = capsys.readouterr().out
    assert "plants  (LATEST: v2)" in out and "* v2" in out and "  v3" in out
    assert main(["adapters", "promote", "plants@v3", *s]) == 0
    assert "plants@v3 is now LATEST" in capsys.readouterr().out
    assert main(["adapters", "rollback", "plants", *s]) == 0
    assert "from v3 to v2" in capsys.readouterr().out
    assert main(["adapters", "delete", "plants@v2", *s]) == 1
    assert "LATEST names" in capsys.readouterr().err and store.latest_version("plants") == "v2"
    assert main(["adapters", "delete", "plants@v2", "--force", *s]) == 0
    assert store.latest_version("plants") == "v1" and store.adapter_versions("plants") == ["v1", "v3"]
    assert main(["adapters", "promote", "plants", *s]) == 1
    assert "needs a version" in capsys.readouterr().err
    assert main(["adapters", "show", "plants", "--json", *s]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ref"] == "plants@v1" and shown["latest"] and shown["verified"] == "ok"
    assert [e["action"] for e in shown["promotions"]][-1] == "rollback"


def test_adapters_pull_to_a_directory_and_into_another_store(store, tmp_path, capsys):
    _publish(store, tmp_path, 1)
    dest = tmp_path / "pulled"
    assert main(["adapters", "pull", "plants", "--to", str(dest), "--store", str(store.root)]) == 0
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights-1"
    assert (dest / "manifest.json").is_file()
    assert main(["adapters", "pull", "plants", "--to", str(dest), "--store", str(store.root)]) == 1
    assert "not empty" in capsys.readouterr().err
    other = tmp_path / "other-store"
    for _ in range(2):  # pulling twice is one version there (same run id)
        assert main(["adapters", "pull", "plants@v1", "--to-store", str(other), "--promote",
                     "--store", str(store.root)]) == 0
    there = Store(other)
    assert there.adapter_versions("plants") == ["v1"] and there.adapter("plants").manifest["run_id"] == "plants-run1"


def test_runs_list_show_rm_and_status_on_a_local_store(store, tmp_path, capsys):
    from lorastack.progress import RunReporter

    RunReporter(store, "plants-abc").update("training", step=3, max_steps=10, loss=1.5)
    s = ["--store", str(store.root)]
    assert main(["runs", "list", *s]) == 0
    assert "plants-abc" in capsys.readouterr().out
    assert main(["status", *s]) == 0
    assert "plants-abc" in capsys.readouterr().out
    assert main(["status", "plants-abc", "--json", *s]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    with store.run_lock("plants-abc"):  # a live trainer
        assert main(["runs", "rm", "plants-abc", *s]) == 1
        assert "being trained by pid" in capsys.readouterr().err
    assert main(["runs", "rm", "plants-abc", *s]) == 0
    assert store.run_ids() == []
    assert main(["runs", "show", "plants-abc", *s]) == 1


def test_adapters_with_outputs_go_to_the_cloud_store(tmp_path, monkeypatch, capsys):
    """--outputs (or $LORASTACK_OUTPUTS) without --store hands the command to the cloud implementation."""
    from lorastack.commands import cloud

    seen = []
    monkeypatch.setattr(cloud, "adapters_command", lambda args: seen.append(args.adapters_command) or 0,
                        raising=False)
    assert main(["adapters", "list", "--outputs", str(tmp_path / "outputs.json")]) == 0
    assert seen == ["list"]


# ------------------------------------------------------------------------------------------------------------
# Held-out split
# ------------------------------------------------------------------------------------------------------------
def _lines_file(tmp_path: Path, n: int) -> Path:
    f = tmp_path / f"train-{n}.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


@pytest.mark.parametrize(("n", "held"), [(30, 3), (11, 1), (15, 2), (100, 10), (10, 0)])
def test_hold_out_is_seeded_ten_percent_never_below_the_training_minimum(store, tmp_path, n, held, caplog):
    from lorastack import trainer

    split = trainer.hold_out(store, _lines_file(tmp_path, n), 0.1, seed=42)
    if held == 0:
        assert split is None
        return
    train_part = store.dataset_path(split["training"]).read_text().splitlines()
    val_part = store.dataset_path(split["validation"]).read_text().splitlines()
    assert len(val_part) == held and len(train_part) == n - held >= 10
    assert not set(train_part) & set(val_part)
    assert split == trainer.hold_out(store, _lines_file(tmp_path, n), 0.1, seed=42)  # same seed, same split
    assert split["validation"] != trainer.hold_out(store, _lines_file(tmp_path, n), 0.1, seed=7)["validation"]


def test_spec_promote_policy_and_new_training_keys(tmp_path):
    from lorastack.spec import SpecError, load_spec

    train = _lines_file(tmp_path, 12)
    job = tmp_path / "j.yaml"
    job.write_text(f"name: x\nbase_model: m\ntraining_file: {train}\npromote: sometimes\n")
    with pytest.raises(SpecError, match="promote: must be one of 'always', 'if_better' or 'never', got 'sometimes'"):
        load_spec(job)
    job.write_text(f"name: x\nbase_model: m\ntraining_file: {train}\n"
                   "training: {early_stopping_patience: 2, keep_best: true, holdout: 0.2, keep_checkpoints: 1}\n")
    spec = load_spec(job)
    assert spec.promote_policy(has_validation=True) == "if_better"
    assert spec.promote_policy(has_validation=False) == "always"
    before = spec.run_id()
    again = load_spec(job, {"promote": "never", "training.keep_checkpoints": 0})
    assert again.run_id() == before  # promotion and pruning do not change the weights: same run


def test_max_seq_len_beyond_the_models_context_is_refused(tiny_llama, store, tmp_path):
    from lorastack import trainer
    from lorastack.spec import load_spec

    job = tmp_path / "j.yaml"
    job.write_text(f"name: x\nbase_model: {tiny_llama}\ntraining_file: {_lines_file(tmp_path, 12)}\n"
                   "max_seq_len: 4096\n")
    with pytest.raises(trainer.TrainerError, match=r"max_seq_len 4096 is longer than the context .* \(1024 tokens\)"):
        spec = load_spec(job)
        trainer.check_context_length(spec, trainer.base_config(spec, store))


# ------------------------------------------------------------------------------------------------------------
# Slow: real QLoRA runs on the tiny models
# ------------------------------------------------------------------------------------------------------------
def _finetune(job: Path, store: Store, **kw) -> int:
    from test_trainer import finetune_args

    from lorastack.commands import train as train_cmd

    return train_cmd.finetune_command(finetune_args(job, store, **kw))


def _results_steps(store: Store, run_id: str) -> list[int]:
    from test_trainer import results_rows

    return [int(r["step"]) for r in results_rows(store, run_id)]


def _inject_signal(monkeypatch, *, at_step: int | None = None, in_eval: bool = False,
                   sig: int = signal.SIGTERM) -> list[str]:
    """Send ``sig`` to this process from inside the real training loop: when step ``at_step`` begins, or at the
    first evaluation batch. Returns the events seen after the signal (evaluation batches, steps)."""
    from transformers import TrainerCallback

    from lorastack import trainer

    events: list[str] = []
    real_build = trainer._build_run_trainer

    class SendSignal(TrainerCallback):
        sent = False

        def on_step_begin(self, args, state, control, **kw):
            if self.sent:
                events.append(f"step {state.global_step + 1}")
            elif at_step is not None and state.global_step + 1 == at_step:
                self.sent = True
                os.kill(os.getpid(), sig)

        def on_prediction_step(self, args, state, control, **kw):
            if self.sent:
                events.append("eval batch")
            elif in_eval:
                self.sent = True
                os.kill(os.getpid(), sig)

    def build(*a, **k):
        built = real_build(*a, **k)
        built.add_callback(SendSignal())
        return built

    monkeypatch.setattr(trainer, "_build_run_trainer", build)
    return events


@pytest.mark.slow
def test_finetune_eval_promote_rollback_the_whole_loop(tmp_path, store, tiny_llama, capsys):
    """Done-when of issue 7: fine-tune, eval against the base (the adapter wins on held-out data of its domain),
    if_better promotes it; a worse run is kept out of LATEST; promote by hand; roll back."""
    from test_trainer import PLANT_TRAIN, PLANT_VAL, write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=16)
    assert _finetune(job, store) == 0
    out = capsys.readouterr().out
    assert "plants@v1 is now LATEST (promote: if_better)" in out
    v1 = store.adapter("plants")
    promo = v1.manifest["promotion"]
    assert promo["policy"] == "if_better" and promo["verdict"] == "promoted" and promo["baseline"] == "base"
    assert promo["candidate_loss"] < promo["baseline_loss"]
    system = json.loads(PLANT_TRAIN.read_text().splitlines()[0])["messages"][0]["content"]
    assert v1.manifest["system_prompt"] == system
    run_a = v1.manifest["run_id"]
    assert not any(store.checkpoints_dir(run_a).iterdir())  # pruned after the publish (keep_checkpoints: 0)

    # The model card says what it is and how to load it.
    card = (v1.path / "README.md").read_text()
    for expected in (str(tiny_llama), v1.manifest["dataset_sha256"]["training"], "PeftModel.from_pretrained",
                     "vllm serve", "--enable-lora", "| loss |", "trained_tokens"):
        assert expected in card, expected

    # lorastack eval: on the run's validation data by default, base vs adapter, saved as eval.json.
    assert main(["eval", "plants", "--store", str(store.root), "--json", "--samples", "2",
                 "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] == "plants@v1" and result["against"] == "base"
    assert set(result["metrics"]) == {"base", "plants@v1"}
    base_m, tuned = result["metrics"]["base"], result["metrics"]["plants@v1"]
    assert tuned["loss"] < base_m["loss"] and tuned["perplexity"] < base_m["perplexity"]
    assert tuned["token_accuracy"] > base_m["token_accuracy"]
    assert base_m["tokens"] == tuned["tokens"] > 0 and base_m["examples"] == 10  # the same tokens scored
    assert result["data"][0]["sha256"] == v1.manifest["dataset_sha256"]["validation"]
    assert len(result["samples"]) == 2
    first_val = json.loads(PLANT_VAL.read_text().splitlines()[0])["messages"]
    assert result["samples"][0]["reference"] in {m["content"] for m in first_val} | {
        json.loads(ln)["messages"][-1]["content"] for ln in PLANT_VAL.read_text().splitlines()}
    assert {"prompt", "reference", "base", "plants@v1"} <= set(result["samples"][0])
    assert "chrf" in tuned
    assert json.loads((v1.path / "eval.json").read_text())["metrics"] == result["metrics"]

    # A barely trained run does not beat LATEST: published as v2, LATEST stays v1.
    job_b = write_job(tmp_path, tiny_llama, name="plants", max_steps=1, learning_rate=1e-6)
    assert _finetune(job_b, store) == 0
    out = capsys.readouterr().out
    assert "plants@v2 was NOT promoted" in out
    v2 = store.adapter("plants@v2")
    assert v2.manifest["promotion"]["verdict"] == "kept" and v2.manifest["promotion"]["baseline"] == "plants@v1"
    assert store.latest_version("plants") == "v1"

    assert main(["eval", "plants@v2", "--against", "plants@v1", "--store", str(store.root), "--samples", "0"]) == 0
    table = capsys.readouterr().out
    assert "plants@v2 against plants@v1" in table and "loss of plants@v2" in table

    assert main(["adapters", "promote", "plants@v2", "--store", str(store.root)]) == 0
    assert store.latest_version("plants") == "v2"
    assert main(["adapters", "rollback", "plants", "--store", str(store.root)]) == 0
    assert store.latest_version("plants") == "v1"


@pytest.mark.slow
def test_resumed_run_publishes_the_cumulative_metrics_of_an_uninterrupted_one(
    tmp_path, store, tiny_llama, monkeypatch, capsys
):
    """Issue 7 item 4 and issue 11 item 4: SIGTERM at step 6, resume; same tokens, steps, first loss; each step
    once in results.csv. No validation file: 10 % of the training examples are held out (and said so)."""
    from test_trainer import write_job

    whole_store = Store(tmp_path / "whole").init()
    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=12, validation=None)
    assert _finetune(job, whole_store) == 0
    whole = whole_store.adapter("plants").manifest
    assert whole["holdout"]["examples"] == 3 and whole["holdout"]["of"] == 30
    assert "validation" in whole["dataset_sha256"] and whole["promotion"]["policy"] == "if_better"

    events = _inject_signal(monkeypatch, at_step=6)
    assert _finetune(job, store) == 143
    run_id = whole["run_id"]
    assert store.read_status(run_id)["phase"] == "preempted"
    assert [s for s, _ in store.complete_checkpoints(run_id)] == [6]
    assert events == []  # not one more step after the signal
    monkeypatch.undo()
    assert _finetune(job, store) == 0
    resumed = store.adapter("plants").manifest
    m, w = resumed["metrics"], whole["metrics"]
    assert m["steps"] == w["steps"] == 12
    assert m["trained_tokens"] == w["trained_tokens"] and m["loss_tokens"] == w["loss_tokens"]
    assert m["first_loss"] == pytest.approx(w["first_loss"]) and m["attempts"] == 2
    assert m["last_loss"] == pytest.approx(w["last_loss"], rel=1e-3)
    assert m["train_runtime_s"] > 0
    assert _results_steps(store, run_id) == list(range(1, 13))


@pytest.mark.slow
def test_sigterm_during_the_last_step_never_trains_past_max_steps(tmp_path, store, tiny_llama, monkeypatch, caplog):
    from test_trainer import write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=8, validation=None)
    events = _inject_signal(monkeypatch, at_step=8)
    assert _finetune(job, store) == 143
    run_id = next(iter(store.run_ids()))
    (step, ckpt), = store.complete_checkpoints(run_id)
    assert step == 8 and json.loads((ckpt / "lorastack-run.json").read_text())["training_done"] is True
    assert events == []
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="lorastack.trainer"):
        assert _finetune(job, store) == 0
    assert "training is already complete" in caplog.text
    assert store.adapter("plants").manifest["metrics"]["steps"] == 8
    assert store.read_status(run_id)["step"] == 8
    assert _results_steps(store, run_id) == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "during"])
def test_sigterm_before_or_during_an_evaluation_stops_within_one_batch(
    tmp_path, store, tiny_llama, monkeypatch, when
):
    """Issue 11 item 4: the exit stays well inside the grace period however long an evaluation is."""
    from test_trainer import write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=8, eval_steps=4, packing=False,
                    per_device_batch_size=1)
    events = _inject_signal(monkeypatch, at_step=4 if when == "before" else None, in_eval=when == "during")
    assert _finetune(job, store) == 143
    assert events.count("eval batch") == 0  # the signal is answered before the next evaluation batch
    run_id = next(iter(store.run_ids()))
    assert [s for s, _ in store.complete_checkpoints(run_id)] == [4]
    status = store.read_status(run_id)
    assert status["phase"] == "preempted" and "SIGTERM" in status["message"]
    if when == "during":
        monkeypatch.undo()
        assert _finetune(job, store) == 0
        assert _results_steps(store, run_id) == list(range(1, 9))
        assert store.adapter("plants").manifest["metrics"]["steps"] == 8


@pytest.mark.slow
def test_ctrl_c_exits_130_with_a_checkpoint(tmp_path, store, tiny_llama, monkeypatch):
    from test_trainer import write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=8, validation=None)
    _inject_signal(monkeypatch, at_step=3, sig=signal.SIGINT)
    assert _finetune(job, store) == 130
    run_id = next(iter(store.run_ids()))
    status = store.read_status(run_id)
    assert status["phase"] == "stopped" and "SIGINT" in status["message"]
    assert [s for s, _ in store.complete_checkpoints(run_id)] == [3]


@pytest.mark.slow
def test_ctrl_c_while_the_model_loads_exits_130_at_once(tmp_path, store, tiny_llama):
    """Ctrl-C is answered during loading (a long download), not after it."""
    from test_trainer import write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=8, validation=None)
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from lorastack import trainer
        real = trainer.load_base_model
        def slow_load(*a, **k):  # a model download that takes a while; Ctrl-C arrives in the middle
            os.kill(os.getpid(), signal.SIGINT)
            import time
            time.sleep(30)
            return real(*a, **k)
        trainer.load_base_model = slow_load
        from lorastack.cli import main
        sys.exit(main(["finetune", {str(job)!r}, "--local", "--store", {str(store.root)!r}]))
        """
    )
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 130, res.stderr[-2000:]
    assert time.monotonic() - t0 < 25
    status = store.read_status(next(iter(store.run_ids())))
    assert status["phase"] == "stopped" and "before training started" in status["message"]


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_trainers_lock_is_taken_over(tmp_path, store, tiny_llama, capsys):
    from test_trainer import _cli, _wait_for_step, write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=400, validation=None, per_device_batch_size=1)
    first = subprocess.Popen(_cli("finetune", str(job), "--local", "--store", str(store.root)),
                             env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        run_id = _wait_for_step(store, 2, first)
        assert _finetune(job, store) == 1
        err = capsys.readouterr().err
        assert f"already being trained by pid {first.pid}" in err and "one trainer per run" in err
        assert store.read_status(run_id)["phase"] == "training"  # the first trainer's status is untouched
    finally:
        first.kill()  # SIGKILL: no chance to release the lock
        first.communicate()
    assert store.run_lock_holder(run_id)["alive"] is False  # same host, its pid is gone
    # The next attempt takes the dead trainer's lock over (a time budget keeps it short: it does not change the run).
    assert _finetune(job, store, time_budget="6s") == 3
    status = store.read_status(run_id)
    assert status["phase"] == "stopped" and status["attempts"] == 2
    assert store.run_lock_holder(run_id) is None  # released on exit


@pytest.mark.slow
def test_sigkill_between_publish_steps_of_a_finetune_then_rerun_finishes_the_same_version(tmp_path, store, tiny_llama):
    """Issue 11: killed after the version directory is renamed, before LATEST: the re-run recognises the run."""
    from test_trainer import _cli, write_job

    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=4, validation=None)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    killed = subprocess.run(_cli("finetune", str(job), "--local", "--store", str(store.root)),
                            env={**env, "LORASTACK_FAULT_AT": "publish:renamed"}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert store.adapter_versions("plants") == ["v1"] and store.latest_version("plants") is None
    rerun = subprocess.run(_cli("finetune", str(job), "--local", "--store", str(store.root)), env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already published as plants@v1" in rerun.stderr
    assert store.adapter_versions("plants", include_unverified=True) == ["v1"]
    assert store.adapter("plants").version == "v1"
    assert [e["version"] for e in store.promotions("plants")] == ["v1"]
    run_id = store.adapter("plants").manifest["run_id"]
    assert store.read_status(run_id)["phase"] == "succeeded"
    assert not (store.run_dir(run_id) / "lock").exists()


@pytest.mark.slow
def test_early_stopping_and_keep_best_publish_the_best_evaluation(tmp_path, store, tiny_llama):
    from test_trainer import write_job

    # Validation answers unlike the training answers: the more the adapter learns plant care, the worse the
    # validation loss gets after the first evaluations, so early stopping must end the run.
    other = tmp_path / "other-domain.jsonl"
    other.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {i} again"},
        {"role": "assistant", "content": " ".join(["zq 0 9 xk"] * 12)}]}) for i in range(10)) + "\n")
    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=30, eval_steps=2, validation=other,
                    early_stopping_patience=2, keep_best=True)
    assert _finetune(job, store) == 0
    m = store.adapter("plants").manifest["metrics"]
    assert m["early_stopped_at"] < 30 and m["steps"] == m["early_stopped_at"]
    assert m["best_step"] <= m["early_stopped_at"] - 4  # two evaluations without improvement after the best
    # keep_best: the published weights are the best evaluation's (the gate scores them to the same loss).
    assert m["eval_loss"] == pytest.approx(m["best_valid_loss"], abs=2e-3)
    assert not (store.run_dir(m.get("run_id") or store.adapter("plants").manifest["run_id"]) / "best").exists()


def test_new_subcommands_have_help_and_import_nothing_heavy():
    code = (
        "import sys\n"
        "from lorastack.cli import build_parser\n"
        "p = build_parser()\n"
        "for argv in (['eval', 'x'], ['adapters', 'list'], ['runs', 'rm', 'r'], ['status', '--store', 'd']):\n"
        "    p.parse_args(argv)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'sacrebleu')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}).stdout
    assert out.strip() == "[]"
    for cmd in (["eval"], ["adapters", "pull"], ["runs", "show"]):
        res = subprocess.run([sys.executable, "-m", "lorastack", *cmd, "--help"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60, check=False)
        assert res.returncode == 0 and "--store" in res.stdout, res.stderr


@pytest.mark.slow
def test_training_output_is_readable_without_dict_dumps_or_library_noise(tmp_path, store, tiny_llama):
    """Issue 7 item 8: no raw HF dicts on stdout, no `kernels` warning, each data warning once under the
    user's file name (not the store's sha256 path)."""
    from test_trainer import PLANT_TRAIN, _cli, write_job

    lines = PLANT_TRAIN.read_text().splitlines()
    row = json.loads(lines[0])
    row["messages"].append({"role": "user", "content": "thanks!"})  # a trailing user turn: a warning
    lines[0] = json.dumps(row)
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(lines) + "\n")
    job = write_job(tmp_path, tiny_llama, name="plants", max_steps=3, train=data, validation=None)
    res = subprocess.run(_cli("finetune", str(job), "--local", "--store", str(store.root)),
                         env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=180,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "{'" not in res.stdout and "{'" not in res.stderr  # no {'loss': ...} dumps
    assert res.stdout.splitlines()[-1].startswith("plants@v1 is now LATEST")
    assert "kernels" not in res.stderr and "Loading weights" not in res.stderr
    warned = [ln for ln in res.stderr.splitlines() if "last_message_not_assistant" in ln]
    assert len(warned) == 1 and str(data) in warned[0], res.stderr
    assert "datasets/" not in res.stderr
    assert "holding out 3 of 30 training examples" in res.stderr
