"""The central store as a device reaches it: a mounted folder, or HTTP(S) (S3 or any server that
speaks GET with Range, PUT and HEAD). Standard library only."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: readers see the old bytes or the new ones, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Offline(ConnectionError):
    """The store cannot be reached right now; try again later, lose nothing."""


class Remote(Protocol):
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...
    def put(self, key: str, data: bytes) -> None: ...
    def size(self, key: str) -> int | None: ...


class DirRemote:
    """A folder (e.g. a mounted share, or the cvops store on one machine)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"key {key!r} escapes the store")
        return path

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if not self.root.exists():
            raise Offline(f"store folder {self.root} is not mounted")
        with open(self._path(key), "rb") as handle:  # FileNotFoundError: missing object
            handle.seek(offset)
            return handle.read() if length is None else handle.read(length)

    def put(self, key: str, data: bytes) -> None:
        if not self.root.exists():
            raise Offline(f"store folder {self.root} is not mounted")
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def size(self, key: str) -> int | None:
        if not self.root.exists():
            raise Offline(f"store folder {self.root} is not mounted")
        path = self._path(key)
        return path.stat().st_size if path.exists() else None


class HttpRemote:
    """`base_url/<key>` over HTTP: GET (with Range to resume), PUT, HEAD."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _open(self, request: urllib.request.Request):
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(request.full_url) from None
            if exc.code >= 500:
                raise Offline(f"{request.full_url}: HTTP {exc.code}") from None
            raise
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise Offline(f"{request.full_url} unreachable: {exc}") from None

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        request = urllib.request.Request(f"{self.base_url}/{key}")
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            request.add_header("Range", f"bytes={offset}-{end}")
        try:
            with self._open(request) as response:
                if offset and response.status == 200:  # Range ignored: skip, never buffer it
                    _skip(response, offset)
                return response.read() if length is None else response.read(length)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # offset at or past the end
                return b""
            raise

    def put(self, key: str, data: bytes) -> None:
        request = urllib.request.Request(
            f"{self.base_url}/{key}",
            data=data,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        with self._open(request):
            pass

    def size(self, key: str) -> int | None:
        try:
            with self._open(urllib.request.Request(f"{self.base_url}/{key}", method="HEAD")) as r:
                return int(r.headers.get("Content-Length", "0"))
        except FileNotFoundError:
            return None


def _skip(response, count: int, chunk: int = 1 << 20) -> None:
    while count > 0:
        got = len(response.read(min(chunk, count)))
        if not got:
            return
        count -= got


def remote_from(location: str) -> Remote:
    return (
        HttpRemote(location)
        if location.startswith(("http://", "https://"))
        else DirRemote(location)
    )
