"""The model card (``README.md``) published with every adapter version, instead of peft's empty template.

It says what the adapter is (base model + revision, the data by sha256 and size, the resolved spec), how it
did (cumulative training metrics, the promotion verdict, the evaluation table), and how to load it with
peft and with vLLM. Plain values in, Markdown out; standard library only.
"""

from __future__ import annotations

import json
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_model_card(
    name: str,
    manifest: dict[str, Any],
    datasets: dict[str, dict[str, Any]],
    evaluation: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Markdown for ``adapters/<name>/<version>/README.md`` (the version is not known yet: it is the run's)."""
    base, rev = manifest.get("base_model"), manifest.get("base_revision") or "(local directory)"
    metrics = manifest.get("metrics") or {}
    promotion = manifest.get("promotion") or {}
    spec = manifest.get("spec") or {}
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lora, qlora, lorastack]",
        "---",
        "",
        f"# {name}",
        "",
        (
            f"A LoRA adapter for **{base}** (revision `{rev}`), fine-tuned with QLoRA by lorastack "
            f"(run `{manifest.get('run_id')}`)."
        ),
    ]
    if spec.get("description"):
        lines += ["", str(spec["description"])]
    lines += ["", "## Data", "", "| role | sha256 | examples | bytes |", "|---|---|---|---|"]
    for role, facts in datasets.items():
        lines.append(f"| {role} | `{facts.get('sha256')}` | {_fmt(facts.get('examples'))} | {_fmt(facts.get('bytes'))} |")
    if manifest.get("holdout"):
        h = manifest["holdout"]
        lines += ["", (f"No validation file was given: {h.get('examples')} of {h.get('of')} training examples were "
                       f"held out (seed {h.get('seed')}) from `{h.get('from_sha256')}`.")]
    if manifest.get("system_prompt"):
        lines += ["", f"System prompt of the training data: \"{manifest['system_prompt']}\""]
    lines += ["", "## Training (all attempts together)", "", "| metric | value |", "|---|---|"]
    for key in ("steps", "trained_tokens", "train_runtime_s", "first_loss", "last_loss", "eval_loss", "attempts"):
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics.get(key))} |")
    if promotion:
        lines += ["", f"Promotion: policy `{promotion.get('policy')}`, verdict **{promotion.get('verdict')}**"
                  + (f" (eval loss {_fmt(promotion.get('candidate_loss'))} vs {_fmt(promotion.get('baseline_loss'))} "
                     f"for {promotion.get('baseline')})" if promotion.get("baseline") else "") + "."]
    if evaluation:
        keys = ("loss", "perplexity", "token_accuracy", "examples", "tokens")
        labels = list(evaluation)
        lines += ["", "## Evaluation (validation data, assistant tokens only)", "",
                  "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(_fmt(evaluation[lbl].get(key)) for lbl in labels) + " |")
    lines += [
        "",
        "## Use it",
        "",
        "With peft (the base model loaded as in training, 4-bit NF4 or 16-bit):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}", revision="{manifest.get("base_revision") or "main"}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")  # carries the chat template',
        "```",
        "",
        "With vLLM (OpenAI-compatible server; the adapter is the `model` of a request):",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --max-lora-rank {(spec.get('lora') or {}).get('r', 16)} \\",
        f"    --lora-modules {name}=path/to/this/directory",
        "```",
        "",
        "Or with lorastack: `lorastack serve --local --store STORE` serves every promoted adapter.",
        "",
        "## Spec",
        "",
        "```json",
        json.dumps(spec, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
