"""The package's shape: one folder per concept, stacked in wings that import downwards only; no import cycles
between modules; function-local imports only for heavy optional dependencies; modules short enough to read in one
sitting (docs/DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "rrepa"

# Imported inside functions on purpose: heavy (seconds to import, or large optional stacks) and needed by few
# code paths. Everything else is imported at the top of its module.
HEAVY = {"matplotlib", "torch_fidelity", "timm", "scipy", "diffusers", "torch.utils.tensorboard"}
# Longer than LIMIT lines, with the reason.
LIMIT = 500
LONG: dict[str, str] = {}
# The wings, bottom to top: a module may import its own wing and those below it, never one above. The base
# modules are shared helpers. rrepa.fmnist holds a network for each of three wings, so its modules are placed
# one by one where their users are: the IDX reader and the autoencoder with the data, the evaluator CNN with
# evaluation, the SSL encoder with the alignment targets.
WINGS = ("base", "flow", "data", "eval", "align", "training", "experiments", "rehearsal", "cli")
BASE = {"rrepa", "rrepa.utils", "rrepa.precision", "rrepa.distributed", "rrepa.fmnist.shipped", "rrepa.fmnist"}
FMNIST = {"rrepa.fmnist.dataset": "data", "rrepa.fmnist.vae": "data", "rrepa.fmnist.evaluator": "eval",
          "rrepa.fmnist.encoder": "align"}
TOP_LEVEL_LIMIT = 12  # entries of src/rrepa besides __init__.py (and caches)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) of every import statement of a file. `from a import b`
    names the submodule a.b when it is one."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, inside, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    out.append((sub if sub in MODULES else child.module, inside, child.lineno))
            visit(child, inside)

    visit(tree, False)
    return out


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def wing(module: str) -> str:
    if module in BASE:
        return "base"
    if module in FMNIST:
        return FMNIST[module]
    return module.split(".")[1]


def test_the_package_is_found():
    assert {"rrepa.flow.tarflow", "rrepa.training.loop", "rrepa.eval.fid", "rrepa.fmnist.evaluator",
            "rrepa.cli"} <= set(MODULES)


def test_every_module_has_a_wing():
    assert {wing(m) for m in MODULES} <= set(WINGS), sorted({wing(m) for m in MODULES} - set(WINGS))


def test_the_top_level_is_short():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name not in ("__init__.py", "__pycache__"))
    assert len(entries) <= TOP_LEVEL_LIMIT, f"src/rrepa has {len(entries)} entries: {entries}"


def test_wings_import_downwards():
    g = graph()
    up = [f"{m} ({wing(m)}) imports {n} ({wing(n)})" for m in sorted(g) for n in sorted(g[m])
          if WINGS.index(wing(n)) > WINGS.index(wing(m))]
    assert not up, "imports from a higher wing:\n" + "\n".join(up)


def test_the_wing_check_finds_an_upward_import(monkeypatch):
    monkeypatch.setitem(globals(), "graph", lambda: {"rrepa.flow.tarflow": {"rrepa.training.loop"},
                                                      "rrepa.training.loop": set()})
    with pytest.raises(AssertionError, match=r"rrepa.flow.tarflow \(flow\) imports rrepa.training.loop \(training\)"):
        test_wings_import_downwards()


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check itself fails on a cycle (a -> b -> a)."""
    monkeypatch.setitem(globals(), "graph", lambda: {"a": {"b"}, "b": {"a"}})
    with pytest.raises(pytest.fail.Exception, match="import cycle: a -> b -> a"):
        test_no_import_cycles()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_local_imports_are_heavy_dependencies(name):
    local = [(m, line) for m, inside, line in imports(MODULES[name]) if inside]
    light = [(m, line) for m, line in local if not any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert not light, f"{MODULES[name]}: import these at the top of the module: {light}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= LIMIT or name in LONG, f"{MODULES[name]} has {lines} lines (> {LIMIT}); split it or state why"
