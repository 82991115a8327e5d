"""``lorastack endpoint``, ``restart``, ``export aitk``, ``preflight`` and ``store rotate-key`` at the HTTP boundary
(ARM Microsoft.App / Resources / Storage / KeyVault / Authorization, Key Vault, the app's own /readyz and /v1)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from azure_fakes import SUB, FakeCredential, client_kwargs, fake, no_ambient_azure, outputs_doc, outputs_file

from lorastack.azure.jobs import EXIT_FAILED
from lorastack.cli import build_parser
from lorastack.commands import ops

FIXTURES = (fake, no_ambient_azure, outputs_file)  # pytest fixtures from azure_fakes, used by name
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def run(fake, argv, **kw) -> int:
    args = build_parser().parse_args(argv)
    handler = {"endpoint": ops.endpoint_command, "restart": ops.restart_command, "preflight": ops.preflight_command,
               "store": ops.store_command}[argv[0]]
    return handler(args, credential=FakeCredential(), client_kwargs=client_kwargs(fake), **kw)


# ---------------------------------------------------------------------------------------------------------------
# endpoint
# ---------------------------------------------------------------------------------------------------------------
def test_endpoint_waits_for_readyz_then_one_authenticated_completion_ok(fake, outputs_file, capsys):
    fake.app_ready_after = 2  # a replica scaling from zero loads the base model first
    fake.secrets["inference-api-keys"] = ["key-one,key-two"]  # read from the stack's vault, never printed
    waits = []
    assert run(fake, ["endpoint", "--outputs", str(outputs_file)], sleep=waits.append) == 0
    out, err = capsys.readouterr()
    assert f"endpoint: https://{fake.app_fqdn}" in out and f"OpenAI base URL: https://{fake.app_fqdn}/v1" in out
    assert "model: plant-care@v1" in out and "verdict: OK" in out
    assert "key-one" not in out + err
    assert len(waits) == 2 and err.count("waiting") == 1
    chat = next(r for r in fake.requests if r.path == "/v1/chat/completions")
    assert chat.headers["authorization"] == "Bearer key-one" and chat.json()["model"] == "plant-care@v1"


def test_endpoint_with_a_wrong_key_fails_with_what_to_do(fake, outputs_file, capsys):
    assert run(fake, ["endpoint", "--api-key", "wrong", "--outputs", str(outputs_file)], sleep=lambda s: None) == 1
    out, err = capsys.readouterr()
    assert "verdict: FAILED" in out and "API key refused (401: Incorrect API key provided.)" in out
    assert "inference-api-keys" in err and "lorastack restart" in err
    assert not [r for r in fake.requests if r.path == "/v1/chat/completions"]


def test_endpoint_that_never_gets_ready_says_where_to_look(fake, outputs_file, capsys):
    fake.app_ready_after = 1000
    rc = run(fake, ["endpoint", "--api-key", "key-one", "--wait", "30", "--outputs", str(outputs_file)],
             sleep=lambda s: None)
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "is not ready after 30 s" in err and "lorastack logs --app" in err


# ---------------------------------------------------------------------------------------------------------------
# restart and export
# ---------------------------------------------------------------------------------------------------------------
def test_restart_rolls_a_new_revision_with_the_apps_own_template(fake, outputs_file, capsys):
    assert run(fake, ["restart", "--suffix", "r20261201", "--outputs", str(outputs_file)]) == 0
    assert f"new revision {fake.app}--r20261201 is rolling out" in capsys.readouterr().out
    (patch,) = fake.patches
    template = patch["properties"]["template"]
    assert template["revisionSuffix"] == "r20261201"
    assert template["containers"][0]["image"] == "ghcr.io/lorastack/inference:0.1.0"  # the rest unchanged
    assert template["volumes"][0]["storageName"] == "store-k1"


def test_restart_refused_names_the_role(fake, outputs_file, capsys):
    fake.missing_group = True
    assert run(fake, ["restart", "--outputs", str(outputs_file)]) == EXIT_FAILED
    assert "pulumi up --stack" in capsys.readouterr().err


def test_export_aitk_writes_the_toolkits_two_files_from_the_outputs(fake, outputs_file, tmp_path, capsys):
    out_dir = tmp_path / "aitk"
    assert ops.export_command(build_parser().parse_args(
        ["export", "aitk", "--outputs", str(outputs_file), "--out", str(out_dir)])) == 0
    ft = json.loads((out_dir / "infra" / "finetuning.config.json").read_text())
    inf = json.loads((out_dir / "infra" / "inference.config.json").read_text())
    assert ft == {"SUBSCRIPTION_ID": SUB, "RESOURCE_GROUP_NAME": fake.rg, "STORAGE_ACCOUNT_NAME": fake.account,
                  "FILE_SHARE_NAME": fake.share, "ACA_JOB_NAME": fake.job}
    assert inf["ACA_APP_NAME"] == fake.app and inf["ACA_APP_ENDPOINT"] == f"https://{fake.app_fqdn}"
    assert inf["SUBSCRIPTION_ID"] == SUB
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(outputs_doc(fake, acaAppEndpoint="[secret]")))
    assert ops.export_command(build_parser().parse_args(["export", "aitk", "--outputs", str(bad)])) == EXIT_FAILED
    assert "acaAppEndpoint are shown as [secret]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# preflight
# ---------------------------------------------------------------------------------------------------------------
def test_preflight_on_a_ready_subscription_is_all_ok(fake, capsys):
    assert run(fake, ["preflight", "--stack", "dev", "--subscription", SUB, "--project-dir", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert "0 blocker(s); ready for `pulumi up --stack dev`" in out
    for row in ("provider Microsoft.App", "GPU profile Consumption-GPU-NC24-A100",
                "GPU profile Consumption-GPU-NC8as-T4", "storage name lorastackdev083573", "vault name kv-dev-083573",
                "permissions"):
        assert row in out
    assert "BLOCKER" not in out


def test_preflight_blockers_each_say_what_to_do_and_exit_non_zero(fake, capsys):
    fake.providers["Microsoft.App"] = "NotRegistered"
    fake.profile_types["westus3"] = ["Consumption", "Consumption-GPU-NC8as-T4"]  # no A100 in the region
    fake.usages = [{"unit": "Count", "currentValue": 4, "limit": 4,
                    "name": {"value": "ManagedEnvironmentConsumptionT4Gpus", "localizedValue": "Consumption T4 Gpus"}}]
    fake.taken_names = {"lorastackdev083573"}
    fake.not_actions = ["Microsoft.Authorization/*/Write"]  # Contributor: cannot create the role assignments
    assert run(fake, ["preflight", "--stack", "dev", "--subscription", SUB, "--project-dir", str(REPO),
                      "--json"]) == EXIT_FAILED
    doc = json.loads(capsys.readouterr().out)
    blockers = {c["check"]: c for c in doc["checks"] if c["status"] == "BLOCKER"}
    assert set(blockers) == {"provider Microsoft.App", "GPU profile Consumption-GPU-NC24-A100",
                             "quota Consumption T4 Gpus", "storage name lorastackdev083573", "permissions"}
    assert "az provider register --namespace Microsoft.App" in blockers["provider Microsoft.App"]["fix"]
    assert "lorastack:location" in blockers["GPU profile Consumption-GPU-NC24-A100"]["fix"]
    assert "support request" in blockers["quota Consumption T4 Gpus"]["fix"]
    assert "lorastack:store.accountName" in blockers["storage name lorastackdev083573"]["fix"]
    assert "Microsoft.Authorization/roleAssignments/write" in blockers["permissions"]["detail"]
    assert "Role Based Access Control Administrator" in blockers["permissions"]["fix"]


def test_preflight_for_a_new_resource_group_checks_subscription_permissions(fake, capsys):
    fake.group_exists = False
    fake.actions = ["Microsoft.App/*", "Microsoft.Storage/*"]
    assert run(fake, ["preflight", "--stack", "dev", "--subscription", SUB, "--project-dir", str(REPO)]) == 1
    out = capsys.readouterr().out
    assert "resource group rg-lorastack-dev" in out and "will be created" in out
    assert "Microsoft.Resources/subscriptions/resourceGroups/write" in out
    perms = [r for r in fake.requests if r.path.endswith("/permissions")]
    assert perms[0].path == f"/subscriptions/{SUB}/providers/Microsoft.Authorization/permissions"


def test_preflight_for_an_unknown_stack_names_the_stacks(fake, capsys):
    assert run(fake, ["preflight", "--stack", "nope", "--subscription", SUB, "--project-dir", str(REPO)]) == 1
    err = capsys.readouterr().err
    assert "no stack file stacks/Pulumi.nope.yaml" in err and "dev" in err
    assert fake.requests == []


# ---------------------------------------------------------------------------------------------------------------
# store rotate-key
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path):
    """A copy of the project's Pulumi.yaml and dev stack, whose key generation the test bumps like a user would."""
    (tmp_path / "stacks").mkdir()
    shutil.copy(REPO / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    shutil.copy(REPO / "stacks" / "Pulumi.dev.yaml", tmp_path / "stacks" / "Pulumi.dev.yaml")
    return tmp_path


def _set_generation(project, gen: int) -> None:
    path = project / "stacks" / "Pulumi.dev.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["config"]["lorastack:store"]["keyGeneration"] = gen
    path.write_text(yaml.safe_dump(doc))


def test_rotate_key_regenerates_the_idle_key_then_the_old_one_after_pulumi_up(fake, project, capsys):
    fake.owned_accounts.add("lorastackdev083573")  # the names the dev stack file gives its resources
    fake.job = "lorastack-dev-train"
    argv = ["store", "rotate-key", "--stack", "dev", "--subscription", SUB, "--project-dir", str(project)]
    # step 1: generation 1 mounts with key1; key2 is idle and regenerated, nothing running is touched
    assert run(fake, argv) == 0
    out = capsys.readouterr().out
    assert fake.regenerated == ["key2"]
    assert "1. set lorastack:store.keyGeneration: 2 in stacks/Pulumi.dev.yaml" in out
    assert "2. pulumi up --stack dev" in out and "store-k2" in out and "3. lorastack store rotate-key" in out
    assert "S3CRET" not in out  # the regenerated keys in the response are never shown
    # the user bumps the generation but has not run `pulumi up` yet: --finish refuses
    _set_generation(project, 2)
    assert run(fake, [*argv, "--finish"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "not regenerating the old key: the job mounts store-k1" in err and "pulumi up --stack dev" in err
    assert fake.regenerated == ["key2"]
    # after `pulumi up`: the job and app use store-k2, so key1 can go
    fake.job_storage_name = fake.app_storage_name = "store-k2"
    assert run(fake, [*argv, "--finish"]) == 0
    assert fake.regenerated == ["key2", "key1"]
    assert "Rotation complete" in capsys.readouterr().out
