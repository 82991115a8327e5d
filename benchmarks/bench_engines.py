"""Serving engines side by side over HTTP: lorastack's built-in engine vs vLLM behind the same lorastack API.

Both are real ``lorastack serve`` processes on 127.0.0.1 (the built-in one in this venv with --no-4bit; the
vLLM one from .venv-vllm, fp32 on CPU), on the same model, the same store and the same prompts, driven by
the official ``openai`` client with N concurrent clients (greedy, fixed output length). The servers run one
at a time in alternating rounds; the best round of each is kept (a shared machine adds noise to both).
Prints output tokens/s, p95 request latency, and the vLLM / built-in ratio per client count, for the base
model and for one LoRA adapter.

llama.cpp's server and ``transformers serve`` are not included: llama.cpp has no wheel on PyPI (it builds
from source), and ``transformers serve`` needs a newer transformers than the ``ml`` extra pins.

    python benchmarks/bench_engines.py                          # 1, 4, 16 clients
    python benchmarks/bench_engines.py --clients 1,4 --rounds 1 --max-tokens 16   # quick
    python benchmarks/bench_engines.py --model DIR --dtype bfloat16   # a real model (e.g. on a GPU)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key"
PROMPTS = [
    "What is the weather like by the river today?",
    "How do I fine-tune a language model with LoRA adapters on a GPU?",
    "Please recommend a quiet place to read a book near the river.",
    "Azure Container Apps can run jobs and apps on serverless GPUs. Tell me more.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, python: str, store: Path, model: str, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "LORASTACK_API_KEYS": KEY,
           "LORASTACK_VLLM_DTYPE": dtype, "LORASTACK_VLLM_MAX_LORA_RANK": "8", "VLLM_CPU_KVCACHE_SPACE": "2",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [python, "-m", "lorastack", "serve", "--engine", engine, "--store", str(store), "--base-model", model,
           "--port", str(port), "--max-batch-size", "16"]
    if engine == "builtin":
        cmd.append("--no-4bit")
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{engine} server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{engine} server not ready:\n{log.read_text()[-3000:]}")


def drive(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(output tokens/s, p95 latency s) for ``clients`` clients sending ``requests`` requests each."""
    from openai import OpenAI

    def one_client(i: int) -> list[tuple[float, int]]:
        c = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
        out = []
        for j in range(requests):
            t0 = time.monotonic()
            r = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0,
            )
            out.append((time.monotonic() - t0, r.usage.completion_tokens))
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(one_client, range(clients)) for x in xs]
    wall = time.monotonic() - t0
    lat = sorted(r[0] for r in results)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    return sum(r[1] for r in results) / wall, p95


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", help="model directory (default: a tiny llama-style model built here)")
    ap.add_argument("--dtype", default="float32", help="vLLM dtype (the built-in engine serves the model's)")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = ap.parse_args()
    if not Path(args.vllm_python).is_file():
        print(f"no vLLM environment at {args.vllm_python}: run `make vllm-env`", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "tests"))
    from test_serve import publish

    from lorastack.store import Store
    from lorastack.tinymodel import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    model = args.model or str(build_tiny_model(tmp / "model", hidden_size=256, num_layers=4))
    store = Store(tmp / "store").init()
    publish(store, "alpha", Path(model), tmp, seed=1)
    clients = [int(c) for c in args.clients.split(",")]
    best: dict[tuple[str, str, int], tuple[float, float]] = {}
    engines = {"builtin": sys.executable, "vllm": args.vllm_python}
    for rnd in range(args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
        for engine in order:
            proc, url = start(engine, engines[engine], store.root, model, args.dtype, tmp / f"{engine}.log")
            try:
                for target in (model, "alpha"):
                    drive(url, target, 1, 1, 4)  # warm-up (the adapter's first load is not timed)
                    for n in clients:
                        tps, p95 = drive(url, target, n, args.requests, args.max_tokens)
                        key = (engine, "base" if target == model else "adapter", n)
                        if key not in best or tps > best[key][0]:
                            best[key] = (tps, p95)
                        print(f"round {rnd + 1} {engine:7s} {key[1]:7s} {n:3d} clients: {tps:8.1f} tok/s "
                              f"p95 {p95:6.2f} s", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(f"\nbest of {args.rounds} rounds, {args.max_tokens} output tokens, greedy; ratio = vLLM / built-in")
    print(f"{'model':8s} {'clients':>7s} {'built-in tok/s':>15s} {'vLLM tok/s':>11s} {'ratio':>6s} "
          f"{'p95 built-in':>13s} {'p95 vLLM':>9s}")
    for kind in ("base", "adapter"):
        for n in clients:
            b, v = best[("builtin", kind, n)], best[("vllm", kind, n)]
            print(f"{kind:8s} {n:7d} {b[0]:15.1f} {v[0]:11.1f} {v[0] / b[0]:5.2f}x {b[1]:12.2f}s {v[1]:8.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
