"""The guardrail policies: each one fails on the resource shape it exists to stop, passes on what the program
renders, and behaves the same through the pulumi-policy objects the policy pack serves."""

from __future__ import annotations

import copy

import pytest
from provisioning_helpers import settings_with

from provisioning import policies
from provisioning.guardrails import Guardrails
from provisioning.plan import to_policy_resources

G = Guardrails()


def rendered(offline, **changes):
    return to_policy_resources(offline.render(settings_with(**changes)).resources)


def mutate(resources, typ, fn, *, protect=None):
    """A copy of ``resources`` with ``fn(props)`` applied to every resource of type ``typ``."""
    out = []
    for r in resources:
        if r.type == typ:
            props = copy.deepcopy(dict(r.props))
            fn(props)
            r = policies.Resource(r.type, r.name, props, r.urn, r.protect if protect is None else protect,
                                  r.secret_paths)
        out.append(r)
    return out


def violations(resources, name):
    return [v.message for v in next(p for p in policies.POLICIES if p.name == name).evaluate(resources, G)]


def test_rendered_stack_passes_every_policy(offline):
    assert all(not v for v in policies.evaluate(rendered(offline), G).values())


@pytest.mark.parametrize("typ, change, policy, needle", [
    (policies.T_STORAGE, lambda p: p.pop("minimumTlsVersion"), "storage-hardening", "must be 'TLS1_2'"),
    (policies.T_STORAGE, lambda p: p.update(allowBlobPublicAccess=True), "storage-hardening", "allowBlobPublicAccess"),
    (policies.T_STORAGE, lambda p: p.update(enableHttpsTrafficOnly=False), "storage-hardening", "enableHttpsTrafficOnly"),
    (policies.T_FILES, lambda p: p["protocolSettings"]["smb"].update(channelEncryption="AES-256-GCM"),
     "storage-hardening", "ACA#852"),
    (policies.T_FILES, lambda p: p["protocolSettings"]["smb"].update(authenticationMethods="Kerberos"),
     "storage-hardening", "must include NTLMv2"),
    (policies.T_FILES, lambda p: p.pop("protocolSettings"), "storage-hardening", "SMB shares without SMB protocol"),
    (policies.T_FILES, lambda p: p.pop("shareDeleteRetentionPolicy"), "storage-hardening", "soft delete"),
    (policies.T_APP, lambda p: p["configuration"]["ingress"].update(allowInsecure=True), "no-anonymous-ingress",
     "allowInsecure must be false"),
    (policies.T_APP, lambda p: p["template"]["containers"][0].update(env=[]), "no-anonymous-ingress",
     "external ingress without an API key"),
    (policies.T_APP, lambda p: p["configuration"].update(secrets=[{"name": "api-keys", "value": "k"}]),
     "no-plain-secrets", "must be a Key Vault reference"),
    (policies.T_JOB, lambda p: p["template"]["containers"][0]["env"].append({"name": "HF_TOKEN", "value": "hf_x"}),
     "no-plain-secrets", "env var HF_TOKEN holds a literal value"),
    (policies.T_JOB, lambda p: p["configuration"].update(registries=[{"server": "a.azurecr.io", "username": "u",
                                                                      "passwordSecretRef": "pw"}]),
     "no-plain-secrets", "managed identity, not a password"),
    (policies.T_APP, lambda p: p["configuration"]["ingress"].update(ipSecurityRestrictions=[
        {"name": "a", "ipAddressRange": "10.0.0.0/8", "action": "Allow"},
        {"name": "b", "ipAddressRange": "10.1.0.0/16", "action": "Deny"}]), "no-anonymous-ingress", "one action"),
    (policies.T_ENV, lambda p: p["workloadProfiles"][1].update(minimumCount=0, maximumCount=1),
     "serverless-gpu-without-counts", "WorkloadProfilePropertyNotSupported"),
    (policies.T_ENV, lambda p: p.update(workloadProfiles=p["workloadProfiles"][1:]), "consumption-profile-present",
     "WorkloadProfileInUse"),
    (policies.T_ENV, lambda p: p["workloadProfiles"][0].update(name="consumption"), "consumption-profile-present",
     "exact name"),
])
def test_each_policy_catches_its_failure(offline, typ, change, policy, needle):
    bad = mutate(rendered(offline), typ, change)
    found = violations(bad, policy)
    assert any(needle in m for m in found), found


def test_plain_storage_key_and_log_analytics_key_are_caught(offline):
    base = rendered(offline)
    plain = [policies.Resource(r.type, r.name, r.props, r.urn, r.protect, frozenset())
             if r.type == policies.T_ENV_STORAGE else r for r in base]
    assert any("storage account key is sent in plain text" in m for m in violations(plain, "no-plain-secrets"))
    with_key = mutate(base, policies.T_ENV, lambda p: p.update(appLogsConfiguration={
        "destination": "log-analytics", "logAnalyticsConfiguration": {"customerId": "c", "sharedKey": "k"}}))
    assert any("Log Analytics shared key" in m for m in violations(with_key, "no-plain-secrets"))
    # the pack cannot see secretness (secret_paths=None): it does not guess
    unknown = [policies.Resource(r.type, r.name, r.props, r.urn, r.protect, None) for r in with_key]
    assert not [m for m in violations(unknown, "no-plain-secrets") if "shared key" in m]


def test_prod_requires_protection_retention_and_purge_protection(offline):
    prod_unprotected = rendered(offline, tier="prod")
    found = violations(prod_unprotected, "prod-data-protected")
    for kind in ("ResourceGroup", "StorageAccount", "FileShare", "ManagedEnvironment", "Vault"):
        assert any(m.startswith(f"{kind} must be protected in prod") for m in found), kind
    assert any("log retention 30 days is below the prod minimum of 90" in m for m in found)
    assert any("share soft delete 7 days" in m for m in found)
    ok = rendered(offline, tier="prod", protect=True, logs={"retentionDays": 90}, store={"softDeleteDays": 14})
    assert violations(ok, "prod-data-protected") == []
    no_purge = mutate(ok, policies.T_VAULT, lambda p: p["properties"].pop("enablePurgeProtection"))
    assert any("purge protection" in m for m in violations(no_purge, "prod-data-protected"))


def test_dev_need_not_be_protected(offline):
    assert violations(rendered(offline), "prod-data-protected") == []


TEAM = {"tier": "team", "hfToken": None, "inferenceApiKeys": None}


def team_rendered(offline, **changes):
    return to_policy_resources(offline.render(settings_with(**TEAM, **changes), secret_keys=[]).resources)


def test_self_service_limits(offline):
    team = team_rendered(offline)
    assert violations(team, "self-service-limits") == []

    def widen(p):
        p["location"] = "eastus"
        p["template"]["scale"]["maxReplicas"] = 5
        p["workloadProfileName"] = "nc24-a100"

    bad = mutate(mutate(team, policies.T_APP, widen), policies.T_JOB,
                 lambda p: p["configuration"].update(replicaTimeout=43200))
    found = violations(bad, "self-service-limits")
    assert any("location 'eastus' is not allowed for team stacks" in m for m in found)
    assert any("workload profile 'nc24-a100' is not allowed for team stacks" in m for m in found)
    assert any("maxReplicas 5 is above the team limit of 2" in m for m in found)
    assert any("replicaTimeout 43200 s is above the team limit" in m for m in found)
    # the same settings on a platform stack are not a team's business
    dev = mutate(rendered(offline), policies.T_APP, widen)
    assert violations(dev, "self-service-limits") == []


def test_policy_pack_objects_report_the_same_violations(offline):
    """Drive the StackValidationPolicy objects the pack serves (policy/__main__.py itself blocks on import)."""
    from pulumi_policy import PolicyCustomTimeouts, PolicyResource, PolicyResourceOptions, StackValidationArgs

    from provisioning.policy_pack import stack_policies

    bad = mutate(rendered(offline, tier="prod"), policies.T_APP,
                 lambda p: p["configuration"]["ingress"].update(allowInsecure=True))
    resources = [PolicyResource(r.type, r.props, r.urn, r.name,
                                PolicyResourceOptions(r.protect, [], None, [], PolicyCustomTimeouts(0, 0, 0), [], None),
                                None, None, [], {}) for r in bad]
    reported: dict[str, list[tuple[str, str]]] = {}
    for policy in stack_policies(G):
        policy.validate(StackValidationArgs(resources),
                        lambda msg, urn=None, name=policy.name: reported.setdefault(name, []).append((msg, urn)))
    assert set(reported) == {"no-anonymous-ingress", "prod-data-protected"}
    msg, urn = reported["no-anonymous-ingress"][0]
    assert "allowInsecure" in msg and urn.endswith("::inference-app")
