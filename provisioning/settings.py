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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from provisioning import gpu, naming, probes

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


class RegistrySettings(_Model):
    """A private registry the images are pulled from with the stack's managed identity (AcrPull)."""

    server: str = Field(pattern=r"^[a-z0-9]+\.azurecr\.io$")
    resource_id: str = Field(pattern=r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ContainerRegistry/registries/[^/]+$")


class ImageSettings(_Model):
    """Container images (pin by digest or immutable tag; every cold start re-pulls)."""

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


class InferenceSettings(_GpuWorkload):
    """The inference Container App."""

    min_replicas: int = Field(default=0, ge=0, le=30)
    max_replicas: int = Field(default=1, ge=1, le=30)
    concurrent_requests: int = Field(default=4, ge=1, le=1000)
    cooldown_seconds: int = Field(default=900, ge=60, le=86400)
    model_load_seconds: int = 600
    ip_allow_list: list[IpRule] = Field(default_factory=list)
    entra_auth: EntraAuthSettings | None = None

    @field_validator("model_load_seconds")
    @classmethod
    def _load(cls, v: int) -> int:
        probes.size_probes(v, "/", "/")  # raises with the allowed range
        return v


class StoreSettings(_Model):
    """The adapter store: an Azure Files share mounted at /mnt/store."""

    protocol: Literal["smb", "nfs"] = "smb"
    tier: Literal["Standard", "Premium"] = "Standard"
    quota_gib: int = Field(default=1024, ge=1, le=102400, alias="quotaGiB")
    key_generation: int = Field(default=1, ge=1, le=999)
    account_name: str | None = None
    soft_delete_days: int = Field(default=7, ge=1, le=365)

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
    internal: bool = True

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


class KeyVaultSettings(_Model):
    """The Key Vault holding the HF token and the inference API keys (created, or brought by the stack)."""

    existing_id: str | None = Field(
        default=None, pattern=r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.KeyVault/vaults/[^/]+$"
    )
    name: str | None = None
    hf_token_secret_name: str = Field(default="hf-token", pattern=r"^[0-9A-Za-z-]{1,127}$")
    api_keys_secret_name: str = Field(default="inference-api-keys", pattern=r"^[0-9A-Za-z-]{1,127}$")
    purge_protection: bool = True
    soft_delete_days: int = Field(default=90, ge=7, le=90)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            naming.check_key_vault_name(v)
        return v


class ResourceGroupSettings(_Model):
    """The resource group: created as rg-lorastack-<stack> unless an existing one is named."""

    name: str | None = Field(default=None, pattern=r"^[-\w.()]{1,90}$")
    existing: bool = False


class StackSettings(_Model):
    """Everything a stack file may set, under the ``lorastack:`` namespace."""

    location: str = Field(pattern=r"^[a-z0-9]+$")
    tier: Literal["dev", "staging", "prod", "team"]
    protect: bool = False
    resource_group: ResourceGroupSettings = ResourceGroupSettings()
    network: NetworkSettings | None = None
    logs: LogSettings = LogSettings()
    store: StoreSettings = StoreSettings()
    images: ImageSettings
    training: TrainingSettings
    inference: InferenceSettings
    key_vault: KeyVaultSettings = KeyVaultSettings()
    tags: dict[str, str] = Field(default_factory=dict)
    hf_token: SecretStr | None = None
    inference_api_keys: SecretStr | None = None

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
        if s.network is None:
            problems.append(Problem("store.protocol", "'nfs' needs VNet integration; allowed: set lorastack:network "
                                    "(NFS shares are reachable only from a VNet), or use 'smb'"))
        if s.store.tier != "Premium":
            problems.append(Problem("store.tier", f"{s.store.tier!r} cannot hold NFS shares; allowed: 'Premium'"))
    if s.store.tier == "Premium" and s.store.quota_gib < 100:
        problems.append(Problem("store.quotaGiB", f"{s.store.quota_gib!r} is below the Premium minimum; allowed: 100-102400"))
    if s.network is not None:
        problems += _network_checks(s.network)
    if s.resource_group.existing and not s.resource_group.name:
        problems.append(Problem("resourceGroup.name", "missing; an existing resource group must be named"))
    # Secrets: present, and encrypted in the stack file (never plain text).
    names = {"hfToken": s.key_vault.hf_token_secret_name, "inferenceApiKeys": s.key_vault.api_keys_secret_name}
    for key in SECRET_KEYS:
        value = getattr(s, "hf_token" if key == "hfToken" else "inference_api_keys")
        if value is None and s.key_vault.existing_id is None:
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


def _network_checks(n: NetworkSettings) -> list[Problem]:
    problems = []
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
    raw: Mapping[str, Any], source: str, stack: str, secret_keys: Iterable[str] = ()
) -> StackSettings:
    """Validate bare config keys (``{"location": "westus3", "inference": {...}}``) into StackSettings.

    ``raw`` values may be decoded objects or the JSON strings pulumi.Config returns. ``secret_keys`` are the
    bare keys that were set as secrets. Raises SettingsError listing every problem.
    """
    data = {k: _decode(k, v) for k, v in raw.items()}
    try:
        settings = StackSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(source, _pydantic_problems(exc, data)) from None
    problems = _cross_checks(settings, stack, set(secret_keys))
    if problems:
        raise SettingsError(source, problems)
    return settings
