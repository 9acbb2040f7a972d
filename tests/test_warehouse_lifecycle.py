"""Issue 11, structure: every status is an enumeration (`tileserver.publication.status`) and every
status change is made by `tileserver.warehouse.lifecycle`, against one transition table.

The source scan is syntactic (`ast`), so it is exact and never flaky: it names the writes it
forbids (below, `RULES`) and is itself tested on small snippets, each of which it must flag (or
leave alone: views and reads of a status are not writes). The transitions are then exercised on
a real store, through lifecycle's own functions."""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tileserver.publication import status as statuses
from tileserver.publication.status import FINAL, JobStatus, OfferingStatus, StoredDataStatus, UploadStatus
from tileserver.publication.store import PublicationStore, StatusConflict
from tileserver.settings import Settings
from tileserver.warehouse import lifecycle
from tileserver.warehouse.accounts import Accounts
from tileserver.warehouse.entities import Entities

ROOT = Path(__file__).resolve().parent.parent / "tileserver"
LIFECYCLE = ROOT / "warehouse" / "lifecycle.py"
STORE = ROOT / "publication" / "store.py"  # defines the store's status writers (lifecycle calls them)
STATUS_MODULE = ROOT / "publication" / "status.py"
ENUMS = {name for name, value in vars(statuses).items()
         if isinstance(value, type) and issubclass(value, statuses.StrEnum) and value is not statuses.StrEnum}
VALUES = {member.value for name in ENUMS for member in getattr(statuses, name)}
STORE_WRITERS = {"put_stored_data", "put_offering"}  # the store methods that set a status column
# the packages holding records with a status: there any `x["status"] =`, `.update(status=…)` or
# `.status = <a status>` is a record's, and a status is spelled as its enumeration member; elsewhere
# (HTTP messages have a "status" too) only the store's writers, SQL and record creations are looked at
RECORDS = ("warehouse", "publication", "vector", "writer")
_SQL_WRITE = re.compile(r"(?is)\bupdate\b[^;]*\bset\b[^;]*\bstatus\s*=|json_(?:set|replace|insert)\s*\([^;]*\$\.status")

RULES = {
    "subscript": 'assigns x["status"]',
    "update": 'passes a "status" to dict.update / setdefault / __setitem__',
    "store": f"uses the store's status writers ({', '.join(sorted(STORE_WRITERS))})",
    "create": "creates a record whose body carries a status",
    "sql": "writes a status column or JSON field in SQL",
    "attribute": "assigns .status a status",
    "literal": "spells a status as a bare string instead of its enumeration member",
}


def _has_status_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "status" for k in node.keys)


def _named(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == name) or (isinstance(node, ast.Name) and node.id == name)


def _mentions_status(node: ast.AST) -> bool:
    """Whether an expression names a status: a member of one of the enumerations, or its value."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in ENUMS:
            return True
        if isinstance(sub, ast.Constant) and sub.value in VALUES:
            return True
    return False


def _targets(node: ast.AST) -> Iterator[ast.AST]:
    if isinstance(node, ast.Tuple | ast.List):
        for element in node.elts:
            yield from _targets(element)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)
    else:
        yield node


def _status_bodies(scope: ast.AST) -> set[str]:
    """Names bound, in this scope, to a dict literal carrying a "status" key."""
    names = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None and _has_status_key(node.value):
            for target in _targets(node.targets[0] if isinstance(node, ast.Assign) else node.target):
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return names


def scan(source: str, module: str = "snippet.py", store: bool = False, records: bool = True,
         enum_only: bool = True) -> list[tuple[int, str]]:
    """(line, rule) of every status write in `source`. `store`: the module defining the store's
    writers (their SQL and names are its own); `records`: a module of `RECORDS`; `enum_only`: bare
    status strings are refused."""
    tree = ast.parse(source, module)
    found: list[tuple[int, str]] = []
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    bodies = {id(scope): _status_bodies(scope) for scope in scopes}
    module_bodies = _status_bodies(tree)
    docstrings = {id(n.body[0].value) for n in [tree, *ast.walk(tree)]
                  if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}

    def scope_of(node: ast.AST) -> set[str]:
        names = set(module_bodies)
        for scope in scopes:
            if scope.lineno <= node.lineno <= (scope.end_lineno or scope.lineno):  # type: ignore[attr-defined]
                names |= bodies[id(scope)]
        return names

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign) and records:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in (t for top in targets for t in _targets(top)):
                if (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
                        and target.slice.value == "status"):
                    found.append((node.lineno, "subscript"))
                elif (isinstance(target, ast.Attribute) and target.attr == "status" and node.value is not None
                      and _mentions_status(node.value)):
                    found.append((node.lineno, "attribute"))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if records and name in ("update", "setdefault", "__setitem__") and (
                    any(k.arg == "status" for k in node.keywords)
                    or (node.args and (_has_status_key(node.args[0]) or (
                        isinstance(node.args[0], ast.Constant) and node.args[0].value == "status")))):
                found.append((node.lineno, "update"))
            if name == "create" or any(_named(a, "create") for a in node.args):  # also to_thread(x.create, …)
                held = scope_of(node)
                arguments = [*node.args, *(k.value for k in node.keywords)]
                if any(_has_status_key(a) or (isinstance(a, ast.Name) and a.id in held) for a in arguments):
                    found.append((node.lineno, "create"))
        elif isinstance(node, ast.Attribute) and node.attr in STORE_WRITERS and not store:
            found.append((node.lineno, "store"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if not store and _SQL_WRITE.search(node.value):
                found.append((node.lineno, "sql"))
            elif enum_only and node.value in VALUES:
                found.append((node.lineno, "literal"))
    return sorted(set(found))


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p != LIFECYCLE)


def test_only_lifecycle_changes_a_status() -> None:
    offences = []
    for path in _modules():
        rel = path.relative_to(ROOT)
        records = rel.parts[0] in RECORDS
        for line, rule in scan(path.read_text(), str(path), store=path == STORE, records=records,
                               enum_only=records and path != STATUS_MODULE):
            offences.append(f"tileserver/{rel}:{line}: {RULES[rule]}")
    assert offences == [], "status changes belong to tileserver/warehouse/lifecycle.py:\n" + "\n".join(offences)


def test_lifecycle_itself_is_seen_writing() -> None:
    """The scan does see writes where they are allowed (else an empty result would prove nothing)."""
    rules = {rule for _, rule in scan(LIFECYCLE.read_text(), str(LIFECYCLE), enum_only=False)}
    assert {"subscript", "store"} <= rules, rules


@pytest.mark.parametrize(("snippet", "rule"), [
    ('def f(body):\n    body["status"] = "OPEN"', "subscript"),
    ('def f(body, new):\n    body["status"] = new', "subscript"),
    ('def f(a, b):\n    a["x"], b["status"] = 1, 2', "subscript"),
    ('def f(body):\n    body.update(status=JobStatus.WAITING, job={})', "update"),
    ('def f(body):\n    body.update({"status": x})', "update"),
    ('def f(body):\n    body.setdefault("status", x)', "update"),
    ("def f(store):\n    store.put_stored_data(url, {}, 'n', StoredDataStatus.GENERATED)", "store"),
    ("async def f(ctx):\n    await asyncio.to_thread(ctx.wh.store.put_offering, lid, ep, True, s)", "store"),
    ('def f(entities):\n    entities.create("upload", ds, {"name": "n", "status": UploadStatus.OPEN})', "create"),
    ('def f(entities):\n    body = {"name": "n", "status": s}\n    entities.create("upload", ds, body)', "create"),
    ("async def f(ctx):\n    body = {'status': s}\n    await asyncio.to_thread(ctx.wh.entities.create, 'upload', ds, body)",
     "create"),
    ('def f(db):\n    db.execute("UPDATE stored_data SET status = ? WHERE id = ?", (s, i))', "sql"),
    ("def f(db):\n    db.execute(\"UPDATE wh_entities SET body = json_set(body, '$.status', ?)\")", "sql"),
    ("def f(record):\n    record.status = OfferingStatus.PUBLISHED", "attribute"),
    ('def f(stored):\n    return stored.status == "GENERATED"', "literal"),
])
def test_the_scan_flags_each_kind_of_write(snippet: str, rule: str) -> None:
    assert rule in {r for _, r in scan(textwrap.dedent(snippet))}


@pytest.mark.parametrize("snippet", [
    'def view(entity):\n    return {"_id": entity.id, "status": entity.body["status"]}',  # a view reads
    "def view(stored):\n    return {\"status\": stored.status if stored else StoredDataStatus.DELETED}",
    'def f(stored):\n    return stored.status != StoredDataStatus.GENERATED',
    "class E(Exception):\n    def __init__(self, status):\n        self.status = status",  # an HTTP status
    'def f(entities):\n    entities.create("upload", ds, {"name": "n"})',
    "def f(db):\n    db.execute(\"SELECT json_extract(body, '$.status') FROM wh_entities WHERE kind = 'x'\")",
    'def f():\n    """Goes OPEN, then CHECKING."""',
])
def test_the_scan_leaves_reads_and_views_alone(snippet: str) -> None:
    assert scan(textwrap.dedent(snippet)) == []


def test_the_publication_store_sits_below_the_warehouse() -> None:
    """The store reads and writes statuses from `publication.status`, never from the warehouse (which
    imports the store): no module of tileserver/publication imports tileserver.warehouse."""
    upward = []
    for path in sorted((ROOT / "publication").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            upward += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("tileserver.warehouse")]
    assert upward == []


# --- the transition table ---------------------------------------------------------------------------

KIND_ENUMS = {lifecycle.EXECUTION: JobStatus, lifecycle.CHECK: JobStatus, lifecycle.SHARD: JobStatus,
              lifecycle.UPLOAD: UploadStatus, lifecycle.STORED_DATA: StoredDataStatus,
              lifecycle.OFFERING: OfferingStatus}


def test_every_kind_with_a_status_has_a_table_of_its_own_enumeration() -> None:
    assert set(lifecycle.TRANSITIONS) == set(KIND_ENUMS)
    for kind, table in lifecycle.TRANSITIONS.items():
        named = {s for s in table if s is not None} | {s for moves in table.values() for s in moves}
        assert all(isinstance(s, KIND_ENUMS[kind]) for s in named), kind
        assert len(table[None]) >= 1, f"{kind} has no first status"


def test_final_job_statuses_are_final() -> None:
    for kind in (lifecycle.EXECUTION, lifecycle.CHECK):
        for status in FINAL:
            assert not any(lifecycle.allowed(kind, status, new) for new in JobStatus), (kind, status)
    # a shard that failed runs again with its execution's next run; a success is never redone
    assert lifecycle.allowed(lifecycle.SHARD, "FAILURE", JobStatus.WAITING)
    assert not any(lifecycle.allowed(lifecycle.SHARD, JobStatus.SUCCESS, new) for new in JobStatus)


@pytest.mark.parametrize(("kind", "current", "new", "ok"), [
    (lifecycle.EXECUTION, None, "CREATED", True),
    (lifecycle.EXECUTION, None, "WAITING", False),  # launched only through `launch` (quota reserved)
    (lifecycle.EXECUTION, "CREATED", "PROGRESS", False),
    (lifecycle.EXECUTION, "PROGRESS", "WAITING", True),  # requeued after its process died
    (lifecycle.CHECK, "WAITING", "ABORTED", False),  # checks are never aborted
    (lifecycle.UPLOAD, "OPEN", "CLOSED", False),  # only its checks close it
    (lifecycle.UPLOAD, "CHECKING", "OPEN", False),
    (lifecycle.UPLOAD, "UNSTABLE", "OPEN", True),
    (lifecycle.STORED_DATA, "GENERATING", "GENERATED", True),
    (lifecycle.STORED_DATA, "CREATED", "GENERATED", False),  # never without being written
    (lifecycle.STORED_DATA, "GENERATING", "CREATED", False),
    (lifecycle.OFFERING, "PUBLISHED", "PUBLISHING", False),
])
def test_allowed_reads_plain_strings_as_stored(kind: str, current: str | None, new: str, ok: bool) -> None:
    """Bodies come back from JSON as plain strings: the table answers them as their members."""
    assert lifecycle.allowed(kind, current, new) is ok


# --- transitions on a real store ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PublicationStore]:
    opened = PublicationStore(str(tmp_path / "store.db"))
    yield opened
    opened.close()


def test_an_upload_goes_open_checking_closed_and_back_open(store: PublicationStore) -> None:
    entities = Entities(store)
    upload = lifecycle.create(entities, lifecycle.UPLOAD, "ds", {"name": "u", "status": "CLOSED"})
    assert upload.body["status"] == UploadStatus.OPEN  # the first status is lifecycle's, whatever was given
    events: list[str] = []
    closed, done = lifecycle.close_upload(entities, upload.id, [("c1", "one"), ("c2", "two")],
                                         lambda body: events.append(body["status"]), lambda db: None)
    assert done and closed.body["status"] == UploadStatus.CHECKING and events == ["CHECKING"]
    checks = entities.find(lifecycle.CHECK, "json_extract(body, '$.upload._id') = ?", (upload.id,))
    assert sorted(c.body["status"] for c in checks) == ["WAITING", "WAITING"]
    assert all(c.body["job"] == {"claim": None} and c.body["round"] == 1 for c in checks)
    again, done = lifecycle.close_upload(entities, upload.id, [], lambda body: None, lambda db: None)
    assert not done and again.body["status"] == UploadStatus.CHECKING
    refused, opened = lifecycle.reopen_upload(entities, upload.id, lambda body: None)
    assert not opened and refused.body["status"] == UploadStatus.CHECKING  # a checked upload stays checked
    settings = Settings()
    for check in checks:
        assert lifecycle.begin(entities, lifecycle.CHECK, check.id, 1) is not None
        assert lifecycle.finish(store, entities, lifecycle.CHECK, check.id, JobStatus.SUCCESS, settings, pid=1)
    upload_now = entities.get(lifecycle.UPLOAD, upload.id)
    assert upload_now is not None and upload_now.body["status"] == UploadStatus.CLOSED
    reopened, opened = lifecycle.reopen_upload(entities, upload.id, lambda body: None)
    assert opened and reopened.body["status"] == UploadStatus.OPEN


def test_an_execution_is_launched_and_aborted_only_from_where_the_table_allows(store: PublicationStore) -> None:
    entities, settings = Entities(store), Settings()
    datastore = Accounts(store).default_datastore()
    output = lifecycle.new_output(store, "/tmp/never/out.json", "out", "ROK4-PYRAMID-RASTER")
    assert output.status == StoredDataStatus.CREATED
    execution = lifecycle.create(entities, lifecycle.EXECUTION, datastore.id, {
        "output": {"stored_data": {"_id": output.id}}, "estimate": 0})
    assert execution.body["status"] == JobStatus.CREATED and execution.body["job"] == {"claim": None}
    assert not lifecycle.finish(store, entities, lifecycle.EXECUTION, execution.id, JobStatus.SUCCESS, settings)
    launched, ok = lifecycle.launch(store, entities, execution, datastore)
    assert ok and launched.body["status"] == JobStatus.WAITING
    assert not lifecycle.launch(store, entities, launched, datastore)[1]
    aborted, previous = lifecycle.abort(store, entities, launched, "me", settings)
    assert previous == JobStatus.WAITING and aborted.body["status"] == JobStatus.ABORTED
    stored = store.get_stored_data(output.id)
    assert stored is not None and stored.status == StoredDataStatus.UNSTABLE  # its output ended with it
    again, previous = lifecycle.abort(store, entities, aborted, "me", settings)
    assert previous == JobStatus.ABORTED and again.body["status"] == JobStatus.ABORTED
    assert lifecycle.begin(entities, lifecycle.EXECUTION, execution.id, 1) is None


def test_stored_data_moves_only_as_the_table_says(store: PublicationStore) -> None:
    url = "/tmp/never/pyramid.json"
    created = lifecycle.new_output(store, url, "p", "ROK4-PYRAMID-RASTER")
    with pytest.raises(StatusConflict):  # a second execution cannot take the same output
        lifecycle.new_output(store, url, "p", "ROK4-PYRAMID-RASTER")
    writing = lifecycle.generating(store, created, keep_summary=False)
    assert writing.status == StoredDataStatus.GENERATING
    with pytest.raises(StatusConflict):  # the operator cannot register a pyramid an execution is writing
        lifecycle.register(store, url, {"size": 1}, "p", "ROK4-PYRAMID-RASTER")
    assert store.get_stored_data(created.id).status == StoredDataStatus.GENERATING  # type: ignore[union-attr]
    other = lifecycle.register(store, "/tmp/never/other.json", {}, "o", "ROK4-PYRAMID-RASTER")
    assert other.status == StoredDataStatus.GENERATED
    assert lifecycle.register(store, "/tmp/never/other.json", {"size": 2}, "o", "ROK4-PYRAMID-RASTER").summary == \
        {"size": 2}  # registered again: still GENERATED, summary updated


def test_an_offering_is_published_only_after_publishing(store: PublicationStore) -> None:
    from apputil import layer_descriptor

    from tileserver.publication.model import parse_layer

    store.add_layer(parse_layer("scan", layer_descriptor("SCAN1000")))
    with pytest.raises(StatusConflict):
        lifecycle.offered(store, "scan", "gpf-rok4-server-wmts-tms", True, served=True)
    assert lifecycle.offer(store, "scan", "gpf-rok4-server-wmts-tms", True).status == OfferingStatus.PUBLISHING
    with pytest.raises(StatusConflict):  # offered twice
        lifecycle.offer(store, "scan", "gpf-rok4-server-wmts-tms", True)
    assert lifecycle.offered(store, "scan", "gpf-rok4-server-wmts-tms", True, served=False).status == \
        OfferingStatus.UNSTABLE


def test_a_forbidden_move_of_a_record_body_raises(store: PublicationStore) -> None:
    entities = Entities(store)
    shard = lifecycle.create(entities, lifecycle.SHARD, "ds", {"execution": {"_id": "e"}, "shard": [1, 2]})
    assert lifecycle.begin(entities, lifecycle.SHARD, shard.id, 1) is not None
    assert lifecycle.finish(store, entities, lifecycle.SHARD, shard.id, JobStatus.SUCCESS, Settings(), pid=1)
    with pytest.raises(lifecycle.ForbiddenTransition):  # a shard's success is never run again
        lifecycle.requeue_shard(entities, shard.id)
    current = entities.get(lifecycle.SHARD, shard.id)
    assert current is not None and current.body["status"] == JobStatus.SUCCESS  # nothing written
