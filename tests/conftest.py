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


# ==== publication store engines: SQLite file and PostgreSQL ======================================
# pg_server (session)   PostgresServer: a throwaway cluster (initdb + pg_ctl, loopback port), or
#                       TILESERVER_TEST_PG_URL when set; skipped only when no server binaries exist
# pg_url                a fresh empty database on pg_server (its URL), dropped after the test
# store_url             parametrised: a SQLite file path, then a PostgreSQL database URL
# store_backend         parametrised likewise, for tests building Settings through apputil's
#                       make_settings: sets the store_url every make_settings gives in this test
import os  # noqa: E402

from pgserver import ENV_URL, PostgresServer, server_binaries  # noqa: E402


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    url = os.environ.get(ENV_URL, "").rstrip("/")
    if not url and server_binaries() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql) and no TILESERVER_TEST_PG_URL")
    server = PostgresServer(url or None).start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    import apputil

    url = "" if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    apputil.STORE_URL = url
    yield request.param
    apputil.STORE_URL = ""


# ==== end publication store engines ==============================================================


# ==== PostGIS vector bases =======================================================================
# postgis_url (session)  a database on pg_server with the postgis extension (its URL); skipped when
#                        PostGIS is not installed (apt-get install postgresql-15-postgis-3)
# vector_backend         parametrised "gpkg" / "postgis": for tests building Settings through
#                        apputil's make_settings, sets the vector_db_url every make_settings gives


@pytest.fixture(scope="session")
def postgis_url(pg_server: PostgresServer) -> Iterator[str]:
    import psycopg

    url = pg_server.create_database()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    except psycopg.Error as e:
        pg_server.drop_database(url)
        pytest.skip(f"PostGIS is not installed: {e}")
    yield url
    pg_server.drop_database(url)


@pytest.fixture(params=["gpkg", "postgis"])
def vector_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    import apputil

    from tileserver.vector import postgis

    url = "" if request.param == "gpkg" else str(request.getfixturevalue("postgis_url"))
    postgis.configure(url)
    apputil.VECTOR_DB_URL = url
    yield request.param
    apputil.VECTOR_DB_URL = ""


# ==== end PostGIS vector bases ===================================================================
