"""Hostile input to `lorastack validate` (issue 11, "Dataset fuzz"): no byte sequence raises, every problem is a
`file:line` diagnostic with a known code, and the work per line grows linearly with the line.

The corrupted files are built at run time from the real sample datasets in ../shared/datasets (truncated lines,
byte flips, a BOM mid-file, CRLF, huge lines, wrong types, deep nesting, lone surrogates, huge integers, NaN,
...), and checked with and without the base model's tokenizer (the tiny Llama-style model of conftest.py).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorastack import chat
from lorastack.cli import main
from lorastack.data import CODES, Report, format_report, validate_file

DATASETS = ("travel-finetune.jsonl", "travel-finetune-hotel.jsonl", "travel-finetune-validation.jsonl")


# -- what every report of any input must satisfy ------------------------------------------------------------------


def assert_well_formed(report: Report, path: Path, data: bytes) -> None:
    """Each problem names the file and a line that exists (or none, for file-level ones), with a known code and
    no internal error; the text and JSON forms of the report can be printed as UTF-8."""
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    for p in report.problems:
        assert p.code in CODES and p.code != "internal_error", str(p)
        assert p.line is None or 1 <= p.line <= max(n_lines, 1), (str(p), n_lines)
        where = f"{path}:{p.line}: " if p.line is not None else f"{path}: "
        assert str(p).startswith(where), str(p)
        assert len(p.message) < 1000, "a diagnostic must not echo a huge value"
    format_report(report).encode("utf-8")
    json.dumps(report.to_dict()).encode("utf-8")
    assert report.error_count + report.warning_count >= len(report.problems)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def sample_lines(shared_datasets: Path, name: str = "travel-finetune.jsonl") -> list[bytes]:
    return (shared_datasets / name).read_bytes().splitlines(keepends=True)


# -- the corruptions -------------------------------------------------------------------------------------------------

Mutation = Callable[[random.Random, list[bytes]], bytes]


def _pick(rng: random.Random, lines: list[bytes]) -> int:
    return rng.randrange(len(lines))


def _with_line(rng: random.Random, lines: list[bytes], new: bytes) -> bytes:
    lines = list(lines)
    lines[_pick(rng, lines)] = new + b"\n"
    return b"".join(lines)


def _example(rng: random.Random, lines: list[bytes]) -> dict:
    """A well-formed example from the (possibly already corrupted) lines, to corrupt further."""
    for i in rng.sample(range(len(lines)), len(lines)):
        try:
            ex = json.loads(lines[i])
        except ValueError:
            continue
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            return ex
    return {"messages": [{"role": "user", "content": "Where to?"}, {"role": "assistant", "content": "Lisbon."}]}


def truncated_line(rng, lines):
    lines = list(lines)
    i = _pick(rng, lines)
    lines[i] = lines[i][: rng.randrange(1, max(2, len(lines[i]) - 1))] + b"\n"
    return b"".join(lines)


def truncated_file(rng, lines):
    data = b"".join(lines)
    return data[: rng.randrange(1, max(2, len(data)))]


def byte_flips(rng, lines):
    data = bytearray(b"".join(lines))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    return bytes(data)


def bom_mid_file(rng, lines):
    lines = list(lines)
    i = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
    lines[i] = b"\xef\xbb\xbf" + lines[i]
    if i == 0:
        lines.insert(0, lines[0][3:])
    return b"".join(lines)


def concatenated_files(rng, lines):
    return b"\xef\xbb\xbf" + b"".join(lines) + b"\xef\xbb\xbf" + b"".join(lines)


def crlf(rng, lines):
    return b"".join(line.rstrip(b"\n") + b"\r\n" for line in lines)


def cr_only(rng, lines):
    return b"".join(line.rstrip(b"\n") + b"\r" for line in lines)


def huge_line(rng, lines, size=300_000):
    ex = _example(rng, lines)
    ex["messages"][-1]["content"] = "word " * (size // 5)
    return _with_line(rng, lines, json.dumps(ex).encode())


def huge_garbage_line(rng, lines, size=300_000):
    return _with_line(rng, lines, bytes(rng.randrange(32, 127) for _ in range(2000)) * (size // 2000))


def wrong_types(rng, lines):
    ex = _example(rng, lines)
    bad = [
        lambda e: e.update(messages=rng.choice([7, "hello", {"role": "user"}, None, True, [[]], [1, 2]])),
        lambda e: e["messages"][0].update(content=rng.choice([[{"type": "text"}], 42, {"a": 1}, None, False, 1.5])),
        lambda e: e["messages"][0].update(role=rng.choice([1, None, ["user"], {"r": 1}, "x" * 5000])),
        lambda e: e["messages"][-1].update(weight=rng.choice(["1", [1], {"w": 1}, None, 0.5, True, 1e308])),
        lambda e: e["messages"][-1].update(name=rng.choice([1, [], {}]), tool_calls="nope", tool_call_id=5),
        lambda e: e["messages"].append(rng.choice([1, "msg", None, [], {}])),
        lambda e: e["messages"][0].update({f"k{i}" * 50: i for i in range(30)}),
    ]
    rng.choice(bad)(ex)
    return _with_line(rng, lines, json.dumps(ex).encode())


def deep_nesting(rng, lines):
    depth = rng.choice([500, 5_000, 100_000])
    kind = rng.choice(["content", "line", "messages"])
    nest = b"[" * depth + b"]" * depth
    if kind == "line":
        return _with_line(rng, lines, nest)
    if kind == "messages":
        return _with_line(rng, lines, b'{"messages": ' + nest + b"}")
    return _with_line(rng, lines, b'{"messages": [{"role": "user", "content": ' + nest + b"}]}")


def lone_surrogates(rng, lines):
    ex = _example(rng, lines)
    where = rng.choice(["content", "role", "key", "system"])
    s = rng.choice(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
    if where == "content":
        ex["messages"][-1]["content"] += s
    elif where == "role":
        ex["messages"][0]["role"] = s
    elif where == "key":
        ex["messages"][0][s] = 1
    else:
        ex[s] = "x"
    return _with_line(rng, lines, json.dumps(ex).encode())  # ensure_ascii: written as \\udXXX escapes


def huge_ints(rng, lines):
    ex = _example(rng, lines)
    ex["messages"][-1]["weight"] = 0
    text = json.dumps(ex).replace('"weight": 0', '"weight": ' + "9" * rng.choice([4_301, 5_000, 100_000]))
    return _with_line(rng, lines, text.encode())


def nan_and_infinity(rng, lines):
    ex = _example(rng, lines)
    ex["messages"][-1]["weight"] = rng.choice([float("nan"), float("inf"), float("-inf")])
    return _with_line(rng, lines, json.dumps(ex).encode())


def random_bytes(rng, lines):
    return _with_line(rng, lines, bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))))


def nul_and_controls(rng, lines):
    lines = list(lines)
    i = _pick(rng, lines)
    pos = rng.randrange(max(1, len(lines[i]) - 1))
    lines[i] = lines[i][:pos] + rng.choice([b"\x00", b"\x01\x02", b"\x1b[31m", b"\t\x0b\x0c"]) + lines[i][pos:]
    return b"".join(lines)


def utf16_file(rng, lines):
    return b"".join(lines).decode("utf-8").encode(rng.choice(["utf-16", "utf-16-le", "utf-16-be"]))


def latin1_bytes(rng, lines):
    return b"".join(lines).replace("é".encode(), b"\xe9").replace(b"a", b"\xe0", 3)


def many_turns(rng, lines, turns=400):
    ex = _example(rng, lines)
    head = ex["messages"][:1] if ex["messages"][0].get("role") == "system" else []
    turns_ = [
        m
        for i in range(turns)
        for m in ({"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."})
    ]
    ex["messages"] = head + turns_
    return _with_line(rng, lines, json.dumps(ex).encode())


def blank_and_whitespace_lines(rng, lines):
    lines = list(lines)
    for _ in range(3):
        lines.insert(rng.randrange(len(lines) + 1), rng.choice([b"\n", b"   \n", b"\t\r\n", b"\xc2\xa0\n"]))
    return b"".join(lines)


MUTATIONS: dict[str, Mutation] = {
    f.__name__: f
    for f in (
        truncated_line,
        truncated_file,
        byte_flips,
        bom_mid_file,
        concatenated_files,
        crlf,
        cr_only,
        huge_line,
        huge_garbage_line,
        wrong_types,
        deep_nesting,
        lone_surrogates,
        huge_ints,
        nan_and_infinity,
        random_bytes,
        nul_and_controls,
        utf16_file,
        latin1_bytes,
        many_turns,
        blank_and_whitespace_lines,
    )
}

# The diagnostic each targeted corruption must produce (other problems may come with it).
EXPECTED = {
    "bom_mid_file": "invalid_json",
    "concatenated_files": "invalid_json",
    "deep_nesting": ("invalid_json", "missing_content", "data_type", "message_missing_key", "missing_messages_list"),
    "lone_surrogates": "lone_surrogate",
    "huge_ints": "invalid_json",
    "nan_and_infinity": "invalid_json",
    "utf16_file": "invalid_utf8",
    "latin1_bytes": "invalid_utf8",
}


def check_variant(path: Path, tokenizer=None, purpose="train") -> Report:
    report = validate_file(path, tokenizer=tokenizer, purpose=purpose)
    assert_well_formed(report, path, path.read_bytes())
    return report


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_corruption_is_a_diagnostic(name, shared_datasets, tmp_path, llama_tok):
    """One variant per kind of corruption, with and without the tokenizer: no exception, file:line diagnostics."""
    rng = random.Random(name)
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(MUTATIONS[name](rng, sample_lines(shared_datasets)))
    plain = check_variant(path)
    with_tok = check_variant(path, llama_tok)
    if name in EXPECTED:
        wanted = EXPECTED[name] if isinstance(EXPECTED[name], tuple) else (EXPECTED[name],)
        assert any(p.code in wanted for p in plain.problems), format_report(plain)
    # The tokenizer only adds token-level findings: the format verdict per line is the same.
    token_level = {"too_long", "final_answer_truncated", "template_error"}
    assert {(p.line, p.code) for p in plain.errors} <= {(p.line, p.code) for p in with_tok.errors} | {
        (None, "no_trainable_examples")
    }
    assert {p.code for p in with_tok.errors} - {p.code for p in plain.errors} <= token_level


def test_lone_surrogate_names_the_escape_and_column(tmp_path):
    """A lone \\ud800 escape is a lone_surrogate error that quotes the escape and its column."""
    row = {"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    [problem] = [p for p in validate_file(path).problems if p.line == 1]
    assert problem.code == "lone_surrogate" and "\\ud800 at column" in problem.message
    # A valid surrogate pair (an emoji written as two escapes) is text, not an error.
    path.write_text(json.dumps({**row, "messages": [dict(row["messages"][0], content="hi 😀"), row["messages"][1]]}))
    assert all(p.code != "lone_surrogate" for p in validate_file(path).problems)


def test_huge_integer_nan_and_nesting_messages(tmp_path):
    """Python's json would raise (digits limit, RecursionError) or accept NaN: each is an invalid_json line."""
    ok = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    lines = [
        ok.replace('"a"}', '"a", "weight": ' + "1" * 5000 + "}"),
        ok.replace('"a"}', '"a", "weight": NaN}'),
        '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}",
    ]
    path = tmp_path / "n.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = {p.line: p for p in validate_file(path, purpose="validation").problems}
    assert problems[1].code == "invalid_json" and "5,000 digits" in problems[1].message
    assert problems[2].code == "invalid_json" and "NaN is not valid JSON" in problems[2].message
    assert problems[3].code == "invalid_json" and "nested too deeply" in problems[3].message


def test_line_over_the_limit_is_skipped_not_parsed(tmp_path, monkeypatch):
    """A line over MAX_LINE_BYTES is reported as line_too_long with its size; the lines after it are still checked."""
    from lorastack import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 10_000)
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "long.jsonl"
    path.write_text(good + "\n" + '{"messages": "' + "x" * 50_000 + '"}\n' + good + "\n{\n")
    report = validate_file(path, purpose="validation")
    found = {(p.line, p.code) for p in report.problems}
    assert (2, "line_too_long") in found and (4, "invalid_json") in found
    assert "50,017 bytes" in next(p.message for p in report.problems if p.line == 2)


def test_bom_mid_file_says_what_happened(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "cat.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n\xef\xbb\xbf" + good.encode() + b"\n")
    problems = validate_file(path, purpose="validation").problems
    assert [(p.line, p.code) for p in problems] == [(2, "invalid_json")]
    assert "byte-order mark" in problems[0].message and "concatenated" in problems[0].message


def test_cli_never_tracebacks_on_corrupt_files(shared_datasets, tmp_path, tiny_llama, capsys):
    """`lorastack validate --base-model` on a file holding every corruption at once exits 1 with diagnostics."""
    rng = random.Random(7)
    data = b"".join(MUTATIONS[name](rng, sample_lines(shared_datasets)) for name in sorted(MUTATIONS))
    path = tmp_path / "everything.jsonl"
    path.write_bytes(data)
    assert main(["validate", str(path), "--base-model", str(tiny_llama)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:" in out and "internal_error" not in out and "FAILED" in out
    assert main(["validate", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["files"][0]["error_count"] > 10


# -- property-based: any bytes, any JSON ----------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "\udfff", "user", "assistant", "system", "tool", ""]),
)
_json_value = st.recursive(
    _json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "bot"]), _json_leaf),
        "content": st.one_of(st.text(max_size=40), _json_value),
    },
    optional={"weight": st.one_of(st.sampled_from([0, 1]), _json_leaf), "name": _json_leaf, "extra": _json_leaf},
)
_example_obj = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=6)}),
    st.fixed_dictionaries({"messages": _json_value}),
    _json_value,
)


def _validate_bytes(data: bytes, tokenizer=None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_bytes(data)
        for purpose in ("train", "validation"):
            assert_well_formed(validate_file(path, tokenizer=tokenizer, purpose=purpose), path, data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_any_bytes_give_diagnostics(lines):
    """Arbitrary byte lines (invalid UTF-8, partial JSON, control bytes) never raise."""
    _validate_bytes(b"\n".join(lines))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_example_obj, min_size=1, max_size=6), st.booleans())
def test_any_json_lines_give_diagnostics(objs, ensure_ascii):
    """Arbitrary JSON values and message-shaped objects (wrong types, surrogates, NaN) never raise."""
    text = "\n".join(json.dumps(o, ensure_ascii=ensure_ascii) for o in objs)
    _validate_bytes(text.encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def tok_for_hypothesis(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objs=st.lists(_example_obj, min_size=1, max_size=4))
def test_any_json_lines_with_tokenizer(tok_for_hypothesis, objs):
    """The same with the base model's tokenizer: templates and tokenization never raise either."""
    text = "\n".join(json.dumps(o) for o in objs)
    _validate_bytes(text.encode("utf-8"), tok_for_hypothesis)


# -- bounded time per line: the work grows linearly ------------------------------------------------------------------


class CountingTokenizer:
    """The real tokenizer, counting the characters the chat template renders and the tokenizer encodes."""

    def __init__(self, tok):
        self._tok = tok
        self.rendered = 0
        self.renders = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def apply_chat_template(self, *args, **kwargs):
        out = self._tok.apply_chat_template(*args, **kwargs)
        self.renders += 1
        self.rendered += len(out)
        return out

    def __call__(self, text, **kwargs):
        self.rendered += len(text)
        return self._tok(text, **kwargs)


def conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You help travellers."}]
    for i in range(turns):
        msgs += [
            {"role": "user", "content": f"Question {i}: what should I pack for Paris in spring?"},
            {"role": "assistant", "content": f"Answer {i}: a light jacket, good shoes and an umbrella."},
        ]
    return msgs


@pytest.mark.parametrize("max_seq_len", [None, 1024, 200])
def test_encoding_work_is_linear_in_turns(llama_tok, max_seq_len):
    """60 vs 240 turns (4x): the characters rendered + tokenized grow ~4x (the old algorithm: 16x, or 64x when
    truncating). Counted, not timed, so the bound cannot flake; 6x leaves generous slack over 4x."""
    work = {}
    for turns in (60, 240):
        tok = CountingTokenizer(llama_tok)
        enc = chat.encode_chat(tok, conversation(turns), max_seq_len)
        work[turns] = tok.rendered
        if max_seq_len:
            assert enc.truncated and not enc.final_answer_cut and len(enc.input_ids) <= max_seq_len
    assert work[240] / work[60] < 6, work


def test_validate_work_is_linear_for_one_pathological_line(tmp_path, llama_tok):
    """`validate --base-model` on one conversation of 60 vs 240 turns: linear work, same verdict."""
    work = {}
    for turns in (60, 240):
        path = tmp_path / f"t{turns}.jsonl"
        path.write_text(json.dumps({"messages": conversation(turns)}) + "\n")
        tok = CountingTokenizer(llama_tok)
        report = validate_file(path, tokenizer=tok, purpose="validation")
        assert [p.code for p in report.problems] == ["too_long"]
        work[turns] = tok.rendered
    assert work[240] / work[60] < 6, work


NUMBERED_TEMPLATE = (  # each header carries the message's position in the whole conversation
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + ' ' + loop.index|string + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_template_that_is_not_turn_by_turn_is_bounded(tiny_llama, monkeypatch):
    """A template that renders a turn differently by its position (numbered headers) cannot be checked per
    block: its turns are located by rendering every prefix, exactly for short conversations, and a long one is
    refused with a clear error after bounded work, instead of running for minutes."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_llama)
    base.chat_template = NUMBERED_TEMPLATE
    short = chat.encode_chat(base, conversation(6))
    trained = base.decode([t for t, m in zip(short.input_ids, short.assistant_mask) if m])
    assert trained == "".join(f"Answer {i}: a light jacket, good shoes and an umbrella.<|eot_id|>" for i in range(6))
    monkeypatch.setattr(chat, "BUDGET_FLOOR", 2_000_000)  # the default floor allows ~10x more; same bound
    tok = CountingTokenizer(base)
    msgs = conversation(1500)
    with pytest.raises(chat.ChatTemplateError, match="too long to locate"):
        chat.encode_chat(tok, msgs)
    budget = chat.BUDGET_FACTOR * chat._size(msgs) + chat.BUDGET_FLOOR
    assert tok.rendered < 2 * budget  # stopped by the budget, not after rendering all 1,500 prefixes


# -- the bounded fuzz target CI runs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_corrupted_variants_of_the_sample_data(shared_datasets, tmp_path, llama_tok):
    """72 seeded variants (1-3 stacked corruptions of each sample file, bigger sizes), with and without the
    tokenizer, as training and as validation files: 0 exceptions, 0 internal errors, file:line diagnostics."""
    names = sorted(MUTATIONS)
    count = 0
    for seed in range(24):
        for dataset in DATASETS:
            rng = random.Random(f"{seed}-{dataset}")
            lines = sample_lines(shared_datasets, dataset)
            for _ in range(rng.randint(1, 3)):
                name = rng.choice(names)
                data = MUTATIONS[name](rng, lines)
                lines = data.splitlines(keepends=True) or [b"\n"]
            path = tmp_path / f"v{seed}-{dataset}"
            path.write_bytes(data)
            for tokenizer in (None, llama_tok):
                for purpose in ("train", "validation"):
                    check_variant(path, tokenizer, purpose)
            count += 1
    assert count >= 50
    # Big versions of the costly corruptions: a 4 MB line, a 2,000-turn conversation, 1M-deep nesting.
    rng = random.Random(1)
    lines = sample_lines(shared_datasets)
    for data in (
        huge_line(rng, lines, 4_000_000),
        many_turns(rng, lines, 2_000),
        _with_line(rng, lines, b"[" * 1_000_000),
    ):
        path = tmp_path / "big.jsonl"
        path.write_bytes(data)
        check_variant(path, llama_tok)
