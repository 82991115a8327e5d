"""``lorastack finetune JOB.yaml`` (cloud) and ``lorastack status``, tested at the HTTP boundary.

The real Azure SDK clients (azure-storage-file-share, azure-mgmt-appcontainers) run unchanged over azure-core's
own ``RequestsTransport``; only its ``requests.Session`` is replaced by ``FakeAzure`` below, an in-memory storage
account + ACA job answering with the shapes of the real REST APIs and recording every request. Shapes follow the
REST references: Azure Files "Create Directory", "Create File", "Put Range", "Get File Properties", "Get File",
"Rename File", "List Directories and Files", "Delete File" (XML errors with x-ms-error-code); ARM "Jobs - Start"
(202 + Location / Azure-AsyncOperation, then the JobExecutionBase body) and "Job Execution - Get".
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest
import requests
import urllib3
import yaml
from requests.structures import CaseInsensitiveDict

from lorastack import cloud
from lorastack.commands import cloud as cloud_cmd
from lorastack.cli import build_parser
from lorastack.store import Store

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "jobs" / "examples" / "plant-care.yaml"
SUB = "00000000-0000-0000-0000-000000000001"

ARM = "management.azure.com"


@dataclass
class Recorded:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.url).path)

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.url).query, keep_blank_values=True).items()}

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def share_path(self, share: str) -> str:
        """The path inside the share ('' for the share root)."""
        p = self.path.lstrip("/")
        assert p == share or p.startswith(share + "/"), self.url
        return p[len(share) + 1 :]

    def describe(self, share: str) -> str:
        """A short form used by assertions: 'PUT dir datasets', 'PUT create runs/x/.tmp-spec.yaml.ab12', ..."""
        if self.host == ARM:
            return f"{self.method} arm {self.path.split('/providers/', 1)[-1]}"
        p, q = self.share_path(share), self.query
        if q.get("comp") == "rename":
            return f"RENAME {self.headers['x-ms-file-rename-source'].split('/' + share + '/', 1)[-1]} -> {p}"
        if q.get("comp") == "range":
            return f"PUT range {p}"
        if q.get("restype") == "directory" and self.method == "PUT":
            return f"PUT dir {p}"
        if q.get("comp") == "list":
            return f"LIST {p}"
        if self.method == "PUT":
            return f"PUT create {p}"
        return f"{self.method} {p}"


@dataclass
class FakeCredential:
    """A TokenCredential: hands out a fake bearer token and records the scopes asked for."""

    scopes: list[tuple[str, ...]] = field(default_factory=list)

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken("fake-token-" + scopes[0].split("//")[1].split("/")[0], int(time.time()) + 3600)


class FakeAzure(requests.Session):
    """One storage account (one share) and one ACA job, in memory."""

    def __init__(self, account: str, share: str, subscription: str, resource_group: str, job: str):
        super().__init__()
        self.account, self.share, self.subscription, self.rg, self.job = (
            account,
            share,
            subscription,
            resource_group,
            job,
        )
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {""}
        self.requests: list[Recorded] = []
        self.deny_storage: str | None = None  # an x-ms-error-code to answer 403 with
        self.deny_arm: str | None = None
        self.fail_range_of: str | None = None  # Put Range to a path containing this answers 500
        self.executions: dict[
            str, list[str]
        ] = {}  # execution name -> statuses still to report (last one sticks)
        self.on_execution_get: Any = None  # callback(fake, name) run before answering an execution GET
        self._ops: dict[str, str] = {}

    # -- helpers for tests --------------------------------------------------------------------------------------
    def put(self, path: str, data: bytes) -> None:
        """Place a file on the share directly (as the trainer in the job would)."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            self.dirs.add("/".join(parts[:i]))
        self.files[path] = bytearray(data)

    def storage_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.host != ARM]

    def arm_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.host == ARM]

    def log(self) -> list[str]:
        return [r.describe(self.share) for r in self.requests]

    # -- the wire -----------------------------------------------------------------------------------------------
    def request(self, method, url, headers=None, data=None, **kwargs):
        body = _read_body(data)
        rec = Recorded(method, url, {k.lower(): str(v) for k, v in (headers or {}).items()}, body)
        self.requests.append(rec)
        if rec.host == ARM:
            return self._arm(rec)
        if rec.host == f"{self.account}.file.core.windows.net":
            return self._files(rec)
        raise requests.ConnectionError(f"unexpected host in test: {url}")

    # -- Azure Files REST ---------------------------------------------------------------------------------------
    def _files(self, r: Recorded):
        auth = r.headers.get("authorization", "")
        if not auth.startswith("Bearer fake-token-storage.azure.com"):
            return _xml_error(r, 401, "InvalidAuthenticationInfo", "Authentication information is not given.")
        if r.headers.get("x-ms-file-request-intent") != "backup":
            return _xml_error(
                r, 400, "MissingRequiredHeader", "x-ms-file-request-intent is required for OAuth."
            )
        if self.deny_storage:
            return _xml_error(
                r,
                403,
                self.deny_storage,
                "This request is not authorized to perform this operation using this permission.",
            )
        p, q = r.share_path(self.share), r.query
        parent = p.rpartition("/")[0]
        if r.method == "PUT" and q.get("restype") == "directory":
            if p in self.dirs:
                return _xml_error(r, 409, "ResourceAlreadyExists", "The specified resource already exists.")
            if parent not in self.dirs:
                return _xml_error(r, 404, "ParentNotFound", "The specified parent path does not exist.")
            self.dirs.add(p)
            return _response(r, 201, _file_headers())
        if r.method == "PUT" and q.get("comp") == "range":
            if self.fail_range_of and self.fail_range_of in p:
                return _xml_error(r, 500, "InternalError", "The server encountered an internal error.")
            if p not in self.files:
                return _xml_error(r, 404, "ResourceNotFound", "The specified resource does not exist.")
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.headers.get("x-ms-range") or r.headers.get("range", ""))
            start, end = int(m.group(1)), int(m.group(2))
            assert len(r.body) == end - start + 1, "Put Range body does not match x-ms-range"
            assert end < len(self.files[p]), "Put Range beyond the file size"
            self.files[p][start : end + 1] = r.body
            return _response(r, 201, _file_headers())
        if r.method == "PUT" and q.get("comp") == "rename":
            src = unquote(urlsplit(r.headers["x-ms-file-rename-source"]).path).lstrip("/")[
                len(self.share) + 1 :
            ]
            if src not in self.files:
                return _xml_error(r, 404, "ResourceNotFound", "The specified resource does not exist.")
            if p in self.files and r.headers.get("x-ms-file-rename-replace-if-exists") != "true":
                return _xml_error(r, 409, "ResourceAlreadyExists", "The specified resource already exists.")
            self.files[p] = self.files.pop(src)
            return _response(r, 200, _file_headers())
        if r.method == "PUT":
            assert r.headers.get("x-ms-type", "").lower() == "file", r.headers
            if parent not in self.dirs:
                return _xml_error(r, 404, "ParentNotFound", "The specified parent path does not exist.")
            self.files[p] = bytearray(int(r.headers["x-ms-content-length"]))
            return _response(r, 201, _file_headers())
        if r.method == "HEAD":
            if p not in self.files:
                return _response(r, 404, {"x-ms-error-code": "ResourceNotFound"})
            return _response(
                r, 200, {**_file_headers(), "Content-Length": str(len(self.files[p])), "x-ms-type": "File"}
            )
        if r.method == "GET" and q.get("comp") == "list":
            if p not in self.dirs:
                return _xml_error(r, 404, "ResourceNotFound", "The specified resource does not exist.")
            return _response(r, 200, {"Content-Type": "application/xml"}, self._listing(p))
        if r.method == "GET":
            if p not in self.files:
                return _xml_error(r, 404, "ResourceNotFound", "The specified resource does not exist.")
            data = bytes(self.files[p])
            m = re.fullmatch(
                r"bytes=(\d+)-(\d+)", r.headers.get("x-ms-range") or r.headers.get("range") or ""
            )
            if not m:
                return _response(r, 200, {**_file_headers(), "x-ms-type": "File"}, data)
            start, end = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
            headers = {
                **_file_headers(),
                "x-ms-type": "File",
                "Content-Range": f"bytes {start}-{end}/{len(data)}",
            }
            return _response(r, 206, headers, data[start : end + 1])
        if r.method == "DELETE":
            if self.files.pop(p, None) is None:
                return _xml_error(r, 404, "ResourceNotFound", "The specified resource does not exist.")
            return _response(r, 202, _file_headers())
        return _xml_error(r, 400, "UnsupportedHttpVerb", f"{r.method} is not supported here")

    def _listing(self, d: str) -> bytes:
        prefix = d + "/" if d else ""
        entries = []
        for sub in sorted(self.dirs):
            if sub and sub.startswith(prefix) and "/" not in sub[len(prefix) :]:
                entries.append(
                    f"<Directory><Name>{escape(sub[len(prefix) :])}</Name><Properties /></Directory>"
                )
        for f in sorted(self.files):
            if f.startswith(prefix) and "/" not in f[len(prefix) :]:
                entries.append(
                    f"<File><Name>{escape(f[len(prefix) :])}</Name><Properties>"
                    f"<Content-Length>{len(self.files[f])}</Content-Length></Properties></File>"
                )
        return (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<EnumerationResults ServiceEndpoint="https://{self.account}.file.core.windows.net/" '
            f'ShareName="{self.share}" DirectoryPath="{escape(d)}"><Entries>{"".join(entries)}</Entries>'
            "<NextMarker /></EnumerationResults>"
        ).encode()

    # -- ARM ----------------------------------------------------------------------------------------------------
    def _arm(self, r: Recorded):
        if r.headers.get("authorization") != "Bearer fake-token-management.azure.com":
            return _json(r, 401, {"error": {"code": "AuthenticationFailed", "message": "no token"}})
        job_root = f"/subscriptions/{self.subscription}/resourceGroups/{self.rg}/providers/Microsoft.App/jobs/{self.job}"
        ops_root = f"/subscriptions/{self.subscription}/providers/Microsoft.App/locations/eastus"
        api = r.query.get("api-version", "")
        if r.method == "POST" and r.path.endswith("/start"):
            if r.path != f"{job_root}/start":
                return _json(
                    r, 404, {"error": {"code": "ResourceNotFound", "message": f"{r.path} not found"}}
                )
            if self.deny_arm:
                return _json(
                    r,
                    403,
                    {
                        "error": {
                            "code": self.deny_arm,
                            "message": "The client does not have "
                            "authorization to perform action 'Microsoft.App/jobs/start/action'.",
                        }
                    },
                )
            op = uuid.uuid4().hex
            name = f"{self.job}-{op[:7]}"
            self._ops[op] = name
            self.executions.setdefault(name, ["Running"])
            return _json(
                r,
                202,
                None,
                {
                    "Location": f"https://{ARM}{ops_root}/containerappOperationResults/{op}?api-version={api}",
                    "Azure-AsyncOperation": f"https://{ARM}{ops_root}/containerappOperationStatuses/{op}?api-version={api}",
                    "Retry-After": "0",
                },
            )
        m = re.fullmatch(rf"{re.escape(ops_root)}/containerappOperation(Statuses|Results)/(\w+)", r.path)
        if r.method == "GET" and m:
            op = m.group(2)
            if m.group(1) == "Statuses":
                return _json(r, 200, {"id": r.path, "name": op, "status": "Succeeded"})
            name = self._ops[op]
            return _json(r, 200, {"id": f"{job_root}/executions/{name}", "name": name})
        m = re.fullmatch(rf"{re.escape(job_root)}/executions/([\w-]+)", r.path)
        if r.method == "GET" and m:
            name = m.group(1)
            if self.on_execution_get:
                self.on_execution_get(self, name)
            if name not in self.executions:
                return _json(
                    r, 404, {"error": {"code": "ResourceNotFound", "message": f"execution {name} not found"}}
                )
            states = self.executions[name]
            status = states.pop(0) if len(states) > 1 else states[0]
            return _json(
                r,
                200,
                {
                    "id": r.path,
                    "name": name,
                    "type": "Microsoft.App/jobs/executions",
                    "properties": {"status": status, "startTime": "2026-11-28T12:00:00Z"},
                },
            )
        return _json(r, 404, {"error": {"code": "ResourceNotFound", "message": f"{r.method} {r.path}"}})


def _read_body(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode()
    if hasattr(data, "read"):
        return data.read()
    return b"".join(bytes(chunk) for chunk in data)


def _file_headers() -> dict[str, str]:
    return {
        "ETag": f'"0x{uuid.uuid4().hex[:15].upper()}"',
        "Last-Modified": formatdate(usegmt=True),
        "x-ms-request-id": str(uuid.uuid4()),
        "x-ms-version": "2025-11-05",
        "Date": formatdate(usegmt=True),
    }


def _response(r: Recorded, status: int, headers: dict[str, str], body: bytes = b"") -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.reason = {200: "OK", 201: "Created", 202: "Accepted", 206: "Partial Content"}.get(status, "Error")
    resp.url = r.url
    hdrs = CaseInsensitiveDict(headers)
    if r.method != "HEAD":
        hdrs.setdefault("Content-Length", str(len(body)))
    resp.headers = hdrs
    resp.raw = urllib3.HTTPResponse(
        body=io.BytesIO(b"" if r.method == "HEAD" else body),
        headers=dict(hdrs),
        status=status,
        preload_content=False,
        request_method=r.method,
    )
    resp.request = requests.Request(r.method, r.url, headers=r.headers).prepare()
    return resp


def _xml_error(r: Recorded, status: int, code: str, message: str) -> requests.Response:
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
        f"<Message>{escape(message)}\nRequestId:{uuid.uuid4()}\nTime:2026-11-28T12:00:00.0000000Z</Message></Error>"
    ).encode()
    return _response(r, status, {"x-ms-error-code": code, "Content-Type": "application/xml"}, body)


def _json(r: Recorded, status: int, obj: Any, headers: dict[str, str] | None = None) -> requests.Response:
    body = b"" if obj is None else json.dumps(obj).encode()
    hdrs = {
        "Content-Type": "application/json; charset=utf-8",
        "x-ms-request-id": str(uuid.uuid4()),
        **(headers or {}),
    }
    return _response(r, status, hdrs, body)


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake() -> FakeAzure:
    return FakeAzure("lorastackdev01", "store", SUB, "rg-lorastack-dev", "job-train-dev")


@pytest.fixture
def outputs_file(tmp_path, fake):
    """What `pulumi stack output --json --show-secrets=false` prints for a provisioned stack."""
    path = tmp_path / "outputs.json"
    path.write_text(
        json.dumps(
            {
                "subscriptionId": fake.subscription,
                "resourceGroupName": fake.rg,
                "acaJobName": fake.job,
                "storageAccountName": fake.account,
                "fileShareName": fake.share,
                "location": "swedencentral",
                "storeMountPath": "/mnt/store",
                "acaAppEndpoint": "https://app.example",
            }
        )
    )
    return path


@pytest.fixture(autouse=True)
def _no_ambient_azure_env(monkeypatch):
    for var in (
        "LORASTACK_OUTPUTS",
        "LORASTACK_SUBSCRIPTION_ID",
        "AZURE_SUBSCRIPTION_ID",
        "LORASTACK_RESOURCE_GROUP",
        "LORASTACK_JOB_NAME",
        "LORASTACK_STORAGE_ACCOUNT",
        "LORASTACK_SHARE_NAME",
    ):
        monkeypatch.delenv(var, raising=False)


def client_kwargs(fake: FakeAzure) -> dict[str, Any]:
    from azure.core.pipeline.transport import RequestsTransport

    return {"transport": RequestsTransport(session=fake, session_owner=False), "retry_total": 0}


def submit(fake, argv, cred=None, **kw) -> int:
    args = build_parser().parse_args(["finetune", *argv])
    return cloud_cmd.submit_command(
        args, credential=cred or FakeCredential(), client_kwargs=client_kwargs(fake), **kw
    )


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
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == cloud.EXIT_FAILED
    assert "HTTP 500 InternalError" in capsys.readouterr().err
    assert [f.split("/")[0] for f in fake.files] == ["datasets", "datasets"]  # whole datasets only
    assert not fake.arm_requests()
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
    assert rc == cloud.EXIT_FAILED and time.monotonic() - t0 < 2
    assert expect in capsys.readouterr().err
    assert fake.requests == [] and cred.scopes == []  # nothing uploaded, nothing started, no token asked for


def test_storage_403_names_the_missing_role_and_starts_nothing(fake, outputs_file, capsys):
    fake.deny_storage = "AuthorizationPermissionMismatch"
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == cloud.EXIT_FAILED
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
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == cloud.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Storage File Data Privileged Contributor" in err and "firewall" in err


def test_job_start_refused_says_the_run_is_queued_and_how_to_start_it(fake, outputs_file, capsys):
    fake.deny_arm = "AuthorizationFailed"
    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)]) == cloud.EXIT_FAILED
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

    assert submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file)], NoCredential()) == cloud.EXIT_FAILED
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
    assert submit(fake, [str(EXAMPLE), "--outputs", str(partial)]) == cloud.EXIT_FAILED
    err = capsys.readouterr().err
    assert "missing stack output 'acaJobName' (training job name)" in err
    assert "missing stack output 'fileShareName'" in err and "$LORASTACK_SHARE_NAME" in err
    assert "pulumi stack output --json" in err
    assert fake.requests == []
    assert submit(fake, [str(EXAMPLE)]) == cloud.EXIT_FAILED  # no file, no env
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
    assert cloud.load_outputs(toolkit).job_name == "job-x"
    env = {
        "AZURE_SUBSCRIPTION_ID": SUB,
        "LORASTACK_RESOURCE_GROUP": "rg",
        "LORASTACK_JOB_NAME": "job-y",
        "LORASTACK_STORAGE_ACCOUNT": "acct02",
        "LORASTACK_SHARE_NAME": "share-1",
    }
    o = cloud.load_outputs(None, env)
    assert (o.job_name, o.account_url) == ("job-y", "https://acct02.file.core.windows.net")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(toolkit.read_text()), "STORAGE_ACCOUNT_NAME": "Not_An-Account"}))
    with pytest.raises(
        cloud.CloudError, match=r"bad.json: STORAGE_ACCOUNT_NAME: 'Not_An-Account' is not a valid"
    ):
        cloud.load_outputs(bad)
    with pytest.raises(cloud.CloudError, match="no such file"):
        cloud.load_outputs(tmp_path / "nope.json")


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
    assert status(fake, ["nope-123", "--outputs", str(outputs_file)]) == cloud.EXIT_FAILED
    assert "no run 'nope-123'" in capsys.readouterr().err


def test_wait_follows_the_execution_that_claimed_the_run_until_it_succeeds(fake, outputs_file, capsys):
    polls = []

    def trainer_progress(fake, name):
        """What the job does between polls: claim the run, train, publish."""
        polls.append(name)
        run_id = next((f.split("/")[1] for f in fake.files if f.startswith("queue/")), None) or fake.run_id
        fake.run_id = run_id
        step = len(polls)
        if step == 1:
            fake.files.pop(f"queue/{run_id}")
            fake.put(f"claims/{run_id}", f"{name}\n".encode())
        doc = {"phase": "training", "step": step * 10, "max_steps": 30, "loss": 2.0 / step}
        if step >= 3:
            doc = {"phase": "succeeded", "adapter": "plant-care@v1"}
            fake.executions[name] = ["Succeeded"]
        fake.put(f"runs/{run_id}/status.json", json.dumps(doc).encode())

    fake.on_execution_get = trainer_progress
    rc = submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file), "--wait"], poll_seconds=0)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "step 20/30 | loss 1.0000" in err and "succeeded" in err and "adapter plant-care@v1" in err


def test_wait_reports_an_execution_that_ended_without_finishing_the_run(fake, outputs_file, capsys):
    def crashed(fake, name):
        run_id = next(f.split("/")[1] for f in fake.files if f.startswith("runs/"))
        fake.put(f"claims/{run_id}", f"{name}\n".encode())
        fake.files.pop(f"queue/{run_id}", None)
        fake.put(f"runs/{run_id}/status.json", json.dumps({"phase": "loading"}).encode())
        fake.executions[name] = ["Failed"]

    fake.on_execution_get = crashed
    rc = submit(fake, [str(EXAMPLE), "--outputs", str(outputs_file), "--wait"], poll_seconds=0)
    assert rc == cloud.EXIT_FAILED
    assert "ended (Failed) while the run was loading; see the logs" in capsys.readouterr().err


def test_cloud_module_and_cli_help_import_no_azure_sdk():
    import subprocess
    import sys

    code = (
        "import sys, lorastack.cloud; from lorastack.cli import build_parser; build_parser().parse_args(['status'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'azure'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class RegexMatch(str):
    """Compares equal to any string the pattern fully matches (for readable list assertions)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(str(self), other) is not None

    __hash__ = str.__hash__


def test_status_through_the_cli_entry_point_without_outputs_says_how_to_get_them(capsys):
    from lorastack.cli import main

    assert main(["status", "plant-care-e01ff66e6748"]) == cloud.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("lorastack status: missing stack output 'subscriptionId'") and "--outputs FILE" in err
