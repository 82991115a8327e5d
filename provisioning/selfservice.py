"""``lorastack stack new TEAM``: a team's own stack file, written from stacks/team.template.yaml within the
platform guardrails (stacks/guardrails.yaml), validated by rendering it exactly like ``lorastack plan``, plus the
team's entry in stacks/pipeline.yaml (GitHub environments, federated-credential subjects, the Pulumi stack created
with upsert) and the one-time platform steps it cannot do itself.
"""

from __future__ import annotations

import string
import sys
from dataclasses import dataclass
from pathlib import Path

from provisioning import gpu, naming, pipeline
from provisioning.guardrails import Guardrails, load_guardrails
from provisioning.stackfile import find_project_dir, stack_path

TEMPLATE = Path("stacks") / "team.template.yaml"
RESERVED = {"dev", "staging", "prod", "platform"}


class SelfServiceError(ValueError):
    """A request outside the guardrails (or otherwise unusable)."""


@dataclass(frozen=True)
class TeamRequest:
    """What a team asks for."""

    team: str
    location: str
    gpu_profile: str
    max_replicas: int


def check_request(req: TeamRequest, g: Guardrails) -> None:
    """Raise SelfServiceError naming the option, the value and what is allowed, if ``req`` breaks a guardrail."""
    try:
        naming.check_stack_name(req.team)
    except ValueError as e:
        raise SelfServiceError(f"TEAM: {e}") from None
    if req.team in RESERVED:
        raise SelfServiceError(f"TEAM: {req.team!r} is reserved; allowed: any other name")
    if req.location not in g.allowed_locations:
        raise SelfServiceError(f"--location: {req.location!r} is not allowed for team stacks; allowed: "
                               f"{', '.join(g.allowed_locations)}")
    if req.gpu_profile not in gpu.GPU_PROFILES:
        raise SelfServiceError(f"--gpu: {req.gpu_profile!r} is not a GPU profile type; allowed: "
                               f"{', '.join(g.allowed_gpu_profiles)}")
    if req.gpu_profile not in g.allowed_gpu_profiles:
        raise SelfServiceError(f"--gpu: {req.gpu_profile!r} is not allowed for team stacks; allowed: "
                               f"{', '.join(g.allowed_gpu_profiles)}")
    if not 1 <= req.max_replicas <= g.max_replicas:
        raise SelfServiceError(f"--max-replicas: {req.max_replicas} is above the team limit; allowed: "
                               f"1-{g.max_replicas}")
    if not g.platform_stack:
        raise SelfServiceError("stacks/guardrails.yaml: selfService.platformStack is missing; the platform team must "
                               "name the stack whose environment team stacks join")
    if g.tier_for(req.team) != "team":
        raise SelfServiceError(f"TEAM: {req.team!r} is a platform stack in stacks/guardrails.yaml; allowed: any "
                               "other name")


def render_team_stack(template_text: str, req: TeamRequest, g: Guardrails) -> str:
    """The stack file text for ``req`` (guardrails already checked)."""
    d = g.defaults
    return string.Template(template_text).substitute(
        team=req.team,
        location=req.location,
        gpu=req.gpu_profile,
        max_replicas=req.max_replicas,
        training_gpu=d.get("trainingGpuProfile", "Consumption-GPU-NC24-A100"),
        replica_timeout=min(int(d.get("replicaTimeoutSeconds", 14400)), g.max_replica_timeout_seconds),
        trainer_image=d["trainerImage"],
        inference_image=d["inferenceImage"],
    )


@dataclass(frozen=True)
class NewStack:
    """What ``stack new`` wrote."""

    path: Path
    pipeline_entry: dict
    one_time_steps: list[str]


def create_team_stack(req: TeamRequest, project_dir: Path) -> NewStack:
    """Write stacks/Pulumi.<team>.yaml, validate it like ``lorastack plan`` (removed again if it fails), then add its
    stacks/pipeline.yaml entry."""
    from provisioning.plan import plan_stack
    from provisioning.settings import SettingsError

    g = load_guardrails(project_dir)
    check_request(req, g)
    path = stack_path(project_dir, req.team)
    if path.exists():
        raise SelfServiceError(f"{path.relative_to(project_dir)} already exists; edit it or pick another team name")
    template = project_dir / TEMPLATE
    if not template.is_file():
        raise SelfServiceError(f"template {TEMPLATE} not found under {project_dir}")
    if "trainerImage" not in g.defaults or "inferenceImage" not in g.defaults:
        raise SelfServiceError("stacks/guardrails.yaml: selfService.defaults.trainerImage/inferenceImage are missing")
    path.write_text(render_team_stack(template.read_text(), req, g))
    try:
        result = plan_stack(req.team, project_dir, g)
    except SettingsError as e:
        path.unlink()
        raise SelfServiceError(f"the generated stack does not validate (template or guardrails are wrong):\n{e}") from None
    if not result.ok:
        path.unlink()
        bad = [f"{k}: {v.resource}: {v.message}" for k, vs in result.verdicts.items() for v in vs]
        raise SelfServiceError("the generated stack violates policies:\n" + "\n".join(bad))
    entry = pipeline.add_stack(project_dir, req.team, g)
    vault = str(result.outputs.get("keyVaultName") or "<platform Key Vault>")
    return NewStack(path, entry, pipeline.one_time_steps(req.team, g, vault))


def stack_new_command(args) -> int:
    """CLI handler for ``lorastack stack new TEAM``."""
    try:
        project_dir = find_project_dir(Path(args.project_dir) if getattr(args, "project_dir", None) else None)
        g = load_guardrails(project_dir)
        d = g.defaults
        req = TeamRequest(
            team=args.team,
            location=args.location or d.get("location", g.allowed_locations[0]),
            gpu_profile=args.gpu or d.get("gpuProfile", g.allowed_gpu_profiles[0]),
            max_replicas=args.max_replicas if args.max_replicas is not None else int(d.get("maxReplicas", 1)),
        )
        new = create_team_stack(req, project_dir)
    except (SelfServiceError, ValueError) as e:
        print(f"lorastack stack new: {e}", file=sys.stderr)
        return 2
    rel = new.path.relative_to(project_dir)
    e = new.pipeline_entry
    print(f"wrote {rel} (location {req.location}, inference {req.gpu_profile}, max {req.max_replicas} replicas); "
          f"it renders offline with every policy passing.")
    print(f"wrote {pipeline.PIPELINE_FILE} entry {req.team!r}: Pulumi stack {e['pulumiStack']} (created with upsert "
          f"on the first preview), GitHub environments {e['deployEnvironment']} / {e['previewEnvironment']}, "
          f"federated-credential subjects {e['deploySubject']} / {e['previewSubject']}.")
    print("one-time platform steps (lorastack cannot do these):")
    for n, step in enumerate(new.one_time_steps, 1):
        print(f"  {n}. {step}")
    print(f"then open a pull request with {rel} and {pipeline.PIPELINE_FILE}; CI runs `lorastack plan --stack "
          f"{req.team}` and `pulumi preview`.")
    return 0
