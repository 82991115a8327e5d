"""The store on the Azure Files share, addressed by the same relative keys as :class:`lorastack.store.Store`.

Writers upload under a temporary sibling name and rename over the target, so a reader (the trainer in the job, the
app, another CLI) sees the old file or the new one, never a partial file; downloads land in a temporary local
sibling first for the same reason.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorastack.azure.credentials import CloudError, explain

if TYPE_CHECKING:
    from lorastack.azure.credentials import Azure

TMP_PREFIX = ".tmp-"  # the store's temporary-sibling prefix: never a valid run id or dataset name
Progress = Callable[[int, int | None], None]


class ShareStore:
    """The store on the share: read, list, write atomically, download, delete."""

    def __init__(self, azure: Azure):
        from azure.storage.fileshare import ShareClient

        self.outputs = azure.outputs
        self.client = ShareClient(
            account_url=azure.outputs.account_url,
            share_name=azure.outputs.share_name,
            credential=azure.credential,
            token_intent="backup",  # Entra ID on Azure Files REST: acts with the role's data permissions
            **azure.client_kwargs,
        )
        self._dirs: set[str] = set()

    def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import AzureError

        try:
            return fn(*args, **kwargs)
        except AzureError as exc:
            raise explain(exc, self.outputs, f"{doing} on share {self.outputs.share_name}") from exc

    @staticmethod
    def _missing(err: CloudError) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        return isinstance(err.__cause__, ResourceNotFoundError)

    # -- reading ------------------------------------------------------------------------------------------------
    def size(self, path: str) -> int | None:
        """Size of the file at ``path``, or None when there is none (Get File Properties)."""
        try:
            props = self._call(f"checking {path}", self.client.get_file_client(path).get_file_properties)
        except CloudError as err:
            if self._missing(err):
                return None
            raise
        return int(props.size)

    def read_bytes(self, path: str) -> bytes | None:
        """Content of ``path``, or None when it does not exist."""
        try:
            downloader = self._call(f"reading {path}", self.client.get_file_client(path).download_file)
            return self._call(f"reading {path}", downloader.readall)
        except CloudError as err:
            if self._missing(err):
                return None
            raise

    def read_json(self, path: str) -> Any:
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CloudError(f"{path} on share {self.outputs.share_name}: not valid JSON ({exc})") from None

    def list_dir(self, path: str) -> list[tuple[str, bool]]:
        """(name, is_directory) of the entries of ``path``; empty when it does not exist."""
        try:
            return self._call(
                f"listing {path}",
                lambda: [
                    (e["name"], bool(e["is_directory"]))
                    for e in self.client.get_directory_client(path).list_directories_and_files()
                ],
            )
        except CloudError as err:
            if self._missing(err):
                return []
            raise

    def walk(self, path: str) -> list[tuple[str, int]]:
        """(key, size) of every file under ``path``, recursively, skipping temporary siblings."""
        found: list[tuple[str, int]] = []
        for name, is_dir in self.list_dir(path):
            if name.startswith(TMP_PREFIX):
                continue
            key = f"{path}/{name}" if path else name
            if is_dir:
                found.extend(self.walk(key))
            else:
                found.append((key, self.size(key) or 0))
        return found

    def free_bytes(self) -> int | None:
        """Bytes left under the share's quota (Get Share Properties + Get Share Stats), None if not reported."""
        props = self._call("reading the share quota", self.client.get_share_properties)
        quota_gib = getattr(props, "quota", None)
        if not quota_gib:
            return None
        used = self._call("reading the share usage", self.client.get_share_stats)
        return int(quota_gib) * 2**30 - int(used or 0)

    def download(self, path: str, dest: Path, progress: Progress | None = None) -> int:
        """Copy ``path`` to the local file ``dest`` (temporary sibling, then rename); returns its size."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}.{uuid.uuid4().hex[:8]}")
        try:
            downloader = self._call(
                f"reading {path}",
                self.client.get_file_client(path).download_file,
                max_concurrency=4,
                progress_hook=progress,
            )
            with open(tmp, "wb") as fh:
                n = self._call(f"reading {path}", downloader.readinto, fh)
            os.replace(tmp, dest)
            return int(n)
        finally:
            tmp.unlink(missing_ok=True)

    # -- writing ------------------------------------------------------------------------------------------------
    def ensure_dir(self, path: str) -> None:
        """Create ``path`` and its parents (Azure Files has no recursive create); existing ones are fine."""
        from azure.core.exceptions import ResourceExistsError

        parts = [p for p in path.strip("/").split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self._dirs:
                continue
            try:
                self._call(f"creating directory {sub}", self.client.get_directory_client(sub).create_directory)
            except CloudError as err:
                if not isinstance(err.__cause__, ResourceExistsError):
                    raise
            self._dirs.add(sub)

    def put_atomic(self, path: str, source: bytes | Path, echo: Callable[[str], None] | None = None) -> None:
        """Upload to a temporary sibling, then rename over ``path``: readers see the old file or the new one."""
        parent, _, name = path.rpartition("/")
        self.ensure_dir(parent)
        tmp = f"{parent}/{TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}" if parent else f"{TMP_PREFIX}{name}"
        tmp_client = self.client.get_file_client(tmp)
        big = isinstance(source, Path) and source.stat().st_size >= 8 * 2**20
        hook = progress_lines(path, echo) if echo is not None and big else None
        try:
            if isinstance(source, Path):
                with open(source, "rb") as fh:
                    self._call(
                        f"uploading {path}",
                        tmp_client.upload_file,
                        fh,
                        length=source.stat().st_size,
                        max_concurrency=4,  # 4 MiB ranges in parallel: large datasets upload faster
                        progress_hook=hook,
                    )
            else:
                self._call(f"uploading {path}", tmp_client.upload_file, source, length=len(source))
            self._call(f"renaming {tmp} to {path}", tmp_client.rename_file, path, overwrite=True)
        except BaseException:
            from azure.core.exceptions import AzureError

            try:
                tmp_client.delete_file()
            except AzureError:
                pass
            raise

    def put_json(self, path: str, obj: Any) -> None:
        """Atomically write ``obj`` as indented JSON (the same bytes :func:`lorastack.store.write_json_atomic` writes)."""
        self.put_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def delete(self, path: str) -> None:
        """Delete a file; one already gone is fine."""
        try:
            self._call(f"deleting {path}", self.client.get_file_client(path).delete_file)
        except CloudError as err:
            if not self._missing(err):
                raise

    def delete_tree(self, path: str) -> int:
        """Delete a directory and everything under it (files first, deepest directories first); returns files."""
        count = 0
        for name, is_dir in self.list_dir(path):
            key = f"{path}/{name}"
            if is_dir:
                count += self.delete_tree(key)
            else:
                self.delete(key)
                count += 1
        try:
            self._call(f"deleting directory {path}", self.client.get_directory_client(path).delete_directory)
        except CloudError as err:
            if not self._missing(err):
                raise
        self._dirs = {d for d in self._dirs if d != path and not d.startswith(path + "/")}
        return count


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def progress_lines(path: str, echo: Callable[[str], None]) -> Progress:
    """A transfer progress hook that prints at most one line every 2 s, and the last one."""
    last = [0.0]

    def hook(done: int, total: int | None) -> None:
        now = time.monotonic()
        if total and (done >= total or now - last[0] > 2.0):
            last[0] = now
            echo(f"  {path}: {mib(done)} of {mib(total)} ({100 * done // total}%)")

    return hook
