"""Preflight: what ``pulumi up --stack NAME`` needs from the subscription, checked before it runs.

One row per check (``ok``, ``warn`` or ``BLOCKER``), each with what to do: resource providers registered
(azure-mgmt-resource); the region's workload profile types include the stack's GPU profiles and the GPU quota the
API reports (azure-mgmt-appcontainers); the storage account and Key Vault names are free or already this stack's
(azure-mgmt-storage, ARM); the caller's permissions cover what the program creates (ARM ``permissions``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any

from lorastack.azure.credentials import Azure, CloudError, arm_json, call
from lorastack.azure.stack import StackTarget

PROVIDERS = (
    "Microsoft.App",
    "Microsoft.OperationalInsights",
    "Microsoft.Storage",
    "Microsoft.KeyVault",
    "Microsoft.ManagedIdentity",
)
# What the program creates, as ARM actions (provisioning/: environment, job, app, storage, vault, identity, roles).
REQUIRED_ACTIONS = (
    "Microsoft.App/managedEnvironments/write",
    "Microsoft.App/jobs/write",
    "Microsoft.App/containerApps/write",
    "Microsoft.OperationalInsights/workspaces/write",
    "Microsoft.Storage/storageAccounts/write",
    "Microsoft.KeyVault/vaults/write",
    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
    "Microsoft.Authorization/roleAssignments/write",
    "Microsoft.Insights/diagnosticSettings/write",
)
RG_WRITE = "Microsoft.Resources/subscriptions/resourceGroups/write"
PERMISSIONS_API = "2022-04-01"
KEYVAULT_API = "2023-07-01"
GPU_QUOTA_HINT = (
    "request GPU quota in the Azure portal (Quotas > Azure Container Apps) or with a support request "
    "(Service and subscription limits (quotas) > Container Apps) for {usage} in {location}"
)

OK, WARN, BLOCKER = "ok", "warn", "BLOCKER"


@dataclass(frozen=True)
class Check:
    """One preflight row."""

    check: str
    status: str
    detail: str
    fix: str = ""


def _providers(azure: Azure, t: StackTarget) -> list[Check]:
    from azure.mgmt.resource.resources import ResourceManagementClient

    client = ResourceManagementClient(azure.credential, t.subscription_id, **azure.client_kwargs)
    rows = []
    for ns in PROVIDERS:
        p = call(azure.outputs, f"reading resource provider {ns}", client.providers.get, ns,
                 what=f"resource provider {ns}", role_hint="read access to the subscription (Reader)")
        state = str(p.registration_state or "Unknown")
        if state == "Registered":
            rows.append(Check(f"provider {ns}", OK, "registered"))
        else:
            rows.append(Check(f"provider {ns}", BLOCKER, state.lower(),
                              f"az provider register --namespace {ns} --subscription {t.subscription_id} "
                              "(needs Contributor on the subscription; takes a few minutes)"))
    return rows


def _gpu(azure: Azure, t: StackTarget) -> list[Check]:
    apps = azure.apps()
    loc = t.settings.location
    types = call(azure.outputs, f"listing the workload profile types of {loc}", lambda: list(
        apps.available_workload_profiles.get(loc)), what=f"region {loc!r}")
    offered = {str(p.name) for p in types}
    rows = []
    for profile in t.gpu_profiles:
        if profile in offered:
            rows.append(Check(f"GPU profile {profile}", OK, f"offered in {loc}"))
        else:
            gpus = sorted(p for p in offered if "GPU" in p.upper() or "A100" in p or "T4" in p)
            rows.append(Check(
                f"GPU profile {profile}", BLOCKER,
                f"not offered in {loc} (GPU types there: {', '.join(gpus) or 'none'})",
                f"choose a region that offers it (lorastack:location in {t.path}; `az containerapp env "
                f"workload-profile list-supported -l <region>`), or another lorastack:*.gpuProfile"))
    usages = call(azure.outputs, f"reading Container Apps usage in {loc}", lambda: list(apps.usages.list(loc)),
                  what=f"region {loc!r}")
    gpu_usages = [u for u in usages if "gpu" in str(getattr(u.name, "value", "")).lower()]
    if not gpu_usages:
        rows.append(Check("GPU quota", WARN, f"not reported for {loc}; serverless GPU quota is per environment",
                          "if `pulumi up` fails with a quota error: " + GPU_QUOTA_HINT.format(
                              usage="the GPU type", location=loc)))
    for u in gpu_usages:
        name = str(getattr(u.name, "localized_value", None) or u.name.value)
        used, limit = float(u.current_value or 0), float(u.limit or 0)
        detail = f"{used:g} of {limit:g} {u.unit or ''}".strip()
        family = [p for p in t.gpu_profiles if ("A100" in p and "A100" in name.upper()) or ("T4" in p and "T4" in name)]
        if limit - used < 1 and (family or not any(k in name.upper() for k in ("A100", "T4"))):
            rows.append(Check(f"quota {name}", BLOCKER, detail + " (none left)",
                              GPU_QUOTA_HINT.format(usage=name, location=loc)))
        else:
            rows.append(Check(f"quota {name}", OK, detail))
    return rows


def _group_exists(azure: Azure, t: StackTarget) -> bool:
    from azure.mgmt.resource.resources import ResourceManagementClient

    client = ResourceManagementClient(azure.credential, t.subscription_id, **azure.client_kwargs)
    return bool(call(azure.outputs, f"checking resource group {t.resource_group}",
                     client.resource_groups.check_existence, t.resource_group))


def _names(azure: Azure, t: StackTarget, group_exists: bool) -> list[Check]:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.mgmt.storage import StorageManagementClient
    from azure.mgmt.storage.models import StorageAccountCheckNameAvailabilityParameters

    rows = []
    storage = StorageManagementClient(azure.credential, t.subscription_id, **azure.client_kwargs)
    mine = False
    if group_exists:
        try:
            call(azure.outputs, "reading the storage account", storage.storage_accounts.get_properties,
                 t.resource_group, t.storage_account, what=f"storage account {t.storage_account}")
            mine = True
        except CloudError as err:
            if not isinstance(err.__cause__, ResourceNotFoundError):
                raise
    if mine:
        rows.append(Check(f"storage name {t.storage_account}", OK, f"exists in {t.resource_group} (this stack)"))
    else:
        res = call(azure.outputs, "checking the storage account name", storage.storage_accounts.check_name_availability,
                   StorageAccountCheckNameAvailabilityParameters(name=t.storage_account))
        if res.name_available:
            rows.append(Check(f"storage name {t.storage_account}", OK, "available"))
        else:
            rows.append(Check(f"storage name {t.storage_account}", BLOCKER, f"taken ({res.reason}: {res.message})",
                              f"set lorastack:store.accountName in {t.path} to another globally unique name "
                              "(3-24 lowercase letters and digits)"))
    if t.key_vault is None:
        rows.append(Check("key vault", OK, "the stack brings its own (lorastack:keyVault.existingId)"))
        return rows
    vault_path = (f"/subscriptions/{t.subscription_id}/resourceGroups/{t.resource_group}"
                  f"/providers/Microsoft.KeyVault/vaults/{t.key_vault}")
    mine = False
    if group_exists:
        try:
            arm_json(azure, "GET", vault_path, KEYVAULT_API, "reading the key vault", what=f"vault {t.key_vault}")
            mine = True
        except CloudError as err:
            if not isinstance(err.__cause__, ResourceNotFoundError):
                raise
    if mine:
        rows.append(Check(f"vault name {t.key_vault}", OK, f"exists in {t.resource_group} (this stack)"))
        return rows
    res = arm_json(azure, "POST", f"/subscriptions/{t.subscription_id}/providers/Microsoft.KeyVault/checkNameAvailability",
                   KEYVAULT_API, "checking the key vault name",
                   body={"name": t.key_vault, "type": "Microsoft.KeyVault/vaults"}) or {}
    if res.get("nameAvailable"):
        rows.append(Check(f"vault name {t.key_vault}", OK, "available"))
    else:
        rows.append(Check(f"vault name {t.key_vault}", BLOCKER,
                          f"taken ({res.get('reason')}: {res.get('message')})",
                          f"set lorastack:keyVault.name in {t.path} to another globally unique name; a vault you "
                          "deleted stays reserved until purged (az keyvault purge -n NAME)"))
    return rows


def _allowed(action: str, perms: list[dict[str, Any]]) -> bool:
    a = action.lower()
    granted = any(fnmatch.fnmatchcase(a, p.lower()) for perm in perms for p in perm.get("actions") or [])
    denied = any(fnmatch.fnmatchcase(a, p.lower()) for perm in perms for p in perm.get("notActions") or [])
    return granted and not denied


def _permissions(azure: Azure, t: StackTarget, group_exists: bool) -> list[Check]:
    scope = f"/subscriptions/{t.subscription_id}"
    if group_exists:
        scope += f"/resourceGroups/{t.resource_group}"
    doc = arm_json(azure, "GET", f"{scope}/providers/Microsoft.Authorization/permissions", PERMISSIONS_API,
                   "reading your permissions") or {}
    perms = list(doc.get("value") or [])
    needed = list(REQUIRED_ACTIONS)
    if not group_exists and not t.settings.resource_group.existing:
        needed.insert(0, RG_WRITE)
    missing = [a for a in needed if not _allowed(a, perms)]
    where = f"resource group {t.resource_group}" if group_exists else f"subscription {t.subscription_id}"
    if not missing:
        return [Check("permissions", OK, f"you may create everything the stack declares on {where}")]
    fix = (f"ask for Contributor and Role Based Access Control Administrator (or Owner) on {where}"
           if "Microsoft.Authorization/roleAssignments/write" in missing else f"ask for Contributor on {where}")
    return [Check("permissions", BLOCKER, "missing " + ", ".join(missing), fix)]


def run_preflight(azure: Azure, target: StackTarget) -> list[Check]:
    """Every check, in order (the credential was checked when ``azure`` was built)."""
    rows = _providers(azure, target)
    rows += _gpu(azure, target)
    exists = _group_exists(azure, target)
    rows.append(Check(f"resource group {target.resource_group}", OK,
                      "exists" if exists else "will be created" if not target.settings.resource_group.existing
                      else "missing", "" if exists or not target.settings.resource_group.existing
                      else f"create it, or unset lorastack:resourceGroup.existing in {target.path}"))
    if not exists and target.settings.resource_group.existing:
        rows[-1] = Check(rows[-1].check, BLOCKER, "missing (lorastack:resourceGroup.existing is true)", rows[-1].fix)
    rows += _names(azure, target, exists)
    rows += _permissions(azure, target, exists)
    return rows


def as_dicts(rows: list[Check]) -> list[dict[str, str]]:
    return [asdict(r) for r in rows]
