"""The wheel carries every subpackage and the data folders an installed server reads."""

from __future__ import annotations

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


def test_declared_dependencies_cover_third_party_imports() -> None:
    """Every top-level import of the package is the standard library, tileserver, or declared."""
    import ast
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("-", "_")
                for d in project["dependencies"]}
    # import name -> distribution name where they differ
    aliases = {"PIL": "pillow", "yaml": "pyyaml", "botocore": "aiobotocore", "yarl": "aiohttp", "pygml": "pygeofilter",
               "google": "protobuf"}  # pinned by those (pygml: its [fes] extra); google.protobuf is protobuf
    optional = {"uvloop", "httptools"}  # pulled by uvicorn[standard], imported only if present
    missing = set()
    for path in (ROOT / "tileserver").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "tileserver" or top in optional:
                    continue
                dist = aliases.get(top, top).lower()
                if dist not in declared:
                    missing.add(f"{path.relative_to(ROOT)}: {top}")
    assert not missing, sorted(missing)
