"""Log Analytics workspace and the ACA managed environment with its workload profiles (one ComponentResource)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import app, monitor, operationalinsights

from provisioning.gpu import WorkloadProfileSpec


@dataclass
class GpuEnvironmentArgs:
    """Inputs of :class:`GpuEnvironment`."""

    resource_group_name: pulumi.Input[str]
    location: str
    workspace_name: str
    environment_name: str
    workload_profiles: list[WorkloadProfileSpec]  # from provisioning.gpu.workload_profiles
    log_retention_days: int
    log_daily_quota_gb: float | None
    infrastructure_subnet_id: pulumi.Input[str] | None
    internal: bool
    protect: bool
    tags: dict[str, str]
    existing_workspace_id: str | None = None  # bring your own Log Analytics workspace (read, never modified)


class GpuEnvironment(pulumi.ComponentResource):
    """The workspace, the environment and the diagnostic setting that ships its logs.

    Logs go through ``destination="azure-monitor"`` plus a diagnostic setting, so the workspace's shared key is
    never read and never lands in state (the AI Toolkit template passes it in clear text).
    """

    environment_id: pulumi.Output[str]
    environment_name: pulumi.Output[str]
    workspace_id: pulumi.Output[str]
    workspace_customer_id: pulumi.Output[str]

    def __init__(self, name: str, args: GpuEnvironmentArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:GpuEnvironment", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        if args.existing_workspace_id:
            parts = args.existing_workspace_id.strip("/").split("/")
            workspace = operationalinsights.get_workspace_output(resource_group_name=parts[3], workspace_name=parts[-1])
        else:
            workspace = operationalinsights.Workspace(
                f"{name}-logs",
                resource_group_name=args.resource_group_name,
                workspace_name=args.workspace_name,
                location=args.location,
                sku=operationalinsights.WorkspaceSkuArgs(name="PerGB2018"),
                retention_in_days=args.log_retention_days,
                workspace_capping=(
                    operationalinsights.WorkspaceCappingArgs(daily_quota_gb=args.log_daily_quota_gb)
                    if args.log_daily_quota_gb else None
                ),
                tags=args.tags,
                opts=child,
            )
        env = app.ManagedEnvironment(
            f"{name}-env",
            resource_group_name=args.resource_group_name,
            environment_name=args.environment_name,
            location=args.location,
            app_logs_configuration=app.AppLogsConfigurationArgs(destination="azure-monitor"),
            workload_profiles=[
                app.WorkloadProfileArgs(
                    name=p.name,
                    workload_profile_type=p.type,
                    minimum_count=p.minimum_count,  # None for Consumption and serverless GPU profiles
                    maximum_count=p.maximum_count,
                )
                for p in args.workload_profiles
            ],
            vnet_configuration=(
                app.VnetConfigurationArgs(infrastructure_subnet_id=args.infrastructure_subnet_id, internal=args.internal)
                if args.infrastructure_subnet_id is not None else None
            ),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        monitor.DiagnosticSetting(
            f"{name}-diagnostics",
            name="to-log-analytics",
            resource_uri=env.id,
            workspace_id=workspace.id,
            log_analytics_destination_type="Dedicated",
            logs=[monitor.DiagnosticsLogSettingsArgs(category_group="allLogs", enabled=True)],
            metrics=[monitor.DiagnosticsMetricSettingsArgs(category="AllMetrics", enabled=True)],
            opts=child,
        )
        self.environment_id = env.id
        self.environment_name = env.name
        self.workspace_id = workspace.id
        self.workspace_customer_id = workspace.customer_id
        self.register_outputs({
            "environment_id": self.environment_id,
            "environment_name": self.environment_name,
            "workspace_id": self.workspace_id,
            "workspace_customer_id": self.workspace_customer_id,
        })
