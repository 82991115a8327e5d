"""Physical names of Azure resources and their rules (pure, no Pulumi).

Names are fixed (not auto-named) so that the AI Toolkit config keys and the CLI can find them; the rules here
are the ones Azure enforces at deploy time, checked before anything is declared.
"""

from __future__ import annotations

import hashlib
import re

STORAGE_ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
KEY_VAULT_RE = re.compile(r"^[a-zA-Z](?!.*--)[a-zA-Z0-9-]{1,22}[a-zA-Z0-9]$")
# ACA apps, jobs, environments and environment storages: lowercase letters, digits and '-', start with a letter,
# end with a letter or digit, no '--', at most 32 characters.
ACA_NAME_RE = re.compile(r"^[a-z](?!.*--)[a-z0-9-]{0,30}[a-z0-9]$")
STACK_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,20}[a-z0-9]$")


def _suffix(*parts: str, n: int = 6) -> str:
    # Deterministic per (project, stack): storage and vault names are global, so two stacks must not collide.
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:n]


def storage_account_name(project: str, stack: str) -> str:
    """Default storage account name: 3-24 lowercase alphanumerics, unique per project and stack."""
    core = re.sub(r"[^a-z0-9]", "", f"{project}{stack}".lower())
    return (core[:18] + _suffix(project, stack))[:24]


def check_storage_account_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid storage account name."""
    if not STORAGE_ACCOUNT_RE.match(name):
        raise ValueError(
            f"{name!r} is not a valid storage account name; allowed: 3-24 characters, lowercase letters and "
            "digits only (globally unique)"
        )


def key_vault_name(project: str, stack: str) -> str:
    """Default Key Vault name: 3-24 characters, letters/digits/hyphens, starting with a letter."""
    # Truncate first, then collapse and strip hyphens: stripping before truncating left `kv-data-science-`
    # + `-4db4b7`, a double hyphen Azure refuses (rule kv-name).
    core = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "", f"kv-{stack}".lower()))[:16].rstrip("-")
    name = f"{core}-{_suffix(project, stack)}"
    check_key_vault_name(name)
    return name


def check_key_vault_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid Key Vault name."""
    if not KEY_VAULT_RE.match(name):
        raise ValueError(
            f"{name!r} is not a valid Key Vault name; allowed: 3-24 characters, letters, digits and single "
            "hyphens, starting with a letter and ending with a letter or digit (globally unique)"
        )


def check_aca_name(name: str) -> None:
    """Raise ValueError unless ``name`` is valid for an ACA app, job, environment or environment storage."""
    if not ACA_NAME_RE.match(name):
        raise ValueError(
            f"{name!r} is not a valid Container Apps name; allowed: 2-32 characters, lowercase letters, digits "
            "and single hyphens, starting with a letter"
        )


def check_stack_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be a lorastack stack (and team) name."""
    if not STACK_NAME_RE.match(name) or "--" in name:
        raise ValueError(
            f"{name!r} is not a valid stack name; allowed: 3-22 characters, lowercase letters, digits and hyphens, "
            "starting with a letter"
        )


def environment_storage_name(key_generation: int, base: str = "store") -> str:
    """Name of the environment storage link for a given storage-key generation (``store-k1``, ``store-k2``...).

    ACA#1406: updating the key of an existing environment storage breaks *new* mounts (cifs permission denied).
    Carrying the generation in the name makes a key rotation create a new link and roll the job and app to it.
    """
    if key_generation < 1:
        raise ValueError(f"key generation must be >= 1, got {key_generation}")
    name = f"{base}-k{key_generation}"
    check_aca_name(name)
    return name


def storage_key_index(key_generation: int) -> int:
    """Which account key (0 = key1, 1 = key2) a generation uses: generations alternate between the two keys,
    so rotating = regenerate the idle key out of band, then bump the generation."""
    return (key_generation - 1) % 2


def resource_names(project: str, stack: str) -> dict[str, str]:
    """Every fixed physical name of a stack (apps, job, environment...), each checked against Azure's rules."""
    names = {
        "resourceGroup": f"rg-{project}-{stack}",
        "workspace": f"log-{project}-{stack}",
        "environment": f"cae-{project}-{stack}"[:32].rstrip("-"),
        "identity": f"id-{project}-{stack}",
        "job": f"{project}-{stack}-train"[:32].rstrip("-"),
        "app": f"{project}-{stack}-serve"[:32].rstrip("-"),
        "share": "store",
        "vnet": f"vnet-{project}-{stack}",
        "amlWorkspace": f"mlw-{project}-{stack}",
    }
    for key in ("environment", "job", "app"):
        check_aca_name(names[key])
    return names


REGISTRY_RE = re.compile(r"^[a-zA-Z0-9]{5,50}$")


def registry_name(project: str, stack: str) -> str:
    """Default container registry name: 5-50 alphanumerics, unique per project and stack (login server
    ``<name>.azurecr.io``)."""
    core = re.sub(r"[^a-z0-9]", "", f"acr{project}{stack}".lower())
    name = core[:44] + _suffix(project, stack)
    if not REGISTRY_RE.match(name):
        raise ValueError(f"{name!r} is not a valid container registry name")
    return name
