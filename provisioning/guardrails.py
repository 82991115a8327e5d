"""Platform guardrails (stacks/guardrails.yaml): self-service limits and prod minimums. Pure, no Pulumi."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

GUARDRAILS_FILE = Path("stacks") / "guardrails.yaml"


@dataclass(frozen=True)
class Guardrails:
    """The limits the policies enforce."""

    allowed_locations: tuple[str, ...] = ("westus3", "swedencentral", "australiaeast")
    allowed_gpu_profiles: tuple[str, ...] = ("Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100")
    max_replicas: int = 2
    max_replica_timeout_seconds: int = 21600
    platform_key_vault_id: str | None = None
    defaults: dict = field(default_factory=dict)
    prod_min_log_retention_days: int = 90
    prod_min_share_soft_delete_days: int = 14


def load_guardrails(project_dir: Path) -> Guardrails:
    """Read ``stacks/guardrails.yaml`` under ``project_dir`` (built-in defaults when it is absent)."""
    path = project_dir / GUARDRAILS_FILE
    if not path.is_file():
        return Guardrails()
    data = yaml.safe_load(path.read_text()) or {}
    ss, prod = data.get("selfService") or {}, data.get("prod") or {}
    base = Guardrails()
    return Guardrails(
        allowed_locations=tuple(ss.get("allowedLocations", base.allowed_locations)),
        allowed_gpu_profiles=tuple(ss.get("allowedGpuProfiles", base.allowed_gpu_profiles)),
        max_replicas=int(ss.get("maxReplicas", base.max_replicas)),
        max_replica_timeout_seconds=int(ss.get("maxReplicaTimeoutSeconds", base.max_replica_timeout_seconds)),
        platform_key_vault_id=ss.get("platformKeyVaultId"),
        defaults=dict(ss.get("defaults") or {}),
        prod_min_log_retention_days=int(prod.get("minLogRetentionDays", base.prod_min_log_retention_days)),
        prod_min_share_soft_delete_days=int(prod.get("minShareSoftDeleteDays", base.prod_min_share_soft_delete_days)),
    )
