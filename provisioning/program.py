"""The Pulumi program: validate the stack settings, then declare the components. ``run()`` is the entry point for
``pulumi up`` (via ``__main__.py``), ``lorastack plan`` and the tests alike.
"""

from __future__ import annotations

from typing import Any

import pulumi

from provisioning import contract, gpu, naming, probes
from provisioning.settings import PROJECT, SECRET_KEYS, SettingsError, StackSettings, parse_settings


def stack_file_label(stack: str) -> str:
    """How errors name the stack file (``stackConfigDir: stacks`` in Pulumi.yaml)."""
    return f"stacks/Pulumi.{stack}.yaml"


def read_settings(stack: str) -> StackSettings:
    """Validate this stack's ``lorastack:*`` config (as the runtime holds it) into StackSettings."""
    from pulumi.runtime import config as rc

    prefix = f"{PROJECT}:"
    everything = {**rc.get_config_env(), **rc.CONFIG.get()}
    raw = {k[len(prefix):]: v for k, v in everything.items() if k.startswith(prefix)}
    secret = [k for k in raw if rc.is_config_secret(prefix + k) or prefix + k in rc.get_config_secret_keys_env()]
    return parse_settings(raw, stack_file_label(stack), stack, secret)


def build(s: StackSettings, stack: str) -> dict[str, Any]:
    """Declare every resource of the stack; returns the stack outputs."""
    from pulumi_azure_native import authorization, resources

    from provisioning.adapter_store import AdapterStore, AdapterStoreArgs
    from provisioning.environment import GpuEnvironment, GpuEnvironmentArgs
    from provisioning.identity import WorkloadIdentity, WorkloadIdentityArgs
    from provisioning.inference_app import EntraAuth, InferenceApp, InferenceAppArgs
    from provisioning.training_job import TrainingJob, TrainingJobArgs

    names = naming.resource_names(PROJECT, stack)
    tags = {"lorastack-stack": stack, "lorastack-tier": s.tier, **s.tags}
    client = authorization.get_client_config_output()

    if s.resource_group.existing:
        rg_name: pulumi.Input[str] = s.resource_group.name
    else:
        rg = resources.ResourceGroup(
            "rg", resource_group_name=s.resource_group.name or names["resourceGroup"], location=s.location, tags=tags,
            opts=pulumi.ResourceOptions(protect=s.protect),
        )
        rg_name = rg.name

    subnet_id = None
    if s.network is not None:
        if s.network.infrastructure_subnet_id:
            subnet_id = s.network.infrastructure_subnet_id
        else:
            from provisioning.network import EnvironmentNetwork, EnvironmentNetworkArgs

            subnet_id = EnvironmentNetwork("network", EnvironmentNetworkArgs(
                resource_group_name=rg_name, location=s.location, vnet_name=names["vnet"],
                address_space=s.network.address_space, infrastructure_subnet=s.network.infrastructure_subnet,
                tags=tags,
            )).subnet_id

    t, i = s.training, s.inference
    env = GpuEnvironment("platform", GpuEnvironmentArgs(
        resource_group_name=rg_name, location=s.location, workspace_name=names["workspace"],
        environment_name=names["environment"],
        workload_profiles=gpu.workload_profiles([
            (t.gpu_profile, t.min_nodes, t.max_nodes), (i.gpu_profile, i.min_nodes, i.max_nodes)
        ]),
        log_retention_days=s.logs.retention_days, log_daily_quota_gb=s.logs.daily_quota_gb,
        infrastructure_subnet_id=subnet_id, internal=bool(s.network and s.network.internal),
        protect=s.protect, tags=tags,
    ))

    store = AdapterStore("store", AdapterStoreArgs(
        resource_group_name=rg_name, location=s.location,
        account_name=s.store.account_name or naming.storage_account_name(PROJECT, stack),
        share_name=names["share"], protocol=s.store.protocol, tier=s.store.tier, quota_gib=s.store.quota_gib,
        soft_delete_days=s.store.soft_delete_days, key_generation=s.store.key_generation,
        environment_name=env.environment_name, subnet_id=subnet_id, protect=s.protect, tier_tag=s.tier, tags=tags,
    ))

    cfg = pulumi.Config(PROJECT)
    secret = {k: (cfg.get_secret(k) if getattr(s, _attr(k)) is not None else None) for k in SECRET_KEYS}
    kv = s.key_vault
    identity = WorkloadIdentity("identity", WorkloadIdentityArgs(
        resource_group_name=rg_name, location=s.location, identity_name=names["identity"],
        subscription_id=client.subscription_id, tenant_id=client.tenant_id,
        vault_name=None if kv.existing_id else (kv.name or naming.key_vault_name(PROJECT, stack)),
        existing_vault_id=kv.existing_id, purge_protection=kv.purge_protection, soft_delete_days=kv.soft_delete_days,
        hf_token=secret["hfToken"], api_keys=secret["inferenceApiKeys"],
        hf_token_secret_name=kv.hf_token_secret_name, api_keys_secret_name=kv.api_keys_secret_name,
        registry_id=s.images.registry.resource_id if s.images.registry else None,
        protect=s.protect, tags=tags,
    ))
    registry = s.images.registry.server if s.images.registry else None

    t_cpu, t_mem = gpu.replica_size(t.gpu_profile, t.cpu, t.memory)
    job = TrainingJob("training", TrainingJobArgs(
        resource_group_name=rg_name, location=s.location, job_name=names["job"],
        environment_id=env.environment_id, workload_profile_name=gpu.profile_name(t.gpu_profile),
        cpu=t_cpu, memory=t_mem, image=s.images.trainer, registry_server=registry,
        replica_timeout_seconds=t.replica_timeout_seconds, replica_retry_limit=t.replica_retry_limit,
        storage_name=store.storage_name, storage_type=store.storage_type, identity_id=identity.identity_id,
        hf_token_url=identity.hf_token_url, depends_on=identity.grants, tags=tags,
    ))

    i_cpu, i_mem = gpu.replica_size(i.gpu_profile, i.cpu, i.memory)
    inference = InferenceApp("inference", InferenceAppArgs(
        resource_group_name=rg_name, location=s.location, app_name=names["app"],
        environment_id=env.environment_id, workload_profile_name=gpu.profile_name(i.gpu_profile),
        cpu=i_cpu, memory=i_mem, image=s.images.inference, registry_server=registry,
        storage_name=store.read_only_storage_name, storage_type=store.storage_type,
        identity_id=identity.identity_id, hf_token_url=identity.hf_token_url, api_keys_url=identity.api_keys_url,
        probes=probes.size_probes(i.model_load_seconds, contract.LIVENESS_PATH, contract.READINESS_PATH),
        min_replicas=i.min_replicas, max_replicas=i.max_replicas, concurrent_requests=i.concurrent_requests,
        cooldown_seconds=i.cooldown_seconds, ip_allow_list=[(r.name, r.cidr) for r in i.ip_allow_list],
        entra_auth=EntraAuth(i.entra_auth.client_id, i.entra_auth.tenant_id, i.entra_auth.allowed_audiences,
                             i.entra_auth.excluded_paths) if i.entra_auth else None,
        depends_on=identity.grants, tags=tags,
    ))

    return {
        "subscriptionId": client.subscription_id,
        "resourceGroupName": rg_name,
        "location": s.location,
        "tier": s.tier,
        "environmentName": env.environment_name,
        "storageAccountName": store.account_name,
        "fileShareName": store.share_name,
        "environmentStorageName": store.storage_name,
        "storeMountPath": contract.STORE_MOUNT_PATH,
        "acaJobName": job.job_name,
        "acaAppName": inference.app_name,
        "acaAppEndpoint": inference.url,
        "keyVaultName": identity.vault_name,
        "keyVaultUri": identity.vault_uri,
        "identityClientId": identity.client_id,
    }


def _attr(key: str) -> str:
    return {"hfToken": "hf_token", "inferenceApiKeys": "inference_api_keys"}[key]


def run() -> None:
    """Validate the stack's settings (before any resource exists), declare the stack and export its outputs."""
    stack = pulumi.get_stack()
    try:
        settings = read_settings(stack)
    except SettingsError as e:
        raise pulumi.RunError(str(e)) from None
    for name, value in build(settings, stack).items():
        pulumi.export(name, value)
