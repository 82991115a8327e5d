"""The catalogue of deploy-time rules: what Azure enforces (or what breaks a running workload) that Pulumi mocks never
show, each with its source and the place in lorastack that guards it. Pure data, no Pulumi import.

Settings validation, the policies and ``lorastack plan`` (``--against``) all cite these rules by id in their messages
(``[rule kv-name]``), and docs/provisioning.md carries the same table (a test keeps the two in step). Region lists
and limits drift: the sources are dated; re-check them on a real subscription (``az containerapp env workload-profile
list-supported -l <region>``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One deploy-time rule."""

    id: str
    rule: str  # what Azure enforces / what breaks
    source: str  # where the fact comes from (reference note keys: /work/shared/reference/azure-container-apps.md)
    guard: str  # where lorastack stops it, before `pulumi up`


# --- data the rules are about (one place) ---------------------------------------------------------------------
INGRESS_TIMEOUT_SECONDS = 240  # ACA HTTP ingress request timeout (ingress overview)
# Time a replica needs before the model load starts (image pull + start; ACA#997 reports ~20 s even for hello-world)
# plus a margin: the request that wakes a scaled-to-zero app must be answered within the ingress timeout.
WAKE_OVERHEAD_SECONDS = 40
MAX_COLD_MODEL_LOAD_SECONDS = INGRESS_TIMEOUT_SECONDS - WAKE_OVERHEAD_SECONDS
# D-WP (11/2025): dedicated GPU workload profiles are offered in these regions only.
DEDICATED_GPU_REGIONS = ("westus3", "northeurope")
# D-GPU (06/2025) + D-WP (11/2025): serverless GPU regions.
SERVERLESS_GPU_REGIONS = {
    "Consumption-GPU-NC24-A100": ("westus3", "westus", "australiaeast", "swedencentral"),
    "Consumption-GPU-NC8as-T4": ("westus3", "australiaeast", "swedencentral", "westeurope"),
}
# Azure RBAC: "role assignment changes can take up to 10 minutes to take effect"; Key Vault references in ACA are
# resolved when the revision is created, so the job and app wait this long after a grant is first created.
RBAC_PROPAGATION_SECONDS = 120
# Tiers whose stack files must pin images by digest (tags are mutable and every cold start re-pulls).
DIGEST_TIERS = ("staging", "prod")
# Tiers where Key Vault purge protection may be on (it can never be turned off, and a purge-protected soft-deleted
# vault keeps its global name for softDeleteDays: `pulumi destroy` then `up` conflicts).
PURGE_PROTECTION_TIERS = ("staging", "prod")

RULES: tuple[Rule, ...] = (
    Rule("kv-name", "Key Vault names: 3-24 characters, letters, digits and single hyphens, start with a letter, end "
         "with a letter or digit (globally unique)", "Azure naming rules (Microsoft.KeyVault/vaults); issue 9",
         "naming.key_vault_name (checked), settings keyVault.name, property test over team names"),
    Rule("storage-name", "Storage account names: 3-24 lowercase letters and digits (globally unique)",
         "Azure naming rules (Microsoft.Storage/storageAccounts)", "naming.storage_account_name, settings store.accountName"),
    Rule("aca-name", "Container Apps names: 2-32 lowercase letters, digits and single hyphens, starting with a letter",
         "Azure naming rules (Microsoft.App)", "naming.resource_names, naming.check_stack_name"),
    Rule("consumption-profile", "The 'Consumption' workload profile must stay in the list under that exact name",
         "ACA#731, bicep-types-az#1508", "gpu.workload_profiles, policy consumption-profile-present"),
    Rule("serverless-gpu-counts", "Serverless (Consumption*) profiles reject minimumCount/maximumCount "
         "(WorkloadProfilePropertyNotSupported)", "terraform-provider-azurerm#31763, azure-cli#30526",
         "settings (minNodes/maxNodes), policy serverless-gpu-without-counts"),
    Rule("profile-in-use", "A workload profile an app or job runs on cannot be removed (WorkloadProfileInUse); the "
         "environment is updated before the app moves", "ACA#731",
         "plan --against; settings retainedProfiles keeps the old profile for one up"),
    Rule("dedicated-at-creation", "GPU dedicated profiles (NC24/48/96-A100) must be configured when the environment "
         "is created; adding one to an existing environment fails", "D-WP (workload-profiles-overview, 11/2025)",
         "plan --against"),
    Rule("dedicated-gpu-regions", f"Dedicated GPU profiles exist only in {', '.join(DEDICATED_GPU_REGIONS)}",
         "D-WP (11/2025)", "settings (training/inference gpuProfile vs location)"),
    Rule("serverless-gpu-regions", "Serverless GPU profiles exist only in listed regions (A100: "
         f"{', '.join(SERVERLESS_GPU_REGIONS['Consumption-GPU-NC24-A100'])}; T4: "
         f"{', '.join(SERVERLESS_GPU_REGIONS['Consumption-GPU-NC8as-T4'])})", "D-GPU (06/2025), D-WP (11/2025)",
         "settings (gpuProfile vs location)"),
    Rule("gpu-quota-per-environment", "Serverless GPU quota is per managed environment: every new environment needs "
         "its own quota request", "D-Q (quotas, 09/2026)",
         "team stacks join the platform environment (platformStack), they never create one"),
    Rule("ingress-timeout", f"HTTP ingress answers 504 after {INGRESS_TIMEOUT_SECONDS} s: with minReplicas 0 the "
         "request that wakes the app waits for the whole model load", "ACA ingress overview (request timeout)",
         f"settings: minReplicas 0 needs modelLoadSeconds <= {MAX_COLD_MODEL_LOAD_SECONDS}"),
    Rule("probe-window", "Probe limits: initialDelay 1-60 s, period 1-240 s, failureThreshold 1-10",
         "pulumi-azure-native ContainerAppProbe docstrings", "probes.size_probes, settings modelLoadSeconds"),
    Rule("nfs-no-rest", "The Azure Files REST API is not available on NFS shares: the CLI (uploads, status, pull) "
         "cannot read or write an NFS store", "Azure Files NFS docs (features not supported)", "settings store.protocol"),
    Rule("smb-encryption", "ACA SMB mounts need AES-128-GCM channel encryption and NTLMv2", "ACA#852",
         "adapter_store SMB settings, policy storage-hardening"),
    Rule("smb-nobrl", "SMB mounts without nobrl stall or fail byte-range lock users (file locks in the HF cache, "
         "SQLite)", "ACA#520; Microsoft AKS 'mountOptions for Azure Files'", "contract.store_mount_options"),
    Rule("ephemeral-8gib", "A replica's ephemeral disk is 8 GiB, GPU profiles included: the HF hub and datasets "
         "caches must live on the share", "D-STO, ACA#1779, ACA#896", "training_job env HF_HOME/HF_HUB_CACHE/HF_DATASETS_CACHE"),
    Rule("storage-rekey", "Updating the key of an existing environment storage breaks new mounts (cifs permission "
         "denied); only a new storage name works", "ACA#1406",
         "key generation in the link name, ignore_changes on accountKey, plan --against (in-use key)"),
    Rule("storage-firewall", "A storage account with defaultAction Deny and only VNet rules refuses the CLI "
         "(403 from laptops and CI runners); ipRules take public IPv4 ranges only", "Azure Storage network security docs",
         "settings network.clientCidrs -> ipRules, plan reachability"),
    Rule("subnet-storage-endpoint", "A storage VNet rule fails unless the subnet has the Microsoft.Storage service "
         "endpoint", "Azure Storage network security docs", "network component; brought subnets read with get_subnet and checked"),
    Rule("subnet-size", "A workload-profiles environment needs a delegated subnet of /27 or larger (one IP per "
         "serverless GPU replica)", "D-VNET", "settings network.infrastructureSubnet"),
    Rule("internal-unreachable", "An internal environment has no public endpoint: without a private DNS zone for its "
         "default domain and a route in (peering/VPN) nothing can reach it", "D-VNET", "settings network.internal"),
    Rule("ip-rules-one-action", "Ingress IP restrictions must all be Allow or all Deny", "D-IPR",
         "policy no-anonymous-ingress"),
    Rule("easy-auth-browser", "Easy Auth Return401 never sends a browser to sign in: the UI needs "
         "RedirectToLoginPage, the API (/v1) its own 401", "D-AUTH", "inference_app auth config"),
    Rule("sticky-sessions", "Gradio sessions live in one replica: with several replicas the UI needs session affinity "
         "(sticky sessions need single revision mode)", "ACA sticky sessions docs", "inference_app ingress"),
    Rule("kv-purge-teardown", "Purge protection cannot be turned off and keeps a soft-deleted vault's name: destroy "
         "then up conflicts", "Key Vault soft-delete docs", f"settings: purgeProtection only in {', '.join(PURGE_PROTECTION_TIERS)}"),
    Rule("kv-least-privilege", "A role on the vault reads every secret in it: team identities get Key Vault Secrets "
         "User on their own secrets only", "Key Vault RBAC docs (secret scope)", "identity component (secret-scoped grants)"),
    Rule("rbac-propagation", "Role assignments take minutes to propagate; Key Vault references resolved before that "
         "fail the first up", "Azure RBAC docs", f"after-create hook waits {RBAC_PROPAGATION_SECONDS} s"),
    Rule("display-locations", "Microsoft.App returns display locations ('West US 3') in outputs", "issue 9; ARM behaviour",
         "policies normalize locations (tested on input- and output-shaped properties)"),
    Rule("guardrails-by-stack", "A team cannot pick its own tier: tier and limits come from stacks/guardrails.yaml "
         "by stack name", "issue 9", "guardrails.tier_for, settings, policies, plan"),
    Rule("image-digest", f"Tiers {', '.join(DIGEST_TIERS)} pin images by digest (tags are mutable; every cold start "
         "re-pulls)", "D-ACR; issue 10", "settings images, plan"),
    Rule("acr-pull", "Private images are pulled by the user-assigned identity with AcrPull (no admin user)", "D-ACR",
         "identity component, policy no-plain-secrets"),
    Rule("environment-replace", "Changing an environment's name, location, subnet or internal flag replaces it, "
         "deleting its apps, jobs and storages", "PAN#2305, D-VNET", "plan --against"),
    Rule("store-replace", "Changing the storage account's name, kind, SKU or location, or the share's name or protocol "
         "replaces it: the adapter store is lost", "Microsoft.Storage (create-only properties)", "plan --against"),
)
BY_ID = {r.id: r for r in RULES}


def cite(rule_id: str) -> str:
    """``[rule <id>]`` for a message (raises KeyError on an unknown id, so a typo fails the tests)."""
    return f"[rule {BY_ID[rule_id].id}]"
