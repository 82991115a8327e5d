"""Propose freshly built image digests to the stack files (the images workflow opens a PR with the result).

Rewrites ``lorastack:images.trainer`` / ``.inference`` in ``stacks/Pulumi.<stack>.yaml`` in place, line by line, so
every comment, key order and blank line of the file stays as the platform team wrote it; only the two values change
(and an end-of-line comment on them is kept). References must be digest-pinned,
``<registry>/lorastack-trainer@sha256:<64 hex>`` (CONTRACTS.md): a tag is refused, so no stack file ever gets a
mutable reference from this script. A stack whose ``lorastack:images.registry.server`` names another registry
than the one the images were pushed to is left alone and listed in the PR body (it pulls from its own registry).

    python -m ci.pin_images --trainer REF --inference REF [--stacks-dir stacks] [--stack S ...] [--body PR.md]

Writes ``changed=true|false`` and ``stacks=<comma list>`` to ``$GITHUB_OUTPUT`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ci.stacks import stack_names

KINDS = ("trainer", "inference")
DIGEST_REF_RE = re.compile(
    r"^(?P<registry>[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?)/(?P<repository>[a-z0-9]+([._/-][a-z0-9]+)*)"
    r"@sha256:(?P<digest>[0-9a-f]{64})$"
)
_IMAGES_KEY_RE = re.compile(r"^(?P<indent>\s*)lorastack:images:\s*(?P<rest>.*)$")
_CHILD_RE = re.compile(
    r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*):(?P<sep>\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s#][^#]*?)?"
    r"(?P<comment>\s+#.*)?$"
)


class PinError(ValueError):
    """A reference or a stack file cannot be pinned; the message says which and what to do."""


def parse_digest_ref(ref: str, kind: str) -> re.Match[str]:
    """Check that ``ref`` is ``<registry>/<repository>@sha256:<64 hex>`` with no tag; returns the match."""
    m = DIGEST_REF_RE.match(ref or "")
    if not m:
        raise PinError(
            f"--{kind} {ref!r}: expected <registry>/lorastack-{kind}@sha256:<64 hex> "
            "(a digest from the build, never a tag: tags move)"
        )
    last = m["repository"].rsplit("/", 1)[-1]
    if last != f"lorastack-{kind}":
        raise PinError(f"--{kind} {ref!r}: the repository must be lorastack-{kind}, got {last!r}")
    return m


@dataclass
class StackChange:
    stack: str
    old: dict[str, str] = field(default_factory=dict)
    new: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def changed(self) -> bool:
        return self.skipped is None and self.old != self.new


def _strip_quotes(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def rewrite_images(text: str, refs: dict[str, str], path: str = "<stack file>") -> tuple[str, dict[str, str]]:
    """``text`` with the trainer/inference values under ``lorastack:images`` replaced by ``refs``.

    Returns the new text and the old values. Everything else in the file is kept byte for byte.
    """
    lines = text.splitlines(keepends=True)
    start = None
    for i, line in enumerate(lines):
        m = _IMAGES_KEY_RE.match(line.rstrip("\r\n"))
        if m:
            if m["rest"] and not m["rest"].lstrip().startswith("#"):
                raise PinError(
                    f"{path}:{i + 1}: lorastack:images is written inline; use the block form "
                    "(trainer: and inference: on their own lines) so it can be rewritten without losing comments"
                )
            start, parent_indent = i, len(m["indent"])
            break
    if start is None:
        raise PinError(f"{path}: no lorastack:images key under config: (add trainer: and inference: refs)")
    child_indent = None
    old: dict[str, str] = {}
    out = list(lines)
    for j in range(start + 1, len(lines)):
        raw = lines[j].rstrip("\r\n")
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip())
        if indent <= parent_indent:
            break
        if child_indent is None:
            child_indent = indent
        if indent != child_indent:
            continue  # inside a nested mapping (e.g. registry:)
        m = _CHILD_RE.match(raw)
        if not m or m["key"] not in refs:
            continue
        if m["value"] is None:
            raise PinError(f"{path}:{j + 1}: lorastack:images.{m['key']} has no value on its line")
        old[m["key"]] = _strip_quotes(m["value"])
        ending = lines[j][len(raw) :]
        out[j] = f"{m['indent']}{m['key']}:{m['sep'] or ' '}{refs[m['key']]}{m['comment'] or ''}{ending}"
    missing = [k for k in refs if k not in old]
    if missing:
        raise PinError(f"{path}: lorastack:images has no {', '.join(missing)} key (add it in block form)")
    return "".join(out), old


def _registry_server(text: str) -> str | None:
    doc = yaml.safe_load(text) or {}
    images = (doc.get("config") or {}).get("lorastack:images") or {}
    registry = images.get("registry") if isinstance(images, dict) else None
    return registry.get("server") if isinstance(registry, dict) else None


def pin_stacks(
    stacks_dir: Path, refs: dict[str, str], only: list[str] | None = None, write: bool = True
) -> list[StackChange]:
    """Pin ``refs`` into every stack file (or the ``only`` ones); returns what changed or was skipped per stack."""
    registries = {parse_digest_ref(refs[k], k)["registry"] for k in KINDS}
    if len(registries) != 1:
        raise PinError(f"trainer and inference come from different registries: {sorted(registries)}")
    (registry,) = registries
    names = stack_names(stacks_dir)
    if only:
        unknown = [s for s in only if s not in names]
        if unknown:
            raise PinError(f"no stack file for {', '.join(unknown)} in {stacks_dir}")
        names = [s for s in names if s in only]
    changes = []
    for name in names:
        path = Path(stacks_dir) / f"Pulumi.{name}.yaml"
        text = path.read_text(encoding="utf-8")
        server = _registry_server(text)
        if server and server != registry:
            changes.append(StackChange(name, skipped=f"pulls from its own registry {server}, not {registry}"))
            continue
        new_text, old = rewrite_images(text, refs, str(path))
        # The rewrite must mean exactly the new refs to a YAML reader, and nothing else may have moved.
        before, after = yaml.safe_load(text), yaml.safe_load(new_text)
        after_images = after["config"]["lorastack:images"]
        if {k: after_images[k] for k in KINDS} != refs:
            raise PinError(f"{path}: the rewritten file does not read back as the new refs (unexpected layout)")
        before["config"]["lorastack:images"].update(refs)
        if before != after:
            raise PinError(f"{path}: the rewrite changed more than lorastack:images (unexpected layout)")
        change = StackChange(name, old=old, new=dict(refs))
        if write and change.changed:
            path.write_text(new_text, encoding="utf-8")
        changes.append(change)
    return changes


GUARDRAILS_FILE = "guardrails.yaml"
DEFAULT_KEYS = {"trainer": "trainerImage", "inference": "inferenceImage"}


def pin_guardrail_defaults(stacks_dir: Path, refs: dict[str, str], write: bool = True) -> dict[str, str]:
    """Point the images ``lorastack stack new`` writes into a new team stack (``trainerImage`` / ``inferenceImage``
    in stacks/guardrails.yaml) at the same digests, so a new stack starts pinned. Returns the old values; a file
    without those keys is left alone."""
    path = Path(stacks_dir) / GUARDRAILS_FILE
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    old = {}
    for i, line in enumerate(lines):
        raw = line.rstrip("\r\n")
        m = _CHILD_RE.match(raw)
        if not m or not m["value"]:
            continue
        kind = next((k for k, key in DEFAULT_KEYS.items() if key == m["key"]), None)
        if kind is None:
            continue
        old[kind] = _strip_quotes(m["value"])
        lines[i] = f"{m['indent']}{m['key']}:{m['sep'] or ' '}{refs[kind]}{m['comment'] or ''}{line[len(raw):]}"
    if write and old and any(old.get(k) != refs[k] for k in old):
        path.write_text("".join(lines), encoding="utf-8")
    return old


def _short(ref: str) -> str:
    m = DIGEST_REF_RE.match(ref)
    return f"`{m['repository']}@sha256:{m['digest'][:12]}`" if m else f"`{ref}`"


def pr_body(changes: list[StackChange], refs: dict[str, str], source: str | None = None) -> str:
    """The PR description: what each stack file moves from and to, and how it rolls out."""
    lines = ["## Pin the new lorastack images by digest", ""]
    if source:
        lines += [f"Built from {source}.", ""]
    lines += ["| image | reference |", "|---|---|"]
    lines += [f"| {k} | `{refs[k]}` |" for k in KINDS]
    lines += ["", "| stack | image | from | to |", "|---|---|---|---|"]
    for c in changes:
        if c.skipped:
            continue
        for k in KINDS:
            if c.old.get(k) != c.new.get(k):
                lines.append(f"| {c.stack} | {k} | {_short(c.old.get(k, ''))} | {_short(c.new[k])} |")
    unchanged = [c.stack for c in changes if not c.skipped and not c.changed]
    if unchanged:
        lines += ["", f"Already on these digests: {', '.join(unchanged)}."]
    skipped = [c for c in changes if c.skipped]
    if skipped:
        lines += ["", "Not changed (pin these by hand once the images are in their registry):"]
        lines += [f"- {c.stack}: {c.skipped}" for c in skipped]
    lines += [
        "",
        ("Merging deploys through the infrastructure workflow: dev, then staging, then team stacks and prod "
        "(each behind its `stack-<stack>` environment). Every reference is a digest; nothing here can move."),
    ]
    return "\n".join(lines) + "\n"


def refs_from_bake_metadata(metadata: dict, registry: str) -> dict[str, str]:
    """Digest refs from ``docker buildx bake --metadata-file`` output (``{target: {"containerimage.digest"}}``)."""
    refs = {}
    for kind in KINDS:
        digest = (metadata.get(kind) or {}).get("containerimage.digest")
        if not digest:
            raise PinError(f"bake metadata has no containerimage.digest for target {kind!r}: was it pushed?")
        refs[kind] = f"{registry.rstrip('/')}/lorastack-{kind}@{digest}"
        parse_digest_ref(refs[kind], kind)
    return refs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.pin_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", metavar="REF", help="<registry>/lorastack-trainer@sha256:...")
    parser.add_argument("--inference", metavar="REF", help="<registry>/lorastack-inference@sha256:...")
    parser.add_argument("--bake-metadata", type=Path, metavar="FILE", help="buildx bake --metadata-file output")
    parser.add_argument("--registry", help="registry login server of the pushed images (with --bake-metadata)")
    parser.add_argument("--stacks-dir", type=Path, default=Path("stacks"))
    parser.add_argument("--stack", action="append", default=[], metavar="S", help="only this stack (repeatable)")
    parser.add_argument("--body", type=Path, metavar="FILE", help="write the PR description (markdown) here")
    parser.add_argument("--source", help="what the images were built from (shown in the PR body)")
    parser.add_argument("--github-output", type=Path, default=os.environ.get("GITHUB_OUTPUT") or None)
    args = parser.parse_args(argv)
    try:
        if args.bake_metadata:
            if not args.registry:
                raise PinError("--bake-metadata needs --registry (the ACR login server, e.g. myacr.azurecr.io)")
            refs = refs_from_bake_metadata(json.loads(args.bake_metadata.read_text(encoding="utf-8")), args.registry)
        elif args.trainer and args.inference:
            refs = {"trainer": args.trainer.strip(), "inference": args.inference.strip()}
        else:
            raise PinError("give --trainer and --inference refs, or --bake-metadata with --registry")
        changes = pin_stacks(args.stacks_dir, refs, args.stack or None)
        defaults = {} if args.stack else pin_guardrail_defaults(args.stacks_dir, refs)
    except (PinError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    changed = [c.stack for c in changes if c.changed]
    if any(defaults.get(k) != refs[k] for k in defaults):
        changed.append(GUARDRAILS_FILE)
        print(f"{GUARDRAILS_FILE}: new team stacks start from these digests")
    for c in changes:
        state = f"skipped: {c.skipped}" if c.skipped else ("pinned" if c.changed else "already pinned")
        print(f"{c.stack}: {state}")
    if args.body:
        body = pr_body(changes, refs, args.source)
        if GUARDRAILS_FILE in changed:
            body += f"\n`stacks/{GUARDRAILS_FILE}`: `lorastack stack new` now writes these digests into new team stacks.\n"
        args.body.write_text(body, encoding="utf-8")
    if args.github_output:
        with open(args.github_output, "a", encoding="utf-8") as fh:
            fh.write(f"changed={'true' if changed else 'false'}\nstacks={','.join(changed)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
