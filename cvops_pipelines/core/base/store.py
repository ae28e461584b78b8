"""One small interface over a local directory and an S3 bucket/prefix.

Every cvops artifact (images, tables, quarantine, reports) goes through a `Store`, so the
same pipeline code runs on a laptop and against S3. Stores are plain picklable dataclasses:
worker processes rebuild their own S3 client from the config instead of sharing one.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A storage location is missing, unreachable or refuses us; the message says which."""


@dataclass(frozen=True)
class Entry:
    """A listed object: `key` is relative to the store root, always with forward slashes."""

    key: str
    size: int
    is_symlink: bool = False
    symlink_target: str | None = None
    modified: float = 0.0


class Store(Protocol):
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None: ...
    def sync(self) -> None: ...
    def list(self, prefix: str = "") -> Iterator[Entry]: ...
    def list_dirs(self) -> list[str]: ...
    def uri(self, key: str = "") -> str: ...
    def child(self, prefix: str) -> Store: ...
    def check(self) -> None: ...


_MADE_DIRS: set[Path] = set()  # per process: skip a mkdir syscall per write
_TMP_COUNTER = itertools.count()


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})\.[0-9]{1,20}\.tmp\Z")


def _orphan(name: str) -> bool:
    """Whether `name` is one of our temp files whose writing process is gone (on this host)."""
    match = _TEMP.match(name)
    if not match:
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive under another user; or no such pid at all
        return False
    return False


def remove_orphans(folder: Path) -> int:
    """Remove the temp files in `folder` that a killed writer left; how many."""
    removed = 0
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") and _orphan(entry.name):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


@dataclass(frozen=True)
class LocalStore:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().absolute())

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if key.startswith("/") or ".." in parts:
            raise StorageError(f"key {key!r} escapes the store root {self.root}")
        return self.root.joinpath(*parts)

    def read_bytes(self, key: str) -> bytes:
        # O_NOFOLLOW: a file swapped for a symlink after listing is refused, never followed.
        try:
            fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from exc
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        """Temp file + rename: readers see the old or the new file, never half of one.

        `durable=False` skips the per-file fsync for bulk writes; the caller then calls
        `sync()` once before recording them (see core/ingest/intake.py).
        """
        self._atomic(key, lambda f: f.write(data), durable)

    def put_file(self, key: str, path: Path) -> None:
        """Copy a local file in (a table too large to hold in memory), atomically and durably."""
        with open(path, "rb") as src:
            self._atomic(key, lambda f: shutil.copyfileobj(src, f, 2**20), True)

    def get_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path, follow_symlinks=False)

    def _atomic(self, key: str, write, durable: bool) -> None:
        path = self._path(key)
        if path.parent not in _MADE_DIRS:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_orphans(path.parent)  # once per folder and process: a killed writer's temps
            _MADE_DIRS.add(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the folder was removed behind our back: recreate it
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def orphans(self) -> list[Path]:
        """Temp files whose writer died before its rename (killed mid-write): hidden from
        `list`, removed by the next write to their folder, counted by `cvops status`."""
        if not self.root.is_dir():
            return []
        return sorted(
            Path(folder) / name
            for folder, _, names in os.walk(self.root)
            for name in names
            if _orphan(name)
        )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def sync(self) -> None:
        """Flush this filesystem's dirty pages once (syncfs), instead of one fsync per file."""
        if not self.root.exists():
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
                os.sync()
        except OSError:
            os.sync()
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> Iterator[Entry]:
        """Walk in sorted key order without following symlinks (they are reported, not entered)."""
        base = self._path(prefix) if prefix else self.root
        if base.is_dir():
            yield from self._walk(base)

    def _walk(self, directory: Path) -> Iterator[Entry]:
        # only the names are held (a folder of a million files is a million short strings);
        # each entry is stat-ed as it is reached
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it)
        prefix = directory.relative_to(self.root).as_posix()
        for name in names:
            path = os.path.join(directory, name)
            key = name if prefix == "." else f"{prefix}/{name}"
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed since the folder was read
                continue
            if stat.S_ISLNK(st.st_mode):
                yield Entry(key, 0, is_symlink=True, symlink_target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                yield from self._walk(Path(path))
            elif stat.S_ISREG(st.st_mode) and not name.endswith(".tmp"):
                yield Entry(key, st.st_size, modified=st.st_mtime)

    def list_dirs(self) -> list[str]:
        """Top-level folders (symlinked folders are not followed)."""
        if not self.root.is_dir():
            return []
        with os.scandir(self.root) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / prefix)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create store root {self.root}: {exc}") from exc


_S3_CLIENTS: dict[tuple, object] = {}


@dataclass(frozen=True)
class S3Store:
    """An S3 (or S3-compatible) bucket/prefix. Credentials come from the usual AWS chain."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None

    @property
    def client(self):
        cache_key = (os.getpid(), self.region, self.endpoint_url)
        if cache_key not in _S3_CLIENTS:
            import boto3
            from botocore.config import Config

            _S3_CLIENTS[cache_key] = boto3.session.Session().client(
                "s3",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5),
            )
        return _S3_CLIENTS[cache_key]

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _where(self) -> str:
        return f"bucket '{self.bucket}' at endpoint {self.endpoint_url or 'AWS default'}"

    def _translate(self, exc: Exception, key: str | None = None) -> Exception:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, EndpointConnectionError):
            return StorageError(
                f"cannot reach S3 endpoint {self.endpoint_url or 'AWS default'} for "
                f"bucket '{self.bucket}': is the server running and CVOPS_S3_ENDPOINT_URL right?"
            )
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"no AWS credentials found for {self._where()}")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StorageError(
                    f"S3 {self._where()} does not exist; create it or fix CVOPS_S3_BUCKET"
                )
            if code in (
                "AccessDenied",
                "403",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AllAccessDisabled",
                "Forbidden",
            ):
                return StorageError(
                    f"S3 {self._where()} denied access ({code}); check the credentials and "
                    "the bucket policy for s3:GetObject, s3:PutObject and s3:ListBucket"
                )
            if code in ("NoSuchKey", "404") and key is not None:
                return FileNotFoundError(f"{self.uri(key)} does not exist")
        return exc

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        # A single PUT is atomic on S3: readers see the old object or the new one, never half.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file (multipart when large; the object appears whole or not at all)."""
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def get_file(self, key: str, path: Path) -> None:
        """Download to a local file, in parts, never the whole object in memory."""
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            translated = self._translate(exc, key)
            if isinstance(translated, FileNotFoundError):
                return False
            raise translated from exc

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except Exception as exc:
            translated = self._translate(exc, key)
            if isinstance(translated, FileNotFoundError):
                return None
            raise translated from exc

    def sync(self) -> None:
        """A completed PUT is durable on S3: nothing to flush."""

    def list(self, prefix: str = "") -> Iterator[Entry]:
        full = _join(self.prefix, prefix)
        full = f"{full}/" if full else ""
        strip = f"{self.prefix.strip('/')}/" if self.prefix.strip("/") else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(strip) :]
                    if key.endswith("/"):
                        continue
                    yield Entry(key, obj["Size"], modified=obj["LastModified"].timestamp())
        except Exception as exc:
            raise self._translate(exc) from exc

    def list_dirs(self) -> list[str]:
        """Top-level "folders" (common prefixes), without listing the objects under them."""
        base = f"{self.prefix.strip('/')}/" if self.prefix.strip("/") else ""
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                names += [
                    p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                ]
        except Exception as exc:
            raise self._translate(exc) from exc
        return sorted(names)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, _join(self.prefix, prefix), self.region, self.endpoint_url)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError):
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("404", "NoSuchBucket"):
                    raise StorageError(
                        f"S3 {self._where()} does not exist; create it or fix CVOPS_S3_BUCKET"
                    ) from exc
                if code in ("403", "AccessDenied", "Forbidden"):
                    raise StorageError(
                        f"S3 {self._where()} denied access ({code}); check the credentials and "
                        "the bucket policy for s3:ListBucket"
                    ) from exc
            raise self._translate(exc) from exc


def store_from_uri(
    uri: str, *, region: str | None = None, endpoint_url: str | None = None
) -> Store:
    """`s3://bucket/prefix` or a local path / file:// URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket; expected s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"), region, endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(
            f"unsupported storage URI {uri!r}; use a local path or s3://bucket/prefix"
        )
    return LocalStore(Path(uri))
