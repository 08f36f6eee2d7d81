"""Artifact store: where packages, aggregates and round manifests live between the parties of a round.

Keys are S3-style: '/'-separated, relative, e.g. `rounds/<round>/sites/<site>/encoders.safetensors`. Every
object's sha256 is recorded at upload and verified on download. `LocalStore` keeps it in a sidecar file
`<key>.sha256` that is written last, so it doubles as the commit marker: a half-finished upload has no sidecar
and does not exist. `S3Store` keeps it as object metadata, `x-amz-meta-sha256`: an S3 PUT is atomic, so the
object and its hash appear together (S3Store lives in fedkim.federation.s3 and is importable from here).
`open_store` builds either from the `store:` section of params.yaml. Both share ArtifactStore's integrity check.
"""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedkim.digests import sha256_file

SHA_SUFFIX = ".sha256"


class StoreError(Exception):
    """Base class of artifact-store errors."""


class KeyExistsError(StoreError, FileExistsError):
    """The key holds different content and `overwrite=True` was not given."""


class IntegrityError(StoreError, ValueError):
    """Downloaded content does not match the sha256 recorded at upload."""


class MissingKeyError(StoreError, FileNotFoundError):
    """No object under this key (a `FileNotFoundError`, so callers may catch either)."""


def validate_key(key: str) -> str:
    parts = key.split("/")
    if (not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts)
            or key.endswith(SHA_SUFFIX)):
        raise ValueError(f"invalid store key {key!r}: use relative '/'-separated names without '.', '..', "
                         f"empty parts or a '{SHA_SUFFIX}' ending")
    return key


def _name(part: str | int, what: str) -> str:
    part = str(part)
    if not part or "/" in part or part in (".", ".."):
        raise ValueError(f"invalid {what} {part!r} for a store key")
    return part


def package_prefix(round_id: str | int, site_id: str) -> str:
    return f"rounds/{_name(round_id, 'round id')}/sites/{_name(site_id, 'site id')}"


def package_key(round_id: str | int, site_id: str, filename: str) -> str:
    """`rounds/<round>/sites/<site>/<filename>`: where a site's knowledge package files go."""
    return f"{package_prefix(round_id, site_id)}/{_name(filename, 'file name')}"


class ArtifactStore(ABC):
    """Put and get files by key; every download is checked against the sha256 recorded at upload."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path, *, overwrite: bool = False) -> str:
        """Upload a file, return its URI. Same content again is a no-op; different content raises
        `KeyExistsError` unless `overwrite`."""

    @abstractmethod
    def get_file(self, key: str, dest: str | Path) -> Path:
        """Download to `dest` (a file path, or an existing folder to put it in).

        Raises `IntegrityError` when the content's sha256 differs from the one recorded at upload and
        `FileNotFoundError` for a missing key.
        """

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (a plain string prefix, as in S3), sorted."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def sha256(self, key: str) -> str:
        """The sha256 recorded when `key` was uploaded."""

    # Markers: small coordination objects (round locks, the completed-round history), read and written whole,
    # without a sha256 sidecar and not listed by LocalStore.list. `create_marker` is the one atomic primitive.
    @abstractmethod
    def create_marker(self, key: str, data: bytes) -> bool:
        """Create `key` holding `data` only when no object is there: True when created, False when one was. Two
        callers racing for one key never both get True."""

    @abstractmethod
    def read_marker(self, key: str) -> bytes | None:
        """The marker's bytes, None when there is none."""

    @abstractmethod
    def delete_marker(self, key: str) -> None:
        """Remove the marker (nothing when there is none)."""

    def _holds_already(self, key: str, recorded: str | None, digest: str, overwrite: bool) -> bool:
        """Does `key`, recorded with sha256 `recorded`, already hold the content of sha256 `digest`? Then an
        upload is a no-op (e.g. a resumed round). Other content raises KeyExistsError unless `overwrite`."""
        if recorded == digest:
            return True
        if not overwrite:
            raise KeyExistsError(f"{self.uri(key)} already holds different content (sha256 {recorded}, "
                                 f"new {digest}); pass overwrite=True to replace it")
        return False

    def _deliver(self, key: str, dest: str | Path, recorded: str, fill: Callable[[Path], None]) -> Path:
        """The integrity check of every download. `fill` writes the object to a temp file beside `dest` (a file
        path, or an existing folder to put it in); that file becomes `dest` only when its sha256 is `recorded`,
        the one recorded at upload. A mismatch raises IntegrityError and leaves `dest` untouched."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / key.rsplit("/", 1)[-1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            fill(tmp)
            actual = sha256_file(tmp)  # hash the copy, so what we hand out is what we checked
            if actual != recorded:
                raise IntegrityError(f"{self.uri(key)}: sha256 {actual} does not match the {recorded} "
                                     f"recorded at upload (object altered or corrupted); "
                                     f"{dest} left untouched")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def put_dir(self, prefix: str, folder: str | Path, *, overwrite: bool = False) -> dict[str, str]:
        """Upload every file under `folder` to `<prefix>/<relative path>`; returns key -> URI."""
        folder, prefix = Path(folder), validate_key(prefix.rstrip("/"))
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{folder}: no files to upload")
        uris = {}
        for path in files:
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            uris[key] = self.put_file(key, path, overwrite=overwrite)
        return uris

    def get_dir(self, prefix: str, dest: str | Path) -> Path:
        """Download every key under `<prefix>/` into `dest`, keeping the relative layout."""
        prefix = validate_key(prefix.rstrip("/")) + "/"
        keys = self.list(prefix)
        if not keys:
            raise MissingKeyError(f"{self.uri(prefix.rstrip('/'))}: no keys under this prefix")
        dest = Path(dest)
        for key in keys:
            target = dest / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.get_file(key, target)
        return dest


def _copy_atomic(src: Path, dst: Path) -> None:
    # Same-directory temp name + rename: readers never see a partial file.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)


class LocalStore(ArtifactStore):
    """The store on a local (or mounted) filesystem: `<root>/<key>` plus `<root>/<key>.sha256`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _sidecar(self, key: str) -> Path:
        path = self._path(key)
        return path.with_name(path.name + SHA_SUFFIX)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file() and self._sidecar(key).is_file()

    def sha256(self, key: str) -> str:
        if not self.exists(key):
            raise MissingKeyError(f"{self.uri(key)}: no such key")
        return self._sidecar(key).read_text().strip()

    def put_file(self, key: str, path: str | Path, *, overwrite: bool = False) -> str:
        digest = sha256_file(path)
        if self.exists(key):
            if self._holds_already(key, self.sha256(key), digest, overwrite):
                return self.uri(key)
            self._sidecar(key).unlink()  # un-commit first: a crash now leaves a missing key, not a wrong hash
        _copy_atomic(Path(path), self._path(key))
        _write_text_atomic(self._sidecar(key), digest + "\n")
        return self.uri(key)

    def get_file(self, key: str, dest: str | Path) -> Path:
        return self._deliver(key, dest, self.sha256(key), lambda tmp: shutil.copyfile(self._path(key), tmp))

    def create_marker(self, key: str, data: bytes) -> bool:
        # A complete temp file hard-linked to its name: link() fails when the name exists (O_EXCL semantics), so
        # a reader never sees a half-written marker and two creators never both win.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def read_marker(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete_marker(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the folder the prefix points into; match the rest as a string prefix, like S3.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return []
        keys = []
        for sidecar in start.rglob("*" + SHA_SUFFIX):
            obj = sidecar.with_name(sidecar.name[: -len(SHA_SUFFIX)])
            key = obj.relative_to(self.root).as_posix()
            if obj.is_file() and key.startswith(prefix):
                keys.append(key)
        return sorted(keys)


# ---------------------------------------------------------------------------------------------- factory
ENDPOINT_ENV_VARS = ("FEDKIM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def open_store(store_params: Any, *, base_dir: str | Path | None = None) -> ArtifactStore:
    """The store described by the `store:` section of params.yaml (a `StoreParams`, or the whole `Params`).

    `kind: local` -> `LocalStore(root)`, a relative root resolved against `base_dir` (default: the working
    directory; `load_params` already makes it absolute). `kind: s3` -> `S3Store`; the env var
    FEDKIM_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) overrides `endpoint_url`; credentials come from the AWS
    chain; FEDKIM_STORE_ROLE names their role in the server's refusals (set by `fedkim stack`).
    """
    params = getattr(store_params, "store", store_params)
    if params.kind == "local":
        root = Path(params.root)
        if not root.is_absolute() and base_dir is not None:
            root = Path(base_dir) / root
        return LocalStore(root)
    if params.kind == "s3":
        endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
        return S3Store(params.bucket, prefix=params.prefix, endpoint_url=endpoint or params.endpoint_url,
                       region=params.region, create_bucket=params.create_bucket,
                       max_attempts=params.max_attempts, role=os.environ.get("FEDKIM_STORE_ROLE") or None)
    raise ValueError(f"store.kind {params.kind!r} is not supported: use 'local' or 's3'")


# Last: fedkim.federation.s3 builds on the names above (the package imports this module first).
from fedkim.federation.s3 import S3Store  # noqa: E402
