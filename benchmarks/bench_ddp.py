"""Training throughput: ``lorastack train`` in 1 process vs N processes (data-parallel, torchrun), side by side.

The same prepared run (same data, same global batch, same number of steps, so the same tokens) is trained
by 1 process with ``per_device_batch_size = B * N`` and by N processes with ``B`` each, in alternating
rounds; tokens/s = the run's trained tokens over the trainer's wall time (from status.json, written by
rank 0). Prints the N / 1 ratio. On CPU the processes share the cores (gloo), so the ratio shows the
overhead, not a speed-up; on a multi-GPU replica each process has its own GPU (NCCL).

    python benchmarks/bench_ddp.py                      # tiny model, 2 processes, CPU
    python benchmarks/bench_ddp.py --nproc 4 --model DIR --steps 30 --seq-len 2048   # a GPU replica
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "jobs" / "examples" / "plant-care-train.jsonl"


def prepare(root: Path, model: str, batch: int, steps: int, seq_len: int, quantize: bool) -> tuple[object, str]:
    from lorastack.store import Store
    from lorastack.trainer import prepare_run

    store = Store(root).init()
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "bench", "base_model": model, "training_file": str(TRAIN), "max_seq_len": seq_len,
        "quantization": {"load_in_4bit": quantize},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"max_steps": steps, "per_device_batch_size": batch, "learning_rate": 1e-3, "packing": True,
                     "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant", "save_every_minutes": 60},
    }))
    return store, prepare_run(store, job)


def train(store, run_id: str, nproc: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "lorastack", "train", "--store", str(store.root), "--run", run_id,
                          "--nproc", str(nproc)], env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
    status = json.loads((store.run_dir(run_id) / "status.json").read_text())
    m = status.get("metrics") or {}
    return {"runtime": m.get("train_runtime_s") or wall, "wall": wall, "mfu": m.get("mfu"),
            "loss": m.get("train_loss")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="per-process micro-batch B (1 process gets B * N)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", help="model directory (default: a tiny llama-style model built here)")
    ap.add_argument("--no-4bit", action="store_true")
    args = ap.parse_args()
    from lorastack.tinymodel import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    model = args.model or str(build_tiny_model(tmp / "model", hidden_size=256, num_layers=4))
    best: dict[int, dict] = {}
    for rnd in range(args.rounds):
        for n in ([1, args.nproc] if rnd % 2 == 0 else [args.nproc, 1]):
            store, run_id = prepare(tmp / f"r{rnd}-n{n}", model, args.batch * args.nproc // n, args.steps,
                                    args.seq_len, not args.no_4bit)
            r = train(store, run_id, n)
            print(f"round {rnd + 1}: {n} process(es): trainer {r['runtime']:.2f} s, wall {r['wall']:.1f} s, "
                  f"final loss {r['loss']}", flush=True)
            if n not in best or r["runtime"] < best[n]["runtime"]:
                best[n] = r
    one, many = best[1], best[args.nproc]
    # the same global batch and steps: the same tokens, so the throughput ratio is the inverse time ratio
    print(f"\nsame global batch ({args.batch * args.nproc} rows of <= {args.seq_len} tokens) x {args.steps} steps")
    print(f"{args.nproc} processes / 1 process tokens/s: {one['runtime'] / many['runtime']:.2f}x "
          f"(trainer time {many['runtime']:.2f} s vs {one['runtime']:.2f} s)")
    for n, r in sorted(best.items()):
        if r["mfu"] is not None:
            print(f"MFU with {n} process(es): {r['mfu']:.1%} of the GPU's peak (per GPU, 6N FLOPs/token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
