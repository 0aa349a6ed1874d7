"""The direction of imports between the hub's layers (docs/architecture.md): faces over
services over the store, the connector kit, ops and settings under all of them, and the
built-in connectors on the kit alone. The contracts live in pyproject.toml's
[tool.importlinter]; `make lint` runs `lint-imports` on the checkout, and these tests prove
that the check passes today and fails on an import that runs the wrong way."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages under ``tree``, which come first on the import path."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def copy_of_the_tree(tmp_path_factory) -> Path:
    """hub/ and connectors/ with the project's contracts, in a directory of their own, so a
    test can add a wrong-way import without touching the checkout."""
    tree = tmp_path_factory.mktemp("layers")
    for package in ("hub", "connectors"):
        shutil.copytree(
            ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_checkout_keeps_every_import_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_every_package_of_the_hub_is_in_a_layer_or_under_a_rule():
    """A new folder of hub/ must be placed in the contracts, or the check would not see it."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = set()
    for contract in contracts["contracts"]:
        for entry in contract.get("layers", []):
            named.update(p.strip(" ()") for p in entry.replace(":", "|").split("|"))
        named.update(m.removeprefix("hub.") for m in contract.get("source_modules", []))
    packages = {p.name for p in (ROOT / "hub").iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "hub").glob("*.py")} - {"__init__"}
    assert packages | modules <= named, f"not placed in a contract: {(packages | modules) - named}"


WRONG_WAY = [
    # (a module of the tree, its name in the complaint, a package it must not import, a module)
    ("hub/store/models.py", "hub.store", "hub.services", "keys"),
    ("hub/services/events.py", "hub.services", "hub.web", "errors"),
    ("hub/web/system.py", "hub.web", "hub.dashboard", "views"),
    ("hub/ops/redact.py", "hub.ops", "hub.store", "db"),
    ("hub/http.py", "hub.http", "hub.services", "routes"),
    ("hub/providers.py", "hub.providers", "hub.store", "models"),
    ("connectors/text.py", "connectors", "hub.store", "models"),
]


@pytest.mark.parametrize(("module", "named", "package", "name"), WRONG_WAY)
def test_an_import_the_wrong_way_breaks_the_check(copy_of_the_tree, module, named, package, name):
    path = copy_of_the_tree / module
    original = path.read_text()
    path.write_text(original + f"\nfrom {package} import {name}  # noqa\n")
    try:
        result = lint_imports(copy_of_the_tree)
    finally:
        path.write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{named} is not allowed to import {package}" in result.stdout
