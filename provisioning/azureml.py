"""Azure ML for training runs that outgrow one ACA replica (issue 12): a workspace, a GPU compute cluster
(dedicated or low-priority, scaling to zero nodes) running as the stack's identity, and the adapter store's file
share registered as a datastore, so Azure ML jobs read and write the same store (one ComponentResource)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import machinelearningservices as ml
from pulumi_azure_native import storage

DATASTORE_NAME = "lorastack_store"  # datastore names: letters, digits and underscores


@dataclass
class AzureMLArgs:
    """Inputs of :class:`AzureML`."""

    resource_group_name: pulumi.Input[str]
    location: str
    workspace_name: str
    workspace_storage_account: str  # the workspace's own (blob) account, globally unique
    key_vault_id: pulumi.Input[str]
    identity_id: pulumi.Input[str]
    compute_name: str
    vm_size: str
    min_nodes: int
    max_nodes: int
    low_priority: bool
    idle_seconds: int
    store_account_name: pulumi.Input[str]
    store_resource_group_name: pulumi.Input[str]
    store_share_name: pulumi.Input[str]
    store_key_index: int
    protect: bool
    tags: dict[str, str]


class AzureML(pulumi.ComponentResource):
    """Workspace + AmlCompute cluster + the store share as an AzureFile datastore (account key kept secret)."""

    workspace_name: pulumi.Output[str]
    compute_name: pulumi.Output[str]
    datastore_name: pulumi.Output[str]

    def __init__(self, name: str, args: AzureMLArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:AzureML", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        account = storage.StorageAccount(
            f"{name}-storage", resource_group_name=args.resource_group_name,
            account_name=args.workspace_storage_account, location=args.location, kind="StorageV2",
            sku=storage.SkuArgs(name="Standard_LRS"), minimum_tls_version="TLS1_2", enable_https_traffic_only=True,
            allow_blob_public_access=False, tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        workspace = ml.Workspace(
            f"{name}-workspace", resource_group_name=args.resource_group_name, workspace_name=args.workspace_name,
            location=args.location, sku=ml.SkuArgs(name="Basic"), storage_account=account.id,
            key_vault=args.key_vault_id,
            identity=ml.ManagedServiceIdentityArgs(type="SystemAssigned,UserAssigned",
                                                   user_assigned_identities=[args.identity_id]),
            primary_user_assigned_identity=args.identity_id, tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        compute = ml.Compute(
            f"{name}-compute", resource_group_name=args.resource_group_name, workspace_name=workspace.name,
            compute_name=args.compute_name, location=args.location,
            identity=ml.ManagedServiceIdentityArgs(type="UserAssigned", user_assigned_identities=[args.identity_id]),
            properties=ml.AmlComputeArgs(
                compute_type="AmlCompute",
                properties=ml.AmlComputePropertiesArgs(
                    vm_size=args.vm_size,
                    # low priority: preemptible, far cheaper; the trainer resumes from its last checkpoint
                    vm_priority="LowPriority" if args.low_priority else "Dedicated",
                    os_type="Linux",
                    enable_node_public_ip=True,
                    remote_login_port_public_access="Disabled",
                    scale_settings=ml.ScaleSettingsArgs(
                        min_node_count=args.min_nodes, max_node_count=args.max_nodes,
                        node_idle_time_before_scale_down=f"PT{args.idle_seconds}S"),
                ),
            ),
            tags=args.tags, opts=child,
        )
        key = pulumi.Output.secret(storage.list_storage_account_keys_output(
            resource_group_name=args.store_resource_group_name, account_name=args.store_account_name,
        ).keys[args.store_key_index].value)
        datastore = ml.Datastore(
            f"{name}-datastore", resource_group_name=args.resource_group_name, workspace_name=workspace.name,
            name=DATASTORE_NAME,
            properties=ml.AzureFileDatastoreArgs(
                datastore_type="AzureFile", account_name=args.store_account_name,
                file_share_name=args.store_share_name,
                credentials=ml.AccountKeyDatastoreCredentialsArgs(
                    credentials_type="AccountKey",
                    secrets=ml.AccountKeyDatastoreSecretsArgs(secrets_type="AccountKey", key=key)),
                description="the lorastack adapter store (same layout as the ACA mount at /mnt/store)",
            ),
            opts=child,
        )
        self.workspace_name = workspace.name
        self.compute_name = compute.name
        self.datastore_name = datastore.name
        self.register_outputs({"workspace_name": self.workspace_name, "compute_name": self.compute_name,
                               "datastore_name": self.datastore_name})
