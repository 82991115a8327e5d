"""An in-memory Azure for tests, at the HTTP boundary: the real SDK clients run unchanged over azure-core's own
``RequestsTransport``; only its ``requests.Session`` is replaced by :class:`FakeAzure`, which answers with the shapes
of the real REST APIs and records every request. No request leaves the process; an unknown host is an error.

Services and their REST shapes: Azure Files ("Create Directory", "Create File", "Put Range", "Get File Properties",
"Get File", "Rename File", "List Directories and Files", "Delete File", "Get Share Properties", "Get Share Stats";
XML errors with x-ms-error-code); ARM Microsoft.App ("Jobs - Get", "Jobs - Start" 202 + Location, "Job Execution -
Get", execution replicas and ``getAuthToken`` as azure-cli calls them, "Container Apps - Get / Update / Get Auth
Token", "Container Apps Revision Replicas - List Replicas", "Available Workload Profiles - Get", "Usages - List");
the ACA log-stream endpoint (text lines, bearer token from getAuthToken); Log Analytics "Query" (tables/columns/
rows); Key Vault secrets 7.x (challenge auth: 401 + WWW-Authenticate first); ARM Microsoft.Resources (providers,
resource group HEAD), Microsoft.Storage (checkNameAvailability, storageAccounts get, regenerateKey),
Microsoft.KeyVault checkNameAvailability, Microsoft.Authorization permissions; the inference app (/readyz, /v1).
Throttling: ``throttle[substring] = n`` answers the next n matching requests 429 with Retry-After.
"""

from __future__ import annotations

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

import requests
import urllib3
from requests.structures import CaseInsensitiveDict

SUB = "00000000-0000-0000-0000-000000000001"
TENANT = "00000000-0000-0000-0000-0000000000aa"
WORKSPACE = "00000000-0000-0000-0000-0000000000bb"
ARM = "management.azure.com"
LOGS_HOST = "api.loganalytics.io"
REGION = "westus3"
STREAM_HOST = f"{REGION}.azurecontainerapps.dev"


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

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def share_path(self, share: str) -> str:
        """The path inside the share ('' for the share root)."""
        p = self.path.lstrip("/")
        assert p == share or p.startswith(share + "/"), self.url
        return p[len(share) + 1 :]

    def describe(self, share: str) -> str:
        """A short form used by assertions: 'PUT dir datasets', 'PUT create runs/x/.tmp-spec.yaml.ab12', ..."""
        if self.host == ARM:
            return f"{self.method} arm {self.path.split('/providers/', 1)[-1]}"
        if not self.host.endswith(".file.core.windows.net"):
            return f"{self.method} {self.host}{self.path}"
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
    """A TokenCredential: hands out a fake bearer token per audience and records the scopes asked for."""

    scopes: list[tuple[str, ...]] = field(default_factory=list)

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken("fake-token-" + scopes[0].split("//")[1].split("/")[0], int(time.time()) + 3600)


class FakeAzure(requests.Session):
    """One subscription: a storage account with one share, an ACA job and app, a Key Vault, Log Analytics."""

    def __init__(self, account: str, share: str, subscription: str, resource_group: str, job: str,
                 app: str = "lorastack-dev-serve", vault: str = "kv-dev-083573"):
        super().__init__()
        self.account, self.share, self.subscription, self.rg, self.job = account, share, subscription, resource_group, job
        self.app, self.vault = app, vault
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {""}
        self.share_quota_gib = 256
        self.share_used: int | None = None  # bytes Get Share Stats reports (default: what the files hold)
        self.requests: list[Recorded] = []
        self.deny_storage: str | None = None  # an x-ms-error-code to answer 403 with
        self.deny_arm: str | None = None
        self.fail_range_of: str | None = None  # Put Range to a path containing this answers 500
        self.throttle: dict[str, int] = {}  # url substring -> how many requests still get 429
        self.missing_group = False  # every ARM call under the resource group answers 404 ResourceGroupNotFound
        # the training job
        self.job_memory = "220Gi"
        self.job_storage_name = "store-k1"
        self.executions: dict[str, list[str]] = {}  # execution -> statuses still to report (last one sticks)
        self.on_execution_get: Any = None  # callback(fake, name) run before answering an execution GET
        self.replicas_after: dict[str, int] = {}  # execution -> replica-list GETs that still answer no replica
        self.exec_logs: dict[str, list[str]] = {}  # execution -> console lines so far
        self.on_stream: Any = None  # callback(fake, execution) after a log stream was served
        self.stream_tokens: set[str] = set()
        self.stream_reject = False  # the log stream answers 401 to every token
        self._ops: dict[str, str] = {}
        # the inference app
        self.app_revision_suffix = "r1"
        self.app_storage_name = "store-k1"
        self.app_replica = True
        self.app_logs = ["INFO: Uvicorn running on http://0.0.0.0:8000"]
        self.app_fqdn = f"{app}.happyhill-1234.{REGION}.azurecontainerapps.io"
        self.app_ready_after = 0  # /readyz answers 503 this many times first
        self.api_keys = {"key-one"}
        self.app_models = ["plant-care@v1"]
        self.app_answer = "Yes, I am up."
        # Key Vault
        self.secrets: dict[str, list[str]] = {}  # name -> versions' values (newest last)
        self.kv_deny: str | None = None  # innererror code for a 403
        # Log Analytics
        self.la_rows: list[list[Any]] = []
        self.la_deny = False
        # ARM catalog for preflight
        self.providers = {ns: "Registered" for ns in (
            "Microsoft.App", "Microsoft.OperationalInsights", "Microsoft.Storage", "Microsoft.KeyVault",
            "Microsoft.ManagedIdentity")}
        self.profile_types = {REGION: ["Consumption", "D4", "Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100"]}
        self.usages: list[dict[str, Any]] = [
            {"unit": "Count", "currentValue": 0, "limit": 24,
             "name": {"value": "ManagedEnvironmentConsumptionNCA100Gpus",
                      "localizedValue": "Managed Environment Consumption NCA100 Gpus"}},
        ]
        self.group_exists = True
        self.taken_names: set[str] = set()  # globally taken storage / vault names
        self.owned_accounts: set[str] = {account}
        self.owned_vaults: set[str] = set()
        self.actions = ["*"]
        self.not_actions: list[str] = []
        self.regenerated: list[str] = []
        self.patches: list[Any] = []

    # -- helpers for tests --------------------------------------------------------------------------------------
    def put(self, path: str, data: bytes) -> None:
        """Place a file on the share directly (as the trainer in the job would)."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            self.dirs.add("/".join(parts[:i]))
        self.files[path] = bytearray(data)

    def storage_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.host.endswith(".file.core.windows.net")]

    def arm_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.host == ARM]

    def log(self) -> list[str]:
        return [r.describe(self.share) for r in self.requests]

    @property
    def job_root(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.rg}/providers/Microsoft.App/jobs/{self.job}"

    @property
    def app_root(self) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{self.rg}/providers/Microsoft.App/"
                f"containerApps/{self.app}")

    # -- the wire -----------------------------------------------------------------------------------------------
    def request(self, method, url, headers=None, data=None, **kwargs):
        body = _read_body(data)
        rec = Recorded(method, url, {k.lower(): str(v) for k, v in (headers or {}).items()}, body)
        self.requests.append(rec)
        for key, left in list(self.throttle.items()):
            if left > 0 and key in url:
                self.throttle[key] = left - 1
                return _json(rec, 429, {"error": {"code": "TooManyRequests", "message": "Rate limit exceeded"}},
                             {"Retry-After": "0"})
        if rec.host == ARM:
            return self._arm(rec)
        if rec.host == f"{self.account}.file.core.windows.net":
            return self._files(rec)
        if rec.host == STREAM_HOST:
            return self._stream(rec)
        if rec.host == LOGS_HOST:
            return self._log_analytics(rec)
        if rec.host == f"{self.vault}.vault.azure.net":
            return self._vault(rec)
        if rec.host == self.app_fqdn:
            return self._app(rec)
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
        if r.method == "GET" and q.get("restype") == "share":
            if q.get("comp") == "stats":
                used = self.share_used if self.share_used is not None else sum(len(v) for v in self.files.values())
                body = ('<?xml version="1.0" encoding="utf-8"?><ShareStats>'
                        f"<ShareUsageBytes>{used}</ShareUsageBytes></ShareStats>").encode()
                return _response(r, 200, {**_file_headers(), "Content-Type": "application/xml"}, body)
            return _response(r, 200, {**_file_headers(), "x-ms-share-quota": str(self.share_quota_gib)})
        if r.method == "DELETE" and q.get("restype") == "directory":
            if p not in self.dirs:
                return _xml_error(r, 404, "ResourceNotFound", "The specified resource does not exist.")
            if any(f.startswith(p + "/") for f in self.files) or any(d.startswith(p + "/") for d in self.dirs):
                return _xml_error(r, 409, "DirectoryNotEmpty", "The specified directory is not empty.")
            self.dirs.discard(p)
            return _response(r, 202, _file_headers())
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
    def _arm_error(self, r: Recorded, status: int, code: str, message: str) -> requests.Response:
        return _json(r, status, {"error": {"code": code, "message": message}})

    def _arm(self, r: Recorded):
        if r.headers.get("authorization") != "Bearer fake-token-management.azure.com":
            return self._arm_error(r, 401, "AuthenticationFailed", "no token")
        sub_root = f"/subscriptions/{self.subscription}"
        rg_root = f"{sub_root}/resourceGroups/{self.rg}"
        ops_root = f"{sub_root}/providers/Microsoft.App/locations/{REGION}"
        path, api, m = r.path, r.query.get("api-version", ""), None
        low = path.lower()
        if self.missing_group and low.startswith(rg_root.lower()):
            return self._arm_error(r, 404, "ResourceGroupNotFound", f"Resource group '{self.rg}' could not be found.")
        # -- jobs
        if r.method == "POST" and path.endswith("/start"):
            if path != f"{self.job_root}/start":
                return self._arm_error(r, 404, "ResourceNotFound", f"{path} not found")
            if self.deny_arm:
                return self._arm_error(r, 403, self.deny_arm, "The client does not have authorization to perform "
                                       "action 'Microsoft.App/jobs/start/action'.")
            op = uuid.uuid4().hex
            name = f"{self.job}-{op[:7]}"
            self._ops[op] = name
            self.executions.setdefault(name, ["Running"])
            return _json(r, 202, None, {
                "Location": f"https://{ARM}{ops_root}/containerappOperationResults/{op}?api-version={api}",
                "Azure-AsyncOperation": f"https://{ARM}{ops_root}/containerappOperationStatuses/{op}?api-version={api}",
                "Retry-After": "0",
            })
        m = re.fullmatch(rf"{re.escape(ops_root)}/containerappOperation(Statuses|Results)/(\w+)", path)
        if r.method == "GET" and m:
            op = m.group(2)
            if m.group(1) == "Statuses":
                return _json(r, 200, {"id": path, "name": op, "status": "Succeeded"})
            name = self._ops[op]
            return _json(r, 200, {"id": f"{self.job_root}/executions/{name}", "name": name})
        if r.method == "GET" and path == self.job_root:
            return _json(r, 200, self._job_doc())
        m = re.fullmatch(rf"{re.escape(self.job_root)}/executions/([\w-]+)(/replicas)?", path)
        if r.method == "GET" and m:
            return self._execution(r, m.group(1), bool(m.group(2)))
        if r.method == "POST" and low == f"{self.job_root}/getauthtoken".lower():
            token = f"stream-{uuid.uuid4().hex[:8]}"
            self.stream_tokens.add(token)
            return _json(r, 200, {"id": self.job_root, "name": self.job, "location": REGION,
                                  "properties": {"token": token, "expires": "2026-12-01T23:59:59Z"}})
        # -- the inference app
        if path == self.app_root and r.method == "GET":
            return _json(r, 200, self._app_doc())
        if path == self.app_root and r.method == "PATCH":
            doc = r.json()
            self.patches.append(doc)
            suffix = (((doc or {}).get("properties") or {}).get("template") or {}).get("revisionSuffix")
            if suffix:
                self.app_revision_suffix = suffix
            return _json(r, 200, self._app_doc())
        m = re.fullmatch(rf"{re.escape(self.app_root)}/revisions/([\w-]+)/replicas", path)
        if r.method == "GET" and m:
            if m.group(1) != f"{self.app}--{self.app_revision_suffix}":
                return self._arm_error(r, 404, "ContainerAppRevisionNotFound", "revision not found")
            value = []
            if self.app_replica:
                rep = f"{m.group(1)}-7d9f8c6b5-x2x7q"
                value.append({"id": f"{path}/{rep}", "name": rep, "properties": {"runningState": "Running",
                              "containers": [{"name": "inference", "ready": True, "runningState": "Running",
                                              "logStreamEndpoint": f"https://{STREAM_HOST}{rg_root}/containerApps/"
                                              f"{self.app}/revisions/{m.group(1)}/replicas/{rep}/containers/"
                                              "inference/logstream"}]}})
            return _json(r, 200, {"value": value})
        if r.method == "POST" and low == f"{self.app_root}/getauthtoken".lower():
            token = f"stream-{uuid.uuid4().hex[:8]}"
            self.stream_tokens.add(token)
            return _json(r, 200, {"id": self.app_root, "location": REGION, "properties": {"token": token}})
        # -- catalog, names, permissions (preflight), keys (rotate-key)
        m = re.fullmatch(rf"{re.escape(sub_root)}/providers/([\w.]+)", path)
        if r.method == "GET" and m:
            ns = m.group(1)
            return _json(r, 200, {"id": path, "namespace": ns, "registrationState": self.providers.get(ns, "NotRegistered"),
                                  "resourceTypes": []})
        m = re.fullmatch(rf"{re.escape(sub_root)}/providers/Microsoft.App/locations/(\w+)/"
                         r"(availableManagedEnvironmentsWorkloadProfileTypes|usages)", path)
        if r.method == "GET" and m:
            loc = m.group(1)
            if loc not in self.profile_types:
                return self._arm_error(r, 404, "LocationNotAvailableForResourceType", f"location {loc} is not available")
            if m.group(2) == "usages":
                return _json(r, 200, {"value": self.usages})
            return _json(r, 200, {"value": [
                {"id": f"{path}/{t}", "name": t, "location": loc,
                 "properties": {"category": "GPU" if "GPU" in t else "GeneralPurpose", "applicability": "LocationDefault",
                                "displayName": t}} for t in self.profile_types[loc]]})
        if r.method == "HEAD" and low == f"{sub_root}/resourcegroups/{self.rg}".lower():
            return _json(r, 204 if self.group_exists else 404, None)
        if r.method == "POST" and path == f"{sub_root}/providers/Microsoft.Storage/checkNameAvailability":
            name = r.json()["name"]
            if name in self.taken_names:
                return _json(r, 200, {"nameAvailable": False, "reason": "AlreadyExists",
                                      "message": f"The storage account named {name} is already taken."})
            return _json(r, 200, {"nameAvailable": True})
        if r.method == "POST" and path == f"{sub_root}/providers/Microsoft.KeyVault/checkNameAvailability":
            name = r.json()["name"]
            if name in self.taken_names:
                return _json(r, 200, {"nameAvailable": False, "reason": "AlreadyExists",
                                      "message": f"The vault name '{name}' is already in use."})
            return _json(r, 200, {"nameAvailable": True})
        m = re.fullmatch(rf"{re.escape(rg_root)}/providers/Microsoft.Storage/storageAccounts/(\w+)(/regenerateKey)?", path)
        if m:
            acct = m.group(1)
            if acct not in self.owned_accounts:
                return self._arm_error(r, 404, "ResourceNotFound", f"storage account {acct} not found")
            if m.group(2) and r.method == "POST":
                key = r.json()["keyName"]
                self.regenerated.append(key)
                return _json(r, 200, {"keys": [{"keyName": "key1", "value": "S3CRET-KEY-ONE==", "permissions": "FULL"},
                                               {"keyName": "key2", "value": "S3CRET-KEY-TWO==", "permissions": "FULL"}]})
            return _json(r, 200, {"id": path, "name": acct, "location": REGION, "kind": "StorageV2",
                                  "sku": {"name": "Standard_LRS"}, "properties": {}})
        m = re.fullmatch(rf"{re.escape(rg_root)}/providers/Microsoft.KeyVault/vaults/([\w-]+)", path)
        if m and r.method == "GET":
            if m.group(1) not in self.owned_vaults:
                return self._arm_error(r, 404, "ResourceNotFound", f"vault {m.group(1)} not found")
            return _json(r, 200, {"id": path, "name": m.group(1), "location": REGION, "properties": {}})
        if r.method == "GET" and path.endswith("/providers/Microsoft.Authorization/permissions"):
            return _json(r, 200, {"value": [{"actions": self.actions, "notActions": self.not_actions,
                                             "dataActions": [], "notDataActions": []}]})
        return self._arm_error(r, 404, "ResourceNotFound", f"{r.method} {path}")

    def _job_doc(self) -> dict[str, Any]:
        env = (f"/subscriptions/{self.subscription}/resourceGroups/{self.rg}/providers/Microsoft.App/"
               "managedEnvironments/cae-lorastack-dev")
        return {"id": self.job_root, "name": self.job, "type": "Microsoft.App/jobs", "location": REGION,
                "properties": {
                    "provisioningState": "Succeeded", "environmentId": env, "workloadProfileName": "nc24-a100",
                    "eventStreamEndpoint": f"https://{STREAM_HOST}/subscriptions/{self.subscription}/resourceGroups/"
                                           f"{self.rg}/jobs/{self.job}/eventstream",
                    "configuration": {"triggerType": "Manual", "replicaTimeout": 14400, "replicaRetryLimit": 1},
                    "template": {
                        "containers": [{"name": "trainer", "image": "ghcr.io/lorastack/trainer:0.1.0",
                                        "resources": {"cpu": 24, "memory": self.job_memory},
                                        "volumeMounts": [{"volumeName": "store", "mountPath": "/mnt/store"}]}],
                        "volumes": [{"name": "store", "storageType": "AzureFile", "storageName": self.job_storage_name}],
                    }}}

    def _app_doc(self) -> dict[str, Any]:
        rev = f"{self.app}--{self.app_revision_suffix}"
        return {"id": self.app_root, "name": self.app, "type": "Microsoft.App/containerApps", "location": REGION,
                "properties": {
                    "provisioningState": "Succeeded", "latestRevisionName": rev, "latestReadyRevisionName": rev,
                    "configuration": {"activeRevisionsMode": "Single",
                                      "ingress": {"fqdn": self.app_fqdn, "external": True, "targetPort": 8000}},
                    "template": {
                        "revisionSuffix": self.app_revision_suffix,
                        "containers": [{"name": "inference", "image": "ghcr.io/lorastack/inference:0.1.0",
                                        "resources": {"cpu": 8, "memory": "56Gi"}}],
                        "volumes": [{"name": "store", "storageType": "AzureFile", "storageName": self.app_storage_name}],
                        "scale": {"minReplicas": 0, "maxReplicas": 1}}}}

    def _execution(self, r: Recorded, name: str, replicas: bool):
        if self.on_execution_get and not replicas:
            self.on_execution_get(self, name)
        if name not in self.executions:
            return self._arm_error(r, 404, "ResourceNotFound", f"execution {name} not found")
        states = self.executions[name]
        if replicas:
            left = self.replicas_after.get(name, 0)
            if left > 0 or states[0] in ("Succeeded", "Failed", "Stopped"):
                self.replicas_after[name] = left - 1
                return _json(r, 200, {"value": []})
            rep = f"{name}-abcde"
            endpoint = (f"https://{STREAM_HOST}/subscriptions/{self.subscription}/resourceGroups/{self.rg}/jobs/"
                        f"{self.job}/executions/{name}/replicas/{rep}/containers/trainer/logstream")
            return _json(r, 200, {"value": [{"id": f"{r.path}/{rep}", "name": rep,
                                             "type": "Microsoft.App/jobs/executions/replicas",
                                             "properties": {"runningState": "Running", "containers": [
                                                 {"name": "trainer", "ready": True, "started": True,
                                                  "runningState": "Running", "logStreamEndpoint": endpoint}]}}]})
        status = states.pop(0) if len(states) > 1 else states[0]
        props = {"status": status, "startTime": "2026-11-28T12:00:00Z"}
        if status in ("Succeeded", "Failed", "Stopped"):
            props["endTime"] = "2026-11-28T12:30:00Z"
        return _json(r, 200, {"id": r.path, "name": name, "type": "Microsoft.App/jobs/executions", "properties": props})

    # -- ACA log stream -----------------------------------------------------------------------------------------
    def _stream(self, r: Recorded):
        token = r.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.stream_tokens or self.stream_reject:
            return _response(r, 401, {"Content-Type": "text/plain"}, b"Unauthorized")
        q = r.query
        assert q.get("output") == "text" and q.get("follow") in ("true", "false"), r.url
        tail = int(q.get("tailLines", "0"))
        m = re.search(r"/jobs/[\w-]+/executions/([\w-]+)/replicas/", r.path)
        if m:
            execution = m.group(1)
            lines = self.exec_logs.get(execution, [])
            pos = getattr(self, "_stream_pos", {}).get(execution)
            chunk = lines[-tail:] if pos is None and tail else lines[pos or 0:] if pos is not None else []
            self._stream_pos = {**getattr(self, "_stream_pos", {}), execution: len(lines)}
            if self.on_stream:
                self.on_stream(self, execution)
        else:
            chunk = self.app_logs[-tail:] if tail else []
        body = "".join(f"2026-11-28T12:00:{i:02d}.000Z {line}\n" for i, line in enumerate(chunk)).encode()
        return _response(r, 200, {"Content-Type": "text/plain; charset=utf-8"}, body)

    # -- Log Analytics ------------------------------------------------------------------------------------------
    def _log_analytics(self, r: Recorded):
        if r.headers.get("authorization") != "Bearer fake-token-api.loganalytics.io":
            return _json(r, 401, {"error": {"code": "AuthorizationRequiredError", "message": "no token"}})
        m = re.fullmatch(r"/v1/workspaces/([\w-]+)/query", r.path)
        if r.method != "POST" or not m:
            return _json(r, 404, {"error": {"code": "PathNotFoundError", "message": r.path}})
        if self.la_deny:
            return _json(r, 403, {"error": {"code": "InsufficientAccessError",
                                            "message": "The provided credentials have insufficient access"}})
        if m.group(1) != WORKSPACE:
            return _json(r, 404, {"error": {"code": "WorkspaceNotFoundError", "message": "workspace not found"}})
        self.la_queries = [*getattr(self, "la_queries", []), r.json()]
        return _json(r, 200, {"tables": [{"name": "PrimaryResult", "columns": [
            {"name": "TimeGenerated", "type": "datetime"}, {"name": "Source", "type": "string"},
            {"name": "Log", "type": "string"}], "rows": self.la_rows}]})

    # -- Key Vault ----------------------------------------------------------------------------------------------
    def _vault(self, r: Recorded):
        if r.headers.get("authorization") != "Bearer fake-token-vault.azure.net":
            return _json(r, 401, {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer"}},
                         {"WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                                             'resource="https://vault.azure.net"'})
        if self.kv_deny:
            return _json(r, 403, {"error": {"code": "Forbidden", "message": (
                "Caller is not authorized to perform action on resource." if self.kv_deny == "ForbiddenByRbac"
                else "Client address is not authorized and caller is not a trusted service. ForbiddenByFirewall"),
                "innererror": {"code": self.kv_deny}}})
        base = f"https://{self.vault}.vault.azure.net"
        now = int(time.time())
        attrs = {"enabled": True, "created": now, "updated": now, "recoveryLevel": "Recoverable"}
        m = re.fullmatch(r"/(secrets|deletedsecrets)(?:/([\w-]+))?(?:/(\w*))?", r.path)
        if not m:
            return _json(r, 404, {"error": {"code": "NotFound", "message": r.path}})
        kind, name = m.group(1), m.group(2)
        if kind == "secrets" and name is None and r.method == "GET":
            return _json(r, 200, {"value": [{"id": f"{base}/secrets/{n}", "attributes": attrs}
                                            for n in sorted(self.secrets)], "nextLink": None})
        if kind == "secrets" and r.method == "PUT":
            self.secrets.setdefault(name, []).append(r.json()["value"])
            version = uuid.uuid4().hex
            return _json(r, 200, {"value": r.json()["value"], "id": f"{base}/secrets/{name}/{version}",
                                  "attributes": attrs})
        if kind == "secrets" and r.method == "GET":
            if name not in self.secrets:
                return _json(r, 404, {"error": {"code": "SecretNotFound", "message": f"A secret with (name/id) {name} "
                                                "was not found in this key vault."}})
            return _json(r, 200, {"value": self.secrets[name][-1], "id": f"{base}/secrets/{name}/v1",
                                  "attributes": attrs})
        if kind == "secrets" and r.method == "DELETE":
            if name not in self.secrets:
                return _json(r, 404, {"error": {"code": "SecretNotFound", "message": f"{name} was not found"}})
            self.secrets.pop(name)
            self.deleted = {*getattr(self, "deleted", set()), name}
            return _json(r, 200, {"recoveryId": f"{base}/deletedsecrets/{name}", "deletedDate": now,
                                  "scheduledPurgeDate": now + 7 * 86400, "id": f"{base}/secrets/{name}/v1",
                                  "attributes": attrs})
        if kind == "deletedsecrets" and r.method == "GET" and name in getattr(self, "deleted", set()):
            return _json(r, 200, {"recoveryId": f"{base}/deletedsecrets/{name}", "deletedDate": now,
                                  "scheduledPurgeDate": now + 7 * 86400, "id": f"{base}/secrets/{name}/v1",
                                  "attributes": attrs})
        return _json(r, 404, {"error": {"code": "NotFound", "message": r.path}})

    # -- the inference app (lorastack serve behind ACA ingress) -------------------------------------------------
    def _app(self, r: Recorded):
        if r.path == "/readyz":
            if self.app_ready_after > 0:
                self.app_ready_after -= 1
                return _json(r, 503, {"status": "loading", "detail": "loading the base model"})
            return _json(r, 200, {"status": "ready"})
        key = r.headers.get("authorization", "").removeprefix("Bearer ")
        if r.path.startswith("/v1/") and key not in self.api_keys:
            return _json(r, 401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                            "code": "invalid_api_key"}})
        if r.path == "/v1/models":
            return _json(r, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.app_models]})
        if r.path == "/v1/chat/completions" and r.method == "POST":
            req = r.json()
            if req.get("model") not in self.app_models:
                return _json(r, 404, {"error": {"message": f"The model {req.get('model')!r} does not exist",
                                                "type": "invalid_request_error", "code": "model_not_found"}})
            return _json(r, 200, {"id": "chatcmpl-1", "object": "chat.completion", "model": req["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": self.app_answer}}]})
        return _json(r, 404, {"error": {"message": "Not Found"}})


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




def client_kwargs(fake: FakeAzure, retries: int = 0) -> dict[str, Any]:
    """What every SDK client gets in a test: the fake as its transport's session, no retries unless asked."""
    from azure.core.pipeline.transport import RequestsTransport

    # backoff 0: a retried test does not sleep (Retry-After from the fake is 0 s too)
    return {"transport": RequestsTransport(session=fake, session_owner=False), "retry_total": retries,
            "retry_backoff_factor": 0.0}


def make_fake() -> FakeAzure:
    return FakeAzure("lorastackdev01", "store", SUB, "rg-lorastack-dev", "job-train-dev")


def outputs_doc(fake: FakeAzure, **extra: Any) -> dict[str, Any]:
    """What `pulumi stack output --json --show-secrets=false` prints for a provisioned stack."""
    return {
        "subscriptionId": fake.subscription,
        "resourceGroupName": fake.rg,
        "acaJobName": fake.job,
        "storageAccountName": fake.account,
        "fileShareName": fake.share,
        "location": REGION,
        "storeMountPath": "/mnt/store",
        "acaAppName": fake.app,
        "acaAppEndpoint": f"https://{fake.app_fqdn}",
        "keyVaultName": fake.vault,
        "keyVaultUri": f"https://{fake.vault}.vault.azure.net/",
        "environmentName": "cae-lorastack-dev",
        "environmentStorageName": "store-k1",
        "logAnalyticsWorkspaceId": WORKSPACE,
        **extra,
    }


AMBIENT_VARS = (
    "LORASTACK_OUTPUTS", "LORASTACK_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID", "LORASTACK_RESOURCE_GROUP",
    "LORASTACK_JOB_NAME", "LORASTACK_STORAGE_ACCOUNT", "LORASTACK_SHARE_NAME", "LORASTACK_APP_NAME",
    "LORASTACK_APP_ENDPOINT", "LORASTACK_KEY_VAULT_URI", "LORASTACK_LOG_WORKSPACE_ID", "LORASTACK_API_KEY",
    "LORASTACK_DEBUG", "LORASTACK_LOCATION",
)


# -- fixtures (import them into a test module: `from azure_fakes import fake, outputs_file, no_ambient_azure`) -----
import pytest


@pytest.fixture
def fake() -> FakeAzure:
    return make_fake()


@pytest.fixture
def outputs_file(tmp_path, fake):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(outputs_doc(fake)))
    return path


@pytest.fixture(autouse=True)
def no_ambient_azure(monkeypatch):
    """No variable of the developer's shell changes what a test sees."""
    for var in AMBIENT_VARS:
        monkeypatch.delenv(var, raising=False)
