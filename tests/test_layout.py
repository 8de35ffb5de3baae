"""The package's shape: the folders are the layers, no import cycles (function-local imports included),
one argument parser, the old module paths as deprecated aliases."""
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

import falcon_ext
from falcon_ext import _moved, cli

PACKAGE = Path(falcon_ext.__file__).parent
# docs/architecture.md: a module's layer is its folder (the modules at the top of falcon_ext/ are
# the foundation, the command line's excepted); it imports only from its own layer or the layers
# before it here.
LAYERS = ["foundation", "engine", "drafters", "evaluation", "training", "command line"]
COMMAND_LINE = {"falcon_ext.cli", "falcon_ext.cli_train"}


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every Python module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(name: str, path: Path) -> str:
    """The layer of module ``name`` (source file ``path``): the folder it lives in."""
    if name in COMMAND_LINE:
        return "command line"
    folder = path.parent.relative_to(PACKAGE).parts
    return folder[0] if folder else "foundation"


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
    source = "from .engine import ops\n\ndef f():\n    from .drafters.falcon import FalconDrafter\n" \
             "    import falcon_ext.drafters.tree\n"
    assert imports_of(source, "falcon_ext.cli", False, _modules()) == {
        "falcon_ext.engine.ops", "falcon_ext.drafters.falcon", "falcon_ext.drafters.tree"}
    source = "from .. import targets\nfrom ..engine.drafting import DraftTree\nfrom . import tree as cdt\n"
    assert imports_of(source, "falcon_ext.drafters.falcon", False, _modules()) == {
        "falcon_ext.targets", "falcon_ext.engine.drafting", "falcon_ext.drafters.tree"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_folders_are_the_layers():
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert sorted(folders) == sorted(LAYERS[1:-1]), "a package folder that is not a layer (docs/architecture.md)"
    assert layer_of("falcon_ext.targets", PACKAGE / "targets.py") == "foundation"
    assert layer_of("falcon_ext.engine.ops", PACKAGE / "engine" / "ops.py") == "engine"
    assert layer_of("falcon_ext.drafters", PACKAGE / "drafters" / "__init__.py") == "drafters"
    assert layer_of("falcon_ext.cli", PACKAGE / "cli.py") == "command line"


def test_layers_import_only_from_the_layers_before_them():
    modules = _modules()
    rank = {name: LAYERS.index(layer_of(name, path)) for name, path in modules.items() if name != "falcon_ext"}
    graph = import_graph()
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


def _forget(old: str) -> None:
    """Drops an old path from sys.modules and the package (``ops`` stays: it is public API)."""
    sys.modules.pop(old, None)
    if old != "falcon_ext.ops" and hasattr(falcon_ext, old.rsplit(".", 1)[1]):
        delattr(falcon_ext, old.rsplit(".", 1)[1])


def test_every_old_module_path_is_a_deprecated_alias_of_the_new_module():
    for old, new_name in sorted(_moved.MOVED.items()):
        new = importlib.import_module(new_name)
        _forget(old)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: it moved to {new_name}"):
            alias = importlib.import_module(old)
        assert alias is new and alias.__name__ == alias.__spec__.name == new_name, old
        assert not (PACKAGE.parent / (old.replace(".", "/") + ".py")).exists(), f"a file at the old path of {old}"


def test_old_paths_give_the_same_objects():
    for old in ("falcon_ext.falcon", "falcon_ext.cdt", "falcon_ext.smollm2"):
        _forget(old)
    with pytest.warns(DeprecationWarning, match="falcon_ext.drafters.falcon"):
        import falcon_ext.falcon
    with pytest.warns(DeprecationWarning, match="falcon_ext.drafters.tree"):
        from falcon_ext.cdt import TreePlan
    with pytest.warns(DeprecationWarning, match="falcon_ext.downloads"):
        from falcon_ext import smollm2
    import falcon_ext.drafters.falcon
    import falcon_ext.drafters.tree
    assert falcon_ext.falcon.FalconDrafter is falcon_ext.drafters.falcon.FalconDrafter is falcon_ext.FalconDrafter
    assert TreePlan is falcon_ext.drafters.tree.TreePlan and smollm2.NAME == "SmolLM2-135M-Instruct"
    assert importlib.util.find_spec("falcon_ext.no_such_module") is None


def test_the_package_imports_no_old_path():
    """The library, its tests (this one's alias checks aside), scripts and benchmarks import every
    module by its new path."""
    repo = PACKAGE.parent
    olds = {old.rsplit(".", 1)[1] for old in _moved.MOVED}
    found = []
    for path in [*PACKAGE.rglob("*.py"), *repo.glob("tests/*.py"), *repo.glob("scripts/*.py"),
                 *repo.glob("benchmarks/*.py"), *repo.glob("python/*.py")]:
        if path == Path(__file__):
            continue
        name = ".".join(path.relative_to(repo).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in _moved.MOVED:
                found.append((name, node.module))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "falcon_ext":
                found += [(name, f"falcon_ext.{a.name}") for a in node.names if a.name in olds and a.name != "ops"]
            elif isinstance(node, ast.Import):
                found += [(name, a.name) for a in node.names if a.name in _moved.MOVED]
    assert found == []
