"""The inference app's serving engine (issue 12 item 3): ``inference.engine`` and ``inference.vllm`` in the stack
file become LORASTACK_ENGINE and vLLM's sizing on the app, derived from the GPU profile.

Pure, table-driven tests of provisioning.engine_plan; the settings' errors (file and key named); and the app's
container env as sent to the provider (the real pulumi-azure-native classes under Pulumi's mocks).
"""

from __future__ import annotations

import re

import pytest
from provisioning_helpers import SECRETS, settings_with

from provisioning import engine_plan, gpu
from provisioning.settings import SettingsError, parse_settings

T4, A100, NC48 = "Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100", "NC48-A100"


# --- the plan (pure) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile, concurrent, expected", [
    # T4 14.6 GiB: 1 - 2/14.6 = 0.863 -> 0.86; at most 2 adapter slots on its 16 GB
    (T4, 4, {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION": "0.86",
             "LORASTACK_VLLM_MAX_LORAS": "2", "LORASTACK_VLLM_MAX_LORA_RANK": "64"}),
    # A100 79.2 GiB: 0.974, capped at 0.95; slots follow concurrentRequests up to 8
    (A100, 4, {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION": "0.95",
               "LORASTACK_VLLM_MAX_LORAS": "4", "LORASTACK_VLLM_MAX_LORA_RANK": "64"}),
    (A100, 20, {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION": "0.95",
                "LORASTACK_VLLM_MAX_LORAS": "8", "LORASTACK_VLLM_MAX_LORA_RANK": "64"}),
    (T4, 1, {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION": "0.86",
             "LORASTACK_VLLM_MAX_LORAS": "1", "LORASTACK_VLLM_MAX_LORA_RANK": "64"}),
    # a multi-GPU dedicated profile: vLLM serves on one of its A100s
    (NC48, 6, {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION": "0.95",
               "LORASTACK_VLLM_MAX_LORAS": "6", "LORASTACK_VLLM_MAX_LORA_RANK": "64"}),
])
def test_auto_is_vllm_sized_from_the_gpu_profile(profile, concurrent, expected):
    plan = engine_plan.plan_engine(profile, "auto", concurrent_requests=concurrent)
    assert plan.engine == "vllm" and plan.env == expected


def test_every_gpu_profile_has_its_memory_and_slot_cap():
    """A new profile in provisioning.gpu must be sized here too; the memory agrees with the profile's GPU model."""
    assert set(engine_plan.GPU_MEMORY_GIB) == set(gpu.GPU_PROFILES) == set(engine_plan.MAX_LORAS_CAP)
    for ptype, profile in gpu.GPU_PROFILES.items():
        nominal_gb = int(re.search(r"(\d+)GB", profile.gpu_model).group(1))
        # CUDA reports GiB; a "16GB" T4 shows 14.6 GiB, an "80GB" A100 79.2 GiB
        assert 0.9 * nominal_gb <= engine_plan.GPU_MEMORY_GIB[ptype] <= nominal_gb, ptype
        util = engine_plan.gpu_memory_utilization(ptype)
        assert 0.5 <= util <= engine_plan.MAX_GPU_MEMORY_UTILIZATION
        # the headroom left outside vLLM's budget is at least HEADROOM_GIB
        assert (1 - util) * engine_plan.GPU_MEMORY_GIB[ptype] >= engine_plan.HEADROOM_GIB - 1e-9


def test_explicit_values_win_and_builtin_sets_only_the_engine():
    plan = engine_plan.plan_engine(T4, "vllm", concurrent_requests=4, max_loras=3, max_lora_rank=128,
                                   gpu_memory_util=0.8, quantization="bitsandbytes")
    assert plan.env == {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_GPU_MEMORY_UTILIZATION": "0.80",
                        "LORASTACK_VLLM_MAX_LORAS": "3", "LORASTACK_VLLM_MAX_LORA_RANK": "128",
                        "LORASTACK_VLLM_QUANTIZATION": "bitsandbytes"}
    assert engine_plan.plan_engine(A100, "builtin").env == {"LORASTACK_ENGINE": "builtin"}


def test_plan_refuses_values_vllm_does_not_take():
    with pytest.raises(ValueError, match=r"48 is not a rank vLLM accepts; allowed: 1, 8, 16, 32, 64"):
        engine_plan.plan_engine(T4, "vllm", max_lora_rank=48)
    with pytest.raises(ValueError, match=r"'tgi' is not an engine; allowed: auto, builtin, vllm"):
        engine_plan.plan_engine(T4, "tgi")


def test_the_planned_values_are_what_the_vllm_engine_reads(monkeypatch):
    """The env the app gets gives serve/vllm_engine.engine_settings exactly the planned sizes (no rounding away)."""
    from lorastack.serve.vllm_engine import engine_settings

    for name, value in engine_plan.plan_engine(T4, "auto", concurrent_requests=4).env.items():
        monkeypatch.setenv(name, value)
    s = engine_settings("m", revision=None, download_dir=None, max_context=4096, max_batch_size=16,
                        max_loaded_adapters=8, on_gpu=True)
    assert (s["gpu_memory_utilization"], s["max_loras"], s["max_lora_rank"]) == (0.86, 2, 64)


# --- the stack file --------------------------------------------------------------------------------------------
def _errors(raw) -> str:
    with pytest.raises(SettingsError) as e:
        parse_settings(raw, "stacks/Pulumi.unit.yaml", "unit", SECRETS)
    return str(e.value)


def test_engine_defaults_to_auto_and_accepts_vllm_sizing():
    s = parse_settings(settings_with(), "stacks/Pulumi.unit.yaml", "unit", SECRETS)
    assert s.inference.engine == "auto" and s.inference.vllm is None
    s = parse_settings(settings_with(inference={"engine": "vllm", "vllm": {
        "maxLoras": 3, "maxLoraRank": 32, "gpuMemoryUtilization": 0.8, "quantization": "bitsandbytes"}}),
        "stacks/Pulumi.unit.yaml", "unit", SECRETS)
    assert (s.inference.vllm.max_loras, s.inference.vllm.max_lora_rank) == (3, 32)


@pytest.mark.parametrize("inference, needle", [
    ({"engine": "tgi"}, "stacks/Pulumi.unit.yaml: lorastack:inference.engine: 'tgi' is not allowed"),
    ({"vllm": {"maxLoraRank": 48}},
     "lorastack:inference.vllm.maxLoraRank: 48 is not a rank vLLM accepts; allowed: 1, 8, 16, 32, 64, 128"),
    ({"vllm": {"gpuMemoryUtilization": 1.2}}, "lorastack:inference.vllm.gpuMemoryUtilization: 1.2 is not allowed"),
    ({"vllm": {"maxLoras": 0}}, "lorastack:inference.vllm.maxLoras: 0 is not allowed"),
    ({"vllm": {"quantization": "awq"}}, "lorastack:inference.vllm.quantization: 'awq' is not allowed"),
    ({"vllm": {"maxLora": 2}}, "lorastack:inference.vllm.maxLora: unknown key; allowed: maxLoras, maxLoraRank"),
    ({"engine": "builtin", "vllm": {"maxLoras": 2}},
     "lorastack:inference.vllm: is set, but inference.engine is 'builtin', which does not read it"),
])
def test_bad_engine_settings_name_the_key(inference, needle):
    assert needle in _errors(settings_with(inference=inference))


# --- the app (Pulumi mocks) ------------------------------------------------------------------------------------
def _app_env(r) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in r.one("ContainerApp").get("template.containers")[0]["env"]}


def test_t4_app_serves_with_vllm_sized_for_16gb_through_the_launcher(offline):
    r = offline.render(settings_with())  # inference on the T4 profile, engine auto
    env = _app_env(r)
    assert env["LORASTACK_ENGINE"] == "vllm"
    assert (env["LORASTACK_VLLM_GPU_MEMORY_UTILIZATION"], env["LORASTACK_VLLM_MAX_LORAS"],
            env["LORASTACK_VLLM_MAX_LORA_RANK"]) == ("0.86", "2", "64")
    assert "LORASTACK_VLLM_QUANTIZATION" not in env
    c = r.one("ContainerApp").get("template.containers")[0]
    # the App's command is the image's launcher, which execs the engine's environment
    assert c["command"] == ["python", "-m", "lorastack.serve.launch"] and c["args"][0] == "serve"


def test_a100_app_and_stack_overrides(offline):
    env = _app_env(offline.render(settings_with(inference={"gpuProfile": A100, "concurrentRequests": 12})))
    assert (env["LORASTACK_ENGINE"], env["LORASTACK_VLLM_GPU_MEMORY_UTILIZATION"],
            env["LORASTACK_VLLM_MAX_LORAS"]) == ("vllm", "0.95", "8")
    env = _app_env(offline.render(settings_with(inference={"vllm": {
        "maxLoras": 1, "maxLoraRank": 16, "gpuMemoryUtilization": 0.7, "quantization": "bitsandbytes"}})))
    assert (env["LORASTACK_VLLM_MAX_LORAS"], env["LORASTACK_VLLM_MAX_LORA_RANK"],
            env["LORASTACK_VLLM_GPU_MEMORY_UTILIZATION"], env["LORASTACK_VLLM_QUANTIZATION"]) == (
        "1", "16", "0.70", "bitsandbytes")


def test_builtin_engine_app_gets_no_vllm_settings(offline):
    env = _app_env(offline.render(settings_with(inference={"engine": "builtin"})))
    assert env["LORASTACK_ENGINE"] == "builtin"
    assert not [k for k in env if k.startswith("LORASTACK_VLLM_")]
