"""The real stack files, `lorastack plan` and `lorastack stack new`, end to end and offline."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys

import pytest
import yaml
from provisioning_helpers import REPO, planned

from lorastack.cli import main as cli
from provisioning.guardrails import load_guardrails
from provisioning.stackfile import available_stacks

STACKS = available_stacks(REPO)


def test_expected_stack_files_exist():
    assert {"dev", "staging", "prod"} <= set(STACKS)
    assert [s for s in STACKS if yaml.safe_load((REPO / "stacks" / f"Pulumi.{s}.yaml").read_text())
            ["config"]["lorastack:tier"] == "team"], "an example self-service team stack"


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_file_renders_and_passes_the_policies(offline, stack):
    result = planned(stack)
    failed = {k: [v.message for v in vs] for k, vs in result.verdicts.items() if vs}
    assert not failed
    types = {r.type.split(":")[-1] for r in result.resources if r.custom}
    assert {"StorageAccount", "FileShare", "ManagedEnvironmentsStorage",
            "UserAssignedIdentity", "RoleAssignment", "Job", "ContainerApp"} <= types
    # team stacks join the platform's environment (GPU quota is per environment); platform stacks own one
    owns_environment = {"ManagedEnvironment", "Workspace"} <= types
    assert owns_environment == (load_guardrails(REPO).tier_for(stack) != "team")
    assert not result.secret_outputs and result.outputs["storeMountPath"] == "/mnt/store"


def test_environments_differ_like_real_ones(offline):
    dev, prod = planned("dev"), planned("prod")

    def one(result, short):
        return next(r for r in result.resources if r.type.endswith(":" + short))

    assert one(dev, "ContainerApp").get("template.scale.minReplicas") == 0
    assert one(dev, "ContainerApp").get("workloadProfileName") == "gpu-t4"
    assert not any(r.protect for r in dev.resources)
    protected = {r.type.split(":")[-1] for r in prod.resources if r.protect}
    assert {"ManagedEnvironment", "StorageAccount", "FileShare", "Vault", "ResourceGroup"} <= protected
    assert one(prod, "Workspace").get("retentionInDays") > one(dev, "Workspace").get("retentionInDays")
    # prod: external environment in its VNet; the store admits the subnet and the named client range
    assert one(prod, "ManagedEnvironment").get("vnetConfiguration.internal") is False
    assert one(prod, "StorageAccount").get("networkRuleSet.ipRules") == [
        {"iPAddressOrRange": "203.0.113.0/24", "action": "Allow"}]
    assert one(dev, "ManagedEnvironment").get("vnetConfiguration") is None


def test_program_entry_point_is_the_same_program(offline):
    """provisioning/__main__.py (what `pulumi up` runs) renders the same resources as plan."""
    from provisioning.offline import render_config
    from provisioning.stackfile import load_stack

    sf = load_stack("dev", REPO, esc_secret_keys=("hfToken", "inferenceApiKeys"))
    r = render_config(sf.project, "dev", sf.config, sf.secret_keys,
                      program=lambda: runpy.run_path(str(REPO / "provisioning" / "__main__.py")))
    assert sorted(x.name for x in r.resources) == sorted(x.name for x in planned("dev").resources)


def test_project_file_points_at_the_program():
    proj = yaml.safe_load((REPO / "Pulumi.yaml").read_text())
    assert proj["name"] == "lorastack" and proj["main"] == "provisioning/" and proj["stackConfigDir"] == "stacks"
    assert proj["runtime"]["name"] == "python"
    assert all("description" in v for v in proj["config"].values())
    # keys the CLI treats as required (no default) must be in every stack file: plan checks that too
    required = {k for k, v in proj["config"].items() if "default" not in v and "value" not in v}
    assert required == {"location", "tier", "images", "training", "inference"}
    pack = yaml.safe_load((REPO / "policy" / "PulumiPolicy.yaml").read_text())
    assert pack["runtime"]["name"] == "python"


def test_pure_modules_do_not_import_pulumi():
    code = ("import sys, provisioning.settings, provisioning.policies, provisioning.gpu, provisioning.naming, "
            "provisioning.probes, provisioning.stackfile, provisioning.guardrails, provisioning.outputs; "
            "sys.exit('pulumi' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# --- lorastack plan ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_plan_cli_prints_table_and_verdicts(offline, capsys, stack):
    assert cli(["plan", "--stack", stack, "--project-dir", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert "NOT `pulumi preview`" in out
    assert "app:ManagedEnvironment" in out and "Consumption=Consumption" in out
    assert "app:Job" in out and "app:ContainerApp" in out
    assert "PASS  storage-hardening" in out and "PASS  prod-data-protected" in out
    assert "OK: 8/8 policies pass" in out


def test_plan_cli_json(offline, capsys):
    assert cli(["plan", "--stack", "dev", "--json", "--project-dir", str(REPO)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pulumiPreview"] is False and data["ok"] is True
    assert {p["name"] for p in data["policies"]} >= {"storage-hardening", "self-service-limits"}
    assert any(r["type"] == "azure-native:app:Job" for r in data["resources"])
    assert data["outputs"]["acaJobName"] == "lorastack-dev-train"
    assert data["aiToolkit"]["finetuning.config.json"]["ACA_JOB_NAME"] == "lorastack-dev-train"
    assert data["aiToolkit"]["inference.config.json"]["ACA_APP_NAME"] == "lorastack-dev-serve"


@pytest.fixture
def project_copy(tmp_path):
    shutil.copy(REPO / "Pulumi.yaml", tmp_path)
    shutil.copytree(REPO / "stacks", tmp_path / "stacks")
    return tmp_path


def test_plan_cli_wrong_gpu_profile_names_file_key_and_allowed(offline, capsys, project_copy):
    f = project_copy / "stacks" / "Pulumi.dev.yaml"
    f.write_text(f.read_text().replace("gpuProfile: Consumption-GPU-NC8as-T4", "gpuProfile: Consumption-GPU-NC8as-T5"))
    assert cli(["plan", "--stack", "dev", "--project-dir", str(project_copy)]) == 2
    err = capsys.readouterr().err
    assert ("stacks/Pulumi.dev.yaml: lorastack:inference.gpuProfile: 'Consumption-GPU-NC8as-T5' is not a GPU "
            "profile type; allowed: Consumption-GPU-NC8as-T4, Consumption-GPU-NC24-A100, NC24-A100") in err


def test_plan_cli_policy_violation_exits_nonzero(offline, capsys, project_copy):
    f = project_copy / "stacks" / "Pulumi.prod.yaml"
    f.write_text(f.read_text().replace("lorastack:protect: true", "lorastack:protect: false"))
    assert cli(["plan", "--stack", "prod", "--project-dir", str(project_copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  prod-data-protected" in out and "must be protected in prod" in out


def test_plan_cli_unknown_stack(capsys):
    assert cli(["plan", "--stack", "nope", "--project-dir", str(REPO)]) == 2
    assert "no stack file stacks/Pulumi.nope.yaml" in capsys.readouterr().err


# --- lorastack stack new -------------------------------------------------------------------------------------
def test_stack_new_writes_a_valid_team_stack(offline, capsys, project_copy):
    assert cli(["stack", "new", "search", "--location", "westus3", "--max-replicas", "2",
                "--project-dir", str(project_copy)]) == 0
    path = project_copy / "stacks" / "Pulumi.search.yaml"
    cfg = yaml.safe_load(path.read_text())["config"]
    assert cfg["lorastack:tier"] == "team" and cfg["lorastack:location"] == "westus3"
    assert cfg["lorastack:inference"]["maxReplicas"] == 2
    assert cfg["lorastack:keyVault"]["hfTokenSecretName"] == "search-hf-token"
    out = capsys.readouterr().out
    assert "wrote stacks/Pulumi.search.yaml" in out and "every policy passing" in out  # validated by a render
    # issue 10: what the pipeline needs for the new stack, and the one-time steps lorastack cannot do
    entry = yaml.safe_load((project_copy / "stacks" / "pipeline.yaml").read_text())["stacks"]["search"]
    assert entry == {
        "file": "stacks/Pulumi.search.yaml", "pulumiStack": "lorastack/lorastack/search", "upsert": True,
        "tier": "team", "order": 3, "dependsOn": ["platform"],
        "deployEnvironment": "stack-search", "previewEnvironment": "preview-search",
        "deploySubject": "repo:lorastack/lorastack:environment:stack-search",
        "previewSubject": "repo:lorastack/lorastack:environment:preview-search"}
    assert "repo:lorastack/lorastack:environment:preview-search" in out and "upsert" in out
    assert "one-time platform steps" in out and "search-hf-token" in out and "kv-platform-" in out


@pytest.mark.parametrize("argv, needle", [
    (["--location", "eastus"], "--location: 'eastus' is not allowed for team stacks; allowed: westus3"),
    (["--gpu", "NC96-A100"], "--gpu: 'NC96-A100' is not allowed for team stacks; allowed: Consumption-GPU-NC8as-T4"),
    (["--gpu", "A100"], "--gpu: 'A100' is not a GPU profile type"),
    (["--max-replicas", "9"], "--max-replicas: 9 is above the team limit; allowed: 1-2"),
])
def test_stack_new_refuses_outside_the_guardrails(capsys, project_copy, argv, needle):
    assert cli(["stack", "new", "search", *argv, "--project-dir", str(project_copy)]) == 2
    assert needle in capsys.readouterr().err
    assert not (project_copy / "stacks" / "Pulumi.search.yaml").exists()


@pytest.mark.parametrize("team, needle", [("prod", "reserved"), ("platform", "reserved"),
                                          ("Bad_Team", "not a valid stack name"), ("vision", "already exists")])
def test_stack_new_refuses_bad_names(capsys, project_copy, team, needle):
    assert cli(["stack", "new", team, "--project-dir", str(project_copy)]) == 2
    assert needle in capsys.readouterr().err


def test_guardrails_file_matches_the_gpu_table():
    from provisioning import gpu

    g = load_guardrails(REPO)
    assert set(g.allowed_gpu_profiles) <= set(gpu.SERVERLESS_GPU_TYPES)


def test_gitops_workflow_runs_the_offline_plan_and_the_policy_pack():
    """The workflow cannot run here (no Pulumi CLI, no Azure). The gitops team owns its shape; provisioning only
    relies on this: every stack is planned offline, and every preview/up runs the policy pack."""
    # infrastructure.yml calls the reusable pulumi-stacks.yml for the ups: read both
    steps = [
        s
        for name in ("infrastructure.yml", "pulumi-stacks.yml")
        for job in yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())["jobs"].values()
        for s in job.get("steps") or []
    ]
    runs = " ".join(str(s.get("run", "")) for s in steps)
    assert "lorastack plan" in runs or any("plan" in str(s.get("uses", "")) for s in steps)
    actions = [s for s in steps if str(s.get("uses", "")).startswith("pulumi/actions@")]
    ups = [a for a in actions if a["with"].get("command") == "up"]
    previews = [a for a in actions if a["with"].get("command") == "preview" and not a["with"].get("expect-no-changes")]
    assert ups and previews  # (a drift check's preview needs no policy pack)
    assert all(a["with"].get("policyPacks") == "policy" for a in ups + previews)
