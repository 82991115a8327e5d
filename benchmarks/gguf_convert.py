"""Convert a Hugging Face model directory, or a PEFT LoRA adapter on it, to GGUF with llama.cpp's own scripts.

Runs the ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` that ship with the llama.cpp tree
`make llamacpp-env` keeps (``<prefix>/llama.cpp``, with its vendored ``gguf-py``), in this process, with one
change: llama.cpp names a BPE pre-tokenizer by hashing how the tokenizer splits a fixed text, and only knows
the hashes of published models. ``lorastack.tinymodel`` trains its own byte-level BPE (so the hash is new) but
its pre-tokenizer is exactly GPT-2's (``ByteLevel`` with the GPT-2 regex, no prefix space, no normalizer),
which llama.cpp implements as ``gpt-2``. Only a tokenizer with that exact pre-tokenizer gets the name; any
other unknown one still fails as upstream does. (bench_engines.py checks that llama-server tokenizes the
prompts to the same ids as the Hugging Face tokenizer before it measures anything.)

    python benchmarks/gguf_convert.py model   LLAMACPP_DIR MODEL_DIR OUT.gguf [--outtype f32]
    python benchmarks/gguf_convert.py adapter LLAMACPP_DIR ADAPTER_DIR BASE_DIR OUT.gguf [--outtype f32]

``convert_model`` / ``convert_adapter`` run it as a subprocess (the scripts set global logging and argv).
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def is_gpt2_pre_tokenizer(tokenizer) -> bool:
    """True when a fast tokenizer splits text exactly as GPT-2 does before BPE (llama.cpp's ``gpt-2``)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and spec.get("model", {}).get("type") == "BPE"
        and all(pre.get(k) == v for k, v in GPT2_PRE_TOKENIZER.items())
    )


def _run_script(llamacpp_dir: Path, script: str, argv: list[str]) -> None:
    sys.path.insert(0, str(llamacpp_dir))  # the scripts import their `conversion` package and gguf-py from here
    from conversion.base import TextModel

    upstream = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return upstream(self, tokenizer)
        except NotImplementedError:
            if not is_gpt2_pre_tokenizer(tokenizer):
                raise
            print("gguf_convert: unlisted BPE tokenizer with GPT-2's pre-tokenizer: tokenizer.ggml.pre = gpt-2",
                  file=sys.stderr)
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llamacpp_dir / script), *argv]
    runpy.run_path(str(llamacpp_dir / script), run_name="__main__")


def _subprocess(args: list[str], python: str, log: Path | None) -> None:
    cmd = [python, str(Path(__file__).resolve()), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")


def convert_model(llamacpp_dir: Path, model_dir: Path, out: Path, outtype: str = "f32",
                  python: str = sys.executable, log: Path | None = None) -> Path:
    """Write ``model_dir`` (weights and tokenizer, chat template included) as one GGUF file ``out``."""
    _subprocess(["model", str(llamacpp_dir), str(model_dir), str(out), "--outtype", outtype], python, log)
    return out


def convert_adapter(llamacpp_dir: Path, adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f32",
                    python: str = sys.executable, log: Path | None = None) -> Path:
    """Write the PEFT LoRA adapter ``adapter_dir`` (trained on ``base_dir``) as a llama.cpp LoRA GGUF ``out``."""
    _subprocess(["adapter", str(llamacpp_dir), str(adapter_dir), str(base_dir), str(out), "--outtype", outtype],
                python, log)
    return out


def main(argv: list[str]) -> None:
    kind, llamacpp_dir, *rest = argv
    llamacpp_dir = Path(llamacpp_dir)
    outtype = "f32"
    if "--outtype" in rest:
        i = rest.index("--outtype")
        outtype = rest[i + 1]
        del rest[i:i + 2]
    if kind == "model":
        model_dir, out = rest
        _run_script(llamacpp_dir, "convert_hf_to_gguf.py", [model_dir, "--outtype", outtype, "--outfile", out])
    elif kind == "adapter":
        adapter_dir, base_dir, out = rest
        _run_script(llamacpp_dir, "convert_lora_to_gguf.py",
                    [adapter_dir, "--base", base_dir, "--outtype", outtype, "--outfile", out])
    else:
        raise SystemExit(f"unknown kind {kind!r}: model or adapter")


if __name__ == "__main__":
    main(sys.argv[1:])
