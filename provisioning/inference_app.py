"""The inference Container App, and its optional Entra sign-in (one ComponentResource)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
from pulumi_azure_native import app

from provisioning import contract
from provisioning.probes import ProbeSpec


@dataclass
class EntraAuth:
    """Easy Auth settings (plain values from the stack settings)."""

    client_id: str
    tenant_id: str
    allowed_audiences: list[str]
    excluded_paths: list[str]


@dataclass
class InferenceAppArgs:
    """Inputs of :class:`InferenceApp`."""

    resource_group_name: pulumi.Input[str]
    location: str
    app_name: str
    environment_id: pulumi.Input[str]
    workload_profile_name: str
    cpu: float
    memory: str
    image: str
    registry_server: pulumi.Input[str] | None
    storage_name: pulumi.Input[str]  # the read-only environment storage link
    storage_type: str
    identity_id: pulumi.Input[str]
    hf_token_url: pulumi.Input[str] | None  # None: no HF token secret (public base models)
    api_keys_url: pulumi.Input[str]
    probes: list[ProbeSpec]
    min_replicas: int
    max_replicas: int
    concurrent_requests: int
    cooldown_seconds: int
    ip_allow_list: list[tuple[str, str]]  # (name, cidr)
    entra_auth: EntraAuth | None
    depends_on: list[pulumi.Resource]
    base_model: str | None = None
    base_revision: str | None = None
    # LORASTACK_ENGINE and vLLM's sizing, from provisioning.engine_plan.plan_engine (name -> value).
    engine_env: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class InferenceApp(pulumi.ComponentResource):
    """The OpenAI-compatible API + chat UI on the inference GPU profile.

    HTTPS-only external ingress (optionally IP-restricted), an API key always required (LORASTACK_API_KEYS from
    Key Vault), scale to zero with an HTTP concurrency rule, probes sized for a model load of minutes, and the
    store mounted read-only.
    """

    app_name: pulumi.Output[str]
    url: pulumi.Output[str]

    def __init__(self, name: str, args: InferenceAppArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:InferenceApp", name, {}, opts)
        command, app_args = contract.inference_command(easy_auth=args.entra_auth is not None)
        probes = [
            app.ContainerAppProbeArgs(
                type=p.type,
                http_get=app.ContainerAppProbeHttpGetArgs(path=p.path, port=contract.INFERENCE_PORT, scheme="HTTP"),
                initial_delay_seconds=p.initial_delay_seconds,
                period_seconds=p.period_seconds,
                failure_threshold=p.failure_threshold,
                success_threshold=p.success_threshold,
                timeout_seconds=p.timeout_seconds,
            )
            for p in args.probes
        ]
        container_app = app.ContainerApp(
            f"{name}-app",
            resource_group_name=args.resource_group_name,
            container_app_name=args.app_name,
            location=args.location,
            environment_id=args.environment_id,
            workload_profile_name=args.workload_profile_name,
            identity=app.ManagedServiceIdentityArgs(type="UserAssigned", user_assigned_identities=[args.identity_id]),
            configuration=app.ConfigurationArgs(
                active_revisions_mode="Single",
                ingress=app.IngressArgs(
                    external=True,
                    target_port=contract.INFERENCE_PORT,
                    allow_insecure=False,
                    transport="auto",
                    # Gradio keeps a session in one replica ("Session not found" elsewhere) [rule sticky-sessions]
                    sticky_sessions=(app.IngressStickySessionsArgs(affinity="sticky")
                                     if args.max_replicas > 1 else None),
                    ip_security_restrictions=[
                        app.IpSecurityRestrictionRuleArgs(name=n, ip_address_range=cidr, action="Allow")
                        for n, cidr in args.ip_allow_list
                    ] or None,
                ),
                secrets=[
                    app.SecretArgs(name=contract.SECRET_API_KEYS, key_vault_url=args.api_keys_url,
                                   identity=args.identity_id),
                    *([app.SecretArgs(name=contract.SECRET_HF_TOKEN, key_vault_url=args.hf_token_url,
                                      identity=args.identity_id)] if args.hf_token_url is not None else []),
                ],
                registries=(
                    [app.RegistryCredentialsArgs(server=args.registry_server, identity=args.identity_id)]
                    if args.registry_server else None
                ),
            ),
            template=app.TemplateArgs(
                containers=[app.ContainerArgs(
                    name="inference",  # the first container is the one that gets the GPU
                    image=args.image,
                    command=command,
                    args=app_args,
                    resources=app.ContainerResourcesArgs(cpu=args.cpu, memory=args.memory),
                    env=[
                        app.EnvironmentVarArgs(name=contract.ENV_API_KEYS, secret_ref=contract.SECRET_API_KEYS),
                        *([app.EnvironmentVarArgs(name=contract.ENV_HF_TOKEN, secret_ref=contract.SECRET_HF_TOKEN)]
                          if args.hf_token_url is not None else []),
                        # The job fills the HF hub cache on the share; the app's mount is read-only, so it reads
                        # that cache and never downloads (HF's own small writable state stays on local disk).
                        app.EnvironmentVarArgs(name="HF_HUB_CACHE", value=contract.HF_HUB_CACHE),
                        app.EnvironmentVarArgs(name="HF_HUB_OFFLINE", value="1"),
                        app.EnvironmentVarArgs(name=contract.ENV_STORE, value=contract.STORE_MOUNT_PATH),
                        app.EnvironmentVarArgs(name=contract.ENV_PROXY_HOPS, value=str(contract.INGRESS_PROXY_HOPS)),
                        *([app.EnvironmentVarArgs(name=contract.ENV_BASE_MODEL, value=args.base_model)]
                          if args.base_model else []),
                        *([app.EnvironmentVarArgs(name=contract.ENV_BASE_REVISION, value=args.base_revision)]
                          if args.base_revision else []),
                        *[app.EnvironmentVarArgs(name=k, value=v) for k, v in args.engine_env.items()],
                    ],
                    probes=probes,
                    volume_mounts=[app.VolumeMountArgs(
                        volume_name=contract.STORE_VOLUME, mount_path=contract.STORE_MOUNT_PATH
                    )],
                )],
                volumes=[app.VolumeArgs(
                    name=contract.STORE_VOLUME, storage_type=args.storage_type, storage_name=args.storage_name,
                    mount_options=contract.store_mount_options(args.storage_type),
                )],
                scale=app.ScaleArgs(
                    min_replicas=args.min_replicas,
                    max_replicas=args.max_replicas,
                    cooldown_period=args.cooldown_seconds,
                    polling_interval=30,
                    rules=[app.ScaleRuleArgs(
                        name="http-concurrency",
                        http=app.HttpScaleRuleArgs(metadata={"concurrentRequests": str(args.concurrent_requests)}),
                    )],
                ),
            ),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=args.depends_on),
        )
        if args.entra_auth is not None:
            a = args.entra_auth
            app.ContainerAppsAuthConfig(
                f"{name}-auth",
                resource_group_name=args.resource_group_name,
                container_app_name=container_app.name,
                auth_config_name="current",
                platform=app.AuthPlatformArgs(enabled=True),
                # A browser is sent to sign in (Return401 would leave it on a blank 401); /v1/* is excluded and
                # answers its own 401 with the API key check [rule easy-auth-browser].
                global_validation=app.GlobalValidationArgs(
                    unauthenticated_client_action="RedirectToLoginPage", redirect_to_provider="azureactivedirectory",
                    excluded_paths=a.excluded_paths,
                ),
                identity_providers=app.IdentityProvidersArgs(
                    azure_active_directory=app.AzureActiveDirectoryArgs(
                        enabled=True,
                        registration=app.AzureActiveDirectoryRegistrationArgs(
                            client_id=a.client_id,
                            open_id_issuer=f"https://login.microsoftonline.com/{a.tenant_id}/v2.0",
                        ),
                        validation=app.AzureActiveDirectoryValidationArgs(
                            allowed_audiences=a.allowed_audiences or [f"api://{a.client_id}"]
                        ),
                    )
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
        self.app_name = container_app.name
        self.url = container_app.configuration.apply(
            lambda c: f"https://{c.ingress.fqdn}" if c and c.ingress and c.ingress.fqdn else ""
        )
        self.register_outputs({"app_name": self.app_name, "url": self.url})
