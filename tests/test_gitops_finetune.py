"""The fine-tune workflow's logic (ci/finetune.py): which specs a change touches (changed spec, changed data ->
the spec that uses it), the offline PR summary (real spec loader and data checks, tokens, GPU time and cost from the
price table), the target stack, which version a run published, the eval table and the promotion verdict."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from gitops_helpers import REPO, repo_copy, workflow

from ci import finetune as ft

CONFIG = {"default_stack": "dev", "validate_only": ["jobs/examples/**"], "stacks": {"jobs/vision/**": "vision"}}
PRICES = ft.load_yaml(ft.PRICES_FILE)


@pytest.fixture
def repo(tmp_path):
    """The repo's stacks and jobs, plus a team spec in jobs/vision/ whose data lives in jobs/data/."""
    root = repo_copy(tmp_path)
    (root / "jobs" / "data").mkdir()
    for name in ("plant-care-train.jsonl", "plant-care-validation.jsonl"):
        shutil.copy2(REPO / "jobs" / "examples" / name, root / "jobs" / "data" / name)
    (root / "jobs" / "vision").mkdir()
    spec = (REPO / "jobs" / "examples" / "plant-care-small.yaml").read_text()
    spec = spec.replace("name: plant-care-small", "name: vision-helper")
    spec = spec.replace("training_file: plant-care-train.jsonl", "training_file: ../data/plant-care-train.jsonl")
    spec = spec.replace("validation_file: plant-care-validation.jsonl",
                        "validation_file: ../data/plant-care-validation.jsonl")
    (root / "jobs" / "vision" / "helper.yaml").write_text(spec)
    return root


def test_a_changed_spec_is_chosen(repo):
    assert ft.select_specs(["jobs/vision/helper.yaml", "README.md"], repo, config=CONFIG) == ["jobs/vision/helper.yaml"]


def test_changed_data_chooses_every_spec_that_uses_it(repo):
    got = ft.select_specs(["jobs/data/plant-care-validation.jsonl"], repo, config=CONFIG)
    assert got == ["jobs/vision/helper.yaml"]
    got = ft.select_specs(["jobs/examples/plant-care-train.jsonl"], repo, config=CONFIG)
    assert got == ["jobs/examples/plant-care-small.yaml", "jobs/examples/plant-care.yaml"]


def test_unrelated_and_deleted_files_choose_nothing(repo):
    assert ft.select_specs(["src/lorastack/cli.py", "jobs/README.md", "jobs/gone.yaml"], repo, config=CONFIG) == []
    (repo / "jobs" / "notes.yaml").write_text("just: notes\n")
    assert ft.select_specs(["jobs/notes.yaml"], repo, config=CONFIG) == [], "a YAML without training_file is no spec"


def test_merge_leaves_out_the_examples(repo):
    changed = ["jobs/examples/plant-care.yaml", "jobs/vision/helper.yaml"]
    assert ft.select_specs(changed, repo, config=CONFIG) == ["jobs/examples/plant-care.yaml", "jobs/vision/helper.yaml"]
    assert ft.select_specs(changed, repo, merge=True, config=CONFIG) == ["jobs/vision/helper.yaml"]


def test_referenced_data_is_not_looked_for_in_git(repo):
    spec = repo / "jobs" / "vision" / "big.yaml"
    spec.write_text("name: big\nbase_model: m\ntraining_file: share://datasets/" + "c" * 64 + ".jsonl\n")
    assert ft.spec_data_paths("jobs/vision/big.yaml", yaml.safe_load(spec.read_text())) == []
    s = ft.summarize_spec("jobs/vision/big.yaml", repo, repo / "stacks", PRICES, CONFIG)
    assert s.ok and "validated by the training job" in "\n".join(s.lines)
    assert "stack `vision`" in s.lines[0]


def test_target_stack_glob_default_and_errors(repo):
    t = ft.target_of("jobs/vision/helper.yaml", {"name": "h"}, repo / "stacks", CONFIG)
    assert (t.stack, t.gpu_profile, t.promote) == ("vision", "Consumption-GPU-NC24-A100", "if_better")
    t = ft.target_of("jobs/x.yaml", {"name": "x", "promote": "never"}, repo / "stacks", CONFIG)
    assert (t.stack, t.promote) == ("dev", "never")
    assert ft.matrix_entry(t)["environment"] == "stack-dev"
    with pytest.raises(ft.FinetuneError, match="target stack 'nope' has no stacks/Pulumi.nope.yaml"):
        ft.target_of("jobs/x.yaml", {"name": "x", "stack": "nope"}, repo / "stacks", CONFIG)
    with pytest.raises(ft.FinetuneError, match="promote: must be one of always, if_better, never"):
        ft.target_of("jobs/x.yaml", {"name": "x", "promote": "sometimes"}, repo / "stacks", CONFIG)


def test_summary_of_a_valid_spec_counts_examples_tokens_and_estimates_cost(repo):
    s = ft.summarize_spec("jobs/vision/helper.yaml", repo, repo / "stacks", PRICES, CONFIG)
    text = "\n".join(s.lines)
    assert s.ok, s.problems
    assert "adapter `vision-helper` on `HuggingFaceTB/SmolLM2-135M-Instruct`" in text and "stack `vision`" in text
    assert "training data `jobs/data/plant-care-train.jsonl`: 30 examples (30 trainable)" in text
    assert "estimate on `Consumption-GPU-NC24-A100` (A100 80GB)" in text and "USD" in text
    md = ft.summary_markdown([s], PRICES)
    assert md.startswith("## Fine-tune plan") and "✅" in md and PRICES["checked"] in md


def test_summary_reports_spec_and_data_errors_with_file_and_line(repo):
    spec = repo / "jobs" / "vision" / "helper.yaml"
    spec.write_text(spec.read_text().replace("lora:\n", "lora:\n  rank: 8\n"))
    s = ft.summarize_spec("jobs/vision/helper.yaml", repo, repo / "stacks", PRICES, CONFIG)
    assert not s.ok and any("lora.rank" in p for p in s.problems), s.problems
    spec.write_text(spec.read_text().replace("  rank: 8\n", ""))
    data = repo / "jobs" / "data" / "plant-care-train.jsonl"
    data.write_text(data.read_text() + "{not json\n")
    s = ft.summarize_spec("jobs/vision/helper.yaml", repo, repo / "stacks", PRICES, CONFIG)
    assert not s.ok and any("plant-care-train.jsonl:31" in p for p in s.problems), s.problems
    assert "❌" in ft.summary_markdown([s], PRICES)


def test_cost_model_and_time_budget_cap():
    # 1M tokens x 2 epochs x 6 x 1e9 FLOPs at 312 TFLOPS x 30 % = 128 s, plus 6 min start-up
    est = ft.estimate_cost(1_000_000, 2, -1, 0, 1e9, "Consumption-GPU-NC24-A100", PRICES)
    seconds = 2e6 * 6e9 / (312e12 * PRICES["mfu"]) + PRICES["startup_minutes"] * 60
    assert est.trained_tokens == 2_000_000
    assert est.gpu_hours == pytest.approx(seconds / 3600)
    assert est.cost == pytest.approx(seconds / 3600 * 3.67)
    capped = ft.estimate_cost(10**9, 3, -1, 0, 8e9, "Consumption-GPU-NC8as-T4", PRICES, time_budget_s=3600)
    assert capped.capped_by_budget and capped.gpu_hours == 1 and capped.cost == pytest.approx(0.752)
    steps = ft.estimate_cost(10**9, 3, 10, 4096, 1e9, "NC24-A100", PRICES)
    assert steps.trained_tokens == 40960, "max_steps bounds the tokens, not epochs"
    with pytest.raises(ft.FinetuneError, match="no row in ci/gpu_prices.yaml"):
        ft.estimate_cost(1, 1, -1, 0, 1e9, "Consumption-GPU-H100", PRICES)


def test_parameter_count_from_table_or_name():
    assert ft.parameter_count("microsoft/Phi-3-mini-4k-instruct", PRICES) == 3.72e9
    assert ft.parameter_count("HuggingFaceTB/SmolLM2-135M-Instruct", PRICES) == 135e6
    assert ft.parameter_count("meta-llama/Meta-Llama-3.1-8B-Instruct", PRICES) == 8e9
    assert ft.parameter_count("org/mystery-model", PRICES) is None


@pytest.mark.parametrize("before, after", [
    ({"latest": "v1", "versions": ["v1"]}, {"latest": "v1", "versions": ["v1", "v2"]}),
    ({"adapters": [{"name": "a", "latest": "v1", "versions": [{"version": "v1"}]}]},
     {"adapters": [{"name": "a", "latest": "v2", "versions": [{"version": "v1"}, {"version": "v2"}]}]}),
    ([{"version": "a@v1", "latest": True}], [{"version": "a@v1"}, {"version": "a@v2", "latest": True}]),
])
def test_which_version_the_run_published(before, after):
    assert ft.new_version(before, after, "a") == ("a@v2", "a@v1")


def test_first_version_has_no_previous_and_no_new_version_is_an_error():
    assert ft.new_version({}, {"versions": ["v1"]}, "a") == ("a@v1", None)
    with pytest.raises(ft.FinetuneError, match="published no new version of a"):
        ft.new_version({"versions": ["v1"]}, {"versions": ["v1"]}, "a")


def _eval(adapter, against, ours, theirs):
    metrics = {"loss": 0, "perplexity": 0, "token_accuracy": 0.5, "chrf": 40.0, "examples": 10, "tokens": 900}
    return {"adapter": adapter, "against": against, "data": [], "created_at": "2026-12-01T00:00:00Z",
            "metrics": {against: {**metrics, "loss": theirs, "perplexity": 2.0},
                        adapter: {**metrics, "loss": ours, "perplexity": 1.5}},
            "samples": [{"prompt": [{"role": "user", "content": "Water my fern?"}], "reference": "Weekly.",
                         against: "Maybe.", adapter: "Weekly, when dry."}]}


def test_promotion_rules():
    vs_base = _eval("a@v2", "base", 1.0, 2.0)
    vs_latest = _eval("a@v2", "a@v1", 1.0, 0.9)
    assert ft.decide("always", "a@v2", vs_base, vs_latest)[0] is True
    assert ft.decide("never", "a@v2", vs_base, None)[0] is False
    ok, reason = ft.decide("if_better", "a@v2", vs_base, vs_latest)
    assert not ok and "a@v1 stays LATEST" in reason, "if_better compares with the previous LATEST"
    assert ft.decide("if_better", "a@v2", vs_base, None)[0] is True, "no LATEST yet: compared with the base"
    with pytest.raises(ft.FinetuneError, match="no loss"):
        ft.decide("if_better", "a@v2", {"against": "base", "metrics": {}}, None)


def test_eval_report_table_has_base_previous_and_new(tmp_path):
    vs_base, vs_latest = _eval("a@v2", "base", 1.0, 2.0), _eval("a@v2", "a@v1", 1.0, 1.2)
    (tmp_path / "b.json").write_text(json.dumps(vs_base))
    (tmp_path / "l.json").write_text(json.dumps(vs_latest))
    summary, out = tmp_path / "summary.md", tmp_path / "out"
    args = ["--github-output", str(out), "report", "--adapter", "a@v2", "--vs-base", str(tmp_path / "b.json"),
            "--vs-latest", str(tmp_path / "l.json"), "--out", str(summary)]
    assert ft.main(args) == 0
    md = summary.read_text()
    assert "| metric | `base` | `a@v1` | `a@v2` |" in md
    assert "| loss | 2.0000 | 1.2000 | 1.0000 |" in md
    assert "**Promoted**: if_better: eval loss 1.0000 < 1.2000 (a@v1)" in md
    assert "Water my fern?" in md
    assert out.read_text().endswith("promote=true\n")


def test_cli_select_with_targets_for_the_merge_matrix(repo, tmp_path):
    changed = tmp_path / "changed.txt"
    changed.write_text("jobs/data/plant-care-train.jsonl\n")
    out = tmp_path / "out"
    assert ft.main(["--repo", str(repo), "--github-output", str(out), "select", "--changed", str(changed),
                    "--merge", "--with-targets"]) == 0
    pairs = dict(line.split("=", 1) for line in out.read_text().splitlines())
    # the repo's own ci/finetune.yaml: examples are validate-only, everything else goes to dev
    assert json.loads(pairs["specs"]) == [{"spec": "jobs/vision/helper.yaml", "adapter": "vision-helper",
                                           "stack": "dev", "promote": "if_better", "environment": "stack-dev"}]


def test_cli_summary_exits_1_on_an_invalid_spec(repo, tmp_path):
    (repo / "jobs" / "vision" / "bad.yaml").write_text("name: Bad Name\ntraining_file: nope.jsonl\n")
    out = tmp_path / "s.md"
    rc = ft.main(["--repo", str(repo), "summary", "jobs/vision/helper.yaml", "jobs/vision/bad.yaml", "--out", str(out)])
    assert rc == 1 and "❌" in out.read_text() and "✅" in out.read_text()


def test_finetune_workflow_uses_the_scripts_and_the_contract_commands():
    jobs = workflow("finetune.yml")["jobs"]
    text = (REPO / ".github" / "workflows" / "finetune.yml").read_text()
    assert jobs["train"]["environment"] == "${{ matrix.environment }}"
    assert jobs["train"]["strategy"]["fail-fast"] is False
    for command in ('lorastack finetune "$SPEC" --outputs "$OUTPUTS" --wait', "lorastack eval", "--against base",
                    'lorastack adapters promote "$NEW"', "python -m ci.finetune report", "$GITHUB_STEP_SUMMARY"):
        assert command in text, command
    assert "gh pr comment" in text and "python -m ci.finetune summary" in text


def test_summary_counts_tokens_with_the_base_models_tokenizer(repo, tiny_llama):
    """`summary --tokenizer`: the base model's own tokenizer and chat template count the tokens, no estimate."""
    spec = repo / "jobs" / "vision" / "helper.yaml"
    spec.write_text(spec.read_text().replace("base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
                                             f"base_model: {tiny_llama}"))
    tokenizer = ft._load_tokenizer(spec)
    s = ft.summarize_spec("jobs/vision/helper.yaml", repo, repo / "stacks", PRICES, CONFIG, tokenizer=tokenizer)
    text = "\n".join(s.lines)
    assert s.ok, s.problems
    assert "≈" not in text
    from lorastack.data import validate_file

    exact = validate_file(repo / "jobs" / "data" / "plant-care-train.jsonl", tokenizer, 512, "train").tokens.total
    assert f"30 examples (30 trainable), {exact:,} tokens," in text
    assert "unknown size" in text, "a local model directory has no size in its name: the summary says so"
