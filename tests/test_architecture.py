"""The layout keeps its promises (see ../shared/docs/architecture.md): no import cycles inside
the package, maths/ free of onnx and onnxruntime, the core never naming a pass, short modules."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "onnxcompress"
# Modules over the size limit when the layout landed; the list may only shrink (it is empty).
LONG_MODULES: dict[str, int] = {}
MAX_LINES = 410


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (passes/ as onnxcompress.passes)."""
    found = {}
    for root, prefix in ((PACKAGE, "onnxcompress"), (REPO / "passes", "onnxcompress.passes")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(path: Path) -> set[str]:
    """Modules a file imports anywhere (lazy imports inside functions too), except those
    under `if TYPE_CHECKING:`, which never run."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return _import_names(node for node in ast.walk(tree) if id(node) not in skipped)


def _import_names(nodes) -> set[str]:
    """The absolute modules (and module.name) that these AST nodes import."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = _graph()
    # A package imports its own submodules (passes/__init__ registers them): not a cycle.
    for name in graph:
        graph[name] = {other for other in graph[name] if not other.startswith(name + ".")}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_maths_imports_neither_onnx_nor_onnxruntime():
    for name, path in _modules().items():
        if not name.startswith("onnxcompress.maths"):
            continue
        imported = _imports(path)
        banned = {m for m in imported if m.split(".")[0] in ("onnx", "onnxruntime")}
        ours = {m for m in imported if m.startswith("onnxcompress") and m in _modules()}
        assert not banned, (name, banned)
        assert all(m.startswith("onnxcompress.maths") for m in ours), (name, ours)


def test_the_core_never_names_a_pass():
    # The registry's one lazy import of the package is the only link from the core.
    for name, path in _modules().items():
        if name.startswith("onnxcompress.passes"):
            continue
        text = path.read_text()
        assert "onnxcompress.passes." not in text and "import passes" not in text, name
        if name != "onnxcompress.registry":
            assert "onnxcompress.passes" not in text, name


def test_modules_stay_short():
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        limit = LONG_MODULES.get(name, MAX_LINES)
        assert lines <= limit, f"{name} has {lines} lines (limit {limit})"


def test_only_the_train_modules_import_torch():
    # torch is the optional `train` extra: the core, the passes and the CLI run without it,
    # and inside onnxcompress/train only the torch_* modules load it.
    for name, path in _modules().items():
        if name.startswith("onnxcompress.train.torch_"):
            continue
        torch_imports = {m for m in _imports(path) if m.split(".")[0] == "torch"}
        assert not torch_imports, (name, torch_imports)


def test_only_the_ray_executor_imports_ray():
    # Ray is the optional `ray` extra: only onnxcompress/ray_executor.py loads it, inside its
    # functions, and the core reaches that module only lazily (executor.make_executor).
    for name, path in _modules().items():
        ray_imports = {m for m in _imports(path) if m.split(".")[0] == "ray"}
        eager = {m for m in _top_level_imports(path) if m.split(".")[0] == "ray"}
        eager |= {m for m in _top_level_imports(path) if m.startswith("onnxcompress.ray_")}
        assert not eager, (name, eager)
        assert name == "onnxcompress.ray_executor" or not ray_imports, (name, ray_imports)


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported: its body, not inside functions."""
    return _import_names(ast.parse(path.read_text()).body)


def test_the_torch_modules_are_reached_only_lazily():
    # A pass that trains (distill) calls onnxcompress.train's torch_* modules from inside its
    # function, after its refusals: importing any pass, or the core, never loads torch.
    for name, path in _modules().items():
        if name.startswith("onnxcompress.train"):
            continue
        eager = {m for m in _top_level_imports(path) if ".train.torch_" in m}
        assert not eager, (name, eager)
