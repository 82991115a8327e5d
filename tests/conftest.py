"""Shared fixtures: tiny real models built offline once per test session, and the sample datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub; from_pretrained must resolve local directories only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# Others' sample data (Azure fine-tuning format): read in place, never copied into the repo.
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.fail(f"sample datasets not found at {SHARED_DATASETS} (CI lays shared/ beside the repo)")
    return SHARED_DATASETS


def _tiny(tmp_path_factory, arch: str) -> Path:
    from lorastack.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama-style causal LM + tokenizer with a Llama-3-style chat template."""
    return _tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """A tiny Phi-3-style causal LM + tokenizer with a Phi-3-style chat template."""
    return _tiny(tmp_path_factory, "phi3")


@pytest.fixture
def store(tmp_path):
    from lorastack.store import Store

    return Store(tmp_path / "store").init()


# --- provisioning (issue 2) --------------------------------------------------------------------------------------
# `offline`: renders the Pulumi program under Pulumi's mocks (defined in tests/provisioning_helpers.py, which
# imports pulumi only when a test renders).
from provisioning_helpers import offline  # noqa: F401
