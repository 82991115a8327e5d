"""Plans of changes: what a ``pulumi up`` of the rendered stack would do to the live one that Azure refuses or that
breaks a running workload (``lorastack plan --stack X --against STATE.json``). Pure, no Pulumi import.

The live side is the stack's exported state (``pulumi stack export``: output-shaped properties) or its last outputs
(``pulumi stack output --json``); the desired side is the offline render (input-shaped properties). Both are reduced
to a :class:`StackShape` and compared by :func:`plan_changes`, which is table-tested.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from provisioning import gpu, naming
from provisioning.rules import cite

T_ENV = "azure-native:app:ManagedEnvironment"
T_APP = "azure-native:app:ContainerApp"
T_JOB = "azure-native:app:Job"
T_LINK = "azure-native:app:ManagedEnvironmentsStorage"
T_ACCOUNT = "azure-native:storage:StorageAccount"
T_SHARE = "azure-native:storage:FileShare"

REFUSED = "refused"  # Azure refuses the update (the up fails half way)
BREAKS = "breaks"  # Azure accepts it, a running workload breaks
NOTE = "note"  # safe, but worth saying


class StateError(ValueError):
    """The --against file is neither an exported state nor stack outputs."""


@dataclass(frozen=True)
class StackShape:
    """The parts of a stack a change can break, from either side."""

    environment: Mapping[str, Any] | None = None  # name, location, subnet, internal (None: not owned by this stack)
    profiles: Mapping[str, str] = field(default_factory=dict)  # workload profile name -> type
    workloads: Mapping[str, str] | None = field(default_factory=dict)  # app/job name -> profile (None: unknown)
    links: tuple[str, ...] = ()  # environment storage names (store-k1, store-ro-k1)
    store: Mapping[str, Any] | None = None  # account, kind, sku, location, share, protocol


@dataclass(frozen=True)
class Change:
    """One thing the up would do."""

    severity: str  # refused | breaks | note
    rule: str
    resource: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.severity.upper():<8} {self.resource}: {self.message} {cite(self.rule)}" + (
            f"\n         fix: {self.fix}" if self.fix else "")


def _loc(v: Any) -> str | None:
    return None if v is None else str(v).replace(" ", "").lower()


def _id(v: Any) -> str | None:
    # compare ARM IDs without the subscription (offline renders use a fake one) and case-insensitively, as ARM does
    if not v:
        return None
    s = str(v).lower()
    return s.split("/resourcegroups/", 1)[-1] if s.startswith("/subscriptions/") else s


def _get(d: Mapping[str, Any] | None, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _shape(resources: Sequence[tuple[str, Mapping[str, Any]]]) -> StackShape:
    """A StackShape from (type, properties) pairs; properties may be input- or output-shaped."""
    env = next((p for t, p in resources if t == T_ENV), None)
    environment, profiles = None, {}
    if env is not None:
        environment = {"name": env.get("environmentName") or env.get("name"), "location": _loc(env.get("location")),
                       "subnet": _id(_get(env, "vnetConfiguration.infrastructureSubnetId")),
                       "internal": bool(_get(env, "vnetConfiguration.internal"))}
        profiles = {p.get("name"): p.get("workloadProfileType") for p in env.get("workloadProfiles") or []}
    workloads = {}
    for t, p in resources:
        if t in (T_APP, T_JOB):
            workloads[str(p.get("containerAppName") or p.get("jobName") or p.get("name"))] = p.get("workloadProfileName")
    links = tuple(sorted(str(p.get("storageName") or p.get("name")) for t, p in resources if t == T_LINK))
    acct = next((p for t, p in resources if t == T_ACCOUNT), None)
    share = next((p for t, p in resources if t == T_SHARE), None)
    store = None
    if acct is not None:
        store = {"account": acct.get("accountName") or acct.get("name"), "kind": acct.get("kind"),
                 "sku": _get(acct, "sku.name"), "location": _loc(acct.get("location")),
                 "share": (share or {}).get("shareName") or (share or {}).get("name"),
                 "protocol": (share or {}).get("enabledProtocols") or "SMB"}
    return StackShape(environment, profiles, workloads, links, store)


def desired_shape(rendered: Sequence[Any]) -> StackShape:
    """The StackShape of an offline render (provisioning.offline.RenderedResource list)."""
    return _shape([(r.type, r.inputs) for r in rendered if r.custom])


def read_state(data: Mapping[str, Any]) -> StackShape:
    """The live StackShape from ``pulumi stack export`` (``{"version": 3, "deployment": {"resources": [...]}}``) or
    from ``pulumi stack output --json`` (the stack's outputs). Raises StateError on anything else."""
    if isinstance(data, Mapping) and isinstance(data.get("deployment"), Mapping):
        rows = []
        for r in data["deployment"].get("resources") or []:
            props = {**(r.get("inputs") or {}), **(r.get("outputs") or {})}  # outputs win: what Azure holds
            rows.append((_base_type(str(r.get("type", ""))), props))
        return _shape(rows)
    if isinstance(data, Mapping) and "environmentName" in data:
        profiles = {p.get("name"): p.get("type") for p in data.get("workloadProfiles") or []}
        links = tuple(sorted(x for x in (data.get("environmentStorageName"),) if x))
        return StackShape(
            environment={"name": data.get("environmentName"), "location": _loc(data.get("location")),
                         "subnet": None, "internal": False} if profiles else None,
            profiles=profiles,
            workloads=None,  # outputs do not say which profile each app and job runs on
            links=links,
            store={"account": data.get("storageAccountName"), "kind": None, "sku": None,
                   "location": _loc(data.get("location")), "share": data.get("fileShareName"), "protocol": None},
        )
    raise StateError("expected `pulumi stack export` (a JSON object with \"deployment\") or `pulumi stack output "
                     "--json` (a JSON object with \"environmentName\")")


def _base_type(t: str) -> str:
    # azure-native exports may carry an API-version module (azure-native:app/v20250202preview:ManagedEnvironment)
    if t.startswith("azure-native:") and "/" in t.split(":")[1]:
        mod = t.split(":")[1].split("/")[0]
        return f"azure-native:{mod}:{t.split(':')[-1]}"
    return t


def _generation(link: str) -> int | None:
    tail = link.rsplit("-k", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def plan_changes(live: StackShape, desired: StackShape, team_stacks_may_use: bool = False) -> list[Change]:
    """What the up from ``live`` to ``desired`` would break (empty: nothing known).

    ``team_stacks_may_use``: this stack's environment hosts team stacks (the platform stack), so a profile may be in
    use by workloads this state does not show.
    """
    out: list[Change] = []
    le, de = live.environment, desired.environment
    if le is not None and de is not None:
        env = str(le.get("name"))
        for key, what in (("name", "name"), ("location", "location"), ("subnet", "infrastructure subnet"),
                          ("internal", "internal flag")):
            if le.get(key) != de.get(key) and not (key == "subnet" and de.get(key) is None and le.get(key) is None):
                out.append(Change(REFUSED, "environment-replace", env, (
                    f"changing the environment's {what} ({le.get(key)!r} -> {de.get(key)!r}) replaces it, deleting "
                    "its apps, jobs and storages (and team stacks' workloads in it)"),
                    f"keep {what} {le.get(key)!r}; a new environment is a new stack"))
        out += _profile_changes(env, live, desired, team_stacks_may_use)
    if live.store is not None and desired.store is not None:
        ls, ds = live.store, desired.store
        acct = str(ls.get("account"))
        for key, what in (("account", "account name"), ("kind", "account kind"), ("sku", "SKU"),
                          ("location", "location"), ("share", "share name"), ("protocol", "share protocol")):
            if ls.get(key) is not None and ls.get(key) != ds.get(key):
                out.append(Change(REFUSED, "store-replace", acct, (
                    f"changing the store's {what} ({ls.get(key)!r} -> {ds.get(key)!r}) replaces it: every adapter, "
                    "run and cached model on the share is lost"),
                    f"keep {what} {ls.get(key)!r}; move data to a new store with azcopy first if you must"))
    out += _key_changes(live.links, desired.links)
    return out


def _profile_changes(env: str, live: StackShape, desired: StackShape, team_stacks_may_use: bool) -> list[Change]:
    out: list[Change] = []
    removed = {n: t for n, t in live.profiles.items() if n not in desired.profiles}
    added = {n: t for n, t in desired.profiles.items() if n not in live.profiles}
    moves = {w: (live.workloads or {}).get(w) for w, p in (desired.workloads or {}).items()
             if live.workloads and w in live.workloads and live.workloads[w] != p}
    for name, ptype in sorted(removed.items()):
        users = sorted(w for w, p in (live.workloads or {}).items() if p == name)
        keep = f"add {ptype} to lorastack:extraGpuProfiles for this up"
        if users:
            out.append(Change(REFUSED, "profile-in-use", env, (
                f"the up removes workload profile {name!r} ({ptype}) while {', '.join(users)} runs on it: the "
                "environment is updated first and ARM answers WorkloadProfileInUse"),
                f"{keep} (the apps move to their new profile while {name!r} stays), then remove it in a second up"))
        elif live.workloads is None or team_stacks_may_use:
            who = "team stacks may run on it" if team_stacks_may_use else "the outputs do not say what runs on it"
            out.append(Change(REFUSED, "profile-in-use", env, (
                f"the up removes workload profile {name!r} ({ptype}) and {who}; if anything does, ARM answers "
                "WorkloadProfileInUse"),
                f"{keep}; remove it once `lorastack plan --against` of every stack on it shows none uses it "
                "(use an exported state: `pulumi stack export`)"))
    for name, ptype in sorted(added.items()):
        prof = gpu.GPU_PROFILES.get(ptype)
        if prof is not None and not prof.serverless:
            out.append(Change(REFUSED, "dedicated-at-creation", env, (
                f"the up adds dedicated GPU profile {name!r} ({ptype}) to an existing environment; GPU dedicated "
                "profiles must exist when the environment is created"),
                "use a serverless GPU profile (Consumption-GPU-NC24-A100), or create the dedicated profile in a new "
                "stack's environment"))
    for workload, old in sorted(moves.items()):
        new = (desired.workloads or {})[workload]
        kept = old in desired.profiles
        out.append(Change(NOTE, "profile-in-use", workload, (
            f"moves from workload profile {old!r} to {new!r}; the environment gets {new!r} first (the app depends "
            f"on it), and {old!r} " + ("is kept for this up" if kept else "is removed")),
            f"remove {desired.profiles.get(old, old)} from lorastack:extraGpuProfiles in a second up once nothing "
            f"runs on {old!r}" if kept else ""))
    return out


def _key_changes(live_links: Sequence[str], desired_links: Sequence[str]) -> list[Change]:
    out: list[Change] = []
    lg = {g for g in (_generation(x) for x in live_links) if g is not None}
    dg = {g for g in (_generation(x) for x in desired_links) if g is not None}
    if not lg or not dg or lg == dg:
        return out
    old, new = max(lg), max(dg)
    old_key, new_key = naming.storage_key_index(old) + 1, naming.storage_key_index(new) + 1
    if old_key == new_key:
        out.append(Change(BREAKS, "storage-rekey", f"store-k{new}", (
            f"key generation {old} -> {new} uses key{new_key} again, the key the running links store-k{old} use: "
            f"regenerating it for the rotation breaks the running job and app (cifs permission denied)"),
            f"bump keyGeneration by one ({old + 1}): it uses the idle key{naming.storage_key_index(old + 1) + 1}"))
    else:
        out.append(Change(NOTE, "storage-rekey", f"store-k{new}", (
            f"key rotation: new links store-k{new} use key{new_key}; regenerate key{new_key} BEFORE this up "
            f"(az storage account keys renew --key key{new_key}); store-k{old} keeps key{old_key} until it is "
            "removed by this up")))
    return out


def blocking(changes: Sequence[Change]) -> list[Change]:
    """The changes that must stop the up."""
    return [c for c in changes if c.severity in (REFUSED, BREAKS)]
