"""Build a tiny, real causal LM and tokenizer offline (no hub access).

Tests, benchmarks and `lorastack demo` (when no real model is reachable) use these. The models are
real transformers architectures (Llama-style and Phi-3-style) saved with ``save_pretrained`` and
loaded back through the same ``from_pretrained`` code that loads a real base model. Their chat
templates mimic the real families' templates (no ``{% generation %}`` markers), so the trainer's
assistant-mask code is exercised exactly as it would be on a real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Arch = Literal["llama", "phi3"]

LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_SPECIAL = {
    "llama": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "unk": "<unk>",
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        "end_of_turn": "<|eot_id|>",
        "template": LLAMA_TEMPLATE,
    },
    "phi3": {
        # As in Phi-3: eos and pad are both <|endoftext|>; a turn ends with <|end|>.
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "unk": "<unk>",
        "extra": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "end_of_turn": "<|end|>",
        "template": PHI3_TEMPLATE,
    },
}

# A small corpus of our own, so the tokenizer has useful merges for English chat text.
_CORPUS = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? The capital of France is Paris.",
    "How do I fine-tune a language model with LoRA adapters on a GPU?",
    "Train only the assistant tokens, keep the prompt masked, and save checkpoints often.",
    "The weather today is sunny with a light breeze from the west.",
    "Please recommend a quiet place to read a book near the river.",
    "Azure Container Apps can run jobs and apps on serverless GPUs.",
    "The quick brown fox jumps over the lazy dog near the bank of the river.",
    "Thank you! You're welcome. Is there anything else I can help you with today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation: , . ; : ! ? ' \" ( ) - /",
]


def build_tiny_model(
    out_dir: str | Path,
    arch: Arch = "llama",
    extra_texts: Iterable[str] = (),
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
    pretrain_steps: int = 0,
) -> Path:
    """Write a tokenizer (with its chat template) and a randomly initialised model to ``out_dir``.

    ``extra_texts`` are added to the tokenizer's training corpus (e.g. the fine-tuning data) so that
    examples tokenize to realistic lengths. With ``pretrain_steps`` the whole model is first trained as a
    plain language model on the corpus, so it "knows" the words (the demo uses this; tests don't need
    it). Deterministic for a given seed and corpus.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = _SPECIAL[arch]
    specials = list(dict.fromkeys([sp["unk"], sp["bos"], sp["eos"], sp["pad"], *sp["extra"]]))

    tok = Tokenizer(models.BPE(unk_token=sp["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*_CORPUS, *extra_texts], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        pad_token=sp["pad"],
        unk_token=sp["unk"],
        additional_special_tokens=sp["extra"],
        chat_template=sp["template"],
        model_max_length=max_positions,
    )
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        from transformers import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**common))
    # Generation stops at the end of a turn as well as at eos, as real chat models are configured.
    model.generation_config.eos_token_id = sorted(
        {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(sp["end_of_turn"])}
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if pretrain_steps:
        _pretrain(model, tokenizer, [*_CORPUS, *extra_texts], pretrain_steps, seed)
    model.save_pretrained(out)
    return out


def _pretrain(model, tokenizer, texts: list[str], steps: int, seed: int, block: int = 64, batch: int = 16) -> None:
    """Full-parameter causal-LM training on random windows of the concatenated texts (plain text, no chat)."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    data = torch.tensor(ids)
    if len(data) <= block + 1:
        data = data.repeat(block // max(len(data), 1) + 2)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + block] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
