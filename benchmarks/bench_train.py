"""Training throughput: lorastack's trainer vs the AI Toolkit / Olive reference configuration.

Both configurations train the same Phi-3-style model (random weights, real architecture, built offline
with lorastack.tinymodel) on the same chat examples, on this machine, in one run, one epoch each, with
the same 4-bit NF4 base, LoRA rank, optimizer, micro-batch size, sequence length and gradient
checkpointing. They differ only in what the reference does differently:

  reference (AI Toolkit Phi-3 olive-config.json, Olive QLoRA pass):
    * plain-text template "### user: ... ### assistant: ..." (not the model's chat template)
    * every example padded to max_seq_len (pad_to_max_len)
    * loss on every non-pad token (prompt included)
    * LoRA on o_proj and qkv_proj only
  ours (lorastack.trainer, as `lorastack finetune` runs it):
    * the model's own chat template, loss on assistant tokens only (end-of-turn included)
    * best-fit-decreasing packing, padding-free (position_ids, no cross-example attention)
    * LoRA on all linear layers

Metric: **trained tokens/s** = tokens of real example data (not padding) that go through the forward
and backward pass, divided by the wall time of the training loop (model loading excluded). Also wall
time for the epoch and peak memory (process max RSS; on CUDA also peak allocated GPU memory). Each
configuration runs in its own subprocess, so peak memory is per configuration.

    python benchmarks/bench_train.py                 # default size
    python benchmarks/bench_train.py --repeat 1 --max-examples 24 --max-seq-len 512   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = [
    REPO / "jobs" / "examples" / "plant-care-train.jsonl",
    REPO.parent / "shared" / "datasets" / "travel-finetune.jsonl",  # others' samples: read in place
    REPO.parent / "shared" / "datasets" / "travel-finetune-hotel.jsonl",
]


def load_conversations(max_examples: int | None) -> list[list[dict]]:
    convs = []
    for path in DATA_FILES:
        if path.is_file():
            with open(path, encoding="utf-8-sig") as fh:
                convs += [json.loads(line)["messages"] for line in fh if line.strip()]
    if not convs:
        raise SystemExit(f"no data found in {[str(p) for p in DATA_FILES]}")
    return convs[:max_examples] if max_examples else convs


def reference_text(messages: list[dict]) -> str:
    """The reference's plain-text template (Olive text_template style), not the model's chat template."""
    return "".join(f"### {m['role']}:\n{m['content']}\n" for m in messages)


def run_one(
    config: str,
    model_dir: str,
    workdir: str,
    repeat: int,
    max_examples: int | None,
    max_seq_len: int,
    batch_size: int,
) -> dict:
    """Train one configuration for one epoch in this process; return its measurements."""
    import torch
    from transformers import AutoTokenizer

    from lorastack.chat import encode_chat
    from lorastack.spec import RunSpec
    from lorastack.store import Store
    from lorastack.trainer import build_sft_trainer, load_base_model

    convs = load_conversations(max_examples) * repeat
    tok = AutoTokenizer.from_pretrained(model_dir)
    if config == "ours":
        rows = []
        for messages in convs:
            enc = encode_chat(tok, messages, max_seq_len)
            if not enc.final_answer_cut and any(enc.assistant_mask):
                rows.append({"input_ids": enc.input_ids, "labels": enc.labels()})
        real_tokens = sum(len(r["input_ids"]) for r in rows)
        packing, targets = True, "all-linear"
    else:
        rows, real_tokens = [], 0
        for messages in convs:
            ids = tok(
                reference_text(messages), add_special_tokens=False, truncation=True, max_length=max_seq_len
            )["input_ids"]
            real_tokens += len(ids)
            pad = max_seq_len - len(ids)
            # pad_to_max_len; labels = input_ids with only the padding masked (loss on all tokens)
            rows.append({"input_ids": ids + [tok.pad_token_id] * pad, "labels": ids + [-100] * pad})
        packing, targets = False, ["o_proj", "qkv_proj"]
    loss_tokens = sum(sum(1 for t in r["labels"] if t != -100) for r in rows)
    spec = RunSpec.model_validate(
        {
            "name": f"bench-{config}",
            "base_model": model_dir,
            "training_file": "unused.jsonl",
            "max_seq_len": max_seq_len,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": targets},
            "quantization": {"compute_dtype": "float32" if not torch.cuda.is_available() else "auto"},
            "training": {
                "epochs": 1.0,
                "max_steps": -1,
                "learning_rate": 2e-4,
                "per_device_batch_size": batch_size,
                "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
                "packing": packing,
                "row_len": max_seq_len,
                "gradient_checkpointing": True,
                "logging_steps": 1000,
                "seed": 42,
            },
        }
    )
    model, _ = load_base_model(spec, Store(workdir))
    trainer = build_sft_trainer(spec, model, tok, rows, None, Path(workdir) / config)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    result = {
        "config": config,
        "examples": len(rows),
        "steps": trainer.state.global_step,
        "real_tokens": real_tokens,
        "processed_tokens": trainer.trained_tokens if packing else len(rows) * max_seq_len,
        "loss_tokens": loss_tokens,
        "wall_s": wall,
        "trained_tokens_per_s": real_tokens / wall,
        "train_loss": out.training_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _run_child(config: str, model_dir: str, work: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        config,
        "--model-dir",
        model_dir,
        "--workdir",
        work,
        "--repeat",
        str(args.repeat),
        "--max-seq-len",
        str(args.max_seq_len),
        "--batch-size",
        str(args.batch_size),
    ]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.max_examples:
        cmd += ["--max-examples", str(args.max_examples)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{config} run failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repeat", type=int, default=3, help="passes over the sample data in the epoch (default 3)"
    )
    p.add_argument("--max-examples", type=int, default=None, help="use at most this many sample examples")
    p.add_argument("--max-seq-len", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--batch-size", type=int, default=2, help="micro-batch size, rows per step (default 2)")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size (default 256)")
    p.add_argument("--layers", type=int, default=4, help="model layers (default 4)")
    p.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; best of each is reported (default 2)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per run (default 1: stable timings on a shared machine; 0 = torch's default)",
    )
    p.add_argument("--model-dir", help="use this model instead of building a tiny Phi-3-style one")
    p.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.child:
        res = run_one(
            args.child,
            args.model_dir,
            args.workdir,
            args.repeat,
            args.max_examples,
            args.max_seq_len,
            args.batch_size,
        )
        print("RESULT " + json.dumps(res))
        return 0

    with tempfile.TemporaryDirectory(prefix="lorastack-bench-") as work:
        model_dir = args.model_dir
        if not model_dir:
            from lorastack.tinymodel import build_tiny_model

            texts = [m["content"] for conv in load_conversations(None) for m in conv]
            model_dir = str(
                build_tiny_model(
                    Path(work) / "phi3",
                    arch="phi3",
                    extra_texts=texts,
                    vocab_size=2048,
                    hidden_size=args.hidden,
                    num_layers=args.layers,
                    max_positions=max(2048, args.max_seq_len),
                )
            )
        results: dict[str, dict] = {}
        # Alternate the order each round and keep each configuration's best round: on a shared machine
        # this cancels slow drift in background load rather than favouring whichever ran first.
        for rnd in range(args.rounds):
            order = ("reference", "ours") if rnd % 2 == 0 else ("ours", "reference")
            for config in order:
                res = _run_child(config, model_dir, work, args)
                print(
                    f"round {rnd + 1} {config}: {res['trained_tokens_per_s']:,.0f} trained tok/s, "
                    f"{res['wall_s']:.2f} s",
                    file=sys.stderr,
                )
                best = results.get(config)
                if best is None or res["trained_tokens_per_s"] > best["trained_tokens_per_s"]:
                    results[config] = res

    ref, ours = results["reference"], results["ours"]
    print(
        f"model: Phi-3-style, hidden {args.hidden}, {args.layers} layers, NF4 4-bit + LoRA r16; "
        f"max_seq_len {args.max_seq_len}; micro-batch {args.batch_size}; device {ours['device']}; "
        f"{args.threads or 'default'} CPU thread(s); best of {args.rounds} alternating round(s)"
    )
    print(
        "trained tokens = real (non-pad) example tokens through forward+backward; tokens/s over the "
        "training loop's wall time"
    )
    header = (
        f"{'config':<11}{'examples':>9}{'steps':>7}{'real tok':>10}{'processed':>11}{'loss tok':>10}"
        f"{'wall s':>9}{'trained tok/s':>15}{'peak RSS MB':>13}"
    )
    print(header)
    for r in (ref, ours):
        print(
            f"{r['config']:<11}{r['examples']:>9}{r['steps']:>7}{r['real_tokens']:>10}{r['processed_tokens']:>11}"
            f"{r['loss_tokens']:>10}{r['wall_s']:>9.2f}{r['trained_tokens_per_s']:>15,.0f}{r['peak_rss_mb']:>13,.0f}"
            + (f"  peak GPU {r['peak_gpu_mb']:,.0f} MB" if "peak_gpu_mb" in r else "")
        )
    ratio = ours["trained_tokens_per_s"] / ref["trained_tokens_per_s"]
    print(
        f"ratio ours/reference: trained tokens/s {ratio:.2f}x, epoch wall time "
        f"{ref['wall_s'] / ours['wall_s']:.2f}x faster, peak RSS {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
