"""Stack outputs: where a provisioned stack's share, job, app, vault and logs are (typed; validated once, here).

They come from ``pulumi stack output --json`` (or the AI Toolkit's ``finetuning.config.json`` /
``inference.config.json``), else ``$LORASTACK_OUTPUTS``; keys missing there come from environment variables.
Pure: no Azure SDK import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorastack.azure.credentials import CloudError

# field -> (pulumi stack output, AI Toolkit config key or "", env vars, what it is)
OUTPUT_SOURCES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "subscription_id": (
        "subscriptionId",
        "SUBSCRIPTION_ID",
        ("LORASTACK_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID"),
        "subscription id",
    ),
    "resource_group": ("resourceGroupName", "RESOURCE_GROUP_NAME", ("LORASTACK_RESOURCE_GROUP",), "resource group"),
    "job_name": ("acaJobName", "ACA_JOB_NAME", ("LORASTACK_JOB_NAME",), "training job name"),
    "storage_account": (
        "storageAccountName",
        "STORAGE_ACCOUNT_NAME",
        ("LORASTACK_STORAGE_ACCOUNT",),
        "storage account of the store",
    ),
    "share_name": ("fileShareName", "FILE_SHARE_NAME", ("LORASTACK_SHARE_NAME",), "file share holding the store"),
}
# Needed only by some commands (logs --app, endpoint, secrets, rotate-key...): checked when used (require()).
OPTIONAL_SOURCES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "app_name": ("acaAppName", "ACA_APP_NAME", ("LORASTACK_APP_NAME",), "inference app name"),
    "app_endpoint": ("acaAppEndpoint", "ACA_APP_ENDPOINT", ("LORASTACK_APP_ENDPOINT",), "inference URL"),
    "location": ("location", "", ("LORASTACK_LOCATION",), "Azure region"),
    "tier": ("tier", "", (), "stack tier"),
    "environment_name": ("environmentName", "", ("LORASTACK_ENVIRONMENT_NAME",), "ACA environment name"),
    "environment_storage_name": (
        "environmentStorageName",
        "",
        ("LORASTACK_ENVIRONMENT_STORAGE",),
        "environment storage link (store-k<generation>)",
    ),
    "key_vault_uri": ("keyVaultUri", "", ("LORASTACK_KEY_VAULT_URI",), "Key Vault URI"),
    "log_workspace_id": (
        "logAnalyticsWorkspaceId",
        "",
        ("LORASTACK_LOG_WORKSPACE_ID",),
        "Log Analytics workspace (customer) id",
    ),
}
OUTPUTS_ENV = "LORASTACK_OUTPUTS"
HOW_TO_GET_OUTPUTS = (
    "pass --outputs FILE, written with `pulumi stack output --json --show-secrets=false --stack <env> > FILE` "
    f"(or set ${OUTPUTS_ENV} to that file)"
)


class StackOutputs(BaseModel):
    """What the CLI needs from a provisioned stack."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subscription_id: str = Field(pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
    resource_group: str = Field(pattern=r"^[-\w.()]{1,90}$")
    job_name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
    storage_account: str = Field(pattern=r"^[a-z0-9]{3,24}$")
    share_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
    app_name: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")
    app_endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$")
    location: str | None = Field(default=None, pattern=r"^[a-z0-9]+$")
    tier: str | None = None
    environment_name: str | None = None
    environment_storage_name: str | None = None
    key_vault_uri: str | None = Field(default=None, pattern=r"^https://[^\s/]+/?$")
    log_workspace_id: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
    source: str = "the environment"  # where the values came from, for messages

    @property
    def account_url(self) -> str:
        return f"https://{self.storage_account}.file.core.windows.net"

    @property
    def group_scope(self) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"

    @property
    def storage_scope(self) -> str:
        return f"{self.group_scope}/providers/Microsoft.Storage/storageAccounts/{self.storage_account}"

    @property
    def job_id(self) -> str:
        return f"{self.group_scope}/providers/Microsoft.App/jobs/{self.job_name}"

    def app_id(self) -> str:
        return f"{self.group_scope}/providers/Microsoft.App/containerApps/{self.require('app_name')}"

    def require(self, fld: str) -> str:
        """The optional output ``fld``, or a CloudError naming the stack output and the variable to set."""
        value = getattr(self, fld)
        if value:
            return str(value)
        output, _, env_vars, what = OPTIONAL_SOURCES[fld]
        env = f" or set ${env_vars[0]}" if env_vars else ""
        raise CloudError(
            f"missing stack output {output!r} ({what}) in {self.source}: re-export the outputs of a stack that has "
            f"it (`pulumi stack output --json > FILE`){env}"
        )


def read_outputs_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``; CloudError naming the file and how to write it otherwise."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CloudError(f"{path}: no such file; {HOW_TO_GET_OUTPUTS}") from None
    except json.JSONDecodeError as exc:
        raise CloudError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); {HOW_TO_GET_OUTPUTS}") from None
    if not isinstance(raw, dict):
        raise CloudError(f"{path}: expected a JSON object of stack outputs; {HOW_TO_GET_OUTPUTS}")
    return raw


def load_outputs(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> StackOutputs:
    """Read the stack outputs from ``path``, else ``$LORASTACK_OUTPUTS``, then environment variables.

    Raises CloudError naming each missing or malformed key and how to get it.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(OUTPUTS_ENV) or None
    raw: dict[str, Any] = read_outputs_file(path) if path else {}
    where = str(path) if path else "the environment"
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for fld, (output, toolkit_key, env_vars, what) in {**OUTPUT_SOURCES, **OPTIONAL_SOURCES}.items():
        value: Any = None
        for key in (output, toolkit_key):
            if key and raw.get(key) not in (None, ""):
                value, origin[fld] = raw[key], f"{where}: {key}"
                break
        if value is None:
            for var in env_vars:
                if environ.get(var):
                    value, origin[fld] = environ[var], f"${var}"
                    break
        if value is None:
            if fld in OUTPUT_SOURCES:
                problems.append(
                    f"missing stack output {output!r} ({what}): not in {where} and ${env_vars[0]} is not set"
                )
        elif value == "[secret]":
            problems.append(f"{where}: {output}: is shown as [secret]; it is not a secret, re-export the outputs")
        else:
            values[fld] = str(value)
    if problems:
        raise CloudError("; ".join(problems) + f". To fix: {HOW_TO_GET_OUTPUTS}, or set the environment variables.")
    try:
        return StackOutputs(**values, source=where)
    except ValidationError as exc:
        sources = {**OUTPUT_SOURCES, **OPTIONAL_SOURCES}
        lines = []
        for err in exc.errors():
            fld = str(err["loc"][0]) if err["loc"] else "?"
            what = sources[fld][3] if fld in sources else fld
            lines.append(f"{origin.get(fld, fld)}: {values.get(fld)!r} is not a valid {what}")
        raise CloudError("; ".join(lines) + f". {HOW_TO_GET_OUTPUTS}") from None
