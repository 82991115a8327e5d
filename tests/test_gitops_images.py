"""Digest pinning of the stack files (ci/pin_images.py), the content of the images workflow's PR: only the two image
values change, comments and layout stay, digests only (a tag is refused), stacks on another registry are left alone
and named in the PR body; and the images workflow builds both targets in one bake with cache and attestations."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from gitops_helpers import REPO, lorastack, repo_copy, workflow

from ci import pin_images as pin

REG = "lorastackplatform.azurecr.io"
D1, D2 = "a" * 64, "b" * 64
REFS = {"trainer": f"{REG}/lorastack-trainer@sha256:{D1}", "inference": f"{REG}/lorastack-inference@sha256:{D2}"}

STACK = """\
# team stack: comments survive
config:
  lorastack:location: westus3   # region
  lorastack:tier: team

  lorastack:images:             # pinned by the images workflow
    # the trainer
    trainer: "ghcr.io/lorastack/trainer:0.1.0"   # old tag
    inference: ghcr.io/lorastack/inference:0.1.0
  lorastack:training:
    gpuProfile: Consumption-GPU-NC24-A100
"""


def test_rewrite_changes_only_the_two_values_and_keeps_comments_and_layout():
    new, old = pin.rewrite_images(STACK, REFS)
    assert old == {"trainer": "ghcr.io/lorastack/trainer:0.1.0", "inference": "ghcr.io/lorastack/inference:0.1.0"}
    before, after = STACK.splitlines(), new.splitlines()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert changed == [
        ('    trainer: "ghcr.io/lorastack/trainer:0.1.0"   # old tag', f"    trainer: {REFS['trainer']}   # old tag"),
        ("    inference: ghcr.io/lorastack/inference:0.1.0", f"    inference: {REFS['inference']}"),
    ]
    images = yaml.safe_load(new)["config"]["lorastack:images"]
    assert images == REFS


def test_nested_registry_keys_are_not_touched():
    text = STACK.replace("    inference: ghcr.io/lorastack/inference:0.1.0\n",
                         "    inference: ghcr.io/lorastack/inference:0.1.0\n    registry:\n"
                         f"      server: {REG}\n      trainer: not-an-image-key\n")
    new, _ = pin.rewrite_images(text, REFS)
    assert "      trainer: not-an-image-key" in new


@pytest.mark.parametrize("ref, message", [
    (f"{REG}/lorastack-trainer:1.2.3", "never a tag"),
    (f"{REG}/lorastack-trainer:latest@sha256:{D1}", "never a tag"),
    (f"{REG}/lorastack-trainer@sha256:{D1[:10]}", "never a tag"),
    (f"{REG}/other@sha256:{D1}", "must be lorastack-trainer"),
])
def test_only_digest_refs_of_the_right_repository_are_accepted(ref, message):
    with pytest.raises(pin.PinError, match=message):
        pin.parse_digest_ref(ref, "trainer")


def test_inline_images_and_missing_keys_are_clear_errors():
    with pytest.raises(pin.PinError, match="written inline"):
        pin.rewrite_images("config:\n  lorastack:images: {trainer: a, inference: b}\n", REFS, "s.yaml")
    with pytest.raises(pin.PinError, match="no inference key"):
        pin.rewrite_images("config:\n  lorastack:images:\n    trainer: a\n", REFS, "s.yaml")
    with pytest.raises(pin.PinError, match="no lorastack:images key"):
        pin.rewrite_images("config:\n  lorastack:tier: dev\n", REFS, "s.yaml")


def test_pinning_the_repo_stacks_and_the_pr_body(tmp_path):
    root = repo_copy(tmp_path)
    changes = {c.stack: c for c in pin.pin_stacks(root / "stacks", REFS)}
    for name in ("dev", "staging", "vision"):
        assert changes[name].changed
        text = (root / "stacks" / f"Pulumi.{name}.yaml").read_text()
        original = (REPO / "stacks" / f"Pulumi.{name}.yaml").read_text()
        diff = [a for a, b in zip(text.splitlines(), original.splitlines()) if a != b]
        assert sorted(diff) == sorted([f"    trainer: {REFS['trainer']}", f"    inference: {REFS['inference']}"])
    # a stack that pulls from another registry is not pointed at this one behind its back; one on the same
    # (platform) registry is pinned like the others
    prod = changes["prod"]
    prod_registry = yaml.safe_load((REPO / "stacks/Pulumi.prod.yaml").read_text())["config"]["lorastack:images"].get(
        "registry") or {}
    if prod_registry.get("server", REG) != REG:
        assert prod.skipped and "own registry" in prod.skipped
        assert (root / "stacks/Pulumi.prod.yaml").read_text() == (REPO / "stacks/Pulumi.prod.yaml").read_text()
    else:
        assert prod.changed and not prod.skipped
    body = pin.pr_body(list(changes.values()), REFS, "https://example.invalid/commit/abc")
    assert f"| trainer | `{REFS['trainer']}` |" in body
    assert re.search(r"\| dev \| trainer \| `.*` \| `lorastack-trainer@sha256:aaaaaaaaaaaa` \|", body)
    if prod.skipped:
        assert "- prod: pulls from its own registry" in body
    # no mutable reference left in any stack file the script wrote
    for name in ("dev", "staging", "vision"):
        images = yaml.safe_load((root / "stacks" / f"Pulumi.{name}.yaml").read_text())["config"]["lorastack:images"]
        assert all("@sha256:" in images[k] for k in pin.KINDS)
    # running again changes nothing
    assert not any(c.changed for c in pin.pin_stacks(root / "stacks", REFS))


def test_pinned_team_stack_still_plans(tmp_path):
    """The rewritten file is still a valid stack for the provisioning program (lorastack plan, offline)."""
    root = repo_copy(tmp_path, "policy")
    pin.pin_stacks(root / "stacks", REFS, only=["vision"])
    res = lorastack("plan", "--stack", "vision", "--project-dir", str(root), cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_from_bake_metadata_writes_outputs_and_body(tmp_path):
    root = repo_copy(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"trainer": {"containerimage.digest": f"sha256:{D1}"},
                                "inference": {"containerimage.digest": f"sha256:{D2}"}}))
    out, body = tmp_path / "out", tmp_path / "body.md"
    args = ["--bake-metadata", str(meta), "--registry", REG, "--stacks-dir", str(root / "stacks"),
            "--stack", "dev", "--body", str(body), "--github-output", str(out)]
    assert pin.main(args) == 0
    assert "changed=true\nstacks=dev\n" == out.read_text()
    assert REFS["trainer"] in body.read_text()
    assert yaml.safe_load((root / "stacks/Pulumi.dev.yaml").read_text())["config"]["lorastack:images"]["trainer"] == (
        REFS["trainer"])
    meta.write_text(json.dumps({"trainer": {}}))
    assert pin.main(args) == 1


def test_images_workflow_builds_both_targets_once_with_cache_and_attestations():
    jobs = workflow("images.yml")["jobs"]
    bake = next(s for s in jobs["publish"]["steps"] if str(s.get("uses", "")).startswith("docker/bake-action@"))
    assert bake["with"]["files"] == "images/docker-bake.hcl" and bake["with"]["push"] is True
    assert "*.cache-from=type=gha" in bake["with"]["set"] and "*.cache-to=type=gha,mode=max" in bake["with"]["set"]
    hcl = (REPO / "images" / "docker-bake.hcl").read_text()
    assert re.search(r'group "default" \{\s*targets = \["trainer", "inference"\]', hcl)
    assert '"type=provenance,mode=max"' in hcl and '"type=sbom"' in hcl
    assert 'dockerfile = "images/Dockerfile"' in hcl
    login = next(s for s in jobs["publish"]["steps"] if str(s.get("uses", "")).startswith("azure/login@"))
    assert set(login["with"]) == {"client-id", "tenant-id", "subscription-id"}, "OIDC only: no client secret"
    pin_step = next(s for s in jobs["pin"]["steps"] if s.get("id") == "pin")
    assert "python -m ci.pin_images --bake-metadata" in pin_step["run"]
    pr = next(s for s in jobs["pin"]["steps"] if str(s.get("uses", "")).startswith("peter-evans/create-pull-request@"))
    assert pr["with"]["add-paths"].split() == ["stacks/Pulumi.*.yaml", "stacks/guardrails.yaml"]
    assert set(workflow("images.yml")["on"]["push"]["paths"]) >= {"src/**", "images/**", "pyproject.toml"}


def test_new_team_stacks_start_from_the_pinned_digests(tmp_path):
    """The guardrails' defaults (what `lorastack stack new` writes) move with the stacks; comments stay."""
    root = repo_copy(tmp_path)
    path = root / "stacks" / "guardrails.yaml"
    before = path.read_text()
    old = pin.pin_guardrail_defaults(root / "stacks", REFS)
    if not old:
        pytest.skip("stacks/guardrails.yaml has no trainerImage/inferenceImage defaults")
    after = path.read_text()
    assert [line for line in before.splitlines() if "Image:" not in line] == [
        line for line in after.splitlines() if "Image:" not in line]
    doc = yaml.safe_load(after)["selfService"]["defaults"]
    assert (doc["trainerImage"], doc["inferenceImage"]) == (REFS["trainer"], REFS["inference"])
    res = lorastack("stack", "new", "fresh", "--project-dir", str(root), cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    images = yaml.safe_load((root / "stacks" / "Pulumi.fresh.yaml").read_text())["config"]["lorastack:images"]
    assert images["trainer"] == REFS["trainer"] and images["inference"] == REFS["inference"]
