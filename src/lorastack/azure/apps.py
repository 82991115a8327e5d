"""The inference app: its endpoint smoke test, a new revision (restart), and the AI Toolkit config files.

``endpoint``: the inference URL from the stack outputs, ``/readyz`` (waiting through a scale-from-zero cold start),
then one authenticated chat completion: the verdict a user needs before pointing a client at it.
``restart``: a new revision (the template's ``revisionSuffix`` changes), so the app pulls its image again and
resolves its Key Vault secrets again: the AI Toolkit's "deploy for inference". The next ``pulumi up`` sets the
suffix back, which rolls one more revision with the same settings.
``export_aitk``: ``infra/finetuning.config.json`` and ``infra/inference.config.json`` in the AI Toolkit's key names,
from the real stack outputs (the mapping lives in ``provisioning.outputs``), so the VS Code extension works against
our stacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorastack.azure.credentials import Azure, CloudError, call

SMOKE_PROMPT = "Reply with one short sentence: are you up?"
RESTART_HINT = "a role allowing Microsoft.App/containerApps/write on the app (e.g. Contributor on the resource group)"


@dataclass
class Smoke:
    """What ``lorastack endpoint`` found."""

    url: str
    ready: bool = False
    ready_detail: str = ""
    model: str | None = None
    completion_ok: bool = False
    completion_detail: str = ""
    latency_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ready and self.completion_ok


def _get(azure: Azure, method: str, url: str, headers: dict[str, str] | None = None, body: Any = None) -> Any:
    from azure.core.rest import HttpRequest

    request = HttpRequest(method, url, headers=headers or {}, json=body) if body is not None else \
        HttpRequest(method, url, headers=headers or {})
    return azure.http().send_request(request)


def _error_message(response: Any) -> str:
    try:
        doc = response.json()
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(doc)[:200]
    except Exception:  # noqa: BLE001 - a non-JSON error body
        return (response.text() or "")[:200]


def smoke_test(azure: Azure, api_key: str | None, model: str | None = None, wait_s: float = 600.0,
               poll_s: float = 10.0, note: Callable[[str], None] = lambda s: None,
               sleep: Callable[[float], None] = time.sleep) -> Smoke:
    """``/readyz`` until ready (up to ``wait_s``), then one authenticated chat completion."""
    from azure.core.exceptions import AzureError

    url = azure.outputs.require("app_endpoint").rstrip("/")
    result = Smoke(url)
    waited = 0.0
    said = ""
    while True:
        try:
            r = _get(azure, "GET", f"{url}/readyz")
            status, detail = r.status_code, _error_message(r) if r.status_code != 200 else "ready"
        except AzureError as exc:
            status, detail = None, f"cannot reach it ({str(exc).splitlines()[0][:160]})"
        if status == 200:
            result.ready, result.ready_detail = True, "ready"
            break
        line = f"/readyz: {status or 'no answer'} {detail}".strip()
        if waited >= wait_s:
            result.ready_detail = line
            result.problems.append(
                f"{url} is not ready after {waited:.0f} s ({line}): see `lorastack logs --app`; a scale-from-zero "
                "start loads the base model first (minutes)")
            return result
        if line != said:
            note(f"{line}; waiting (a replica scaling from zero loads the model first)")
            said = line
        sleep(poll_s)
        waited += poll_s
    if not api_key:
        result.problems.append("no API key: pass --api-key, set $LORASTACK_API_KEY, or give the stack a keyVaultUri "
                               "output so the key is read from Key Vault")
        return result
    auth = {"Authorization": f"Bearer {api_key}"}
    try:
        r = _get(azure, "GET", f"{url}/v1/models", auth)
        if r.status_code in (401, 403):
            result.completion_detail = f"API key refused ({r.status_code}: {_error_message(r)})"
            result.problems.append("the API key was refused: check the stack secret inference-api-keys "
                                   "(`lorastack secrets list`), then `lorastack restart`")
            return result
        ids = [m.get("id") for m in (r.json().get("data") or [])] if r.status_code == 200 else []
        result.model = model or next((i for i in ids if i and "@" in i), None) or (ids[0] if ids else None)
        if not result.model:
            result.problems.append("the app lists no model: publish an adapter (`lorastack finetune ...`)")
            return result
        body = {"model": result.model, "messages": [{"role": "user", "content": SMOKE_PROMPT}], "max_tokens": 16}
        t0 = time.monotonic()
        r = _get(azure, "POST", f"{url}/v1/chat/completions", {**auth, "Content-Type": "application/json"}, body)
        result.latency_s = time.monotonic() - t0
    except AzureError as exc:
        result.problems.append(f"the completion request failed: {str(exc).splitlines()[0][:200]}")
        return result
    if r.status_code != 200:
        result.completion_detail = f"HTTP {r.status_code}: {_error_message(r)}"
        result.problems.append(f"chat completion on {result.model} failed ({result.completion_detail})")
        return result
    try:
        text = r.json()["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError, ValueError):
        text = None
    if not text:
        result.completion_detail = "answered without choices[0].message.content"
        result.problems.append("the completion came back empty: see `lorastack logs --app`")
        return result
    result.completion_ok = True
    result.completion_detail = f"{len(text)} characters in {result.latency_s:.1f} s"
    return result


def restart(azure: Azure, suffix: str | None = None) -> str:
    """Roll a new revision of the inference app; returns its name (``<app>--<suffix>``)."""
    from azure.mgmt.appcontainers.models import ContainerApp

    o = azure.outputs
    name = o.require("app_name")
    apps = azure.apps().container_apps
    what = f"container app {name!r}"
    current = call(o, f"reading app {name}", apps.get, o.resource_group, name, what=what, role_hint=RESTART_HINT)
    template = current.template
    if template is None:
        raise CloudError(f"app {name}: Azure returned no template; cannot roll a revision")
    suffix = suffix or time.strftime("r%Y%m%d%H%M%S", time.gmtime())
    template.revision_suffix = suffix
    patch = ContainerApp(location=current.location, template=template)
    poller = call(o, f"rolling a new revision of app {name}", apps.begin_update, o.resource_group, name, patch,
                  polling_interval=azure.start_poll_seconds, what=what, role_hint=RESTART_HINT)
    call(o, f"rolling a new revision of app {name}", poller.result, what=what, role_hint=RESTART_HINT)
    return f"{name}--{suffix}"


def export_aitk(raw_outputs: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the AI Toolkit's two infra config files from raw stack outputs; returns the paths written."""
    from provisioning.outputs import ai_toolkit_configs

    secret = sorted(k for k, v in raw_outputs.items() if v == "[secret]")
    if secret:
        raise CloudError(f"outputs {', '.join(secret)} are shown as [secret]; none of them is a secret: re-export "
                         "with `pulumi stack output --json > FILE`")
    files = ai_toolkit_configs(raw_outputs)
    need = {"finetuning.config.json": ("SUBSCRIPTION_ID", "ACA_JOB_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME"),
            "inference.config.json": ("ACA_APP_NAME", "ACA_APP_ENDPOINT")}
    missing = [f"{fname}: {key}" for fname, keys in need.items() for key in keys if key not in files[fname]]
    if missing:
        raise CloudError("the outputs lack what the AI Toolkit needs (" + "; ".join(missing) + "); export them from a "
                         "deployed stack with `pulumi stack output --json > FILE`")
    infra = out_dir / "infra"
    infra.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, doc in files.items():
        path = infra / fname
        tmp = path.with_name(f".tmp-{fname}")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written
