"""Architecture rules: a light core, plugins on the public API, exports, docstrings, doctests."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import curvkit
import curvkit.hookspecs

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "curvkit"
PLUGINS = REPO / "plugins"
HEAVY = ("typer", "h5py", "matplotlib", "safetensors")


def _imports(path: Path, package: str, module_level: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """``(module, imported names)`` for every import statement of a source file.

    Relative imports are resolved against ``package``. With ``module_level``, only
    the statements run on import (not those inside functions or classes).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    nodes = _module_level(tree) if module_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, tuple(alias.name for alias in node.names)))
    return found


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Statements executed on import: the module body and nested if/try blocks, not defs."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        out.append(node)
        todo += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return out


def _package_of(path: Path, root: Path, name: str) -> str:
    """The package a source file belongs to (itself, for an ``__init__.py``)."""
    return ".".join([name, *path.relative_to(root).parts[:-1]])


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_import_curvkit_stays_light():
    code = (
        "import json, sys, curvkit; "
        "print(json.dumps(sorted(m for m in sys.modules "
        f"if m.split('.')[0] in {HEAVY!r} "
        "or m.startswith('curvkit.cli'))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURVKIT_")}
    proc = subprocess.run(  # cwd away from the checkout, so the installed curvkit is imported
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tempfile.gettempdir(),
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in HEAVY or m.startswith("curvkit.cli")], loaded


def test_the_import_scanner_sees_imports():
    # guard against a scanner that finds nothing and so passes everything
    found = _imports(CORE / "problem.py", "curvkit")
    assert ("curvkit.data", ("BatchSource", "batch_size_of", "rebatchable_types", "to_device")) in found
    assert ("torch", ()) in found
    assert len(_core_files()) >= 10
    assert (CORE / "testing" / "conformance.py") in _core_files()
    # matplotlib is imported inside plotting's functions: seen by the full scan only
    inside = [m for m, _ in _imports(CORE / "plotting.py", "curvkit") if m.startswith("matplotlib")]
    on_import = [m for m, _ in _imports(CORE / "plotting.py", "curvkit", module_level=True)]
    assert inside and not [m for m in on_import if m.startswith("matplotlib")]
    assert "__future__" in on_import


# The modules whose purpose is an optional dependency; `import curvkit` never imports them.
OPTIONAL_DEPENDENCY_MODULES = {"store.py": "h5py", "plotting.py": "matplotlib"}


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_core_does_not_import_cli_plugins_or_heavy_optional_packages(path):
    package = _package_of(path, CORE, "curvkit")
    for module, names in _imports(path, package):
        top = module.split(".")[0]
        assert not module.startswith(("curvkit.cli", "curvkit.plugins")), f"{path.name} imports {module}"
        assert top not in ("cli", "plugins"), f"{path.name} imports {module}"
        if module == "curvkit":
            assert not {"cli", "plugins"} & set(names), f"{path.name} imports {names} from curvkit"
    # heavy packages only inside functions (imported when used), except in their own modules
    allowed = OPTIONAL_DEPENDENCY_MODULES.get(path.name)
    for module, _ in _imports(path, package, module_level=True):
        top = module.split(".")[0]
        assert top not in HEAVY or top == allowed, f"{path.name} imports {module} at module level"


@pytest.mark.parametrize("path", sorted(PLUGINS.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_use_only_public_curvkit_modules(path):
    package = _package_of(path, PLUGINS, "curvkit.plugins")
    for module, names in _imports(path, package):
        parts = module.split(".")
        assert parts[0] not in ("cli", "plugins"), f"{path.name} imports {module}"
        if parts[0] != "curvkit":
            continue
        assert not module.startswith("curvkit.cli"), f"{path.name} imports {module}"
        private = [p for p in parts if p.startswith("_")] + [n for n in names if n.startswith("_")]
        assert not private, f"{path.name} imports private {module} {names}"
        if not module.startswith("curvkit.plugins"):
            importlib.import_module(module)  # exists


def test_plugins_are_found_by_the_scan():
    assert (PLUGINS / "hessian.py") in sorted(PLUGINS.rglob("*.py"))


def test_everything_in_all_exists_and_is_documented():
    assert len(curvkit.__all__) == len(set(curvkit.__all__))
    for name in curvkit.__all__:
        assert hasattr(curvkit, name), name
        obj = getattr(curvkit, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"curvkit.{name} has no docstring"
    # the public classes and functions defined in the core are exported
    for module_name in ("curvkit.errors", "curvkit.operator", "curvkit.registry"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.{name}"


def _module_name(path: Path) -> str:
    """``curvkit.checkpoints.load`` for ``curvkit/checkpoints/load.py``; a package for its ``__init__``."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _curvkit_modules() -> list[str]:
    plugins = [f"curvkit.plugins.{path.stem}" for path in sorted(PLUGINS.glob("[!_]*.py"))]
    return [*map(_module_name, _core_files()), *plugins, "curvkit.cli.main"]


def _core_import_graph() -> dict[str, set[str]]:
    """Which core modules each core module imports: every import, in functions and TYPE_CHECKING too."""
    modules = {_module_name(path): path for path in _core_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for module, names in _imports(path, _package_of(path, CORE, "curvkit")):
            submodules = {f"{module}.{n}" for n in names} & set(modules)  # from curvkit import hookspecs
            graph[name] |= submodules or ({module} & set(modules))
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of the directed graph as ``[a, b, ..., a]``, or ``[]``."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return []

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return []


def test_the_core_has_no_import_cycle():
    graph = _core_import_graph()
    # the scan sees imports inside functions and those naming a submodule
    assert "curvkit.registry" in graph["curvkit.checkpoints.formats"]
    assert "curvkit.hookspecs" in graph["curvkit.registry"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = _find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_checkpoint_types_import_neither_the_registry_nor_the_hookspecs():
    # registry and hookspecs refer to CheckpointLoader; its module must stay below them
    graph = _core_import_graph()
    assert graph["curvkit.checkpoints._types"] <= {"curvkit.errors", "curvkit.checkpoints._text"}


@pytest.mark.parametrize("module_name", _curvkit_modules())
def test_doctests(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) of {module_name} failed"
    if module_name in ("curvkit.registry", "curvkit.autodiff", "curvkit.problem", "curvkit.jacobians"):
        assert result.attempted > 0, f"{module_name} lost its examples"


def test_every_hook_is_documented():
    hooks = {
        name: fn
        for name, fn in vars(curvkit.hookspecs).items()
        if callable(fn) and hasattr(fn, f"{curvkit.hookspecs.PROJECT_NAME}_spec")
    }
    assert "curvkit_register_estimators" in hooks
    pm = curvkit.plugin_manager()
    registered = {
        name
        for name in dir(pm.hook)
        if not name.startswith("_") and getattr(pm.hook, name).spec is not None  # not a rejected typo
    }
    assert set(hooks) <= registered
    # hooks that plugins declare (curvkit_add_hookspecs) are documented where they are declared
    hooks |= {name: getattr(pm.hook, name).spec.function for name in registered - set(hooks)}
    for name, fn in hooks.items():
        assert name.startswith("curvkit_"), name
        doc = inspect.getdoc(fn) or ""
        assert len(doc.splitlines()) >= 3, f"hook {name} needs a docstring"
        assert "Returns" in doc or "return" in doc.lower(), f"hook {name} does not say what it returns"


def test_every_core_subpackage_is_installed():
    """A non-editable install (CI's, a user's) ships only the packages pyproject.toml lists."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "curvkit." + ".".join(init.parent.relative_to(CORE).parts)
        for init in CORE.rglob("__init__.py")
        if init.parent != CORE
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
