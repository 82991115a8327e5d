"""Which stacks the infrastructure workflow previews and deploys, in which order, behind which GitHub environment.

Deploy waves: ``platform`` (the stack that owns the shared environment, registry and vault: pipeline metadata
``order: 0``) -> ``dev`` -> ``staging`` -> ``teams`` (every ``tier: team`` stack, each its own job) and ``prod``
(after dev and staging only, so a broken team stack never blocks prod). The wave of a stack is its ``lorastack:tier``
in ``stacks/Pulumi.<stack>.yaml``, not its name, so a stack called ``dev2`` with ``tier: dev`` deploys with dev.

GitHub environments (CONTRACTS.md): ``stack-<stack>`` gates ``pulumi up`` (deploy identity, approvals),
``preview-<stack>`` serves PR previews and the drift check (read-only identity). ``lorastack stack new`` records a
stack's pipeline metadata; this module reads it tolerantly from ``stacks/pipeline.yaml`` (assumed shape, either
``stacks: {<stack>: {...}}`` or ``{<stack>: {...}}`` at the top, keys camelCase or snake_case:
``environment`` / ``deployEnvironment``, ``previewEnvironment``, ``pulumiStack``) and falls back to the contract's
names, so a stack without metadata still gets the right environments.

    python -m ci.stacks matrix [--stacks-dir stacks] [--only STACK] [--github-output FILE]

prints (and appends to ``$GITHUB_OUTPUT``) one JSON list per wave, ``dev=[{"stack", "environment", "preview",
"pulumi_stack"}...]``, plus ``all`` (every stack, in deploy order) and ``count``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

# The names are the provisioning side's (what `lorastack stack new` writes), defined once there.
from provisioning.pipeline import deploy_environment, preview_environment

WAVES = ("platform", "dev", "staging", "teams", "prod")
TIER_WAVE = {"dev": "dev", "staging": "staging", "team": "teams", "prod": "prod"}
STACK_FILE_RE = re.compile(r"^Pulumi\.(?P<stack>[A-Za-z0-9][A-Za-z0-9._-]*)\.yaml$")
PIPELINE_FILE = "pipeline.yaml"
PROJECT = "lorastack"


class StackError(ValueError):
    """A stack file or the pipeline metadata cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Stack:
    """One stack as the workflow sees it: its name, deploy wave and GitHub environments."""

    stack: str
    tier: str
    wave: str
    environment: str
    preview: str
    pulumi_stack: str

    def matrix_entry(self) -> dict[str, str]:
        d = asdict(self)
        del d["tier"], d["wave"]
        return d


def stack_names(stacks_dir: Path) -> list[str]:
    """Every ``Pulumi.<stack>.yaml`` in ``stacks_dir`` (sorted); other files (guardrails, templates) are not stacks."""
    return sorted(m["stack"] for p in Path(stacks_dir).iterdir() if (m := STACK_FILE_RE.match(p.name)))


def read_tier(path: Path) -> str:
    """``config.lorastack:tier`` of a stack file; errors name the file and the key."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise StackError(f"{path}: cannot read the stack file: {exc}") from exc
    config = doc.get("config") if isinstance(doc, dict) else None
    tier = config.get("lorastack:tier") if isinstance(config, dict) else None
    if tier not in TIER_WAVE:
        raise StackError(
            f"{path}: config.lorastack:tier is {tier!r}; set one of {', '.join(TIER_WAVE)} "
            "(it decides the deploy wave and the guardrails)"
        )
    return tier


def _get(d: dict, *keys: str) -> str | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def read_pipeline_metadata(stacks_dir: Path) -> dict[str, dict]:
    """Per-stack pipeline metadata written by ``lorastack stack new`` (absent file = no metadata)."""
    path = Path(stacks_dir) / PIPELINE_FILE
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StackError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise StackError(f"{path}: expected a mapping of stack name -> settings")
    entries = doc.get("stacks", doc)
    if not isinstance(entries, dict):
        raise StackError(f"{path}: stacks: expected a mapping of stack name -> settings")
    return {str(k): v for k, v in entries.items() if isinstance(v, dict)}


def load_stacks(stacks_dir: Path, org: str | None = None) -> list[Stack]:
    """Every stack of ``stacks_dir`` in deploy order (wave, then name)."""
    stacks_dir = Path(stacks_dir)
    meta = read_pipeline_metadata(stacks_dir)
    out = []
    for name in stack_names(stacks_dir):
        tier = read_tier(stacks_dir / f"Pulumi.{name}.yaml")
        m = meta.get(name, {})
        env = _get(m, "environment", "deployEnvironment", "deploy_environment", "stackEnvironment")
        preview = _get(m, "previewEnvironment", "preview_environment")
        pulumi_stack = _get(m, "pulumiStack", "pulumi_stack") or (f"{org}/{PROJECT}/{name}" if org else name)
        # The platform stack comes first whatever its tier: team stacks join its environment (StackReference).
        wave = "platform" if m.get("order") == 0 else TIER_WAVE[tier]
        out.append(
            Stack(
                stack=name,
                tier=tier,
                wave=wave,
                environment=env or deploy_environment(name),
                preview=preview or preview_environment(name),
                pulumi_stack=pulumi_stack,
            )
        )
    return sorted(out, key=lambda s: (WAVES.index(s.wave), s.stack))


def waves(stacks: list[Stack], only: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Matrix entries per wave; ``only`` keeps one stack (workflow_dispatch with a stack input)."""
    if only:
        if only not in {s.stack for s in stacks}:
            raise StackError(
                f"no stack named {only!r}: expected stacks/Pulumi.{only}.yaml "
                f"(known: {', '.join(s.stack for s in stacks) or 'none'})"
            )
        stacks = [s for s in stacks if s.stack == only]
    return {w: [s.matrix_entry() for s in stacks if s.wave == w] for w in WAVES}


def github_outputs(stacks: list[Stack], only: str | None = None) -> dict[str, str]:
    """The ``key=value`` pairs the workflow's plan job writes to ``$GITHUB_OUTPUT`` (compact JSON values)."""
    per_wave = waves(stacks, only)
    ordered = [e for w in WAVES for e in per_wave[w]]
    out = {w: json.dumps(per_wave[w], separators=(",", ":")) for w in WAVES}
    out["all"] = json.dumps(ordered, separators=(",", ":"))
    out["count"] = str(len(ordered))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.stacks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("matrix", help="deploy waves as GitHub matrix JSON")
    p.add_argument("--stacks-dir", type=Path, default=Path("stacks"))
    p.add_argument("--only", metavar="STACK", help="just this stack (workflow_dispatch input)")
    p.add_argument("--org", default=os.environ.get("PULUMI_ORG") or None, help="Pulumi org (default $PULUMI_ORG)")
    p.add_argument("--github-output", type=Path, default=os.environ.get("GITHUB_OUTPUT") or None)
    args = parser.parse_args(argv)
    try:
        outputs = github_outputs(load_stacks(args.stacks_dir, args.org), args.only or None)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [f"{k}={v}" for k, v in outputs.items()]
    print("\n".join(lines))
    if args.github_output:
        with open(args.github_output, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
