"""The stack's Key Vault secrets (azure-keyvault-secrets): set, list, remove; a value is never printed or returned.

The job and the app reference their secrets by versionless Key Vault URL, through the stack's user-assigned
identity. ACA refreshes such references within 30 minutes (ACA#1520; there is no sync API): executions started
after the refresh get the new value, and the app's revisions that use it restart by themselves. ``lorastack restart``
makes a new app revision now, which resolves every reference again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorastack.azure.credentials import Azure, CloudError

SECRET_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
# What users type -> the names the stack provisions (provisioning.settings.KeyVaultSettings defaults).
ALIASES = {"HF_TOKEN": "hf-token", "LORASTACK_API_KEYS": "inference-api-keys", "API_KEYS": "inference-api-keys"}
SECRETS_ROLE = "Key Vault Secrets Officer"
PICKUP = (
    "the job reads it at executions started after ACA refreshes the reference (within 30 minutes); the app's "
    "revisions restart by themselves on that refresh, or run `lorastack restart` to roll a new revision now"
)


@dataclass(frozen=True)
class SecretInfo:
    """A secret's metadata (never its value)."""

    name: str
    enabled: bool | None
    updated: str | None
    content_type: str | None


def vault_name(name: str) -> str:
    """The Key Vault secret name for ``name`` (``HF_TOKEN`` -> ``hf-token``); CloudError for an invalid one."""
    if name in ALIASES:
        return ALIASES[name]
    if not SECRET_NAME_RE.match(name):
        suggestion = re.sub(r"[^0-9A-Za-z-]", "-", name).strip("-").lower() or "my-secret"
        raise CloudError(
            f"secret name {name!r}: Key Vault names use 1-127 letters, digits and '-' (e.g. {suggestion!r})"
        )
    return name


class Vault:
    """The stack's vault (from the stack output ``keyVaultUri``)."""

    def __init__(self, azure: Azure):
        from azure.keyvault.secrets import SecretClient

        self.outputs = azure.outputs
        self.url = azure.outputs.require("key_vault_uri").rstrip("/")
        self.host = self.url.split("//", 1)[-1]
        self.client = SecretClient(self.url, azure.credential, **azure.client_kwargs)

    def _explain(self, exc: Any, doing: str) -> CloudError:
        from azure.core.exceptions import ResourceNotFoundError

        from lorastack.azure.credentials import explain

        status = getattr(exc, "status_code", None)
        text = str(exc)
        if status == 403:
            if "Firewall" in text or "ForbiddenByConnection" in text or "not authorized to access this vault" in text:
                return CloudError(
                    f"{doing}: vault {self.host} refused your network (403): allow your IP in its firewall "
                    "(az keyvault network-rule add) or run from the stack's VNet"
                )
            return CloudError(
                f"{doing}: vault {self.host} refused (403); your identity needs the role '{SECRETS_ROLE}' on it: "
                f"az role assignment create --role '{SECRETS_ROLE}' --assignee <your user or app id> "
                f"--scope <the vault's resource id> (role assignments take a few minutes to apply)"
            )
        if isinstance(exc, ResourceNotFoundError):
            return CloudError(f"{doing}: vault {self.host} has no such secret; see `lorastack secrets list`")
        return explain(exc, self.outputs, doing, what=f"vault {self.host}")

    def set(self, name: str, value: str, content_type: str | None = None) -> str:
        """Store a new version of ``name``; returns the version id (the value never leaves this function)."""
        from azure.core.exceptions import AzureError

        if not value:
            raise CloudError(f"secret {name}: the value is empty; nothing was stored")
        try:
            secret = self.client.set_secret(name, value, content_type=content_type)
        except AzureError as exc:
            raise self._explain(exc, f"setting secret {name}") from exc
        return str(secret.properties.version or "")

    def list(self) -> list[SecretInfo]:
        from azure.core.exceptions import AzureError

        try:
            return sorted(
                (
                    SecretInfo(
                        str(p.name),
                        p.enabled,
                        p.updated_on.strftime("%Y-%m-%dT%H:%M:%SZ") if p.updated_on else None,
                        p.content_type,
                    )
                    for p in self.client.list_properties_of_secrets()
                ),
                key=lambda s: s.name,
            )
        except AzureError as exc:
            raise self._explain(exc, "listing secrets") from exc

    def get_value(self, name: str) -> str:
        """A secret's current value, for in-process use only (the endpoint smoke test's API key)."""
        from azure.core.exceptions import AzureError

        try:
            return str(self.client.get_secret(name).value or "")
        except AzureError as exc:
            raise self._explain(exc, f"reading secret {name}") from exc

    def remove(self, name: str) -> str | None:
        """Delete ``name`` (soft delete where the vault has it); returns when it can be purged, if reported."""
        from azure.core.exceptions import AzureError

        try:
            deleted = self.client.begin_delete_secret(name).result()
        except AzureError as exc:
            raise self._explain(exc, f"deleting secret {name}") from exc
        purge = getattr(deleted, "scheduled_purge_date", None)
        return purge.strftime("%Y-%m-%d") if purge else None
