"""Run spec loading: defaults, relative paths, errors naming file + dotted key, overrides, fingerprint."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from lorastack.cli import build_parser
from lorastack.spec import SpecError, load_spec, parse_duration, spec_overrides_from_args

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "jobs" / "examples" / "plant-care.yaml"


def write_spec(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "train.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "data" / "valid.jsonl").write_text('{"messages": []}\n')
    path = tmp_path / name
    path.write_text(body)
    return path


MINIMAL = "name: demo\nbase_model: some/model\ntraining_file: data/train.jsonl\n"


def test_example_spec_loads_with_resolved_paths():
    spec = load_spec(EXAMPLE)
    assert spec.name == "plant-care"
    assert spec.training_file == (EXAMPLE.parent / "plant-care-train.jsonl").resolve()
    assert spec.validation_file is not None and spec.validation_file.is_file()
    assert spec.time_budget == 45 * 60
    assert spec.spec_path == EXAMPLE.resolve()


def test_defaults(tmp_path):
    spec = load_spec(write_spec(tmp_path, MINIMAL))
    assert spec.base_revision == "main"
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.target_modules) == (
        16,
        32,
        0.05,
        "all-linear",
    )
    q = spec.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "auto")
    t = spec.training
    assert t.max_steps == -1 and t.learning_rate == 2e-4 and t.packing and t.gradient_checkpointing
    assert t.save_every_minutes == 10 and t.save_total_limit == 2
    assert spec.max_seq_len == 2048 and spec.merge_16bit is False and spec.time_budget is None
    assert spec.validation_file is None


def problems(tmp_path, body, overrides=None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, body), overrides)
    return info.value.problems


def test_error_names_file_key_and_what_is_allowed(tmp_path):
    got = problems(tmp_path, MINIMAL + "lora:\n  r: abc\n")
    assert got == [f"{tmp_path / 'job.yaml'}: lora.r: must be a positive integer, got 'abc'"]


def test_unknown_keys_suggest_the_right_one(tmp_path):
    got = problems(tmp_path, MINIMAL + "trainng:\n  epochs: 2\nlora:\n  rank: 8\n")
    assert any(p.endswith("trainng: unknown key (did you mean 'training'?)") for p in got)
    assert any("lora.rank: unknown key" in p for p in got)


def test_all_problems_reported_at_once(tmp_path):
    body = (
        "name: Bad Name\nbase_model: m\ntraining_file: data/train.jsonl\n"
        "training:\n  packing: maybe\n  learning_rate: -1\nquantization:\n  quant_type: nf8\n"
    )
    got = problems(tmp_path, body)
    keys = sorted(p.split(": ")[1] for p in got)
    assert keys == ["name", "quantization.quant_type", "training.learning_rate", "training.packing"]
    assert any("one of 'nf4' or 'fp4'" in p for p in got)


def test_missing_required_and_missing_file(tmp_path):
    got = problems(tmp_path, "name: demo\n")
    assert sorted(p.split(": ")[1] for p in got) == ["base_model", "training_file"]
    got = problems(tmp_path, MINIMAL + "validation_file: data/nope.jsonl\n")
    assert len(got) == 1 and "validation_file: file not found" in got[0] and "nope.jsonl" in got[0]


def test_invalid_yaml_names_line(tmp_path):
    got = problems(tmp_path, MINIMAL + "lora: [unclosed\n")
    assert "invalid YAML" in got[0] and "line" in got[0]
    got = problems(tmp_path, "- just\n- a list\n")
    assert "must be a mapping" in got[0]


def test_time_budget_parsing():
    assert parse_duration("45m") == 2700
    assert parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration(600) == 600
    assert parse_duration("1.5h") == 5400
    for bad in ("soon", "", "-5m", 0, True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_cli_overrides(tmp_path):
    args = build_parser().parse_args(
        [
            "finetune",
            "job.yaml",
            "--set",
            "lora.r=32",
            "--set",
            "training.packing=false",
            "--set",
            "lora.target_modules=[q_proj, v_proj]",
            "--max-steps",
            "7",
            "--epochs",
            "1.5",
            "--time-budget",
            "30m",
            "--base-model",
            "other/model",
        ]
    )
    ov = spec_overrides_from_args(args)
    assert ov == {
        "lora": {"r": 32, "target_modules": ["q_proj", "v_proj"]},
        "training": {"packing": False, "max_steps": 7, "epochs": 1.5},
        "time_budget": "30m",
        "base_model": "other/model",
    }
    spec = load_spec(write_spec(tmp_path, MINIMAL), ov)
    assert spec.lora.r == 32 and spec.training.packing is False and spec.training.max_steps == 7
    assert spec.time_budget == 1800 and spec.base_model == "other/model"


def test_bad_override_is_attributed_to_command_line(tmp_path):
    got = problems(tmp_path, MINIMAL, {"lora.r": "abc"})
    assert got[0].endswith("lora.r: must be a positive integer, got 'abc' (set on the command line)")
    with pytest.raises(SpecError, match="KEY=VALUE"):
        spec_overrides_from_args(argparse.Namespace(set=["lora.r"]))


def test_resolved_dict_round_trips(tmp_path):
    spec = load_spec(EXAMPLE)
    out = tmp_path / "run" / "spec.yaml"
    out.parent.mkdir()
    out.write_text(spec.to_yaml())
    again = load_spec(out)
    assert again.resolved_dict() == spec.resolved_dict()
    assert again.fingerprint() == spec.fingerprint()
    assert yaml.safe_load(out.read_text())["time_budget"] == 2700


def test_fingerprint_tracks_training_inputs_only(tmp_path):
    path = write_spec(tmp_path, MINIMAL + "time_budget: 1h\n")
    base = load_spec(path).fingerprint()
    assert len(base) == 64 and load_spec(path).fingerprint() == base  # stable
    # Operational options do not change it (a retried job with a longer budget resumes the run) ...
    assert load_spec(path, {"time_budget": "3h", "training.logging_steps": 1}).fingerprint() == base
    # ... but hyperparameters, the base model and the data do.
    assert load_spec(path, {"lora.r": 8}).fingerprint() != base
    assert load_spec(path, {"base_revision": "abc123"}).fingerprint() != base
    (tmp_path / "data" / "train.jsonl").write_text('{"messages": [1]}\n')
    assert load_spec(path).fingerprint() != base
    # Moving the data (same content) keeps it.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "t.jsonl").write_text('{"messages": [1]}\n')
    moved = load_spec(path, {"training_file": "elsewhere/t.jsonl"}).fingerprint()
    assert moved == load_spec(path).fingerprint()


def test_run_id_is_a_valid_store_name(tmp_path):
    from lorastack.store import check_name

    spec = load_spec(write_spec(tmp_path, MINIMAL))
    assert check_name(spec.run_id(), "run id").startswith("demo-")


@pytest.mark.parametrize("job", sorted((REPO / "jobs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_job_spec_loads(job):
    spec = load_spec(job)
    assert spec.data_files()["training"].is_file()
