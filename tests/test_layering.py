"""Dependencies point downward (issue 12 item 14), read from the source with `ast`, lazy imports
inside functions included: formats (rok4, vector) ← storage ← reader (pyramid, catalog, the
publication store) ← render ← writer ← services / warehouse ← application (app, http, CLIs).

Under `services/`, a protocol module (WMS, WMTS, TMS, OGC API, Features, WFS, …) imports shared
modules (policy, ows, crs, grids, numbers, vectorquery, tms_common, ogcapi_common, …) and modules of
its own family (`wms_request` for `wms_getmap`), never another protocol's; shared modules import no
protocol module. An exception is an entry of ALLOWED with the reason it stays.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tileserver"

# Longest matching prefix wins; every module must match one (a new package gets a layer on purpose).
LAYERS = {
    "tileserver": 0,  # the package itself: __version__
    "tileserver.settings": 0,
    "tileserver.outbound": 0,
    "tileserver.numbers": 0,  # how floats are written: descriptors, GeoTIFF tags, documents
    "tileserver.rok4": 0,
    "tileserver.vector": 0,
    "tileserver.storage": 1,
    "tileserver.pyramid": 2,
    "tileserver.catalog": 2,
    "tileserver.runtime": 2,
    "tileserver.publication": 2,  # model, backends, store
    "tileserver.render": 3,
    "tileserver.writer": 4,
    "tileserver.services": 5,
    "tileserver.warehouse": 5,
    "tileserver.publication.admin": 5,  # the admin HTTP API, beside the services
    "tileserver.demo": 5,
    "tileserver.http": 6,
    "tileserver.observability": 6,
    "tileserver.fastpath": 6,
    "tileserver.app": 6,
    "tileserver.cli": 6,
    "tileserver.cli_pyramid": 6,
    "tileserver.server_cli": 6,
    "tileserver.publication.cli": 6,
    "tileserver.writer.cli": 6,
    "tileserver.warehouse.cli": 6,
}
LAYER_NAMES = ("formats", "storage", "reader", "render", "writer", "services", "application")

# Modules of services/ that any protocol may import: concepts, not protocols.
SHARED = {
    "policy", "ows", "routing", "crs", "grids", "numbers", "vectorquery", "stylebook", "tms_common",
    "ogcapi_common", "tiles", "relay", "vectortables",
}
FAMILY_OF = {"vectorstyles": "vectorstyles"}  # else the name up to its first "_" (wms_getmap → wms)

ALLOWED = {
    # The catalog parses a WMS-vector record's SLD when it loads: render.sld is a leaf parser
    # (it imports nothing of the project) that lives beside the renderer that draws with it.
    ("tileserver.catalog", "tileserver.render.sld"),
    # The warehouse validates a client style annex with the same check that serves it
    # (vectorstyles.style_problems); the check belongs in a shared module (a change in warehouse/).
    ("tileserver.warehouse.annexes", "tileserver.services.vectorstyles"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Project modules `path` imports, anywhere in it (`from pkg import mod` counts as `pkg.mod`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tileserver"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tileserver":
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if is_module(candidate) else source)
    found.discard(name)
    return found


def layer(name: str) -> int:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no layer: add it to LAYERS"
    return LAYERS[max(matches, key=len)]


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def service(name: str) -> str | None:
    prefix = "tileserver.services."
    return name[len(prefix):] if name.startswith(prefix) else None


def family(short: str) -> str | None:
    """A services module's protocol family, None for a shared module."""
    if short in SHARED:
        return None
    return FAMILY_OF.get(short, short.split("_")[0])


def test_the_graph_is_read() -> None:
    """The parser sees real imports (a parser that found nothing would pass everything below)."""
    assert "tileserver.services.vectorquery" in GRAPH["tileserver.services.wfs"]
    assert "tileserver.render.pipeline" in GRAPH["tileserver.services.tiles"]
    assert "tileserver.services.tms_common" in GRAPH["tileserver.services.vectorstyles"]
    assert len(GRAPH) > 100


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        layer(name)


def test_dependencies_point_downward() -> None:
    upward = [
        f"{mod} ({LAYER_NAMES[layer(mod)]}) imports {dep} ({LAYER_NAMES[layer(dep)]})"
        for mod, deps in GRAPH.items()
        for dep in sorted(deps)
        if layer(dep) > layer(mod) and (mod, dep) not in ALLOWED
    ]
    assert not upward, "\n".join(upward)


def test_services_import_neither_warehouse_nor_admin() -> None:
    """Services and the warehouse share a layer; the warehouse builds on services, not the reverse."""
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in GRAPH.items() if service(mod) is not None
        for dep in sorted(deps)
        if dep.startswith(("tileserver.warehouse", "tileserver.publication.admin", "tileserver.demo"))
    ]
    assert not wrong, "\n".join(wrong)


def test_the_warehouse_imports_only_shared_service_modules() -> None:
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in GRAPH.items() if mod.startswith("tileserver.warehouse")
        for dep in sorted(deps)
        if (short := service(dep)) is not None and family(short) is not None and (mod, dep) not in ALLOWED
    ]
    assert not wrong, "\n".join(wrong)


def test_no_protocol_module_imports_another_protocol() -> None:
    crossing = []
    for mod, deps in GRAPH.items():
        short = service(mod)
        if short is None:
            continue
        for dep in sorted(deps):
            other = service(dep)
            if other is None or family(other) is None or (mod, dep) in ALLOWED:
                continue
            if family(short) is None:
                crossing.append(f"shared {mod} imports protocol module {dep}")
            elif family(other) != family(short):
                crossing.append(f"{mod} ({family(short)}) imports {dep} ({family(other)})")
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("short", sorted(SHARED))
def test_shared_modules_exist(short: str) -> None:
    """The shared list names real modules (a stale entry would hide nothing, but misleads)."""
    assert f"tileserver.services.{short}" in GRAPH


def test_allowed_exceptions_are_still_needed() -> None:
    """An exception whose import is gone is removed, so the list stays the list of what is left."""
    stale = [pair for pair in ALLOWED if pair[1] not in GRAPH.get(pair[0], set())]
    assert not stale, stale
