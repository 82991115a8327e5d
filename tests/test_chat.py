"""encode_chat / render_prompt on real tokenizers with real-style chat templates (no generation markers)."""

from __future__ import annotations

import pytest

from lorastack.chat import ChatTemplateError, encode_chat, end_of_turn_ids, render_prompt

EOT = {"llama": "<|eot_id|>", "phi3": "<|end|>"}


@pytest.fixture(scope="module", params=["llama", "phi3"])
def arch_tok(request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(f"tiny_{'llama' if request.param == 'llama' else 'phi3'}")
    return request.param, AutoTokenizer.from_pretrained(path)


def masked_spans(tok, enc) -> list[str]:
    """Decode each contiguous run of trained tokens separately."""
    spans, run = [], []
    for t, m in zip(enc.input_ids, enc.assistant_mask):
        if m:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def test_single_turn_mask_is_exactly_content_plus_end_of_turn(arch_tok):
    arch, tok = arch_tok
    msgs = [
        SYSTEM,
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    enc = encode_chat(tok, msgs)
    assert masked_spans(tok, enc) == ["The capital of France is Paris." + EOT[arch]]
    assert enc.n_assistant_tokens == sum(enc.assistant_mask) > 0
    assert len(enc.input_ids) == len(enc.assistant_mask)
    assert not enc.truncated and not enc.final_answer_cut
    # The ids are the template's own tokenization of the whole conversation.
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert enc.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    # Labels: ignore index outside the mask.
    labels = enc.labels()
    assert [t for t in labels if t != -100] == [t for t, m in zip(enc.input_ids, enc.assistant_mask) if m]


def test_role_header_is_not_trained(arch_tok):
    _, tok = arch_tok
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    enc = encode_chat(tok, msgs)
    trained = tok.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if m])
    assert "assistant" not in trained and "user" not in trained
    # The prompt for inference is exactly the untrained prefix of the training sequence.
    prompt = render_prompt(tok, msgs[:1])
    first = enc.assistant_mask.index(1)
    assert enc.input_ids[:first] == prompt


def test_multi_turn_and_weight_zero(arch_tok):
    arch, tok = arch_tok
    msgs = [
        SYSTEM,
        {"role": "user", "content": "Is it sunny today?"},
        {"role": "assistant", "content": "Yes, sunny with a light breeze."},
        {"role": "user", "content": "Where can I read a book?"},
        {"role": "assistant", "content": "Try a quiet place near the river.", "weight": 0},
        {"role": "user", "content": "Thank you!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    enc = encode_chat(tok, msgs)
    assert masked_spans(tok, enc) == [
        "Yes, sunny with a light breeze." + EOT[arch],
        "You're welcome." + EOT[arch],
    ]
    all_weight_zero = [dict(m, weight=0) if m["role"] == "assistant" else m for m in msgs]
    assert encode_chat(tok, all_weight_zero).n_assistant_tokens == 0


def test_whitespace_is_kept_as_the_template_renders_it(arch_tok):
    arch, tok = arch_tok
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there!  "}]
    [span] = masked_spans(tok, encode_chat(tok, msgs))
    # The Llama template trims content; the Phi-3 one keeps it verbatim.
    expected = "Hello there!" if arch == "llama" else "  Hello there!  "
    assert span == expected + EOT[arch]


def test_tool_role(arch_tok):
    arch, tok = arch_tok
    msgs = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check the weather service."},
        {"role": "tool", "content": "sunny, 21 degrees", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
    ]
    enc = encode_chat(tok, msgs)
    spans = masked_spans(tok, enc)
    assert spans == [
        "Let me check the weather service." + EOT[arch],
        "It is sunny and 21 degrees in Paris." + EOT[arch],
    ]
    assert "sunny, 21 degrees" in tok.decode(enc.input_ids)  # the tool result is context, not trained


def test_end_of_turn_ids(arch_tok):
    arch, tok = arch_tok
    ids = end_of_turn_ids(tok)
    assert tok.convert_tokens_to_ids(EOT[arch]) in ids
    assert tok.eos_token_id in ids


def test_truncation_drops_oldest_turns_and_keeps_final_answer(arch_tok):
    arch, tok = arch_tok
    msgs = [SYSTEM]
    for i in range(6):
        msgs += [
            {"role": "user", "content": f"Question number {i} about the weather?"},
            {"role": "assistant", "content": f"Answer number {i}: it is sunny."},
        ]
    full = encode_chat(tok, msgs)
    last_two = encode_chat(tok, [SYSTEM, *msgs[-2:]])
    limit = len(last_two.input_ids) + 5  # room for the last exchange only
    enc = encode_chat(tok, msgs, max_seq_len=limit)
    assert enc.truncated and not enc.final_answer_cut
    assert len(enc.input_ids) <= limit and enc.full_length == len(full.input_ids)
    assert enc.dropped_messages == 10
    text = tok.decode(enc.input_ids)
    assert "Answer number 5: it is sunny." + EOT[arch] in text
    assert "Question number 0" not in text and SYSTEM["content"] in text  # system prompt kept
    assert masked_spans(tok, enc) == ["Answer number 5: it is sunny." + EOT[arch]]
    # A bit more room keeps one more whole exchange, and never a partial one.
    enc2 = encode_chat(tok, msgs, max_seq_len=len(encode_chat(tok, [SYSTEM, *msgs[-4:]]).input_ids))
    assert enc2.dropped_messages == 8 and not enc2.final_answer_cut
    assert masked_spans(tok, enc2)[0] == "Answer number 4: it is sunny." + EOT[arch]


def test_final_answer_cut_is_reported(arch_tok):
    _, tok = arch_tok
    msgs = [
        SYSTEM,
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": "Once upon a time " * 40},
    ]
    enc = encode_chat(tok, msgs, max_seq_len=40)
    assert enc.truncated and enc.final_answer_cut
    assert len(enc.input_ids) == len(enc.assistant_mask) == 40
    fits = encode_chat(tok, msgs, max_seq_len=10_000)
    assert not fits.truncated and not fits.final_answer_cut


def test_render_prompt_ends_with_generation_header(arch_tok):
    arch, tok = arch_tok
    ids = render_prompt(tok, [SYSTEM, {"role": "user", "content": "Hi"}])
    text = tok.decode(ids)
    assert text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n" if arch == "llama" else "<|assistant|>\n"
    )
    assert "Hi" in text and SYSTEM["content"] in text


def test_bad_messages_raise():
    with pytest.raises(ChatTemplateError):
        encode_chat(object(), "not a list")  # type: ignore[arg-type]


def test_conversation_opened_by_the_assistant(arch_tok):
    arch, tok = arch_tok
    msgs = [
        {"role": "assistant", "content": "Welcome! Ask me anything."},
        {"role": "user", "content": "Is it sunny?"},
        {"role": "assistant", "content": "Yes, it is sunny."},
    ]
    assert masked_spans(tok, encode_chat(tok, msgs)) == [
        "Welcome! Ask me anything." + EOT[arch],
        "Yes, it is sunny." + EOT[arch],
    ]


# -- issue 11: linear-time turn location gives the same masks ------------------------------------------------------

from hypothesis import given, settings
from hypothesis import strategies as st

from lorastack import chat

_words = st.sampled_from(["Paris", " padded ", "ok.", "\n", "  two  words", "<|end|>", "x" * 30, "é😀", "Answer"])
_content = st.lists(_words, min_size=1, max_size=4).map("".join)
_msg = st.builds(
    lambda role, content, w0: {"role": role, "content": content, **({"weight": 0} if w0 and role == "assistant" else {})},
    st.sampled_from(["user", "assistant", "assistant", "tool"]),
    _content,
    st.booleans(),
)


@settings(max_examples=50, deadline=None)
@given(system=st.booleans(), msgs=st.lists(_msg, min_size=1, max_size=16))
def test_block_renders_locate_the_same_turns_as_whole_prefixes(arch_tok, system, msgs):
    """Whenever the per-block renders tile the whole render, they locate exactly the spans that rendering every
    prefix of the whole conversation locates (the old, quadratic method)."""
    _, tok = arch_tok
    msgs = ([{"role": "system", "content": "Be brief."}] if system else []) + msgs
    text = chat._render(tok, msgs, False)
    try:
        exact = chat._assistant_char_spans(tok, msgs, text)
    except chat.ChatTemplateError:
        return
    try:
        windowed = chat._windowed_spans(tok, msgs, text, chat._Budget(msgs))
    except chat.ChatTemplateError:  # a window the template refuses: the caller falls back to whole prefixes
        return
    if windowed is not None:
        assert windowed == exact


@pytest.mark.parametrize("turns", [4, 5, 30, 31])
def test_long_alternating_conversations_take_the_linear_path(arch_tok, turns):
    """Both template families render turn by turn, so a long conversation (with or without a system prompt) is
    located per block, with the same spans as the whole-prefix method."""
    arch, tok = arch_tok
    msgs = [SYSTEM] if turns % 2 else []
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Q {i}?"}, {"role": "assistant", "content": f"A {i}."}]
    text = chat._render(tok, msgs, False)
    windowed = chat._windowed_spans(tok, msgs, text, chat._Budget(msgs))
    assert windowed is not None and windowed == chat._assistant_char_spans(tok, msgs, text)
    enc = encode_chat(tok, msgs)
    assert masked_spans(tok, enc) == [f"A {i}." + EOT[arch] for i in range(turns)]


def test_lone_surrogate_is_a_template_error_not_a_crash(arch_tok):
    """A lone UTF-16 surrogate (valid JSON escape, not text) is a ChatTemplateError for encoding and prompts."""
    _, tok = arch_tok
    msgs = [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ChatTemplateError, match="surrogate"):
        encode_chat(tok, msgs)
    with pytest.raises(ChatTemplateError, match="surrogate"):
        render_prompt(tok, msgs[:1])
