"""The QLoRA trainer, end to end on tiny real models (CPU, 4-bit NF4): training, resume, publish, packing."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorastack import trainer
from lorastack.commands import train as train_cmd
from lorastack.packing import PackedCollator, pack_rows
from lorastack.store import COMPLETE, Store, StoreError

REPO = Path(__file__).resolve().parents[1]
PLANT_TRAIN = REPO / "jobs" / "examples" / "plant-care-train.jsonl"
PLANT_VAL = REPO / "jobs" / "examples" / "plant-care-validation.jsonl"


def write_job(
    tmp_path: Path,
    model_dir: Path,
    *,
    name: str = "tiny",
    train: Path = PLANT_TRAIN,
    validation: Path | None = PLANT_VAL,
    top: dict | None = None,
    **training,
) -> Path:
    """A run spec for a tiny, seconds-long QLoRA run."""
    settings = {
        "max_steps": 12,
        "learning_rate": 5e-3,
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "packing": True,
        "save_every_minutes": 10.0,
    }
    settings.update(training)
    doc = {
        "name": name,
        "base_model": str(model_dir),
        "training_file": str(train),
        "max_seq_len": 512,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": settings,
        **(top or {}),
    }
    if validation is not None:
        doc["validation_file"] = str(validation)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def finetune_args(job: Path, store: Store, local: bool = True, **kw) -> argparse.Namespace:
    base = {
        "spec": str(job),
        "local": local,
        "store": str(store.root),
        "set": [],
        "base_model": None,
        "max_steps": None,
        "epochs": None,
        "time_budget": None,
        "outputs": None,
        "wait": False,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def results_rows(store: Store, run_id: str) -> list[dict[str, str]]:
    with open(store.run_dir(run_id) / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def only_run(store: Store) -> str:
    runs = [d.name for d in store.runs_dir.iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


# ---------------------------------------------------------------------------------------------------
# Real QLoRA runs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_phi3"])
def test_qlora_run_lowers_loss_and_publishes_a_loadable_adapter(arch, request, tmp_path, store, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(arch)
    loaded = {}
    real_load = trainer.load_base_model

    def spy_load(spec, store_, **kw):  # the real loader; we only look at what it returns
        model, rev = real_load(spec, store_, **kw)
        loaded.setdefault("models", []).append(model)
        return model, rev

    monkeypatch.setattr(trainer, "load_base_model", spy_load)
    job = write_job(tmp_path, model_dir, name=f"plants-{arch.split('_')[1]}", max_steps=16)
    assert train_cmd.finetune_command(finetune_args(job, store)) == 0

    # It really was QLoRA: NF4 4-bit base layers with double quantization.
    import bitsandbytes as bnb

    base = loaded["models"][0]
    linear4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.quant_state.quant_type == "nf4" for m in linear4)
    assert linear4[0].weight.quant_state.nested  # double quantization

    run_id = only_run(store)
    status = store.read_status(run_id)
    assert status["phase"] == "succeeded" and status["step"] == 16
    rows = results_rows(store, run_id)
    losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert rows[-1]["full_valid_loss"] and float(rows[-1]["full_valid_loss"]) > 0

    adapter = store.adapter(f"plants-{arch.split('_')[1]}")  # verifies every file's sha256
    m = adapter.manifest
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert m["run_id"] == run_id and m["base_model"] == str(model_dir)
    assert m["chat_template"] == tok.chat_template
    assert m["chat_template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    assert m["dataset_sha256"]["training"] == hashlib.sha256(PLANT_TRAIN.read_bytes()).hexdigest()
    assert m["spec"]["training"]["max_steps"] == 16 and m["metrics"]["global_step"] == 16
    # The spec left the fast path at auto: what it resolved to (and why) is on the adapter and the status.
    fast = m["fast_path"]
    assert fast == status["fast_path"] and fast["packing"] and fast["reasons"]
    assert fast["row_len"] <= 512 and fast["batch_rows"] == 4 * (512 // fast["row_len"])
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert f in m["files"]
    assert AutoTokenizer.from_pretrained(adapter.path).chat_template == tok.chat_template

    # The adapter loads onto a fresh base and changes what the model predicts.
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "How often should I water a cactus?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        before = fresh(ids).logits
        tuned = PeftModel.from_pretrained(fresh, adapter.path)
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.slow
def test_merge_16bit_writes_a_merged_model_matching_the_adapter(tmp_path, store, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = write_job(
        tmp_path, tiny_llama, name="merged", max_steps=6, validation=None, top={"merge_16bit": True}
    )
    assert train_cmd.finetune_command(finetune_args(job, store)) == 0
    run_id = only_run(store)
    merged_dir = store.run_dir(run_id) / "merged"
    assert (merged_dir / COMPLETE).is_file() and (merged_dir / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not getattr(merged, "is_loaded_in_4bit", False)
    assert next(merged.parameters()).dtype in (torch.bfloat16, torch.float16)
    adapter = store.adapter("merged")
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), adapter.path
    )
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        diff = (merged.float()(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 0.05, diff  # bf16 rounding only; merging into 4-bit weights would be off by ~1


# ---------------------------------------------------------------------------------------------------
# Preemption: SIGTERM, resume, changed spec
# ---------------------------------------------------------------------------------------------------
def _wait_for_step(store: Store, min_step: int, proc: subprocess.Popen, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if store.runs_dir.is_dir():
            for run in store.runs_dir.iterdir():
                status = store.read_status(run.name) if (run / "status.json").exists() else None
                if status and status.get("phase") == "training" and (status.get("step") or 0) >= min_step:
                    return run.name
        time.sleep(0.05)
    raise AssertionError("training never reached the step")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorastack", *args]


@pytest.mark.slow
def test_sigterm_checkpoints_and_rerun_resumes_then_changed_spec_refuses(tmp_path, store, tiny_llama):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    job = write_job(
        tmp_path, tiny_llama, name="preempt", max_steps=16, validation=None, per_device_batch_size=1
    )
    proc = subprocess.Popen(
        _cli("finetune", str(job), "--local", "--store", str(store.root)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_id = _wait_for_step(store, 2, proc)
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t_sig < 30  # within ACA's default grace period
    assert proc.returncode == trainer.EXIT_PREEMPTED, err[-3000:]
    status = store.read_status(run_id)
    assert status["phase"] == "preempted" and "SIGTERM" in status["message"]
    done = store.complete_checkpoints(run_id)
    assert len(done) == 1
    saved_step = done[0][0]
    assert 2 <= saved_step < 16 and saved_step == status["step"]
    state = json.loads((done[0][1] / "trainer_state.json").read_text())
    assert state["global_step"] == saved_step
    record = json.loads((done[0][1] / trainer.IDENTITY_FILE).read_text())  # what the fast path resolved to

    # A changed spec (here: edited on the store) must not silently continue those checkpoints.
    spec_file = store.run_dir(run_id) / "spec.yaml"
    original = spec_file.read_text()
    edited = yaml.safe_load(original)
    edited["training"]["learning_rate"] = 1e-3
    spec_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    res = subprocess.run(
        check=False,
        args=_cli("train", "--store", str(store.root), "--run", run_id),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == trainer.EXIT_FAILED
    assert "refusing to resume" in res.stderr and "learning_rate" in res.stderr
    failed = store.read_status(run_id)
    assert failed["phase"] == "failed" and "learning_rate" in failed["error"]
    assert store.complete_checkpoints(run_id)[0][0] == saved_step  # nothing was thrown away

    # The same command again (a job retry) resumes at the saved step and finishes.
    spec_file.write_text(original)
    res = subprocess.run(
        check=False,
        args=_cli("finetune", str(job), "--local", "--store", str(store.root)),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from checkpoint-{saved_step}" in res.stderr
    # The resumed attempt trains with the fast path its checkpoint was trained with, and says so.
    assert "fast path (kept from the checkpoint)" in res.stderr
    status = store.read_status(run_id)
    assert status["phase"] == "succeeded" and status["resumed_from"] == f"checkpoint-{saved_step}"
    assert status["attempts"] == 3
    # Only the steps after the checkpoint were trained again; results.csv holds every step once.
    logged = [int(s) for s in re.findall(r"step (\d+)/16 loss", res.stderr)]
    assert logged and logged[0] == saved_step + 1 and logged[-1] == 16
    steps = [int(r["step"]) for r in results_rows(store, run_id)]
    assert steps == list(range(1, 17))
    assert store.adapter("preempt").manifest["metrics"]["global_step"] == 16
    kept = store.adapter("preempt").manifest["fast_path"]
    assert kept["resumed"] and {k: kept[k] for k in ("row_len", "batch_rows", "compute_dtype")} == {
        k: record["fast_path"][k] for k in ("row_len", "batch_rows", "compute_dtype")}


def _fake_checkpoint(store: Store, run_id: str, step: int, doc: dict, complete: bool = True) -> Path:
    ckpt = store.checkpoints_dir(run_id) / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / trainer.IDENTITY_FILE).write_text(json.dumps({"spec": doc}))
    if complete:
        Store.mark_complete(ckpt)
    return ckpt


def _doc(**changes) -> dict:
    doc = {
        "name": "x",
        "base_model": "m",
        "training_file": "/a.jsonl",
        "max_seq_len": 512,
        "time_budget": 600,
        "run_id": "x-1",
        "training": {"learning_rate": 2e-4, "save_every_minutes": 10, "max_steps": 40},
        "dataset_sha256": {"training": "aa"},
    }
    for key, value in changes.items():
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return doc


def test_resume_check_refuses_changed_settings_or_data_but_not_budget(store):
    ckpt = _fake_checkpoint(store, "x-1", 8, _doc())
    trainer.check_resumable(ckpt, _doc())
    # Budget, checkpoint cadence and the data file's location do not change the weights.
    trainer.check_resumable(
        ckpt, _doc(time_budget=7200, **{"training.save_every_minutes": 1}, training_file="/elsewhere/a.jsonl")
    )
    with pytest.raises(trainer.TrainerError, match=r"training\.learning_rate: 0\.0002 -> 0\.001"):
        trainer.check_resumable(ckpt, _doc(**{"training.learning_rate": 1e-3}))
    with pytest.raises(trainer.TrainerError, match="dataset_sha256.training"):
        trainer.check_resumable(ckpt, _doc(**{"dataset_sha256.training": "bb"}))


def test_incomplete_checkpoints_are_never_resumed(store):
    _fake_checkpoint(store, "x-1", 4, _doc())
    half = _fake_checkpoint(store, "x-1", 8, _doc(), complete=False)  # a save killed midway
    assert store.latest_checkpoint("x-1").name == "checkpoint-4"
    assert trainer.remove_incomplete_checkpoints(store, "x-1") == [half]
    assert not half.exists() and store.latest_checkpoint("x-1").name == "checkpoint-4"


def test_checkpoint_rotation_keeps_the_newest_complete_ones(store):
    for step in (2, 4, 6):
        _fake_checkpoint(store, "x-1", step, _doc())
    trainer._rotate_checkpoints(store, "x-1", 2)
    assert [s for s, _ in store.complete_checkpoints("x-1")] == [4, 6]
    assert not (store.checkpoints_dir("x-1") / "checkpoint-2").exists()


@pytest.mark.slow
def test_time_budget_stops_with_a_checkpoint_before_it_runs_out(tmp_path, store, tiny_llama):
    job = write_job(
        tmp_path, tiny_llama, name="budget", max_steps=100000, validation=None, top={"time_budget": "20s"}
    )
    t0 = time.monotonic()
    rc = train_cmd.finetune_command(finetune_args(job, store))
    wall = time.monotonic() - t0
    assert rc == trainer.EXIT_TIME_BUDGET
    assert wall < 20.0, wall
    run_id = only_run(store)
    status = store.read_status(run_id)
    assert status["phase"] == "stopped" and status["message"].startswith("stopped: time budget")
    step, _ = store.complete_checkpoints(run_id)[-1]
    assert step == status["step"] > 0
    assert store.adapter_names() == []  # an unfinished run publishes nothing


# ---------------------------------------------------------------------------------------------------
# Publishing is atomic
# ---------------------------------------------------------------------------------------------------
def test_publish_killed_before_the_rename_leaves_no_adapter(tmp_path, store, tiny_llama, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorastack import store as store_mod
    from lorastack.spec import load_spec

    job = write_job(tmp_path, tiny_llama, name="atomic", validation=None)
    spec = load_spec(job)
    doc = {**spec.resolved_dict(), "run_id": spec.run_id(), "dataset_sha256": spec.dataset_hashes()}
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, task_type="CAUSAL_LM")
    )
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    class Killed(BaseException):
        """Stands in for SIGKILL: nothing after this point runs."""

    def killed_rename(src, dst):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(store_mod.os, "rename", killed_rename)
        with pytest.raises(Killed):
            trainer.publish(store, spec.run_id(), spec, doc, model, tok, None, {})
    assert store.adapter_names() == []
    assert store.adapter_versions("atomic") == []
    with pytest.raises(StoreError):
        store.adapter("atomic")
    # The next attempt publishes normally; the leftover staging directory is never handed out.
    published = trainer.publish(store, spec.run_id(), spec, doc, model, tok, None, {})
    assert published.version == "v1" and store.adapter_names() == ["atomic"]

    # Another run killed between the version rename and the LATEST pointer: readers keep the previous version.
    def killed_latest(path, data):
        if path.name == "LATEST":
            raise Killed
        return real_write(path, data)

    real_write = store_mod.write_bytes_atomic
    with monkeypatch.context() as m:
        m.setattr(store_mod, "write_bytes_atomic", killed_latest)
        with pytest.raises(Killed):
            trainer.publish(store, "atomic-otherrun", spec, doc, model, tok, None, {})
    assert store.adapter("atomic").version == "v1"
    # The same run published again is recognised, not published twice.
    again = trainer.publish(store, spec.run_id(), spec, doc, model, tok, None, {})
    assert again.version == "v1" and store.adapter_versions("atomic") == ["v1", "v2"]


# ---------------------------------------------------------------------------------------------------
# Packing does not leak attention across examples
# ---------------------------------------------------------------------------------------------------
def test_packed_logits_match_each_example_alone(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist() for n in (23, 9, 31, 17, 40)
    ]
    rows = [{"input_ids": s, "labels": s} for s in seqs]
    # The exact batch the trainer feeds: best-fit-decreasing packing into rows of 64, then the collator.
    packed = pack_rows(rows, 64)
    assert len(packed) == 2 and sorted(n for r in packed for n in r["seq_lengths"]) == sorted(map(len, seqs))
    batch = PackedCollator(pad_token_id=0)(packed)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 2
    assert int(batch.pop("num_real_tokens")) == sum(map(len, seqs))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = {tuple(s): model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs}
        # Control: the same packed rows under a plain causal mask leak across examples.
        leaky = model(
            input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False
        ).logits
    worst = leak = 0.0
    for b, row in enumerate(packed):
        start = 0
        for n in row["seq_lengths"]:
            ids = tuple(row["input_ids"][start : start + n])
            worst = max(worst, (out[b, start : start + n] - alone[ids]).abs().max().item())
            leak = max(leak, (leaky[b, start : start + n] - alone[ids]).abs().max().item())
            # no example learns to predict across a boundary
            assert row["labels"][start] == -100
            start += n
    assert worst < 1e-4, worst
    assert leak > 1e-2, leak


# ---------------------------------------------------------------------------------------------------
# Fail fast, clear errors
# ---------------------------------------------------------------------------------------------------
def test_bad_dataset_fails_before_any_model_is_loaded(tmp_path, store, tiny_llama, monkeypatch, capsys):
    lines = PLANT_TRAIN.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def must_not_load(*a, **k):
        raise AssertionError("a model or tokenizer was loaded for a bad dataset")

    monkeypatch.setattr(trainer, "load_base_model", must_not_load)
    monkeypatch.setattr(trainer, "load_tokenizer", must_not_load)
    job = write_job(tmp_path, tiny_llama, name="bad", train=bad, validation=None)
    t0 = time.monotonic()
    rc = train_cmd.finetune_command(finetune_args(job, store))
    elapsed = time.monotonic() - t0
    assert rc == trainer.EXIT_FAILED
    assert elapsed < 1.0, elapsed
    err = capsys.readouterr().err
    assert f"{bad}:3" in err
    status = store.read_status(only_run(store))
    assert status["phase"] == "failed" and f"{bad}:3" in status["error"]
    assert not list(store.datasets_dir.glob("*.jsonl"))  # nothing was uploaded


def test_bad_dataset_cli_never_imports_torch(tmp_path, store, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', encoding="utf-8")
    job = write_job(tmp_path, tiny_llama, name="bad", train=bad, validation=None)
    code = (
        "import sys; from lorastack.cli import main; "
        f"rc = main(['finetune', {str(job)!r}, '--local', '--store', {str(store.root)!r}]); "
        "print('RC', rc, 'torch' in sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert "RC 1 False" in res.stdout, res.stdout + res.stderr
    assert f"{bad}:2" in res.stderr


def test_finetune_without_local_submits_to_azure_and_names_missing_stack_outputs(
    tmp_path, store, tiny_llama, capsys, monkeypatch
):
    for var in ("LORASTACK_OUTPUTS", "LORASTACK_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID"):
        monkeypatch.delenv(var, raising=False)
    job = write_job(tmp_path, tiny_llama)
    assert train_cmd.finetune_command(finetune_args(job, store, local=False)) == 1
    assert "subscriptionId" in capsys.readouterr().err


def test_unreachable_base_model_names_the_model_and_where_it_looked(tmp_path, store, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    job = write_job(tmp_path, Path("tiny/not-cached"), name="nomodel", validation=None)
    spec = yaml.safe_load(job.read_text())
    spec["base_model"] = "example-org/not-cached-model"
    job.write_text(yaml.safe_dump(spec))
    assert train_cmd.finetune_command(finetune_args(job, store)) == trainer.EXIT_FAILED
    status = store.read_status(only_run(store))
    assert status["phase"] == "failed"
    for expected in (
        "example-org/not-cached-model",
        str(store.models_dir),
        "HF_HUB_OFFLINE",
        "local directory",
    ):
        assert expected in status["error"], status["error"]


def test_encoded_labels_train_only_assistant_tokens(tiny_phi3, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    data = tmp_path / "d.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "A?"},
                {"role": "assistant", "content": "old", "weight": 0},
                {"role": "user", "content": "B?"},
                {"role": "assistant", "content": "Yes."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "C?"},
                {"role": "assistant", "content": "no", "weight": 0},
            ]
        },
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    enc = trainer.encode_file(data, tok, 512)
    assert len(enc.rows) == 2  # the all-weight-0 example is skipped (the data checks' nothing_to_train)
    end = tok.convert_tokens_to_ids("<|end|>")
    for row in enc.rows:
        trained = [t for t in row["labels"] if t != -100]
        assert trained[-1] == end  # the end-of-turn token is learned, so the model learns to stop
    assert tok.decode([t for t in enc.rows[0]["labels"] if t != -100]).startswith("Hello.")
    second = tok.decode([t for t in enc.rows[1]["labels"] if t != -100])
    assert "Yes." in second and "old" not in second and "B?" not in second


def test_train_run_next_claims_the_oldest_queued_run(tmp_path, store, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CONTAINER_APP_JOB_EXECUTION_NAME", "trainer-job-abc12")
    args = argparse.Namespace(store=str(store.root), run="next")
    assert train_cmd.train_command(args) == trainer.EXIT_OK  # nothing queued: nothing to do
    assert "no queued run" in capsys.readouterr().err

    job = write_job(tmp_path, Path("unused"), name="queued", validation=None)
    doc = yaml.safe_load(job.read_text())
    doc["base_model"] = "example-org/not-cached-model"  # fails at model loading, after the claim
    job.write_text(yaml.safe_dump(doc))
    run_id = trainer.prepare_run(store, job)
    store.enqueue_run(run_id)
    assert train_cmd.train_command(argparse.Namespace(store=str(store.root), run="next")) == trainer.EXIT_FAILED
    assert (store.claims_dir / run_id).read_text().strip() == "trainer-job-abc12"
    assert not (store.queue_dir / run_id).exists()
    status = store.read_status(run_id)
    assert status["phase"] == "failed" and "example-org/not-cached-model" in status["error"]
