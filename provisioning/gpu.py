"""ACA GPU workload profiles: what each profile type offers, and how the environment's profile list is built.

Pure data and functions (no Pulumi). Facts from the ACA docs (workload-profiles-overview, gpu-serverless-overview):
serverless GPU profiles reject minimum/maximum counts (WorkloadProfilePropertyNotSupported); dedicated profiles
are billed per node and take node counts; the ``Consumption`` profile must always be sent under that exact name
(dropping it fails with WorkloadProfileInUse).
"""

from __future__ import annotations

from dataclasses import dataclass

CONSUMPTION = "Consumption"


@dataclass(frozen=True)
class GpuProfile:
    """One GPU workload profile type and the replica sizes it accepts."""

    type: str
    serverless: bool
    gpus: int
    gpu_model: str
    # (cpu, memory) pairs a replica may request on this profile; the first is the default.
    sizes: tuple[tuple[float, str], ...]
    short: str  # the workload profile *name* used inside the environment


GPU_PROFILES: dict[str, GpuProfile] = {
    p.type: p
    for p in (
        GpuProfile("Consumption-GPU-NC8as-T4", True, 1, "T4 16GB", ((8, "56Gi"),), "gpu-t4"),
        GpuProfile("Consumption-GPU-NC24-A100", True, 1, "A100 80GB", ((24, "220Gi"),), "gpu-a100"),
        GpuProfile("NC24-A100", False, 1, "A100 80GB", ((24, "220Gi"),), "nc24-a100"),
        GpuProfile("NC48-A100", False, 2, "2x A100 80GB", ((48, "440Gi"), (24, "220Gi")), "nc48-a100"),
        GpuProfile("NC96-A100", False, 4, "4x A100 80GB", ((96, "880Gi"), (48, "440Gi"), (24, "220Gi")), "nc96-a100"),
    )
}
SERVERLESS_GPU_TYPES = tuple(t for t, p in GPU_PROFILES.items() if p.serverless)
DEDICATED_GPU_TYPES = tuple(t for t, p in GPU_PROFILES.items() if not p.serverless)


def allowed_sizes_text(profile_type: str) -> str:
    """``'24 CPU / 220Gi'`` style list of the sizes a profile accepts (for error messages)."""
    return ", ".join(f"{_fmt(c)} CPU / {m}" for c, m in GPU_PROFILES[profile_type].sizes)


def _fmt(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else str(cpu)


def replica_size(profile_type: str, cpu: float | None, memory: str | None) -> tuple[float, str]:
    """The (cpu, memory) a replica requests on ``profile_type``; defaults to the profile's full size.

    Raises ValueError when the pair is not one the profile offers.
    """
    profile = GPU_PROFILES[profile_type]
    if cpu is None and memory is None:
        return profile.sizes[0]
    for c, m in profile.sizes:
        if (cpu is None or float(cpu) == float(c)) and (memory is None or memory == m):
            return c, m
    raise ValueError(
        f"{_fmt(cpu) if cpu is not None else '?'} CPU / {memory or '?'} is not offered by {profile_type}; "
        f"allowed: {allowed_sizes_text(profile_type)}"
    )


@dataclass(frozen=True)
class WorkloadProfileSpec:
    """One entry of the environment's ``workloadProfiles`` list."""

    name: str
    type: str
    minimum_count: int | None = None
    maximum_count: int | None = None


def workload_profiles(uses: list[tuple[str, int | None, int | None]]) -> list[WorkloadProfileSpec]:
    """The environment's profile list for the GPU profiles in use.

    ``uses`` holds (profile type, min nodes, max nodes) per workload (training, inference). ``Consumption`` is
    always first, under its exact name. Each GPU type appears once; only dedicated types get node counts
    (0..1 when not given), serverless types never do.
    """
    out = [WorkloadProfileSpec(CONSUMPTION, CONSUMPTION)]
    seen: dict[str, int] = {}
    for ptype, lo, hi in uses:
        profile = GPU_PROFILES[ptype]
        if profile.serverless:
            spec = WorkloadProfileSpec(profile.short, ptype)
        else:
            spec = WorkloadProfileSpec(profile.short, ptype, 0 if lo is None else lo, 1 if hi is None else hi)
        if ptype in seen:
            prev = out[seen[ptype]]
            if spec.minimum_count is not None:  # dedicated: one node pool serves both workloads
                out[seen[ptype]] = WorkloadProfileSpec(
                    prev.name, ptype, max(prev.minimum_count or 0, spec.minimum_count),
                    max(prev.maximum_count or 0, spec.maximum_count or 0),
                )
            continue
        seen[ptype] = len(out)
        out.append(spec)
    return out


def profile_name(profile_type: str) -> str:
    """The workload profile name a job or app uses to run on ``profile_type``."""
    return GPU_PROFILES[profile_type].short
