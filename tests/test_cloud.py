"""``lorastack finetune JOB.yaml`` (cloud) and ``lorastack status``, tested at the HTTP boundary.

The real Azure SDK clients (azure-storage-file-share, azure-mgmt-appcontainers) run unchanged over azure-core's
own ``RequestsTransport``; only its ``requests.Session`` is replaced by ``FakeAzure`` (tests/azure_fakes.py), an
in-memory storage account + ACA job answering with the shapes of the real REST APIs and recording every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
import yaml
from azure_fakes import ARM, SUB, FakeCredential, client_kwargs, fake, no_ambient_azure, outputs_file

from lorastack.azure.credentials import CloudError
from lorastack.azure.jobs import EXIT_FAILED
from lorastack.azure.outputs import load_outputs
from lorastack.cli import build_parser
from lorastack.commands import cloud as cloud_cmd
from lorastack.store import Store

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "jobs" / "examples" / "plant-care.yaml"

FIXTURES = (fake, no_ambient_azure, outputs_file)  # pytest fixtures from azure_fakes, used by name


def submit(fake, argv, cred=None, **kw) -> int:
    args = build_parser().parse_args(["finetune", *argv])
    kw.setdefault("sleep", lambda s: None)
    return cloud_cmd.submit_command(args, credential=cred or FakeCredential(), client_kwargs=client_kwargs(fake), **kw)


def status(fake, argv, cred=None) -> int:
    args = build_parser().parse_args(["status", *argv])
    return cloud_cmd.status_command(args, credential=cred or FakeCredential(), client_kwargs=client_kwargs(fake))


def write_job(tmp_path, train_text: str | None = None, **extra) -> str:
    """A copy of the example job next to its own data (optionally with other training data)."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    train = tmp_path / "train.jsonl"
    train.write_text(
        train_text if train_text is not None else (EXAMPLE.parent / spec["training_file"]).read_text()
    )
    spec["training_file"] = str(train)
    spec["validation_file"] = str(EXAMPLE.parent / spec["validation_file"])
    spec.update(extra)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def run_id_in(out: str) -> str:
    return re.search(r"run (\S+) queued", out).group(1)


# ---------------------------------------------------------------------------------------------------------------
# submitting
# ---------------------------------------------------------------------------------------------------------------
def test_submit_writes_the_store_layout_atomically_queue_last_then_starts_the_job_untouched(
    fake, outputs_file, tmp_path, capsys
):
    cred = FakeCredential()
    t0 = time.monotonic()
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)], cred) == 0
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    run_id = run_id_in(out)
    spec = yaml.safe_load(bytes(fake.files[f"runs/{run_id}/spec.yaml"]))
    shas = sorted(set(spec["dataset_sha256"].values()))
    assert len(shas) == 2 and elapsed < 5

    log = fake.log()
    # every file lands under a temporary name in its own directory, then is renamed into place
    renames = [e for e in log if e.startswith("RENAME")]
    assert renames == [
        *(RegexMatch(rf"RENAME datasets/\.tmp-{sha}\.jsonl\.\w+ -> datasets/{sha}\.jsonl") for sha in shas),
        RegexMatch(rf"RENAME runs/{run_id}/\.tmp-spec\.yaml\.\w+ -> runs/{run_id}/spec\.yaml"),
        RegexMatch(rf"RENAME queue/\.tmp-{run_id}\.\w+ -> queue/{run_id}"),
    ]
    creates = [e for e in log if e.startswith("PUT create")]
    assert all("/.tmp-" in c for c in creates), creates
    # the queue entry is the last store write, and the job is started after it, with an empty body
    last_storage = max(i for i, r in enumerate(fake.requests) if r.host != ARM and r.method != "GET")
    start = next(i for i, r in enumerate(fake.requests) if r.method == "POST")
    assert log[last_storage].endswith(f"-> queue/{run_id}") and start > last_storage
    post = fake.requests[start]
    assert post.path.endswith(f"/resourceGroups/{fake.rg}/providers/Microsoft.App/jobs/{fake.job}/start")
    assert (
        post.body == b"" and "content-type" not in post.headers
    )  # no template override: the job's own mounts
    assert sum(r.method == "POST" for r in fake.requests) == 1
    # the user is told the run id, the execution and how to follow it
    execution = next(iter(fake.executions))
    assert f"started execution {execution}" in out
    assert f"lorastack status {run_id} --outputs {outputs_file}" in out
    assert f"az containerapp job logs show -n {fake.job} -g {fake.rg} --execution {execution}" in out
    # Entra ID tokens for both planes; no account key anywhere
    assert {s for scopes in cred.scopes for s in scopes} == {
        "https://storage.azure.com/.default",
        "https://management.azure.com/.default",
    }
    assert all("sharedkey" not in r.headers.get("authorization", "").lower() for r in fake.requests)
    assert not any(".tmp-" in f for f in fake.files)


def test_what_was_uploaded_is_what_the_job_entrypoint_claims_and_trains(fake, outputs_file, tmp_path, capsys):
    """Lay the fake share out on disk, as the job's mount sees it: the trainer's own store code accepts it."""
    from lorastack.trainer import load_run_spec

    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file), "--set", "lora.r=8"]) == 0
    run_id = run_id_in(capsys.readouterr().out)
    mount = tmp_path / "mnt-store"
    for rel, data in fake.files.items():
        (mount / rel).parent.mkdir(parents=True, exist_ok=True)
        (mount / rel).write_bytes(bytes(data))
    store = Store(mount)
    assert store.claim_run("job-train-dev-abc1234") == run_id
    spec, doc = load_run_spec(store, run_id)
    assert spec.lora.r == 8
    for sha in doc["dataset_sha256"].values():
        store.dataset_path(sha)  # exists and its content matches its sha256


def test_spec_yaml_bytes_equal_what_a_local_run_writes(fake, outputs_file, tmp_path, capsys):
    from lorastack.trainer import prepare_run

    argv = [str(EXAMPLE), "--outputs", str(outputs_file), "--max-steps", "7", "--set", "lora.alpha=64"]
    assert submit(fake, argv) == 0
    run_id = run_id_in(capsys.readouterr().out)
    local = Store(tmp_path / "local").init()
    assert prepare_run(local, EXAMPLE, {"training": {"max_steps": 7}, "lora": {"alpha": 64}}) == run_id
    assert bytes(fake.files[f"runs/{run_id}/spec.yaml"]) == (local.run_dir(run_id) / "spec.yaml").read_bytes()
    for sha_file in local.datasets_dir.iterdir():
        assert bytes(fake.files[f"datasets/{sha_file.name}"]) == sha_file.read_bytes()


def test_datasets_already_on_the_share_are_not_uploaded_again(fake, outputs_file, capsys):
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    first = capsys.readouterr().out
    fake.requests.clear()
    # same data, another setting: a new run, but the content-addressed datasets are reused
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file), "--set", "lora.r=4"]) == 0
    second = capsys.readouterr().out
    assert run_id_in(first) != run_id_in(second)
    log = fake.log()
    assert not [e for e in log if "datasets/" in e and not e.startswith("HEAD")], log
    assert sum(e.startswith("HEAD datasets/") for e in log) == 2
    assert "2 dataset(s) already on the share" in second
    assert len(fake.executions) == 2


def test_a_large_dataset_arrives_intact_in_ranges_with_progress(fake, outputs_file, tmp_path, capsys):
    rows = (EXAMPLE.parent / "plant-care-train.jsonl").read_text().splitlines()
    text = "\n".join(rows * (9 * 2**20 // sum(len(r) + 1 for r in rows) + 1)) + "\n"  # > 9 MiB
    job = write_job(tmp_path, text)
    assert submit(fake, [job, "--outputs", str(outputs_file)]) == 0
    sha = hashlib.sha256(text.encode()).hexdigest()
    assert bytes(fake.files[f"datasets/{sha}.jsonl"]) == text.encode()
    ranges = [e for e in fake.log() if e.startswith(f"PUT range datasets/.tmp-{sha}")]
    assert len(ranges) == 3  # 4 MiB ranges
    assert f"datasets/{sha}.jsonl: 9.0 MiB of 9.0 MiB (100%)" in capsys.readouterr().err


def test_an_upload_failing_midway_leaves_no_partial_file_no_queue_entry_and_no_execution(
    fake, outputs_file, capsys
):
    fake.fail_range_of = "spec.yaml"
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    assert "HTTP 500 InternalError" in capsys.readouterr().err
    assert [f.split("/")[0] for f in fake.files] == ["datasets", "datasets"]  # whole datasets only
    assert [r.method for r in fake.arm_requests()] == ["GET"]  # the job's memory was read; nothing was started
    assert fake.log()[-1].startswith("DELETE runs/") and ".tmp-spec.yaml." in fake.log()[-1]


@pytest.mark.parametrize("problem", ["bad-json-line", "bad-spec-value", "missing-data-file"])
def test_bad_input_fails_before_any_request_or_token(fake, outputs_file, tmp_path, capsys, problem):
    cred = FakeCredential()
    if problem == "bad-json-line":
        lines = (EXAMPLE.parent / "plant-care-train.jsonl").read_text().splitlines()
        lines[3] = '{"messages": [{"role": "user", "content": "unterminated'
        job = write_job(tmp_path, "\n".join(lines) + "\n")
        argv, expect = [job], f"{tmp_path / 'train.jsonl'}:4"
    elif problem == "bad-spec-value":
        argv, expect = [str(EXAMPLE), "--set", "lora.r=lots"], "lora.r"
    else:
        job = write_job(tmp_path)
        (tmp_path / "train.jsonl").unlink()
        argv, expect = [job], "training_file: file not found"
    t0 = time.monotonic()
    rc = submit(fake, [*argv, "--outputs", str(outputs_file)], cred)
    assert rc == EXIT_FAILED and time.monotonic() - t0 < 2
    assert expect in capsys.readouterr().err
    assert fake.requests == [] and cred.scopes == []  # nothing uploaded, nothing started, no token asked for


def test_storage_403_names_the_missing_role_and_starts_nothing(fake, outputs_file, capsys):
    fake.deny_storage = "AuthorizationPermissionMismatch"
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Storage File Data Privileged Contributor" in err
    assert f"storage account {fake.account}" in err and "403 AuthorizationPermissionMismatch" in err
    assert (
        f"--scope /subscriptions/{SUB}/resourceGroups/{fake.rg}/providers/Microsoft.Storage/storageAccounts/"
        in err
    )
    assert not fake.arm_requests() and not fake.files
    assert len(fake.storage_requests()) == 1  # a 403 is not retried


def test_storage_firewall_403_also_suggests_the_network(fake, outputs_file, capsys):
    fake.deny_storage = "AuthorizationFailure"
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Storage File Data Privileged Contributor" in err and "firewall" in err


def test_job_start_refused_says_the_run_is_queued_and_how_to_start_it(fake, outputs_file, capsys):
    fake.deny_arm = "AuthorizationFailed"
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    run_id = next(f.split("/")[1] for f in fake.files if f.startswith("queue/"))
    assert f"run {run_id} is queued on share {fake.share}, but no job execution was started" in err
    assert "Microsoft.App/jobs/start/action" in err
    assert f"az containerapp job start -n {fake.job} -g {fake.rg}" in err
    # once the role is granted, submitting again starts the job; the queued run keeps its place in the queue
    fake.deny_arm = None
    fake.requests.clear()
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    assert not [e for e in fake.log() if "queue/" in e and not e.startswith("HEAD")]
    assert len(fake.executions) == 1


def test_no_credential_says_to_sign_in(fake, outputs_file, capsys):
    from azure.identity import CredentialUnavailableError

    class NoCredential:
        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token")

    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)], NoCredential()) == EXIT_FAILED
    assert "az login" in capsys.readouterr().err
    assert fake.requests == []


def test_a_run_that_already_succeeded_is_not_started_again(fake, outputs_file, capsys):
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    run_id = run_id_in(capsys.readouterr().out)
    fake.files.pop(f"queue/{run_id}")
    fake.put(
        f"runs/{run_id}/status.json", json.dumps({"phase": "succeeded", "adapter": "plant-care@v1"}).encode()
    )
    fake.requests.clear()
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    assert "already succeeded (plant-care@v1)" in capsys.readouterr().out
    assert all(r.method in ("GET", "HEAD") for r in fake.requests) and not fake.arm_requests()


def test_resubmitting_a_running_run_starts_nothing_a_stopped_one_is_queued_again(fake, outputs_file, capsys):
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    run_id = run_id_in(capsys.readouterr().out)
    first = next(iter(fake.executions))
    fake.files.pop(f"queue/{run_id}")  # the job's entrypoint claimed it
    fake.put(f"claims/{run_id}", f"{first}\n".encode())
    fake.put(f"runs/{run_id}/status.json", json.dumps({"phase": "training", "step": 3}).encode())
    # still running: a second submission must not start a second GPU execution for the same run
    fake.requests.clear()
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    assert f"already being trained by execution {first} (Running)" in capsys.readouterr().out
    assert not [r for r in fake.requests if r.method not in ("GET", "HEAD")]
    # it stopped at its time budget and the execution ended: submitting again releases the claim and requeues
    fake.executions[first] = ["Succeeded"]
    fake.put(f"runs/{run_id}/status.json", json.dumps({"phase": "stopped", "step": 30}).encode())
    fake.requests.clear()
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    out = capsys.readouterr().out
    assert f"execution {first} has ended; queued again" in out
    log = fake.log()
    assert log.index(f"DELETE claims/{run_id}") < log.index(
        RegexMatch(rf"RENAME queue/\.tmp-{run_id}\.\w+ -> queue/{run_id}")
    )
    assert f"claims/{run_id}" not in fake.files and f"queue/{run_id}" in fake.files
    assert len(fake.executions) == 2


# ---------------------------------------------------------------------------------------------------------------
# stack outputs
# ---------------------------------------------------------------------------------------------------------------
def test_missing_outputs_name_the_key_and_how_to_get_it(fake, tmp_path, capsys):
    partial = tmp_path / "partial.json"
    partial.write_text(
        json.dumps({"subscriptionId": SUB, "resourceGroupName": "rg", "storageAccountName": "acct01"})
    )
    assert submit(fake, [str(EXAMPLE), "--outputs", str(partial)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "missing stack output 'acaJobName' (training job name)" in err
    assert "missing stack output 'fileShareName'" in err and "$LORASTACK_SHARE_NAME" in err
    assert "pulumi stack output --json" in err
    assert fake.requests == []
    assert submit(fake, [str(EXAMPLE)]) == EXIT_FAILED  # no file, no env
    assert "missing stack output 'subscriptionId'" in capsys.readouterr().err


def test_outputs_from_env_or_ai_toolkit_config_and_bad_values(tmp_path, monkeypatch):
    toolkit = tmp_path / "finetuning.config.json"
    toolkit.write_text(
        json.dumps(
            {
                "SUBSCRIPTION_ID": SUB,
                "RESOURCE_GROUP_NAME": "rg-x",
                "STORAGE_ACCOUNT_NAME": "acct01",
                "FILE_SHARE_NAME": "store",
                "ACA_JOB_NAME": "job-x",
            }
        )
    )
    assert load_outputs(toolkit).job_name == "job-x"
    env = {
        "AZURE_SUBSCRIPTION_ID": SUB,
        "LORASTACK_RESOURCE_GROUP": "rg",
        "LORASTACK_JOB_NAME": "job-y",
        "LORASTACK_STORAGE_ACCOUNT": "acct02",
        "LORASTACK_SHARE_NAME": "share-1",
    }
    o = load_outputs(None, env)
    assert (o.job_name, o.account_url) == ("job-y", "https://acct02.file.core.windows.net")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(toolkit.read_text()), "STORAGE_ACCOUNT_NAME": "Not_An-Account"}))
    with pytest.raises(
        CloudError, match=r"bad.json: STORAGE_ACCOUNT_NAME: 'Not_An-Account' is not a valid"
    ):
        load_outputs(bad)
    with pytest.raises(CloudError, match="no such file"):
        load_outputs(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------------------
# following a run
# ---------------------------------------------------------------------------------------------------------------
def test_status_reads_the_run_from_the_share_and_its_execution(fake, outputs_file, capsys):
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    run_id = run_id_in(capsys.readouterr().out)
    assert status(fake, [run_id, "--outputs", str(outputs_file)]) == 0
    assert capsys.readouterr().out.strip() == f"{run_id}: queued"
    execution = next(iter(fake.executions))
    # the job's entrypoint claimed it and is training (what the trainer writes on the share)
    fake.files.pop(f"queue/{run_id}")
    fake.put(f"claims/{run_id}", f"{execution}\n".encode())
    fake.put(
        f"runs/{run_id}/status.json",
        json.dumps(
            {
                "run_id": run_id,
                "phase": "training",
                "step": 12,
                "max_steps": 40,
                "loss": 1.23456,
                "tokens_per_s": 812.4,
            }
        ).encode(),
    )
    assert status(fake, [run_id, "--outputs", str(outputs_file)]) == 0
    line = capsys.readouterr().out.strip()
    assert (
        line == f"{run_id}: training | execution {execution} (Running) | step 12/40 | loss 1.2346 | tok/s 812"
    )
    fake.put("adapters/plant-care/LATEST", b"v1\n")
    assert status(fake, ["--outputs", str(outputs_file), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [r["phase"] for r in listing["runs"]] == ["training"] and listing["adapters"] == ["plant-care@v1"]
    assert status(fake, ["nope-123", "--outputs", str(outputs_file)]) == EXIT_FAILED
    assert "no run 'nope-123'" in capsys.readouterr().err


def test_wait_streams_the_live_log_of_the_execution_that_claimed_the_run_until_it_succeeds(
    fake, outputs_file, capsys
):
    """finetune --wait: the trainer's console output arrives as the job writes it (no 15 s status polling)."""
    polls = []

    def trainer_progress(fake, name):
        """What the job does between polls: start its replica, claim the run, train (printing), publish."""
        polls.append(name)
        run_id = next((f.split("/")[1] for f in fake.files if f.startswith("queue/")), None) or fake.run_id
        fake.run_id = run_id
        step = len(polls)
        if step == 1:
            fake.files.pop(f"queue/{run_id}")
            fake.put(f"claims/{run_id}", f"{name}\n".encode())
        fake.exec_logs.setdefault(name, []).append(f"step {step * 10}/30 loss {2.0 / step:.4f}")
        doc = {"phase": "training", "step": step * 10, "max_steps": 30, "loss": 2.0 / step}
        if step >= 3:
            doc = {"phase": "succeeded", "adapter": "plant-care@v1"}
            fake.executions[name] = ["Succeeded"]
        fake.put(f"runs/{run_id}/status.json", json.dumps(doc).encode())

    fake.on_execution_get = trainer_progress
    fake.replicas_after = {}  # the replica is up at the first look
    rc = submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file), "--wait"], poll_seconds=0)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "step 10/30 loss 2.0000" in captured.out and "step 20/30 loss 1.0000" in captured.out
    assert "succeeded" in captured.err and "adapter plant-care@v1" in captured.err
    streams = [r for r in fake.requests if r.host.endswith("azurecontainerapps.dev")]
    assert streams and all(r.headers["authorization"].startswith("Bearer stream-") for r in streams)


def test_wait_reports_an_execution_that_ended_without_finishing_the_run(fake, outputs_file, capsys):
    def crashed(fake, name):
        run_id = next(f.split("/")[1] for f in fake.files if f.startswith("runs/"))
        fake.put(f"claims/{run_id}", f"{name}\n".encode())
        fake.files.pop(f"queue/{run_id}", None)
        fake.put(f"runs/{run_id}/status.json", json.dumps({"phase": "loading"}).encode())
        fake.executions[name] = ["Failed"]

    fake.on_execution_get = crashed
    rc = submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file), "--wait"], poll_seconds=0)
    assert rc == EXIT_FAILED
    assert "ended (Failed) while the run was loading; see `lorastack logs" in capsys.readouterr().err


def test_azure_modules_commands_and_cli_help_import_no_azure_sdk():
    """Every module of lorastack.azure and the cloud command handlers import no Azure SDK until a command runs."""
    import subprocess
    import sys

    modules = ["outputs", "credentials", "share", "jobs", "logs", "secrets", "preflight", "apps", "storage_keys",
               "store_ops", "stack"]
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module('lorastack.azure.' + m)\n"
        "import lorastack.commands.cloud, lorastack.commands.ops\n"
        "from lorastack.cli import build_parser; build_parser().parse_args(['status'])\n"
        "assert lorastack.commands.cloud.__file__.startswith(sys.argv[1]), lorastack.commands.cloud.__file__\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'azure'))"
    )
    src = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class RegexMatch(str):
    """Compares equal to any string the pattern fully matches (for readable list assertions)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(str(self), other) is not None

    __hash__ = str.__hash__


def test_status_through_the_cli_entry_point_without_outputs_says_how_to_get_them(capsys):
    from lorastack.cli import main

    assert main(["status", "plant-care-e01ff66e6748"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("lorastack status: missing stack output 'subscriptionId'") and "--outputs FILE" in err
