"""Issue 9's "Why", one named test per failure a mock never shows, plus the catalogue of deploy-time rules that
settings, policies and `lorastack plan` cite (provisioning/rules.py) and its table in docs/provisioning.md."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from provisioning_helpers import BASE, PLATFORM_REF, REPO, SECRETS, planned, settings_with

from lorastack.cli import main as cli
from provisioning import contract, identity, naming, pipeline, policies, rules
from provisioning.guardrails import load_guardrails
from provisioning.plan import plan_stack, to_policy_resources
from provisioning.selfservice import RESERVED
from provisioning.settings import SettingsError, parse_settings
from provisioning.stackfile import available_stacks

G = load_guardrails(REPO)
ZERO = "0" * 64
TEAM_NAMES = st.from_regex(r"[a-z][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True).filter(
    lambda n: "--" not in n and n not in RESERVED and n not in G.stacks)


def errors(raw, stack="unit", secret_keys=SECRETS, tier=None) -> str:
    with pytest.raises(SettingsError) as e:
        parse_settings(raw, f"stacks/Pulumi.{stack}.yaml", stack, secret_keys, expected_tier=tier)
    return str(e.value)


# --- the catalogue -------------------------------------------------------------------------------------------
def test_every_rule_has_a_source_and_a_guard():
    assert len({r.id for r in rules.RULES}) == len(rules.RULES)
    for r in rules.RULES:
        assert re.fullmatch(r"[a-z0-9-]+", r.id) and r.rule and r.source and r.guard, r


def test_every_cited_rule_exists_and_docs_table_lists_every_rule():
    """Messages cite rules by id; a typo would fail at runtime, so every citation in the code is checked here."""
    cited = set()
    for path in (REPO / "provisioning").glob("*.py"):
        cited |= set(re.findall(r"cite\(['\"]([a-z0-9-]+)['\"]\)", path.read_text()))
        cited |= set(re.findall(r"\[rule ([a-z0-9-]+)\]", path.read_text()))
        cited |= set(re.findall(r'Change\([A-Z]+, "([a-z0-9-]+)"', path.read_text()))
    assert cited and cited <= set(rules.BY_ID), cited - set(rules.BY_ID)
    docs = (REPO / "docs" / "provisioning.md").read_text()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", docs, re.MULTILINE))
    assert rows == set(rules.BY_ID), (set(rules.BY_ID) - rows, rows - set(rules.BY_ID))


# --- Key Vault names -----------------------------------------------------------------------------------------
def test_guard_key_vault_name_of_team_data_science_a_has_no_double_hyphen():
    """Issue 9: `kv-data-science--4db4b7` (stripped before truncating) is refused by Azure."""
    name = naming.key_vault_name("lorastack", "data-science-a")
    assert "--" not in name and len(name) <= 24
    naming.check_key_vault_name(name)


@settings(max_examples=300, deadline=None)
@given(TEAM_NAMES)
def test_every_name_stack_new_accepts_gives_valid_azure_names(team):
    """Property: for any team name `stack new` accepts, every generated physical name follows Azure's rules."""
    naming.check_stack_name(team)
    naming.check_key_vault_name(naming.key_vault_name("lorastack", team))
    naming.check_storage_account_name(naming.storage_account_name("lorastack", team))
    assert naming.REGISTRY_RE.match(naming.registry_name("lorastack", team))
    names = naming.resource_names("lorastack", team)
    for key in ("environment", "job", "app"):
        naming.check_aca_name(names[key])
    for gen in (1, 2, 999):
        naming.check_aca_name(naming.environment_storage_name(gen, "store-ro"))


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "Pulumi.yaml", d)
    shutil.copytree(REPO / "stacks", d / "stacks")
    return d


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEAM_NAMES)
def test_stack_new_then_plan_passes_for_any_accepted_team_name(project_copy, team):
    """Done-when: `lorastack plan` passes any team name `stack new` accepts (rendered, every policy)."""
    from provisioning.selfservice import TeamRequest, create_team_stack

    new = create_team_stack(TeamRequest(team, "westus3", "Consumption-GPU-NC8as-T4", 1), project_copy)
    try:
        result = plan_stack(team, project_copy)
        assert result.ok, {k: v for k, v in result.verdicts.items() if v}
    finally:
        new.path.unlink()


# --- guardrails keyed by stack name, cost limits ------------------------------------------------------------
def test_guard_team_cannot_write_tier_dev_to_escape_guardrails():
    """Issue 9: a team stack file claiming `tier: dev` (10 always-on A100 in eastus) passed every policy."""
    raw = settings_with(location="eastus", inference={"gpuProfile": "Consumption-GPU-NC24-A100", "minReplicas": 10,
                                                      "maxReplicas": 10})
    msg = errors(raw, stack="ml-team", tier=G.tier_for("ml-team"))
    assert ("lorastack:tier: 'dev' is not this stack's tier: stacks/guardrails.yaml gives stack 'ml-team' tier 'team'"
            in msg and "[rule guardrails-by-stack]" in msg)


def test_policies_take_the_tier_from_the_stack_name_not_the_tags(offline):
    """Even with the settings check bypassed, the policies read the tier from the URN's stack name."""
    team = to_policy_resources(offline.render(settings_with(tier="team", hfToken=None, inferenceApiKeys=None),
                                              secret_keys=[]).resources)
    lying = [policies.Resource(r.type, r.name, {**r.props, "tags": {**(r.props.get("tags") or {}),
                                                                    policies.TIER_TAG: "dev"}}, r.urn, r.protect,
                               r.secret_paths) for r in team]
    assert policies.stack_tier(lying, G) == "team"


def test_guard_always_on_gpus_and_gpu_hours_are_limited(offline):
    team = to_policy_resources(offline.render(settings_with(tier="team", hfToken=None, inferenceApiKeys=None),
                                              secret_keys=[]).resources)
    assert policies.gpu_usage(team) == (0, 24 * 2 + 14400 / 3600)
    greedy = []
    for r in team:
        if r.type == policies.T_APP:
            props = copy.deepcopy(dict(r.props))
            props["template"]["scale"].update(minReplicas=10, maxReplicas=10)
            r = policies.Resource(r.type, r.name, props, r.urn, r.protect, r.secret_paths)
        greedy.append(r)
    found = [v.message for v in policies.evaluate(greedy, G)["gpu-cost-limits"]]
    assert any("10 always-on GPUs" in m and "limit of 0" in m for m in found)
    assert any("GPU replica-hours a day" in m for m in found)


def test_repo_stacks_are_within_their_cost_limits():
    for stack in available_stacks(REPO):
        assert not planned(stack).verdicts["gpu-cost-limits"], stack


# --- policies on output-shaped properties -------------------------------------------------------------------
DISPLAY = {"westus3": "West US 3", "eastus": "East US"}


def output_shaped(resources):
    """What a policy sees on a real `pulumi up` (outputs): Microsoft.App's display locations, ids filled in, the
    identity map instead of the list, provisioning state."""
    out = []
    for r in resources:
        props = copy.deepcopy(dict(r.props))
        if isinstance(props.get("location"), str):
            props["location"] = DISPLAY.get(props["location"], props["location"])
        props.update(id=f"/subscriptions/s/resourceGroups/rg/providers/x/{r.name}", provisioningState="Succeeded")
        ids = (props.get("identity") or {}).get("userAssignedIdentities")
        if isinstance(ids, list):
            props["identity"]["userAssignedIdentities"] = {i: {"principalId": "p", "clientId": "c"} for i in ids}
        out.append(policies.Resource(r.type, r.name, props, r.urn, r.protect, None))
    return out


@pytest.mark.parametrize("stack", ["vision", "prod", "dev"])
def test_guard_policies_pass_on_output_shaped_properties(stack):
    """Issue 9: Microsoft.App returns "West US 3"; self-service-limits must not fail every team resource."""
    result = planned(stack)
    verdicts = policies.evaluate(output_shaped(to_policy_resources(result.resources)), G)
    assert not any(verdicts.values()), {k: v for k, v in verdicts.items() if v}


def test_output_shaped_violation_is_still_caught():
    res = output_shaped(to_policy_resources(planned("vision").resources))
    moved = [policies.Resource(r.type, r.name, {**r.props, "location": "East US"}, r.urn, r.protect, None)
             if r.type == policies.T_APP else r for r in res]
    found = [v.message for v in policies.evaluate(moved, G)["self-service-limits"]]
    assert found == ["location 'East US' is not allowed for team stacks; allowed: westus3"]


# --- team isolation and the platform split -------------------------------------------------------------------
def test_guard_team_identity_reads_only_its_own_secrets():
    """Issue 9: team identities had Key Vault Secrets User on the whole shared vault."""
    r = planned("vision")
    vault = r.outputs["keyVaultId"]
    kv_grants = [x for x in r.resources if x.type.endswith("RoleAssignment")
                 and x.get("roleDefinitionId").endswith(identity.KEY_VAULT_SECRETS_USER)]
    assert sorted(x.get("scope") for x in kv_grants) == [f"{vault}/secrets/vision-api-keys",
                                                         f"{vault}/secrets/vision-hf-token"]


def test_guard_team_stacks_join_the_platform_environment():
    """Issue 9: each team stack created its own environment, so GPU quota (per environment) was requested per team."""
    platform, team = planned("platform"), planned("vision")
    assert not [x for x in team.resources if x.type.split(":")[-1] in ("ManagedEnvironment", "Workspace", "Vault")]
    assert any(f"StackReference {PLATFORM_REF}" in n for n in team.notes)
    env_id = platform.outputs["environmentId"]
    for x in team.resources:
        if x.type.split(":")[-1] in ("Job", "ContainerApp"):
            assert x.get("environmentId") == env_id
    links = [x for x in team.resources if x.type.endswith("ManagedEnvironmentsStorage")]
    assert {x.get("environmentName") for x in links} == {"cae-lorastack-platform"}
    assert {x.get("resourceGroupName") for x in links} == {"rg-lorastack-platform"}
    assert team.outputs["acrLoginServer"] == platform.outputs["acrLoginServer"] == "lorastackplatform.azurecr.io"


def test_team_profile_must_exist_in_the_platform_environment(offline):
    import pulumi

    raw = settings_with(tier="team", hfToken=None, inferenceApiKeys=None, inference={"gpuProfile": "NC24-A100"})
    with pytest.raises((pulumi.RunError, SettingsError, Exception), match="not allowed for team stacks|dedicated|no "
                                                                          "workload profile"):
        offline.render(raw, secret_keys=[])


def test_team_stack_may_not_set_platform_things():
    raw = settings_with(tier="team", hfToken=None, inferenceApiKeys=None,
                        network={"addressSpace": "10.0.0.0/16", "infrastructureSubnet": "10.0.0.0/23"})
    assert "lorastack:network: is set by the platform stack for team stacks" in errors(raw, secret_keys=[])


# --- networking ----------------------------------------------------------------------------------------------
def test_guard_internal_environment_without_a_way_in_is_refused():
    """Issue 9: prod was an internal environment in an isolated VNet: nothing could reach it."""
    msg = errors(settings_with(network={"addressSpace": "10.0.0.0/16", "infrastructureSubnet": "10.0.0.0/23",
                                        "internal": True}))
    assert "lorastack:network.internal: true is not supported" in msg and "[rule internal-unreachable]" in msg


@pytest.mark.parametrize("cidr", ["10.1.0.0/16", "192.168.1.0/24", "198.51.100.6/31"])
def test_store_client_ranges_must_be_public(cidr):
    msg = errors(settings_with(network={"addressSpace": "10.0.0.0/16", "infrastructureSubnet": "10.0.0.0/23",
                                        "clientCidrs": [{"name": "x", "cidr": cidr}]}))
    assert "cannot be a storage firewall rule" in msg


def test_guard_prod_plan_says_who_reaches_the_endpoint_and_the_store(capsys):
    """Issue 9: the storage firewall was Deny with no rule, so the CLI got 403 from laptops and CI."""
    assert cli(["plan", "--stack", "prod", "--project-dir", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert "endpoint: public, admits only corp-egress 203.0.113.0/24" in out
    assert "store: firewall denies all but the environment's subnet and corp-egress 203.0.113.0/24" in out


# --- the smaller ones ----------------------------------------------------------------------------------------
def test_guard_cold_start_longer_than_the_ingress_timeout_is_refused():
    """Issue 9: dev scaled to zero with modelLoadSeconds 420, so the waking request got a 504."""
    msg = errors(settings_with(inference={"minReplicas": 0, "modelLoadSeconds": 420}))
    assert "lorastack:inference.modelLoadSeconds: 420 with minReplicas 0" in msg and "504 after 240 s" in msg
    parse_settings(settings_with(inference={"minReplicas": 1, "modelLoadSeconds": 420}), "s", "unit", SECRETS)


def test_guard_purge_protection_off_in_dev_on_in_prod():
    """Issue 9: purge protection on a fixed-name dev vault made `destroy` then `up` conflict."""
    msg = errors(settings_with(keyVault={"purgeProtection": True}))
    assert "lorastack:keyVault.purgeProtection: true is not allowed in tier 'dev'" in msg
    dev = planned("dev")
    vault = next(x for x in dev.resources if x.type.endswith(":Vault"))
    assert "enablePurgeProtection" not in vault.get("properties")
    prod = planned("prod")
    assert next(x for x in prod.resources if x.type.endswith(":Vault")).get("properties.enablePurgeProtection")


def test_guard_aca_1406_links_never_take_a_new_key_in_place(offline):
    """Issue 9: a storage key rotated outside Pulumi re-keyed the mount in place on the next up (ACA#1406)."""
    for link in offline.render(settings_with()).by_type("ManagedEnvironmentsStorage"):
        assert link.ignore_changes == ["properties.azureFile.accountKey"]


def test_guard_role_assignments_wait_for_propagation(offline):
    """Issue 9: a first up could fail resolving Key Vault references because grants were not propagated yet."""
    r = offline.render(settings_with())
    for grant in r.by_type("RoleAssignment"):
        assert grant.after_create_hooks == ["identity-wait-for-rbac-propagation"]
    for res in (r.one("Job"), r.one("ContainerApp")):
        assert {g.urn for g in r.by_type("RoleAssignment")} <= set(res.dependencies)
    slept = []
    identity.wait_for_propagation(None, sleep=slept.append)
    assert slept == [rules.RBAC_PROPAGATION_SECONDS]


def test_guard_smb_mount_has_nobrl_and_datasets_cache_on_the_share(offline):
    """Issue 9: SMB mounts without nobrl stall file-lock users; HF_DATASETS_CACHE was left on the 8 GiB disk."""
    r = offline.render(settings_with())
    for res in (r.one("Job"), r.one("ContainerApp")):
        assert "nobrl" in res.get("template.volumes")[0]["mountOptions"].split(",")
    env = {e["name"]: e.get("value") for e in r.one("Job").get("template.containers")[0]["env"]}
    assert env["HF_DATASETS_CACHE"] == contract.HF_DATASETS_CACHE
    assert env["HF_DATASETS_CACHE"].startswith(contract.STORE_MOUNT_PATH + "/")


@pytest.mark.parametrize("max_replicas, sticky", [(1, None), (2, {"affinity": "sticky"})])
def test_guard_sticky_sessions_with_several_replicas(offline, max_replicas, sticky):
    """Issue 9: with several replicas Gradio answers "Session not found" without session affinity."""
    app = offline.render(settings_with(inference={"maxReplicas": max_replicas})).one("ContainerApp")
    assert app.get("configuration.ingress.stickySessions") == sticky
    assert app.get("configuration.activeRevisionsMode") == "Single"  # sticky sessions need single revision mode


def test_guard_dedicated_gpu_outside_the_listed_regions_is_refused():
    """Issue 9: staging put dedicated NC24-A100 in swedencentral, where the docs list no dedicated GPUs."""
    msg = errors(settings_with(location="swedencentral", training={"gpuProfile": "NC24-A100"}))
    assert "lorastack:training.gpuProfile: 'NC24-A100' is a dedicated GPU profile, which 'swedencentral'" in msg
    assert yaml.safe_load((REPO / "stacks" / "Pulumi.staging.yaml").read_text())["config"][
        "lorastack:location"] in rules.DEDICATED_GPU_REGIONS


@pytest.mark.parametrize("tier", ["staging", "prod"])
def test_guard_tags_refused_in_staging_and_prod(tier):
    """Issue 10: never a mutable tag in a staging/prod stack file."""
    raw = settings_with(tier=tier, images={"trainer": "acme.azurecr.io/lorastack-trainer:0.1.0"})
    msg = errors(raw, stack=tier, tier=tier)
    assert "lorastack:images.trainer: 'acme.azurecr.io/lorastack-trainer:0.1.0' is not pinned by digest" in msg
    assert "images.inference" not in msg  # BASE's inference image is a digest


def test_repo_stack_files_pin_images_where_the_tier_requires_it():
    for stack in available_stacks(REPO):
        cfg = yaml.safe_load((REPO / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]
        images = cfg["lorastack:images"]
        for key, repo in (("trainer", "lorastack-trainer"), ("inference", "lorastack-inference")):
            assert images[key].split("@")[0].split(":")[0].endswith("/" + repo), (stack, images[key])  # docs/images.md
            if G.tier_for(stack) in rules.DIGEST_TIERS:
                assert images[key].endswith("@sha256:" + ZERO), (stack, key)  # the documented placeholder


def test_platform_stack_provisions_the_registry_and_grants_acr_pull():
    r = planned("platform")
    acr = next(x for x in r.resources if x.type == "azure-native:containerregistry:Registry")
    assert (acr.get("registryName"), acr.get("adminUserEnabled"), acr.get("sku.name")) == (
        "lorastackplatform", False, "Premium")
    assert r.outputs["acrLoginServer"] == "lorastackplatform.azurecr.io" and r.outputs["acrName"] == "lorastackplatform"
    pulls = [x for x in r.resources if x.type.endswith("RoleAssignment")
             and x.get("roleDefinitionId").endswith(identity.ACR_PULL)]
    assert [x.get("scope") for x in pulls] == [r.outputs["acrId"]]
    for x in r.resources:
        if x.type.split(":")[-1] in ("Job", "ContainerApp"):
            assert x.get("configuration.registries") == [{"server": "lorastackplatform.azurecr.io",
                                                          "identity": x.get("identity.userAssignedIdentities")[0]}]


def test_registry_brought_or_created_not_both():
    acr = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ContainerRegistry/registries/acme"
    msg = errors(settings_with(images={"registry": {"create": True, "server": "acme.azurecr.io", "resourceId": acr}}))
    assert "lorastack:images.registry.create: true cannot be combined with server/resourceId" in msg


def test_base_model_reaches_the_app_as_env_vars(offline):
    """Issue 7 item 6: the app is told its base model, so it starts with an empty store."""
    app = offline.render(settings_with(inference={"baseModel": "Qwen/Qwen2.5-0.5B-Instruct",
                                                  "baseRevision": "7ae557604adf67be50417f59c2c2f167def9a775"}))
    env = {e["name"]: e.get("value") for e in app.one("ContainerApp").get("template.containers")[0]["env"]}
    assert env[contract.ENV_BASE_MODEL] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert env[contract.ENV_BASE_REVISION] == "7ae557604adf67be50417f59c2c2f167def9a775"
    assert (contract.ENV_BASE_MODEL, contract.ENV_BASE_REVISION) == ("LORASTACK_BASE_MODEL", "LORASTACK_BASE_REVISION")
    plain = offline.render(settings_with()).one("ContainerApp").get("template.containers")[0]["env"]
    assert contract.ENV_BASE_MODEL not in {e["name"] for e in plain}


def test_app_counts_auth_failures_per_client_behind_the_ingress(offline):
    """Issue 11 item 6 in the cloud: wrong keys are throttled per client, so the app must read the client address
    behind ACA's one ingress proxy (the name is the one `lorastack serve` reads)."""
    from lorastack.commands.serve import ENV_PROXY_HOPS

    env = {e["name"]: e.get("value") for e in offline.render(settings_with()).one("ContainerApp").get(
        "template.containers")[0]["env"]}
    assert env[contract.ENV_PROXY_HOPS] == "1" and contract.ENV_PROXY_HOPS == ENV_PROXY_HOPS


# --- pipeline metadata and CODEOWNERS ------------------------------------------------------------------------
def test_pipeline_metadata_is_in_step_with_the_stack_files():
    assert pipeline.pipeline_problems(REPO, available_stacks(REPO), G) == []
    data = pipeline.load_pipeline(REPO)
    order = [s for s, _ in sorted(data["stacks"].items(), key=lambda kv: kv[1]["order"])]
    assert order[0] == "platform" and order[-1] == "prod"
    assert data["stacks"]["vision"]["dependsOn"] == ["platform"]
    assert all(e["previewEnvironment"] == f"preview-{s}" and e["deployEnvironment"] == f"stack-{s}"
               for s, e in data["stacks"].items())


def test_codeowners_protects_the_guardrails_and_the_policy_pack():
    owners = (REPO / ".github" / "CODEOWNERS").read_text()
    for path in ("/stacks/guardrails.yaml", "/policy/", "/provisioning/policies.py"):
        assert re.search(rf"^{re.escape(path)}\s+@\S+", owners, re.MULTILINE), path


def test_base_fixture_is_a_valid_dev_stack():
    assert parse_settings(BASE, "s", "dev", SECRETS, expected_tier="dev").tier == "dev"


def test_hf_token_is_optional_for_public_models(offline):
    """Issue 8 item 2: with no HF token the stack still renders; the job and app reference no hf-token secret and
    get no HF_TOKEN (a public base model needs none). With a token, both read it from Key Vault."""
    without = offline.render(settings_with(hfToken=None))
    for kind, secrets_path in (("Job", "configuration.secrets"), ("ContainerApp", "configuration.secrets")):
        res = without.one(kind)
        assert contract.SECRET_HF_TOKEN not in {s["name"] for s in res.get(secrets_path) or []}
        assert contract.ENV_HF_TOKEN not in {e["name"] for e in res.get("template.containers")[0]["env"]}
    assert not [x for x in without.by_type("Secret") if "hf-token" in x.name]
    with_token = offline.render(settings_with())
    for kind in ("Job", "ContainerApp"):
        assert contract.SECRET_HF_TOKEN in {s["name"] for s in with_token.one(kind).get("configuration.secrets")}
