"""`POST /api/token` (OAuth2 password and client_credentials grants), `GET /api/users/me`,
`GET /api/datastores/{datastore}`: the shapes IGN's SDK reads (ENTREPOT-API.md §2, §4.0)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver.services.ows import base_url

from .accounts import Datastore, User
from .credentials import TOKEN_LIFETIME
from .endpoints import ENDPOINTS
from .logins import HashingBusy, TooManyAttempts
from .pyramid_home import on_s3
from .service import warehouse_of
from .usage import datastore_usage
from .web import Ctx, json_response, public, read_body, route

RIGHTS = ("community_rights", "uploads_rights", "processings_rights", "datastore_rights",
          "stored_data_rights", "broadcast_rights", "annexes_rights", "sheet_rights")


def _oauth_error(status: int, error: str, description: str, extra: dict[str, str] | None = None) -> JSONResponse:
    """OAuth2 errors carry a string description (RFC 6749 §5.2), unlike the API's lists."""
    headers = {"WWW-Authenticate": 'Bearer realm="tileserver warehouse"'} if status == 401 else {}
    return JSONResponse({"error": error, "error_description": description}, status_code=status,
                        headers={"Cache-Control": "no-store", **headers, **(extra or {})})


@public
async def token(request: Request) -> Response:
    """Grant `password` (username/password) or `client_credentials` (client_id/client_secret of a
    user account). Only 200 is success for the SDK, and `expires_in` must be a positive number."""
    wh = warehouse_of(request)
    try:
        form = {k: v[0] for k, v in parse_qs((await read_body(request, 1 << 16)).decode(), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        return _oauth_error(400, "invalid_request", "the form body must be UTF-8")
    grant = form.get("grant_type", "")
    if grant == "password":
        login, password = form.get("username", ""), form.get("password", "")
    elif grant == "client_credentials":
        login, password = form.get("client_id", ""), form.get("client_secret", "")
    else:
        return _oauth_error(400, "unsupported_grant_type", "grant_type must be password or client_credentials")
    if not login or not password:
        return _oauth_error(401, "invalid_grant", "Invalid user credentials")
    address = request.client.host if request.client else ""
    try:
        user = await wh.logins.authenticate(wh.accounts, login[:256], password, address)
    except TooManyAttempts as exc:
        return _oauth_error(429, "too_many_attempts", f"{exc}: retry in {exc.retry_after} s",
                            {"Retry-After": str(exc.retry_after)})
    except HashingBusy:
        return _oauth_error(503, "temporarily_unavailable", "too many logins at once: retry in a second",
                            {"Retry-After": "1"})
    if user is None:
        return _oauth_error(401, "invalid_grant", "Invalid user credentials")
    access_token = await asyncio.to_thread(wh.accounts.issue_token, user.id)
    return JSONResponse({"access_token": access_token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME,
                         "refresh_expires_in": 0, "scope": "profile email"},
                        headers={"Cache-Control": "no-store"})


def community_view(datastore: Datastore) -> dict[str, Any]:
    return {"_id": datastore.id, "name": datastore.name, "technical_name": datastore.technical_name,
            "datastore": datastore.id, "public": False}


def user_view(ctx: Ctx, user: User) -> dict[str, Any]:
    members = []
    for datastore_id in user.datastores:
        datastore = ctx.wh.accounts.get_datastore(datastore_id)
        if datastore is not None:
            members.append({"community": community_view(datastore), "rights": {r: True for r in RIGHTS}})
    return {"_id": user.id, "email": user.email, "first_name": user.first_name, "last_name": user.last_name,
            "creation": user.created_at, "communities_member": members, "administrator": False}


@route
async def me(ctx: Ctx) -> Response:
    return json_response(user_view(ctx, ctx.user))


@route
async def datastore(ctx: Ctx) -> Response:
    ds = ctx.datastore
    base = base_url(ctx.request)
    usage = await asyncio.to_thread(datastore_usage, ctx.wh, ds)
    published = usage["offerings"]
    return json_response({
        "_id": ds.id,
        "name": ds.name,
        "technical_name": ds.technical_name,
        "active": True,
        "creation": ds.created_at,
        "community": community_view(ds),
        "storages": {
            "data": [{"storage": {"_id": ds.id, "name": "pyramids",
                                  "type": "S3" if on_s3(ctx.wh.settings) else "FILESYSTEM"},
                      "quota": ds.quota, "use": usage["pyramids"]}],
            "uploads": {"quota": ds.quota, "use": usage["uploads"]},
            "annexes": {"quota": 0, "use": 0},
        },
        "endpoints": [{"endpoint": e.view(base), "quota": 1000, "use": published.get(e.technical_name, 0)}
                      for e in ENDPOINTS],
    })


def routes() -> list[BaseRoute]:
    return [
        Route("/api/token", token, methods=["POST"]),
        Route("/api/users/me", me, methods=["GET"]),
        Route("/api/datastores/{datastore}", datastore, methods=["GET"]),
    ]
