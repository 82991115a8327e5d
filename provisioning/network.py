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


class SubnetError(ValueError):
    """A brought subnet that the environment or the store firewall cannot use."""


def check_subnet(subnet: dict, subnet_id: str) -> str:
    """Raise SubnetError unless ``subnet`` (a get_subnet result as a dict) is delegated to Microsoft.App/environments
    and has the Microsoft.Storage service endpoint the store's VNet rule needs [rule subnet-storage-endpoint]."""
    endpoints = {e.get("service") for e in subnet.get("service_endpoints") or []}
    delegations = {d.get("service_name") for d in subnet.get("delegations") or []}
    problems = []
    if "Microsoft.Storage" not in endpoints:
        problems.append("it has no Microsoft.Storage service endpoint, so the store's VNet rule would fail "
                        "[rule subnet-storage-endpoint]; add it: az network vnet subnet update --service-endpoints "
                        "Microsoft.Storage ...")
    if "Microsoft.App/environments" not in delegations:
        problems.append("it is not delegated to Microsoft.App/environments; add the delegation: az network vnet "
                        "subnet update --delegations Microsoft.App/environments ...")
    if problems:
        raise SubnetError(f"lorastack:network.infrastructureSubnetId {subnet_id}: " + "; ".join(problems))
    return subnet_id


def brought_subnet(subnet_id: str) -> pulumi.Output[str]:
    """Read a brought subnet with get_subnet (never modified) and check it before anything uses its ID."""
    parts = subnet_id.strip("/").split("/")
    found = network.get_subnet_output(resource_group_name=parts[3], virtual_network_name=parts[7],
                                      subnet_name=parts[9])

    def check(s) -> str:
        return check_subnet({
            "service_endpoints": [{"service": e.service} for e in (s.service_endpoints or [])],
            "delegations": [{"service_name": d.service_name} for d in (s.delegations or [])],
        }, subnet_id)

    return found.apply(check)
