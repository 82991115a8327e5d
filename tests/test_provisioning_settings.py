"""Pure, table-driven tests of the planning/validation logic (no Pulumi): GPU profiles, names, probes, settings."""

from __future__ import annotations

import pytest
from provisioning_helpers import BASE, REPO, SECRETS, settings_with

from provisioning import gpu, naming, probes
from provisioning.settings import SettingsError, parse_settings
from provisioning.stackfile import PLACEHOLDER, StackFileError, load_stack

SRC = "stacks/Pulumi.unit.yaml"


def parse(raw, secret_keys=SECRETS):
    return parse_settings(raw, SRC, "unit", secret_keys)


def errors(raw, secret_keys=SECRETS) -> str:
    with pytest.raises(SettingsError) as e:
        parse(raw, secret_keys)
    return str(e.value)


# --- GPU profiles --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype, cpu, mem, expected", [
    ("Consumption-GPU-NC8as-T4", None, None, (8, "56Gi")),
    ("Consumption-GPU-NC24-A100", None, None, (24, "220Gi")),
    ("NC24-A100", 24, "220Gi", (24, "220Gi")),
    ("NC48-A100", None, None, (48, "440Gi")),
    ("NC96-A100", 24, None, (24, "220Gi")),
])
def test_replica_size_defaults_and_accepted_pairs(ptype, cpu, mem, expected):
    assert gpu.replica_size(ptype, cpu, mem) == expected


@pytest.mark.parametrize("ptype, cpu, mem", [
    ("Consumption-GPU-NC8as-T4", 24, "220Gi"),
    ("Consumption-GPU-NC24-A100", 8, "56Gi"),
    ("NC24-A100", 48, None),
    ("Consumption-GPU-NC8as-T4", None, "64Gi"),
])
def test_replica_size_rejects_what_the_profile_does_not_offer(ptype, cpu, mem):
    with pytest.raises(ValueError, match="not offered by"):
        gpu.replica_size(ptype, cpu, mem)


@pytest.mark.parametrize("uses, expected", [
    # serverless only: Consumption first, no counts anywhere
    ([("Consumption-GPU-NC24-A100", None, None), ("Consumption-GPU-NC8as-T4", None, None)],
     [("Consumption", "Consumption", None, None), ("gpu-a100", "Consumption-GPU-NC24-A100", None, None),
      ("gpu-t4", "Consumption-GPU-NC8as-T4", None, None)]),
    # same serverless type twice -> one profile
    ([("Consumption-GPU-NC8as-T4", None, None)] * 2,
     [("Consumption", "Consumption", None, None), ("gpu-t4", "Consumption-GPU-NC8as-T4", None, None)]),
    # dedicated gets node counts (default 0..1); the serverless one still none
    ([("NC24-A100", None, None), ("Consumption-GPU-NC8as-T4", None, None)],
     [("Consumption", "Consumption", None, None), ("nc24-a100", "NC24-A100", 0, 1),
      ("gpu-t4", "Consumption-GPU-NC8as-T4", None, None)]),
    # one dedicated pool for both workloads: the wider range wins
    ([("NC48-A100", 0, 2), ("NC48-A100", 1, 1)],
     [("Consumption", "Consumption", None, None), ("nc48-a100", "NC48-A100", 1, 2)]),
])
def test_workload_profiles_table(uses, expected):
    got = [(p.name, p.type, p.minimum_count, p.maximum_count) for p in gpu.workload_profiles(uses)]
    assert got == expected


# --- names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stack", ["dev", "prod", "a-very-long-team-name-x", "vision"])
def test_generated_names_follow_azure_rules(stack):
    naming.check_storage_account_name(naming.storage_account_name("lorastack", stack))
    naming.check_key_vault_name(naming.key_vault_name("lorastack", stack))
    names = naming.resource_names("lorastack", stack)
    assert all(len(names[k]) <= 32 for k in ("environment", "job", "app"))


def test_generated_global_names_differ_per_stack():
    assert naming.storage_account_name("lorastack", "dev") != naming.storage_account_name("lorastack", "dev2")
    assert naming.key_vault_name("lorastack", "dev") != naming.key_vault_name("lorastack", "dev2")


@pytest.mark.parametrize("bad", ["ab", "UpperCase1", "has-hyphen", "x" * 25, "under_score"])
def test_storage_account_name_rules(bad):
    with pytest.raises(ValueError, match="3-24 characters, lowercase letters and digits"):
        naming.check_storage_account_name(bad)


@pytest.mark.parametrize("gen, name, key", [(1, "store-k1", 0), (2, "store-k2", 1), (3, "store-k3", 0)])
def test_environment_storage_name_carries_key_generation(gen, name, key):
    """ACA#1406: a key rotation must create a new environment storage, alternating between key1 and key2."""
    assert naming.environment_storage_name(gen) == name
    assert naming.storage_key_index(gen) == key


# --- probes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("load", [60, 300, 600, 1200, 1900])
def test_startup_probe_window_covers_model_load_within_aca_limits(load):
    ps = {p.type: p for p in probes.size_probes(load, "/healthz", "/readyz")}
    s = ps["Startup"]
    assert s.window_seconds >= load * probes.MARGIN
    assert 1 <= s.initial_delay_seconds <= 60 and 1 <= s.period_seconds <= 240 and 1 <= s.failure_threshold <= 10
    assert ps["Readiness"].path == "/readyz" and ps["Liveness"].path == "/healthz"


def test_ai_toolkit_probe_would_be_too_short_for_a_several_minute_load():
    """The AI Toolkit's startup probe (60 s + 10 s x 10) gives ~160 s; a 5-minute load needs far more."""
    s = next(p for p in probes.size_probes(300, "/healthz", "/readyz") if p.type == "Startup")
    assert s.window_seconds > 160 * 2


@pytest.mark.parametrize("load", [0, 2000, 10_000])
def test_probe_sizing_rejects_loads_aca_cannot_wait_for(load):
    with pytest.raises(ValueError, match="out of range"):
        probes.size_probes(load, "/healthz", "/readyz")


# --- settings: every validation error names file, key, value and what is allowed --------------------------------
def test_base_settings_are_valid():
    s = parse(BASE)
    assert s.inference.min_replicas == 0 and s.store.key_generation == 1 and s.store.protocol == "smb"


def test_misspelt_gpu_profile_names_file_key_value_and_allowed():
    msg = errors(settings_with(inference={"gpuProfile": "Consumption-GPU-NC8as-T5"}))
    assert msg.startswith(f"{SRC}: lorastack:inference.gpuProfile: 'Consumption-GPU-NC8as-T5' is not a GPU profile type")
    assert "allowed: Consumption-GPU-NC8as-T4, Consumption-GPU-NC24-A100, NC24-A100, NC48-A100, NC96-A100" in msg


def test_unknown_key_lists_allowed_keys():
    msg = errors(settings_with(inference={"maxReplica": 3}))
    assert "lorastack:inference.maxReplica: unknown key; allowed:" in msg and "maxReplicas" in msg


@pytest.mark.parametrize("section, profile", [("training", "Consumption-GPU-NC24-A100"),
                                              ("inference", "Consumption-GPU-NC8as-T4")])
@pytest.mark.parametrize("field", ["minNodes", "maxNodes"])
def test_counts_on_serverless_gpu_profile_are_refused(section, profile, field):
    """WorkloadProfilePropertyNotSupported: Azure rejects MinimumCount/MaximumCount on consumption GPU profiles."""
    msg = errors(settings_with(**{section: {"gpuProfile": profile, field: 1}}))
    assert f"lorastack:{section}.{field}: 1 is not allowed on the serverless GPU profile {profile}" in msg
    assert "WorkloadProfilePropertyNotSupported" in msg and "allowed: only on dedicated profiles" in msg


def test_counts_on_dedicated_profile_are_fine():
    s = parse(settings_with(training={"gpuProfile": "NC24-A100", "minNodes": 0, "maxNodes": 2}))
    assert s.training.max_nodes == 2


def test_cpu_memory_the_profile_does_not_offer():
    msg = errors(settings_with(inference={"cpu": 4, "memory": "16Gi"}))
    assert ("lorastack:inference.cpu: 4 CPU / 16Gi is not offered by Consumption-GPU-NC8as-T4; "
            "allowed: 8 CPU / 56Gi") in msg


def test_storage_account_name_rules_in_settings():
    msg = errors(settings_with(store={"accountName": "Lora_Store"}))
    assert "lorastack:store.accountName: 'Lora_Store' is not a valid storage account name; allowed: 3-24" in msg


@pytest.mark.parametrize("timeout", [60, 90000])
def test_replica_timeout_out_of_range(timeout):
    """ACA#986: too short a replicaTimeout kills the run with DeadlineExceeded; too long is a runaway bill."""
    msg = errors(settings_with(training={"replicaTimeoutSeconds": timeout}))
    assert f"lorastack:training.replicaTimeoutSeconds: {timeout} is out of range; allowed: 300-86400 seconds" in msg


@pytest.mark.parametrize("key", [k for k in SECRETS if k != "hfToken"])  # the HF token is optional (public models)
def test_missing_secret(key):
    msg = errors(settings_with(**{key: None}))
    assert f"{SRC}: lorastack:{key}: missing secret; set it with `pulumi config set --secret lorastack:{key}" in msg


def test_secret_in_plain_text_is_refused_without_echoing_it():
    msg = errors(BASE, secret_keys=["inferenceApiKeys"])
    assert "lorastack:hfToken: <value hidden> is stored in plain text" in msg
    assert BASE["hfToken"] not in msg


def test_existing_key_vault_makes_config_secrets_optional():
    kv = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv-platform"
    s = parse(settings_with(hfToken=None, inferenceApiKeys=None, keyVault={"existingId": kv}), secret_keys=[])
    assert s.key_vault.existing_id == kv


@pytest.mark.parametrize("changes, needle", [
    # issue 9: NFS stores cannot be written by the CLI (no Files REST API on NFS shares)
    ({"store": {"protocol": "nfs", "tier": "Premium", "quotaGiB": 100}},
     "lorastack:store.protocol: 'nfs' cannot be used: the Files REST API is not available on NFS shares"),
    ({"network": {"addressSpace": "10.0.0.0/16", "infrastructureSubnet": "10.0.0.0/28"}},
     "lorastack:network.infrastructureSubnet: '10.0.0.0/28' is too small"),
    ({"network": {"addressSpace": "10.0.0.0/16", "infrastructureSubnet": "10.9.0.0/23"}},
     "is not inside addressSpace"),
    ({"inference": {"minReplicas": 3, "maxReplicas": 2}}, "lorastack:inference.minReplicas: 3 is above maxReplicas 2"),
    ({"inference": {"ipAllowList": [{"name": "x", "cidr": "300.1.1.1/24"}]}},
     "lorastack:inference.ipAllowList[0].cidr: '300.1.1.1/24' is not an IPv4 CIDR range"),
    ({"inference": {"modelLoadSeconds": 5000}}, "lorastack:inference.modelLoadSeconds: 5000 is out of range"),
    ({"tier": "production"}, "lorastack:tier: 'production' is not allowed"),
    ({"store": {"tier": "Premium", "quotaGiB": 50}}, "below the Premium minimum"),
])
def test_other_validation_errors(changes, needle):
    assert needle in errors(settings_with(**changes))


def test_all_problems_are_reported_at_once():
    msg = errors(settings_with(inference={"gpuProfile": "T4"}, training={"gpuProfile": "A100"}))
    assert "training.gpuProfile" in msg and "inference.gpuProfile" in msg


def test_values_as_pulumi_config_strings_validate_the_same():
    import json

    raw = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in BASE.items()}
    assert parse(raw) == parse(BASE)


# --- stack file loader ---------------------------------------------------------------------------------------
def test_stack_file_loader_namespaces_and_marks_secrets(tmp_path):
    (tmp_path / "Pulumi.yaml").write_text(
        "name: lorastack\nruntime: python\nstackConfigDir: stacks\nconfig:\n"
        "  protect: {type: boolean, default: false}\n  hfToken: {type: string, secret: true}\n"
        "  location: {type: string}\n  inference: {description: required object}\n")
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.x.yaml").write_text(
        "config:\n  lorastack:location: westus3\n  lorastack:inference: {gpuProfile: NC24-A100}\n"
        "  lorastack:hfToken: {secure: v1:abc}\n")
    sf = load_stack("x", tmp_path)
    assert sf.config["lorastack:protect"] == "false"
    assert sf.config["lorastack:inference"] == '{"gpuProfile": "NC24-A100"}'
    assert sf.config["lorastack:hfToken"] == PLACEHOLDER and sf.secret_keys == ["lorastack:hfToken"]
    assert sf.display_path == "stacks/Pulumi.x.yaml"
    with pytest.raises(StackFileError, match="no stack file stacks/Pulumi.nope.yaml"):
        load_stack("nope", tmp_path)


def test_repo_stack_files_secrets_come_from_esc():
    sf = load_stack("dev", REPO, esc_secret_keys=tuple(SECRETS))
    assert sf.environments == ["lorastack/dev"]
    assert set(sf.from_environment) == {"lorastack:hfToken", "lorastack:inferenceApiKeys"}


@pytest.mark.parametrize("stack_text, needle", [
    ("config:\n  lorastack:hfToken: {secure: v1:x}\n  lorastack:inference: {}\n",
     "lorastack:location: missing; Pulumi.yaml declares it without a default"),
    ("config:\n  lorastack:location: westus3\n  lorastack:inference: {}\n  lorastack:hfToken: hf_plain\n",
     "lorastack:hfToken: must be encrypted"),
    (("config:\n  lorastack:location: westus3\n  lorastack:inference: {}\n  lorastack:hfToken: {secure: x}\n"
     "  lorastack:protect: 'yes'\n"), "lorastack:protect: 'yes' must be of type 'boolean'"),
])
def test_stack_file_checked_like_the_pulumi_cli(tmp_path, stack_text, needle):
    (tmp_path / "Pulumi.yaml").write_text(
        "name: lorastack\nruntime: python\nconfig:\n  protect: {type: boolean, default: false}\n"
        "  hfToken: {type: string, secret: true}\n  location: {type: string}\n  inference: {description: x}\n")
    (tmp_path / "Pulumi.y.yaml").write_text(stack_text)
    with pytest.raises(StackFileError, match=needle):
        load_stack("y", tmp_path)
    if "hf_plain" in stack_text:
        with pytest.raises(StackFileError) as e:
            load_stack("y", tmp_path)
        assert "hf_plain" not in str(e.value)
