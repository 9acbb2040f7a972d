"""schemathesis against `/api/openapi.json` on a live server: no 5xx, answers conform to the
document (status codes, content types, bodies)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_warehouse_support import api_client, warehouse_server  # noqa: E402

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with warehouse_server(Path(tmp_path_factory.mktemp("openapi"))) as (url, _settings):
        token = api_client(url).headers["Authorization"]
        yield url, token


def test_api_conforms(live: tuple[str, str]) -> None:
    """Every operation, a few generated requests each (derandomized: the same ones every run)."""
    from hypothesis import given

    url, token = live
    api = schemathesis.openapi.from_url(f"{url}/api/openapi.json")
    failures = []
    tried = 0
    for result in api.get_all_operations():
        operation = result.ok()
        tried += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case) -> None:
            case.call_and_validate(base_url=url, headers={"Authorization": token}, checks=CHECKS)

        try:
            call()
        except Exception as exc:  # collect them all, then fail once
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:600]}")
    assert tried > 70
    assert not failures, "\n\n".join(failures)


def test_document_covers_every_route(live: tuple[str, str]) -> None:
    import httpx

    from tileserver.warehouse.api import routes

    document = httpx.get(f"{live[0]}/api/openapi.json").json()
    assert document["openapi"].startswith("3.")
    for route in routes():
        if route.path != "/api/{rest:path}":
            for method in route.methods - {"HEAD"}:
                assert method.lower() in document["paths"][route.path], (method, route.path)


def test_document_lists_the_limits_answers(live: tuple[str, str]) -> None:
    """The answers of the quotas and limits are documented: 503 everywhere (store not writable),
    411/507 on pushes, 429/503 on the token endpoint."""
    import httpx

    paths = httpx.get(f"{live[0]}/api/openapi.json").json()["paths"]
    pushes = [op for path in paths.values() for op in path.values()
              if "multipart/form-data" in op.get("requestBody", {}).get("content", {})]
    assert pushes and all({"411", "507", "503"} <= set(op["responses"]) for op in pushes)
    assert {"429", "503"} <= set(paths["/api/token"]["post"]["responses"])
    assert all("503" in op["responses"] for path in paths.values() for op in path.values()
               if op.get("security") != [])
