#!/usr/bin/env bash
# One command on a lent GPU machine (< 10 minutes): training MFU for Phi-3-mini-sized QLoRA (random weights at
# Phi-3-mini's dimensions: FLOPs and memory do not depend on the weights' values), 1 vs all GPUs data-parallel,
# the fast-path knobs, and serving throughput built-in vs vLLM.
#
#   bash benchmarks/gpu.sh            # from the repo root; needs .venv (make setup) and, for vLLM, a CUDA vLLM
#                                     # in VLLM_PYTHON (default .venv-vllm/bin/python; the CPU build works too)
#
# Not run by this project's CI (no GPU there); see docs/scale.md for what was and was not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
OUT=${OUT:-$(mktemp -d)}

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF

# Phi-3-mini-4k dimensions (3072 x 32 layers, 32 heads, MLP 8192), a 32064-token vocabulary needs a real
# tokenizer, so the tiny BPE tokenizer's vocabulary is used instead (the LM head is then smaller: ~3.6 % of FLOPs).
"$PY" - "$OUT/phi3mini" <<'EOF'
import sys
from lorastack.tinymodel import build_tiny_model
import json, pathlib
out = build_tiny_model(sys.argv[1], arch="phi3", hidden_size=3072, num_layers=32, max_positions=4096)
cfg = json.loads((pathlib.Path(out) / "config.json").read_text())
cfg.update(intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32)
(pathlib.Path(out) / "config.json").write_text(json.dumps(cfg))
import torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained(out)
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)  # random, real dimensions
print("model at", out)
EOF

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
echo "== training: QLoRA (NF4) on Phi-3-mini-sized weights, rows of 2048 tokens, 1 vs $NGPU GPU(s)"
timeout 300 "$PY" benchmarks/bench_ddp.py --model "$OUT/phi3mini" --nproc "$NGPU" --batch 2 --steps 12 \
  --seq-len 2048 --rounds 1 || echo "bench_ddp failed or timed out"

echo "== the fast-path knobs through the trainer (auto vs the old defaults, on the GPU), hidden 1024"
timeout 120 "$PY" benchmarks/bench_train_defaults.py --hidden 1024 --layers 4 --max-seq-len 2048 --rounds 1 || true

if [ -x "$VLLM_PYTHON" ]; then
  echo "== serving: built-in vs vLLM, bf16, 1/4/16 clients"
  timeout 200 "$PY" benchmarks/bench_engines.py --model "$OUT/phi3mini" --dtype bfloat16 --clients 1,4,16 \
    --rounds 1 --requests 2 --max-tokens 64 --vllm-python "$VLLM_PYTHON" || echo "bench_engines failed or timed out"
else
  echo "== serving skipped: no vLLM at $VLLM_PYTHON"
fi
