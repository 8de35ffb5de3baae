"""The package's shape: no import cycles (function-local imports included), one argument parser."""
import ast
import importlib
import sys
from pathlib import Path

import pytest

import falcon_ext
from falcon_ext import cli

PACKAGE = Path(falcon_ext.__file__).parent
# docs/architecture.md: a module imports only from its own layer or the layers before it here.
LAYERS = {
    "foundation": ["targets", "smollm2", "prompts"],
    "engine": ["generate", "target_io", "kv_cache", "drafting", "sampling", "ops", "testing"],
    "drafters": ["prompt_lookup", "falcon", "cdt", "checkpoint"],
    "evaluation": ["evaluate", "cdt_tune", "divergence", "bench", "bench_report"],
    "training": ["data", "conversations", "distributed", "train", "train_state"],
    "command line": ["cli", "cli_train"],
}


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every Python module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_module(name: str, modules: dict[str, Path]) -> bool:
    """A Python module of the package, or a compiled one (falcon_ext._C)."""
    if name in modules:
        return True
    folder = PACKAGE.parent.joinpath(*name.split(".")[:-1])
    return any(folder.glob(name.rsplit(".", 1)[-1] + ".*.so")) or any(folder.glob(name.rsplit(".", 1)[-1] + ".*.pyd"))


def imports_of(source: str, name: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports anywhere in ``source`` (top level or in a function)."""
    package = name if is_package else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                member = f"{origin}.{alias.name}"
                deps.add(member if _is_module(member, modules) else origin)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return {d for d in deps if d in modules and d != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules)
            for modules in [_modules()] for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_function_local_imports_and_cycles():
    source = "from . import ops\n\ndef f():\n    from .falcon import FalconDrafter\n    import falcon_ext.cdt\n"
    assert imports_of(source, "falcon_ext.cli", False, _modules()) == {
        "falcon_ext.ops", "falcon_ext.falcon", "falcon_ext.cdt"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_import_only_from_the_layers_before_them():
    rank = {f"falcon_ext.{m}": n for n, modules in enumerate(LAYERS.values()) for m in modules}
    graph = import_graph()
    assert sorted(graph) == sorted(["falcon_ext", *rank]), "a module missing from LAYERS (docs/architecture.md)"
    upward = [(m, d) for m in rank for d in sorted(graph[m]) if rank[d] > rank[m]]
    assert upward == []


def test_one_module_builds_argument_parsers():
    """Only falcon_ext/cli.py uses argparse or defines main() (scripts/ and benchmarks/ may have
    their own parsers); the other modules take configs or arguments."""
    parsers, mains = [], []
    for path in _modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                parsers.append(path.name)
        mains += [path.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert parsers == ["cli.py"] and mains == ["cli.py"]


def test_cli_train_is_a_deprecated_alias_of_cli():
    sys.modules.pop("falcon_ext.cli_train", None)
    with pytest.warns(DeprecationWarning, match="python -m falcon_ext.cli"):
        alias = importlib.import_module("falcon_ext.cli_train")
    assert alias.main is cli.main
