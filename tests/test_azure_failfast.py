"""Fail fast and clearly: sign-in checked first (one line, seconds, no SDK dump unless --debug), a cloud run the job
cannot run refused before anything is uploaded, a stack that is not deployed, throttling with Retry-After."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml
from azure_fakes import FakeCredential, client_kwargs, fake, no_ambient_azure, outputs_file
from test_cloud import EXAMPLE, run_id_in, submit, write_job

from lorastack.azure.credentials import CloudError, check_credential
from lorastack.azure.jobs import EXIT_FAILED, local_base_model_problem
from lorastack.cli import build_parser, main
from lorastack.commands import cloud as cloud_cmd

FIXTURES = (fake, no_ambient_azure, outputs_file)  # pytest fixtures from azure_fakes, used by name


@pytest.fixture
def no_sign_in(monkeypatch, tmp_path):
    """A machine where nobody is signed in: no az/azd/pwsh on PATH, no credential variables, and no network at all
    (a DNS lookup fails the test), so the real DefaultAzureCredential chain runs and must fail on its own."""
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
                "AZURE_USERNAME", "AZURE_TOKEN_CREDENTIALS", "IDENTITY_ENDPOINT", "MSI_ENDPOINT",
                "AZURE_CLIENT_CERTIFICATE_PATH"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_dns(*args, **kwargs):
        raise AssertionError(f"a test tried to resolve {args[0]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_no_sign_in_is_one_line_in_seconds_with_the_fix(no_sign_in, outputs_file, capsys):
    """The issue's new user: `lorastack status` without a login took 1 min 29 s and printed the chain dump 5 times."""
    t0 = time.monotonic()
    rc = main(["status", "--outputs", str(outputs_file)])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == EXIT_FAILED and elapsed < 5, (elapsed, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lorastack status: no Azure sign-in") and "az login" in lines[0]
    assert "AZURE_FEDERATED_TOKEN_FILE" in lines[0] and "--debug" in lines[0]


def test_debug_shows_the_credential_chain_that_was_tried(no_sign_in, outputs_file, capsys):
    rc = main(["--debug", "status", "--outputs", str(outputs_file)])
    err = capsys.readouterr().err
    assert rc == EXIT_FAILED
    assert "AzureCliCredential" in err and len(err.splitlines()) > 3  # the SDK's own account of each credential


def test_a_credential_that_hangs_is_reported_at_the_deadline():
    class Hanging:
        def get_token(self, *scopes, **kwargs):
            time.sleep(5)

    t0 = time.monotonic()
    with pytest.raises(CloudError, match=r"no Azure credential answered within 0 s; sign in with `az login`"):
        check_credential(Hanging(), deadline_s=0.3)
    assert time.monotonic() - t0 < 1.5


def test_the_credential_is_checked_before_the_first_storage_call(fake, outputs_file, capsys):
    from azure.core.exceptions import ClientAuthenticationError

    class Expired:
        def get_token(self, *scopes, **kwargs):
            raise ClientAuthenticationError("AADSTS700082: The refresh token has expired due to inactivity.")

    args = build_parser().parse_args(["status", "--outputs", str(outputs_file)])
    assert cloud_cmd.status_command(args, credential=Expired(), client_kwargs=client_kwargs(fake)) == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert "AADSTS700082" in err and "az login" in err and len(err.splitlines()) == 1
    assert fake.requests == []


@pytest.mark.parametrize("base_model", ["laptop-dir", "./models/phi3", "~/models/phi3", "C:\\models\\phi3"])
def test_a_base_model_on_this_machine_is_refused_before_any_request_or_token(
    fake, outputs_file, tmp_path, capsys, base_model
):
    """A laptop path would be queued and a GPU job would start that can only fail after a cold start."""
    if base_model == "laptop-dir":
        (tmp_path / "phi3").mkdir()
        (tmp_path / "phi3" / "config.json").write_text("{}")
        base_model = str(tmp_path / "phi3")
    cred = FakeCredential()
    job = write_job(tmp_path, base_model=base_model)
    assert submit(fake, [job, "--outputs", str(outputs_file)], cred) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"base_model {base_model!r} is a path on this machine" in err
    assert "/mnt/store/models/<dir>" in err and "--local" in err
    assert fake.requests == [] and cred.scopes == []


def test_hub_ids_and_paths_on_the_store_mount_are_accepted(tmp_path):
    spec = str(tmp_path / "job.yaml")
    assert local_base_model_problem("microsoft/Phi-3-mini-4k-instruct", spec) is None
    assert local_base_model_problem("/mnt/store/models/phi3-local", spec) is None


def test_data_larger_than_the_job_can_tokenize_is_refused_before_upload(fake, outputs_file, capsys):
    fake.job_memory = "0.25Mi"  # a job this small can hold ~5 KiB of data while it tokenizes
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"is more than job {fake.job} can tokenize in its 0.25Mi of memory" in err
    assert "Nothing was uploaded" in err and "gpuProfile" in err
    assert not fake.files and all(r.method in ("GET", "HEAD") for r in fake.requests)


def test_data_beyond_the_share_quota_is_refused_before_upload(fake, outputs_file, capsys):
    fake.share_quota_gib = 1
    fake.share_used = 2**30 - 1000  # 1000 bytes left
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"share {fake.share} has only 1000 bytes" not in err  # sizes are human-readable
    assert "left under its quota" in err and "quotaGiB" in err and "lorastack runs rm" in err
    assert not fake.files


def test_a_stack_that_is_not_deployed_says_pulumi_up(fake, outputs_file, capsys):
    fake.missing_group = True
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"resource group {fake.rg} does not exist in subscription {fake.subscription}" in err
    assert "pulumi up --stack" in err and str(outputs_file) in err
    assert not fake.files


def _status(fake, outputs_file, run_id, retries):
    args = build_parser().parse_args(["status", run_id, "--outputs", str(outputs_file)])
    return cloud_cmd.status_command(args, credential=FakeCredential(), client_kwargs=client_kwargs(fake, retries))


def test_throttling_is_retried_after_retry_after_then_explained(fake, outputs_file, capsys):
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == 0
    run_id = run_id_in(capsys.readouterr().out)
    execution = next(iter(fake.executions))
    fake.files.pop(f"queue/{run_id}")
    fake.put(f"claims/{run_id}", f"{execution}\n".encode())
    # throttled twice, then answered: the SDK honours Retry-After and the user sees the status
    fake.throttle[f"/executions/{execution}"] = 2
    assert _status(fake, outputs_file, run_id, retries=3) == 0
    assert f"execution {execution} (Running)" in capsys.readouterr().out
    # still throttled after the retries: one line that says so and what to do
    fake.throttle[f"/executions/{execution}"] = 10
    assert _status(fake, outputs_file, run_id, retries=1) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Azure is throttling requests (429 TooManyRequests)" in err and "Azure asked to wait 0 s" in err


def test_outputs_with_optional_keys_validate_and_name_what_is_missing(fake, tmp_path):
    from lorastack.azure.outputs import load_outputs

    doc = {"subscriptionId": fake.subscription, "resourceGroupName": fake.rg, "acaJobName": fake.job,
           "storageAccountName": fake.account, "fileShareName": fake.share}
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(doc))
    o = load_outputs(path)
    with pytest.raises(CloudError, match=r"missing stack output 'logAnalyticsWorkspaceId' .* \$LORASTACK_LOG_WORKSPACE_ID"):
        o.require("log_workspace_id")
    path.write_text(json.dumps({**doc, "acaAppEndpoint": "not a url"}))
    with pytest.raises(CloudError, match=r"acaAppEndpoint: 'not a url' is not a valid inference URL"):
        load_outputs(path)
    path.write_text(yaml.safe_dump(doc))  # YAML is not the JSON pulumi prints
    with pytest.raises(CloudError, match="not JSON"):
        load_outputs(path)
