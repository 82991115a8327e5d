"""lorastack's Pulumi policy pack: `pulumi preview --stack <stack> --policy-pack policy`.

Only builds the PolicyPack (its constructor serves gRPC and blocks: never import this module in tests). The checks
are provisioning/policies.py, shared with the tests and `lorastack plan`.
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # provisioning/, if lorastack is not pip-installed in the pack's virtualenv

from pulumi_policy import EnforcementLevel, PolicyPack

from provisioning.guardrails import load_guardrails
from provisioning.policy_pack import stack_policies

PolicyPack(
    name="lorastack-guardrails",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=stack_policies(load_guardrails(REPO)),
)
