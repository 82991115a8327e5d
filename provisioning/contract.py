"""What the provisioned Job and App promise the images (and what the images promise back). Pure constants.

The trainer image's entrypoint runs ``lorastack train --store $LORASTACK_STORE``; the Job keeps that entrypoint and
starts executions without a template override (an override replaces the whole container template). Such an
execution claims the oldest run that ``lorastack finetune`` queued on the store (``--run next``); LORASTACK_RUN_ID or
``--run <id>`` pin a run instead. The
inference image runs ``lorastack serve --store <mount> --host 0.0.0.0 --port 8000``, reads API keys from
LORASTACK_API_KEYS (comma-separated) and the Hugging Face token from HF_TOKEN, and answers /healthz (process alive)
and /readyz (model loaded) on port 8000. Both see the store at /mnt/store; the Hugging Face hub cache is the
store's models/ directory (HF_HUB_CACHE), which the trainer fills and the app reads offline.
"""

from __future__ import annotations

STORE_MOUNT_PATH = "/mnt/store"
# Both images run as this non-root user (images/*/Dockerfile: USER 10001:10001).
IMAGE_UID = 10001
STORE_VOLUME = "store"
# The HF cache lives on the share: a replica's ephemeral disk is only 8 GiB, which a base model does not fit.
HF_HOME = f"{STORE_MOUNT_PATH}/models"
HF_HUB_CACHE = f"{STORE_MOUNT_PATH}/models"  # models--org--name/ directly under models/ (store.models_dir)
# datasets' Arrow cache: on the share too, set explicitly (the image's HF_HOME may point at local disk)
HF_DATASETS_CACHE = f"{STORE_MOUNT_PATH}/models/datasets"
ENV_STORE = "LORASTACK_STORE"
ENV_RUN_ID = "LORASTACK_RUN_ID"
INFERENCE_PORT = 8000
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"

# ACA secret names (per app/job) and the env vars that reference them.
SECRET_HF_TOKEN = "hf-token"
SECRET_API_KEYS = "api-keys"
ENV_HF_TOKEN = "HF_TOKEN"
ENV_API_KEYS = "LORASTACK_API_KEYS"
# The base model the inference app serves (default of `serve --base-model/--base-revision`), from the stack settings
# inference.baseModel / inference.baseRevision, so the app starts with an empty store.
ENV_BASE_MODEL = "LORASTACK_BASE_MODEL"
ENV_BASE_REVISION = "LORASTACK_BASE_REVISION"
# The app sits behind ACA's ingress (one proxy): the client address for per-client auth throttling is the last
# X-Forwarded-For hop, not the ingress's own address (else every client shares one failure budget).
ENV_PROXY_HOPS = "LORASTACK_PROXY_HOPS"
INGRESS_PROXY_HOPS = 1
# The inference app's engine (lorastack.serve.launch and `lorastack serve` read it) and vLLM's sizing, set from the
# stack's profile by provisioning.engine_plan.
ENV_ENGINE = "LORASTACK_ENGINE"

def inference_command(easy_auth: bool = False) -> tuple[list[str], list[str]]:
    """(command, args) of the inference container; with Easy Auth in front, the UI trusts its sign-in headers.

    The command is the image's launcher (lorastack.serve.launch): it execs ``lorastack serve`` from the environment
    of the engine LORASTACK_ENGINE names (/opt/lorastack for builtin, /opt/vllm for vllm)."""
    args = ["serve", "--store", STORE_MOUNT_PATH, "--host", "0.0.0.0", "--port", str(INFERENCE_PORT)]
    return ["python", "-m", "lorastack.serve.launch"], args + (["--trust-easy-auth"] if easy_auth else [])


def store_mount_options(storage_type: str) -> str | None:
    """SMB mount options: the images' non-root user owns the share's files (an SMB mount is root-owned by default,
    and the trainer could not write checkpoints); ``nobrl`` so byte-range lock users (the HF cache's file locks,
    SQLite) do not stall on the share [rule smb-nobrl]."""
    if storage_type != "AzureFile":
        return None
    return f"uid={IMAGE_UID},gid={IMAGE_UID},mfsymlinks,nobrl"
