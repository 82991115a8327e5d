"""``lorastack demo``: the whole loop on one machine, no Azure.

Validate the sample dataset, fine-tune an adapter with the real QLoRA trainer, publish it to a local
store, then serve it with the real inference app. It uses a small real instruct model when a model hub
is reachable, otherwise a tiny model generated on this machine, and says which plainly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lorastack.store import Store, open_store

# A real instruct model small enough to fine-tune on a laptop CPU in minutes (135 M parameters).
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL_DIR = "lorastack-tiny-demo"
EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"
DEMO_SPEC = EXAMPLES / "plant-care.yaml"


def hub_reachable(model: str = HUB_MODEL, timeout: float = 5.0) -> bool:
    """True if the Hugging Face hub answers for ``model`` within ``timeout`` (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 (no network, DNS failure, proxy, hub error: all mean "use the tiny model")
        return False


def choose_base_model(store: Store, examples: Path) -> tuple[str, dict, str]:
    """(base model, spec overrides, a sentence for the user) for this machine."""
    if hub_reachable():
        overrides = {"training": {"max_steps": 30}, "max_seq_len": 512}
        return HUB_MODEL, overrides, f"using {HUB_MODEL}, a small real instruct model from the Hugging Face hub"
    from lorastack.tinymodel import build_tiny_model

    model_dir = store.models_dir / TINY_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        print("      building the tiny model (tokenizer + a short plain-text pre-training on the sample's words)")
        build_tiny_model(
            model_dir, arch="llama", extra_texts=_plain_texts(examples), hidden_size=128, pretrain_steps=200
        )
    # A tiny model has a lot to learn from LoRA alone: more steps and a higher learning rate than a real one.
    overrides = {"training": {"max_steps": 80, "learning_rate": 3e-3, "eval_steps": 40}, "max_seq_len": 512}
    why = (
        "no model hub is reachable from this machine, so the demo uses a TINY MODEL GENERATED HERE "
        f"({model_dir}): the pipeline is real (4-bit QLoRA, store, OpenAI API), but the answers are only "
        "as good as a 2-layer model pre-trained for seconds on the sample's sentences"
    )
    return str(model_dir), overrides, why


def _plain_texts(examples: Path) -> list[str]:
    """The user and assistant sentences of the sample data (no chat format: that is what LoRA teaches)."""
    import json

    return [
        m["content"]
        for f in sorted(examples.glob("*-train.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
        for m in json.loads(line)["messages"]
        if m["role"] in ("user", "assistant")
    ]


def demo_command(args: argparse.Namespace) -> int:
    """Validate -> fine-tune -> publish -> serve, printing how to call the served adapter."""
    from lorastack.data import format_report, validate_file
    from lorastack.trainer import TrainerError, prepare_run, run_training

    if not DEMO_SPEC.is_file():
        print(f"lorastack demo: sample job {DEMO_SPEC} not found; run the demo from a lorastack checkout", file=sys.stderr)
        return 2
    store = open_store(args.store).init()
    print(f"[1/4] store: {store.root}")

    base, overrides, why = choose_base_model(store, EXAMPLES)
    print(f"[2/4] base model: {why}")

    train_file = EXAMPLES / "plant-care-train.jsonl"
    report = validate_file(train_file)
    print(f"[3/4] validate {train_file.name}:")
    print("      " + format_report(report).replace("\n", "\n      "))
    if not report.ok:
        return 1

    print("[4/4] fine-tune (QLoRA, 4-bit NF4 base, assistant-only loss) and publish")
    try:
        run_id = prepare_run(store, DEMO_SPEC, {**overrides, "base_model": base})
    except TrainerError as exc:
        print(f"lorastack demo: {exc}", file=sys.stderr)
        return 1
    outcome = run_training(store, run_id, interactive=sys.stderr.isatty())
    if outcome.phase != "succeeded":
        print(f"lorastack demo: training ended {outcome.phase}; see {store.run_dir(run_id) / 'status.json'}", file=sys.stderr)
        return outcome.exit_code or 1
    adapter = outcome.adapter_ref
    print(f"      published adapter {adapter} in {store.adapters_dir}")
    promotion = outcome.promotion or {}
    if promotion.get("baseline_loss") is not None:
        print(f"      validation loss {promotion['candidate_loss']:.4f} vs {promotion['baseline_loss']:.4f} for "
              f"{promotion['baseline']}: {promotion['verdict']} (compare answers: "
              f"lorastack eval {adapter} --store {store.root})")
    if args.no_serve:
        return 0
    return _serve(store, base, adapter, args.port)


def _serve(store: Store, base: str, adapter: str, port: int) -> int:
    from lorastack.serve.auth import generate_key
    from lorastack.serve.server import create_app, run_server

    key = generate_key()
    name = adapter.split("@")[0]
    url = f"http://127.0.0.1:{port}"
    print(
        f"""
Serving {name} on {url} (Ctrl-C to stop)
  chat UI:    {url}/ui   (any user name; password = the API key)
  API key:    {key}   (generated for this run, shown once)

  curl {url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{name}", "temperature": 0, "messages": [{{"role": "user", "content": "How often should I water a snake plant?"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.chat.completions.create(model='{name}', temperature=0, messages=[{{'role': 'user', 'content': 'My fern has brown tips. Why?'}}]).choices[0].message.content)"
""",
        flush=True,
    )
    app = create_app(store, base, [key])
    run_server(app, "127.0.0.1", port)
    return 0
