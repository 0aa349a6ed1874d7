"""``flask --app hub connectors new NAME``: a starter connector and its passing test.

Two layouts:

- in the hub's checkout (no ``--dir``): ``NAME.py`` in the folder of the built-ins
  (``connectors/``, which pyproject.toml's ``package-dir`` installs as ``hub.builtin``, the
  package ``BUILTIN_CONNECTORS`` names) and ``tests/test_NAME.py``, registered by adding one
  line to ``BUILTIN_CONNECTORS``;
- a package of its own (``--dir PATH``): ``PATH/NAME.py``, ``PATH/tests/test_NAME.py`` and a
  ``PATH/pyproject.toml`` declaring the ``hub.connectors`` entry point, so that
  ``pip install -e PATH`` is all the hub needs to load it. Its test passes as written, with
  the hub installed and nothing else (the hub's pytest plugin gives the fixtures).
"""

from __future__ import annotations

import keyword
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hub.connectors import BUILTIN_CONNECTORS

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
TAKEN = {"hub", "connectors", "tests", "test"}

CONNECTOR_TEMPLATE = '''"""{name}: a starter connector. Say in one line what it does and why."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hub.connectors import Connector, InputError, Secret, StepContext


class {cls}Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field("text", description="Payload field to read.")
    prefix: str = Field("", description="Put before the value; may be a template.")
    # A credential: declared Secret, the hub keeps it encrypted, shows it masked and cuts it
    # from attempt copies; run() gets the real value. (Headers for a call: CredentialHeaders.)
    token: Secret | None = Field(None, description="A credential for the service, if any.")


class {cls}Connector(Connector):
    name = "{name}"
    description = "Returns one payload field with a prefix."
    Config = {cls}Config

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        cfg: {cls}Config = self.config
        if not isinstance(payload, dict) or cfg.field not in payload:
            # InputError: the sender's mistake (a sync route answers 422); retrying will not
            # add the field. For a timeout or a 5xx from a service, raise RetryableError
            # (hub.http.request does that for you).
            raise InputError(f"payload has no field {{cfg.field!r}}")
        return {{"result": f"{{cfg.prefix}}{{payload[cfg.field]}}"}}
'''

TEST_TEMPLATE = '''"""Contract and behaviour of the {name} connector."""

import pytest

from hub.connectors import InputError
from hub.testing import check_connector
from {module} import {cls}Connector


def test_contract_and_output():
    output = check_connector({cls}Connector, {{"text": "hello"}}, config={{"prefix": "> "}})
    assert output == {{"result": "> hello"}}


def test_config_templates_render_against_the_payload():
    config = {{"prefix": "{{{{ payload.user }}}}: "}}
    output = check_connector({cls}Connector, {{"text": "hi", "user": "ana"}}, config=config)
    assert output == {{"result": "ana: hi"}}


def test_missing_field_is_an_input_error():
    with pytest.raises(InputError, match="no field 'text'"):
        check_connector({cls}Connector, {{"other": 1}})
'''

PYPROJECT_TEMPLATE = """[project]
name = "hub-connector-{dist}"
version = "0.1.0"
description = "The {name} connector for the webhook hub."
requires-python = ">=3.11"
dependencies = []

[project.entry-points."hub.connectors"]
{name} = "{name}:{cls}Connector"

[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[tool.setuptools]
py-modules = ["{name}"]

[tool.pytest.ini_options]
pythonpath = ["."]
"""


@dataclass
class Scaffold:
    written: list[Path]
    next_steps: list[str]


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part)


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(
            f"{name!r} is not a usable name: lower-case letters, digits and _, "
            "starting with a letter (it becomes a module name)"
        )
    if keyword.iskeyword(name) or name in sys.stdlib_module_names or name in TAKEN:
        raise ValueError(f"{name!r} is taken by Python or the hub; choose another name")


def builtin_package() -> str:
    """The dotted package the built-in connectors live in, as BUILTIN_CONNECTORS names them."""
    packages = {spec.partition(":")[0].rpartition(".")[0] for spec in BUILTIN_CONNECTORS.values()}
    if len(packages) != 1 or not all(packages):
        raise ValueError(f"built-in connectors are not in one package: {sorted(packages)}")
    return packages.pop()


def package_folder(root: Path, package: str) -> Path:
    """Where the checkout at ``root`` keeps a dotted package: its pyproject.toml's
    ``[tool.setuptools.package-dir]`` mapping (hub.builtin is connectors/), else the dotted
    path itself."""
    try:
        config = tomllib.loads((root / "pyproject.toml").read_text())
        mapping = config["tool"]["setuptools"]["package-dir"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        mapping = {}
    folder = mapping.get(package) if isinstance(mapping, dict) else None
    return root / (folder if isinstance(folder, str) else package.replace(".", "/"))


def write_connector(name: str, directory: Path | None, builtin_root: Path) -> Scaffold:
    """Write the starter files; never overwrite an existing file."""
    check_name(name)
    cls = class_name(name)
    if directory is None:
        package = builtin_package()
        builtins = package_folder(builtin_root, package)
        if not builtins.is_dir():
            where = builtins.relative_to(builtin_root).as_posix()
            raise ValueError(
                f"{builtin_root} is not the hub's checkout (no {where}/ here): run this "
                "in the checkout, or give --dir for a connector package of its own"
            )
        module_path = builtins / f"{name}.py"
        test_path = builtin_root / "tests" / f"test_{name}.py"
        module = f"{package}.{name}"
        steps = [
            f'register it: add "{name}": "{module}:{cls}Connector" to '
            "BUILTIN_CONNECTORS in hub/connectors.py",
            f"test it: python -m pytest {test_path.relative_to(builtin_root)}",
        ]
    else:
        module_path = directory / f"{name}.py"
        test_path = directory / "tests" / f"test_{name}.py"
        module = name
        steps = [
            f"test it: cd {directory} && python -m pytest",
            f"install it beside the hub: pip install -e {directory}",
            f"the hub loads it at start-up (HUB_CONNECTORS, if set, must include {name})",
        ]
    contents = {
        module_path: CONNECTOR_TEMPLATE.format(name=name, cls=cls),
        test_path: TEST_TEMPLATE.format(name=name, cls=cls, module=module),
    }
    if directory is not None:
        pyproject = directory / "pyproject.toml"
        if pyproject.exists():
            steps.insert(
                0,
                "add to your pyproject.toml:\n"
                f'      [project.entry-points."hub.connectors"]\n'
                f'      {name} = "{name}:{cls}Connector"',
            )
        else:
            contents[pyproject] = PYPROJECT_TEMPLATE.format(
                name=name, cls=cls, dist=name.replace("_", "-")
            )
    existing = [str(p) for p in contents if p.exists()]
    if existing:
        raise FileExistsError(f"will not overwrite {', '.join(existing)}")
    for path, text in contents.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Scaffold(written=list(contents), next_steps=steps)
