"""Serving engines side by side over HTTP: lorastack's built-in engine vs vLLM, `transformers serve` and llama.cpp.

Every engine is a real server process on 127.0.0.1 serving the same model (a tiny llama-style model built here,
fp32), driven by the official ``openai`` client with N concurrent clients, the same prompts, greedy decoding and
the same ``max_tokens``:

- ``builtin``: ``lorastack serve --engine builtin --no-4bit`` in this venv;
- ``vllm``: ``lorastack serve --engine vllm`` from the vLLM CPU venv (``make vllm-env``);
- ``transformers``: ``transformers serve --continuous-batching`` (transformers' own server, this venv);
- ``llamacpp``: llama.cpp's ``llama-server`` (``make llamacpp-env``) on an f32 GGUF of the same model, converted
  here with llama.cpp's own script (benchmarks/gguf_convert.py).

One compute thread per server (OMP_NUM_THREADS, llama-server ``-t``), each server as many parallel sequences as
the largest client count. The servers run one at a time in alternating rounds; the best round of each is kept (a
shared machine adds noise to all). Prints output tokens/s, p95 request latency and the ratio to the built-in
engine per client count, for the base model and for one LoRA adapter (a PEFT adapter published in a lorastack
store; llama.cpp gets it converted with ``convert_lora_to_gguf.py`` and applies it per request; an engine that
cannot serve it says why, from the error it answered). Before measuring llama.cpp, its tokenization of the
prompts is checked against the Hugging Face tokenizer; each engine's greedy answer to the first prompt is
compared with the built-in engine's. An engine that is not installed is skipped with one line saying how to
install it.

    python benchmarks/bench_engines.py                          # 1, 4, 16, 64 clients, 2 rounds
    python benchmarks/bench_engines.py --clients 1,4 --rounds 1 --max-tokens 16   # quick
    python benchmarks/bench_engines.py --engines builtin,llamacpp --llamacpp-prefix /work/main/.venv-llamacpp
    python benchmarks/bench_engines.py --model DIR --dtype bfloat16   # a real model (e.g. on a GPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
KEY = "bench-key-0123456789"  # 16+ characters: `lorastack serve` refuses weaker keys
ENGINES = ("builtin", "vllm", "transformers", "llamacpp")
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


@dataclass
class Setup:
    """What every engine serves: one model, one adapter, and (for llama.cpp) their GGUF files."""

    tmp: Path
    model: str
    store: Path
    adapter_name: str
    adapter_dir: Path
    dtype: str
    max_seqs: int
    threads: str
    vllm_python: str
    llamacpp_prefix: Path
    gguf: dict[str, Path] = field(default_factory=dict)


@dataclass
class Server:
    """A started engine: how to address the base model and the adapter (None + why, where it cannot)."""

    proc: subprocess.Popen
    url: str
    key: str
    base: str
    adapter: str | None
    adapter_extra: dict | None = None  # extra request fields that select the adapter (llama.cpp's `lora`)
    base_extra: dict | None = None  # extra request fields that select the base model alone
    log: Path | None = None


def missing(engine: str, s: Setup) -> str | None:
    """Why ``engine`` cannot run here, with how to install it; None when it can."""
    if engine == "vllm" and not Path(s.vllm_python).is_file():
        return f"no vLLM environment at {s.vllm_python}: run `make vllm-env` (or pass --vllm-python)"
    if engine == "transformers":
        need = [m for m in ("fastapi", "uvicorn", "openai", "rich") if importlib.util.find_spec(m) is None]
        if need or importlib.util.find_spec("transformers.cli.serve") is None:
            return f"`transformers serve` needs {', '.join(need) or 'transformers>=5'}: pip install -e '.[bench]'"
    if engine == "llamacpp":
        if not (s.llamacpp_prefix / "bin" / "llama-server").is_file():
            return (f"no llama-server under {s.llamacpp_prefix}: run `make llamacpp-env` "
                    "(or pass --llamacpp-prefix)")
        if importlib.util.find_spec("sentencepiece") is None:
            return "llama.cpp's convert_hf_to_gguf.py needs sentencepiece: pip install -e '.[bench]'"
    return None


def wait_ready(proc: subprocess.Popen, url: str, log: Path, name: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} server not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def start(engine: str, s: Setup) -> Server:
    """Start ``engine`` on a free 127.0.0.1 port and wait until it answers its health check."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = s.tmp / f"{engine}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": s.threads}
    if engine in ("builtin", "vllm"):
        env.update({"PYTHONPATH": str(REPO / "src"), "LORASTACK_API_KEYS": KEY, "LORASTACK_VLLM_DTYPE": s.dtype,
                    "LORASTACK_VLLM_MAX_LORA_RANK": "8", "VLLM_CPU_KVCACHE_SPACE": "2"})
        python = sys.executable if engine == "builtin" else s.vllm_python
        cmd = [python, "-m", "lorastack", "serve", "--engine", engine, "--store", str(s.store), "--base-model",
               s.model, "--port", str(port), "--max-batch-size", str(s.max_seqs),
               "--max-queue", str(max(64, s.max_seqs))]
        if engine == "builtin":
            cmd.append("--no-4bit")
        proc = spawn(cmd, env, log)
        wait_ready(proc, f"{url}/readyz", log, engine)
        return Server(proc, url, KEY, s.model, s.adapter_name, log=log)
    if engine == "transformers":
        # No model pinned: a request names the model (or adapter) directory to load, as with a hub id.
        cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
               "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", s.dtype, "--log-level", "warning"]
        proc = spawn(cmd, env, log)
        wait_ready(proc, f"{url}/health", log, engine)
        return Server(proc, url, "unused", s.model, str(s.adapter_dir), log=log)
    if engine == "llamacpp":
        # One slot per concurrent client, each with room for a prompt and its answer; the adapter is loaded at
        # start but applied only to requests that ask for it (scale 1 via the request's `lora` field).
        ctx_per_slot = 512
        cmd = [str(s.llamacpp_prefix / "bin" / "llama-server"), "-m", str(s.gguf["model"]), "--host", "127.0.0.1",
               "--port", str(port), "-t", s.threads, "-tb", s.threads, "-np", str(s.max_seqs),
               "-c", str(ctx_per_slot * s.max_seqs), "--jinja", "--api-key", KEY, "--alias", "base",
               "--lora", str(s.gguf["adapter"]), "--lora-init-without-apply", "--no-webui"]
        proc = spawn(cmd, env, log)
        wait_ready(proc, f"{url}/health", log, engine)
        # Without a `lora` field the adapter applies at 1.0; a slot's cached prompt (KV computed under another
        # adapter setting) is not reused across settings, so prompt caching is off.
        return Server(proc, url, KEY, "base", "base",
                      adapter_extra={"lora": [{"id": 0, "scale": 1.0}], "cache_prompt": False},
                      base_extra={"lora": [{"id": 0, "scale": 0.0}], "cache_prompt": False}, log=log)
    raise ValueError(engine)


def stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def drive(server: Server, model: str, clients: int, requests: int, max_tokens: int,
          extra: dict | None = None) -> tuple[float, float, int]:
    """(output tokens/s, p95 latency s, output tokens) for ``clients`` clients sending ``requests`` requests
    each."""
    from openai import OpenAI

    def one_client(i: int) -> list[tuple[float, int]]:
        c = OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=600)
        out = []
        for j in range(requests):
            t0 = time.monotonic()
            r = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0, extra_body=extra,
            )
            out.append((time.monotonic() - t0, r.usage.completion_tokens))
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(one_client, range(clients)) for x in xs]
    wall = time.monotonic() - t0
    lat = sorted(r[0] for r in results)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    tokens = sum(r[1] for r in results)
    return tokens / wall, p95, tokens


def greedy_answers(server: Server, model: str, max_tokens: int, extra: dict | None) -> list[str]:
    """The greedy answer to each prompt, one request at a time (compared across engines; not timed)."""
    from openai import OpenAI

    c = OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=600)
    return [c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
                                      temperature=0, extra_body=extra).choices[0].message.content or ""
            for p in PROMPTS]


def check_llamacpp_tokenizer(server: Server, model_dir: str) -> str:
    """Compare llama-server's tokenization of the prompts (plain, and as rendered by the chat template) with the
    Hugging Face tokenizer's; returns a one-line verdict (a mismatch means the GGUF vocabulary is wrong)."""
    import httpx
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    headers = {"Authorization": f"Bearer {server.key}"}
    bad = []
    for text in PROMPTS:
        ours = httpx.post(f"{server.url}/tokenize", json={"content": text}, headers=headers, timeout=30)
        if ours.json()["tokens"] != tok.encode(text, add_special_tokens=False):
            bad.append(f"plain {text[:30]!r}")
        messages = [{"role": "user", "content": text}]
        rendered = httpx.post(f"{server.url}/apply-template", json={"messages": messages}, headers=headers,
                              timeout=30).json()["prompt"]
        hf_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        lc_ids = httpx.post(f"{server.url}/tokenize", json={"content": rendered, "parse_special": True},
                            headers=headers, timeout=30).json()["tokens"]
        if lc_ids != list(hf_ids):
            bad.append(f"chat {text[:30]!r}: llama.cpp {lc_ids[:8]}... vs HF {list(hf_ids)[:8]}...")
    if bad:
        return "llama.cpp tokenization DIFFERS from Hugging Face: " + "; ".join(bad)
    return f"llama.cpp tokenizes all {len(PROMPTS)} prompts (plain and chat-templated) to the Hugging Face ids"


def adapter_refusal(server: Server, max_tokens: int) -> str | None:
    """None when the server answers a request for the adapter; else why not, from its error."""
    from openai import APIStatusError, OpenAI

    c = OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=600)
    try:
        c.chat.completions.create(model=server.adapter, messages=[{"role": "user", "content": PROMPTS[0]}],
                                  max_tokens=max_tokens, temperature=0, extra_body=server.adapter_extra)
    except APIStatusError as e:
        why = str(e.message).splitlines()[0] if e.message else ""
        if server.log is not None and e.status_code >= 500:  # the body says only "Internal Server Error"
            for _ in range(20):  # the traceback reaches the log just after the response
                raised = [ln for ln in server.log.read_text(errors="replace").splitlines()
                          if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
                if raised:
                    why = raised[-1]
                    break
                time.sleep(0.25)
        return f"cannot serve a PEFT dir (HTTP {e.status_code}: {why[:160]})"
    return None


def prepare(args, tmp: Path) -> Setup:
    from test_serve import publish  # the test suite's real PEFT adapter on the model

    from lorastack.store import Store
    from lorastack.tinymodel import build_tiny_model

    model = args.model or str(build_tiny_model(tmp / "model", hidden_size=256, num_layers=4))
    store = Store(tmp / "store").init()
    adapter = publish(store, "alpha", Path(model), tmp, seed=1)
    clients = [int(c) for c in args.clients.split(",")]
    return Setup(tmp=tmp, model=model, store=store.root, adapter_name="alpha", adapter_dir=adapter.path,
                 dtype=args.dtype, max_seqs=max(clients), threads=os.environ.get("OMP_NUM_THREADS", "1"),
                 vllm_python=args.vllm_python, llamacpp_prefix=Path(args.llamacpp_prefix))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    ap.add_argument("--model", help="model directory (default: a tiny llama-style model built here)")
    ap.add_argument("--dtype", default="float32", help="vLLM / transformers dtype (built-in: the model's)")
    ap.add_argument("--vllm-python", default=os.environ.get("LORASTACK_VLLM_PYTHON",
                                                            str(REPO / ".venv-vllm" / "bin" / "python")))
    ap.add_argument("--llamacpp-prefix", default=os.environ.get("LORASTACK_LLAMACPP_PREFIX",
                                                                str(REPO / ".venv-llamacpp")),
                    help="prefix of `make llamacpp-env`: bin/llama-server and the llama.cpp tree")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := sorted(set(wanted) - set(ENGINES)):
        ap.error(f"unknown engine(s) {', '.join(unknown)}: choose from {', '.join(ENGINES)}")
    if "builtin" not in wanted:
        wanted.insert(0, "builtin")  # the ratios are to the built-in engine

    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    s = prepare(args, tmp)
    engines = []
    for engine in wanted:
        if why := missing(engine, s):
            print(f"skipped {engine}: {why}", flush=True)
        else:
            engines.append(engine)
    if "llamacpp" in engines:
        from gguf_convert import convert_adapter, convert_model

        tree = s.llamacpp_prefix / "llama.cpp"
        t0 = time.monotonic()
        s.gguf["model"] = convert_model(tree, Path(s.model), tmp / "model-f32.gguf", log=tmp / "gguf-model.log")
        s.gguf["adapter"] = convert_adapter(tree, s.adapter_dir, Path(s.model), tmp / "adapter-f32.gguf",
                                            log=tmp / "gguf-adapter.log")
        print(f"converted the model and adapter to f32 GGUF in {time.monotonic() - t0:.1f} s", flush=True)

    clients = [int(c) for c in args.clients.split(",")]
    best: dict[tuple[str, str, int], tuple[float, float, int]] = {}
    answers: dict[tuple[str, str], list[str]] = {}
    refused: dict[str, str] = {}
    notes: list[str] = []
    for rnd in range(args.rounds):
        order = engines if rnd % 2 == 0 else list(reversed(engines))
        for engine in order:
            try:
                server = start(engine, s)
            except RuntimeError as e:
                print(f"skipped {engine}: it did not start ({str(e).splitlines()[0]}); log: {tmp / engine}.log",
                      flush=True)
                continue
            try:
                if engine == "llamacpp" and rnd == 0:
                    notes.append(check_llamacpp_tokenizer(server, s.model))
                    print(notes[-1], flush=True)
                for kind in ("base", "adapter"):
                    target = server.base if kind == "base" else server.adapter
                    extra = server.adapter_extra if kind == "adapter" else server.base_extra
                    if kind == "adapter":
                        if engine in refused:
                            continue
                        if why := adapter_refusal(server, 4):
                            refused[engine] = why
                            print(f"round {rnd + 1} {engine:12s} adapter: {why}", flush=True)
                            continue
                    drive(server, target, 1, 1, 4, extra)  # warm-up (loads, compiles; not timed)
                    if rnd == 0:
                        answers[(engine, kind)] = greedy_answers(server, target, args.max_tokens, extra)
                    for n in clients:
                        tps, p95, tokens = drive(server, target, n, args.requests, args.max_tokens, extra)
                        key = (engine, kind, n)
                        if key not in best or tps > best[key][0]:
                            best[key] = (tps, p95, tokens)
                        print(f"round {rnd + 1} {engine:12s} {kind:7s} {n:3d} clients: {tps:8.1f} tok/s "
                              f"p95 {p95:6.2f} s ({tokens} tokens)", flush=True)
            finally:
                stop(server)

    print(f"\nbest of {args.rounds} rounds, up to {args.max_tokens} output tokens, greedy, "
          f"{args.requests} requests per client; ratio = engine / built-in")
    print(f"{'model':8s} {'clients':>7s} {'engine':12s} {'tok/s':>9s} {'ratio':>7s} {'p95 s':>7s} {'tokens':>7s}")
    for kind in ("base", "adapter"):
        for n in clients:
            ref = best.get(("builtin", kind, n))
            for engine in engines:
                if engine in refused and kind == "adapter":
                    continue
                if (got := best.get((engine, kind, n))) is None:
                    continue
                ratio = f"{got[0] / ref[0]:6.2f}x" if ref else "      -"
                print(f"{kind:8s} {n:7d} {engine:12s} {got[0]:9.1f} {ratio} {got[1]:7.2f} {got[2]:7d}")
    for engine, why in refused.items():
        print(f"adapter  {'-':>7s} {engine:12s} {why}")
    print()
    def agree(a: list[str], b: list[str]) -> int:
        return sum(x.strip() == y.strip() for x, y in zip(a, b))

    for (engine, kind), got in answers.items():
        if engine != "builtin" and (ref := answers.get(("builtin", kind))) is not None:
            print(f"greedy answers, {kind:7s}, {engine:12s}: same as built-in on {agree(got, ref)}/{len(PROMPTS)} "
                  "prompts")
    for engine in engines:
        if (base := answers.get((engine, "base"))) is not None and (tuned := answers.get((engine, "adapter"))):
            print(f"the adapter changes {engine}'s greedy answer on {len(PROMPTS) - agree(base, tuned)}/"
                  f"{len(PROMPTS)} prompts")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
