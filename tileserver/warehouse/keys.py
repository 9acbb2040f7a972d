"""`/api/users/me/keys` and their accesses: API keys that open restricted offerings.

A key is the shared store's API key (what the services check, by hash); `HASH` keys take their
value from `type_infos.hash` (generated when absent and shown once). An access grants the key
the offerings (by id) of the user's datastores: the services resolve them to layer records.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.store import IntegrityError, PublicationStore

from .accounts import now_iso
from .configurations import OFFERING
from .errors import bad_request, not_found
from .web import Ctx, json_body, json_response, list_response, no_content, route

PREFIX = "/api/users/me/keys"


def _keys(store: PublicationStore, user_id: str) -> list[dict[str, Any]]:
    with store.reading() as db:
        rows = db.execute("SELECT k.id, k.name, k.created_at, o.body FROM api_keys k JOIN wh_key_owners o"
                          " ON o.key_id = k.id WHERE o.user_id = ? AND k.revoked_at IS NULL ORDER BY k.created_at",
                          (user_id,)).fetchall()
    return [{"_id": kid, "name": name, "creation": created, **json.loads(body)} for kid, name, created, body in rows]


def key_view(key: dict[str, Any]) -> dict[str, Any]:
    return {"_id": key["_id"], "name": key["name"], "type": key.get("type", "HASH"), "creation": key["creation"],
            "type_infos": {}, "whitelist": [], "blacklist": [], "user_agent": None, "referer": None}


def _get(ctx: Ctx) -> dict[str, Any]:
    ident = ctx.param("key").lower()
    key = next((k for k in _keys(ctx.wh.store, ctx.user.id) if k["_id"] == ident), None)
    if key is None:
        raise not_found("key", ident)
    return key


@route
async def list_keys(ctx: Ctx) -> Response:
    return list_response(ctx.request, [key_view(k) for k in await asyncio.to_thread(_keys, ctx.wh.store, ctx.user.id)])


_UNUSABLE = ("type_infos.hash: this value cannot be used; give at least 16 characters, 6 of them"
             " different, or omit it to have one generated")


def _strong(value: Any) -> bool:
    """A chosen key value must be hard to guess: key values are global (a service finds a key by its
    digest alone), so a taken value has to be refused, and that refusal only tells an attacker what
    they already hold when values cannot be guessed."""
    return isinstance(value, str) and len(value) >= 16 and len(set(value)) >= 6


@route
async def create_key(ctx: Ctx) -> Response:
    data = await json_body(ctx.request)
    problems = []
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        problems.append("name: a non-empty string is required")
    if data.get("type", "HASH") != "HASH":
        problems.append("type: only HASH keys are offered here")
    infos = data.get("type_infos") or {}
    value = infos.get("hash") if isinstance(infos, dict) else None
    if value is not None and not _strong(value):
        problems.append(_UNUSABLE)
    if problems:
        raise bad_request(*problems)
    value = value or secrets.token_urlsafe(24)
    key_id = str(uuid.uuid4())
    created = now_iso()

    def write() -> None:
        with ctx.wh.store.transaction() as db:
            db.execute("INSERT INTO api_keys (id, name, key_hash, layers, created_at) VALUES (?, ?, ?, '[]', ?)",
                       (key_id, data["name"].strip(), PublicationStore.hash_key(value), created))
            db.execute("INSERT INTO wh_key_owners (key_id, user_id, body) VALUES (?, ?, ?)",
                       (key_id, ctx.user.id, json.dumps({"type": "HASH", "offerings": []})))

    try:
        await asyncio.to_thread(write)
    except IntegrityError:
        # the same answer as a weak value: never "exists" (a 409 would confirm another user's key)
        raise bad_request(_UNUSABLE) from None
    view = key_view({"_id": key_id, "name": data["name"].strip(), "creation": created})
    view["type_infos"] = {"hash": value}  # shown once: only its digest is kept
    return json_response(view, status=201)


@route
async def get_key(ctx: Ctx) -> Response:
    return json_response(key_view(_get(ctx)))


@route
async def delete_key(ctx: Ctx) -> Response:
    key = _get(ctx)
    await asyncio.to_thread(ctx.wh.store.revoke_key, key["_id"])
    await ctx.wh.runtime.refresh()
    return no_content()


def _grant(ctx: Ctx, key_id: str, offering_ids: list[str]) -> None:
    """A key's grants are offering ids (never layer names, which another tenant may reuse); the store
    resolves them to layer records while the offering exists and the owner is a member of its datastore."""
    with ctx.wh.store.transaction() as db:
        db.execute("UPDATE wh_key_owners SET body = ? WHERE key_id = ?",
                   (json.dumps({"type": "HASH", "offerings": offering_ids}), key_id))


@route
async def list_accesses(ctx: Ctx) -> Response:
    key = _get(ctx)
    return list_response(ctx.request, [{"_id": o, "offering": {"_id": o}} for o in key.get("offerings", [])])


@route
async def add_access(ctx: Ctx) -> Response:
    """`{"offerings": [ids]}` (a `permission` may accompany them, as on the platform)."""
    key = _get(ctx)
    data = await json_body(ctx.request)
    wanted = data.get("offerings")
    if not isinstance(wanted, list) or not wanted or not all(isinstance(o, str) for o in wanted):
        raise bad_request("offerings: a non-empty array of offering identifiers is required")
    problems = []
    for i, ident in enumerate(wanted):
        offering = ctx.wh.entities.get(OFFERING, ident.lower())
        if offering is None or offering.datastore_id not in ctx.user.datastores:
            problems.append(f"offerings[{i}]: no offering {ident} in your datastores")
    if problems:
        raise bad_request(*problems)
    offerings = sorted(set(key.get("offerings", [])) | {o.lower() for o in wanted})
    await asyncio.to_thread(_grant, ctx, key["_id"], offerings)
    await ctx.wh.runtime.refresh()
    return json_response([{"_id": o, "offering": {"_id": o}} for o in offerings], status=201)


@route
async def remove_access(ctx: Ctx) -> Response:
    key = _get(ctx)
    access = ctx.param("access").lower()
    if access not in key.get("offerings", []):
        raise not_found("access", access)
    await asyncio.to_thread(_grant, ctx, key["_id"], [o for o in key["offerings"] if o != access])
    await ctx.wh.runtime.refresh()
    return no_content()


def routes() -> list[BaseRoute]:
    return [
        Route(PREFIX, list_keys, methods=["GET"]),
        Route(PREFIX, create_key, methods=["POST"]),
        Route(PREFIX + "/{key}", get_key, methods=["GET"]),
        Route(PREFIX + "/{key}", delete_key, methods=["DELETE"]),
        Route(PREFIX + "/{key}/accesses", list_accesses, methods=["GET"]),
        Route(PREFIX + "/{key}/accesses", add_access, methods=["POST"]),
        Route(PREFIX + "/{key}/accesses/{access}", remove_access, methods=["DELETE"]),
    ]
