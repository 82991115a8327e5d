"""Stack outputs and how they map onto the AI Toolkit's infra config files (pure).

Outputs named here are the only ones the program exports; none carries a secret. ``acrLoginServer``/``acrName``
are empty when the stack pulls public images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# stack output -> (AI Toolkit file, key) ; None: lorastack-only
OUTPUTS: dict[str, tuple[str, str] | None] = {
    "subscriptionId": ("finetuning.config.json", "SUBSCRIPTION_ID"),
    "resourceGroupName": ("finetuning.config.json", "RESOURCE_GROUP_NAME"),
    "storageAccountName": ("finetuning.config.json", "STORAGE_ACCOUNT_NAME"),
    "fileShareName": ("finetuning.config.json", "FILE_SHARE_NAME"),
    "acaJobName": ("finetuning.config.json", "ACA_JOB_NAME"),
    "acaAppName": ("inference.config.json", "ACA_APP_NAME"),
    "acaAppEndpoint": ("inference.config.json", "ACA_APP_ENDPOINT"),
    "location": None,
    "tier": None,
    "environmentName": None,
    "logAnalyticsWorkspaceId": None,  # the workspace's customer id (not a secret): `lorastack logs` history
    "environmentStorageName": None,
    "storeMountPath": None,
    "keyVaultName": None,
    "keyVaultUri": None,
    "identityClientId": None,
    # what team stacks read from the platform stack (StackReference) and the image workflow pushes to
    "environmentId": None,
    "environmentResourceGroupName": None,
    "workloadProfiles": None,
    "keyVaultId": None,
    "acrLoginServer": None,
    "acrName": None,
    "acrId": None,
    # Azure ML (stack setting azureml; empty when absent): where the scale team submits jobs
    "amlWorkspaceName": None,
    "amlComputeName": None,
    "amlDatastoreName": None,
}
# the inference config repeats the shared keys
_SHARED = ("SUBSCRIPTION_ID", "RESOURCE_GROUP_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME")


def ai_toolkit_configs(outputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"finetuning.config.json": {...}, "inference.config.json": {...}}`` from stack outputs."""
    files: dict[str, dict[str, Any]] = {"finetuning.config.json": {}, "inference.config.json": {}}
    for out, target in OUTPUTS.items():
        if target is None or out not in outputs:
            continue
        fname, key = target
        files[fname][key] = outputs[out]
        if key in _SHARED:
            files["inference.config.json"][key] = outputs[out]
    return files
