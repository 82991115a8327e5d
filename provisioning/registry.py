"""The platform's container registry (one ComponentResource): where the image workflow pushes the trainer and
inference images, and where every job and app pulls them with its user-assigned identity (AcrPull, no admin user)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import containerregistry


@dataclass
class ImageRegistryArgs:
    """Inputs of :class:`ImageRegistry`."""

    resource_group_name: pulumi.Input[str]
    location: str
    registry_name: str  # 5-50 alphanumerics, globally unique (naming.registry_name)
    sku: str  # Basic | Standard | Premium (Premium: artifact streaming, which speeds up GPU cold starts)
    protect: bool
    tags: dict[str, str]


class ImageRegistry(pulumi.ComponentResource):
    """An Azure Container Registry with the admin user off and anonymous pull off [rule acr-pull]."""

    registry_id: pulumi.Output[str]
    login_server: pulumi.Output[str]
    registry_name: pulumi.Output[str]

    def __init__(self, name: str, args: ImageRegistryArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:ImageRegistry", name, {}, opts)
        registry = containerregistry.Registry(
            f"{name}-acr",
            resource_group_name=args.resource_group_name,
            registry_name=args.registry_name,
            location=args.location,
            sku=containerregistry.SkuArgs(name=args.sku),
            admin_user_enabled=False,
            anonymous_pull_enabled=False,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        self.registry_id = registry.id
        self.registry_name = registry.name
        self.login_server = registry.login_server
        self.register_outputs({"registry_id": self.registry_id, "login_server": self.login_server,
                               "registry_name": self.registry_name})
