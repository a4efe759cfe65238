"""Content-addressed blob store on an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph).

Same methods as the local `BlobStore`: the object key is S3_PREFIX + the SHA-256 hex of the
bytes. `put` is idempotent (an object already there is not sent again) and asks the server to
check the bytes against their SHA-256; the bucket is created on first use when missing.
Connection failures and server errors become `Unavailable` (code `storage_unavailable`), so
the gateway answers 503 and a worker retries the batch; a missing object is `NotFound`.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.blobs import BlobStore, content_id, is_valid_id
from shared.errors import NotFound, Unavailable
from shared.settings import Settings

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs as objects in one bucket, keyed by SHA-256 hex (under an optional prefix)."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
        client: Any = None,
    ) -> None:
        # No local root: BlobStore.__init__ is deliberately not called.
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix, endpoint_url
        self.region = region
        if client is None:
            config = Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=16,  # the worker reads a batch's blobs from a thread pool
                # S3-compatible servers want bucket/key paths, not bucket.host names.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                # Checksums only where the API requires them; put() sends its own SHA-256.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            # A session of its own: boto3's default session is not thread-safe to set up.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )
        self.client = client
        self._bucket_ready = False
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        """The store that S3_ENDPOINT_URL, S3_BUCKET, S3_REGION, S3_PREFIX and the keys name."""
        access, secret = settings.s3_access_key, settings.s3_secret_key
        if (access is None) != (secret is None):
            raise ValueError("set both S3_ACCESS_KEY and S3_SECRET_KEY, or neither")
        return cls(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region or None,
            access_key=access.get_secret_value() if access else None,
            secret_key=secret.get_secret_value() if secret else None,
            prefix=settings.s3_prefix,
        )

    def object_key(self, key: str) -> str:
        """The object key for a blob key (which must be a SHA-256 hex)."""
        if not is_valid_id(key):
            raise NotFound(f"no image {key!r}", code="image_not_found")
        return f"{self.prefix}{key}"

    def path(self, key: str) -> Path:
        """S3 blobs have no local path: serve them with get() (see local_path)."""
        raise NotImplementedError("S3 blobs have no local path; use get()")

    def local_path(self, key: str) -> Path | None:
        """Always None: the bytes live in the bucket."""
        return None

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (once per process; safe against races)."""
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    self._fail("check the bucket", exc)
                self._create_bucket()
            except BotoCoreError as exc:
                self._fail("check the bucket", exc)
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**args)
        except ClientError as exc:
            if _code(exc) not in _EXISTS:  # another process created it first
                self._fail("create the bucket", exc)
        except BotoCoreError as exc:
            self._fail("create the bucket", exc)

    def put(self, data: bytes) -> str:
        """Store `data` once under its SHA-256 (checked by the server) and return its key."""
        key = content_id(data)
        if self.exists(key):
            return key
        checksum = base64.b64encode(bytes.fromhex(key)).decode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.object_key(key), Body=data, ChecksumSHA256=checksum
            )
        except (ClientError, BotoCoreError) as exc:
            self._fail("store the upload", exc)
        return key

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`; NotFound if there are none."""
        name = self.object_key(key)
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise NotFound(f"no image {key!r}", code="image_not_found") from None
            self._fail("read a blob", exc)
        except BotoCoreError as exc:
            self._fail("read a blob", exc)
        return data

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""
        if not is_valid_id(key):
            return False
        self.ensure_bucket()
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            self._fail("look up a blob", exc)
        except BotoCoreError as exc:
            self._fail("look up a blob", exc)
        return True

    def delete(self, key: str) -> bool:
        """Remove the blob; True if it existed."""
        if not self.exists(key):
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (ClientError, BotoCoreError) as exc:
            self._fail("delete a blob", exc)
        return True

    def listing(self) -> Iterator[tuple[str, float]]:
        """Every key in the bucket under the prefix, with when it was written (Unix time)."""
        self.ensure_bucket()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if is_valid_id(key):
                        yield key, obj["LastModified"].timestamp()
        except (BotoCoreError, ClientError) as exc:
            self._fail("list", exc)

    def ping(self) -> bool:
        """Whether the bucket can be reached (creating it if missing)."""
        self._bucket_ready = False
        self.ensure_bucket()
        return True

    def _fail(self, what: str, exc: Exception) -> NoReturn:
        where = self.endpoint_url or "S3"
        raise Unavailable(
            f"cannot {what} in bucket {self.bucket!r} at {where}: {exc}",
            code="storage_unavailable",
        ) from exc
