"""Console logs of a training execution or of the inference app: live from ACA's log stream, else Log Analytics.

Live, as ``az containerapp [job] logs show --follow`` does it: list the execution's (or revision's) replicas through
ARM, ask ARM for a log-stream token (``jobs/{job}/getAuthToken``, ``containerApps/{app}/getAuthtoken``), then read
the replica container's ``logStreamEndpoint`` with ``Authorization: Bearer <token>``. The Python management SDK has
the app operations but not the job ones (execution replicas, job getAuthToken): those are raw ARM calls through the
SDK's own pipeline. While an execution is queued or starting (a GPU cold start takes minutes) there is no replica
yet: we wait and retry; a stream the service closes while the execution still runs is reopened.

History, for executions that have ended (or an app scaled to zero): a KQL query on the environment's Log Analytics
workspace (azure-monitor-query). The stack ships logs with ``destination="azure-monitor"`` and a diagnostic setting,
so the tables are the resource-specific ``ContainerAppConsoleLogs`` / ``ContainerAppSystemLogs``; the query also
reads the ``*_CL`` tables a ``log-analytics`` destination writes. Ingestion lags by minutes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from lorastack.azure.credentials import Azure, CloudError, arm_json, call

# The API version azure-cli's containerapp extension uses for job execution replicas and the job log-stream token.
JOB_LOGSTREAM_API = "2023-11-02-preview"
EXECUTION_STATES_DONE = ("Succeeded", "Failed", "Stopped")
LOG_READER_HINT = (
    "a role allowing Microsoft.App/jobs/getAuthToken/action and .../executions/read (or, for --app, "
    "Microsoft.App/containerApps/getAuthToken/action), e.g. Contributor on the resource group"
)
LA_READER_HINT = "the role 'Log Analytics Reader' on the stack's Log Analytics workspace"
INGESTION_LAG = timedelta(minutes=10)


def parse_since(text: str | None) -> timedelta | None:
    """``90s``, ``30m``, ``1h``, ``2d`` -> timedelta; None for None. ValueError names the allowed forms."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not m:
        raise ValueError(f"--since {text!r}: use a duration like 90s, 30m, 1h or 2d")
    return timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


@dataclass
class Execution:
    """A job execution as ARM reports it."""

    name: str
    status: str | None
    start: datetime | None
    end: datetime | None

    @property
    def done(self) -> bool:
        return self.status in EXECUTION_STATES_DONE


def get_execution(azure: Azure, execution: str) -> Execution | None:
    """The execution's status and times (Job Execution - Get), None if ARM does not know it."""
    from azure.core.exceptions import ResourceNotFoundError

    o = azure.outputs
    try:
        ex = call(o, f"reading execution {execution} of job {o.job_name}", azure.apps().job_execution,
                  o.resource_group, o.job_name, execution, what=f"execution {execution!r} of job {o.job_name!r}")
    except CloudError as err:
        if isinstance(err.__cause__, ResourceNotFoundError) and "ResourceGroupNotFound" not in str(err):
            return None
        raise
    props = getattr(ex, "properties", None)
    status = getattr(props, "status", None)
    return Execution(
        execution,
        str(getattr(status, "value", status)) if status else None,
        getattr(props, "start_time", None),
        getattr(props, "end_time", None),
    )


# ---------------------------------------------------------------------------------------------------------------
# live stream
# ---------------------------------------------------------------------------------------------------------------
def _stream_url(endpoint: str, follow: bool, tail: int) -> str:
    sep = "&" if "?" in endpoint else "?"
    return f"{endpoint}{sep}follow={'true' if follow else 'false'}&tailLines={tail}&output=text"


def stream_endpoint(azure: Azure, endpoint: str, token: str, follow: bool, tail: int,
                    echo: Callable[[str], None], doing: str) -> int:
    """Print each line the log-stream endpoint sends until it closes; returns the number of lines."""
    from azure.core.exceptions import AzureError
    from azure.core.rest import HttpRequest

    request = HttpRequest("GET", _stream_url(endpoint, follow, tail), headers={"Authorization": f"Bearer {token}"})
    lines = 0
    try:
        response = azure.http().send_request(request, stream=True)
        if response.status_code in (401, 403):
            raise CloudError(
                f"{doing}: the log stream refused its token (HTTP {response.status_code}); your identity needs "
                f"{LOG_READER_HINT}"
            )
        if response.status_code >= 400:
            raise CloudError(f"{doing}: the log stream answered HTTP {response.status_code}")
        pending = b""
        for chunk in response.iter_bytes():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                echo(raw.decode("utf-8", "replace").rstrip("\r"))
                lines += 1
        if pending.strip():
            echo(pending.decode("utf-8", "replace"))
            lines += 1
    except AzureError as exc:
        if lines:  # the service closed a long stream: the caller reconnects if the execution still runs
            return lines
        raise CloudError(f"{doing}: the log stream failed ({str(exc).splitlines()[0][:200]})") from exc
    return lines


def _running_container(replicas: list[dict[str, Any]], container: str | None) -> tuple[str, str] | None:
    """(replica name, logStreamEndpoint) of the first replica container that has a stream."""
    for rep in replicas:
        for c in (rep.get("properties") or {}).get("containers") or []:
            if c.get("logStreamEndpoint") and (container is None or c.get("name") == container):
                return str(rep.get("name")), str(c["logStreamEndpoint"])
    return None


def job_replicas(azure: Azure, execution: str) -> list[dict[str, Any]]:
    """The execution's replicas (raw ARM: the Python SDK has no operation for it)."""
    o = azure.outputs
    doc = arm_json(azure, "GET", f"{o.job_id}/executions/{execution}/replicas", JOB_LOGSTREAM_API,
                   f"listing the replicas of execution {execution}", what=f"execution {execution!r}",
                   role_hint=LOG_READER_HINT)
    return list((doc or {}).get("value") or [])


def job_token(azure: Azure) -> str:
    """A log-stream token for the job (raw ARM ``getAuthToken``)."""
    o = azure.outputs
    doc = arm_json(azure, "POST", f"{o.job_id}/getAuthToken", JOB_LOGSTREAM_API,
                   f"getting a log-stream token for job {o.job_name}", role_hint=LOG_READER_HINT)
    token = ((doc or {}).get("properties") or {}).get("token")
    if not token:
        raise CloudError(f"job {o.job_name}: ARM answered getAuthToken without a token")
    return str(token)


def follow_execution(
    azure: Azure,
    execution: str,
    echo: Callable[[str], None],
    note: Callable[[str], None],
    follow: bool = True,
    tail: int = 100,
    container: str | None = None,
    poll_s: float = 5.0,
    max_wait_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Execution | None, int]:
    """Stream an execution's console output; wait while it is queued or starting, reconnect while it runs.

    Returns (the execution as last seen, lines printed). Without ``follow`` it prints the tail once (if a replica
    runs) and returns. ``note`` gets the progress lines (waiting, reconnecting), ``echo`` the log lines.
    """
    waited = 0.0
    printed = 0
    said = ""
    while True:
        ex = get_execution(azure, execution)
        if ex is None:
            raise CloudError(
                f"job {azure.outputs.job_name} has no execution {execution!r}; list them with "
                f"`az containerapp job execution list -n {azure.outputs.job_name} -g {azure.outputs.resource_group}`"
            )
        if ex.done:
            return ex, printed
        target = _running_container(job_replicas(azure, execution), container)
        if target is None:
            line = (f"execution {execution} is {ex.status or 'starting'}: waiting for its replica "
                    "(a GPU cold start takes minutes)")
            if line != said:
                note(line)
                said = line
            if not follow or (max_wait_s is not None and waited >= max_wait_s):
                return ex, printed
            sleep(poll_s)
            waited += poll_s
            continue
        replica, endpoint = target
        if said.startswith("execution") or printed:
            note(f"connected to replica {replica}" if not printed else f"reconnecting to replica {replica}")
        said = "connected"
        n = stream_endpoint(azure, endpoint, job_token(azure), follow, tail if not printed else 0, echo,
                            f"streaming execution {execution}")
        printed += n
        if not follow:
            return ex, printed
        if n == 0:
            sleep(poll_s)  # the replica was still starting its container: give it a moment
            waited += poll_s
            if max_wait_s is not None and waited >= max_wait_s:
                return get_execution(azure, execution), printed


def follow_app(azure: Azure, echo: Callable[[str], None], note: Callable[[str], None], follow: bool = True,
               tail: int = 100) -> int:
    """Stream the inference app's latest revision's console output; returns lines printed (0: no replica)."""
    o = azure.outputs
    app_name = o.require("app_name")
    apps = azure.apps()
    what = f"container app {app_name!r}"
    app = call(o, f"reading app {app_name}", apps.container_apps.get, o.resource_group, app_name, what=what,
               role_hint=LOG_READER_HINT)
    revision = getattr(app, "latest_ready_revision_name", None) or getattr(app, "latest_revision_name", None)
    if not revision:
        note(f"app {app_name} has no revision yet")
        return 0
    replicas = call(o, f"listing the replicas of revision {revision}",
                    apps.container_apps_revision_replicas.list_replicas, o.resource_group, app_name, revision,
                    what=what, role_hint=LOG_READER_HINT)
    docs = [
        {"name": r.name, "properties": {"containers": [
            {"name": c.name, "logStreamEndpoint": c.log_stream_endpoint} for c in (r.containers or [])]}}
        for r in (getattr(replicas, "value", None) or [])
    ]
    target = _running_container(docs, None)
    if target is None:
        note(f"app {app_name} (revision {revision}) has no running replica: it scales to zero when idle and starts "
             "on the next request")
        return 0
    replica, endpoint = target
    note(f"app {app_name}: revision {revision}, replica {replica}")
    token = call(o, f"getting a log-stream token for app {app_name}", apps.container_apps.get_auth_token,
                 o.resource_group, app_name, what=what, role_hint=LOG_READER_HINT).token
    return stream_endpoint(azure, endpoint, str(token), follow, tail, echo, f"streaming app {app_name}")


# ---------------------------------------------------------------------------------------------------------------
# Log Analytics
# ---------------------------------------------------------------------------------------------------------------
def _kql_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def history_query(job: str | None = None, execution: str | None = None, app: str | None = None) -> str:
    """KQL over both table families (resource-specific and *_CL), oldest first: console lines and system events."""
    if job is not None:
        ex = _kql_str(execution or "")
        console = f"JobName == {_kql_str(job)} and ContainerGroupName startswith {ex}"
        console_cl = f"ContainerJobName_s == {_kql_str(job)} and ContainerGroupName_s startswith {ex}"
        system = f"JobName == {_kql_str(job)}"
        system_cl = f"JobName_s == {_kql_str(job)}"
    else:
        console = system = f"ContainerAppName == {_kql_str(app or '')}"
        console_cl = system_cl = f"ContainerAppName_s == {_kql_str(app or '')}"
    return (
        "union isfuzzy=true "
        f"(ContainerAppConsoleLogs | where {console} | project TimeGenerated, Source='console', Log), "
        f"(ContainerAppConsoleLogs_CL | where {console_cl} | project TimeGenerated, Source='console', Log=Log_s), "
        f"(ContainerAppSystemLogs | where {system} "
        "| project TimeGenerated, Source='system', Log=strcat(Reason, ': ', Log)), "
        f"(ContainerAppSystemLogs_CL | where {system_cl} "
        "| project TimeGenerated, Source='system', Log=strcat(Reason_s, ': ', Log_s)) "
        "| order by TimeGenerated asc | take 5000"
    )


def query_history(azure: Azure, query: str, start: datetime, end: datetime) -> list[tuple[datetime, str, str]]:
    """(time, console|system, line) rows from the stack's Log Analytics workspace."""
    from azure.core.exceptions import AzureError, HttpResponseError
    from azure.monitor.query import LogsQueryClient, LogsQueryStatus

    o = azure.outputs
    workspace = o.require("log_workspace_id")
    client = LogsQueryClient(azure.credential, **azure.client_kwargs)
    try:
        result = client.query_workspace(workspace, query, timespan=(start, end))
    except HttpResponseError as exc:
        status = getattr(exc, "status_code", None)
        if status == 403:
            raise CloudError(f"reading Log Analytics workspace {workspace}: refused (403); your identity needs "
                             f"{LA_READER_HINT}") from exc
        if status == 404:
            raise CloudError(f"Log Analytics workspace {workspace} was not found; check the stack output "
                             "logAnalyticsWorkspaceId") from exc
        from lorastack.azure.credentials import explain

        raise explain(exc, o, f"querying Log Analytics workspace {workspace}") from exc
    except AzureError as exc:
        from lorastack.azure.credentials import explain

        raise explain(exc, o, f"querying Log Analytics workspace {workspace}") from exc
    if result.status == LogsQueryStatus.PARTIAL:
        tables = result.partial_data
    elif result.status == LogsQueryStatus.SUCCESS:
        tables = result.tables
    else:  # pragma: no cover - FAILURE is raised by the client
        tables = []
    rows: list[tuple[datetime, str, str]] = []
    for table in tables or []:
        cols = list(table.columns)
        for row in table.rows:
            rec = dict(zip(cols, row))
            rows.append((rec.get("TimeGenerated"), str(rec.get("Source") or ""), str(rec.get("Log") or "")))
    return rows


def print_history(rows: list[tuple[datetime, str, str]], echo: Callable[[str], None]) -> None:
    for at, source, line in rows:
        stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(at, datetime) else str(at)
        echo(f"{stamp} {'[system] ' if source == 'system' else ''}{line}")


def execution_window(ex: Execution | None, since: timedelta | None,
                     now: datetime | None = None) -> tuple[datetime, datetime]:
    """The time range to query for an execution: its own run (plus ingestion lag), or the last ``since``."""
    now = now or datetime.now(timezone.utc)
    if since is not None:
        return now - since, now
    start = ex.start if ex is not None and ex.start else now - timedelta(days=1)
    end = (ex.end + INGESTION_LAG) if ex is not None and ex.end else now
    return start - timedelta(minutes=1), min(end, now)
