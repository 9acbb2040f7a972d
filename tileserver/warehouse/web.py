"""What every warehouse route shares: bearer authentication, datastore access, JSON bodies,
list filters and pagination with `Content-Range`, and errors rendered the platform's way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tileserver.publication.store import Conflict, NotFound, StoreError, StoreUnavailable

from .accounts import Datastore, User
from .entities import Gone
from .errors import ApiError, bad_request
from .service import Warehouse, warehouse_of

log = logging.getLogger("tileserver.warehouse")

MAX_JSON_BODY = 1 << 20
MAX_JSON_DEPTH = 32  # nesting of a JSON body (the platform's bodies nest 4 levels at most)
DEFAULT_LIMIT = 10
MAX_LIMIT = 10000
MAX_FILTER_VALUE = 256  # characters of one list filter's value (names are at most 100-255 anyway)
MAX_FILTERS = 20  # filters in one list request
RESERVED_PARAMS = {"page", "limit", "fields", "sort", "order"}
_TAG_PARAM = re.compile(r"^tags\[(?P<key>[^\]]+)\]$")


@dataclass(frozen=True)
class Ctx:
    """One authenticated request: who asks, in which datastore."""

    request: Request
    wh: Warehouse
    user: User
    datastore: Datastore  # the URL's datastore, or the default one for routes outside datastores

    def param(self, name: str) -> str:
        return self.request.path_params[name]


Handler = Callable[[Ctx], Awaitable[Response]]


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def unauthorized(description: str) -> ApiError:
    return ApiError(401, description, headers={"WWW-Authenticate": 'Bearer realm="tileserver warehouse"'})


async def _authenticate(request: Request, wh: Warehouse) -> User:
    token = _bearer(request)
    if token is None:
        raise unauthorized("authentication required: 'Authorization: Bearer <token>' (POST /api/token)")
    user = await asyncio.to_thread(wh.accounts.user_for_token, token)
    if user is None:
        raise unauthorized("invalid or expired token")
    return user


def _datastore(request: Request, wh: Warehouse, user: User) -> Datastore:
    ident = request.path_params.get("datastore")
    if ident is None:
        return wh.accounts.default_datastore()
    datastore = wh.accounts.get_datastore(ident)
    if datastore is None:
        raise ApiError(404, f"datastore {ident} not found")
    if datastore.id not in user.datastores:
        raise ApiError(403, f"you are not a member of the community of datastore {ident}")
    return datastore


def route(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An authenticated route: 401 without a valid token, 403 outside the user's communities;
    store refusals map to 400/404/409, never 500."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            wh = warehouse_of(request)
            user = await _authenticate(request, wh)
            return await handler(Ctx(request, wh, user, _datastore(request, wh, user)))
        except ApiError as exc:
            return exc.response()
        except NotFound as exc:
            return ApiError(404, str(exc)).response()
        except Conflict as exc:
            return ApiError(409, str(exc)).response()
        except Gone:
            return ApiError(404, "not found (it was deleted meanwhile)").response()
        except StoreUnavailable as exc:  # the store file vanished or turned read-only: loud, and retryable
            return ApiError(503, str(exc)).response()
        except StoreError as exc:
            return ApiError(400, str(exc)).response()

    return endpoint


def public(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A route without authentication (token, OpenAPI document): errors still rendered as JSON."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except StoreUnavailable as exc:  # a store database unreachable (its reads can fail too)
            return ApiError(503, str(exc)).response()

    return endpoint


async def read_body(request: Request, limit: int = MAX_JSON_BODY) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body must not exceed {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body must not exceed {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, kind: type = dict) -> Any:
    """The request's JSON (an object by default); 400 naming the problem otherwise."""
    raw = await read_body(request)
    if not raw.strip():
        raise bad_request("a JSON body is required")
    if nesting(raw) > MAX_JSON_DEPTH:
        raise bad_request(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(data, kind):
        raise bad_request(f"the body must be a JSON {'object' if kind is dict else 'array'}")
    return data


def nesting(raw: bytes) -> int:
    """Deepest array/object nesting of a JSON text, in one pass (brackets inside strings skipped),
    checked before parsing: the parser recurses once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=dict(headers or {}))


def no_content() -> Response:
    return Response(status_code=204)


# --- lists ----------------------------------------------------------------------------------------


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or int(text) < 1:
        raise bad_request(f"{name} must be a positive integer (got {text!r})")
    return min(int(text), maximum)


def page_window(request: Request, default_limit: int = DEFAULT_LIMIT) -> tuple[int, int]:
    """(offset, limit) from `page` (1-based) and `limit`."""
    limit = _int_param(request, "limit", default_limit, MAX_LIMIT)
    page = _int_param(request, "page", 1, 1 << 31)
    return (page - 1) * limit, limit


def content_range(offset: int, count: int, total: int) -> str:
    """`first-last/total`, which the SDK parses to know whether to fetch the next page."""
    if not count:  # still digits: the SDK warns on anything its pattern cannot read
        return f"{offset}-{offset}/{total}"
    return f"{offset}-{offset + count - 1}/{total}"


def like(text: str, pattern: str) -> bool:
    """`%` wildcard match, case-insensitive, in linear time: the literal pieces between `%` are found
    left to right, each at its first place after the previous one (greedy is exact for `%`-only
    patterns), so no input can make it backtrack the way a regular expression does."""
    text, pieces = text.casefold(), pattern.casefold().split("%")
    first, *middle, last = pieces
    if not text.startswith(first):
        return False
    at = len(first)
    for piece in middle:
        found = text.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return len(text) - at >= len(last) and text.endswith(last)


def _matches(value: Any, wanted: str) -> bool:
    """Field filter: exact, or a `%` wildcard pattern (case-insensitive); objects match on their
    `_id`, arrays when one element matches."""
    if isinstance(value, list):
        return any(_matches(v, wanted) for v in value)
    if isinstance(value, dict):
        value = value.get("_id")
    if value is None:
        return False
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if "%" in wanted:
        return like(text, wanted)
    return text == wanted


Filter = Callable[[dict[str, Any], str], bool]


def filter_items(request: Request, items: Iterable[dict[str, Any]],
                 special: Mapping[str, Filter] | None = None) -> list[dict[str, Any]]:
    """Apply every query filter: `tags[k]=v`, named special filters, else the item's field."""
    special = special or {}
    criteria: list[tuple[str, str]] = [(k, v) for k, v in request.query_params.multi_items()
                                       if k not in RESERVED_PARAMS]
    if len(criteria) > MAX_FILTERS:
        raise bad_request(f"at most {MAX_FILTERS} filters per list request")
    for key, wanted in criteria:
        if len(wanted) > MAX_FILTER_VALUE or len(key) > MAX_FILTER_VALUE:
            raise bad_request(f"{key[:50]}: a filter value has at most {MAX_FILTER_VALUE} characters")
    out = []
    for item in items:
        keep = True
        for key, wanted in criteria:
            tag = _TAG_PARAM.match(key)
            if tag:
                keep = _matches((item.get("tags") or {}).get(tag["key"]), wanted)
            elif key in special:
                keep = special[key](item, wanted)
            else:
                keep = _matches(item.get(key), wanted)
            if not keep:
                break
        if keep:
            out.append(item)
    return out


def list_response(request: Request, items: Iterable[dict[str, Any]],
                  special: Mapping[str, Filter] | None = None) -> JSONResponse:
    """Filtered, paginated list with the exact filtered total in `Content-Range`."""
    offset, limit = page_window(request)
    selected = filter_items(request, items, special)
    page = selected[offset:offset + limit]
    return json_response(page, headers={"Content-Range": content_range(offset, len(page), len(selected))})
