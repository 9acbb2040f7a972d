"""`tileserver layers …` and `tileserver keys …`: the admin API's operations on the store directly
(`tileserver store migrate`: its schema).

A running server sees these changes through its store watcher within `store_poll_interval`
seconds (at once on PostgreSQL, by NOTIFY), so the CLI works on a live deployment without any HTTP
access or admin token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tileserver.cli import CommandError, print_json, run_async
from tileserver.publication.model import Layer, LayerError, parse_layer
from tileserver.publication.store import LayerExists, PublicationStore, StoreError, grant
from tileserver.settings import Settings, load_settings


def register(subparsers: Any) -> None:
    layers = subparsers.add_parser("layers", help="publish ROK4 layer descriptors (the admin API's store)")
    commands = layers.add_subparsers(dest="layers_command", required=True)

    def command(name: str, handler: Any, help: str, *, descriptor: bool = False, check: bool = False) -> Any:
        parser = commands.add_parser(name, help=help)
        if descriptor:
            parser.add_argument("id", help="layer id (as in /admin/layers/{id})")
            parser.add_argument("descriptor", help="ROK4 layer descriptor (JSON, server 7 or legacy keys)")
        if check:
            parser.add_argument("--check", action="store_true", help="open the pyramids to check they can be served")
        parser.set_defaults(handler=handler)
        return parser

    add = command("add", _add, "publish a new layer", descriptor=True, check=True)
    add.add_argument("--restricted", action="store_true", help="serve it only to API keys granting it")
    command("update", _update, "replace a layer's descriptor", descriptor=True, check=True)
    command("remove", _remove, "unpublish a layer").add_argument("id")
    command("list", _list, "list published layers").add_argument("--json", action="store_true", help="print JSON")
    command("show", _show, "print a layer's descriptor (server 7 keys)").add_argument("id")
    imp = command("import", _import, "publish every *.json layer descriptor of a directory", check=True)
    imp.add_argument("directory")
    imp.add_argument("--replace", action="store_true", help="replace layers that already exist")

    keys = subparsers.add_parser("keys", help="API keys for restricted layers")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key (its secret is printed once)")
    create.add_argument("name")
    create.add_argument("--layers", required=True, help="granted layer ids, comma-separated, or '*' for all")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(handler=_create_key)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list_keys)
    revoke = key_commands.add_parser("revoke", help="revoke a key")
    revoke.add_argument("id")
    revoke.set_defaults(handler=_revoke_key)

    store = subparsers.add_parser("store", help="the publication store itself (TILESERVER_STORE_URL)")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    migrate = store_commands.add_parser(
        "migrate", help="create or migrate the store's schema, then exit (servers also do it on start;"
                        " a deployment's migration job runs this)")
    migrate.add_argument("--json", action="store_true", help="print JSON")
    migrate.set_defaults(handler=_migrate)


# --- helpers ------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[PublicationStore]:
    store = PublicationStore(_settings(args).resolved_store_url)
    try:
        yield store
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()


def load_layer(layer_id: str, path: Path) -> Layer:
    """A layer from a descriptor file; LayerError names the field (or `(file)` for unreadable JSON)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise LayerError("(file)", f"cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayerError("(file)", f"malformed JSON: {exc}") from None
    return parse_layer(layer_id, data)


def _says_access(path: Path) -> bool:
    """Whether a descriptor file sets `restricted` (else replacing keeps the stored access)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "restricted" in data


async def _check_all(settings: Settings, layers: list[Layer]) -> dict[str, dict[str, dict] | LayerError]:
    """Open every layer's pyramids once: summaries by layer id, or the LayerError that refuses it."""
    from tileserver.catalog import PyramidPool
    from tileserver.publication.admin import check_layer
    from tileserver.pyramid import SlabIndexCache
    from tileserver.storage import Storage, StorageError

    out: dict[str, dict[str, dict] | LayerError] = {}
    async with Storage(settings) as storage:
        pool = PyramidPool(storage, SlabIndexCache(), settings.tms_directory)
        for layer in layers:
            try:
                out[layer.id] = await check_layer(layer, pool)
            except LayerError as exc:
                out[layer.id] = exc
            except StorageError as exc:
                out[layer.id] = LayerError("pyramids", f"storage unavailable: {exc}")
    return out


def _checked_layer(args: argparse.Namespace) -> tuple[Layer, dict[str, dict] | None]:
    try:
        layer = load_layer(args.id, Path(args.descriptor))
    except LayerError as exc:
        raise CommandError(f"{args.descriptor}: {exc.field}: {exc.message}") from None
    if not args.check:
        return layer, None
    result = run_async(_check_all(_settings(args), [layer]))[layer.id]
    if isinstance(result, LayerError):
        raise CommandError(f"{args.descriptor}: {result.field}: {result.message}")
    return layer, result


# --- layers -------------------------------------------------------------------------------------


def _add(args: argparse.Namespace) -> int:
    layer, summaries = _checked_layer(args)
    with _store(args) as store:
        try:
            store.add_layer(layer, args.restricted, summaries)
        except LayerExists:
            raise CommandError(f"layer {layer.id} already exists (use `tileserver layers update`)") from None
    print(f"layer {layer.id} added" + (" (restricted)" if args.restricted or layer.restricted else ""))
    return 0


def _update(args: argparse.Namespace) -> int:
    layer, summaries = _checked_layer(args)
    with _store(args) as store:
        store.put_layer(layer, summaries, keep_access=not _says_access(Path(args.descriptor)))
    print(f"layer {layer.id} updated")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_layer(args.id)
    print(f"layer {args.id} removed")
    return 0


def _list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        layers = store.list_layers()
    if args.json:
        print_json([{"id": layer.id, **layer.to_descriptor()} for layer in layers])
        return 0
    width = max((len(layer.id) for layer in layers), default=2)
    for layer in layers:
        access = "restricted" if layer.restricted else "open"
        print(f"{layer.id:<{width}}  {access:<10}  {','.join(layer.services):<20}  {layer.title}")
    return 0


def _show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        layer = store.get_layer(args.id)
    if layer is None:
        raise CommandError(f"no layer {args.id}")
    print_json(layer.to_descriptor())
    return 0


def _import(args: argparse.Namespace) -> int:
    """Every *.json of a directory, id = file name; the good ones are imported, each failure reported."""
    directory = Path(args.directory)
    if not directory.is_dir():
        raise CommandError(f"{directory}: not a directory")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise CommandError(f"{directory}: no layer descriptor (*.json)")
    failures: list[str] = []
    layers: dict[str, tuple[Path, Layer]] = {}
    for path in files:
        try:
            layers[path.stem] = (path, load_layer(path.stem, path))
        except LayerError as exc:
            failures.append(f"{path}: {exc.field}: {exc.message}")
    checked = run_async(_check_all(_settings(args), [layer for _, layer in layers.values()])) if args.check else {}
    imported = 0
    with _store(args) as store:
        for layer_id, (path, layer) in layers.items():
            summaries = checked.get(layer_id)
            if isinstance(summaries, LayerError):
                failures.append(f"{path}: {summaries.field}: {summaries.message}")
                continue
            try:
                store.add_layer(layer, summaries=summaries)
            except LayerExists:
                if not args.replace:
                    failures.append(f"{path}: id: layer {layer_id} already exists (--replace replaces it)")
                    continue
                store.put_layer(layer, summaries, keep_access=not _says_access(path))
            imported += 1
            print(f"{path}: layer {layer_id} imported")
    for failure in failures:
        print(f"tileserver: {failure}", file=sys.stderr)
    print(f"{imported} imported, {len(failures)} failed")
    return 1 if failures else 0


# --- keys ---------------------------------------------------------------------------------------


def _create_key(args: argparse.Namespace) -> int:
    granted = [v.strip() for v in args.layers.split(",") if v.strip()]
    with _store(args) as store:
        key_id, secret = store.create_key(args.name, granted)
    if args.json:
        print_json({"id": key_id, "key": secret, "name": args.name, "layers": grant(granted)})
    else:
        print(f"id:  {key_id}\nkey: {secret}\n(the key is shown only now: store it safely)")
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    with _store(args) as store:
        keys = store.list_keys()
    if args.json:
        print_json(keys)
        return 0
    for key in keys:
        state = f"revoked {key['revoked_at']}" if key["revoked"] else "active"
        print(f"{key['id']}  {state:<33}  {key['name']}  {','.join(key['layers'])}")
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.revoke_key(args.id)
    print(f"key {args.id} revoked")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Opening the store applies what is pending (under the advisory lock on PostgreSQL)."""
    try:
        store = PublicationStore(_settings(args).resolved_store_url)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        info = {"store": store.path, "engine": store.dialect, "schema_version": store.schema_version(),
                "revision": store.revision()}
    finally:
        store.close()
    if args.json:
        print_json(info)
    else:
        print(f"store {info['store']} ({info['engine']}): schema version {info['schema_version']}")
    return 0
