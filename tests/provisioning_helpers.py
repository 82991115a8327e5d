"""Test utilities for the provisioning tests: render the real program under Pulumi mocks from a fixture.

Each render resets Pulumi's root resource and config (provisioning.offline.install_mocks) and runs with
preview=False, so assertions on inputs and outputs always execute.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from provisioning.settings import PROJECT

if TYPE_CHECKING:  # pulumi is imported only by tests that render (conftest imports this module)
    from provisioning.offline import Rendering

REPO = Path(__file__).resolve().parents[1]

# A minimal valid dev-like stack (bare keys, decoded values), for component tests that vary one setting.
BASE: dict[str, Any] = {
    "location": "westus3",
    "tier": "dev",
    "images": {"trainer": f"acme.azurecr.io/lorastack-trainer@sha256:{'a' * 64}",
               "inference": f"acme.azurecr.io/lorastack-inference@sha256:{'b' * 64}"},
    "training": {"gpuProfile": "Consumption-GPU-NC24-A100", "replicaTimeoutSeconds": 14400},
    "inference": {"gpuProfile": "Consumption-GPU-NC8as-T4", "maxReplicas": 2},
    "hfToken": "hf_test_token_value",
    "inferenceApiKeys": "key-one,key-two",
}
SECRETS = ["hfToken", "inferenceApiKeys"]
PLATFORM_REF = "lorastack/lorastack/platform"  # stacks/guardrails.yaml: pulumiOrg + selfService.platformStack


def settings_with(**changes: Any) -> dict[str, Any]:
    """BASE with top-level keys replaced or (for dicts) merged; a value of None removes the key."""
    raw = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        elif isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    return raw


# Renders are deterministic; identical settings are rendered once per session to keep the suite fast.
_CACHE: dict[str, Rendering] = {}


class Offline:
    """Renders the real program offline."""

    def render(self, raw: dict[str, Any], stack: str | None = None, secret_keys: list[str] | None = None,
               subnets: dict | None = None, existing: dict | None = None) -> Rendering:
        """Render ``raw`` as stack ``stack`` (default: the stack the guardrails give ``raw``'s tier: dev, staging or
        prod; ``unit`` for tier team, which joins the repo's platform stack)."""
        keys = SECRETS if secret_keys is None else secret_keys
        if stack is None:
            stack = raw.get("tier") if raw.get("tier") in ("dev", "staging", "prod") else "unit"
        cache_key = json.dumps([raw, stack, sorted(keys), subnets, existing], sort_keys=True)
        if cache_key not in _CACHE:
            from provisioning.offline import render_config

            config = {f"{PROJECT}:{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in raw.items()}
            outputs = {PLATFORM_REF: self.render_stack("platform").outputs} if raw.get("tier") == "team" else None
            _CACHE[cache_key] = render_config(PROJECT, stack, config, [f"{PROJECT}:{k}" for k in keys if k in raw],
                                              stack_outputs=outputs, subnets=subnets, existing=existing)
        return _CACHE[cache_key]

    def render_stack(self, stack: str) -> Rendering:
        """Render the repo's stack file ``stack`` (once per session)."""
        from provisioning.offline import render_config
        from provisioning.stackfile import load_stack

        key = f"stack:{stack}"
        if key not in _CACHE:
            sf = load_stack(stack, REPO, esc_secret_keys=tuple(SECRETS))
            _CACHE[key] = render_config(sf.project, stack, sf.config, sf.secret_keys)
        return _CACHE[key]


_PLANS: dict = {}


def planned(stack: str):
    """provisioning.plan.plan_stack(stack) of the repo's stack file, once per session (renders are deterministic)."""
    from provisioning.plan import plan_stack

    if stack not in _PLANS:
        _PLANS[stack] = plan_stack(stack, REPO)
    return _PLANS[stack]


@pytest.fixture
def offline():
    """An Offline renderer; Pulumi's global state (root stack, config) is reset before and after each test."""
    import pulumi
    from pulumi.runtime import settings as psettings

    psettings.set_root_resource(None)
    pulumi.runtime.set_all_config({}, [])
    yield Offline()
    psettings.set_root_resource(None)
    pulumi.runtime.set_all_config({}, [])
