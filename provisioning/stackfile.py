"""Reading ``Pulumi.yaml`` and ``stacks/Pulumi.<stack>.yaml`` without the Pulumi CLI (pure, no Pulumi import).

The Pulumi runtime never reads these files itself (the CLI does), so ``lorastack plan`` and the tests use this
loader to turn a stack file into the exact config map the CLI would hand the program: project defaults, then the
stack's values, namespaced (``lorastack:inference``) and JSON-encoded. Encrypted (``secure:``) values cannot be
decrypted offline: they become placeholders and are listed as secret keys, so the program still sees them as
secrets. Secret keys the project declares but the stack file omits are assumed to come from the ESC environment
the stack file imports (reported as such), if it imports one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = "offline-placeholder-secret"


class StackFileError(ValueError):
    """The project or stack file is missing or not valid YAML of the expected shape."""


@dataclass
class StackFile:
    """A stack file resolved into runtime config."""

    project: str
    stack: str
    project_dir: Path
    path: Path
    config: dict[str, str]  # full key -> string value, as pulumi.runtime.set_all_config wants it
    secret_keys: list[str]  # full keys
    environments: list[str] = field(default_factory=list)  # ESC environments the stack file imports
    from_environment: list[str] = field(default_factory=list)  # secret keys assumed to come from ESC

    @property
    def display_path(self) -> str:
        """The stack file path relative to the project directory (``stacks/Pulumi.dev.yaml``)."""
        try:
            return str(self.path.relative_to(self.project_dir))
        except ValueError:
            return str(self.path)

    def raw(self) -> dict[str, Any]:
        """Bare project keys -> decoded values (what provisioning.settings.parse_settings takes)."""
        prefix = f"{self.project}:"
        return {k[len(prefix):]: v for k, v in self.config.items() if k.startswith(prefix)}

    def bare_secret_keys(self) -> list[str]:
        prefix = f"{self.project}:"
        return [k[len(prefix):] for k in self.secret_keys if k.startswith(prefix)]


def find_project_dir(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding Pulumi.yaml."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "Pulumi.yaml").is_file():
            return d
    raise StackFileError(f"no Pulumi.yaml found in {here} or above; run from the lorastack repository "
                         "or pass --project-dir")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StackFileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise StackFileError(f"{path}: expected a mapping at the top level")
    return data


def read_project(project_dir: Path) -> dict:
    """The parsed Pulumi.yaml."""
    return _read_yaml(project_dir / "Pulumi.yaml")


def stack_path(project_dir: Path, stack: str) -> Path:
    """Where ``stack``'s file lives (honours ``stackConfigDir``)."""
    proj = read_project(project_dir)
    return project_dir / proj.get("stackConfigDir", ".") / f"Pulumi.{stack}.yaml"


def available_stacks(project_dir: Path) -> list[str]:
    """Stack names that have a stack file."""
    d = stack_path(project_dir, "x").parent
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in d.glob("Pulumi.*.yaml"))


def _full(project: str, key: str) -> str:
    return key if ":" in key else f"{project}:{key}"


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def load_stack(stack: str, project_dir: Path | None = None, esc_secret_keys: tuple[str, ...] = ()) -> StackFile:
    """Resolve ``stack`` into the config the Pulumi CLI would give the program.

    ``esc_secret_keys`` (bare keys) are assumed to come from the ESC environment the stack file imports, if it
    imports one and does not set them itself. Raises StackFileError where the Pulumi CLI would refuse the stack
    (a required project key missing, a declared secret in plain text, a typed key of the wrong type).
    """
    project_dir = find_project_dir(project_dir)
    proj = read_project(project_dir)
    project = proj.get("name")
    if not project:
        raise StackFileError(f"{project_dir / 'Pulumi.yaml'}: no project name")
    path = stack_path(project_dir, stack)
    if not path.is_file():
        known = ", ".join(available_stacks(project_dir)) or "none"
        raise StackFileError(f"no stack file {path.relative_to(project_dir)} for stack {stack!r}; stacks: {known}")
    data = _read_yaml(path)

    config: dict[str, str] = {}
    secret_keys: list[str] = []
    declared_secret: list[str] = []
    for key, decl in (proj.get("config") or {}).items():
        full = _full(project, key)
        if isinstance(decl, dict):
            if "value" in decl:
                config[full] = _encode(decl["value"])
            elif "default" in decl:
                config[full] = _encode(decl["default"])
            if decl.get("secret"):
                declared_secret.append(full)
        else:  # short form: `key: value`
            config[full] = _encode(decl)
    for key, value in (data.get("config") or {}).items():
        full = _full(project, key)
        if isinstance(value, dict) and set(value) == {"secure"}:
            config[full] = PLACEHOLDER
            secret_keys.append(full)
        else:
            config[full] = _encode(value)
    envs = data.get("environment") or []
    envs = [envs] if isinstance(envs, str) else list(envs) if isinstance(envs, list) else []
    from_env = []
    if envs:
        for full in dict.fromkeys([*declared_secret, *(_full(project, k) for k in esc_secret_keys)]):
            if full not in config:
                config[full] = PLACEHOLDER
                secret_keys.append(full)
                from_env.append(full)
    sf = StackFile(project, stack, project_dir, path, config, secret_keys, envs, from_env)
    _check_like_the_cli(sf, proj, data.get("config") or {})
    return sf


_TYPES = {"string": str, "boolean": bool, "integer": int, "array": list}


def _check_like_the_cli(sf: StackFile, proj: dict, stack_config: dict) -> None:
    # The checks `pulumi preview` makes against the project's config schema (pkg/workspace, mergeConfig).
    problems = []
    for key, decl in (proj.get("config") or {}).items():
        if not isinstance(decl, dict):
            continue
        full = _full(sf.project, key)
        if full not in sf.config:
            problems.append(f"{full}: missing; Pulumi.yaml declares it without a default, so every stack must set it")
            continue
        value = stack_config.get(full, stack_config.get(key))
        if value is None:
            continue  # from a project default or the ESC environment
        if decl.get("secret") and not (isinstance(value, dict) and "secure" in value):
            problems.append(f"{full}: must be encrypted (pulumi config set --secret {full} ... --stack {sf.stack})")
        expected = _TYPES.get(decl.get("type", ""))
        if expected and not (isinstance(value, dict) and "secure" in value) and (
                not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            shown = "<secret value>" if decl.get("secret") else repr(value)
            problems.append(f"{full}: {shown} must be of type {decl['type']!r}")
    if problems:
        raise StackFileError("\n".join(f"{sf.display_path}: {p}" for p in problems))
