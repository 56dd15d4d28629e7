"""The package's layering: a module imports only from its own layer or lower ones.

    basics (errors, config, files, device, _version, cluster, scoring, logs) < model, data < evaluate < infer
    < train < detector < cli

``model`` and ``data`` share a rank and do not import each other, so the graph between sub-packages
is a tree. Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import msflow

PACKAGE = Path(msflow.__file__).resolve().parent
RANK = {
    "basics": 0,
    "model": 1,
    "data": 1,
    "evaluate": 2,
    "infer": 3,
    "train": 4,
    "detector": 5,
    "cli": 6,
}
BASICS = {"errors", "config", "files", "device", "_version", "cluster", "scoring", "logs"}
# Known violations, each to be removed by the change that fixes it (an entry that no longer occurs
# fails the test, so the list cannot go stale). None left: the service and batch prediction run the
# infer layer's Predictor.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def layer_of(module: str) -> str | None:
    """The layer of a dotted ``msflow...`` module name (None for the package facade ``msflow``)."""
    parts = module.split(".")
    if parts[0] != "msflow" or len(parts) == 1:
        return None
    head = parts[1]
    if head in BASICS:
        return "basics"
    if head == "__main__":
        return "cli"
    return head if head in RANK else f"unknown:{head}"


def imports() -> dict[str, set[str]]:
    """Module name -> the msflow modules it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "msflow"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] == "msflow":
                    found.add(node.module)
        out[name] = found
    return out


def test_every_module_has_a_known_layer() -> None:
    unknown = {m for m in imports() if m != "msflow" and layer_of(m) not in RANK}
    assert not unknown, f"modules outside the layers: {sorted(unknown)}"


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(module, imported module) pairs that go up the layers, or across model <-> data."""
    wrong = set()
    for module, targets in graph.items():
        if module == "msflow":  # the facade re-exports the public API
            continue
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if theirs is None or RANK[theirs] > RANK[mine] or (theirs != mine and RANK[theirs] == RANK[mine]):
                wrong.add((module, target))
    return wrong


def test_lower_layers_never_import_higher_ones() -> None:
    found = violations(imports())
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "\n".join(f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m, t in new)
    fixed = sorted(KNOWN_VIOLATIONS - found)
    assert not fixed, f"fixed, so remove from KNOWN_VIOLATIONS: {fixed}"


def test_the_check_can_fail(tmp_path: Path, monkeypatch) -> None:
    # Guards the test above: a model module importing the training layer is reported.
    fake = tmp_path / "msflow"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("from msflow.train.loop import train_flows\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = imports()
    assert found == {"msflow.model.bad": {"msflow.train.loop"}}
    assert violations(found) == {("msflow.model.bad", "msflow.train.loop")}
    assert violations({"msflow.data.x": {"msflow.model.y"}, "msflow.train.z": {"msflow"}}) == {
        ("msflow.data.x", "msflow.model.y"),
        ("msflow.train.z", "msflow"),
    }
    assert violations({"msflow.cli": {"msflow.model.msflow", "msflow.errors"}}) == set()


def sub_package_graph() -> dict[str, set[str]]:
    """Layer -> the lower layers it imports (for the layout notes)."""
    graph: dict[str, set[str]] = {}
    for module, targets in imports().items():
        if module != "msflow":
            graph.setdefault(layer_of(module), set()).update(
                layer_of(t) for t in targets if layer_of(t) not in (None, layer_of(module))
            )
    return graph


if __name__ == "__main__":  # print the graph: python tests/test_layers.py
    for layer, targets in sorted(sub_package_graph().items(), key=lambda kv: RANK[kv[0]]):
        print(f"{layer:>9} -> {', '.join(sorted(targets, key=RANK.get)) or '-'}")
