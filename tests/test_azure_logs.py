"""``lorastack logs``: the live ACA log stream (waiting while queued/starting, reconnecting), Log Analytics for ended
executions and an idle app, and the error paths, all at the HTTP boundary."""

from __future__ import annotations

import json

from azure_fakes import FakeCredential, client_kwargs, fake, no_ambient_azure, outputs_file

from lorastack.azure.jobs import EXIT_FAILED
from lorastack.azure.logs import history_query, parse_since
from lorastack.cli import build_parser
from lorastack.commands import cloud as cloud_cmd

RUN = "plant-care-e01ff66e6748"

FIXTURES = (fake, no_ambient_azure, outputs_file)  # pytest fixtures from azure_fakes, used by name


def logs(fake, argv, sleep=None) -> int:
    args = build_parser().parse_args(["logs", *argv])
    return cloud_cmd.logs_command(args, credential=FakeCredential(), client_kwargs=client_kwargs(fake),
                                  sleep=sleep or (lambda s: None), poll_seconds=0)


def queued_run(fake) -> None:
    fake.put(f"runs/{RUN}/spec.yaml", b"name: plant-care\n")
    fake.put(f"queue/{RUN}", b"1.0\n")


def test_follow_waits_while_queued_and_starting_then_streams_and_reconnects(fake, outputs_file, capsys):
    """The AI Toolkit's "show the running job's streaming logs", reconnecting while the job is queued."""
    queued_run(fake)
    execution = f"{fake.job}-k3x9a2b"
    sleeps = []

    def the_job_starts(seconds):
        """Between polls: an execution starts, claims the run, and its replica takes a while to come up."""
        sleeps.append(seconds)
        if len(sleeps) == 2:
            fake.executions[execution] = ["Running"]
            fake.replicas_after[execution] = 2  # two looks with no replica yet: the GPU cold start
            fake.files.pop(f"queue/{RUN}")
            fake.put(f"claims/{RUN}", f"{execution}\n".encode())
            fake.exec_logs[execution] = ["loading base model", "step 1/30 loss 2.31"]

    streamed = []

    def more_output(fake, ex):
        streamed.append(ex)
        if len(streamed) == 1:  # the service closes the stream; the trainer keeps printing
            fake.exec_logs[ex].append("step 2/30 loss 2.10")
        else:
            fake.exec_logs[ex].append("published plant-care@v1")
            fake.executions[ex] = ["Succeeded"]

    fake.on_stream = more_output
    assert logs(fake, [RUN, "--follow", "--outputs", str(outputs_file)], sleep=the_job_starts) == 0
    out, err = capsys.readouterr()
    lines = [line.split(" ", 1)[1] for line in out.splitlines()]
    assert lines == ["loading base model", "step 1/30 loss 2.31", "step 2/30 loss 2.10"]  # once each, in order
    assert f"run {RUN} is queued: waiting for a job execution to claim it" in err
    assert err.count("waiting for its replica (a GPU cold start takes minutes)") == 1
    assert "reconnecting to replica" in err and f"execution {execution} Succeeded" in err
    streams = [r for r in fake.requests if r.host.endswith("azurecontainerapps.dev")]
    assert [r.query["tailLines"] for r in streams] == ["100", "0"]  # no line twice after a reconnect
    token_calls = [r for r in fake.arm_requests() if r.path.endswith("/getAuthToken")]
    assert token_calls and all(r.method == "POST" for r in token_calls)
    assert all(r.headers["authorization"].startswith("Bearer stream-") for r in streams)


def test_an_ended_execution_comes_from_log_analytics_over_its_own_time_window(fake, outputs_file, capsys):
    execution = f"{fake.job}-k3x9a2b"
    fake.executions[execution] = ["Failed"]
    fake.put(f"runs/{RUN}/status.json", json.dumps({"phase": "failed"}).encode())
    fake.put(f"claims/{RUN}", f"{execution}\n".encode())
    fake.la_rows = [
        ["2026-11-28T12:00:05Z", "console", "loading base model"],
        ["2026-11-28T12:01:00Z", "console", "torch.OutOfMemoryError: CUDA out of memory"],
        ["2026-11-28T12:01:02Z", "system", "ContainerTerminated: Container 'trainer' was terminated with exit code '1'"],
    ]
    assert logs(fake, [RUN, "--outputs", str(outputs_file)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "2026-11-28T12:00:05Z loading base model",
        "2026-11-28T12:01:00Z torch.OutOfMemoryError: CUDA out of memory",
        "2026-11-28T12:01:02Z [system] ContainerTerminated: Container 'trainer' was terminated with exit code '1'",
    ]
    assert f"execution {execution} Failed" in err
    (query,) = fake.la_queries
    assert f"ContainerGroupName startswith '{execution}'" in query["query"] and f"JobName == '{fake.job}'" in query["query"]
    assert "ContainerAppConsoleLogs_CL" in query["query"]  # the log-analytics destination's tables too
    assert query["timespan"].startswith("2026-11-28T11:59:00") and "2026-11-28T12:40:00" in query["timespan"]
    assert not [r for r in fake.requests if r.host.endswith("azurecontainerapps.dev")]


def test_the_app_log_streams_from_its_latest_revision(fake, outputs_file, capsys):
    assert logs(fake, ["--app", "--outputs", str(outputs_file)]) == 0
    out, err = capsys.readouterr()
    assert "Uvicorn running on http://0.0.0.0:8000" in out
    assert f"app {fake.app}: revision {fake.app}--r1" in err
    (stream,) = [r for r in fake.requests if r.host.endswith("azurecontainerapps.dev")]
    assert f"/containerApps/{fake.app}/revisions/{fake.app}--r1/replicas/" in stream.path
    assert stream.query["follow"] == "false"


def test_an_app_scaled_to_zero_shows_log_analytics_history(fake, outputs_file, capsys):
    fake.app_replica = False
    fake.la_rows = [["2026-11-28T11:00:00Z", "console", "INFO: 10.0.0.4 - POST /v1/chat/completions 200"]]
    assert logs(fake, ["--app", "--outputs", str(outputs_file)]) == 0
    out, err = capsys.readouterr()
    assert "POST /v1/chat/completions 200" in out and "scales to zero when idle" in err
    assert f"ContainerAppName == '{fake.app}'" in fake.la_queries[0]["query"]


def test_log_analytics_refused_names_the_reader_role(fake, outputs_file, capsys):
    fake.executions[f"{fake.job}-old0001"] = ["Succeeded"]
    fake.la_deny = True
    assert logs(fake, [f"{fake.job}-old0001", "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert "Log Analytics Reader" in err and len(err.splitlines()) == 1


def test_without_a_workspace_output_it_says_which_output_to_add(fake, tmp_path, capsys):
    from azure_fakes import outputs_doc

    doc = outputs_doc(fake)
    doc.pop("logAnalyticsWorkspaceId")
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(doc))
    fake.executions[f"{fake.job}-old0001"] = ["Succeeded"]
    assert logs(fake, [f"{fake.job}-old0001", "--outputs", str(path)]) == EXIT_FAILED
    assert "logAnalyticsWorkspaceId" in capsys.readouterr().err


def test_a_refused_stream_token_says_which_role_is_missing(fake, outputs_file, capsys):
    execution = f"{fake.job}-k3x9a2b"
    fake.executions[execution] = ["Running"]
    fake.exec_logs[execution] = ["hello"]
    fake.stream_reject = True
    assert logs(fake, [execution, "--outputs", str(outputs_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "the log stream refused its token (HTTP 401)" in err and "getAuthToken" in err


def test_an_unknown_execution_and_bad_arguments(fake, outputs_file, capsys):
    assert logs(fake, ["nope-0000", "--outputs", str(outputs_file)]) == EXIT_FAILED
    assert f"job {fake.job} has no execution 'nope-0000'" in capsys.readouterr().err
    assert logs(fake, ["--outputs", str(outputs_file)]) == 2
    assert logs(fake, [RUN, "--since", "yesterday", "--outputs", str(outputs_file)]) == 2
    assert "use a duration like 90s, 30m, 1h or 2d" in capsys.readouterr().err


def test_since_and_the_query_are_well_formed():
    assert parse_since("90s").total_seconds() == 90 and parse_since("2d").days == 2
    q = history_query(job="j", execution="it's")  # quotes in a name cannot break out of the KQL string
    assert "startswith 'it\\'s'" in q
