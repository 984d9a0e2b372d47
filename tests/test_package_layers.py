"""The packages import one way: no module of evomask_ext or evomask_train imports, directly or
through others, a module that imports it back, and none hides an import inside a function to dodge
a cycle. Read from the installed sources with ``ast`` (nothing is imported to check)."""

from __future__ import annotations

import ast
from pathlib import Path

import evomask_ext
import evomask_train

PACKAGES = {"evomask_ext": Path(evomask_ext.__file__).parent, "evomask_train": Path(evomask_train.__file__).parent}
#: The one module allowed to import package modules inside a function: the console-script shim,
#: which checks that the [train] extra is installed before it imports the trainer. (Optional
#: third-party imports inside functions are not looked at.)
LAZY_OK = {"evomask_train.cli"}


def _module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(package: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import of ``path``'s module."""
    tree = ast.parse(path.read_text())
    here = _module_name(package, path)
    base = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base.split(".")[: len(base.split(".")) - child.level + 1]
                    target = ".".join(anchor + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, nested))
                # "from . import x" imports the submodule x
                found.extend((f"{target}.{alias.name}", nested) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            modules[_module_name(package, path)] = (package, path)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    lazy = []
    for name, (package, path) in modules.items():
        for target, in_function in _imports(package, path):
            if target not in modules or target == name:  # a name from a module, or a third-party module
                continue
            if in_function:
                if name not in LAZY_OK:
                    lazy.append(f"{name} imports {target} inside a function")
                continue
            # A package's __init__ importing its own submodules is how a package is assembled.
            if name in PACKAGES and target.startswith(name + "."):
                continue
            edges[name].add(target)
    return edges, lazy


def test_no_import_cycles():
    edges, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_level_imports_of_package_modules():
    _, lazy = _graph()
    assert not lazy, "\n".join(lazy)


def test_nothing_imports_private_names_from_ops():
    """ops.py is the public op API: the argument checks are imported from _checks where they are
    used, never re-exported through ops."""
    offenders = []
    for path in PACKAGES["evomask_ext"].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ops":
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                if private:
                    offenders.append(f"{path.name} imports {private} from ops")
    assert not offenders, "\n".join(offenders)
    from evomask_ext import ops

    assert all(not name.startswith("_") for name in ops.__all__)
