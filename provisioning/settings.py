"""Typed stack settings: the one model every ``stacks/Pulumi.<stack>.yaml`` is validated against.

Validated once, before any resource is declared. Every error names the stack file, the config key, the bad
value (never a secret's) and what is allowed, e.g.::

    stacks/Pulumi.dev.yaml: lorastack:inference.gpuProfile: 'Consumption-GPU-NC8as-T5' is not a GPU profile
    type; allowed: Consumption-GPU-NC8as-T4, Consumption-GPU-NC24-A100, NC24-A100, NC48-A100, NC96-A100

Pure: no Pulumi import. The program feeds it ``pulumi.Config`` values; ``lorastack plan`` and the tests feed it
the stack file through :mod:`provisioning.stackfile`, so both paths validate the same way.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

from provisioning import engine_plan, gpu, naming, probes, rules
from provisioning.rules import cite

PROJECT = "lorastack"
TIERS = ("dev", "staging", "prod", "team")
REPLICA_TIMEOUT_RANGE = (300, 86400)  # 5 min .. 24 h: ACA's CLI default of 1800 s kills real fine-tunes
SECRET_KEYS = ("hfToken", "inferenceApiKeys")
GPU_TYPES_TEXT = ", ".join(gpu.GPU_PROFILES)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


def _check_gpu_type(v: str) -> str:
    if v not in gpu.GPU_PROFILES:
        raise ValueError(f"{v!r} is not a GPU profile type; allowed: {GPU_TYPES_TEXT}")
    return v


# Addresses VNet clients have; a storage firewall ipRule refuses them (they come in through the subnet rule).
PRIVATE_RANGES = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
DIGEST_RE = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


class RegistrySettings(_Model):
    """The registry the images are pulled from with the stack's managed identity (AcrPull): brought by
    ``server`` + ``resourceId``, or created by this (platform) stack with ``create: true``."""

    server: str | None = Field(default=None, pattern=r"^[a-z0-9]+\.azurecr\.io$")
    resource_id: str | None = Field(
        default=None,
        pattern=r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ContainerRegistry/registries/[^/]+$")
    create: bool = False
    name: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9]{5,50}$")
    sku: Literal["Basic", "Standard", "Premium"] = "Premium"  # Premium: artifact streaming for GPU cold starts


class ImageSettings(_Model):
    """Container images: ``<registry>/lorastack-trainer@sha256:<64 hex>`` (digests required in staging and prod;
    every cold start re-pulls, and a tag can move under a running stack)."""

    trainer: str = Field(min_length=3)
    inference: str = Field(min_length=3)
    registry: RegistrySettings | None = None


class _GpuWorkload(_Model):
    gpu_profile: str
    cpu: float | None = None
    memory: str | None = None
    min_nodes: int | None = Field(default=None, ge=0, le=100)
    max_nodes: int | None = Field(default=None, ge=1, le=100)

    _gpu = field_validator("gpu_profile")(_check_gpu_type)


class TrainingSettings(_GpuWorkload):
    """The fine-tuning Job (manual trigger, one replica per run)."""

    replica_timeout_seconds: int = 21600
    replica_retry_limit: int = Field(default=1, ge=0, le=10)

    @field_validator("replica_timeout_seconds")
    @classmethod
    def _timeout(cls, v: int) -> int:
        lo, hi = REPLICA_TIMEOUT_RANGE
        if not lo <= v <= hi:
            raise ValueError(f"{v!r} is out of range; allowed: {lo}-{hi} seconds")
        return v


class IpRule(_Model):
    """One allowed source range for the inference ingress (all rules Allow; none = open to the internet)."""

    name: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    cidr: str

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            ipaddress.IPv4Network(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 CIDR range; allowed: e.g. 203.0.113.0/24") from None
        return v


class EntraAuthSettings(_Model):
    """Entra ID sign-in (Easy Auth) in front of the chat UI; the API keeps its API key."""

    client_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    tenant_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    allowed_audiences: list[str] = Field(default_factory=list)
    # Paths served without sign-in: probes, and the OpenAI-compatible API, which checks its own API key.
    excluded_paths: list[str] = Field(default_factory=lambda: ["/healthz", "/readyz", "/v1/*"])


class VllmSettings(_Model):
    """vLLM's sizing on the inference app; each value left out is derived from the GPU profile
    (provisioning.engine_plan)."""

    max_loras: int | None = Field(default=None, ge=1, le=64)
    max_lora_rank: int | None = None
    gpu_memory_utilization: float | None = Field(default=None, ge=0.3, le=0.98)
    quantization: Literal["bitsandbytes"] | None = None

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        return v if v is None else engine_plan.check_lora_rank(v)


class InferenceSettings(_GpuWorkload):
    """The inference Container App."""

    # auto: vLLM on GPU profiles (every inference profile today), the built-in engine on CPU (engine_plan).
    engine: Literal["auto", "builtin", "vllm"] = "auto"
    vllm: VllmSettings | None = None

    min_replicas: int = Field(default=0, ge=0, le=30)
    max_replicas: int = Field(default=1, ge=1, le=30)
    concurrent_requests: int = Field(default=4, ge=1, le=1000)
    cooldown_seconds: int = Field(default=900, ge=60, le=86400)
    model_load_seconds: int = 180  # within the ingress timeout when scaled to zero [rule ingress-timeout]
    ip_allow_list: list[IpRule] = Field(default_factory=list)
    entra_auth: EntraAuthSettings | None = None
    # The base model the app serves when the store is empty (LORASTACK_BASE_MODEL / LORASTACK_BASE_REVISION).
    base_model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$")
    base_revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._/-]{1,100}$")

    @field_validator("model_load_seconds")
    @classmethod
    def _load(cls, v: int) -> int:
        probes.size_probes(v, "/", "/")  # raises with the allowed range
        return v

    @field_validator("vllm")
    @classmethod
    def _vllm_needs_vllm(cls, v: VllmSettings | None, info: ValidationInfo) -> VllmSettings | None:
        if v is not None and info.data.get("engine") == "builtin":
            raise ValueError("is set, but inference.engine is 'builtin', which does not read it; allowed: remove "
                             "inference.vllm, or set inference.engine to auto or vllm")
        return v


class StoreSettings(_Model):
    """The adapter store: an Azure Files share mounted at /mnt/store."""

    protocol: Literal["smb", "nfs"] = "smb"
    tier: Literal["Standard", "Premium"] = "Standard"
    quota_gib: int = Field(default=1024, ge=1, le=102400, alias="quotaGiB")
    key_generation: int = Field(default=1, ge=1, le=999)
    account_name: str | None = None
    soft_delete_days: int = Field(default=7, ge=1, le=365)
    # Bring your own account and share (read with get functions; only the environment storage links are added).
    existing: bool = False
    resource_group: str | None = Field(default=None, pattern=r"^[-\w.()]{1,90}$")
    share_name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

    @field_validator("account_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            naming.check_storage_account_name(v)
        return v


class NetworkSettings(_Model):
    """VNet integration: the environment gets a delegated infrastructure subnet and becomes internal."""

    address_space: str | None = None
    infrastructure_subnet: str | None = None
    infrastructure_subnet_id: str | None = None  # bring your own (already delegated) subnet
    # External environment (public endpoint, restricted by inference.ipAllowList). Internal environments have no
    # way in (no private DNS zone, no peering) and are refused [rule internal-unreachable].
    internal: bool = False
    # Named public ranges (laptops' egress, CI runners) the store's firewall admits besides the VNet; without
    # them `lorastack finetune` / `status` get 403 from outside the VNet [rule storage-firewall].
    client_cidrs: list[IpRule] = Field(default_factory=list)

    @field_validator("address_space", "infrastructure_subnet")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.IPv4Network(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IPv4 CIDR range; allowed: e.g. 10.40.0.0/23") from None
        return v


class LogSettings(_Model):
    """Log Analytics workspace retention and optional daily cap."""

    retention_days: int = Field(default=30, ge=30, le=730)
    daily_quota_gb: float | None = Field(default=None, gt=0)
    # Bring your own workspace (read with get_workspace; the environment's diagnostic setting ships to it).
    existing_workspace_id: str | None = Field(default=None, pattern=(
        r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.OperationalInsights/workspaces/[^/]+$"))


class EnvironmentSettings(_Model):
    """Bring your own ACA environment (read with get_managed_environment, never modified): its workload profiles
    must already include the ones the job and app use."""

    existing_id: str | None = Field(default=None, pattern=(
        r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.App/managedEnvironments/[^/]+$"))


class KeyVaultSettings(_Model):
    """The Key Vault holding the HF token and the inference API keys (created, or brought by the stack)."""

    existing_id: str | None = Field(
        default=None, pattern=r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.KeyVault/vaults/[^/]+$"
    )
    name: str | None = None
    hf_token_secret_name: str = Field(default="hf-token", pattern=r"^[0-9A-Za-z-]{1,127}$")
    api_keys_secret_name: str = Field(default="inference-api-keys", pattern=r"^[0-9A-Za-z-]{1,127}$")
    purge_protection: bool | None = None  # default: on in staging and prod only [rule kv-purge-teardown]
    soft_delete_days: int = Field(default=90, ge=7, le=90)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            naming.check_key_vault_name(v)
        return v


class AzureMLSettings(_Model):
    """Azure ML resources for runs that outgrow one ACA replica: workspace, GPU cluster, the store as a datastore."""

    compute_name: str = Field(default="gpu-cluster", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{1,22}$")
    vm_size: str = Field(default="Standard_NC24ads_A100_v4", pattern=r"^Standard_[A-Za-z0-9_]+$")
    min_nodes: int = Field(default=0, ge=0, le=100)
    max_nodes: int = Field(default=1, ge=1, le=100)
    low_priority: bool = False
    idle_seconds: int = Field(default=1800, ge=60, le=86400)


class ResourceGroupSettings(_Model):
    """The resource group: created as rg-lorastack-<stack> unless an existing one is named."""

    name: str | None = Field(default=None, pattern=r"^[-\w.()]{1,90}$")
    existing: bool = False


class StackSettings(_Model):
    """Everything a stack file may set, under the ``lorastack:`` namespace."""

    location: str = Field(pattern=r"^[a-z0-9]+$")
    tier: Literal["dev", "staging", "prod", "team"]
    protect: bool = False
    # GPU profile types the environment keeps besides the ones its own job and app use: profiles team stacks run on
    # (platform stack), or the old profile during a GPU profile change until nothing uses it [rule profile-in-use].
    extra_gpu_profiles: list[str] = Field(default_factory=list)
    resource_group: ResourceGroupSettings = ResourceGroupSettings()
    network: NetworkSettings | None = None
    environment: EnvironmentSettings = EnvironmentSettings()
    logs: LogSettings = LogSettings()
    store: StoreSettings = StoreSettings()
    images: ImageSettings
    training: TrainingSettings
    inference: InferenceSettings
    key_vault: KeyVaultSettings = KeyVaultSettings()
    azureml: AzureMLSettings | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    hf_token: SecretStr | None = None
    inference_api_keys: SecretStr | None = None

    _extra = field_validator("extra_gpu_profiles")(lambda v: [_check_gpu_type(x) for x in v])

    @property
    def purge_protection(self) -> bool:
        """Key Vault purge protection: the stack's word, else on in staging and prod only."""
        if self.key_vault.purge_protection is not None:
            return self.key_vault.purge_protection
        return self.tier in rules.PURGE_PROTECTION_TIERS

    @classmethod
    def config_keys(cls) -> list[str]:
        """The bare config keys (``location``, ``inference``...) a stack file may set."""
        return [f.alias or name for name, f in cls.model_fields.items()]


class Problem(tuple):
    """(key, message): one thing wrong with a stack file."""

    def __new__(cls, key: str, message: str):
        return super().__new__(cls, (key, message))

    key = property(lambda self: self[0])
    message = property(lambda self: self[1])


class SettingsError(ValueError):
    """A stack file failed validation; ``str()`` lists every problem with file, key, value and what is allowed."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {PROJECT}:{p.key}: {p.message}" for p in problems))


def _decode(key: str, value: Any) -> Any:
    # pulumi.Config hands every value over as a string; structured values are JSON.
    if isinstance(value, str) and key not in ("location", "tier") and key not in SECRET_KEYS:
        s = value.strip()
        if s[:1] in "{[" or s in ("true", "false") or re.fullmatch(r"-?\d+(\.\d+)?", s):
            try:
                return json.loads(s)
            except json.JSONDecodeError:
                return value
    return value


def _loc_key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _lookup(raw: Mapping[str, Any], loc: tuple) -> tuple[bool, Any]:
    cur: Any = raw
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, cur


def _fields_of(loc: tuple) -> list[str]:
    model: Any = StackSettings
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            inner = [getattr(a, "__args__", ()) for a in args]
            model = next((x for t in inner for x in t if isinstance(x, type) and issubclass(x, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _pydantic_problems(exc: ValidationError, raw: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = _loc_key(loc)
        secret = bool(loc) and loc[0] in SECRET_KEYS
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _fields_of(loc[:-1])
            problems.append(Problem(key, f"unknown key; allowed: {', '.join(allowed)}"))
        elif err["type"] == "missing":
            problems.append(Problem(key, "missing; this key is required"))
        elif err["type"] == "value_error":
            problems.append(Problem(key, msg))
        else:
            found, value = _lookup(raw, loc)
            shown = "<secret>" if secret else repr(value) if found else repr(err.get("input"))
            problems.append(Problem(key, f"{shown} is not allowed: {msg}"))
    return problems


def _cross_checks(s: StackSettings, stack: str, secret_keys: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    for section in ("training", "inference"):
        w = getattr(s, section)
        profile = gpu.GPU_PROFILES[w.gpu_profile]
        if profile.serverless:
            for fld in ("min_nodes", "max_nodes"):
                if getattr(w, fld) is not None:
                    problems.append(Problem(
                        f"{section}.{to_camel(fld)}",
                        f"{getattr(w, fld)!r} is not allowed on the serverless GPU profile {w.gpu_profile} (Azure "
                        "rejects MinimumCount/MaximumCount: WorkloadProfilePropertyNotSupported); allowed: only on "
                        f"dedicated profiles {', '.join(gpu.DEDICATED_GPU_TYPES)}",
                    ))
        elif w.min_nodes is not None and w.max_nodes is not None and w.min_nodes > w.max_nodes:
            problems.append(Problem(f"{section}.minNodes", f"{w.min_nodes!r} is above maxNodes {w.max_nodes}"))
        if w.cpu is not None or w.memory is not None:
            try:
                gpu.replica_size(w.gpu_profile, w.cpu, w.memory)
            except ValueError as e:
                key = f"{section}.cpu" if w.cpu is not None else f"{section}.memory"
                problems.append(Problem(key, str(e)))
    if s.inference.min_replicas > s.inference.max_replicas:
        problems.append(Problem("inference.minReplicas",
                                f"{s.inference.min_replicas!r} is above maxReplicas {s.inference.max_replicas}"))
    if s.store.protocol == "nfs":
        problems.append(Problem("store.protocol", (
            "'nfs' cannot be used: the Files REST API is not available on NFS shares, so `lorastack finetune`, "
            f"`status` and `adapters pull` could not read or write the store {cite('nfs-no-rest')}; allowed: 'smb'")))
    if s.store.tier == "Premium" and s.store.quota_gib < 100:
        problems.append(Problem("store.quotaGiB", f"{s.store.quota_gib!r} is below the Premium minimum; allowed: 100-102400"))
    if s.network is not None:
        problems += _network_checks(s.network, s.inference)
    problems += _deploy_time_checks(s)
    if s.resource_group.existing and not s.resource_group.name:
        problems.append(Problem("resourceGroup.name", "missing; an existing resource group must be named"))
    # Secrets: present, and encrypted in the stack file (never plain text).
    names = {"hfToken": s.key_vault.hf_token_secret_name, "inferenceApiKeys": s.key_vault.api_keys_secret_name}
    for key in SECRET_KEYS:
        value = getattr(s, "hf_token" if key == "hfToken" else "inference_api_keys")
        # The HF token is optional (public base models need none); the API keys are not.
        if value is None and key != "hfToken" and s.key_vault.existing_id is None and s.tier != "team":
            problems.append(Problem(key, (
                f"missing secret; set it with `pulumi config set --secret {PROJECT}:{key} <value> --stack {stack}` "
                f"(or import it from an ESC environment), or bring your own Key Vault "
                f"(lorastack:keyVault.existingId) that already holds secret {names[key]!r}")))
        elif value is not None and key not in secret_keys:
            problems.append(Problem(key, (
                f"<value hidden> is stored in plain text; allowed: a secret only, set with "
                f"`pulumi config set --secret {PROJECT}:{key} <value> --stack {stack}`")))
        elif value is not None and not value.get_secret_value().strip():
            problems.append(Problem(key, "<empty> is not allowed: the secret is empty"))
    return problems


def _deploy_time_checks(s: StackSettings) -> list[Problem]:
    """The catalogue's rules (provisioning.rules) that a stack file alone can break."""
    problems: list[Problem] = []
    for section in ("training", "inference"):
        ptype = getattr(s, section).gpu_profile
        problems += _region_problem(f"{section}.gpuProfile", ptype, s.location)
    for i, ptype in enumerate(s.extra_gpu_profiles):
        problems += _region_problem(f"extraGpuProfiles[{i}]", ptype, s.location)
    i = s.inference
    if i.min_replicas == 0 and i.model_load_seconds > rules.MAX_COLD_MODEL_LOAD_SECONDS:
        problems.append(Problem("inference.modelLoadSeconds", (
            f"{i.model_load_seconds!r} with minReplicas 0: the request that wakes the app waits for the model load, "
            f"and ingress answers 504 after {rules.INGRESS_TIMEOUT_SECONDS} s {cite('ingress-timeout')}; allowed: "
            f"at most {rules.MAX_COLD_MODEL_LOAD_SECONDS} with minReplicas 0 (a smaller model, a Premium share), "
            "or minReplicas >= 1")))
    if s.tier in rules.DIGEST_TIERS:
        for key in ("trainer", "inference"):
            ref = getattr(s.images, key)
            if not DIGEST_RE.match(ref):
                problems.append(Problem(f"images.{key}", (
                    f"{ref!r} is not pinned by digest; tier {s.tier!r} deploys digests only {cite('image-digest')}; "
                    "allowed: <registry>/<repository>@sha256:<64 hex> (the image workflow proposes them)")))
    if s.key_vault.purge_protection and s.tier not in rules.PURGE_PROTECTION_TIERS:
        problems.append(Problem("keyVault.purgeProtection", (
            f"true is not allowed in tier {s.tier!r}: purge protection cannot be switched off, and the soft-deleted "
            f"vault keeps its name, so `pulumi destroy` then `up` conflicts {cite('kv-purge-teardown')}; allowed: "
            f"false (purge protection is on by default in {', '.join(rules.PURGE_PROTECTION_TIERS)})")))
    reg = s.images.registry
    if reg is not None:
        if reg.create and (reg.server or reg.resource_id):
            problems.append(Problem("images.registry.create", "true cannot be combined with server/resourceId; "
                                    "allowed: create a registry, or bring one by server + resourceId"))
        elif not reg.create and not (reg.server and reg.resource_id):
            problems.append(Problem("images.registry", "missing server/resourceId; allowed: bring a registry by "
                                    "server + resourceId, or set create: true"))
    if s.azureml is not None and s.azureml.min_nodes > s.azureml.max_nodes:
        problems.append(Problem("azureml.minNodes", f"{s.azureml.min_nodes!r} is above maxNodes {s.azureml.max_nodes}"))
    if s.store.existing and not (s.store.account_name and s.store.resource_group):
        problems.append(Problem("store.existing", "true needs store.accountName and store.resourceGroup (the "
                                "account to read); allowed: name the account, or set existing: false"))
    if s.environment.existing_id and (s.network or s.extra_gpu_profiles or s.logs.existing_workspace_id):
        problems.append(Problem("environment.existingId", "a brought environment keeps its own network, profiles and "
                                "logs; allowed: remove network, extraGpuProfiles and logs.existingWorkspaceId"))
    if s.tier == "team":
        for key, value in (("network", s.network), ("images.registry", s.images.registry),
                           ("environment.existingId", s.environment.existing_id), ("azureml", s.azureml),
                           ("keyVault.existingId", s.key_vault.existing_id), ("extraGpuProfiles", s.extra_gpu_profiles)):
            if value:
                problems.append(Problem(key, (
                    "is set by the platform stack for team stacks (they join its environment, vault and registry "
                    f"{cite('gpu-quota-per-environment')}); allowed: remove it from the team's stack file")))
    return problems


def _region_problem(key: str, ptype: str, location: str) -> list[Problem]:
    if ptype in gpu.DEDICATED_GPU_TYPES and location not in rules.DEDICATED_GPU_REGIONS:
        return [Problem(key, (f"{ptype!r} is a dedicated GPU profile, which {location!r} does not offer "
                              f"{cite('dedicated-gpu-regions')}; allowed there: "
                              f"{', '.join(t for t, r in rules.SERVERLESS_GPU_REGIONS.items() if location in r) or 'none'}"
                              f"; dedicated GPUs in: {', '.join(rules.DEDICATED_GPU_REGIONS)}"))]
    regions = rules.SERVERLESS_GPU_REGIONS.get(ptype)
    if regions is not None and location not in regions:
        return [Problem(key, (f"{ptype!r} is not offered in {location!r} {cite('serverless-gpu-regions')}; "
                              f"allowed regions: {', '.join(regions)}"))]
    return []


def _network_checks(n: NetworkSettings, inference: InferenceSettings) -> list[Problem]:
    problems = []
    if n.internal:
        problems.append(Problem("network.internal", (
            "true is not supported: an internal environment has no public endpoint, and without a private DNS zone "
            "for its default domain and a route in (peering, VPN) neither users nor CI can reach it "
            f"{cite('internal-unreachable')}; allowed: false (external environment: restrict the endpoint with "
            "inference.ipAllowList and admit clients to the store with network.clientCidrs)")))
    for idx, rule in enumerate(n.client_cidrs):
        net = ipaddress.IPv4Network(rule.cidr)
        if any(net.subnet_of(p) for p in PRIVATE_RANGES) or net.prefixlen == 31:
            problems.append(Problem(f"network.clientCidrs[{idx}].cidr", (
                f"{rule.cidr!r} cannot be a storage firewall rule: ipRules take public IPv4 ranges (no /31) "
                f"{cite('storage-firewall')}; allowed: e.g. 203.0.113.0/24 (VNet clients arrive through the subnet "
                "rule)")))
    if n.infrastructure_subnet_id:
        if not re.match(r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/virtualNetworks/"
                        r"[^/]+/subnets/[^/]+$", n.infrastructure_subnet_id):
            problems.append(Problem("network.infrastructureSubnetId",
                                    f"{n.infrastructure_subnet_id!r} is not a subnet resource ID"))
        return problems
    if not n.address_space or not n.infrastructure_subnet:
        missing = "network.addressSpace" if not n.address_space else "network.infrastructureSubnet"
        return [Problem(missing, "missing; a VNet needs addressSpace and infrastructureSubnet "
                                 "(or give infrastructureSubnetId)")]
    space, subnet = ipaddress.IPv4Network(n.address_space), ipaddress.IPv4Network(n.infrastructure_subnet)
    if subnet.prefixlen > 27:
        problems.append(Problem("network.infrastructureSubnet",
                                f"{n.infrastructure_subnet!r} is too small for a workload-profiles environment; "
                                "allowed: /27 or larger (/23-/24 recommended: serverless GPUs use one IP per replica)"))
    if not subnet.subnet_of(space):
        problems.append(Problem("network.infrastructureSubnet",
                                f"{n.infrastructure_subnet!r} is not inside addressSpace {n.address_space!r}"))
    return problems


def parse_settings(
    raw: Mapping[str, Any], source: str, stack: str, secret_keys: Iterable[str] = (), expected_tier: str | None = None
) -> StackSettings:
    """Validate bare config keys (``{"location": "westus3", "inference": {...}}``) into StackSettings.

    ``raw`` values may be decoded objects or the JSON strings pulumi.Config returns. ``secret_keys`` are the
    bare keys that were set as secrets. ``expected_tier`` is the tier the platform's guardrails give this stack
    (``Guardrails.tier_for``); a stack file that claims another is refused. Raises SettingsError listing every problem.
    """
    data = {k: _decode(k, v) for k, v in raw.items()}
    if expected_tier is not None and data.get("tier") not in (None, expected_tier):
        raise SettingsError(source, [Problem("tier", (
            f"{data.get('tier')!r} is not this stack's tier: stacks/guardrails.yaml gives stack {stack!r} tier "
            f"{expected_tier!r}, and a stack file cannot choose its own {cite('guardrails-by-stack')}; allowed: "
            f"{expected_tier!r}"))])
    try:
        settings = StackSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(source, _pydantic_problems(exc, data)) from None
    problems = _cross_checks(settings, stack, set(secret_keys))
    if problems:
        raise SettingsError(source, problems)
    return settings
