"""`lorastack validate` and lorastack.data: format rules, loss checks, token limits, streaming, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from lorastack.chat import encode_chat
from lorastack.cli import main
from lorastack.data import (
    MAX_STORED_PER_CODE,
    DataValidationError,
    check_files,
    read_examples,
    suggested_epochs,
    validate_file,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "jobs" / "examples"

# tests/data/planted_errors.jsonl: one planted problem per line (line -> (severity, code)).
PLANTED = {
    2: ("error", "invalid_json"),
    3: ("error", "data_type"),
    4: ("error", "missing_messages_list"),
    5: ("error", "message_missing_key"),
    6: ("error", "message_unrecognized_key"),
    7: ("error", "unrecognized_role"),
    8: ("error", "missing_content"),
    9: ("error", "invalid_weight"),
    10: ("error", "example_missing_assistant_message"),
    11: ("warning", "last_message_not_assistant"),
    12: ("warning", "nothing_to_train"),
    13: ("warning", "blank_line"),
    14: ("warning", "missing_user_message"),
    15: ("error", "invalid_weight"),
    16: ("error", "missing_content"),
    17: ("error", "missing_messages_list"),
    18: ("error", "data_type"),
}


def example(
    q: str = "How do I fix a flat tyre?", a: str = "Find the hole, patch it and pump the tyre up."
) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You help cyclists."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]
    }


def write_jsonl(path: Path, rows: list, bom: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def found(report) -> dict[int | None, tuple[str, str]]:
    return {p.line: (p.severity, p.code) for p in report.problems}


def test_shared_datasets_pass(shared_datasets, capsys):
    train = [
        str(shared_datasets / "travel-finetune.jsonl"),
        str(shared_datasets / "travel-finetune-hotel.jsonl"),
    ]
    valid = str(shared_datasets / "travel-finetune-validation.jsonl")
    assert main(["validate", *train, "--validation", valid]) == 0
    out = capsys.readouterr().out
    assert "3 file(s): all OK" in out
    # The validation split has prompts but no answers: accepted, with a loud warning (no eval loss).
    assert "travel-finetune-validation.jsonl: warning: no_trainable_examples" in out
    # As a *training* file it is refused: 5 examples, none with an answer.
    assert main(["validate", valid]) == 1
    out = capsys.readouterr().out
    assert "too_few_examples" in out and ":1: error: example_missing_assistant_message" in out


def test_example_job_data_passes_with_tokenizer(tiny_phi3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    reports = check_files(
        [EXAMPLES / "plant-care-train.jsonl"], [EXAMPLES / "plant-care-validation.jsonl"], tok, 1024
    )
    train, valid = reports
    assert train.problems == [] and valid.problems == []
    assert train.trainable_examples == 30 and valid.trainable_examples == 10
    assert train.suggested_epochs == 3 and valid.suggested_epochs is None


def test_every_planted_problem_at_its_line():
    report = validate_file(DATA / "planted_errors.jsonl")
    assert found(report) == PLANTED  # exactly these, nothing on the valid lines 1, 19, 20
    assert not report.ok
    assert report.error_count == sum(1 for s, _ in PLANTED.values() if s == "error")
    assert report.examples == 19  # the blank line is not an example
    assert report.trainable_examples == 5  # lines 1, 11, 14, 19, 20
    assert str(report.errors[0]) == (
        f"{DATA / 'planted_errors.jsonl'}:2: error: invalid_json: Expecting value at column 59; "
        "each line must be one complete JSON object"
    )


def test_bom_is_accepted_and_too_few_examples(tmp_path):
    path = write_jsonl(tmp_path / "bom.jsonl", [example()] * 12, bom=True)
    report = validate_file(path)
    assert report.ok and report.bom and report.problems == [] and report.examples == 12
    few = validate_file(write_jsonl(tmp_path / "few.jsonl", [example()] * 3))
    assert [(p.line, p.code) for p in few.errors] == [(None, "too_few_examples")]
    # A validation file may be small.
    assert validate_file(tmp_path / "few.jsonl", purpose="validation").ok


def test_invalid_utf8_reported_with_its_line(tmp_path):
    good = (json.dumps(example()) + "\n").encode()
    bad = (
        json.dumps(example(a="Caf\u00e9 stop"), ensure_ascii=False)
        .encode()
        .replace("\u00e9".encode(), b"\xe9")
    )  # latin-1 byte
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good * 4 + bad + b"\n" + good * 6)
    report = validate_file(path)
    assert found(report) == {5: ("error", "invalid_utf8")}
    assert "0xe9" in report.errors[0].message and report.examples == 11
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes((json.dumps(example()) + "\n").encode("utf-16"))
    assert "UTF-16" in validate_file(utf16).errors[0].message


def test_nothing_to_train_in_whole_file(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hey", "weight": 0},
            ]
        }
    ]
    report = validate_file(write_jsonl(tmp_path / "w0.jsonl", rows * 10))
    assert report.error_count == 1 and report.errors[0].code == "no_trainable_examples"
    assert report.warning_counts["nothing_to_train"] == 10


def test_missing_file_is_an_error(tmp_path):
    report = validate_file(tmp_path / "nope.jsonl")
    assert [p.code for p in report.errors] == ["unreadable_file"]


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_token_limits_with_base_model_tokenizer(tmp_path, llama_tok):
    long_history = {"messages": [{"role": "system", "content": "You help cyclists."}]}
    for i in range(8):
        long_history["messages"] += [
            {"role": "user", "content": f"Question {i} about gears and chains?"},
            {"role": "assistant", "content": f"Answer {i}: keep the chain clean."},
        ]
    huge_answer = example(a="Pedal " * 60)
    rows = [example()] * 10 + [long_history, huge_answer]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    limit = 80
    report = validate_file(path, tokenizer=llama_tok, max_seq_len=limit)
    assert found(report) == {11: ("warning", "too_long"), 12: ("error", "final_answer_truncated")}
    assert "the oldest" in report.warnings[0].message
    # Token statistics match the tokenizer's own encoding of each example (before truncation).
    lengths = sorted(encode_chat(llama_tok, r["messages"]).full_length for r in rows)
    tokens = report.tokens.summary()
    assert (tokens["min"], tokens["max"]) == (lengths[0], lengths[-1])
    assert tokens["p95"] == lengths[11]  # nearest rank: ceil(0.95 * 12) = 12th smallest
    assert tokens["mean"] == round(sum(lengths) / 12, 1)
    # Assistant tokens are counted for trainable examples, after truncation.
    trained = [encode_chat(llama_tok, r["messages"], limit).n_assistant_tokens for r in rows[:11]]
    assert report.assistant_tokens.total == sum(trained) and report.trainable_examples == 11
    # Without a limit the tokenizer's context (model_max_length) applies: everything fits.
    assert validate_file(path, tokenizer=llama_tok).ok


def test_suggested_epochs_heuristic():
    assert suggested_epochs(10) == 10  # 100 / 10
    assert suggested_epochs(3) == 25  # capped
    assert suggested_epochs(50) == 3
    assert suggested_epochs(20_000) == 1  # 25000 // 20000
    assert suggested_epochs(5_000) == 3
    assert suggested_epochs(10_000) == 2  # 25000 // 10000
    assert suggested_epochs(0) is None


def test_check_files_raises_with_every_error(tmp_path):
    with pytest.raises(DataValidationError) as info:
        check_files([DATA / "planted_errors.jsonl"])
    text = str(info.value)
    assert (
        "planted_errors.jsonl:2: error: invalid_json" in text
        and "planted_errors.jsonl:18: error: data_type" in text
    )
    assert "warning" not in text


def test_read_examples_streams_messages(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [example(q=f"q{i}") for i in range(3)], bom=True)
    got = list(read_examples(path))
    assert [line for line, _ in got] == [1, 2, 3]
    assert got[2][1][1]["content"] == "q2"


def test_cli_json_output_and_exit_codes(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [example()] * 10)
    assert main(["validate", str(good), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (
        doc["ok"] is True and doc["files"][0]["examples"] == 10 and doc["files"][0]["suggested_epochs"] == 10
    )
    assert main(["validate", str(good), str(DATA / "planted_errors.jsonl"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    bad = doc["files"][1]
    assert {(p["line"], p["code"]) for p in bad["problems"]} == {(k, v[1]) for k, v in PLANTED.items()}
    assert bad["error_count"] == 13 and bad["warning_count"] == 4
    # A tokenizer that cannot be loaded is a usage error (2), not a data verdict.
    assert main(["validate", str(good), "--base-model", str(tmp_path / "no-such-model")]) == 2
    assert "cannot load the tokenizer" in capsys.readouterr().err


def test_cli_with_base_model_directory(tmp_path, tiny_llama, capsys):
    path = write_jsonl(tmp_path / "good.jsonl", [example()] * 10)
    assert main(["validate", str(path), "--base-model", str(tiny_llama), "--max-seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert (
        "tokens per example (limit 512): min" in out and "p95" in out and "trained (assistant) tokens" in out
    )


def test_validate_without_tokenizer_does_not_import_torch(tmp_path):
    path = write_jsonl(tmp_path / "good.jsonl", [example()] * 10)
    code = (
        "import sys; from lorastack.cli import main; rc = main(['validate', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def _big_file(path: Path, n: int, bad_every: int = 0) -> Path:
    line = json.dumps(example()).encode() + b"\n"
    broken = b'{"messages": [\n'
    with open(path, "wb") as fh:
        fh.writelines(broken if bad_every and i % bad_every == 0 else line for i in range(n))
    return path


def _peak_while(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streams_with_bounded_memory(tmp_path):
    path = _big_file(tmp_path / "big.jsonl", 10_000, bad_every=7)  # ~2 MB, 1429 errors
    report, peak = _peak_while(lambda: validate_file(path))
    assert report.examples == 10_000 and report.error_counts["invalid_json"] == 1429
    assert len(report.problems) == MAX_STORED_PER_CODE  # every error counted, a bounded number kept
    assert peak < 1_000_000, f"peak {peak} bytes for a {path.stat().st_size} byte file"


@pytest.mark.slow
def test_streams_200k_lines_with_bounded_memory(tmp_path):
    path = _big_file(tmp_path / "huge.jsonl", 200_000)  # ~30 MB
    report, peak = _peak_while(lambda: validate_file(path))
    assert report.ok and report.examples == 200_000 and report.suggested_epochs == 1
    assert peak < 1_000_000, f"peak {peak} bytes for a {path.stat().st_size} byte file"


def test_template_that_cannot_render_an_example(tmp_path, tiny_phi3):
    from transformers import AutoTokenizer

    # The Phi-3-style template has no tool-call support: an assistant turn without content cannot render.
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    rows = [example()] * 10 + [
        {
            "messages": [
                {"role": "user", "content": "Use a tool"},
                call,
                {"role": "tool", "content": "done", "tool_call_id": "c1"},
                {"role": "assistant", "content": "Done."},
            ]
        }
    ]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    assert validate_file(path).ok  # valid Azure format ...
    report = validate_file(path, tokenizer=AutoTokenizer.from_pretrained(tiny_phi3))
    assert found(report) == {11: ("error", "template_error")}  # ... but this base model cannot train on it


# -- issue 7 item 8: output a person reads, local inputs first, one model cache ------------------------------------


def test_max_seq_len_beyond_the_model_context_is_refused(tmp_path, llama_tok, tiny_llama, capsys):
    """The tiny model's context is 1024 tokens: max_seq_len 4096 is an error naming that limit."""
    path = write_jsonl(tmp_path / "good.jsonl", [example()] * 10)
    report = validate_file(path, tokenizer=llama_tok, max_seq_len=4096)
    [problem] = report.errors
    assert problem.code == "max_seq_len_over_context" and problem.line is None
    assert "max_seq_len=4096" in problem.message and "context of 1024 tokens" in problem.message
    assert validate_file(path, tokenizer=llama_tok, max_seq_len=1024).ok
    assert main(["validate", str(path), "--base-model", str(tiny_llama), "--max-seq-len", "2048"]) == 1
    assert "max_seq_len_over_context" in capsys.readouterr().out


def test_missing_file_is_reported_before_the_model_is_looked_up(tmp_path, capsys, monkeypatch):
    """`validate data/train.jsonl --base-model org/name` with no such file: the file is reported at once, and no
    tokenizer is loaded (no hub access)."""
    from lorastack import models

    def no_hub(*args, **kwargs):
        raise AssertionError("the tokenizer must not be looked up when an input file is missing")

    monkeypatch.setattr(models, "load_tokenizer", no_hub)
    missing = tmp_path / "data" / "train.jsonl"
    assert main(["validate", str(missing), "--base-model", "org/some-model"]) == 1
    captured = capsys.readouterr()
    assert f"{missing}: error: unreadable_file" in captured.out
    assert "was not loaded" in captured.err


def test_model_not_found_hint_names_hf_download_and_the_cache(tmp_path, monkeypatch):
    """With the hub off, a model missing from the store's cache says where it looked and `hf download ...
    --cache-dir <store>/models` (the hub client no longer ships `huggingface-cli`)."""
    from lorastack import models

    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cache = models.store_cache_dir(tmp_path / "store")
    assert cache == str((tmp_path / "store" / "models").resolve())
    with pytest.raises(models.ModelLoadError) as info:
        models.load_tokenizer("org/not-cached", None, cache)
    text = str(info.value)
    assert f"the model cache ({cache})" in text and "HF_HUB_OFFLINE=1" in text
    assert f"`hf download org/not-cached --cache-dir {cache}`" in text and "huggingface-cli" not in text
    # HF_HOME wins over the store, for validate and finetune alike.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert models.store_cache_dir(tmp_path / "store") is None


def test_unreachable_hub_fails_fast_instead_of_retrying(tmp_path, monkeypatch):
    """Hub not switched off but unreachable (here: a closed port on 127.0.0.1 as the endpoint): the model that
    is not cached fails at once with 'cannot be reached', not after the hub client's retries."""
    import socket
    import time

    from lorastack import models

    with socket.socket() as s:  # a port that was free a moment ago: connecting to it is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(models, "_reachability", {})
    started = time.monotonic()
    with pytest.raises(models.ModelLoadError) as info:
        models.load_tokenizer("org/not-cached", None, str(tmp_path / "models"))
    assert "cannot be reached" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    assert time.monotonic() - started < 30  # generous: a refused connection returns in milliseconds


def test_second_pass_names_the_users_file_and_adds_only_token_findings(tmp_path, llama_tok):
    """The trainer's token-level pass over the store's copy reports under the user's file name, and leaves out
    the warnings the first (structure) pass printed already; its encodings can be reused for training."""
    rows = [example()] * 10 + [{"messages": [{"role": "user", "content": "hi"}]} | {}]
    rows[10]["messages"].append({"role": "assistant", "content": "Pedal " * 300})  # over the limit below
    rows.append({"messages": [{"role": "assistant", "content": "no user turn"}]})
    copy = write_jsonl(tmp_path / "0123abcd.jsonl", rows)
    first = validate_file(copy, display_name="data/train.jsonl")
    assert [(p.line, p.code) for p in first.warnings] == [(12, "missing_user_message")]
    assert str(first.warnings[0]).startswith("data/train.jsonl:12: warning:")
    seen = []
    second = validate_file(
        copy,
        llama_tok,
        100,
        display_name="data/train.jsonl",
        structure_warnings=False,
        on_encoded=lambda line, enc: seen.append((line, len(enc.input_ids))),
    )
    assert [(p.line, p.code) for p in second.problems] == [(11, "final_answer_truncated")]
    assert str(second.problems[0]).startswith("data/train.jsonl:11: error:")
    assert [line for line, _ in seen] == [*range(1, 11), 12] and all(n <= 100 for _, n in seen)


@pytest.mark.benchmark
def test_bench_validate_prints_the_ratio_line():
    """benchmarks/bench_validate.py runs at a small size, the reports agree, and it prints its side-by-side ratio."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_validate.py"), "--turns", "20,40", "--repeat", "1"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ratio baseline/ours at 40 turns:" in res.stdout and "scaling 20 -> 40 turns" in res.stdout, res.stdout
