"""``lorastack plan --stack NAME [--json]``: render a stack offline and check the guardrail policies.

Runs the real program (provisioning.program.run) with the real pulumi-azure-native classes under Pulumi's mocks:
no Pulumi CLI, no Azure credentials, a second or two. It shows what would be sent to the provider; it is NOT
``pulumi preview`` (nothing checked by Azure). With ``--against STATE.json`` (``pulumi stack export`` or ``pulumi
stack output --json`` of the live stack) it also reports the changes an up would make that Azure refuses or that break
a running workload (provisioning.changes). Exit codes: 0 all policies pass and nothing blocks, 1 a policy is violated
or a change blocks, 2 the stack file (or the state file) is invalid.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning import policies
from provisioning.guardrails import Guardrails, load_guardrails
from provisioning.outputs import ai_toolkit_configs
from provisioning.settings import SECRET_KEYS, SettingsError, parse_settings
from provisioning.stackfile import StackFile, StackFileError, load_stack

NOT_PREVIEW = ("offline render under Pulumi mocks: this is NOT `pulumi preview` (no Azure state, no diff, "
               "no provider-side validation); run `pulumi preview --stack {stack} --policy-pack policy` for that")
ROLE_NAMES = {"4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
              "7f951dda-4ed3-4680-a7ca-43fe172d538d": "AcrPull"}
_PLATFORM_CACHE: dict = {}


@dataclass
class PlanResult:
    """A rendered, policy-checked stack."""

    stack_file: StackFile
    resources: list[Any]  # offline.RenderedResource
    outputs: dict[str, Any]
    secret_outputs: set[str]
    verdicts: dict[str, list[policies.Violation]]
    notes: list[str] = field(default_factory=list)
    changes: list[Any] | None = None  # changes.Change list when planned --against a state
    against: str | None = None

    @property
    def ok(self) -> bool:
        from provisioning.changes import blocking

        return not any(self.verdicts.values()) and not blocking(self.changes or [])


def to_policy_resources(rendered) -> list[policies.Resource]:
    """Offline-rendered resources as the policies see them (custom resources only)."""
    return [policies.Resource(r.type, r.name, r.inputs, r.urn, r.protect, frozenset(r.secret_paths))
            for r in rendered if r.custom]


def plan_stack(stack: str, project_dir: Path | None = None, guardrails: Guardrails | None = None,
               against: Path | None = None) -> PlanResult:
    """Load, validate, render and policy-check ``stack``; with ``against`` (``pulumi stack export`` or ``pulumi stack
    output --json`` of the live stack), also plan the changes an up would make to it. Raises StackFileError /
    SettingsError (and changes.StateError for a bad state file)."""
    from provisioning.offline import render_config

    sf = load_stack(stack, project_dir, esc_secret_keys=SECRET_KEYS)
    g = guardrails or load_guardrails(sf.project_dir)
    # fail before rendering anything; the tier is the guardrails' word for this stack name
    settings = parse_settings(sf.raw(), sf.display_path, stack, sf.bare_secret_keys(), expected_tier=g.tier_for(stack))
    notes = [f"{k} is expected from ESC environment {', '.join(sf.environments)} (not checked offline)"
             for k in sf.from_environment]
    stack_outputs = {}
    if settings.tier == "team":
        ref = g.platform_reference()
        if ref is None or g.platform_stack == stack:
            raise StackFileError("stacks/guardrails.yaml: selfService.platformStack is missing; team stacks join the "
                                 "platform stack's environment")
        stack_outputs[ref] = platform_outputs(sf.project_dir, g)
        notes.append(f"joins the environment of platform stack {g.platform_stack!r} (StackReference {ref}; its "
                     "outputs come from its own offline render)")
    rendering = render_config(sf.project, stack, sf.config, sf.secret_keys, stack_outputs=stack_outputs)
    verdicts = policies.evaluate(to_policy_resources(rendering.resources), g)
    notes += reachability(settings)
    if any(PLACEHOLDER_DIGEST in getattr(settings.images, k) for k in ("trainer", "inference")):
        notes.append("images use the placeholder digest (sha256:000...): the image workflow proposes the real "
                     "digests in a pull request; `pulumi up` with the placeholder cannot pull")
    result = PlanResult(sf, rendering.resources, rendering.outputs, rendering.secret_outputs, verdicts, notes)
    if against is not None:
        from provisioning import changes

        try:
            data = json.loads(Path(against).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise changes.StateError(f"{against}: cannot read a JSON state: {e}") from None
        try:
            live = changes.read_state(data)
        except changes.StateError as e:
            raise changes.StateError(f"{against}: {e}") from None
        result.changes = changes.plan_changes(live, changes.desired_shape(rendering.resources),
                                              team_stacks_may_use=stack == g.platform_stack)
        result.against = str(against)
    return result


PLACEHOLDER_DIGEST = "@sha256:" + "0" * 64


def platform_outputs(project_dir: Path, g: Guardrails) -> dict[str, Any]:
    """The platform stack's outputs from its own offline render (what a team stack's StackReference reads); rendered
    once per platform stack file content."""
    from provisioning.stackfile import stack_path

    key = (str(project_dir), repr(g), stack_path(project_dir, g.platform_stack).read_text())
    if key not in _PLATFORM_CACHE:
        result = plan_stack(g.platform_stack, project_dir, g)
        if not result.ok:
            raise StackFileError(f"platform stack {g.platform_stack!r} does not pass its own plan; fix it first")
        _PLATFORM_CACHE[key] = result.outputs
    return _PLATFORM_CACHE[key]


def reachability(s) -> list[str]:
    """Who can reach the endpoint and the store, from the settings alone [rule storage-firewall]."""
    i, n = s.inference, s.network
    if i.ip_allow_list:
        ranges = ", ".join(f"{r.name} {r.cidr}" for r in i.ip_allow_list)
        endpoint = f"endpoint: public, admits only {ranges}; a laptop or CI runner elsewhere gets 403"
    else:
        endpoint = "endpoint: public (any laptop or CI runner; API key required on /v1)"
    if n is None:
        store = "store: public endpoint with the account key (any laptop or CI runner with Azure access)"
    else:
        ranges = ", ".join(f"{r.name} {r.cidr}" for r in n.client_cidrs)
        store = ("store: firewall denies all but the environment's subnet"
                 + (f" and {ranges}: `lorastack finetune`/`status` work from there only" if ranges else
                    ": `lorastack finetune`/`status` from a laptop or CI runner get 403 (add network.clientCidrs)"))
    if s.tier == "team":
        store = "store: public endpoint with the account key (team store)"
    return [endpoint, store]


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def key_settings(r) -> str:
    """The few inputs that matter for a resource, as one line."""
    g = r.get
    t = r.type.split(":")[-1]
    if t == "ResourceGroup":
        return f"{g('resourceGroupName')} in {g('location')}"
    if t == "StorageAccount":
        net = g("networkRuleSet.defaultAction") or "Allow"
        return (f"{g('accountName')} {g('kind')}/{g('sku.name')} tls={g('minimumTlsVersion')} "
                f"httpsOnly={g('enableHttpsTrafficOnly')} blobPublic={g('allowBlobPublicAccess')} "
                f"sharedKey={g('allowSharedKeyAccess')} network={net}")
    if t == "FileServiceProperties":
        smb = g("protocolSettings.smb") or {}
        return (f"smb={smb.get('versions', '-')} enc={smb.get('channelEncryption', '-')} "
                f"auth={smb.get('authenticationMethods', '-')} softDelete={_num(g('shareDeleteRetentionPolicy.days'))}d")
    if t == "FileShare":
        return f"{g('shareName')} {g('enabledProtocols')} quota={_num(g('shareQuota'))}GiB"
    if t == "Workspace":
        cap = g("workspaceCapping.dailyQuotaGb")
        return f"{g('workspaceName')} retention={_num(g('retentionInDays'))}d" + (f" cap={cap}GB/day" if cap else "")
    if t == "ManagedEnvironment":
        profs = []
        for p in g("workloadProfiles", []) or []:
            counts = (f"[{_num(p['minimumCount'])}..{_num(p['maximumCount'])}]"
                      if p.get("minimumCount") is not None or p.get("maximumCount") is not None else "")
            profs.append(f"{p.get('name')}={p.get('workloadProfileType')}{counts}")
        vnet = g("vnetConfiguration")
        net = f" vnet internal={vnet.get('internal')}" if vnet else ""
        return f"{g('environmentName')} profiles: {', '.join(profs)} logs={g('appLogsConfiguration.destination')}{net}"
    if t == "ManagedEnvironmentsStorage":
        props = g("properties") or {}
        kind = "azureFile" if "azureFile" in props else "nfsAzureFile"
        sec = "secret" if r.secret_paths else "plain"
        mode = (props.get(kind) or {}).get("accessMode")
        extra = f" accountKey={sec}" if kind == "azureFile" else ""
        return f"{g('storageName')} {kind} {mode}{extra}"
    if t in ("Job", "ContainerApp"):
        c = (g("template.containers") or [{}])[0]
        res = c.get("resources") or {}
        mount = ", ".join(m.get("mountPath", "") for m in c.get("volumeMounts") or [])
        base = (f"{g('jobName') or g('containerAppName')} profile={g('workloadProfileName')} "
                f"{_num(res.get('cpu'))}CPU/{res.get('memory')} image={c.get('image')} mount={mount} "
                f"identity={g('identity.type')}")
        if t == "Job":
            return (base + f" trigger={g('configuration.triggerType')} timeout={_num(g('configuration.replicaTimeout'))}s"
                    f" retries={_num(g('configuration.replicaRetryLimit'))}")
        ing = g("configuration.ingress") or {}
        startup = next((p for p in c.get("probes") or [] if p.get("type") == "Startup"), {})
        window = _num((startup.get("initialDelaySeconds") or 0) + (startup.get("periodSeconds") or 0)
                      * (startup.get("failureThreshold") or 0))
        ips = len(ing.get("ipSecurityRestrictions") or [])
        return (base + f" replicas={_num(g('template.scale.minReplicas'))}..{_num(g('template.scale.maxReplicas'))}"
                f" external={ing.get('external')} insecure={ing.get('allowInsecure')} ipRules={ips}"
                f" startupWindow={window}s")
    if t == "Vault":
        p = g("properties") or {}
        return (f"{g('vaultName')} rbac={p.get('enableRbacAuthorization')} purgeProtection="
                f"{p.get('enablePurgeProtection')} softDelete={_num(p.get('softDeleteRetentionInDays'))}d")
    if t == "Secret":
        return f"{g('secretName')} in {g('vaultName')} value=" + ("secret" if r.secret_paths else "PLAIN")
    if t == "RoleAssignment":
        guid = str(g("roleDefinitionId", "")).rsplit("/", 1)[-1]
        return f"{ROLE_NAMES.get(guid, guid)} on {str(g('scope', '')).rsplit('/', 1)[-1] or g('scope')}"
    if t == "UserAssignedIdentity":
        return str(g("resourceName"))
    if t == "DiagnosticSetting":
        return f"{g('name')}: allLogs + AllMetrics -> workspace"
    if t == "VirtualNetwork":
        return f"{g('virtualNetworkName')} {', '.join(g('addressSpace.addressPrefixes') or [])}"
    if t == "Subnet":
        dele = ", ".join(d.get("serviceName", "") for d in g("delegations") or [])
        return f"{g('subnetName')} {g('addressPrefix')} delegated to {dele}"
    if t == "ContainerAppsAuthConfig":
        return (f"Entra ID, unauthenticated={g('globalValidation.unauthenticatedClientAction')} "
                f"excluded={g('globalValidation.excludedPaths')}")
    return ""


def _component(r, by_urn) -> str:
    parent = by_urn.get(r.parent)
    return parent.name if parent is not None else "-"


COMPONENT_ORDER = ["-", "network", "platform", "store", "identity", "training", "inference"]


def _rows(p: PlanResult) -> list:
    """Custom resources in a stable order (registration order varies run to run)."""
    by_urn = {r.urn: r for r in p.resources}
    rows = [r for r in p.resources if r.custom]
    order = {c: i for i, c in enumerate(COMPONENT_ORDER)}
    return sorted(rows, key=lambda r: (order.get(_component(r, by_urn), 99), r.type, r.name))


def render_text(p: PlanResult) -> str:
    """The human-readable plan."""
    lines = [f"lorastack plan: stack {p.stack_file.stack!r} ({p.stack_file.display_path})",
             "NOTE: " + NOT_PREVIEW.format(stack=p.stack_file.stack), ""]
    by_urn = {r.urn: r for r in p.resources}
    rows = [(r.type.removeprefix("azure-native:"), _component(r, by_urn), r.name + (" [protected]" if r.protect else ""),
             key_settings(r)) for r in _rows(p)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(("TYPE", "COMPONENT", "NAME"))]
    lines.append(f"{'TYPE':<{widths[0]}}  {'COMPONENT':<{widths[1]}}  {'NAME':<{widths[2]}}  KEY SETTINGS")
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    lines += ["", f"{len(rows)} resources in {sum(1 for r in p.resources if not r.custom)} components", "",
              "Outputs (no secrets):"]
    for k, v in p.outputs.items():
        lines.append(f"  {k:<24} {'[secret]' if k in p.secret_outputs else v}")
    lines += ["", "Policies:"]
    for name, violations in p.verdicts.items():
        lines.append(f"  {'PASS' if not violations else 'FAIL'}  {name}")
        for v in violations:
            lines.append(f"        {v.resource}: {v.message}")
    for n in p.notes:
        lines.append(f"note: {n}")
    if p.changes is not None:
        lines += ["", f"Changes against {p.against} (what `pulumi up` would do to the live stack):"]
        lines += [f"  {c.line()}" for c in p.changes] or ["  nothing Azure refuses or that breaks a running workload"]
    failed = sum(1 for v in p.verdicts.values() if v)
    summary = f"{len(p.verdicts) - failed}/{len(p.verdicts)} policies pass"
    if p.changes is not None:
        from provisioning.changes import blocking

        summary += f", {len(blocking(p.changes))} blocking change(s)"
    lines += ["", f"{'OK' if p.ok else 'FAILED'}: {summary}"]
    return "\n".join(lines)


def render_json(p: PlanResult) -> str:
    """The plan as JSON (for CI and tooling)."""
    by_urn = {r.urn: r for r in p.resources}
    return json.dumps({
        "stack": p.stack_file.stack,
        "stackFile": p.stack_file.display_path,
        "pulumiPreview": False,
        "note": NOT_PREVIEW.format(stack=p.stack_file.stack),
        "resources": [{"type": r.type, "name": r.name, "component": _component(r, by_urn), "protect": r.protect,
                       "settings": key_settings(r)} for r in _rows(p)],
        "outputs": {k: ("[secret]" if k in p.secret_outputs else v) for k, v in p.outputs.items()},
        # what `pulumi up` would let you write into the AI Toolkit's infra/*.config.json (values are offline mocks)
        "aiToolkit": ai_toolkit_configs({k: v for k, v in p.outputs.items() if k not in p.secret_outputs}),
        "policies": [{"name": k, "passed": not v, "violations": [{"resource": x.resource, "message": x.message}
                                                                 for x in v]} for k, v in p.verdicts.items()],
        "notes": p.notes,
        "changes": None if p.changes is None else [
            {"severity": c.severity, "rule": c.rule, "resource": c.resource, "message": c.message, "fix": c.fix}
            for c in p.changes],
        "ok": p.ok,
    }, indent=2, default=str)


def plan_command(args) -> int:
    """CLI handler for ``lorastack plan``."""
    from provisioning.changes import StateError

    project_dir = Path(args.project_dir) if getattr(args, "project_dir", None) else None
    against = Path(args.against) if getattr(args, "against", None) else None
    try:
        result = plan_stack(args.stack, project_dir, against=against)
    except (StackFileError, SettingsError, StateError) as e:
        if args.json:
            print(json.dumps({"stack": args.stack, "ok": False, "configErrors": str(e).splitlines()}, indent=2))
        else:
            print(f"lorastack plan: stack {args.stack!r} has configuration errors:", file=sys.stderr)
            print(str(e), file=sys.stderr)
        return 2
    print(render_json(result) if args.json else render_text(result))
    return 0 if result.ok else 1
