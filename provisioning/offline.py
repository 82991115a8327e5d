"""Rendering a stack offline: the real program and the real pulumi-azure-native classes under Pulumi's own mocks.

No Pulumi CLI, no provider plugin, no Azure credentials. The mocks play the provider: they echo inputs as
outputs, fill in what Azure would compute (IDs, FQDNs, vault URIs, identity principals) and answer the invokes
the program makes. This is how ``lorastack plan`` and the tests see exactly what would be sent to the provider;
it is not ``pulumi preview`` (no diff against real state, no provider-side validation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import gc
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import mocks as pmocks
from pulumi.runtime import settings as psettings

SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
SIG_KEY = "4dabf18193072939515e22adb298388d"
FAKE_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
FAKE_TENANT = "11111111-1111-1111-1111-111111111111"


def is_secret_envelope(v: Any) -> bool:
    return isinstance(v, dict) and v.get(SIG_KEY) == SECRET_SIG


def unwrap(value: Any, path: str = "", found: set[str] | None = None) -> Any:
    """Strip Pulumi's secret envelopes from wire-format inputs; record the dotted paths that were secret."""
    if is_secret_envelope(value):
        if found is not None:
            found.add(path)
        return unwrap(value.get("value"), path, found)
    if isinstance(value, dict):
        return {k: unwrap(v, f"{path}.{k}" if path else k, found) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


@dataclass
class RenderedResource:
    """One resource as the program registered it."""

    type: str
    name: str
    urn: str
    inputs: dict[str, Any]  # wire format: camelCase keys, ints as floats, secrets unwrapped
    secret_paths: set[str]
    custom: bool
    protect: bool = False
    dependencies: list[str] = field(default_factory=list)
    parent: str = ""
    ignore_changes: list[str] = field(default_factory=list)
    after_create_hooks: list[str] = field(default_factory=list)

    def get(self, dotted: str, default: Any = None) -> Any:
        """``r.get("configuration.ingress.external")``."""
        cur: Any = self.inputs
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur


# the input holding each resource type's physical name (the mocks' stand-in for the provider's naming)
NAME_KEYS = {
    "ResourceGroup": "resourceGroupName", "StorageAccount": "accountName", "FileShare": "shareName",
    "FileServiceProperties": "fileServicesName", "ManagedEnvironment": "environmentName",
    "ManagedEnvironmentsStorage": "storageName", "Job": "jobName", "ContainerApp": "containerAppName",
    "ContainerAppsAuthConfig": "authConfigName", "Workspace": "workspaceName", "Vault": "vaultName",
    "Secret": "secretName", "UserAssignedIdentity": "resourceName", "VirtualNetwork": "virtualNetworkName",
    "Subnet": "subnetName", "RoleAssignment": "roleAssignmentName", "Registry": "registryName",
    "Compute": "computeName", "Datastore": "name",
}


# ARM resource ID shape per type: (provider path, parent input name, parent path) -> ids like Azure's, so code that
# parses IDs (vault resource group and name, subnet parts) runs on offline renders too.
ARM_PATHS = {
    "ManagedEnvironment": "Microsoft.App/managedEnvironments/{name}",
    "ContainerApp": "Microsoft.App/containerApps/{name}",
    "Job": "Microsoft.App/jobs/{name}",
    "ManagedEnvironmentsStorage": "Microsoft.App/managedEnvironments/{environmentName}/storages/{name}",
    "ContainerAppsAuthConfig": "Microsoft.App/containerApps/{containerAppName}/authConfigs/{name}",
    "StorageAccount": "Microsoft.Storage/storageAccounts/{name}",
    "FileServiceProperties": "Microsoft.Storage/storageAccounts/{accountName}/fileServices/{name}",
    "FileShare": "Microsoft.Storage/storageAccounts/{accountName}/fileServices/default/shares/{name}",
    "Vault": "Microsoft.KeyVault/vaults/{name}",
    "Secret": "Microsoft.KeyVault/vaults/{vaultName}/secrets/{name}",
    "UserAssignedIdentity": "Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
    "Workspace": "Microsoft.OperationalInsights/workspaces/{name}",
    "Registry": "Microsoft.ContainerRegistry/registries/{name}",
    "VirtualNetwork": "Microsoft.Network/virtualNetworks/{name}",
    "Subnet": "Microsoft.Network/virtualNetworks/{virtualNetworkName}/subnets/{name}",
}


def arm_id(short: str, name: str, plain: dict[str, Any]) -> str:
    """The ARM ID Azure would give a resource of type ``short`` named ``name`` with these inputs."""
    sub = f"/subscriptions/{FAKE_SUBSCRIPTION}"
    if short == "ResourceGroup":
        return f"{sub}/resourceGroups/{name}"
    if short == "RoleAssignment":
        return f"{plain.get('scope', sub)}/providers/Microsoft.Authorization/roleAssignments/{name}"
    if short == "DiagnosticSetting":
        return f"{plain.get('resourceUri', sub)}/providers/Microsoft.Insights/diagnosticSettings/{name}"
    path = ARM_PATHS.get(short)
    if path is None:
        return f"{sub}/providers/mock/{short}/{name}"
    fields = {k: plain.get(k, "unknown") for k in ("environmentName", "containerAppName", "accountName", "vaultName",
                                                    "virtualNetworkName")}
    return f"{sub}/resourceGroups/{plain.get('resourceGroupName', 'unknown')}/providers/" + path.format(
        name=name, **fields)


def _rg_id(a: dict[str, Any]) -> str:
    return f"/subscriptions/{FAKE_SUBSCRIPTION}/resourceGroups/{a.get('resourceGroupName')}/providers"


# What the get functions answer for brought resources (a plausible, documented setup; tests override parts).
EXISTING = {
    "azure-native:app:getManagedEnvironment": lambda a, o: {
        "id": f"{_rg_id(a)}/Microsoft.App/managedEnvironments/{a.get('environmentName')}",
        "name": a.get("environmentName"), "location": "West US 3",
        "workloadProfiles": o.get("workloadProfiles", [
            {"name": "Consumption", "workloadProfileType": "Consumption"},
            {"name": "gpu-a100", "workloadProfileType": "Consumption-GPU-NC24-A100"},
            {"name": "gpu-t4", "workloadProfileType": "Consumption-GPU-NC8as-T4"}])},
    "azure-native:storage:getStorageAccount": lambda a, o: {
        "id": f"{_rg_id(a)}/Microsoft.Storage/storageAccounts/{a.get('accountName')}", "name": a.get("accountName"),
        "location": "westus3", "kind": "StorageV2", "sku": {"name": "Standard_LRS"}},
    "azure-native:storage:getFileShare": lambda a, o: {
        "id": f"{_rg_id(a)}/Microsoft.Storage/storageAccounts/{a.get('accountName')}/fileServices/default/shares/"
              f"{a.get('shareName')}", "name": a.get("shareName"), "enabledProtocols": "SMB"},
    "azure-native:keyvault:getVault": lambda a, o: {
        "id": f"{_rg_id(a)}/Microsoft.KeyVault/vaults/{a.get('vaultName')}", "name": a.get("vaultName"),
        "location": "westus3", "properties": {"tenantId": FAKE_TENANT, "sku": {"family": "A", "name": "standard"},
                                              "vaultUri": f"https://{a.get('vaultName')}.vault.azure.net/"}},
    "azure-native:operationalinsights:getWorkspace": lambda a, o: {
        "id": f"{_rg_id(a)}/Microsoft.OperationalInsights/workspaces/{a.get('workspaceName')}",
        "name": a.get("workspaceName"), "customerId": "existing-customer-id", "location": "westus3"},
}


class RecordingMocks(pulumi.runtime.Mocks):
    """Mocks that record every registration and answer like the azure-native provider would, offline."""

    def __init__(self, stack_outputs: dict[str, dict[str, Any]] | None = None,
                 subnets: dict[str, dict[str, Any]] | None = None,
                 existing: dict[str, dict[str, Any]] | None = None) -> None:
        self.calls: list[pulumi.runtime.MockCallArgs] = []
        self.inputs: dict[tuple[str, str], dict[str, Any]] = {}  # (type, name) -> wire-format inputs
        # StackReference name ("org/lorastack/platform") -> that stack's outputs (from its own offline render)
        self.stack_outputs = stack_outputs or {}
        # brought subnets by resource ID -> the get_subnet result (camelCase)
        self.subnets = subnets or {}
        # get-function token -> overrides of the answer for brought resources
        self.existing: dict[str, dict[str, Any]] = existing or {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.inputs[(args.typ, args.name)] = args.inputs
        if args.typ == "pulumi:pulumi:StackReference":
            ref = args.inputs.get("name")
            if ref not in self.stack_outputs:
                raise ValueError(f"stack reference {ref!r}: no offline outputs for it (render that stack first)")
            return ref, {**args.inputs, "outputs": self.stack_outputs[ref], "secretOutputNames": []}
        state = dict(args.inputs)
        plain = unwrap(args.inputs)
        name, typ = args.name, args.typ
        short = typ.split(":")[-1]
        physical = plain.get(NAME_KEYS.get(short, "name"))
        state.setdefault("name", physical if isinstance(physical, str) else name)
        rid = arm_id(short, state["name"], plain)
        if typ.startswith("azure-native:machinelearningservices:"):
            ws = plain.get("workspaceName", state["name"])
            rid = (f"/subscriptions/{FAKE_SUBSCRIPTION}/resourceGroups/{plain.get('resourceGroupName')}/providers/"
                   f"Microsoft.MachineLearningServices/workspaces/{ws}"
                   + ("" if short == "Workspace" else f"/{short.lower()}s/{state['name']}"))
        identity = plain.get("identity")
        if isinstance(identity, dict) and isinstance(identity.get("userAssignedIdentities"), list):
            # input is a list of IDs, output a map id -> {principalId, clientId}
            state["identity"] = {**identity, "userAssignedIdentities": {
                i: {"principalId": "mock-principal", "clientId": "mock-client"}
                for i in identity["userAssignedIdentities"]}}
        if typ == "azure-native:managedidentity:UserAssignedIdentity":
            state.update(principalId=f"{name}-principal-id", clientId=f"{name}-client-id")
        elif typ == "azure-native:operationalinsights:Workspace":
            state["customerId"] = f"{name}-customer-id"
        elif typ == "azure-native:containerregistry:Registry":
            state["loginServer"] = f"{plain.get('registryName', name).lower()}.azurecr.io"
        elif typ == "azure-native:app:ManagedEnvironment":
            state.update(defaultDomain="mock.westus3.azurecontainerapps.io", staticIp="10.0.0.4")
        elif typ == "azure-native:keyvault:Vault":
            props = copy.deepcopy(plain.get("properties") or {})
            props["vaultUri"] = f"https://{plain.get('vaultName', name)}.vault.azure.net/"
            state["properties"] = props
        elif typ == "azure-native:keyvault:Secret":
            props = copy.deepcopy(plain.get("properties") or {})
            props.pop("value", None)  # ARM never returns secret values
            base = f"https://{plain.get('vaultName', 'vault')}.vault.azure.net/secrets/{plain.get('secretName', name)}"
            props.update(secretUri=base, secretUriWithVersion=f"{base}/0123456789abcdef")
            state["properties"] = props
        elif typ == "azure-native:app:ContainerApp":
            cfg = copy.deepcopy(plain.get("configuration") or {})
            if isinstance(cfg.get("ingress"), dict):
                cfg["ingress"]["fqdn"] = f"{plain.get('containerAppName', name)}.mock.westus3.azurecontainerapps.io"
            state["configuration"] = ({SIG_KEY: SECRET_SIG, "value": cfg}
                                      if is_secret_envelope(args.inputs.get("configuration")) else cfg)
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs):
        self.calls.append(args)
        if args.token == "azure-native:authorization:getClientConfig":
            return {"subscriptionId": FAKE_SUBSCRIPTION, "tenantId": FAKE_TENANT,
                    "clientId": "mock-deployer", "objectId": "mock-deployer-object"}
        if args.token == "azure-native:storage:listStorageAccountKeys":
            return {"keys": [
                {"keyName": "key1", "value": "mock-key-1==", "permissions": "FULL"},
                {"keyName": "key2", "value": "mock-key-2==", "permissions": "FULL"},
            ]}
        if args.token == "azure-native:network:getSubnet":
            a = args.args
            sid = (f"/subscriptions/{FAKE_SUBSCRIPTION}/resourceGroups/{a.get('resourceGroupName')}/providers/"
                   f"Microsoft.Network/virtualNetworks/{a.get('virtualNetworkName')}/subnets/{a.get('subnetName')}")
            found = next((v for k, v in self.subnets.items() if k.lower().endswith(sid.split("/resourceGroups/")[1]
                                                                                    .lower())), None)
            if found is None:  # a subnet set up as lorastack documents it
                found = {"serviceEndpoints": [{"service": "Microsoft.Storage"}],
                         "delegations": [{"name": "aca", "serviceName": "Microsoft.App/environments"}]}
            return {"id": sid, "name": a.get("subnetName"), **found}
        if args.token in EXISTING:  # brought resources, read with get functions
            a = args.args
            return EXISTING[args.token](a, self.existing.get(args.token, {}))
        if args.token == "azure-native:operationalinsights:getSharedKeys":
            return {"primarySharedKey": "mock-shared-key==", "secondarySharedKey": "mock-shared-key-2=="}
        return {}


class OptionsMonitor(pmocks.MockMonitor):
    """A mock monitor that also keeps the resource options mocks never see (protect, dependencies, parent),
    and refuses duplicate URNs as the engine would."""

    def __init__(self, mocks: pulumi.runtime.Mocks):
        super().__init__(mocks)
        self.options: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []

    def RegisterResource(self, request):
        resp = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            if resp.urn in self.options:
                raise ValueError(f"duplicate resource URN {resp.urn}")
            self.options[resp.urn] = {
                "protect": bool(request.protect),
                "ignore_changes": list(request.ignoreChanges),
                "after_create_hooks": list(request.hooks.after_create) if request.HasField("hooks") else [],
                "dependencies": list(request.dependencies),
                "parent": request.parent,
                "custom": bool(request.custom),
                "type": request.type,
                "name": request.name,
                "inputs": self.mocks.inputs.get((request.type, request.name), {}),
            }
            self.order.append(resp.urn)
        return resp


@dataclass
class Rendering:
    """What an offline render produced."""

    resources: list[RenderedResource]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    mocks: RecordingMocks

    def by_type(self, typ: str) -> list[RenderedResource]:
        """All resources of a type token (``azure-native:app:Job``), or ending with a short name (``Job``)."""
        return [r for r in self.resources if r.type == typ or r.type.endswith(":" + typ)]

    def one(self, typ: str) -> RenderedResource:
        found = self.by_type(typ)
        if len(found) != 1:
            raise AssertionError(f"expected one {typ}, found {len(found)}")
        return found[0]

    def named(self, name: str) -> RenderedResource:
        return next(r for r in self.resources if r.name == name)


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _single_worker_executor() -> None:
    # The SDK sends each registration to the loop's default thread pool. With mocks every call is a fast, pure-
    # Python function, so several threads only fight over the GIL: one worker makes a render 2-3x faster.
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastack-mocks")
    try:
        loop = asyncio.get_event_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    loop.set_default_executor(_EXECUTOR)


def install_mocks(project: str, stack: str, config: dict[str, str], secret_keys: list[str],
                  stack_outputs: dict[str, dict[str, Any]] | None = None,
                  subnets: dict[str, dict[str, Any]] | None = None,
                  existing: dict[str, dict[str, Any]] | None = None) -> OptionsMonitor:
    """Reset Pulumi's runtime state (root stack, config) and install fresh mocks for one render."""
    psettings.set_root_resource(None)
    pulumi.runtime.set_all_config(dict(config), list(secret_keys))
    _single_worker_executor()
    mocks = RecordingMocks(stack_outputs, subnets, existing)
    monitor = OptionsMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=False, monitor=monitor)
    return monitor


def run_and_settle(fn) -> Any:
    """Run ``fn`` under the installed mocks and wait for every registration and invoke to finish."""
    box: dict[str, Any] = {}

    @pulumi.runtime.test
    def _inner():
        box["result"] = fn()

    _inner()
    return box.get("result")


def render_config(project: str, stack: str, config: dict[str, str], secret_keys: list[str], program=None,
                  stack_outputs: dict[str, dict[str, Any]] | None = None,
                  subnets: dict[str, dict[str, Any]] | None = None,
                  existing: dict[str, dict[str, Any]] | None = None) -> Rendering:
    """Render ``program`` (default: provisioning.program.run) for ``stack`` with this config, offline.

    ``stack_outputs`` answers StackReferences (team stacks read the platform stack's outputs); ``subnets`` answers
    get_subnet for brought subnets (default: one set up as documented); ``existing`` overrides what the other get
    functions answer for brought resources (provisioning.offline.EXISTING)."""
    from provisioning import program as prog

    monitor = install_mocks(project, stack, config, secret_keys, stack_outputs, subnets, existing)
    values: dict[str, Any] = {}
    secret_outputs: set[str] = set()

    def program_then_outputs():
        # one settle: run the program, then resolve its exports (values and secretness) in the same event loop
        (program or prog.run)()
        exports = dict(getattr(psettings.get_root_resource(), "outputs", {}) or {})
        rows = [pulumi.Output.all(pulumi.Output.from_input(v), pulumi.Output.from_input(
                    pulumi.Output.from_input(v).is_secret())).apply(lambda vs, k=k: (k, vs[0], vs[1]))
                for k, v in exports.items()]
        return pulumi.Output.all(*rows).apply(
            lambda got: [(values.__setitem__(k, val), secret_outputs.add(k) if sec else None) for k, val, sec in got])

    # The SDK allocates many short-lived objects; cyclic GC passes during a render cost more than the render.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        run_and_settle(program_then_outputs)
    finally:
        if gc_was_enabled:
            gc.enable()

    resources = []
    for urn in monitor.order:
        opt = monitor.options[urn]
        secret_paths: set[str] = set()
        inputs = unwrap(opt["inputs"], "", secret_paths)
        resources.append(RenderedResource(
            type=opt["type"], name=opt["name"], urn=urn, inputs=inputs, secret_paths=secret_paths,
            custom=opt["custom"], protect=opt["protect"], dependencies=opt["dependencies"], parent=opt["parent"],
            ignore_changes=opt["ignore_changes"], after_create_hooks=opt["after_create_hooks"],
        ))
    outputs = {k: values[k] for k in sorted(values, key=list(values).index)}
    return Rendering(resources, outputs, secret_outputs, monitor.mocks)
