"""Signing in and translating Azure errors: one line saying what failed and what to do.

Every command builds one :class:`Azure` (a credential plus the keyword arguments every SDK client gets; tests pass
``transport=``). Its credential is checked once, before the first storage or management call, with a deadline:
without a sign-in the user gets one line in a few seconds instead of the SDK's credential-chain dump (that detail is
logged on the ``azure`` loggers, which the command layer shows only with ``--debug``).

Storage access uses Microsoft Entra ID, never the account key: the signed-in identity needs **Storage File Data
Privileged Contributor** on the storage account, and a role allowing ``Microsoft.App/jobs/start/action`` and
``.../jobs/executions/read`` on the job (e.g. Contributor on the resource group). The Azure SDKs are imported inside
functions, so ``lorastack --help`` stays fast.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from lorastack.azure.outputs import StackOutputs
    from lorastack.azure.share import ShareStore

T = TypeVar("T")

ARM_SCOPE = "https://management.azure.com/.default"
CREDENTIAL_DEADLINE_S = 5.0  # a sign-in check that takes longer than this is reported as failing
CLI_TIMEOUT_S = 4  # `az account get-access-token` and friends: the slow part of a missing login
STORAGE_ROLE = "Storage File Data Privileged Contributor"
JOB_ROLE_HINT = (
    "a role allowing Microsoft.App/jobs/start/action and Microsoft.App/jobs/executions/read on the job "
    "(e.g. Contributor on the resource group)"
)
SIGN_IN_HINT = (
    "sign in with `az login` (and `az account set -s <subscription>`), or in a pipeline set AZURE_TENANT_ID, "
    "AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE (or AZURE_CLIENT_SECRET); --debug shows each credential tried"
)
# ARM jobs/start answers 202 + Location; the execution exists within seconds, so poll briefly, not ARM's 30 s.
START_POLL_SECONDS = 2.0


class CloudError(Exception):
    """An Azure operation cannot be done; the message says why and what to do."""


def default_credential() -> Any:
    """DefaultAzureCredential that answers fast when nobody is signed in.

    The managed-identity probe (instance metadata, retried) is what made a missing login take a minute and a half;
    it is only tried where an identity endpoint exists (inside Azure) or when AZURE_TOKEN_CREDENTIALS chooses the
    chain, and the developer tools get a short process timeout.
    """
    from azure.identity import DefaultAzureCredential

    if os.environ.get("AZURE_TOKEN_CREDENTIALS"):  # the user chose the chain (e.g. "dev", "ManagedIdentityCredential")
        return DefaultAzureCredential(exclude_interactive_browser_credential=True, process_timeout=CLI_TIMEOUT_S)
    in_azure = bool(os.environ.get("IDENTITY_ENDPOINT") or os.environ.get("MSI_ENDPOINT"))
    return DefaultAzureCredential(
        exclude_interactive_browser_credential=True,
        exclude_managed_identity_credential=not in_azure,
        process_timeout=CLI_TIMEOUT_S,
    )


def check_credential(credential: Any, deadline_s: float = CREDENTIAL_DEADLINE_S) -> None:
    """Ask ``credential`` for a management token once, within ``deadline_s``; CloudError in one line otherwise."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            credential.get_token(ARM_SCOPE)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below, with the SDK's detail on --debug
            outcome["error"] = exc

    worker = threading.Thread(target=ask, name="lorastack-credential-check", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        raise CloudError(f"no Azure credential answered within {deadline_s:.0f} s; {SIGN_IN_HINT}")
    exc = outcome.get("error")
    if exc is not None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CloudError(f"no Azure sign-in ({first[:160]}); {SIGN_IN_HINT}") from exc


@dataclass
class Azure:
    """A checked credential plus the keyword arguments every SDK client is built with."""

    outputs: StackOutputs
    credential: Any = None
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    start_poll_seconds: float = START_POLL_SECONDS
    check: bool = True

    def __post_init__(self) -> None:
        if self.credential is None:
            self.credential = default_credential()
        if self.check:
            check_credential(self.credential)

    def share(self) -> ShareStore:
        from lorastack.azure.share import ShareStore

        return ShareStore(self)

    def apps(self) -> Any:
        """The Container Apps management client (one per connection)."""
        if getattr(self, "_apps", None) is None:
            from azure.mgmt.appcontainers import ContainerAppsAPIClient

            self._apps = ContainerAppsAPIClient(self.credential, self.outputs.subscription_id, **self.client_kwargs)
        return self._apps

    def http(self) -> Any:
        """A plain azure-core pipeline (same transport and retries) for non-ARM endpoints: log stream, the app."""
        from azure.core import PipelineClient

        return PipelineClient("https://localhost", **self.client_kwargs)


def _error_code(exc: Any) -> str:
    code = getattr(exc, "error_code", None)
    if not code and getattr(exc, "error", None) is not None:
        code = getattr(exc.error, "code", None)
    response = getattr(exc, "response", None)
    if not code and response is not None:
        code = response.headers.get("x-ms-error-code")
    return str(getattr(code, "value", code) or "")  # the storage SDK maps known codes to a str Enum


def explain(
    exc: BaseException, outputs: StackOutputs, doing: str, what: str | None = None, role_hint: str = JOB_ROLE_HINT
) -> CloudError:
    """A CloudError saying what failed and what to do, for an Azure SDK exception raised while ``doing``.

    ``what`` names the resource a 404 is about (default: the training job); ``role_hint`` what a 403 lacks.
    """
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    o = outputs
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    code = _error_code(exc)
    on_share = "share" in doing or "store" in doing
    if isinstance(exc, ClientAuthenticationError) and status is None:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return CloudError(f"{doing}: no Azure credential ({first}); {SIGN_IN_HINT}")
    if isinstance(exc, ServiceRequestError):
        host = o.account_url if on_share else "Azure"
        return CloudError(f"{doing}: cannot reach {host} ({str(exc)[:200]}); check the network and the stack outputs")
    if not isinstance(exc, HttpResponseError):
        return CloudError(f"{doing}: {type(exc).__name__}: {str(exc)[:300]}")
    if status == 429:
        after = response.headers.get("Retry-After") if response is not None else None
        wait = f"; Azure asked to wait {after} s" if after else ""
        return CloudError(
            f"{doing}: Azure is throttling requests (429 {code or 'TooManyRequests'}) after the SDK's retries{wait}. "
            "Wait a minute and run the command again; a script polling in a loop should poll less often."
        )
    if on_share and status == 403:
        network = (
            " The account may also refuse your network (code AuthorizationFailure): allow your IP in its "
            "firewall, or run from the stack's VNet."
            if code == "AuthorizationFailure"
            else ""
        )
        return CloudError(
            f"{doing}: the storage account {o.storage_account} refused the request (403 {code}). Your identity "
            f"needs the role '{STORAGE_ROLE}' on it: az role assignment create --role '{STORAGE_ROLE}' "
            f"--assignee <your user or app id> --scope {o.storage_scope} "
            f"(role assignments take a few minutes to apply).{network}"
        )
    if on_share and status == 404 and code == "ShareNotFound":
        return CloudError(
            f"{doing}: the share {o.share_name!r} does not exist in storage account {o.storage_account}; "
            "check that the outputs file belongs to this stack"
        )
    if on_share and status == 400 and "protocol" in str(exc).lower():
        return CloudError(
            f"{doing}: the share {o.share_name!r} does not accept REST access (an NFS share?); "
            "submit from a machine that mounts the share, with `--local --store <mount>` and the job started by hand"
        )
    if not on_share and status == 403:
        return CloudError(
            f"{doing}: Azure refused ({code or 403}) in resource group {o.resource_group}: your identity needs "
            f"{role_hint}"
        )
    if not on_share and status == 404:
        if code == "ResourceGroupNotFound":
            return CloudError(
                f"{doing}: resource group {o.resource_group} does not exist in subscription {o.subscription_id}: "
                f"the stack is not deployed (or was destroyed), or {o.source} belongs to another subscription. "
                "Run `pulumi up --stack <env>`, or re-export the outputs of the right stack."
            )
        target = what or f"job {o.job_name!r}"
        return CloudError(
            f"{doing}: {target} was not found in resource group {o.resource_group} of subscription "
            f"{o.subscription_id} ({code or 404}); check the stack outputs ({o.source}) against `pulumi stack output`"
        )
    first = ((getattr(exc, "message", None) or str(exc)).strip().splitlines() or [""])[0][:300]
    return CloudError(f"{doing}: HTTP {status} {code}: {first}")


def call(outputs: StackOutputs, doing: str, fn: Callable[..., T], *args: Any, what: str | None = None,
         role_hint: str = JOB_ROLE_HINT, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, with any Azure SDK error turned into a CloudError by :func:`explain`."""
    from azure.core.exceptions import AzureError

    try:
        return fn(*args, **kwargs)
    except AzureError as exc:
        raise explain(exc, outputs, doing, what=what, role_hint=role_hint) from exc


def arm_json(azure: Azure, method: str, path: str, api_version: str, doing: str, body: Any = None,
             what: str | None = None, role_hint: str = JOB_ROLE_HINT) -> Any:
    """A raw ARM call through the management SDK's pipeline (auth, retries, transport) for operations the Python
    SDK lacks (job execution replicas, job getAuthToken, Key Vault name checks, permissions); returns the JSON."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceNotFoundError,
        map_error,
    )
    from azure.core.rest import HttpRequest

    url = f"https://management.azure.com{path}?api-version={api_version}"
    request = HttpRequest(method, url, json=body) if body is not None else HttpRequest(method, url)
    try:
        response = azure.apps().send_request(request)
        if response.status_code >= 400:
            from azure.mgmt.core.exceptions import ARMErrorFormat

            errors = {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError}
            map_error(status_code=response.status_code, response=response, error_map=errors)
            raise HttpResponseError(response=response, error_format=ARMErrorFormat)
        return response.json() if response.content else None
    except AzureError as exc:
        raise explain(exc, azure.outputs, doing, what=what, role_hint=role_hint) from exc
