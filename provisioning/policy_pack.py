"""The guardrail policies as pulumi-policy StackValidationPolicy objects (used by policy/__main__.py).

Kept out of policy/__main__.py so tests can drive them: constructing the PolicyPack itself serves gRPC and blocks.
"""

from __future__ import annotations

from pulumi_policy import StackValidationPolicy

from provisioning.guardrails import Guardrails
from provisioning.policies import POLICIES, Policy, Resource


def as_resource(r) -> Resource:
    """A pulumi-policy PolicyResource as the shared policy functions see it.

    Secretness is not visible to a policy pack (secret_paths=None): those checks run in ``lorastack plan``.
    """
    return Resource(r.resource_type, r.name, r.props, r.urn, bool(r.opts.protect), None)


def _validator(policy: Policy, guardrails: Guardrails):
    def validate(args, report_violation):
        resources = [as_resource(r) for r in args.resources]
        urns = {r.name: r.urn for r in resources}
        for v in policy.evaluate(resources, guardrails):
            report_violation(v.message, urns.get(v.resource))
    return validate


def stack_policies(guardrails: Guardrails) -> list[StackValidationPolicy]:
    """One StackValidationPolicy per shared policy."""
    return [StackValidationPolicy(name=p.name, description=p.description, validate=_validator(p, guardrails))
            for p in POLICIES]
