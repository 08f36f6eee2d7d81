"""The artifact store in an S3 bucket (AWS, or any S3-compatible server): `S3Store`.

An object's sha256 is its metadata `x-amz-meta-sha256` plus a `<key>.sha256` sidecar object; downloads go
through ArtifactStore's integrity check (fedkim.federation.store). botocore's errors become StoreErrors that
name the bucket, the key and the fix.
"""

from __future__ import annotations

import base64
import contextlib
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedkim.digests import sha256_file
from fedkim.federation.policies import owner_of
from fedkim.federation.store import (SHA_SUFFIX, ArtifactStore, IntegrityError, KeyExistsError, MissingKeyError,
    StoreError, validate_key)

# Error codes S3 (and compatible servers) use when the credentials are wrong or lack a permission.
_AUTH_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
               "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AuthorizationHeaderMalformed"}
_CHUNK = 1 << 20
_PRECONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict")
CLAIM_TTL_S = 60.0  # a marker claim older than this was left by a crash (a claim lives for a few requests)


def _recorded_sha256(metadata: dict[str, str] | None) -> str | None:
    # Some S3-compatible servers (rclone serve s3) hand metadata keys back capitalised: 'Sha256'.
    return {k.lower(): v for k, v in (metadata or {}).items()}.get("sha256")


class S3Store(ArtifactStore):
    """The store in an S3 bucket (AWS, or any S3-compatible server via `endpoint_url`).

    Object key = `<prefix>/<key>`; its sha256 is the object metadata `x-amz-meta-sha256`, and also a small
    `<key>.sha256` object written after it: some S3-compatible servers keep metadata in memory only (`rclone serve
    s3` forgets it on restart), and the sidecar keeps such objects verifiable. Credentials come
    from the standard AWS chain (env vars, `~/.aws`, instance roles), never from params. Nothing is contacted
    until the first call, unless `create_bucket=True`.
    """

    list_page_size = 1000  # keys per ListObjectsV2 page (the S3 maximum); tests lower it to exercise paging

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str = "us-east-1", create_bucket: bool = False, client: Any = None,
                 max_attempts: int = 5, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 role: str | None = None):
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.bucket = bucket
        self.prefix = validate_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.max_attempts = max_attempts
        self.role = role  # whose credentials these are (`site.<id>`, `coordinator`): named when the server refuses
        self._session = None
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                region_name=region, connect_timeout=connect_timeout, read_timeout=read_timeout,
                # total_max_attempts counts the first try too (botocore's max_attempts counts only retries).
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
                # Self-hosted servers (moto, rclone, MinIO) on an IP or plain host need path-style URLs.
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            # A private session: the default one is shared and not thread-safe to create clients from.
            self._session = boto3.session.Session()
            client = self._session.client("s3", endpoint_url=endpoint_url, config=config)
        self.client = client
        self._bucket_checked = False
        self._conditional_writes: bool | None = None  # learnt on the first create_marker
        if create_bucket:
            self.ensure_bucket()

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri_root()!r}, endpoint={self.endpoint!r})"

    def uri_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @contextlib.contextmanager
    def _translate(self, action: str, where: str) -> Iterator[None]:
        """Turn botocore's exceptions into `StoreError`s whose message names bucket, key and the fix."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            detail = f"{code}: {err.get('Message') or 'no message'}"
            if code in ("NoSuchBucket",):
                raise self._missing_bucket_error(action) from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise MissingKeyError(f"{where}: no such key (S3 {action} at {self.endpoint})") from None
            if code in _AUTH_CODES:
                raise StoreError(self._refusal(action, where, detail)) from None
            raise StoreError(f"{where}: S3 {action} failed ({detail}) at {self.endpoint}") from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(f"{where}: no usable AWS credentials for S3 {action} ({exc}). Set "
                             f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
                             f"params.yaml never holds them") from None
        except BotoConnectionError as exc:
            raise StoreError(f"{where}: cannot reach the S3 endpoint {self.endpoint} for {action} after "
                             f"{self.max_attempts} attempt(s): {exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"{where}: S3 {action} at {self.endpoint} failed: {exc}") from None

    def _refusal(self, action: str, where: str, detail: str) -> str:
        """Why the server refused: the credentials' key id and role, and whose object the key is (a site's prefix,
        the coordinator's objects), so that a role that oversteps is told so by name."""
        credentials = self._session.get_credentials() if self._session is not None else None
        who = f"access key {credentials.access_key!r}" if credentials is not None else "these credentials"
        who += f" (role {self.role})" if self.role else ""
        root = self.uri_root() + "/"
        whose = f" {where[len(root):]} is {owner_of(where[len(root):])}." if where.startswith(root) else ""
        return (f"{where}: S3 {action} refused by the server for {who} ({detail}).{whose} Check that "
                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) are the ones of the role that may "
                f"{action} there, in bucket {self.bucket!r} at {self.endpoint}")

    def _missing_bucket_error(self, action: str) -> StoreError:
        return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint} (S3 {action}); "
                          f"create it (`aws s3 mb s3://{self.bucket}`), set store.create_bucket, "
                          f"or fix store.bucket")

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet (for self-hosted servers and tests)."""
        from botocore.exceptions import ClientError

        with self._translate("create_bucket", f"s3://{self.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                region = self.client.meta.region_name
                extra = ({"CreateBucketConfiguration": {"LocationConstraint": region}}
                         if region and region != "us-east-1" else {})
                try:
                    self.client.create_bucket(Bucket=self.bucket, **extra)
                except ClientError as exc2:  # lost a race with another party creating it: fine
                    if exc2.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                        raise
        self._bucket_checked = True

    def _check_bucket(self, action: str) -> None:
        # HEAD answers a bare 404 for a missing key and a missing bucket alike; ask once which one it is.
        if self._bucket_checked:
            return
        from botocore.exceptions import ClientError

        with self._translate(action, f"s3://{self.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                    raise self._missing_bucket_error(action) from None
                raise
        self._bucket_checked = True

    def _head(self, key: str) -> dict | None:
        """HEAD the object; None when the key is missing (the bucket being there is checked)."""
        from botocore.exceptions import ClientError

        with self._translate("head_object", self.uri(key)):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        self._check_bucket("head_object")
        return None

    def _sidecar_sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        with self._translate("get_object", self.uri(key) + SHA_SUFFIX):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key) + SHA_SUFFIX)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                text = body.read().decode("ascii", "replace").strip()
        return text if len(text) == 64 else None

    def _recorded(self, key: str, metadata: dict | None) -> str | None:
        return _recorded_sha256(metadata) or self._sidecar_sha256(key)

    def _verifiable(self, key: str, metadata: dict | None) -> str:
        """The sha256 recorded at upload; IntegrityError for an object that carries none."""
        recorded = self._recorded(key, metadata)
        if not recorded:
            raise IntegrityError(f"{self.uri(key)}: object has no x-amz-meta-sha256 metadata, so it was not "
                                 f"uploaded through fedkim's store and cannot be verified")
        return recorded

    # ------------------------------------------------------------------------------------------ the API
    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def sha256(self, key: str) -> str:
        head = self._head(key)
        if head is None:
            raise MissingKeyError(f"{self.uri(key)}: no such key")
        return self._verifiable(key, head.get("Metadata"))

    def put_file(self, key: str, path: str | Path, *, overwrite: bool = False) -> str:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file to upload to {self.uri(key)}")
        digest = sha256_file(path)
        head = self._head(key)
        if head is not None and self._holds_already(key, self._recorded(key, head.get("Metadata")), digest,
                                                    overwrite):
            return self.uri(key)
        self._put(key, path, digest, only_if_absent=head is None and not overwrite)
        return self.uri(key)

    def _put(self, key: str, path: Path, digest: str, *, only_if_absent: bool) -> None:
        from botocore.exceptions import ClientError

        args = dict(Bucket=self.bucket, Key=self._object_key(key), Metadata={"sha256": digest},
                    # S3 recomputes it and rejects the PUT when the bytes that arrive are not what we hashed.
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode())
        with self._translate("put_object", self.uri(key)):
            with path.open("rb") as body:
                try:
                    # If-None-Match: a writer that raced us between HEAD and PUT is not overwritten silently.
                    condition = {"IfNoneMatch": "*"} if only_if_absent else {}
                    self.client.put_object(Body=body, **args, **condition)
                    return self._put_sidecar(key, digest)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code == "NotImplemented" and only_if_absent:  # server without conditional writes
                        body.seek(0)
                        self.client.put_object(Body=body, **args)
                        return self._put_sidecar(key, digest)
                    if code not in _PRECONDITION_CODES:
                        raise
        recorded = self._recorded(key, (self._head(key) or {}).get("Metadata"))
        if recorded != digest:
            raise KeyExistsError(f"{self.uri(key)} was written by someone else meanwhile (sha256 {recorded}, "
                                 f"ours {digest}); pass overwrite=True to replace it")

    def _put_sidecar(self, key: str, digest: str) -> None:
        with self._translate("put_object", self.uri(key) + SHA_SUFFIX):
            self.client.put_object(Bucket=self.bucket, Key=self._object_key(key) + SHA_SUFFIX,
                                   Body=digest.encode(), ContentType="text/plain")

    def get_file(self, key: str, dest: str | Path) -> Path:
        with self._translate("get_object", self.uri(key)):
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        # Check what this very response carries: metadata and bytes come from the same object version.
        body = response["Body"]
        with contextlib.closing(body):
            recorded = self._verifiable(key, response.get("Metadata"))

            def fill(tmp: Path) -> None:
                with self._translate("get_object", self.uri(key)), tmp.open("wb") as out:
                    for chunk in body.iter_chunks(_CHUNK):
                        out.write(chunk)

            return self._deliver(key, dest, recorded, fill)

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        with self._translate("list_objects_v2", f"{self.uri_root()}/{prefix}" if prefix else self.uri_root()):
            pages = paginator.paginate(Bucket=self.bucket, Prefix=base + prefix,
                                       PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(base):]
                    # skip folder markers some tools create, and our sha256 sidecars
                    if key and not key.endswith("/") and not key.endswith(SHA_SUFFIX):
                        keys.append(key)
        return sorted(keys)

    # ------------------------------------------------------------------------------------------ markers
    def create_marker(self, key: str, data: bytes) -> bool:
        if self._enforces_conditional_writes():
            from botocore.exceptions import ClientError

            with self._translate("put_object", self.uri(key)):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data, IfNoneMatch="*")
                    return True
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in _PRECONDITION_CODES:
                        raise
                    return False
        return self._claim_then_create(key, data)

    def _enforces_conditional_writes(self) -> bool:
        """Does the server refuse a PUT with If-None-Match: * over an existing object? AWS S3, MinIO and moto do;
        `rclone serve s3` ignores the header and overwrites. One probe per store says which way markers go."""
        if self._conditional_writes is None:
            from botocore.exceptions import ClientError

            probe = self._object_key(f"locks/.probe-{uuid.uuid4().hex}")
            with self._translate("put_object", f"s3://{self.bucket}/{probe}"):
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1")
                try:
                    self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                    self._conditional_writes = False
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code not in (*_PRECONDITION_CODES, "NotImplemented"):
                        raise
                    self._conditional_writes = code != "NotImplemented"
                finally:
                    self.client.delete_object(Bucket=self.bucket, Key=probe)
        return self._conditional_writes

    def _claim_then_create(self, key: str, data: bytes) -> bool:
        """create_marker on a server without conditional writes. Each creator first writes a claim of its own
        (a unique key, so nothing is overwritten), then lists the claims: it creates the marker only when it sees
        no other fresh claim and no marker, and removes its claim only afterwards. Of two creators, the one that
        lists second sees the first one's claim (S3 listings are strongly consistent), so at most one creates the
        marker. When creators see each other, the one with the smallest claim keeps its claim and looks again
        while the others withdraw and retry later, so that one of them gets through."""
        for attempt in range(1, 11):
            outcome = self._claim_once(key, data)
            if outcome is not None:
                return outcome
            time.sleep(random.uniform(0.1, 0.3) * attempt)
        return False

    def _claim_once(self, key: str, data: bytes) -> bool | None:
        """True: created; False: a marker is there; None: other creators are at it."""
        claims = self._object_key(f"{key}.claims") + "/"
        mine = f"{claims}{uuid.uuid4().hex}"
        with self._translate("put_object", self.uri(key)):
            self.client.put_object(Bucket=self.bucket, Key=mine, Body=b"")
            try:
                for _ in range(40):  # the smallest claim waits up to ~2 s for the others to withdraw
                    others = self._other_claims(claims, mine)
                    if self.read_marker(key) is not None:  # read after the listing: a creator that just
                        return False                        # withdrew its claim has its marker in place
                    if not others:
                        self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data)
                        return True
                    if min(others) < mine:
                        return None
                    time.sleep(0.05)
                return None
            finally:
                self.client.delete_object(Bucket=self.bucket, Key=mine)

    def _other_claims(self, claims: str, mine: str) -> list[str]:
        """The fresh claims besides ours; claims older than CLAIM_TTL_S (left by a crash) are removed."""
        from botocore.exceptions import ClientError

        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=claims).get("Contents", [])
        stamps = {obj["Key"]: obj["LastModified"] for obj in listed}
        if mine not in stamps:  # a listing that misses our own claim cannot be trusted to show the others
            return [""]
        now = stamps[mine]  # the server's clock, not ours
        others = [k for k, t in stamps.items() if k != mine and (now - t).total_seconds() < CLAIM_TTL_S]
        for stale in set(stamps) - {mine, *others}:
            with contextlib.suppress(ClientError):
                self.client.delete_object(Bucket=self.bucket, Key=stale)
        return others

    def read_marker(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._translate("get_object", self.uri(key)):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                return body.read()

    def delete_marker(self, key: str) -> None:
        with self._translate("delete_object", self.uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
