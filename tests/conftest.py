"""Shared pytest fixtures. Each block below belongs to one part of the project; append yours."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

# ==== storage: S3 (moto) server, counting/fault proxy, settings ==================================
# s3_server (session)   MotoS3Server: .url, .name ("127.0.0.1:port"), .port, .s3 (sync botocore
#                       client), .create_bucket(), .put(bucket, key, data), .get(bucket, key)
# s3_bucket             a fresh bucket name on s3_server
# s3_settings           Settings with one cluster: s3_server, key/secret "testing", short retries
# s3_storage (session)  a started tileserver.storage.Storage on s3_settings
# s3_proxy              S3Proxy in front of s3_server, cleared for each test: .url, .name,
#                       .requests, .count(), .counts(), .fail_next(n, status),
#                       .stall_next(n, seconds), .reset_next(n), .clear()
# s3_proxy_settings     Settings with one cluster: s3_proxy (timeout 0.5 s, 2 retries, fast back-off)
from s3proxy import S3Proxy
from s3server import KEY, SECRET, MotoS3Server

from tileserver.settings import S3Cluster, Settings
from tileserver.storage import Storage


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoS3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture(scope="session")
def s3_settings(s3_server: MotoS3Server) -> Settings:
    return Settings(
        s3_clusters=(S3Cluster(s3_server.url, KEY, SECRET),),
        storage_timeout=5.0, storage_connect_timeout=2.0, storage_retries=2, storage_retry_backoff=0.01,
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def s3_storage(s3_settings: Settings) -> AsyncIterator[Storage]:
    async with Storage(s3_settings) as storage:
        yield storage


@pytest.fixture(scope="session")
def _s3_proxy_running(s3_server: MotoS3Server) -> Iterator[S3Proxy]:
    proxy = S3Proxy(s3_server.url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_proxy(_s3_proxy_running: S3Proxy) -> Iterator[S3Proxy]:
    _s3_proxy_running.clear()
    yield _s3_proxy_running
    _s3_proxy_running.clear()


@pytest.fixture
def s3_proxy_settings(s3_proxy: S3Proxy) -> Settings:
    return Settings(
        s3_clusters=(S3Cluster(s3_proxy.url, KEY, SECRET),),
        storage_timeout=0.5, storage_connect_timeout=0.5, storage_retries=2, storage_retry_backoff=0.01,
    )


# ==== end storage ================================================================================
