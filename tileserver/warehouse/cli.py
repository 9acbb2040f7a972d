"""`tileserver users add|list|remove|join|leave` and `tileserver datastores list|add`: accounts of the
warehouse API, written straight into the publication store (no server needed); `tileserver worker`:
a node running the warehouse's checks and executions from the shared store."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from tileserver.cli import CommandError, print_json
from tileserver.publication.store import PublicationStore, StoreError, pyramid_type
from tileserver.settings import load_settings

from .accounts import DEFAULT_DATASTORE, DEFAULT_QUOTA, Accounts


def _accounts(args: argparse.Namespace) -> Accounts:
    settings = load_settings(getattr(args, "config", None))
    return Accounts(PublicationStore(settings.resolved_store_url))


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .jobs import run_worker

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings(getattr(args, "config", None), worker_node=args.node)
    if args.jobs is not None and args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    asyncio.run(run_worker(settings, args.jobs))
    return 0


def register(subparsers: Any) -> None:
    users = subparsers.add_parser("users", help="warehouse API users").add_subparsers(dest="users_command",
                                                                                      required=True)
    add = users.add_parser("add", help="create a user, member of a datastore's community")
    add.add_argument("login")
    add.add_argument("--password", help="asked on the terminal when absent")
    add.add_argument("--first-name", default="")
    add.add_argument("--last-name", default="", help="default: the login (the SDK names entities after it)")
    add.add_argument("--email", default="")
    add.add_argument("--datastore", action="append", help=f"datastore name or id (repeatable; default {DEFAULT_DATASTORE})")
    add.add_argument("--json", action="store_true")
    add.set_defaults(handler=_users_add)
    listing = users.add_parser("list", help="list users")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_users_list)
    remove = users.add_parser("remove", help="delete a user and their tokens")
    remove.add_argument("login")
    remove.set_defaults(handler=_users_remove)
    join = users.add_parser("join", help="make a user a member of a datastore's community")
    join.add_argument("login")
    join.add_argument("datastore", help="datastore name or id")
    join.set_defaults(handler=_users_join)
    leave = users.add_parser("leave", help="take a user out of a datastore's community (their keys' grants on"
                                           " its offerings go too)")
    leave.add_argument("login")
    leave.add_argument("datastore", help="datastore name or id")
    leave.set_defaults(handler=_users_leave)

    datastores = subparsers.add_parser("datastores", help="warehouse API datastores").add_subparsers(
        dest="datastores_command", required=True)
    ds_list = datastores.add_parser("list", help="list datastores")
    ds_list.add_argument("--json", action="store_true", help='an array of {"_id", "name", "technical_name"}')
    ds_list.set_defaults(handler=_datastores_list)
    ds_add = datastores.add_parser("add", help="create a datastore (and its community)")
    ds_add.add_argument("name")
    ds_add.add_argument("--technical-name")
    ds_add.add_argument("--quota", type=int, default=DEFAULT_QUOTA, help="bytes of uploads allowed")
    ds_add.add_argument("--json", action="store_true")
    ds_add.set_defaults(handler=_datastores_add)

    worker = subparsers.add_parser("worker", help="run checks and processing executions from the shared store")
    worker.add_argument("--jobs", type=int, help="job processes at once (default: warehouse_workers, at least 1)")
    worker.add_argument("--node", help="this node's name in job claims (default: worker_node, else the host name)")
    worker.add_argument("--log-level", default="warning")
    worker.set_defaults(handler=_worker)

    stored = subparsers.add_parser("stored-data", help="warehouse API stored data").add_subparsers(
        dest="stored_data_command", required=True)
    register_pyramid = stored.add_parser("add", help="register an existing ROK4 pyramid as a stored data")
    register_pyramid.add_argument("descriptor", help="pyramid descriptor: /path/NAME.json, file://… or s3://…")
    register_pyramid.add_argument("--name", help="stored data name (default: the pyramid's)")
    register_pyramid.add_argument("--datastore", default=DEFAULT_DATASTORE, help="datastore name or id")
    register_pyramid.add_argument("--json", action="store_true")
    register_pyramid.set_defaults(handler=_stored_data_add)


def _users_add(args: argparse.Namespace) -> int:
    password = args.password if args.password is not None else getpass.getpass(f"password for {args.login}: ")
    try:
        user = _accounts(args).add_user(args.login, password, args.first_name, args.last_name, args.email,
                                        tuple(args.datastore or [DEFAULT_DATASTORE]))
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json({"_id": user.id, "login": user.login, "datastores": list(user.datastores)})
    else:
        print(f"user {user.login} created ({user.id})")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    names = {d.id: d.name for d in accounts.list_datastores()}
    users = accounts.list_users()
    if args.json:
        print_json([{"_id": u.id, "login": u.login, "first_name": u.first_name, "last_name": u.last_name,
                     "email": u.email, "datastores": [names.get(d, d) for d in u.datastores]} for u in users])
    else:
        for u in users:
            print(f"{u.login}\t{u.id}\t{', '.join(names.get(d, d) for d in u.datastores)}")
    return 0


def _account_change(change: Any, done: str) -> int:
    """Run one accounts change; a store refusal is the command's error, success one printed line."""
    try:
        change()
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    print(done)
    return 0


def _users_remove(args: argparse.Namespace) -> int:
    return _account_change(lambda: _accounts(args).remove_user(args.login), f"user {args.login} removed")


def _users_join(args: argparse.Namespace) -> int:
    return _account_change(lambda: _accounts(args).join(args.login, args.datastore),
                           f"user {args.login} joined datastore {args.datastore}")


def _users_leave(args: argparse.Namespace) -> int:
    return _account_change(lambda: _accounts(args).leave(args.login, args.datastore),
                           f"user {args.login} left datastore {args.datastore}")


def _datastore_view(d: Any) -> dict[str, str]:
    return {"_id": d.id, "name": d.name, "technical_name": d.technical_name}


def _datastores_list(args: argparse.Namespace) -> int:
    datastores = _accounts(args).list_datastores()
    if args.json:
        print_json([_datastore_view(d) for d in datastores])
    else:
        for d in datastores:
            print(f"{d.name}\t{d.id}\t{d.technical_name}\tquota {d.quota}")
    return 0


def _datastores_add(args: argparse.Namespace) -> int:
    try:
        datastore = _accounts(args).add_datastore(args.name, args.technical_name, args.quota)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json(_datastore_view(datastore))
    else:
        print(f"datastore {datastore.name} created ({datastore.id})")
    return 0


def _stored_data_add(args: argparse.Namespace) -> int:
    """Open the pyramid (it must be readable as the server will read it), then record it."""
    from tileserver.cli import run_async
    from tileserver.publication.store import StatusConflict
    from tileserver.pyramid import Pyramid, SlabIndexCache, normalise_url
    from tileserver.storage import Storage

    from .entities import Entities
    from .lifecycle import register

    settings = load_settings(getattr(args, "config", None))
    url = normalise_url(args.descriptor)

    async def summary() -> dict[str, Any]:
        async with Storage(settings) as storage:
            return (await Pyramid.open(url, storage, SlabIndexCache(), settings.tms_directory)).summary()

    found = run_async(summary())
    store = PublicationStore(settings.resolved_store_url)
    accounts = Accounts(store)
    datastore = accounts.get_datastore(args.datastore)
    if datastore is None:
        raise CommandError(f"no datastore {args.datastore}")
    try:
        stored = register(store, url, found, args.name or found["name"], pyramid_type(found))
    except StatusConflict as exc:
        raise CommandError(str(exc)) from None
    if datastore.id != accounts.default_datastore().id and Entities(store).get("stored_data", stored.id) is None:
        Entities(store).create("stored_data", datastore.id, {"tags": {}}, stored.id)
    if args.json:
        print_json({"_id": stored.id, "name": stored.name, "descriptor": url, "datastore": datastore.name})
    else:
        print(f"stored data {stored.name} registered ({stored.id}) in datastore {datastore.name}")
    return 0
