"""The artifact store's shared copy, at any fsspec URL (`s3://bucket/prefix`, `file:///nfs/x`).

An engine or a worker on another host cannot read a local path, so when
`LORASTREAM_ARTIFACT_URL` names a shared place every file the store writes (adapter revisions,
staged checkpoints, the step journal, archived provenance) is copied there, and every read that
misses the local cache fetches it from there. Objects are written whole (an S3 PUT is atomic;
a local file goes through a temporary name), and a directory-like entry's marker file goes last,
so a reader that sees the marker sees a complete entry.

S3 needs the optional `s3fs` package (`pip install lorastream[dev]`); settings name the
endpoint and keys, so S3-compatible servers (SeaweedFS, MinIO, Ceph) work as AWS does.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from infra.settings import Settings


def storage_options(settings: Settings) -> dict[str, Any]:
    """fsspec options for `settings.artifact_url`: S3 endpoint, keys, path-style addressing;
    listings are never cached (another host's writes must be visible at once)."""
    url = settings.artifact_url or ""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True,
                            "config_kwargs": {"s3": {"addressing_style": "path"},
                                              "retries": {"max_attempts": 5}}}
    if settings.s3_endpoint_url:
        opts["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_access_key:
        opts["key"] = settings.s3_access_key
    if settings.s3_secret_key:
        opts["secret"] = settings.s3_secret_key.get_secret_value()
    if settings.s3_region:
        opts["client_kwargs"] = {"region_name": settings.s3_region}
    if not (settings.s3_access_key or settings.s3_secret_key):
        opts["anon"] = True
    return opts


class RemoteFiles:
    """Keys (`adapters/<sha>/adapter_model.safetensors`) under one base URL."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.base_url = url.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.base_url, **(options or {}))
        except ImportError as exc:
            raise RuntimeError(f"artifact store {url}: {exc} (install lorastream[dev] for "
                               "s3fs)") from exc
        self.base = self.base.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteFiles | None:
        if not settings.artifact_url:
            return None
        return cls(settings.artifact_url, storage_options(settings))

    def _path(self, key: str) -> str:
        return f"{self.base}/{key.strip('/')}"

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key.strip('/')}"

    def key_of(self, location: str) -> str | None:
        """The key a URL of this store names; None for anything else."""
        prefix = self.base_url + "/"
        if not location.startswith(prefix):
            return None
        key = location[len(prefix):]
        return None if ".." in key.split("/") else key

    def ensure(self) -> None:
        """Create the base (an S3 bucket, a directory) if it is missing."""
        if not self.fs.exists(self.base):
            self.fs.mkdir(self.base, create_parents=True)

    def put(self, local: Path, key: str) -> None:
        self.fs.put_file(str(local), self._path(key))

    def put_bytes(self, data: bytes, key: str) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as fh:
            fh.write(data)
        try:
            self.put(Path(fh.name), key)
        finally:
            os.unlink(fh.name)

    def get(self, key: str, local: Path) -> None:
        """Download to `local` through a temporary name; FileNotFoundError if absent."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        try:
            self.fs.get_file(self._path(key), str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise
        if not tmp.exists():  # some backends write nothing for a missing key
            raise FileNotFoundError(self.url(key))
        os.replace(tmp, local)

    def get_bytes(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(self._path(key))
        return data

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def children(self, key: str) -> list[str]:
        """Names directly under `key` (empty when there is nothing)."""
        try:
            entries = self.fs.ls(self._path(key), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def delete(self, key: str) -> None:
        """Remove a key or everything under it; a missing key is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key), recursive=True)
