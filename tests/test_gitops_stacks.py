"""Stack ordering and environments (ci/stacks.py) and the infrastructure workflow built on them: deploy waves dev ->
staging -> (teams | prod), team stacks isolated, per-stack preview environments, upsert, dispatch from main only,
and a new team stack from `lorastack stack new` previewing green on its first PR (dry run of the workflow's logic)."""

from __future__ import annotations

import json

import pytest
from gitops_helpers import REPO, lorastack, repo_copy, workflow

from ci import stacks


def _stack_file(d, name, tier):
    (d / f"Pulumi.{name}.yaml").write_text(f"config:\n  lorastack:tier: {tier}\n", encoding="utf-8")


def test_repo_stacks_deploy_dev_then_staging_then_teams_and_prod():
    got = stacks.load_stacks(REPO / "stacks", org="acme")
    assert [s.stack for s in got] == ["platform", "dev", "staging", "vision", "prod"]
    assert [s.wave for s in got] == ["platform", "dev", "staging", "teams", "prod"]
    vision = got[3]
    # stacks/pipeline.yaml (written by `lorastack stack new`) names the Pulumi stack; --org is the fallback
    assert (vision.environment, vision.preview, vision.pulumi_stack) == (
        "stack-vision", "preview-vision", "lorastack/lorastack/vision")


def test_wave_comes_from_the_tier_not_the_name(tmp_path):
    """A stack named `prod-eu` with tier prod deploys with prod; a team called `dev-tools` with the teams."""
    for name, tier in [("prod-eu", "prod"), ("dev-tools", "team"), ("zeta", "team"), ("dev", "dev"),
                       ("qa", "staging"), ("prod", "prod")]:
        _stack_file(tmp_path, name, tier)
    (tmp_path / "guardrails.yaml").write_text("selfService: {}\n")
    (tmp_path / "team.template.yaml").write_text("config: {}\n")
    waves = stacks.waves(stacks.load_stacks(tmp_path))
    assert [e["stack"] for e in waves["dev"]] == ["dev"]
    assert [e["stack"] for e in waves["staging"]] == ["qa"]
    assert [e["stack"] for e in waves["teams"]] == ["dev-tools", "zeta"]
    assert [e["stack"] for e in waves["prod"]] == ["prod", "prod-eu"]


def test_a_stack_without_a_known_tier_is_an_error_naming_the_file(tmp_path):
    _stack_file(tmp_path, "odd", "sandbox")
    with pytest.raises(stacks.StackError, match=r"Pulumi\.odd\.yaml: config\.lorastack:tier is 'sandbox'"):
        stacks.load_stacks(tmp_path)


@pytest.mark.parametrize("wrapped", [True, False])
def test_pipeline_metadata_names_the_environments(tmp_path, wrapped):
    """`lorastack stack new` may record a stack's environments and Pulumi stack in stacks/pipeline.yaml."""
    _stack_file(tmp_path, "ml", "team")
    _stack_file(tmp_path, "dev", "dev")
    entry = {"environment": "deploy-ml", "previewEnvironment": "pr-ml", "pulumiStack": "platform/lorastack/ml"}
    doc = {"stacks": {"ml": entry}} if wrapped else {"ml": entry}
    (tmp_path / "pipeline.yaml").write_text(json.dumps(doc))
    ml = {s.stack: s for s in stacks.load_stacks(tmp_path, org="acme")}["ml"]
    assert (ml.environment, ml.preview, ml.pulumi_stack) == ("deploy-ml", "pr-ml", "platform/lorastack/ml")
    dev = {s.stack: s for s in stacks.load_stacks(tmp_path, org="acme")}["dev"]
    assert (dev.environment, dev.preview) == ("stack-dev", "preview-dev"), "no metadata: the contract's names"


def test_dispatch_of_one_stack_keeps_only_that_stack_and_refuses_unknown_ones():
    all_stacks = stacks.load_stacks(REPO / "stacks")
    out = stacks.github_outputs(all_stacks, only="vision")
    assert json.loads(out["teams"])[0]["stack"] == "vision"
    assert out["dev"] == out["staging"] == out["prod"] == "[]", "the workflow skips a wave whose list is []"
    assert out["count"] == "1"
    with pytest.raises(stacks.StackError, match="no stack named 'nope'"):
        stacks.github_outputs(all_stacks, only="nope")


def test_cli_appends_the_waves_to_github_output(tmp_path, capsys):
    out_file = tmp_path / "out"
    assert stacks.main(["matrix", "--stacks-dir", str(REPO / "stacks"), "--github-output", str(out_file)]) == 0
    pairs = dict(line.split("=", 1) for line in out_file.read_text().splitlines())
    assert set(pairs) == {"platform", "dev", "staging", "teams", "prod", "all", "count"}
    assert [e["stack"] for e in json.loads(pairs["all"])] == ["platform", "dev", "staging", "vision", "prod"]
    assert stacks.main(["matrix", "--stacks-dir", str(REPO / "stacks"), "--only", "nope"]) == 1
    assert "no stack named 'nope'" in capsys.readouterr().err


def test_federated_subject_matches_the_environment():
    from provisioning.pipeline import subject

    assert subject("acme/lorastack", stacks.preview_environment("ml")) == (
        "repo:acme/lorastack:environment:preview-ml")


# -- the infrastructure workflow wired to those waves ------------------------------------------------------------
def test_team_stacks_never_block_prod_or_each_other():
    jobs = workflow("infrastructure.yml")["jobs"]
    assert jobs["up-dev"]["needs"] == ["offline", "up-platform"]
    assert jobs["up-staging"]["needs"] == ["offline", "up-platform", "up-dev"]
    assert jobs["up-teams"]["needs"] == ["offline", "up-platform", "up-dev", "up-staging"]
    assert jobs["up-prod"]["needs"] == ["offline", "up-platform", "up-dev", "up-staging"], (
        "prod must not wait for team stacks")
    for name, wave in [("up-platform", "platform"), ("up-dev", "dev"), ("up-staging", "staging"), ("up-teams", "teams"), ("up-prod", "prod")]:
        assert jobs[name]["with"] == {"command": "up", "stacks": f"${{{{ needs.offline.outputs.{wave} }}}}"}
        assert f"needs.offline.outputs.{wave} != '[]'" in jobs[name]["if"], f"{name} must skip an empty wave"
        assert "refs/heads/main" in jobs[name]["if"]
    # a skipped earlier wave (dispatch of one stack) does not stop a later one; a failed one does
    assert "contains(fromJSON('[\"success\", \"skipped\"]'), needs.up-staging.result)" in jobs["up-prod"]["if"]
    reusable = workflow("pulumi-stacks.yml")["jobs"]["stack"]
    assert reusable["strategy"]["fail-fast"] is False
    assert reusable["environment"] == "${{ inputs.command == 'up' && matrix.environment || matrix.preview }}"
    up = next(s for s in reusable["steps"] if s.get("name") == "pulumi up")
    assert up["with"]["upsert"] is True and up["with"]["stack-name"] == "${{ matrix.pulumi_stack }}"


def test_previews_run_per_stack_in_their_own_environment_with_upsert():
    doc = workflow("infrastructure.yml")
    preview = doc["jobs"]["preview"]
    assert preview["environment"] == "${{ matrix.preview }}", "one shared preview identity could read prod keys"
    assert preview["strategy"] == {"fail-fast": False, "matrix": {"include": "${{ fromJSON(needs.offline.outputs.all) }}"}}
    step = next(s for s in preview["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@"))
    assert step["with"]["command"] == "preview" and step["with"]["upsert"] is True


def test_dispatch_runs_from_main_only_with_a_stack_input():
    doc = workflow("infrastructure.yml")
    assert "stack" in doc["on"]["workflow_dispatch"]["inputs"]
    guard = doc["jobs"]["offline"]["steps"][0]
    assert guard["if"] == "github.event_name == 'workflow_dispatch' && github.ref != 'refs/heads/main'"
    assert "exit 1" in guard["run"]
    step = next(s for s in doc["jobs"]["offline"]["steps"] if s.get("id") == "stacks")
    assert "python -m ci.stacks matrix --only" in step["run"] and step["env"]["ONLY"] == "${{ inputs.stack }}"


def test_a_new_team_stack_passes_its_first_preview_in_a_dry_run(tmp_path):
    """`lorastack stack new` in a copy of the repo, then what the PR run does for it: the offline plan passes, the
    stack is in the teams wave with `preview-<team>` / `stack-<team>`, and its preview job creates the Pulumi stack
    (upsert) instead of failing with "no stack named"."""
    root = repo_copy(tmp_path, "policy")
    res = lorastack("stack", "new", "newteam", "--project-dir", str(root), cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (root / "stacks" / "Pulumi.newteam.yaml").is_file()
    plan = lorastack("plan", "--stack", "newteam", "--project-dir", str(root), cwd=root)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    out = stacks.github_outputs(stacks.load_stacks(root / "stacks", org="acme"))
    entry = next(e for e in json.loads(out["teams"]) if e["stack"] == "newteam")
    assert entry == {"stack": "newteam", "environment": "stack-newteam", "preview": "preview-newteam",
                     "pulumi_stack": "lorastack/lorastack/newteam"}
    assert entry in json.loads(out["all"]), "the preview matrix (all stacks) includes the new stack"
    assert "newteam" not in {e["stack"] for w in ("dev", "staging", "prod") for e in json.loads(out[w])}
    # its first preview job: its own environment, and `pulumi stack select --create` semantics
    preview = workflow("infrastructure.yml")["jobs"]["preview"]
    step = next(s for s in preview["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@"))
    assert step["with"]["upsert"] is True and step["with"]["stack-name"] == "${{ matrix.pulumi_stack }}"


# -- dry runs of the workflow's job graph (its real `if:` expressions, evaluated by tests/gha_expressions.py) -----
def _run(event, ref="refs/heads/main", stack="", outcome=None):
    """Which infrastructure jobs run for an event; the offline job fails when its dispatch guard step fires."""
    from gha_expressions import evaluate, simulate

    doc = workflow("infrastructure.yml")
    ctx = {"github": {"event_name": event, "ref": ref}, "inputs": {"stack": stack}}
    guard = doc["jobs"]["offline"]["steps"][0]
    outcome = dict(outcome or {})
    if evaluate(guard["if"], ctx):
        outcome["offline"] = "failure"
    outputs = {"offline": stacks.github_outputs(stacks.load_stacks(REPO / "stacks"), stack or None)}
    return simulate(doc["jobs"], ctx, outcome, outputs)


def test_dry_run_pull_request_previews_and_deploys_nothing():
    r = _run("pull_request", ref="refs/pull/7/merge")
    assert r["preview"] == "success"
    assert {r[j] for j in ("up-dev", "up-staging", "up-teams", "up-prod", "drift")} == {"skipped"}


def test_dry_run_merge_deploys_every_wave():
    r = _run("push")
    assert [r[j] for j in ("up-dev", "up-staging", "up-teams", "up-prod")] == ["success"] * 4
    assert r["preview"] == r["drift"] == "skipped"


def test_dry_run_a_failing_team_stack_does_not_block_prod():
    r = _run("push", outcome={"up-teams": "failure"})
    assert r["up-teams"] == "failure" and r["up-prod"] == "success"


def test_dry_run_a_failing_staging_stops_teams_and_prod():
    r = _run("push", outcome={"up-staging": "failure"})
    assert r["up-teams"] == r["up-prod"] == "skipped"


def test_dry_run_dispatch_of_one_team_stack_deploys_only_it():
    r = _run("workflow_dispatch", stack="vision")
    assert (r["up-dev"], r["up-staging"], r["up-teams"], r["up-prod"]) == ("skipped", "skipped", "success", "skipped")


def test_dry_run_dispatch_from_a_branch_deploys_nothing():
    r = _run("workflow_dispatch", ref="refs/heads/feature")
    assert r["offline"] == "failure"
    assert {r[j] for j in ("up-dev", "up-staging", "up-teams", "up-prod")} == {"skipped"}


def test_dry_run_nightly_checks_drift_only():
    r = _run("schedule")
    assert r["drift"] == "success" and r["preview"] == "skipped" and r["up-prod"] == "skipped"
