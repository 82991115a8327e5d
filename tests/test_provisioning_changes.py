"""Plans of changes (`lorastack plan --against STATE.json`): what an up would do to a live stack that Azure refuses
or that breaks a running workload. Pure planning functions table-tested; then end to end through the CLI with a
state exported from a real offline render (output-shaped: display locations, ids filled in)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from provisioning_helpers import REPO

from lorastack.cli import main as cli
from provisioning import changes
from provisioning.changes import BREAKS, NOTE, REFUSED, StackShape, plan_changes

ENV = {"name": "cae-lorastack-dev", "location": "westus3", "subnet": None, "internal": False}
STORE = {"account": "lorastackdev1", "kind": "StorageV2", "sku": "Standard_LRS", "location": "westus3",
         "share": "store", "protocol": "SMB"}
T4 = {"Consumption": "Consumption", "gpu-a100": "Consumption-GPU-NC24-A100", "gpu-t4": "Consumption-GPU-NC8as-T4"}
A100_ONLY = {"Consumption": "Consumption", "gpu-a100": "Consumption-GPU-NC24-A100"}
ON_T4 = {"lorastack-dev-serve": "gpu-t4", "lorastack-dev-train": "gpu-a100"}
ON_A100 = {"lorastack-dev-serve": "gpu-a100", "lorastack-dev-train": "gpu-a100"}
LINKS1 = ("store-k1", "store-ro-k1")


def shape(env=ENV, profiles=T4, workloads=ON_T4, links=LINKS1, store=STORE):
    return StackShape(env, profiles, workloads, links, store)


@pytest.mark.parametrize("case, live, desired, expected", [
    ("nothing changes", shape(), shape(), []),
    ("GPU profile change removes the profile the app runs on (WorkloadProfileInUse)",
     shape(), shape(profiles=A100_ONLY, workloads=ON_A100),
     [(REFUSED, "profile-in-use"), (NOTE, "profile-in-use")]),
    ("GPU profile change with the old profile kept for one up: safe, and says so",
     shape(), shape(workloads=ON_A100), [(NOTE, "profile-in-use")]),
    ("second up: the old profile goes once nothing runs on it",
     shape(workloads=ON_A100), shape(profiles=A100_ONLY, workloads=ON_A100), []),
    ("a dedicated GPU profile added to an existing environment",
     shape(), shape(profiles={**T4, "nc24-a100": "NC24-A100"}), [(REFUSED, "dedicated-at-creation")]),
    ("a serverless GPU profile may be added later", shape(profiles=A100_ONLY, workloads={}), shape(workloads={}), []),
    ("environment moved to another region is a replacement", shape(), shape(env={**ENV, "location": "eastus"}),
     [(REFUSED, "environment-replace")]),
    ("environment renamed is a replacement", shape(), shape(env={**ENV, "name": "cae-other"}),
     [(REFUSED, "environment-replace")]),
    ("store SKU change is a replacement (data lost)", shape(), shape(store={**STORE, "sku": "Premium_LRS",
                                                                            "kind": "FileStorage"}),
     [(REFUSED, "store-replace"), (REFUSED, "store-replace")]),
    ("key generation 1 -> 3 regenerates the key the running links use",
     shape(), shape(links=("store-k3", "store-ro-k3")), [(BREAKS, "storage-rekey")]),
    ("key generation 1 -> 2 rotates to the idle key", shape(), shape(links=("store-k2", "store-ro-k2")),
     [(NOTE, "storage-rekey")]),
    ("outputs only: a removed profile may be in use", shape(workloads=None), shape(profiles=A100_ONLY),
     [(REFUSED, "profile-in-use")]),
])
def test_plan_changes_table(case, live, desired, expected):
    got = [(c.severity, c.rule) for c in plan_changes(live, desired)]
    assert got == expected, case


def test_platform_profiles_may_be_used_by_team_stacks():
    live = shape(workloads={"lorastack-platform-serve": "gpu-a100"})
    got = plan_changes(live, shape(profiles=A100_ONLY, workloads={"lorastack-platform-serve": "gpu-a100"}),
                       team_stacks_may_use=True)
    assert [(c.severity, c.rule) for c in got] == [(REFUSED, "profile-in-use")]
    assert "team stacks may run on it" in got[0].message


def test_refusals_say_what_to_do():
    [refused, _note] = plan_changes(shape(), shape(profiles=A100_ONLY, workloads=ON_A100))
    assert "WorkloadProfileInUse" in refused.message and "lorastack-dev-serve" in refused.message
    assert "extraGpuProfiles" in refused.fix and "second up" in refused.fix
    assert "[rule profile-in-use]" in refused.line()


def test_bad_state_file_is_refused():
    with pytest.raises(changes.StateError, match="pulumi stack export"):
        changes.read_state({"foo": 1})


# --- end to end: an exported state of the rendered stack --------------------------------------------------------
DISPLAY = {"westus3": "West US 3", "swedencentral": "Sweden Central"}
SUB = "/subscriptions/4b2e0f3a-0000-4000-8000-123456789abc"


def exported(rendering) -> dict:
    """`pulumi stack export` of a stack as Azure would hold it: outputs carry display locations, ARM ids of a real
    subscription, names, and the API-versioned type tokens azure-native records."""
    resources = []
    for r in rendering.resources:
        if not r.custom:
            continue
        outputs = json.loads(json.dumps(r.inputs).replace("/subscriptions/00000000-0000-0000-0000-000000000000", SUB))
        if "location" in outputs:
            outputs["location"] = DISPLAY.get(outputs["location"], outputs["location"])
        physical = next((v for k, v in r.inputs.items() if k.endswith("Name") and k != "resourceGroupName"
                         and isinstance(v, str)), r.name)
        outputs.update(name=physical, id=f"{SUB}/resourceGroups/x/providers/y/{physical}", provisioningState="Succeeded")
        typ = r.type.replace("azure-native:app:", "azure-native:app/v20250202preview:") if "app:" in r.type else r.type
        resources.append({"urn": r.urn, "type": typ, "inputs": r.inputs, "outputs": outputs})
    return {"version": 3, "deployment": {"manifest": {}, "resources": resources}}


@pytest.fixture
def project_copy(tmp_path):
    shutil.copy(REPO / "Pulumi.yaml", tmp_path)
    shutil.copytree(REPO / "stacks", tmp_path / "stacks")
    return tmp_path


def edit_stack(project, stack, fn):
    path = project / "stacks" / f"Pulumi.{stack}.yaml"
    data = yaml.safe_load(path.read_text())
    fn(data["config"])
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_live_stack_unchanged_plans_no_change(offline, project_copy, tmp_path, capsys):
    """Output-shaped state (display location "West US 3", real ids) of the same stack: nothing to report."""
    state = tmp_path / "dev-state.json"
    state.write_text(json.dumps(exported(offline.render_stack("dev"))))
    assert cli(["plan", "--stack", "dev", "--against", str(state), "--project-dir", str(project_copy)]) == 0
    out = capsys.readouterr().out
    assert "nothing Azure refuses or that breaks a running workload" in out and "0 blocking change(s)" in out


def test_gpu_profile_change_is_refused_then_carried_out_in_two_ups(offline, project_copy, tmp_path, capsys):
    """Issue 9: moving dev inference from T4 to A100 would drop gpu-t4 while the app runs on it (ACA#731)."""
    state = tmp_path / "dev-state.json"
    state.write_text(json.dumps(exported(offline.render_stack("dev"))))
    edit_stack(project_copy, "dev", lambda c: c["lorastack:inference"].update(
        gpuProfile="Consumption-GPU-NC24-A100", minReplicas=0, modelLoadSeconds=180))
    argv = ["plan", "--stack", "dev", "--against", str(state), "--project-dir", str(project_copy)]
    assert cli(argv) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "WorkloadProfileInUse" in out and "lorastack-dev-serve" in out
    assert "extraGpuProfiles" in out
    # first up: keep the old profile while the app moves
    edit_stack(project_copy, "dev", lambda c: c.update({"lorastack:extraGpuProfiles": ["Consumption-GPU-NC8as-T4"]}))
    assert cli([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(c["severity"], c["rule"]) for c in data["changes"]] == [("note", "profile-in-use")]
    assert "is kept for this up" in data["changes"][0]["message"]
    # second up, against the state after the first: the old profile goes, nothing runs on it any more
    from provisioning.offline import render_config
    from provisioning.stackfile import load_stack

    sf = load_stack("dev", project_copy, esc_secret_keys=("hfToken", "inferenceApiKeys"))
    state.write_text(json.dumps(exported(render_config(sf.project, "dev", sf.config, sf.secret_keys))))
    edit_stack(project_copy, "dev", lambda c: c.pop("lorastack:extraGpuProfiles"))
    assert cli(argv) == 0
    assert "0 blocking change(s)" in capsys.readouterr().out


def test_dedicated_profile_added_to_a_live_environment_is_refused(offline, project_copy, tmp_path, capsys):
    """Issue 9: GPU dedicated profiles must exist when the environment is created."""
    state = tmp_path / "dev-state.json"
    state.write_text(json.dumps(exported(offline.render_stack("dev"))))
    edit_stack(project_copy, "dev", lambda c: c["lorastack:training"].update(gpuProfile="NC24-A100", minNodes=0,
                                                                            maxNodes=1))
    assert cli(["plan", "--stack", "dev", "--against", str(state), "--project-dir", str(project_copy)]) == 1
    out = capsys.readouterr().out
    assert "dedicated GPU profile 'nc24-a100' (NC24-A100) to an existing environment" in out
    assert "[rule dedicated-at-creation]" in out


def test_against_last_outputs_is_conservative(offline, project_copy, tmp_path, capsys):
    """`pulumi stack output --json` does not say what runs where: a removed profile is refused, not guessed."""
    state = tmp_path / "dev-outputs.json"
    state.write_text(json.dumps(offline.render_stack("dev").outputs))
    argv = ["plan", "--stack", "dev", "--against", str(state), "--project-dir", str(project_copy)]
    assert cli(argv) == 0
    capsys.readouterr()
    edit_stack(project_copy, "dev", lambda c: c["lorastack:inference"].update(gpuProfile="Consumption-GPU-NC24-A100"))
    assert cli(argv) == 1
    assert "the outputs do not say what runs on it" in capsys.readouterr().out


def test_store_key_regeneration_in_use_is_blocked(offline, project_copy, tmp_path, capsys):
    state = tmp_path / "dev-state.json"
    state.write_text(json.dumps(exported(offline.render_stack("dev"))))
    edit_stack(project_copy, "dev", lambda c: c["lorastack:store"].update(keyGeneration=3))
    assert cli(["plan", "--stack", "dev", "--against", str(state), "--project-dir", str(project_copy)]) == 1
    out = capsys.readouterr().out
    assert "BREAKS" in out and "uses key1 again" in out and "bump keyGeneration by one (2)" in out


def test_unreadable_state_exits_2(project_copy, tmp_path, capsys):
    bad = tmp_path / "state.json"
    bad.write_text("{not json")
    assert cli(["plan", "--stack", "dev", "--against", str(bad), "--project-dir", str(project_copy)]) == 2
    assert "cannot read a JSON state" in capsys.readouterr().err
