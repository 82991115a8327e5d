"""``stacks/pipeline.yaml``: what the GitOps workflows need to know about each stack (pure, no Pulumi).

One entry per stack file: the Pulumi stack to select with upsert (created on its first preview or up), its tier and
deploy order (platform, dev, staging, team stacks, prod), the GitHub environments of its deploy and its PR preview,
and the federated-credential subjects those environments present to Azure. `lorastack stack new` adds a team's entry;
a test keeps the file in step with the stack files and the guardrails. The format is documented in
docs/provisioning.md ("Pipeline metadata").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from provisioning.guardrails import Guardrails

PIPELINE_FILE = Path("stacks") / "pipeline.yaml"
VERSION = 1
# Deploy order by tier; the platform stack goes first (team stacks join its environment), prod last.
ORDER = {"platform": 0, "dev": 1, "staging": 2, "team": 3, "prod": 4}
HEADER = """\
# Pipeline metadata for every stack file, read by the GitOps workflows (.github/workflows/). Written by
# `lorastack stack new TEAM` for team stacks; platform entries are kept in step by the test suite
# (tests/test_provisioning_pipeline.py). Format: docs/provisioning.md, "Pipeline metadata".
"""


def deploy_environment(stack: str) -> str:
    """GitHub environment of ``pulumi up`` for ``stack`` (approvals, the deploy identity)."""
    return f"stack-{stack}"


def preview_environment(stack: str) -> str:
    """GitHub environment of PR previews for ``stack`` (a read-only identity)."""
    return f"preview-{stack}"


def subject(repository: str, environment: str) -> str:
    """The federated-credential subject GitHub's OIDC token carries for a job in ``environment``."""
    return f"repo:{repository}:environment:{environment}"


def stack_entry(stack: str, g: Guardrails, project: str = "lorastack") -> dict[str, Any]:
    """The pipeline entry of ``stack`` (tier and order from the guardrails, never from the stack file)."""
    tier = g.tier_for(stack)
    repo = g.github_repository_or_placeholder()
    order = ORDER["platform"] if stack == g.platform_stack else ORDER[tier]
    deploy, preview = deploy_environment(stack), preview_environment(stack)
    return {
        "file": f"stacks/Pulumi.{stack}.yaml",
        "pulumiStack": f"{g.pulumi_org or 'organization'}/{project}/{stack}",
        "upsert": True,  # `pulumi stack select --create` / pulumi/actions `upsert: true`: the first preview creates it
        "tier": tier,
        "order": order,
        "dependsOn": [g.platform_stack] if tier == "team" and g.platform_stack else [],
        "deployEnvironment": deploy,
        "previewEnvironment": preview,
        "deploySubject": subject(repo, deploy),
        "previewSubject": subject(repo, preview),
    }


def load_pipeline(project_dir: Path) -> dict[str, Any]:
    """The parsed stacks/pipeline.yaml (an empty one when absent)."""
    path = project_dir / PIPELINE_FILE
    if not path.is_file():
        return {"version": VERSION, "stacks": {}}
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("version", VERSION)
    data["stacks"] = dict(data.get("stacks") or {})
    return data


def render_pipeline(data: dict[str, Any]) -> str:
    """The file text: stacks in deploy order, then by name."""
    stacks = dict(sorted(data["stacks"].items(), key=lambda kv: (kv[1].get("order", 9), kv[0])))
    return HEADER + yaml.safe_dump({"version": data.get("version", VERSION), "stacks": stacks}, sort_keys=False)


def add_stack(project_dir: Path, stack: str, g: Guardrails) -> dict[str, Any]:
    """Add (or refresh) ``stack``'s entry in stacks/pipeline.yaml; returns the entry."""
    data = load_pipeline(project_dir)
    entry = stack_entry(stack, g)
    data["stacks"][stack] = entry
    (project_dir / PIPELINE_FILE).write_text(render_pipeline(data))
    return entry


def pipeline_problems(project_dir: Path, stacks: list[str], g: Guardrails) -> list[str]:
    """What is out of step between stacks/pipeline.yaml and the stack files (empty: in step)."""
    data = load_pipeline(project_dir)
    problems = []
    for stack in stacks:
        got = data["stacks"].get(stack)
        if got is None:
            problems.append(f"{PIPELINE_FILE}: no entry for stack {stack!r} (`lorastack stack new` writes it for team stacks)")
        elif got != stack_entry(stack, g):
            problems.append(f"{PIPELINE_FILE}: entry {stack!r} differs from what the guardrails give it")
    for extra in sorted(set(data["stacks"]) - set(stacks)):
        problems.append(f"{PIPELINE_FILE}: entry {extra!r} has no stack file")
    return problems


def one_time_steps(stack: str, g: Guardrails, platform_vault: str = "<platform Key Vault>") -> list[str]:
    """What the platform team does once for a new team stack (lorastack cannot do it from a laptop)."""
    e = stack_entry(stack, g)
    return [
        (f"GitHub: create environments {e['deployEnvironment']} (required reviewers: the team and the platform team; "
        f"deployment branches: main only) and {e['previewEnvironment']} (no reviewers); set vars AZURE_CLIENT_ID, "
        "AZURE_TENANT_ID, AZURE_SUBSCRIPTION_ID in each"),
        (f"Entra ID: on the deploy identity add a federated credential with subject {e['deploySubject']}; on the "
        f"read-only preview identity add one with subject {e['previewSubject']} (issuer "
        "https://token.actions.githubusercontent.com, audience api://AzureADTokenExchange)"),
        (f"Azure RBAC: let the deploy identity manage resource group rg-lorastack-{stack} (Contributor, and Role Based "
        "Access Control Administrator limited to AcrPull and Key Vault Secrets User) and the platform environment's "
        "storages; the preview identity gets Reader only (never listKeys)"),
        (f"Key Vault: store the team's secrets in {platform_vault} as {stack}-hf-token and {stack}-api-keys "
        f"(az keyvault secret set --vault-name {platform_vault} --name {stack}-hf-token --value ...)"),
        f"Pulumi: nothing to create; the pipeline selects {e['pulumiStack']} with upsert on its first preview",
    ]
