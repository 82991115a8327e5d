"""Platform guardrails (stacks/guardrails.yaml): tiers and limits by stack name, self-service limits, prod minimums.
Pure, no Pulumi.

A stack's tier comes from here, keyed by its name, never from the stack's own file: a stack the platform does not
list is a team stack, whatever its file says ([rule guardrails-by-stack]). CODEOWNERS gives this file and the policy
pack to the platform team, so a team's pull request cannot edit the limits away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GUARDRAILS_FILE = Path("stacks") / "guardrails.yaml"
TEAM = "team"


@dataclass(frozen=True)
class Limits:
    """Cost limits of one stack (None: unlimited)."""

    max_always_on_gpus: int | None = None  # GPU replicas/nodes that never scale to zero
    max_gpu_replica_hours_per_day: float | None = None  # worst case: every GPU replica busy all day


@dataclass(frozen=True)
class Guardrails:
    """The limits the settings, the policies and `lorastack plan` enforce."""

    allowed_locations: tuple[str, ...] = ("westus3", "swedencentral", "australiaeast")
    allowed_gpu_profiles: tuple[str, ...] = ("Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100")
    max_replicas: int = 2
    max_replica_timeout_seconds: int = 21600
    defaults: dict = field(default_factory=dict)
    prod_min_log_retention_days: int = 90
    prod_min_share_soft_delete_days: int = 14
    # stack name -> {"tier": ..., limits}; any other stack is a team stack
    stacks: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "dev": {"tier": "dev"}, "staging": {"tier": "staging"}, "prod": {"tier": "prod"}})
    team_limits: Limits = Limits(max_always_on_gpus=0, max_gpu_replica_hours_per_day=72)
    platform_stack: str | None = None  # the stack whose environment team stacks join (StackReference)
    pulumi_org: str | None = None
    github_repo: str | None = None  # <org>/<repo>, for federated-credential subjects

    def tier_for(self, stack: str) -> str:
        """The tier of ``stack``: the platform's word, not the stack file's."""
        return str((self.stacks.get(stack) or {}).get("tier", TEAM))

    def limits_for(self, stack: str) -> Limits:
        """Cost limits of ``stack`` (team stacks share the self-service limits)."""
        if stack not in self.stacks:
            return self.team_limits
        s = self.stacks[stack] or {}
        return Limits(_opt_int(s.get("maxAlwaysOnGpus")), _opt_float(s.get("maxGpuReplicaHoursPerDay")))

    def github_repository_or_placeholder(self) -> str:
        """``<org>/<repo>`` for federated-credential subjects."""
        return self.github_repo or "<org>/<repo>"

    def platform_reference(self) -> str | None:
        """``org/lorastack/<platform stack>`` for the team stacks' StackReference."""
        if not self.platform_stack:
            return None
        return f"{self.pulumi_org or 'organization'}/lorastack/{self.platform_stack}"


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def load_guardrails(project_dir: Path) -> Guardrails:
    """Read ``stacks/guardrails.yaml`` under ``project_dir`` (built-in defaults when it is absent)."""
    path = project_dir / GUARDRAILS_FILE
    if not path.is_file():
        return Guardrails()
    data = yaml.safe_load(path.read_text()) or {}
    ss, prod = data.get("selfService") or {}, data.get("prod") or {}
    base = Guardrails()
    stacks = data.get("stacks")
    return Guardrails(
        allowed_locations=tuple(ss.get("allowedLocations", base.allowed_locations)),
        allowed_gpu_profiles=tuple(ss.get("allowedGpuProfiles", base.allowed_gpu_profiles)),
        max_replicas=int(ss.get("maxReplicas", base.max_replicas)),
        max_replica_timeout_seconds=int(ss.get("maxReplicaTimeoutSeconds", base.max_replica_timeout_seconds)),
        defaults=dict(ss.get("defaults") or {}),
        prod_min_log_retention_days=int(prod.get("minLogRetentionDays", base.prod_min_log_retention_days)),
        prod_min_share_soft_delete_days=int(prod.get("minShareSoftDeleteDays", base.prod_min_share_soft_delete_days)),
        stacks={str(k): dict(v or {}) for k, v in stacks.items()} if isinstance(stacks, dict) else base.stacks,
        team_limits=Limits(
            _opt_int(ss.get("maxAlwaysOnGpus", base.team_limits.max_always_on_gpus)),
            _opt_float(ss.get("maxGpuReplicaHoursPerDay", base.team_limits.max_gpu_replica_hours_per_day)),
        ),
        platform_stack=ss.get("platformStack"),
        pulumi_org=data.get("pulumiOrg"),
        github_repo=data.get("githubRepository"),
    )
