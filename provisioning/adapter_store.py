"""The adapter store: storage account, file share and the environment storage links (one ComponentResource)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import app, storage

from provisioning import naming

# ACA SMB mounts fail unless the share allows AES-128-GCM (ACA#852) and NTLMv2 authentication.
SMB_VERSIONS = "SMB3.0;SMB3.1.1"
SMB_AUTH_METHODS = "NTLMv2;Kerberos"
SMB_CHANNEL_ENCRYPTION = "AES-128-GCM;AES-256-GCM"


@dataclass
class AdapterStoreArgs:
    """Inputs of :class:`AdapterStore`."""

    resource_group_name: pulumi.Input[str]
    location: str
    account_name: str
    share_name: str
    tier: str  # Standard | Premium
    quota_gib: int
    soft_delete_days: int
    key_generation: int
    environment_name: pulumi.Input[str]
    environment_resource_group_name: pulumi.Input[str]  # the platform's, for team stacks
    subnet_id: pulumi.Input[str] | None  # VNet mode: the account admits this subnet ...
    client_cidrs: list[tuple[str, str]]  # ... and these named public ranges (CLI, CI) [rule storage-firewall]
    protect: bool
    tier_tag: str
    tags: dict[str, str]
    existing: bool = False  # bring your own account (in resource_group_name) and share: read, never modified


class AdapterStore(pulumi.ComponentResource):
    """Storage account + SMB file share + two environment storage links (read-write for the job, read-only for the app).

    The link carries the account key as a secret; its name carries the key generation (``store-k1``), so rotating
    the key rolls to a new link instead of re-keying a link in use, which breaks new mounts (ACA#1406). For the same
    reason a link never takes a new key in place: a key rotated outside Pulumi is ignored until the generation moves.
    (NFS is not offered: the CLI reaches the store through the Files REST API, which NFS shares lack.)
    """

    account_name: pulumi.Output[str]
    share_name: pulumi.Output[str]
    storage_name: pulumi.Output[str]
    read_only_storage_name: pulumi.Output[str]
    storage_type: str = "AzureFile"

    def __init__(self, name: str, args: AdapterStoreArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:AdapterStore", name, {}, opts)
        if args.existing:
            account = storage.get_storage_account_output(resource_group_name=args.resource_group_name,
                                                         account_name=args.account_name)
            share = storage.get_file_share_output(resource_group_name=args.resource_group_name,
                                                  account_name=args.account_name, share_name=args.share_name)
        else:
            account, share = self._create(name, args)
        self._links(name, args, account, share)

    def _create(self, name: str, args: AdapterStoreArgs):
        child = pulumi.ResourceOptions(parent=self)
        premium = args.tier == "Premium"
        account = storage.StorageAccount(
            f"{name}-account",
            resource_group_name=args.resource_group_name,
            account_name=args.account_name,
            location=args.location,
            kind="FileStorage" if premium else "StorageV2",
            sku=storage.SkuArgs(name="Premium_LRS" if premium else "Standard_LRS"),
            minimum_tls_version="TLS1_2",
            enable_https_traffic_only=True,
            allow_blob_public_access=False,
            # SMB mounts in ACA authenticate with the account key only (ACA#850).
            allow_shared_key_access=True,
            large_file_shares_state=None if premium else "Enabled",
            network_rule_set=(
                storage.NetworkRuleSetArgs(
                    default_action="Deny",
                    bypass="AzureServices",
                    virtual_network_rules=[storage.VirtualNetworkRuleArgs(virtual_network_resource_id=args.subnet_id)],
                    ip_rules=[storage.IPRuleArgs(i_p_address_or_range=_storage_range(cidr), action="Allow")
                              for _, cidr in args.client_cidrs] or None,
                )
                if args.subnet_id is not None else None
            ),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        file_service = storage.FileServiceProperties(
            f"{name}-files",
            resource_group_name=args.resource_group_name,
            account_name=account.name,
            file_services_name="default",
            protocol_settings=storage.ProtocolSettingsArgs(smb=storage.SmbSettingArgs(
                versions=SMB_VERSIONS,
                authentication_methods=SMB_AUTH_METHODS,
                channel_encryption=SMB_CHANNEL_ENCRYPTION,
                kerberos_ticket_encryption="AES-256",
            )),
            share_delete_retention_policy=storage.DeleteRetentionPolicyArgs(enabled=True, days=args.soft_delete_days),
            opts=child,
        )
        share = storage.FileShare(
            f"{name}-share",
            resource_group_name=args.resource_group_name,
            account_name=account.name,
            share_name=args.share_name,
            share_quota=args.quota_gib,
            enabled_protocols="SMB",
            metadata={"lorastacktier": args.tier_tag},  # share metadata names must be C# identifiers
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect, depends_on=[file_service]),
        )
        return account, share

    def _links(self, name: str, args: AdapterStoreArgs, account, share) -> None:
        # Listed keys are not secret by themselves (PAN#1693): wrap, so the key never lands in plain state.
        key = pulumi.Output.secret(
            storage.list_storage_account_keys_output(
                resource_group_name=args.resource_group_name, account_name=account.name
            ).keys[naming.storage_key_index(args.key_generation)].value
        )
        links = {}
        for mode, base in (("ReadWrite", "store"), ("ReadOnly", "store-ro")):
            storage_name = naming.environment_storage_name(args.key_generation, base)
            links[mode] = app.ManagedEnvironmentsStorage(
                f"{name}-{storage_name}",
                resource_group_name=args.environment_resource_group_name,
                environment_name=args.environment_name,
                storage_name=storage_name,
                properties=app.ManagedEnvironmentStoragePropertiesArgs(
                    azure_file=app.AzureFilePropertiesArgs(
                        account_name=account.name, account_key=key, share_name=share.name, access_mode=mode
                    )
                ),
                # [rule storage-rekey] a link keeps the key it was created with; rotation = a new generation
                opts=pulumi.ResourceOptions(parent=self, ignore_changes=["properties.azureFile.accountKey"]),
            )
        self.account_name = pulumi.Output.from_input(account.name)
        self.account_id = account.id
        self.share_name = pulumi.Output.from_input(share.name)
        self.storage_name = links["ReadWrite"].name
        self.read_only_storage_name = links["ReadOnly"].name
        self.register_outputs({
            "account_name": self.account_name,
            "share_name": self.share_name,
            "storage_name": self.storage_name,
            "read_only_storage_name": self.read_only_storage_name,
        })


def _storage_range(cidr: str) -> str:
    # Storage ipRules take a bare address for a single host (/31 and /32 prefixes are refused).
    return cidr.split("/")[0] if cidr.endswith("/32") else cidr
