"""Rotating the storage account key without breaking a running mount (two keys, alternating generations).

An SMB mount in ACA authenticates with an account key (ACA#850), and updating the key of an existing environment
storage breaks new mounts (ACA#1406). So the stack names its environment storage after a key generation
(``store-k1`` uses key1, ``store-k2`` key2, ...; ``provisioning.naming``). A rotation:

1. ``lorastack store rotate-key --stack S`` regenerates the key the *next* generation will use (idle now: nothing
   mounts with it), with azure-mgmt-storage;
2. the user bumps ``lorastack:store.keyGeneration`` in the stack file and runs ``pulumi up``: a new environment
   storage with the fresh key, and the job and app roll to it (running executions keep their mount);
3. ``lorastack store rotate-key --stack S --finish`` checks that the job and app use the new link, then regenerates
   the old key, which invalidates any copy of it.

Key values never leave the SDK response: nothing is printed, logged or stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorastack.azure.credentials import Azure, CloudError, call
from lorastack.azure.stack import StackTarget

KEY_ROLE_HINT = "a role allowing Microsoft.Storage/storageAccounts/regenerateKey/action (e.g. Storage Account " \
                "Contributor) on the storage account"


@dataclass(frozen=True)
class RotationStep:
    """What rotate-key did, and what the user does next (in order)."""

    regenerated: str  # "key1" | "key2"
    generation: int
    next_steps: list[str]


def _key_name(generation: int) -> str:
    from provisioning import naming

    return f"key{naming.storage_key_index(generation) + 1}"


def _regenerate(azure: Azure, t: StackTarget, key: str) -> None:
    from azure.mgmt.storage import StorageManagementClient
    from azure.mgmt.storage.models import StorageAccountRegenerateKeyParameters

    client = StorageManagementClient(azure.credential, t.subscription_id, **azure.client_kwargs)
    call(azure.outputs, f"regenerating {key} of storage account {t.storage_account}",
         client.storage_accounts.regenerate_key, t.resource_group, t.storage_account,
         StorageAccountRegenerateKeyParameters(key_name=key),
         what=f"storage account {t.storage_account!r}", role_hint=KEY_ROLE_HINT)


def _storage_names_in_use(azure: Azure, t: StackTarget) -> dict[str, set[str]]:
    """The environment storage names the job's and the app's volumes use now."""
    apps = azure.apps()
    o = azure.outputs
    job = call(o, f"reading job {o.job_name}", apps.jobs.get, o.resource_group, o.job_name)
    app = call(o, f"reading app {o.app_name}", apps.container_apps.get, o.resource_group, o.require("app_name"),
               what=f"container app {o.app_name!r}")
    used = {}
    for label, res in (("job", job), ("app", app)):
        volumes = getattr(getattr(res, "template", None), "volumes", None) or []
        used[label] = {str(v.storage_name) for v in volumes if getattr(v, "storage_name", None)}
    return used


def start_rotation(azure: Azure, t: StackTarget) -> RotationStep:
    """Step 1: regenerate the key the next generation uses; return the steps that follow."""
    from provisioning import naming

    if t.settings.store.protocol != "smb":
        raise CloudError(f"{t.path}: the store is NFS: it mounts without an account key; nothing to rotate")
    gen = t.settings.store.key_generation
    nxt = gen + 1
    key = _key_name(nxt)
    _regenerate(azure, t, key)
    link = naming.environment_storage_name(nxt)
    return RotationStep(key, nxt, [
        f"set lorastack:store.keyGeneration: {nxt} in {t.path} (it is {gen}) and commit it",
        f"pulumi up --stack {t.stack}   # creates environment storage {link} with {key}; the job and app roll to it",
        (f"lorastack store rotate-key --stack {t.stack} --finish   # once the app's new revision runs: "
        f"regenerates {_key_name(gen)}"),
    ])


def finish_rotation(azure: Azure, t: StackTarget) -> RotationStep:
    """Step 3: refuse unless the job and app mount the current generation's link; then regenerate the old key."""
    from provisioning import naming

    gen = t.settings.store.key_generation
    if gen < 2:
        raise CloudError(f"{t.path}: lorastack:store.keyGeneration is {gen}: start a rotation first "
                         f"(`lorastack store rotate-key --stack {t.stack}`)")
    link = naming.environment_storage_name(gen)
    used = _storage_names_in_use(azure, t)
    stale = {label: names for label, names in used.items() if names and link not in names}
    if stale:
        which = "; ".join(f"the {label} mounts {', '.join(sorted(n))}" for label, n in stale.items())
        raise CloudError(
            f"not regenerating the old key: {which}, not {link}. Run `pulumi up --stack {t.stack}` with "
            f"lorastack:store.keyGeneration: {gen} first, wait for the app's new revision, then --finish again.")
    old_key = _key_name(gen - 1)
    _regenerate(azure, t, old_key)
    return RotationStep(old_key, gen, [
        (f"the previous link {naming.environment_storage_name(gen - 1)} can be removed by the next `pulumi up` "
        "(it is no longer declared)"),
    ])
