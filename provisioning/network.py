"""VNet integration: a VNet with the environment's delegated infrastructure subnet (one ComponentResource)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import network


@dataclass
class EnvironmentNetworkArgs:
    """Inputs of :class:`EnvironmentNetwork`."""

    resource_group_name: pulumi.Input[str]
    location: str
    vnet_name: str
    address_space: str
    infrastructure_subnet: str  # >= /27, validated in settings
    tags: dict[str, str]


class EnvironmentNetwork(pulumi.ComponentResource):
    """A VNet whose infrastructure subnet is delegated to Microsoft.App/environments.

    The subnet has the Microsoft.Storage service endpoint so the store account can deny everything else.
    An environment's subnet cannot change after creation (changing it replaces the environment).
    """

    subnet_id: pulumi.Output[str]

    def __init__(self, name: str, args: EnvironmentNetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:EnvironmentNetwork", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        vnet = network.VirtualNetwork(
            f"{name}-vnet",
            resource_group_name=args.resource_group_name,
            virtual_network_name=args.vnet_name,
            location=args.location,
            address_space=network.AddressSpaceArgs(address_prefixes=[args.address_space]),
            tags=args.tags,
            opts=child,
        )
        subnet = network.Subnet(
            f"{name}-infra",
            resource_group_name=args.resource_group_name,
            virtual_network_name=vnet.name,
            subnet_name="aca-infrastructure",
            address_prefix=args.infrastructure_subnet,
            delegations=[network.DelegationArgs(name="aca", service_name="Microsoft.App/environments")],
            service_endpoints=[network.ServiceEndpointPropertiesFormatArgs(service="Microsoft.Storage")],
            opts=child,
        )
        self.subnet_id = subnet.id
        self.register_outputs({"subnet_id": self.subnet_id})
