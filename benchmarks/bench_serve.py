"""Serving throughput and latency: lorastack's batching engine vs the reference approach, side by side.

Reference approach (what the AI Toolkit's ``gradio_chat.py`` does, made correct): one thread per request
calls ``model.generate`` on the one shared model, streaming through a ``TextIteratorStreamer``; since
peft adapters are switched with global ``set_adapter`` / ``disable_adapter`` state, a lock serializes
"switch adapter + generate" (without it, concurrent requests get each other's adapter).

Ours: ``lorastack.serve.engine.Engine``: one scheduler thread, continuous batching, and requests for
different adapters sharing each decoding step through peft mixed batches (``adapter_names``).

Both run in this process on the same loaded model (4-bit NF4 unless --no-4bit), same prompts, same
adapter mix, greedy decoding, and each client sends its requests back to back. Output tokens/s is
total completion tokens over wall time; latency is per request, submit to last token. The two run in
alternating rounds and the best round of each is reported (other processes on a shared machine add
noise to both).

    python benchmarks/bench_serve.py                      # 1, 4 and 16 clients
    python benchmarks/bench_serve.py --clients 1,4 --requests 2 --max-tokens 8   # a quick run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "What is the weather like by the river today?",
    "How do I fine-tune a language model with LoRA adapters on a GPU?",
    "Please recommend a quiet place to read a book near the river.",
    "Azure Container Apps can run jobs and apps on serverless GPUs. Tell me more.",
]


def build(workdir: Path, hidden: int, layers: int, n_adapters: int, quantize: bool, rank: int = 16):
    """A tiny-but-larger model, ``n_adapters`` random LoRA adapters, all loaded into one PeftModel."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorastack.serve.engine import context_length, eos_token_ids, load_base_model
    from lorastack.tinymodel import build_tiny_model

    base = build_tiny_model(workdir / "base", hidden_size=hidden, num_layers=layers, vocab_size=2048)
    paths = []
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        pm = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=rank, target_modules="all-linear", init_lora_weights=False)
        )
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
        pm.save_pretrained(workdir / f"ad{i}")
        paths.append(workdir / f"ad{i}")
    model, tok, info = load_base_model(str(base), quantize=quantize)
    model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="ad0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"ad{i}")
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    return model, tok, info, eos_token_ids(model, tok), context_length(model, tok), n_params


def prompt_ids(tok, text: str) -> list[int]:
    from lorastack.chat import render_prompt

    return render_prompt(tok, [{"role": "user", "content": text}])


def run_reference(model, tok, jobs, clients: int, max_tokens: int):
    """Thread per request, shared model, lock around set_adapter + generate (streamed)."""
    import torch
    from transformers import TextIteratorStreamer

    lock = threading.Lock()
    lat, toks = [], []

    def one(adapter: str, ids: list[int]):
        t0 = time.perf_counter()
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out = {}

        def gen():
            with lock:
                x = torch.tensor([ids])
                kw = {"input_ids": x, "attention_mask": torch.ones_like(x), "max_new_tokens": max_tokens, "do_sample": False, "streamer": streamer}
                if adapter == "__base__":
                    with model.disable_adapter():
                        out["ids"] = model.generate(**kw)
                else:
                    model.set_adapter(adapter)
                    out["ids"] = model.generate(**kw)

        th = threading.Thread(target=gen)
        th.start()
        for _ in streamer:  # the client reads the stream
            pass
        th.join()
        lat.append(time.perf_counter() - t0)
        toks.append(out["ids"].shape[1] - len(ids))

    return _drive(jobs, clients, one, lat, toks)


def run_ours(model, tok, eos, ctx, jobs, clients: int, max_tokens: int, max_batch: int):
    from lorastack.serve.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine(lambda: model, tok, eos_ids=eos, max_context=ctx, max_batch_size=max_batch, max_queue=1024).start()
    lat, toks = [], []

    def one(adapter: str, ids: list[int]):
        t0 = time.perf_counter()
        done = threading.Event()
        res = {}

        def sink(ev):
            if ev.kind != "delta":
                res["ev"] = ev
                done.set()

        engine.submit(GenerationRequest(ids, adapter, SamplingParams(max_tokens=max_tokens, temperature=0), sink))
        done.wait()
        lat.append(time.perf_counter() - t0)
        toks.append(res["ev"].completion_tokens)

    try:
        return _drive(jobs, clients, one, lat, toks)
    finally:
        engine.stop()


def _drive(jobs, clients: int, one, lat, toks):
    per_client = [jobs[i::clients] for i in range(clients)]

    def client(my_jobs):
        for adapter, ids in my_jobs:
            one(adapter, ids)

    threads = [threading.Thread(target=client, args=(j,)) for j in per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat_sorted = sorted(lat)
    p95 = lat_sorted[min(len(lat_sorted) - 1, round(0.95 * (len(lat_sorted) - 1)))]
    return {"tok_s": sum(toks) / wall, "p50": statistics.median(lat), "p95": p95, "tokens": sum(toks), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    ap.add_argument("--requests", type=int, default=3, help="requests per client (at least 4 in total)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=3, help="adapters in the mix (plus the base model)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapters")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--no-4bit", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both approaches (default 1: on matrices this small, more threads only "
        "add synchronisation; measured faster for both)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per client count; best of each is shown")
    args = ap.parse_args(argv)
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, info, eos, ctx, n_params = build(Path(tmp), args.hidden, args.layers, args.adapters, not args.no_4bit, args.rank)
        names = ["__base__", *[f"ad{i}" for i in range(args.adapters)]]
        prompts = [prompt_ids(tok, p) for p in PROMPTS]
        print(
            f"model: tiny Llama hidden={args.hidden} layers={args.layers} params={n_params / 1e6:.1f}M "
            f"({'4-bit NF4' if info['quantized'] else info['dtype']}, {info['device']}), torch threads={torch.get_num_threads()}; "
            f"{args.adapters} adapters (r={args.rank}) + base, greedy, max_tokens={args.max_tokens}"
        )
        # warm up both paths once
        warm = [(names[0], prompts[0])]
        run_reference(model, tok, warm, 1, 4)
        run_ours(model, tok, eos, ctx, warm, 1, 4, args.max_batch)
        print(f"{'clients':>7} {'approach':<28} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'tokens':>7}")
        ratios = {}
        for c in [int(x) for x in args.clients.split(",")]:
            n = max(4, c * args.requests)
            jobs = [(names[i % len(names)], prompts[(i // len(names)) % len(prompts)]) for i in range(n)]
            refs, ourss = [], []
            for _ in range(args.rounds):  # alternate, so background load hits both alike
                refs.append(run_reference(model, tok, jobs, c, args.max_tokens))
                ourss.append(run_ours(model, tok, eos, ctx, jobs, c, args.max_tokens, args.max_batch))
            ref, ours = max(refs, key=lambda r: r["tok_s"]), max(ourss, key=lambda r: r["tok_s"])
            for label, r in (("reference (lock+generate)", ref), ("lorastack (batched engine)", ours)):
                print(f"{c:>7} {label:<28} {r['tok_s']:>8.1f} {r['p50']:>7.3f} {r['p95']:>7.3f} {r['tokens']:>7}")
            ratios[c] = ours["tok_s"] / ref["tok_s"]
            sys.stdout.flush()
        for c, r in ratios.items():
            print(f"ratio at {c} clients: lorastack / reference throughput = {r:.2f}x")
        top = max(ratios)
        print(f"ratio (throughput at {top} clients, lorastack / reference): {ratios[top]:.2f}x (target >= 3x at 16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
