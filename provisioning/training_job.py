"""The fine-tuning ACA Job (one ComponentResource)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import app

from provisioning import contract


@dataclass
class TrainingJobArgs:
    """Inputs of :class:`TrainingJob`."""

    resource_group_name: pulumi.Input[str]
    location: str
    job_name: str
    environment_id: pulumi.Input[str]
    workload_profile_name: str
    cpu: float
    memory: str
    image: str
    registry_server: pulumi.Input[str] | None
    replica_timeout_seconds: int
    replica_retry_limit: int
    storage_name: pulumi.Input[str]  # the read-write environment storage link
    storage_type: str
    identity_id: pulumi.Input[str]
    hf_token_url: pulumi.Input[str] | None  # None: no HF token secret (public base models)
    depends_on: list[pulumi.Resource]  # the identity's role assignments
    tags: dict[str, str]


class TrainingJob(pulumi.ComponentResource):
    """A manually triggered Job on the training GPU profile, with the store mounted read-write at /mnt/store.

    HF_HOME/HF_HUB_CACHE point at the share: the replica's ephemeral disk is 8 GiB, GPU profiles included,
    which a base model does not fit. The image's entrypoint is kept; an execution trains the oldest run queued on the store. The HF token is a Key Vault reference read with the user-assigned identity.
    """

    job_name: pulumi.Output[str]

    def __init__(self, name: str, args: TrainingJobArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:TrainingJob", name, {}, opts)
        job = app.Job(
            f"{name}-job",
            resource_group_name=args.resource_group_name,
            job_name=args.job_name,
            location=args.location,
            environment_id=args.environment_id,
            workload_profile_name=args.workload_profile_name,
            identity=app.ManagedServiceIdentityArgs(type="UserAssigned", user_assigned_identities=[args.identity_id]),
            configuration=app.JobConfigurationArgs(
                trigger_type="Manual",
                replica_timeout=args.replica_timeout_seconds,
                replica_retry_limit=args.replica_retry_limit,
                manual_trigger_config=app.JobConfigurationManualTriggerConfigArgs(
                    parallelism=1, replica_completion_count=1
                ),
                secrets=[app.SecretArgs(
                    name=contract.SECRET_HF_TOKEN, key_vault_url=args.hf_token_url, identity=args.identity_id
                )] if args.hf_token_url is not None else None,
                registries=(
                    [app.RegistryCredentialsArgs(server=args.registry_server, identity=args.identity_id)]
                    if args.registry_server else None
                ),
            ),
            template=app.JobTemplateArgs(
                containers=[app.ContainerArgs(
                    name="trainer",
                    image=args.image,
                    # no command/args: the image's entrypoint runs `lorastack train`, which claims the oldest run
                    # `lorastack finetune` queued on the store (starts need no override, which would drop mounts)
                    resources=app.ContainerResourcesArgs(cpu=args.cpu, memory=args.memory),
                    env=[
                        *([app.EnvironmentVarArgs(name=contract.ENV_HF_TOKEN, secret_ref=contract.SECRET_HF_TOKEN)]
                          if args.hf_token_url is not None else []),
                        app.EnvironmentVarArgs(name="HF_HOME", value=contract.HF_HOME),
                        app.EnvironmentVarArgs(name="HF_HUB_CACHE", value=contract.HF_HUB_CACHE),
                        app.EnvironmentVarArgs(name="HF_DATASETS_CACHE", value=contract.HF_DATASETS_CACHE),
                        app.EnvironmentVarArgs(name=contract.ENV_STORE, value=contract.STORE_MOUNT_PATH),
                    ],
                    volume_mounts=[app.VolumeMountArgs(
                        volume_name=contract.STORE_VOLUME, mount_path=contract.STORE_MOUNT_PATH
                    )],
                )],
                volumes=[app.VolumeArgs(
                    name=contract.STORE_VOLUME, storage_type=args.storage_type, storage_name=args.storage_name,
                    mount_options=contract.store_mount_options(args.storage_type),
                )],
            ),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=args.depends_on),
        )
        self.job_name = job.name
        self.register_outputs({"job_name": self.job_name})
