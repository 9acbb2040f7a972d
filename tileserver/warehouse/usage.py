"""What a datastore uses: bytes of uploads and pyramids, offerings per endpoint (its quota's
measure and what `GET /datastores/{id}` shows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .accounts import Datastore

if TYPE_CHECKING:
    from .service import Warehouse


def datastore_usage(wh: Warehouse, datastore: Datastore) -> dict[str, Any]:
    uploads = sum(int(e.body.get("size", 0)) for e in wh.entities.list("upload", datastore.id))
    pyramids = 0
    for entity in wh.entities.list("stored_data", datastore.id):
        stored = wh.store.get_stored_data(entity.id)
        if stored is not None:
            pyramids += int(stored.summary.get("size", 0) or 0)
    offerings: dict[str, int] = {}
    for entity in wh.entities.list("offering", datastore.id):
        endpoint = entity.body.get("endpoint", "")
        offerings[endpoint] = offerings.get(endpoint, 0) + 1
    return {"uploads": uploads, "pyramids": pyramids, "offerings": offerings}
