"""Errors as the platform answers them: `{"error": …, "error_description": [strings]}`.

The SDK joins `error_description` with newlines, so it is always a list; statuses are the ones
its retry logic treats right (400/404/409 are final, 401/403 renew the token).
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from starlette.responses import JSONResponse


class ApiError(Exception):
    """Raised anywhere in a handler; rendered by the route wrapper."""

    def __init__(self, status: int, descriptions: str | Iterable[str], headers: dict[str, str] | None = None):
        self.status = status
        self.descriptions = [descriptions] if isinstance(descriptions, str) else list(descriptions)
        self.headers = headers
        super().__init__("; ".join(self.descriptions))

    def response(self) -> JSONResponse:
        body = {"error": HTTPStatus(self.status).phrase, "error_description": self.descriptions}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(*descriptions: str) -> ApiError:
    return ApiError(400, descriptions)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"{what} {ident} not found")


def conflict(*descriptions: str) -> ApiError:
    return ApiError(409, descriptions)
