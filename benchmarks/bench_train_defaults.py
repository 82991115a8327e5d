"""The trainer's fast-path defaults, measured side by side through the real trainer on this machine.

The same chat examples (the repo's plant-care sample and ../shared/datasets), the same tiny Phi-3-style model
(lorastack.tinymodel), one epoch, through ``lorastack.trainer.build_sft_trainer`` exactly as ``lorastack train``
runs it. The baseline is the trainer's old defaults (fp32 compute, gradient checkpointing on, packed rows of
max_seq_len). Each fast-path knob is flipped alone, then ``auto``: what ``trainer.choose_fast_path`` picks for
this device (the spec's default). Rounds alternate order; the best round of each setting is kept; every line
prints its ratio to the baseline. Run once with the 4-bit base (QLoRA, the default) and once with a 16-bit
base (``--no-4bit``): the dtype rule differs between them.

Metric: trained tokens/s = real example tokens (no padding) / wall time of ``trainer.train()``.

    python benchmarks/bench_train_defaults.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/bench_train_defaults.py --quick         # one round, fewer examples (the CI test)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(spec, model_dir: Path, rows: list[dict], work: Path) -> float:
    """Trained tokens/s of one epoch with this (fully resolved) RunSpec."""
    from transformers import AutoTokenizer

    from lorastack.store import Store
    from lorastack.trainer import build_sft_trainer, load_base_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    model, _ = load_base_model(spec, Store(work))
    trainer = build_sft_trainer(spec, model, tok, rows, None, work / "out")
    t0 = time.perf_counter()
    trainer.train()
    return sum(len(r["input_ids"]) for r in rows) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=96)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2, help="per_device_batch_size (rows of max_seq_len)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-4bit", action="store_true", help="a 16-bit base (LoRA, not QLoRA)")
    ap.add_argument("--quick", action="store_true", help="1 round, 24 examples, a smaller model")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.max_examples, args.hidden, args.layers = 1, 24, 128, 2

    import transformers
    from bench_train import load_conversations
    from transformers import AutoTokenizer

    from lorastack.chat import encode_chat
    from lorastack.spec import RunSpec
    from lorastack.tinymodel import build_tiny_model
    from lorastack.trainer import choose_fast_path, describe_fast_path

    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    model_dir = work / "model"
    build_tiny_model(model_dir, arch="phi3", hidden_size=args.hidden, num_layers=args.layers,
                     max_positions=args.max_seq_len)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for messages in load_conversations(args.max_examples):
        enc = encode_chat(tok, messages, args.max_seq_len)
        if not enc.final_answer_cut and any(enc.assistant_mask):
            rows.append({"input_ids": enc.input_ids, "labels": enc.labels()})
    longest = max(len(r["input_ids"]) for r in rows)

    base_doc = {
        "name": "bench-defaults", "base_model": str(model_dir), "training_file": "unused.jsonl",
        "max_seq_len": args.max_seq_len,
        "quantization": {"load_in_4bit": not args.no_4bit},
        "training": {"epochs": 1.0, "per_device_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "logging_steps": 1000, "seed": 42},
    }
    auto_spec, record = choose_fast_path(RunSpec.model_validate(base_doc), transformers.AutoConfig.from_pretrained(
        model_dir), longest)

    def resolved(dtype: str, gc: bool, row: int | str) -> RunSpec:
        spec, _ = choose_fast_path(RunSpec.model_validate({
            **base_doc,
            "quantization": {**base_doc["quantization"], "compute_dtype": dtype},
            "training": {**base_doc["training"], "packing": True, "gradient_checkpointing": gc, "row_len": row},
        }), None, longest)
        return spec

    auto_row = record["row_len"]
    settings = {
        f"old defaults: float32, checkpointing on, rows of {args.max_seq_len}": resolved("float32", True, "auto"),
        "bfloat16 compute": resolved("bfloat16", True, "auto"),
        "checkpointing off": resolved("float32", False, "auto"),
        f"rows of {auto_row}": resolved("float32", True, auto_row),
        "auto: " + describe_fast_path(record).split(" (")[0].removeprefix("fast path: "): auto_spec,
    }
    # The dtype rule is the closest call on CPU: also run auto with the other dtype.
    other = "bfloat16" if record["compute_dtype"] == "float32" else "float32"
    settings[f"auto, but {other}"] = resolved(other, record["gradient_checkpointing"], auto_row)
    best: dict[str, float] = {}
    for rnd in range(args.rounds):
        names = list(settings) if rnd % 2 == 0 else list(reversed(settings))
        for name in names:
            tps = measure(settings[name], model_dir, rows, work)
            best[name] = max(best.get(name, 0.0), tps)
            print(f"round {rnd + 1}: {name}: {tps:,.0f} tok/s", flush=True)
    base = best[next(iter(settings))]
    print(f"\n{'16-bit' if args.no_4bit else '4-bit NF4'} base, hidden {args.hidden}, {args.layers} layers; "
          f"{len(rows)} examples (longest {longest} tokens), max_seq_len {args.max_seq_len}, "
          f"batch {args.batch_size}; best of {args.rounds} round(s)")
    for name, tps in best.items():
        print(f"  {name:78s} {tps:8,.0f} tok/s  {tps / base:5.2f}x")
    auto_name = next(n for n in settings if n.startswith("auto: "))
    print(f"auto vs old defaults: {best[auto_name] / base:.2f}x; auto vs auto with {other}: "
          f"{best[auto_name] / best[f'auto, but {other}']:.2f}x")
    print("choose_fast_path says: " + "; ".join(record["reasons"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
