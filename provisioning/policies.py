"""Guardrail policies, written once as plain functions over resources (pure, no Pulumi import).

Each policy takes every resource of a stack (type token, camelCase inputs as sent to the provider, whether it is
protected, and, where known, which inputs are secret) plus the platform guardrails, and returns violations.
The same functions run in the tests, in ``lorastack plan`` (over the offline render) and in the Pulumi policy
pack under ``policy/`` (over ``pulumi preview``, where secretness is not visible and those checks are skipped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from provisioning import gpu
from provisioning.guardrails import Guardrails
from provisioning.rules import cite

T_STORAGE = "azure-native:storage:StorageAccount"
T_FILES = "azure-native:storage:FileServiceProperties"
T_SHARE = "azure-native:storage:FileShare"
T_ENV = "azure-native:app:ManagedEnvironment"
T_ENV_STORAGE = "azure-native:app:ManagedEnvironmentsStorage"
T_APP = "azure-native:app:ContainerApp"
T_JOB = "azure-native:app:Job"
T_VAULT = "azure-native:keyvault:Vault"
T_SECRET = "azure-native:keyvault:Secret"
T_WORKSPACE = "azure-native:operationalinsights:Workspace"
T_RG = "azure-native:resources:ResourceGroup"
TIER_TAG = "lorastack-tier"
SECRETISH_ENV = re.compile(r"(TOKEN|KEY|KEYS|SECRET|PASSWORD|CONNECTION_STRING)$", re.IGNORECASE)


@dataclass(frozen=True)
class Resource:
    """A resource as policies see it."""

    type: str
    name: str
    props: Mapping[str, Any]
    urn: str = ""
    protect: bool = False
    secret_paths: frozenset[str] | None = None  # None: not known (the policy pack cannot see secretness)

    def get(self, dotted: str, default: Any = None) -> Any:
        """Nested input by dotted path (``configuration.ingress.external``)."""
        cur: Any = self.props
        for part in dotted.split("."):
            if not isinstance(cur, Mapping) or part not in cur or cur.get(part) is None:
                return default
            cur = cur.get(part)
        return cur

    def is_secret(self, dotted: str) -> bool | None:
        """Whether the input at ``dotted`` was sent as a secret (None when unknown)."""
        if self.secret_paths is None:
            return None
        return any(dotted == p or dotted.startswith((p + ".", p + "[")) or p == ""
                   for p in self.secret_paths)


@dataclass(frozen=True)
class Violation:
    """One policy violation."""

    policy: str
    resource: str  # resource name (or urn)
    message: str


@dataclass(frozen=True)
class Policy:
    """A named guardrail."""

    name: str
    description: str
    check: Callable[[Sequence[Resource], Guardrails], list[tuple[str, str]]]  # -> [(resource, message)]

    def evaluate(self, resources: Sequence[Resource], guardrails: Guardrails) -> list[Violation]:
        return [Violation(self.name, r, m) for r, m in self.check(resources, guardrails)]


def _of(resources: Sequence[Resource], typ: str) -> list[Resource]:
    return [r for r in resources if r.type == typ]


def stack_name(resources: Sequence[Resource]) -> str | None:
    """The stack the resources belong to, from their URNs (``urn:pulumi:<stack>::<project>::...``)."""
    for r in resources:
        if r.urn.startswith("urn:pulumi:") and "::" in r.urn:
            return r.urn[len("urn:pulumi:"):].split("::", 1)[0]
    return None


def stack_tier(resources: Sequence[Resource], g: Guardrails) -> str | None:
    """The stack's tier: the guardrails' word for the stack's name, never the stack's own tags
    [rule guardrails-by-stack]; the ``lorastack-tier`` tag only when the stack is unknown (no URNs)."""
    stack = stack_name(resources)
    if stack is not None:
        return g.tier_for(stack)
    for r in resources:
        tier = r.get(f"tags.{TIER_TAG}") or r.get("metadata.lorastacktier")
        if tier:
            return tier
    return None


def normalize_location(loc: str) -> str:
    """``'West US 3'`` (what Microsoft.App returns) -> ``'westus3'`` (what we send) [rule display-locations]."""
    return loc.replace(" ", "").lower()


def _split(v: Any) -> set[str]:
    return {x.strip() for x in str(v or "").split(";") if x.strip()}


# --- storage hardening ---------------------------------------------------------------------------------------
def storage_hardening(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    out = []
    for r in _of(resources, T_STORAGE):
        if r.get("minimumTlsVersion") != "TLS1_2":
            out.append((r.name, (f"minimumTlsVersion is {r.get('minimumTlsVersion')!r}; must be 'TLS1_2' "
                                "(unset means TLS 1.0)")))
        if r.get("allowBlobPublicAccess") is not False:
            out.append((r.name, "allowBlobPublicAccess must be false"))
        nfs_only = (r.get("kind") == "FileStorage" and r.get("allowSharedKeyAccess") is False
                    and r.get("networkRuleSet.defaultAction") == "Deny")
        if r.get("enableHttpsTrafficOnly") is not True and not nfs_only:
            out.append((r.name, ("enableHttpsTrafficOnly must be true (only a VNet-only, no-shared-key NFS "
                                "FileStorage account may turn it off)")))
    smb_shares = [s for s in _of(resources, T_SHARE) if s.get("enabledProtocols", "SMB") == "SMB"]
    for r in _of(resources, T_FILES):
        smb = r.get("protocolSettings.smb")
        if smb is None and smb_shares:
            out.append((r.name, ("SMB shares without SMB protocol settings: ACA mounts need AES-128-GCM channel "
                                "encryption and NTLMv2 (ACA#852)")))
        if smb is not None:
            enc, auth, versions = (_split(smb.get("channelEncryption")), _split(smb.get("authenticationMethods")),
                                   _split(smb.get("versions")))
            if "AES-128-GCM" not in enc or not enc <= {"AES-128-GCM", "AES-256-GCM"}:
                out.append((r.name, (f"SMB channelEncryption {smb.get('channelEncryption')!r} must be AES-128-GCM "
                                    "(+ optionally AES-256-GCM) only: ACA mounts fail without AES-128-GCM (ACA#852)")))
            if "NTLMv2" not in auth:
                out.append((r.name, (f"SMB authenticationMethods {smb.get('authenticationMethods')!r} must include "
                                    "NTLMv2: ACA mounts with the account key")))
            if not versions or not versions <= {"SMB3.0", "SMB3.1.1"}:
                out.append((r.name, f"SMB versions {smb.get('versions')!r} must be SMB 3.x only"))
        if r.get("shareDeleteRetentionPolicy.enabled") is not True:
            out.append((r.name, "share soft delete (shareDeleteRetentionPolicy) must be enabled"))
    return out


# --- ingress -------------------------------------------------------------------------------------------------
def no_anonymous_ingress(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    out = []
    for r in _of(resources, T_APP):
        ingress = r.get("configuration.ingress")
        if not ingress:
            continue
        if ingress.get("allowInsecure") is not False:
            out.append((r.name, "ingress.allowInsecure must be false (HTTPS only)"))
        if ingress.get("external"):
            envs = [e for c in r.get("template.containers", []) or [] for e in (c.get("env") or [])]
            if not any(e.get("name") == "LORASTACK_API_KEYS" and e.get("secretRef") for e in envs):
                out.append((r.name, ("external ingress without an API key: the app must get LORASTACK_API_KEYS from "
                                    "a secret (anonymous GPU endpoints are not allowed)")))
        actions = {rule.get("action") for rule in ingress.get("ipSecurityRestrictions") or []}
        if len(actions) > 1:
            out.append((r.name, "ipSecurityRestrictions mix Allow and Deny; ACA requires one action for all rules"))
    return out


# --- secrets -------------------------------------------------------------------------------------------------
def no_plain_secrets(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    out = []
    for r in _of(resources, T_APP) + _of(resources, T_JOB):
        for s in r.get("configuration.secrets", []) or []:
            if s.get("value") is not None or not (s.get("keyVaultUrl") and s.get("identity")):
                out.append((r.name, (f"secret {s.get('name')!r} must be a Key Vault reference (keyVaultUrl + "
                                    "user-assigned identity), not an inline value")))
        for reg in r.get("configuration.registries", []) or []:
            if reg.get("passwordSecretRef") or not reg.get("identity"):
                out.append((r.name, (f"registry {reg.get('server')!r} must be pulled with a managed identity, "
                                    "not a password")))
        for c in (r.get("template.containers", []) or []):
            for e in c.get("env") or []:
                if SECRETISH_ENV.search(e.get("name", "")) and e.get("value") is not None:
                    out.append((r.name, f"env var {e.get('name')} holds a literal value; use secretRef"))
    for r in _of(resources, T_ENV):
        key = "appLogsConfiguration.logAnalyticsConfiguration.sharedKey"
        if r.get(key) is not None and r.is_secret(key) is False:
            out.append((r.name, ("the Log Analytics shared key is sent in plain text (pulumi/examples#1651); "
                                    "wrap it in Output.secret or use destination 'azure-monitor'")))
    for r in _of(resources, T_ENV_STORAGE):
        if r.get("properties.azureFile.accountKey") is not None and r.is_secret("properties.azureFile.accountKey") is False:
            out.append((r.name, ("the storage account key is sent in plain text (listed keys are not secret, "
                                "PAN#1693); wrap it in Output.secret")))
    for r in _of(resources, T_SECRET):
        if r.get("properties.value") is not None and r.is_secret("properties.value") is False:
            out.append((r.name, "the Key Vault secret value is not marked secret"))
    return out


# --- workload profiles ---------------------------------------------------------------------------------------
def serverless_gpu_without_counts(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    out = []
    for r in _of(resources, T_ENV):
        for p in r.get("workloadProfiles", []) or []:
            ptype = p.get("workloadProfileType")
            serverless = ptype == gpu.CONSUMPTION or (ptype in gpu.GPU_PROFILES and gpu.GPU_PROFILES[ptype].serverless)
            if serverless and (p.get("minimumCount") is not None or p.get("maximumCount") is not None):
                out.append((r.name, (f"workload profile {p.get('name')!r} ({ptype}) sets minimumCount/maximumCount; "
                                    "Azure rejects them on serverless profiles (WorkloadProfilePropertyNotSupported)")))
    return out


def consumption_profile_present(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    out = []
    for r in _of(resources, T_ENV):
        profiles = r.get("workloadProfiles", []) or []
        if not any(p.get("name") == gpu.CONSUMPTION and p.get("workloadProfileType") == gpu.CONSUMPTION
                   for p in profiles):
            out.append((r.name, ("the 'Consumption' workload profile must be present under that exact name "
                                "(redeploys without it fail with WorkloadProfileInUse, ACA#731)")))
    return out


# --- prod ----------------------------------------------------------------------------------------------------
PROTECTED_IN_PROD = (T_RG, T_STORAGE, T_SHARE, T_ENV, T_VAULT)


def prod_data_protected(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    if stack_tier(resources, g) != "prod":
        return []
    out = []
    for r in resources:
        if r.type in PROTECTED_IN_PROD and not r.protect:
            out.append((r.name, f"{r.type.split(':')[-1]} must be protected in prod (protect: true)"))
    for r in _of(resources, T_VAULT):
        if r.get("properties.enablePurgeProtection") is not True:
            out.append((r.name, "Key Vault purge protection must be on in prod"))
    for r in _of(resources, T_WORKSPACE):
        days = r.get("retentionInDays") or 30
        if days < g.prod_min_log_retention_days:
            out.append((r.name, (f"log retention {int(days)} days is below the prod minimum of "
                                f"{g.prod_min_log_retention_days}")))
    for r in _of(resources, T_FILES):
        days = r.get("shareDeleteRetentionPolicy.days") or 0
        if days < g.prod_min_share_soft_delete_days:
            out.append((r.name, (f"share soft delete {int(days)} days is below the prod minimum of "
                                f"{g.prod_min_share_soft_delete_days}")))
    return out


# --- self-service --------------------------------------------------------------------------------------------
def self_service_limits(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    if stack_tier(resources, g) != "team":
        return []
    out = []
    for r in resources:
        loc = r.get("location")
        if isinstance(loc, str) and normalize_location(loc) not in g.allowed_locations:
            out.append((r.name, (f"location {loc!r} is not allowed for team stacks; allowed: "
                                f"{', '.join(g.allowed_locations)}")))
    for r in _of(resources, T_ENV):
        for p in r.get("workloadProfiles", []) or []:
            ptype = p.get("workloadProfileType")
            if ptype != gpu.CONSUMPTION and ptype not in g.allowed_gpu_profiles:
                out.append((r.name, (f"GPU profile {ptype!r} is not allowed for team stacks; allowed: "
                                    f"{', '.join(g.allowed_gpu_profiles)}")))
    allowed_names = {gpu.GPU_PROFILES[t].short for t in g.allowed_gpu_profiles if t in gpu.GPU_PROFILES}
    for r in _of(resources, T_APP) + _of(resources, T_JOB):
        name = r.get("workloadProfileName")
        if name is not None and name != gpu.CONSUMPTION and name not in allowed_names:
            out.append((r.name, (f"workload profile {name!r} is not allowed for team stacks; allowed: "
                                 f"{', '.join(sorted(allowed_names))}")))
    for r in _of(resources, T_APP):
        mx = r.get("template.scale.maxReplicas")
        if mx is None or mx > g.max_replicas:
            out.append((r.name, (f"maxReplicas {mx if mx is None else int(mx)} is above the team limit of "
                                f"{g.max_replicas}")))
    for r in _of(resources, T_JOB):
        t = r.get("configuration.replicaTimeout") or 0
        if t > g.max_replica_timeout_seconds:
            out.append((r.name, f"replicaTimeout {int(t)} s is above the team limit of {g.max_replica_timeout_seconds}"))
    return out


# --- cost ----------------------------------------------------------------------------------------------------
def gpu_usage(resources: Sequence[Resource]) -> tuple[int, float]:
    """(always-on GPUs, worst-case GPU replica-hours a day) of a stack.

    Always on: GPU app replicas that never scale to zero (minReplicas) plus dedicated GPU nodes kept (minimumCount).
    Replica-hours: every GPU app replica busy all day (maxReplicas x 24) plus one run of each GPU job
    (replicaTimeout x parallelism). Team stacks' apps run on the platform's profiles: known by their names.
    """
    types = {p.get("name"): p.get("workloadProfileType")
             for r in _of(resources, T_ENV) for p in r.get("workloadProfiles", []) or []}
    gpu_names = {t.short for t in gpu.GPU_PROFILES.values()}

    def on_gpu(r: Resource) -> bool:
        name = r.get("workloadProfileName")
        return name in gpu_names or types.get(name) in gpu.GPU_PROFILES

    always_on, hours = 0, 0.0
    for r in _of(resources, T_APP):
        if on_gpu(r):
            always_on += int(r.get("template.scale.minReplicas") or 0)
            hours += 24 * float(r.get("template.scale.maxReplicas") or 10)  # ACA's default maximum is 10
    for r in _of(resources, T_JOB):
        if on_gpu(r):
            parallel = float(r.get("configuration.manualTriggerConfig.parallelism") or 1)
            hours += parallel * float(r.get("configuration.replicaTimeout") or 0) / 3600
    for r in _of(resources, T_ENV):
        for p in r.get("workloadProfiles", []) or []:
            prof = gpu.GPU_PROFILES.get(p.get("workloadProfileType"))
            if prof is not None and not prof.serverless:
                always_on += prof.gpus * int(p.get("minimumCount") or 0)
    return always_on, hours


def gpu_cost_limits(resources: Sequence[Resource], g: Guardrails) -> list[tuple[str, str]]:
    stack = stack_name(resources)
    if stack is None:
        return []
    limits = g.limits_for(stack)
    always_on, hours = gpu_usage(resources)
    out = []
    if limits.max_always_on_gpus is not None and always_on > limits.max_always_on_gpus:
        out.append((stack, (f"{always_on} always-on GPUs (minReplicas / dedicated minimumCount) is above the limit of "
                            f"{limits.max_always_on_gpus} for stack {stack!r} {cite('guardrails-by-stack')}")))
    if limits.max_gpu_replica_hours_per_day is not None and hours > limits.max_gpu_replica_hours_per_day:
        out.append((stack, (f"{hours:g} GPU replica-hours a day at worst (maxReplicas x 24 h + one training run) is "
                            f"above the limit of {limits.max_gpu_replica_hours_per_day:g} for stack {stack!r}")))
    return out


POLICIES: tuple[Policy, ...] = (
    Policy("storage-hardening", "Storage: TLS 1.2, HTTPS only, no blob public access; SMB 3.x with AES-128-GCM and "
           "NTLMv2 so ACA mounts succeed; share soft delete on.", storage_hardening),
    Policy("no-anonymous-ingress", "Inference ingress is HTTPS only and always requires an API key.",
           no_anonymous_ingress),
    Policy("no-plain-secrets", "Secrets are Key Vault references or secret-marked values; images are pulled "
           "by identity; no key-bearing value in plain state.", no_plain_secrets),
    Policy("serverless-gpu-without-counts", "Serverless workload profiles never carry minimum/maximum counts.",
           serverless_gpu_without_counts),
    Policy("consumption-profile-present", "The environment always keeps the 'Consumption' workload profile.",
           consumption_profile_present),
    Policy("prod-data-protected", "Prod: environment, storage, share, Key Vault and resource group protected; purge "
           "protection; long log retention and share soft delete.", prod_data_protected),
    Policy("self-service-limits", "Team stacks: allowed regions and GPU profiles, bounded replicas and job timeout.",
           self_service_limits),
    Policy("gpu-cost-limits", "Always-on GPUs and worst-case GPU replica-hours a day within the stack's limits "
           "(stacks/guardrails.yaml, by stack name).", gpu_cost_limits),
)


def evaluate(resources: Sequence[Resource], guardrails: Guardrails) -> dict[str, list[Violation]]:
    """Every policy's violations (an empty list = pass), in POLICIES order."""
    return {p.name: p.evaluate(resources, guardrails) for p in POLICIES}
