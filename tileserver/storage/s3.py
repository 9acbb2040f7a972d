"""S3 backend, one per cluster: aiobotocore for the control plane, a lean signed GET for tiles.

aiobotocore (credentials, PUT, DELETE, ListObjectsV2) costs about 1 ms of CPU per call, which
would cap the tile path near 900 reads/s. Reads and HEADs therefore go over this cluster's own
kept-alive connections (http1.py), signed by `sigv4.SigV4Signer` (~5 µs against ~90 µs for botocore's signer) with
credentials taken from the aiobotocore session and re-checked every minute so refreshable ones
(instance roles, SSO) are renewed before they expire.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from functools import lru_cache
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore import UNSIGNED
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..settings import S3Cluster, Settings
from .backend import Backend
from .breaker import CircuitBreaker
from .errors import InvalidPathError, StorageError
from .http1 import Http1Client, HttpError
from .links import encode_link
from .paths import Scheme, StoragePath
from .retry import RetryPolicy, TransientError
from .sigv4 import Credentials, SigV4Signer, canonical_uri

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_RETRY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
     "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}
)
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_CREDENTIALS_RECHECK = 60.0  # seconds; botocore refreshes 15 min (advisory) before expiry


_loader: Any = None


def _new_session() -> AioSession:
    """A botocore session sharing one data loader: the parsed S3 model (~0.3 s) is loaded once per
    process instead of once per cluster or per `Storage`."""
    global _loader
    session = AioSession()
    if _loader is None:
        _loader = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _loader)
    return session


def _error_code(body: bytes) -> str:
    match = _CODE.search(body[:4096])
    return match.group(1).decode(errors="replace") if match else ""


def _status_failure(status: int, code: str, what: str) -> Exception:
    """The one place that decides which S3 answers are worth retrying."""
    detail = f"HTTP {status} {code}".rstrip()
    if status in _RETRY_STATUS or status >= 500 or code in _RETRY_CODES:
        return TransientError(detail)
    if status == 403:
        return StorageError(f"{what}: access denied ({detail}); check this cluster's key and secret")
    return StorageError(f"{what}: {detail}")


def _transport_failure(exc: BaseException, what: str) -> NoReturn:
    """Map a client-side exception (aiohttp or botocore) to retry or final error."""
    if isinstance(exc, (SSLError, aiohttp.ClientSSLError, ssl.SSLError)):
        raise StorageError(f"{what}: TLS failure ({exc.__class__.__name__})") from exc
    if isinstance(exc, (TimeoutError, ReadTimeoutError, ConnectTimeoutError)):
        raise TransientError("timed out", timeout=True) from exc
    if isinstance(exc, (aiohttp.ClientError, OSError, HttpError, HTTPClientError, BotoConnectionError)):
        raise TransientError(f"connection failed ({exc.__class__.__name__}: {exc})") from exc
    raise exc


class S3Backend(Backend):
    """One S3-compatible cluster (path-style addressing), reached by `bucket@<cluster.name>`."""

    object_links = True

    def __init__(self, cluster: S3Cluster, settings: Settings, policy: RetryPolicy) -> None:
        self.cluster = cluster
        self._settings = settings
        self._policy = policy  # whole objects, control plane
        # ranged reads (tiles, slab indexes) and HEADs: short attempts, the whole read within the deadline
        self._read_policy = replace(policy, timeout=min(settings.storage_read_timeout, policy.timeout),
                                    deadline=settings.storage_deadline)
        parts = urlsplit(cluster.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidPathError(f"S3 cluster url {cluster.url!r}: expected http(s)://host[:port]")
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        self._host = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        self._origin = f"{parts.scheme}://{self._host}"
        self._uri_prefix = parts.path.rstrip("/")
        self._signer = SigV4Signer(cluster.region)
        self._exit = AsyncExitStack()
        self._client: Any = None
        self._session_credentials: Any = None
        self._credentials: Credentials | None = None
        self._recheck_at = float("inf")
        self._target = lru_cache(maxsize=4096)(self._make_target)
        self.breaker = CircuitBreaker(f"S3 cluster {cluster.name}", settings.storage_breaker_failures,
                                      settings.storage_breaker_cooldown)
        self._reads = Http1Client(
            parts.scheme, parts.hostname, parts.port or default_port, limit=settings.storage_max_connections,
            timeout=settings.storage_timeout, connect_timeout=settings.storage_connect_timeout,
            verify_tls=settings.s3_ssl_verify,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        session = _new_session()
        if self.cluster.key:
            session.set_credentials(self.cluster.key, self.cluster.secret)
        self._session_credentials = await session.get_credentials()
        await self._refresh_credentials()
        s = self._settings
        config = AioConfig(
            region_name=self.cluster.region,
            signature_version="s3v4" if self._session_credentials is not None else UNSIGNED,
            s3={"addressing_style": "path"},
            connect_timeout=s.storage_connect_timeout,
            read_timeout=s.storage_timeout,
            max_pool_connections=s.storage_max_connections,
            retries={"total_max_attempts": 1},  # RetryPolicy retries, the same way for every call
            # CRC trailers/headers by default since botocore 1.36 upset older Ceph/MinIO; ask only
            # when an operation requires them
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = await self._exit.enter_async_context(
            session.create_client("s3", endpoint_url=self.cluster.url, verify=s.s3_ssl_verify, config=config)
        )

    async def close(self) -> None:
        await self._reads.close()
        await self._exit.aclose()
        self._client = None

    async def _refresh_credentials(self) -> Credentials | None:
        source = self._session_credentials
        if source is None:
            self._credentials, self._recheck_at = None, float("inf")
            return None
        frozen = await source.get_frozen_credentials()  # refreshes when close to expiry
        self._credentials = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        refreshable = hasattr(source, "refresh_needed")
        self._recheck_at = time.monotonic() + _CREDENTIALS_RECHECK if refreshable else float("inf")
        return self._credentials

    # -- the hot path: signed GET/HEAD over this cluster's kept-alive connections (http1.py) ---------------------------

    def _make_target(self, bucket: str, key: str) -> str:
        return self._uri_prefix + canonical_uri(bucket, key)

    async def _send(self, method: str, path: StoragePath, range_header: str | None,
                    what: str, budget: float) -> tuple[int, bytes, Mapping[str, str]]:
        uri = self._target(path.bucket, path.key)
        credentials = self._credentials
        if time.monotonic() >= self._recheck_at:
            credentials = await self._refresh_credentials()
        if credentials is not None:
            head = self._signer.request_head(credentials, method, self._host, uri, range_header)
        else:
            range_line = f"Range: {range_header}\r\n" if range_header else ""
            head = (f"{method} {uri} HTTP/1.1\r\nHost: {self._host}\r\n{range_line}"
                    "Accept-Encoding: identity\r\n\r\n").encode("latin-1")
        try:
            return await self._reads.send(head, method == "HEAD", budget)
        except Exception as exc:  # classified right here
            _transport_failure(exc, what)

    async def read(self, path: StoragePath, offset: int | None = None, size: int | None = None) -> bytes | None:
        if size == 0:
            return b"" if await self.exists(path) else None
        start = offset or 0
        if size is not None:
            range_header: str | None = f"bytes={start}-{start + size - 1}"
        else:
            range_header = f"bytes={start}-" if start else None
        what = f"GET {path}"

        async def attempt(budget: float) -> bytes | None:
            status, body, _ = await self._send("GET", path, range_header, what, budget)
            if status == 206:
                return body
            if status == 200:  # whole object: no Range asked, or a server that ignores it
                return body if range_header is None else body[start : None if size is None else start + size]
            if status == 404:
                return None
            if status == 416:  # range starts past the end: a short read of nothing
                return b""
            raise _status_failure(status, _error_code(body), what)

        policy = self._policy if size is None else self._read_policy
        return await policy.run(what, attempt, self.breaker)

    async def size(self, path: StoragePath) -> int | None:
        what = f"HEAD {path}"

        async def attempt(budget: float) -> int | None:
            status, body, headers = await self._send("HEAD", path, None, what, budget)
            if status == 200:
                return int(headers.get("Content-Length", 0))
            if status == 404:
                return None
            raise _status_failure(status, _error_code(body), what)

        return await self._read_policy.run(what, attempt, self.breaker)

    async def exists(self, path: StoragePath) -> bool:
        return await self.size(path) is not None

    # -- control plane: aiobotocore -----------------------------------------------------------------

    async def _call(self, what: str, operation: Callable[..., Awaitable[dict[str, Any]]],
                    **kwargs: Any) -> dict[str, Any]:
        async def attempt(budget: float) -> dict[str, Any]:  # aiobotocore's own socket timeouts apply
            try:
                return await operation(**kwargs)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                raise _status_failure(status, str(error.get("Code", "")), what) from exc
            except Exception as exc:  # classified right here
                _transport_failure(exc, what)

        return await self._policy.run(what, attempt, self.breaker)

    async def write(self, path: StoragePath, data: bytes) -> None:
        await self._call(f"PUT {path}", self._client.put_object, Bucket=path.bucket, Key=path.key, Body=data)

    async def put_file(self, path: StoragePath, local: str) -> None:
        """One PUT streamed from the file (S3 takes up to 5 GB so), reopened at each attempt."""
        async def put(**kwargs: Any) -> dict[str, Any]:
            with open(local, "rb") as body:  # noqa: ASYNC230 - opening is instant; the body is streamed
                return await self._client.put_object(Body=body, **kwargs)

        await self._call(f"PUT {path}", put, Bucket=path.bucket, Key=path.key)

    async def get_file(self, path: StoragePath, local: str) -> bool:
        if await self.size(path) is None:
            return False

        async def get(**kwargs: Any) -> dict[str, Any]:
            response = await self._client.get_object(**kwargs)
            async with response["Body"] as stream:
                with open(local, "wb") as out:  # noqa: ASYNC230
                    while chunk := await stream.read(1 << 20):
                        out.write(chunk)
            return response

        await self._call(f"GET {path}", get, Bucket=path.bucket, Key=path.key)
        return True

    async def delete(self, path: StoragePath) -> None:
        await self._call(f"DELETE {path}", self._client.delete_object, Bucket=path.bucket, Key=path.key)

    async def link(self, target: StoragePath, link: StoragePath) -> None:
        """ROK4 link object ``SYMLINK#<bucket>/<key>``; the target is on this same cluster."""
        if target.scheme is not Scheme.S3:
            raise InvalidPathError(f"link {link}: an S3 link cannot point to {target}")
        await self.write(link, encode_link(target.bucket, target.key))

    async def list(self, prefix: StoragePath) -> AsyncIterator[StoragePath]:
        async for path, _ in self.sizes(prefix):
            yield path

    async def sizes(self, prefix: StoragePath) -> AsyncIterator[tuple[StoragePath, int]]:
        """Listed with their sizes: one request per page of keys, none per object."""
        kwargs: dict[str, Any] = {"Bucket": prefix.bucket, "Prefix": prefix.key,
                                  "MaxKeys": self._settings.s3_list_page_size}
        while True:
            page = await self._call(f"LIST {prefix}", self._client.list_objects_v2, **kwargs)
            for item in page.get("Contents", ()):
                yield prefix.with_key(item["Key"]), int(item.get("Size", 0))
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
