"""Each component's inputs as sent to the provider (real pulumi-azure-native classes under Pulumi's mocks),
secrets, ordering and protection, and one named test per known ACA failure mode."""

from __future__ import annotations

import pytest
from provisioning_helpers import BASE, settings_with

from provisioning import contract
from provisioning.identity import ACR_PULL, KEY_VAULT_SECRETS_USER
from provisioning.outputs import OUTPUTS, ai_toolkit_configs

KV_ID = "/subscriptions/s/resourceGroups/rg-platform/providers/Microsoft.KeyVault/vaults/kv-platform"
ACR_ID = "/subscriptions/s/resourceGroups/rg-shared/providers/Microsoft.ContainerRegistry/registries/acme"
VNET = {"addressSpace": "10.40.0.0/16", "infrastructureSubnet": "10.40.0.0/23"}
UAI_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-lorastack-dev/providers/"
          "Microsoft.ManagedIdentity/userAssignedIdentities/id-lorastack-dev")


def container(r):
    return r.get("template.containers")[0]


def env_vars(r):
    return {e["name"]: e for e in container(r)["env"]}


# --- environment ---------------------------------------------------------------------------------------------
def test_environment_profiles_and_logs(offline):
    r = offline.render(settings_with())
    env = r.one("ManagedEnvironment")
    assert env.get("workloadProfiles") == [
        {"name": "Consumption", "workloadProfileType": "Consumption", "enableFips": False},
        {"name": "gpu-a100", "workloadProfileType": "Consumption-GPU-NC24-A100", "enableFips": False},
        {"name": "gpu-t4", "workloadProfileType": "Consumption-GPU-NC8as-T4", "enableFips": False},
    ]
    assert env.get("appLogsConfiguration") == {"destination": "azure-monitor"}
    diag = r.one("DiagnosticSetting")
    assert diag.get("logs") == [{"categoryGroup": "allLogs", "enabled": True}]
    assert diag.get("workspaceId") == r.one("Workspace").get("id", "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-lorastack-dev/providers/Microsoft.OperationalInsights/workspaces/log-lorastack-dev")
    assert r.one("Workspace").get("retentionInDays") == 30


def test_dedicated_profile_gets_node_counts(offline):
    r = offline.render(settings_with(training={"gpuProfile": "NC48-A100", "minNodes": 0, "maxNodes": 2}))
    profiles = {p["name"]: p for p in r.one("ManagedEnvironment").get("workloadProfiles")}
    assert profiles["nc48-a100"]["minimumCount"] == 0 and profiles["nc48-a100"]["maximumCount"] == 2
    assert "minimumCount" not in profiles["gpu-t4"]
    job = r.one("Job")
    assert job.get("workloadProfileName") == "nc48-a100"
    assert container(job)["resources"] == {"cpu": 48, "memory": "440Gi"}


def test_vnet_integration_external_environment_with_named_client_ranges(offline):
    """Issue 9 "prod cannot be reached": the environment is external (public endpoint behind the IP allow-list) and
    the store's firewall admits the subnet AND the named client ranges, so the CLI from a laptop or CI works."""
    r = offline.render(settings_with(network={**VNET, "clientCidrs": [
        {"name": "corp", "cidr": "203.0.113.0/24"}, {"name": "ci-runner", "cidr": "198.51.100.7/32"}]}))
    subnet = r.one("Subnet")
    assert subnet.get("addressPrefix") == "10.40.0.0/23"
    assert subnet.get("delegations") == [{"name": "aca", "serviceName": "Microsoft.App/environments"}]
    assert subnet.get("serviceEndpoints") == [{"service": "Microsoft.Storage"}]
    env = r.one("ManagedEnvironment")
    assert env.get("vnetConfiguration.internal") is False
    assert env.get("vnetConfiguration.infrastructureSubnetId") == subnet.get("id", r.outputs and env.get(
        "vnetConfiguration.infrastructureSubnetId"))
    acct = r.one("StorageAccount")
    assert acct.get("networkRuleSet.defaultAction") == "Deny"
    assert acct.get("networkRuleSet.virtualNetworkRules")[0]["virtualNetworkResourceId"].endswith(
        "/subnets/aca-infrastructure")
    # a single host is a bare address: storage ipRules refuse /32
    assert acct.get("networkRuleSet.ipRules") == [{"iPAddressOrRange": "203.0.113.0/24", "action": "Allow"},
                                                  {"iPAddressOrRange": "198.51.100.7", "action": "Allow"}]


SUBNET_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-net/providers/"
             "Microsoft.Network/virtualNetworks/hub/subnets/aca")


def test_brought_subnet_is_read_and_used_unchanged(offline):
    r = offline.render(settings_with(network={"infrastructureSubnetId": SUBNET_ID}))
    assert not r.by_type("Subnet") and not r.by_type("VirtualNetwork")
    assert r.one("ManagedEnvironment").get("vnetConfiguration.infrastructureSubnetId") == SUBNET_ID
    assert any(c.token == "azure-native:network:getSubnet" and c.args["subnetName"] == "aca" for c in r.mocks.calls)


def test_guard_brought_subnet_without_storage_service_endpoint_fails_before_the_store(offline):
    """Issue 9: a brought subnet without the Microsoft.Storage service endpoint makes the storage VNet rule fail
    at deploy time; the program reads the subnet and stops with what to do."""
    with pytest.raises(Exception, match=r"no Microsoft.Storage service endpoint.*\[rule subnet-storage-endpoint\]"):
        offline.render(settings_with(network={"infrastructureSubnetId": SUBNET_ID}), subnets={SUBNET_ID: {
            "serviceEndpoints": [], "delegations": [{"name": "aca", "serviceName": "Microsoft.App/environments"}]}})


# --- store ---------------------------------------------------------------------------------------------------
def test_storage_account_hardening_and_smb_settings(offline):
    r = offline.render(settings_with(store={"quotaGiB": 512, "softDeleteDays": 9}))
    acct = r.one("StorageAccount")
    assert acct.get("minimumTlsVersion") == "TLS1_2"
    assert acct.get("enableHttpsTrafficOnly") is True and acct.get("allowBlobPublicAccess") is False
    assert (acct.get("kind"), acct.get("sku.name")) == ("StorageV2", "Standard_LRS")
    smb = r.one("FileServiceProperties").get("protocolSettings.smb")
    assert smb["channelEncryption"] == "AES-128-GCM;AES-256-GCM"
    assert smb["authenticationMethods"] == "NTLMv2;Kerberos" and smb["versions"] == "SMB3.0;SMB3.1.1"
    assert r.one("FileServiceProperties").get("shareDeleteRetentionPolicy") == {"enabled": True, "days": 9}
    share = r.one("FileShare")
    assert (share.get("shareQuota"), share.get("enabledProtocols")) == (512, "SMB")


def test_environment_storage_links_carry_the_key_as_secret(offline):
    r = offline.render(settings_with())
    links = {x.get("storageName"): x for x in r.by_type("ManagedEnvironmentsStorage")}
    assert set(links) == {"store-k1", "store-ro-k1"}
    assert links["store-k1"].get("properties.azureFile.accessMode") == "ReadWrite"
    assert links["store-ro-k1"].get("properties.azureFile.accessMode") == "ReadOnly"
    for link in links.values():
        assert link.get("properties.azureFile.accountKey") == "mock-key-1=="
        assert "properties" in link.secret_paths  # the key-bearing object went to the provider as a secret


def test_guard_aca_1406_key_rotation_rolls_to_a_new_storage_link(offline):
    """ACA#1406: updating an environment storage's key breaks new mounts; a new generation is a new link."""
    r = offline.render(settings_with(store={"keyGeneration": 2}))
    links = {x.get("storageName"): x for x in r.by_type("ManagedEnvironmentsStorage")}
    assert set(links) == {"store-k2", "store-ro-k2"}
    assert links["store-k2"].get("properties.azureFile.accountKey") == "mock-key-2=="  # the other key
    assert r.one("Job").get("template.volumes")[0]["storageName"] == "store-k2"
    assert r.one("ContainerApp").get("template.volumes")[0]["storageName"] == "store-ro-k2"


# --- identity and secrets ------------------------------------------------------------------------------------
def test_key_vault_and_secrets(offline):
    r = offline.render(settings_with())
    vault = r.one("Vault").get("properties")
    assert vault["enableRbacAuthorization"] is True and vault["enableSoftDelete"] is True
    assert vault["tenantId"] == "11111111-1111-1111-1111-111111111111"
    assert "enablePurgeProtection" not in vault  # dev: tear down at will [rule kv-purge-teardown]
    secrets = {s.get("secretName"): s for s in r.by_type("keyvault:Secret")}
    assert secrets["hf-token"].get("properties.value") == "hf_test_token_value"
    assert secrets["inference-api-keys"].get("properties.value") == "key-one,key-two"
    assert all("properties" in s.secret_paths for s in secrets.values())
    vault_id = r.one("Vault").get("id", "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/"
                                       "rg-lorastack-dev/providers/Microsoft.KeyVault/vaults/" + r.one("Vault")
                                       .get("vaultName"))
    grants = {g.get("scope"): g for g in r.by_type("RoleAssignment")}
    assert set(grants) == {f"{vault_id}/secrets/hf-token", f"{vault_id}/secrets/inference-api-keys"}
    for g in grants.values():
        assert g.get("roleDefinitionId").endswith(KEY_VAULT_SECRETS_USER)
        assert g.get("principalType") == "ServicePrincipal"


def test_job_and_app_reference_key_vault_by_url_and_identity(offline):
    """PAN#2673: a Key Vault secret needs keyVaultUrl *and* identity, or ACA refuses it."""
    r = offline.render(settings_with())
    uai_id = UAI_ID
    for res, names in ((r.one("Job"), {"hf-token"}), (r.one("ContainerApp"), {"hf-token", "api-keys"})):
        secrets = {s["name"]: s for s in res.get("configuration.secrets")}
        assert set(secrets) == names
        for s in secrets.values():
            assert s["keyVaultUrl"].startswith("https://kv-dev-") and "/secrets/" in s["keyVaultUrl"]
            assert s["identity"] == uai_id and "value" not in s
        assert res.get("identity") == {"type": "UserAssigned", "userAssignedIdentities": [uai_id]}


def test_guard_aca_733_identity_and_grants_exist_before_job_and_app(offline):
    """ACA#733/#1174: a system identity cannot be granted in time; the UAI's role assignments come first."""
    r = offline.render(settings_with(images={"registry": {"server": "acme.azurecr.io", "resourceId": ACR_ID}}))
    grants = {g.urn for g in r.by_type("RoleAssignment")}
    assert len(grants) == 3  # one per secret, AcrPull
    assert {g.get("roleDefinitionId").rsplit("/", 1)[-1] for g in r.by_type("RoleAssignment")} == {
        KEY_VAULT_SECRETS_USER, ACR_PULL}
    for res in (r.one("Job"), r.one("ContainerApp")):
        assert grants <= set(res.dependencies)
        assert res.get("configuration.registries") == [
            {"server": "acme.azurecr.io", "identity": UAI_ID}]


def test_bring_your_own_key_vault(offline):
    r = offline.render(settings_with(hfToken=None, inferenceApiKeys=None,
                                     keyVault={"existingId": KV_ID, "hfTokenSecretName": "t-hf"}), secret_keys=[])
    assert not r.by_type("keyvault:Vault") and not r.by_type("keyvault:Secret")
    # [rule kv-least-privilege] the identity reads its two secrets, not the whole (shared) vault
    assert {g.get("scope") for g in r.by_type("RoleAssignment")} == {f"{KV_ID}/secrets/t-hf",
                                                                     f"{KV_ID}/secrets/inference-api-keys"}
    secrets = {s["name"]: s["keyVaultUrl"] for s in r.one("ContainerApp").get("configuration.secrets")}
    assert secrets["hf-token"] == "https://kv-platform.vault.azure.net/secrets/t-hf"
    assert r.outputs["keyVaultName"] == "kv-platform"
    read = next(c for c in r.mocks.calls if c.token == "azure-native:keyvault:getVault")  # read, never modified
    assert read.args == {"resourceGroupName": "rg-platform", "vaultName": "kv-platform"}


# --- training job --------------------------------------------------------------------------------------------
def test_training_job_inputs(offline):
    r = offline.render(settings_with(training={"replicaTimeoutSeconds": 7200, "replicaRetryLimit": 2}))
    job = r.one("Job")
    cfg = job.get("configuration")
    assert cfg["triggerType"] == "Manual" and cfg["replicaTimeout"] == 7200 and cfg["replicaRetryLimit"] == 2
    assert cfg["manualTriggerConfig"] == {"parallelism": 1, "replicaCompletionCount": 1}
    assert job.get("workloadProfileName") == "gpu-a100"
    c = container(job)
    assert c["image"] == BASE["images"]["trainer"]
    # the image's entrypoint (`lorastack train --store $LORASTACK_STORE`, claiming the next queued run) is kept
    assert "command" not in c and "args" not in c
    assert env_vars(job)["LORASTACK_STORE"]["value"] == "/mnt/store"
    assert c["resources"] == {"cpu": 24, "memory": "220Gi"}
    assert c["volumeMounts"] == [{"volumeName": "store", "mountPath": "/mnt/store"}]
    assert env_vars(job)["HF_TOKEN"] == {"name": "HF_TOKEN", "secretRef": "hf-token"}
    # the image runs as UID 10001: the SMB mount must be owned by it, or the trainer cannot write checkpoints
    assert job.get("template.volumes") == [
        {"name": "store", "storageType": "AzureFile", "storageName": "store-k1",
         "mountOptions": "uid=10001,gid=10001,mfsymlinks,nobrl"}
    ]


def test_guard_ephemeral_disk_8gib_hf_cache_on_the_share(offline):
    """ACA#1779/#896: the replica disk is 8 GiB even on GPU profiles; the HF cache must live on the share."""
    r = offline.render(settings_with())
    assert env_vars(r.one("Job"))["HF_HOME"]["value"] == "/mnt/store/models"
    assert env_vars(r.one("Job"))["HF_HUB_CACHE"]["value"] == "/mnt/store/models"  # what the store calls models/
    app_env = env_vars(r.one("ContainerApp"))
    assert app_env["HF_HUB_CACHE"]["value"] == "/mnt/store/models" and app_env["HF_HUB_OFFLINE"]["value"] == "1"
    assert all(m["mountPath"] == contract.STORE_MOUNT_PATH and "subPath" not in m
               for res in (r.one("Job"), r.one("ContainerApp")) for m in container(res)["volumeMounts"])


def test_guard_aca_1511_gpu_jobs_retry_by_default(offline):
    """ACA#1511: GPU job replicas fail spuriously before start; the default retry limit is 1, not 0."""
    assert offline.render(settings_with()).one("Job").get("configuration.replicaRetryLimit") == 1


# --- inference app -------------------------------------------------------------------------------------------
def test_inference_app_ingress_scale_and_mount(offline):
    r = offline.render(settings_with(inference={
        "maxReplicas": 3, "concurrentRequests": 6, "cooldownSeconds": 700,
        "ipAllowList": [{"name": "corp", "cidr": "203.0.113.0/24"}]}))
    a = r.one("ContainerApp")
    ing = a.get("configuration.ingress")
    assert ing["external"] is True and ing["allowInsecure"] is False and ing["targetPort"] == 8000
    assert ing["ipSecurityRestrictions"] == [{"name": "corp", "ipAddressRange": "203.0.113.0/24", "action": "Allow"}]
    scale = a.get("template.scale")
    assert (scale["minReplicas"], scale["maxReplicas"], scale["cooldownPeriod"]) == (0, 3, 700)
    assert scale["rules"] == [{"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "6"}}}]
    assert len(a.get("template.containers")) == 1  # serverless GPU: only the first container gets the GPU
    c = container(a)
    assert c["args"] == ["serve", "--store", "/mnt/store", "--host", "0.0.0.0", "--port", "8000"]
    assert c["resources"] == {"cpu": 8, "memory": "56Gi"} and a.get("workloadProfileName") == "gpu-t4"
    assert env_vars(a)["LORASTACK_API_KEYS"] == {"name": "LORASTACK_API_KEYS", "secretRef": "api-keys"}
    assert a.get("template.volumes")[0]["storageName"] == "store-ro-k1"  # the ReadOnly link


def test_guard_startup_probe_sized_for_model_load(offline):
    """The AI Toolkit probes `/` with a ~160 s startup window; a several-minute model load needs more."""
    r = offline.render(settings_with(inference={"minReplicas": 1, "modelLoadSeconds": 600}))
    probes = {p["type"]: p for p in container(r.one("ContainerApp"))["probes"]}
    s = probes["Startup"]
    assert s["initialDelaySeconds"] + s["periodSeconds"] * s["failureThreshold"] >= 600
    assert s["httpGet"] == {"path": "/healthz", "port": 8000, "scheme": "HTTP"}
    assert probes["Readiness"]["httpGet"]["path"] == "/readyz"
    assert probes["Liveness"]["httpGet"]["path"] == "/healthz"


def test_entra_sign_in(offline):
    r = offline.render(settings_with(inference={"entraAuth": {
        "clientId": "22222222-2222-2222-2222-222222222222", "tenantId": "11111111-1111-1111-1111-111111111111"}}))
    auth = r.one("ContainerAppsAuthConfig")
    assert auth.get("platform.enabled") is True
    # [rule easy-auth-browser] a browser is sent to sign in; /v1 is excluded and answers its own 401 (API key)
    assert auth.get("globalValidation.unauthenticatedClientAction") == "RedirectToLoginPage"
    assert auth.get("globalValidation.redirectToProvider") == "azureactivedirectory"
    assert {"/healthz", "/readyz", "/v1/*"} <= set(auth.get("globalValidation.excludedPaths"))
    aad = auth.get("identityProviders.azureActiveDirectory")
    assert aad["registration"]["openIdIssuer"] == "https://login.microsoftonline.com/11111111-1111-1111-1111-111111111111/v2.0"
    assert container(r.one("ContainerApp"))["args"][-1] == "--trust-easy-auth"  # the UI reads Easy Auth headers
    plain = offline.render(settings_with())
    assert not plain.by_type("ContainerAppsAuthConfig")
    assert "--trust-easy-auth" not in container(plain.one("ContainerApp"))["args"]


# --- structure, outputs, secrets -----------------------------------------------------------------------------
def test_children_are_parented_to_their_components(offline):
    r = offline.render(settings_with())
    parents = {x.name: r.resources[[y.urn for y in r.resources].index(x.parent)].name if x.parent in
               [y.urn for y in r.resources] else None for x in r.resources}
    assert parents["platform-env"] == "platform" and parents["platform-logs"] == "platform"
    assert parents["store-account"] == "store" and parents["identity-vault"] == "identity"
    assert parents["training-job"] == "training" and parents["inference-app"] == "inference"


def test_outputs_map_to_ai_toolkit_keys_and_hold_no_secret(offline):
    r = offline.render(settings_with())
    assert set(r.outputs) == set(OUTPUTS)
    assert not r.secret_outputs
    flat = " ".join(str(v) for v in r.outputs.values())
    assert "hf_test_token_value" not in flat and "mock-key-1" not in flat and "key-one" not in flat
    cfg = ai_toolkit_configs(r.outputs)
    assert cfg["finetuning.config.json"] == {
        "SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000", "RESOURCE_GROUP_NAME": "rg-lorastack-dev",
        "STORAGE_ACCOUNT_NAME": r.outputs["storageAccountName"], "FILE_SHARE_NAME": "store",
        "ACA_JOB_NAME": "lorastack-dev-train"}
    assert cfg["inference.config.json"]["ACA_APP_ENDPOINT"] == (
        "https://lorastack-dev-serve.mock.westus3.azurecontainerapps.io")
    assert r.outputs["storeMountPath"] == "/mnt/store"


def test_guard_pan_1693_listed_keys_and_log_key_never_plain(offline):
    """PAN#1693 / pulumi/examples#1651: listed keys are not secret by themselves; the Log Analytics key is not
    read at all (azure-monitor destination), the storage key only ever travels inside a secret."""
    r = offline.render(settings_with())
    assert not [c for c in r.mocks.calls if c.token.endswith("getSharedKeys")]
    for res in r.resources:
        if "mock-key-1==" in repr(res.inputs):
            assert res.secret_paths, res.name


def test_settings_error_stops_before_any_resource(offline):
    import pulumi

    with pytest.raises(pulumi.RunError, match="lorastack:inference.gpuProfile: 'T4' is not a GPU profile type"):
        offline.render(settings_with(inference={"gpuProfile": "T4"}))


def test_protect_follows_settings(offline):
    r = offline.render(settings_with(protect=True))
    protected = {x.type.split(":")[-1] for x in r.resources if x.protect}
    assert protected == {"ResourceGroup", "ManagedEnvironment", "StorageAccount", "FileShare", "Vault"}
    assert not any(x.protect for x in offline.render(settings_with()).resources)


# --- reuse what exists (read with get functions, never modified) ----------------------------------------------
ENV_ID = ("/subscriptions/s/resourceGroups/rg-shared/providers/Microsoft.App/managedEnvironments/cae-shared")
LAW_ID = ("/subscriptions/s/resourceGroups/rg-shared/providers/Microsoft.OperationalInsights/workspaces/law-shared")


def test_bring_your_own_environment_is_read_not_created(offline):
    r = offline.render(settings_with(environment={"existingId": ENV_ID}))
    assert not r.by_type("ManagedEnvironment") and not r.by_type("Workspace") and not r.by_type("DiagnosticSetting")
    call = next(c for c in r.mocks.calls if c.token == "azure-native:app:getManagedEnvironment")
    assert call.args == {"resourceGroupName": "rg-shared", "environmentName": "cae-shared"}
    env_id = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-shared/providers/"
              "Microsoft.App/managedEnvironments/cae-shared")
    assert r.one("Job").get("environmentId") == r.one("ContainerApp").get("environmentId") == env_id
    assert {x.get("resourceGroupName") for x in r.by_type("ManagedEnvironmentsStorage")} == {"rg-shared"}


def test_bring_your_own_environment_without_the_profile_is_refused(offline):
    import pulumi

    only_a100 = {"azure-native:app:getManagedEnvironment": {"workloadProfiles": [
        {"name": "Consumption", "workloadProfileType": "Consumption"},
        {"name": "gpu-a100", "workloadProfileType": "Consumption-GPU-NC24-A100"}]}}
    with pytest.raises(pulumi.RunError, match="it has no workload profile 'gpu-t4' of type Consumption-GPU-NC8as-T4"):
        offline.render(settings_with(environment={"existingId": ENV_ID}), existing=only_a100)


def test_bring_your_own_storage_account_and_share_adds_only_the_links(offline):
    r = offline.render(settings_with(store={"existing": True, "accountName": "corpmodels", "resourceGroup": "rg-data",
                                            "shareName": "lorastack"}))
    assert not r.by_type("StorageAccount") and not r.by_type("FileShare") and not r.by_type("FileServiceProperties")
    links = r.by_type("ManagedEnvironmentsStorage")
    assert {x.get("properties.azureFile.shareName") for x in links} == {"lorastack"}
    assert {x.get("properties.azureFile.accountName") for x in links} == {"corpmodels"}
    keys = [c for c in r.mocks.calls if c.token == "azure-native:storage:listStorageAccountKeys"]
    assert keys and keys[0].args["resourceGroupName"] == "rg-data"
    assert r.outputs["storageAccountName"] == "corpmodels" and r.outputs["fileShareName"] == "lorastack"


def test_bring_your_own_log_analytics_workspace(offline):
    r = offline.render(settings_with(logs={"existingWorkspaceId": LAW_ID}))
    assert not r.by_type("Workspace")
    assert r.one("DiagnosticSetting").get("workspaceId").endswith("/workspaces/law-shared")


# --- Azure ML (issue 12) -------------------------------------------------------------------------------------
def test_azureml_workspace_low_priority_cluster_and_store_datastore(offline):
    r = offline.render(settings_with(azureml={"lowPriority": True, "maxNodes": 2}))
    ws = next(x for x in r.resources if x.type == "azure-native:machinelearningservices:Workspace")
    assert ws.get("workspaceName") == "mlw-lorastack-dev" and ws.get("keyVault").endswith("/vaults/" + r.outputs[
        "keyVaultName"])
    assert ws.get("primaryUserAssignedIdentity") == UAI_ID
    compute = next(x for x in r.resources if x.type == "azure-native:machinelearningservices:Compute")
    props = compute.get("properties.properties")
    assert props["vmPriority"] == "LowPriority" and props["vmSize"] == "Standard_NC24ads_A100_v4"
    assert props["scaleSettings"] == {"minNodeCount": 0, "maxNodeCount": 2, "nodeIdleTimeBeforeScaleDown": "PT1800S"}
    assert compute.get("identity") == {"type": "UserAssigned", "userAssignedIdentities": [UAI_ID]}
    ds = next(x for x in r.resources if x.type == "azure-native:machinelearningservices:Datastore")
    assert ds.get("properties.fileShareName") == "store" and ds.get("properties.accountName") == r.outputs[
        "storageAccountName"]
    assert ds.get("properties.credentials.secrets.key") == "mock-key-1==" and "properties" in ds.secret_paths
    assert (r.outputs["amlWorkspaceName"], r.outputs["amlComputeName"], r.outputs["amlDatastoreName"]) == (
        "mlw-lorastack-dev", "gpu-cluster", "lorastack_store")
    assert not r.secret_outputs
    plain = offline.render(settings_with())
    assert not [x for x in plain.resources if "machinelearningservices" in x.type]
    from provisioning import policies
    from provisioning.guardrails import Guardrails
    from provisioning.plan import to_policy_resources

    prod = offline.render(settings_with(tier="prod", protect=True, logs={"retentionDays": 90},
                                        store={"softDeleteDays": 14}, azureml={}))
    assert not any(policies.evaluate(to_policy_resources(prod.resources), Guardrails()).values())
    assert plain.outputs["amlWorkspaceName"] == ""
