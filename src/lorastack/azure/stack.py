"""A stack as its file describes it (read-only, through ``provisioning.stackfile`` / ``provisioning.settings``): the
settings, the fixed resource names the program will create, and the subscription. For the commands that act before
(``preflight``) or around (``store rotate-key``) a ``pulumi up``, when there are no outputs yet or they are not enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.azure.credentials import CloudError
from lorastack.azure.outputs import StackOutputs


@dataclass(frozen=True)
class StackTarget:
    """What ``pulumi up --stack <name>`` will create, and where."""

    stack: str
    path: str  # stacks/Pulumi.<stack>.yaml, for messages
    settings: Any  # provisioning.settings.StackSettings
    subscription_id: str
    resource_group: str
    storage_account: str
    key_vault: str | None  # None: the stack brings its own vault
    names: dict[str, str]

    def outputs(self) -> StackOutputs:
        """The outputs the stack will have (names are fixed, not auto-named)."""
        n = self.names
        return StackOutputs(
            subscription_id=self.subscription_id,
            resource_group=self.resource_group,
            job_name=n["job"],
            storage_account=self.storage_account,
            share_name=n["share"],
            app_name=n["app"],
            location=self.settings.location,
            environment_name=n["environment"],
            source=self.path,
        )

    @property
    def gpu_profiles(self) -> list[str]:
        return list(dict.fromkeys([self.settings.training.gpu_profile, self.settings.inference.gpu_profile]))


def load_target(stack: str, project_dir: str | os.PathLike[str] | None = None, subscription: str | None = None,
                environ: dict[str, str] | None = None) -> StackTarget:
    """Read and validate ``stacks/Pulumi.<stack>.yaml``; CloudError naming the file and key otherwise."""
    from provisioning import naming, settings, stackfile

    env = dict(os.environ if environ is None else environ)
    try:
        sf = stackfile.load_stack(stack, Path(project_dir) if project_dir else None,
                                  esc_secret_keys=settings.SECRET_KEYS)
        s = settings.parse_settings(sf.raw(), sf.display_path, stack, sf.bare_secret_keys())
    except (stackfile.StackFileError, settings.SettingsError) as exc:
        raise CloudError(str(exc)) from None
    sub = (
        subscription
        or sf.config.get("azure-native:subscriptionId")
        or env.get("LORASTACK_SUBSCRIPTION_ID")
        or env.get("AZURE_SUBSCRIPTION_ID")
    )
    if not sub:
        raise CloudError(
            f"{sf.display_path}: no subscription: pass --subscription ID, set azure-native:subscriptionId in the stack "
            "file, or set $AZURE_SUBSCRIPTION_ID (`az account show --query id -o tsv`)"
        )
    names = naming.resource_names(sf.project, stack)
    kv = s.key_vault
    return StackTarget(
        stack=stack,
        path=sf.display_path,
        settings=s,
        subscription_id=str(sub),
        resource_group=s.resource_group.name or names["resourceGroup"],
        storage_account=s.store.account_name or naming.storage_account_name(sf.project, stack),
        key_vault=None if kv.existing_id else (kv.name or naming.key_vault_name(sf.project, stack)),
        names=names,
    )
