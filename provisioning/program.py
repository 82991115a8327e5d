"""The Pulumi program: validate the stack settings, then declare the components. ``run()`` is the entry point for
``pulumi up`` (via ``__main__.py``), ``lorastack plan`` and the tests alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi

from provisioning import contract, engine_plan, gpu, naming, probes
from provisioning.guardrails import Guardrails, load_guardrails
from provisioning.settings import PROJECT, SECRET_KEYS, SettingsError, StackSettings, VllmSettings, parse_settings


def stack_file_label(stack: str) -> str:
    """How errors name the stack file (``stackConfigDir: stacks`` in Pulumi.yaml)."""
    return f"stacks/Pulumi.{stack}.yaml"


def project_dir() -> Path:
    """The repository root (where Pulumi.yaml and stacks/guardrails.yaml live)."""
    return Path(__file__).resolve().parents[1]


def read_settings(stack: str, guardrails: Guardrails) -> StackSettings:
    """Validate this stack's ``lorastack:*`` config (as the runtime holds it) into StackSettings; the tier must be the
    one the platform's guardrails give this stack."""
    from pulumi.runtime import config as rc

    prefix = f"{PROJECT}:"
    everything = {**rc.get_config_env(), **rc.CONFIG.get()}
    raw = {k[len(prefix):]: v for k, v in everything.items() if k.startswith(prefix)}
    secret = [k for k in raw if rc.is_config_secret(prefix + k) or prefix + k in rc.get_config_secret_keys_env()]
    return parse_settings(raw, stack_file_label(stack), stack, secret, expected_tier=guardrails.tier_for(stack))


@dataclass
class Platform:
    """What a stack's workloads run on: created by this stack, or the platform stack's (team stacks)."""

    resource_group_name: pulumi.Input[str]
    location: pulumi.Input[str]
    environment_id: pulumi.Input[str]
    environment_name: pulumi.Input[str]
    subnet_id: pulumi.Input[str] | None
    vault_id: pulumi.Input[str] | None  # None: this stack creates its vault
    registry_server: pulumi.Input[str] | None
    registry_id: pulumi.Input[str] | None
    registry_name: pulumi.Input[str] | None
    workload_profiles: pulumi.Input[list]
    # Log Analytics workspace (customer) id: `lorastack logs` reads ended executions from it; "" when unknown
    log_workspace_id: pulumi.Input[str] = ""


def _registry(s: StackSettings, stack: str, rg_name, tags: dict) -> tuple:
    reg = s.images.registry
    if reg is not None and reg.create:
        from provisioning.registry import ImageRegistry, ImageRegistryArgs

        acr = ImageRegistry("registry", ImageRegistryArgs(
            resource_group_name=rg_name, location=s.location,
            registry_name=reg.name or naming.registry_name(PROJECT, stack), sku=reg.sku, protect=s.protect, tags=tags,
        ))
        return acr.login_server, acr.registry_id, acr.registry_name
    if reg is not None:
        return reg.server, reg.resource_id, reg.resource_id.rsplit("/", 1)[-1]
    return None, None, None


def _existing_platform(s: StackSettings, stack: str, rg_name, tags: dict) -> Platform:
    """A brought environment, read with get_managed_environment and never modified: the profiles the job and app
    use must already be in it."""
    from pulumi_azure_native import app

    env_id = s.environment.existing_id
    parts = env_id.strip("/").split("/")
    env = app.get_managed_environment_output(resource_group_name=parts[3], environment_name=parts[-1])
    wanted = {gpu.profile_name(s.training.gpu_profile): s.training.gpu_profile,
              gpu.profile_name(s.inference.gpu_profile): s.inference.gpu_profile}

    def check(profiles) -> list:
        have = {p.name: p.workload_profile_type for p in profiles or []}
        bad = {n: t for n, t in wanted.items() if have.get(n) != t}
        if bad:
            raise pulumi.RunError(
                f"{stack_file_label(stack)}: lorastack:environment.existingId {env_id}: it has no workload profile "
                + ", ".join(f"{n!r} of type {t}" for n, t in bad.items())
                + f" (it has {', '.join(f'{n}={t}' for n, t in have.items()) or 'none'}); a brought environment "
                "is not modified: add the profile to it, or use one of its profiles")
        return [{"name": n, "type": t} for n, t in have.items()]

    server, reg_id, reg_name = _registry(s, stack, rg_name, tags)
    return Platform(parts[3], env.location, env.id, env.name, None, s.key_vault.existing_id, server, reg_id,
                    reg_name, env.workload_profiles.apply(check))


def _own_platform(s: StackSettings, stack: str, names: dict, rg_name, tags: dict) -> Platform:
    from provisioning.environment import GpuEnvironment, GpuEnvironmentArgs

    if s.environment.existing_id:
        return _existing_platform(s, stack, rg_name, tags)

    subnet_id = None
    if s.network is not None:
        if s.network.infrastructure_subnet_id:
            from provisioning.network import brought_subnet

            subnet_id = brought_subnet(s.network.infrastructure_subnet_id)
        else:
            from provisioning.network import EnvironmentNetwork, EnvironmentNetworkArgs

            subnet_id = EnvironmentNetwork("network", EnvironmentNetworkArgs(
                resource_group_name=rg_name, location=s.location, vnet_name=names["vnet"],
                address_space=s.network.address_space, infrastructure_subnet=s.network.infrastructure_subnet,
                tags=tags,
            )).subnet_id
    t, i = s.training, s.inference
    profiles = gpu.workload_profiles([
        (t.gpu_profile, t.min_nodes, t.max_nodes), (i.gpu_profile, i.min_nodes, i.max_nodes),
        *((ptype, None, None) for ptype in s.extra_gpu_profiles),
    ])
    env = GpuEnvironment("platform", GpuEnvironmentArgs(
        resource_group_name=rg_name, location=s.location, workspace_name=names["workspace"],
        environment_name=names["environment"], workload_profiles=profiles,
        log_retention_days=s.logs.retention_days, log_daily_quota_gb=s.logs.daily_quota_gb,
        infrastructure_subnet_id=subnet_id, internal=bool(s.network and s.network.internal),
        protect=s.protect, tags=tags, existing_workspace_id=s.logs.existing_workspace_id,
    ))
    server, reg_id, reg_name = _registry(s, stack, rg_name, tags)
    return Platform(rg_name, s.location, env.environment_id, env.environment_name, subnet_id, s.key_vault.existing_id,
                    server, reg_id, reg_name, [{"name": p.name, "type": p.type} for p in profiles],
                    env.workspace_customer_id)


def platform_reference(guardrails: Guardrails) -> str:
    """The team stacks' StackReference name (stacks/guardrails.yaml selfService.platformStack)."""
    ref = guardrails.platform_reference()
    if ref is None:
        raise pulumi.RunError("stacks/guardrails.yaml: selfService.platformStack is missing; team stacks join the "
                              "platform stack's environment [rule gpu-quota-per-environment]")
    return ref


def _team_platform(s: StackSettings, guardrails: Guardrails) -> Platform:
    ref = pulumi.StackReference("platform", stack_name=platform_reference(guardrails))
    out = ref.require_output
    profiles = out("workloadProfiles")
    wanted = {gpu.profile_name(s.training.gpu_profile), gpu.profile_name(s.inference.gpu_profile)}

    def check(got) -> list:
        available, location = got
        if location != s.location:
            raise pulumi.RunError(
                f"{stack_file_label(pulumi.get_stack())}: lorastack:location {s.location!r} is not the platform "
                f"environment's region; allowed: {location!r}")
        missing = wanted - {p["name"] for p in available or []}
        if missing:
            raise pulumi.RunError(
                f"{stack_file_label(pulumi.get_stack())}: the platform environment has no workload profile "
                f"{', '.join(sorted(missing))}; allowed: {', '.join(p['name'] for p in available or [])} (or ask the "
                "platform team to add it to its extraGpuProfiles)")
        return available

    return Platform(out("resourceGroupName"), out("location"), out("environmentId"), out("environmentName"), None,
                    out("keyVaultId"), out("acrLoginServer"), out("acrId"), out("acrName"),
                    pulumi.Output.all(profiles, out("location")).apply(check), out("logAnalyticsWorkspaceId"))


def build(s: StackSettings, stack: str, guardrails: Guardrails | None = None) -> dict[str, Any]:
    """Declare every resource of the stack; returns the stack outputs.

    Platform stacks (dev, staging, prod, platform) create the environment, its GPU profiles, logs, the vault and
    (optionally) the registry. Team stacks join the platform stack's environment through a StackReference and
    create only their store, identity, grants on their own secrets, job and app.
    """
    from pulumi_azure_native import authorization, resources

    from provisioning.adapter_store import AdapterStore, AdapterStoreArgs
    from provisioning.identity import WorkloadIdentity, WorkloadIdentityArgs
    from provisioning.inference_app import EntraAuth, InferenceApp, InferenceAppArgs
    from provisioning.training_job import TrainingJob, TrainingJobArgs

    g = guardrails or Guardrails()
    names = naming.resource_names(PROJECT, stack)
    tags = {"lorastack-stack": stack, "lorastack-tier": s.tier, **s.tags}
    client = authorization.get_client_config_output()
    team = s.tier == "team"

    if s.resource_group.existing:
        rg_name: pulumi.Input[str] = s.resource_group.name
    else:
        rg = resources.ResourceGroup(
            "rg", resource_group_name=s.resource_group.name or names["resourceGroup"], location=s.location, tags=tags,
            opts=pulumi.ResourceOptions(protect=s.protect),
        )
        rg_name = rg.name

    plat = _team_platform(s, g) if team else _own_platform(s, stack, names, rg_name, tags)

    store = AdapterStore("store", AdapterStoreArgs(
        resource_group_name=s.store.resource_group if s.store.existing else rg_name, location=s.location,
        account_name=s.store.account_name or naming.storage_account_name(PROJECT, stack),
        share_name=s.store.share_name or names["share"], existing=s.store.existing, tier=s.store.tier, quota_gib=s.store.quota_gib,
        soft_delete_days=s.store.soft_delete_days, key_generation=s.store.key_generation,
        environment_name=plat.environment_name, environment_resource_group_name=plat.resource_group_name,
        subnet_id=plat.subnet_id, client_cidrs=[(r.name, r.cidr) for r in (s.network.client_cidrs if s.network else [])],
        protect=s.protect, tier_tag=s.tier, tags=tags,
    ))

    cfg = pulumi.Config(PROJECT)
    secret = {k: (cfg.get_secret(k) if getattr(s, _attr(k)) is not None else None) for k in SECRET_KEYS}
    kv = s.key_vault
    identity = WorkloadIdentity("identity", WorkloadIdentityArgs(
        resource_group_name=rg_name, location=s.location, identity_name=names["identity"],
        subscription_id=client.subscription_id, tenant_id=client.tenant_id,
        vault_name=None if plat.vault_id else (kv.name or naming.key_vault_name(PROJECT, stack)),
        existing_vault_id=plat.vault_id, purge_protection=s.purge_protection, soft_delete_days=kv.soft_delete_days,
        hf_token=secret["hfToken"], api_keys=secret["inferenceApiKeys"],
        hf_token_secret_name=kv.hf_token_secret_name, api_keys_secret_name=kv.api_keys_secret_name,
        registry_id=plat.registry_id, protect=s.protect, tags=tags,
    ))

    t, i = s.training, s.inference
    t_cpu, t_mem = gpu.replica_size(t.gpu_profile, t.cpu, t.memory)
    job = TrainingJob("training", TrainingJobArgs(
        resource_group_name=rg_name, location=s.location, job_name=names["job"],
        environment_id=plat.environment_id, workload_profile_name=gpu.profile_name(t.gpu_profile),
        cpu=t_cpu, memory=t_mem, image=s.images.trainer, registry_server=plat.registry_server,
        replica_timeout_seconds=t.replica_timeout_seconds, replica_retry_limit=t.replica_retry_limit,
        storage_name=store.storage_name, storage_type=store.storage_type, identity_id=identity.identity_id,
        hf_token_url=identity.hf_token_url, depends_on=identity.grants, tags=tags,
    ))

    i_cpu, i_mem = gpu.replica_size(i.gpu_profile, i.cpu, i.memory)
    v = i.vllm or VllmSettings()  # vLLM sizing left out: derived from the profile (provisioning.engine_plan)
    inference = InferenceApp("inference", InferenceAppArgs(
        resource_group_name=rg_name, location=s.location, app_name=names["app"],
        environment_id=plat.environment_id, workload_profile_name=gpu.profile_name(i.gpu_profile),
        cpu=i_cpu, memory=i_mem, image=s.images.inference, registry_server=plat.registry_server,
        storage_name=store.read_only_storage_name, storage_type=store.storage_type,
        identity_id=identity.identity_id, hf_token_url=identity.hf_token_url, api_keys_url=identity.api_keys_url,
        probes=probes.size_probes(i.model_load_seconds, contract.LIVENESS_PATH, contract.READINESS_PATH),
        min_replicas=i.min_replicas, max_replicas=i.max_replicas, concurrent_requests=i.concurrent_requests,
        cooldown_seconds=i.cooldown_seconds, ip_allow_list=[(r.name, r.cidr) for r in i.ip_allow_list],
        entra_auth=EntraAuth(i.entra_auth.client_id, i.entra_auth.tenant_id, i.entra_auth.allowed_audiences,
                             i.entra_auth.excluded_paths) if i.entra_auth else None,
        depends_on=identity.grants, base_model=i.base_model, base_revision=i.base_revision, tags=tags,
        engine_env=engine_plan.plan_engine(
            i.gpu_profile, i.engine, concurrent_requests=i.concurrent_requests, max_loras=v.max_loras,
            max_lora_rank=v.max_lora_rank, gpu_memory_util=v.gpu_memory_utilization, quantization=v.quantization).env,
    ))

    aml = None
    if s.azureml is not None:
        from provisioning.azureml import AzureML, AzureMLArgs

        a = s.azureml
        aml = AzureML("azureml", AzureMLArgs(
            resource_group_name=rg_name, location=s.location, workspace_name=names["amlWorkspace"],
            workspace_storage_account=naming.storage_account_name(PROJECT, f"{stack}-ml"),
            key_vault_id=identity.vault_id, identity_id=identity.identity_id, compute_name=a.compute_name,
            vm_size=a.vm_size, min_nodes=a.min_nodes, max_nodes=a.max_nodes, low_priority=a.low_priority,
            idle_seconds=a.idle_seconds, store_account_name=store.account_name,
            store_resource_group_name=s.store.resource_group if s.store.existing else rg_name,
            store_share_name=store.share_name, store_key_index=naming.storage_key_index(s.store.key_generation),
            protect=s.protect, tags=tags,
        ))

    return {
        "subscriptionId": client.subscription_id,
        "resourceGroupName": rg_name,
        "location": s.location,
        "tier": s.tier,
        "environmentName": plat.environment_name,
        "logAnalyticsWorkspaceId": plat.log_workspace_id,
        "environmentId": plat.environment_id,
        "environmentResourceGroupName": plat.resource_group_name,
        "workloadProfiles": plat.workload_profiles,
        "storageAccountName": store.account_name,
        "fileShareName": store.share_name,
        "environmentStorageName": store.storage_name,
        "storeMountPath": contract.STORE_MOUNT_PATH,
        "acaJobName": job.job_name,
        "acaAppName": inference.app_name,
        "acaAppEndpoint": inference.url,
        "keyVaultName": identity.vault_name,
        "keyVaultUri": identity.vault_uri,
        "keyVaultId": identity.vault_id,
        "identityClientId": identity.client_id,
        "acrLoginServer": plat.registry_server or "",
        "acrName": plat.registry_name or "",
        "acrId": plat.registry_id or "",
        "amlWorkspaceName": aml.workspace_name if aml else "",
        "amlComputeName": aml.compute_name if aml else "",
        "amlDatastoreName": aml.datastore_name if aml else "",
    }


def _attr(key: str) -> str:
    return {"hfToken": "hf_token", "inferenceApiKeys": "inference_api_keys"}[key]


def run() -> None:
    """Validate the stack's settings (before any resource exists), declare the stack and export its outputs."""
    stack = pulumi.get_stack()
    guardrails = load_guardrails(project_dir())
    try:
        settings = read_settings(stack, guardrails)
    except SettingsError as e:
        raise pulumi.RunError(str(e)) from None
    for name, value in build(settings, stack, guardrails).items():
        pulumi.export(name, value)
