"""The trainer's fast-path defaults: ``train_defaults.choose`` (a pure function of the device and the model) and
``trainer.choose_fast_path`` (the spec's "auto" settings resolved once per run, explicit ones kept, a resumed
run keeping its checkpoint's choices). End-to-end runs that record them are in tests/test_trainer.py."""

from __future__ import annotations

import pytest

from lorastack.spec import RunSpec
from lorastack.train_defaults import Device, choose

PHI3 = {"params": 3_821_000_000, "hidden": 3072, "layers": 32, "vocab": 32064}
TINY = {"params": 20_000_000, "hidden": 256, "layers": 4, "vocab": 512}
A100 = Device("cuda", 80 << 30, bf16=True, name="A100", fp16=True)
T4 = Device("cuda", 16 << 30, bf16=False, name="T4", fp16=True)
BF16_CPU = Device("cpu", 24 << 30, bf16=True)
OLD_CPU = Device("cpu", 24 << 30, bf16=False)


@pytest.mark.parametrize(
    ("case", "device", "shape", "kw", "dtype", "checkpointing", "row", "batch_rows"),
    [
        ("A100: bf16, activations fit, full rows", A100, PHI3, {"max_seq_len": 2048}, "bfloat16", False, 2048, 1),
        ("T4: fp16, 16 GiB cannot hold the activations", T4, PHI3, {"max_seq_len": 4096, "micro_batch": 4},
         "float16", True, 4096, 4),
        ("bf16 CPU, 4-bit base: bf16", BF16_CPU, TINY, {"max_seq_len": 1024}, "bfloat16", False, 256, 4),
        ("bf16 CPU, 16-bit base: bf16", BF16_CPU, TINY, {"max_seq_len": 1024, "quantized": False},
         "bfloat16", False, 256, 4),
        ("CPU without bf16, 16-bit base: fp32", OLD_CPU, TINY, {"max_seq_len": 1024, "quantized": False},
         "float32", False, 256, 4),
        ("CPU row never longer than max_seq_len", OLD_CPU, TINY, {"max_seq_len": 128}, "float32", False, 128, 1),
        ("CPU row never shorter than the longest example", BF16_CPU, TINY,
         {"max_seq_len": 1024, "longest_example": 300, "micro_batch": 2}, "bfloat16", False, 300, 6),
    ],
)
def test_choose_picks_dtype_checkpointing_and_rows_from_the_device(
    case, device, shape, kw, dtype, checkpointing, row, batch_rows
):
    d = choose(device, **shape, **kw)
    assert (d.compute_dtype, d.gradient_checkpointing, d.row_len, d.batch_rows) == (
        dtype, checkpointing, row, batch_rows), case
    assert d.packing and d.padding_free == (device.kind == "cuda")
    assert d.reasons and any(dtype.replace("bfloat", "bf").replace("float", "fp") in r for r in d.reasons)
    if checkpointing:
        assert any("would not fit" in r for r in d.reasons)


def test_micro_batches_scale_with_the_rank_count_so_data_parallel_keeps_the_global_batch():
    one = choose(BF16_CPU, **TINY, max_seq_len=512, micro_batch=4, longest_example=280)
    two = choose(BF16_CPU, **TINY, max_seq_len=512, micro_batch=2, longest_example=280)
    assert one.row_len == two.row_len == 280 and one.batch_rows == 2 * two.batch_rows


def _spec(**training) -> RunSpec:
    return RunSpec.model_validate({"name": "x", "base_model": "m", "training_file": "t.jsonl", "max_seq_len": 512,
                                   "training": {"per_device_batch_size": 4, **training}})


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from transformers import AutoConfig

    from lorastack.tinymodel import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("cfg") / "m", hidden_size=64, num_layers=2)
    return AutoConfig.from_pretrained(path)


def test_shape_of_config_counts_every_parameter_without_loading_weights(tiny_config):
    from transformers import AutoModelForCausalLM

    from lorastack.train_defaults import shape_of_config

    shape = shape_of_config(tiny_config)
    real = AutoModelForCausalLM.from_config(tiny_config)
    assert shape == {"params": sum(p.numel() for p in real.parameters()), "hidden": 64, "layers": 2,
                     "vocab": tiny_config.vocab_size}


def test_auto_settings_resolve_once_and_the_record_says_why(tiny_config, monkeypatch):
    from lorastack import train_defaults, trainer

    monkeypatch.setattr(train_defaults, "detect", lambda: BF16_CPU)  # the device, as detect() would report it
    spec, record = trainer.choose_fast_path(_spec(), tiny_config, longest_example=120)
    t = spec.training
    assert (t.packing, t.row_len, t.gradient_checkpointing, t.per_device_batch_size) == (True, 256, False, 8)
    assert spec.quantization.compute_dtype == "bfloat16" and record["resumed"] is False
    line = trainer.describe_fast_path(record)
    assert line.startswith("fast path: bfloat16, packing on, 8 rows of 256 tokens per micro-batch, gradient "
                           "checkpointing off") and "bf16: the CPU computes in bf16" in line


def test_explicit_settings_win_over_the_device(tiny_config, monkeypatch):
    from lorastack import train_defaults, trainer

    monkeypatch.setattr(train_defaults, "detect", lambda: BF16_CPU)
    spec, record = trainer.choose_fast_path(_spec(gradient_checkpointing=True, row_len=512), tiny_config, 120)
    assert spec.training.gradient_checkpointing is True and spec.training.row_len == 512
    assert spec.training.per_device_batch_size == 4  # rows of max_seq_len: the batch is as written
    assert record["reasons"][0] == "set in the spec: row_len, gradient_checkpointing"
    off, _ = trainer.choose_fast_path(_spec(packing=False), tiny_config, 120)
    assert off.training.packing is False and off.training.per_device_batch_size == 4 and off.training.row_len == 512


def test_a_resumed_run_keeps_its_checkpoints_choices_on_another_device(tiny_config, monkeypatch):
    from lorastack import train_defaults, trainer

    monkeypatch.setattr(train_defaults, "detect", lambda: A100)  # rescheduled onto a GPU
    prior = {"compute_dtype": "float32", "packing": True, "row_len": 256, "gradient_checkpointing": False,
             "batch_rows": 8, "reasons": ["rows of 256 tokens on CPU"]}
    spec, record = trainer.choose_fast_path(_spec(), tiny_config, 120, prior=prior)
    assert (spec.training.row_len, spec.training.per_device_batch_size, spec.quantization.compute_dtype) == (
        256, 8, "float32")
    assert record["resumed"] is True and "kept from the checkpoint" in trainer.describe_fast_path(record)
    # A checkpoint written before the choice was recorded resumes with what "auto" meant then.
    legacy, _ = trainer.choose_fast_path(_spec(), tiny_config, 120, prior=trainer.LEGACY_FAST_PATH)
    assert (legacy.training.row_len, legacy.training.gradient_checkpointing) == (512, True)


def test_build_sft_trainer_refuses_a_spec_with_unresolved_auto_settings():
    from lorastack.trainer import build_sft_trainer

    with pytest.raises(ValueError, match="still 'auto': resolve with choose_fast_path"):
        build_sft_trainer(_spec(), None, None, [], None, None)
