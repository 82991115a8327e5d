"""lorastack.evaluate: scoring with the training masks, adapter on/off on one model, chrF, stop between batches.

The models are the tiny real ones from conftest, wrapped in real peft adapters; nothing is stubbed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorastack import evaluate
from lorastack.cli import main

REPO = Path(__file__).resolve().parents[1]
PLANT_VAL = REPO / "jobs" / "examples" / "plant-care-validation.jsonl"


@pytest.fixture(scope="module")
def peft_model(tiny_llama):
    """The tiny base with a LoRA adapter whose weights were nudged (so adapter on and off differ)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
                           adapter_name="candidate")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return model, tok


def test_scores_use_the_training_masks_and_the_adapter_switches_off_for_the_base(peft_model):
    from lorastack import trainer

    model, tok = peft_model
    conversations = evaluate.read_conversations(PLANT_VAL)
    rows = evaluate.encode_rows(tok, conversations, 512)
    # Exactly the rows the trainer builds for the same file.
    assert rows == trainer.encode_file(PLANT_VAL, tok, 512).rows
    trained = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    with evaluate.as_model(model, evaluate.BASE):
        base = evaluate.score_rows(model, rows, tok.pad_token_id, batch_size=3)
    with evaluate.as_model(model, "candidate"):
        tuned = evaluate.score_rows(model, rows, tok.pad_token_id, batch_size=3)
    assert base["tokens"] == tuned["tokens"] == trained  # assistant tokens only, the same for both
    assert base["examples"] == 10
    assert base["loss"] != tuned["loss"]
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-3)
    assert 0 <= base["token_accuracy"] <= 1
    # Batching does not change the figures (padding is masked).
    with evaluate.as_model(model, evaluate.BASE):
        one_by_one = evaluate.score_rows(model, rows, tok.pad_token_id, batch_size=1)
    assert one_by_one["loss"] == pytest.approx(base["loss"], abs=1e-4)


def test_a_stop_request_is_answered_before_the_next_batch(peft_model):
    model, tok = peft_model
    rows = evaluate.encode_rows(tok, evaluate.read_conversations(PLANT_VAL), 512)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 1  # the signal arrives during the first batch

    with pytest.raises(evaluate.ScoringInterrupted):
        evaluate.score_rows(model, rows, tok.pad_token_id, batch_size=2, should_stop=stop)
    assert len(asked) == 2  # one batch was scored, the second never started


def test_samples_are_the_held_out_prompts_with_their_reference_answers():
    conversations = [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
         {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "skip me", "weight": 0}],
        [{"role": "user", "content": "just a prompt"}],
    ]
    samples = evaluate.samples_from(conversations)
    assert samples[0].reference == "A2" and samples[0].prompt[-1] == {"role": "user", "content": "Q2"}
    assert len(samples[0].prompt) == 4  # history kept, the answer itself left out
    assert [s.reference for s in samples] == ["A2", ""]  # weight-0 answers are no reference; bare prompts are
    assert len(evaluate.samples_from(conversations, limit=1)) == 1


def test_chrf_rewards_the_reference_and_needs_one():
    assert evaluate.text_metric(["water it weekly"], ["water it weekly"]) == pytest.approx(100.0)
    close = evaluate.text_metric(["water it every week"], ["water it weekly"])
    far = evaluate.text_metric(["the capital of France"], ["water it weekly"])
    assert 0 <= far < close < 100
    assert evaluate.text_metric(["anything"], [""]) is None


def test_generations_stop_at_the_end_of_turn(peft_model):
    model, tok = peft_model
    samples = evaluate.samples_from(evaluate.read_conversations(PLANT_VAL), limit=2)
    with evaluate.as_model(model, evaluate.BASE):
        answers = evaluate.generate_answers(model, tok, samples, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert all("<|eot_id|>" not in a for a in answers)


def test_eval_command_checks_local_inputs_before_loading_anything(store, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["eval", "plants", "--data", str(missing), "--store", str(store.root)]) == 1
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert main(["eval", "plants", "--store", str(store.root)]) == 1
    assert "not in the store" in capsys.readouterr().err


def test_eval_needs_data_when_the_run_had_no_validation(store, tmp_path, capsys):
    src = tmp_path / "a"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    store.publish_adapter("plants", src, {"run_id": "plants-1", "base_model": "tiny", "dataset_sha256": {}})
    assert main(["eval", "plants", "--store", str(store.root)]) == 1
    assert "pass --data FILE" in capsys.readouterr().err


def test_versions_on_different_bases_are_not_compared(store, tmp_path, capsys):
    src = tmp_path / "a"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    store.publish_adapter("plants", src, {"run_id": "plants-1", "base_model": "org/one"})
    store.publish_adapter("plants", src, {"run_id": "plants-2", "base_model": "org/two"})
    assert main(["eval", "plants@v2", "--against", "plants@v1", "--data", str(PLANT_VAL),
                 "--store", str(store.root)]) == 1
    assert "different bases" in capsys.readouterr().err


def test_the_table_shows_both_models_and_the_samples_side_by_side():
    result = {
        "adapter": "plants@v2", "against": "base", "data": [{"path": "/x/val.jsonl", "sha256": "ab"}],
        "metrics": {
            "base": {"loss": 2.0, "perplexity": 7.39, "token_accuracy": 0.1, "chrf": 10.0, "examples": 3, "tokens": 50},
            "plants@v2": {"loss": 1.5, "perplexity": 4.48, "token_accuracy": 0.3, "chrf": 30.0, "examples": 3,
                          "tokens": 50},
        },
        "samples": [{"prompt": [{"role": "user", "content": "Water?"}], "reference": "Weekly.", "base": "No idea",
                     "plants@v2": "Weekly."}],
    }
    text = evaluate.format_result(result)
    assert "plants@v2 against base on /x/val.jsonl" in text
    assert "lower (better)" in text and "reference: Weekly." in text and "base: No idea" in text
    json.dumps(result)  # the --json form is the same document
