"""The training fast-path knobs, measured side by side on this machine: what ``train_defaults.choose`` picks.

One LoRA (r 16, all-linear) training step loop on a llama-style model, the same tokens per step in every
setting, alternating rounds, best round kept. Baseline = the trainer's current defaults (fp32 compute,
gradient checkpointing on, rows of 512 tokens). Each knob is flipped alone, then all that
``lorastack.train_defaults.choose`` picks for this device together; every line prints its ratio to the
baseline, and the last the memory (peak RSS growth is not isolated per setting on CPU, so it is not shown).

    python benchmarks/bench_train_defaults.py            # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time


def build(hidden: int, layers: int, gc: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    return model


def tokens_per_s(hidden: int, layers: int, dtype: str, gc: bool, row: int, tokens: int, steps: int) -> float:
    import torch

    model = build(hidden, layers, gc)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = max(1, tokens // row)
    x = torch.randint(0, 2048, (batch, row))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else torch.autocast("cpu", enabled=False)

    def step():
        with cast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * row * steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (rows x row length)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch

    from lorastack import train_defaults as td

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = td.detect()
    model = build(args.hidden, args.layers, False)
    shape = td.model_shape(model)
    chosen = td.choose(device, **shape, max_seq_len=512, micro_batch=max(1, args.tokens // 512))
    del model
    settings = {
        "baseline: fp32, checkpointing on, rows of 512": ("float32", True, 512),
        "bf16 compute": ("bfloat16", True, 512),
        "checkpointing off": ("float32", False, 512),
        "rows of 256": ("float32", True, 256),
        f"chosen: {chosen.compute_dtype}, checkpointing {'on' if chosen.gradient_checkpointing else 'off'}, "
        f"rows of {chosen.row_len}": (chosen.compute_dtype, chosen.gradient_checkpointing, chosen.row_len),
    }
    if not device.bf16:
        settings.pop("bf16 compute")  # no bf16 on this CPU: autocast would emulate it
    best: dict[str, float] = {}
    for rnd in range(args.rounds):
        for name in (settings if rnd % 2 == 0 else reversed(list(settings))):
            dtype, gc, row = settings[name]
            tps = tokens_per_s(args.hidden, args.layers, dtype, gc, row, args.tokens, args.steps)
            best[name] = max(best.get(name, 0.0), tps)
            print(f"round {rnd + 1}: {name}: {tps:,.0f} tok/s", flush=True)
    base = best[next(iter(settings))]
    print(f"\ndevice: {device.kind} {device.name}, bf16 {device.bf16}, {device.memory_bytes / 2**30:.0f} GiB; "
          f"model {shape['params'] / 1e6:.1f} M params; {args.tokens} tokens/step; best of {args.rounds} rounds")
    for name, tps in best.items():
        print(f"  {name:60s} {tps:8,.0f} tok/s  {tps / base:5.2f}x")
    print("choose() says: " + "; ".join(chosen.reasons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
