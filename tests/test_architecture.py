"""The package's seams: model.py is a leaf (the readable spec imports no backend and no loader), no import
cycles (lazy imports inside functions included), and no module outside the model sets attributes on it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cqil_kernels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The cqil_kernels modules `path` imports, anywhere in the file (a lazy import counts). `from pkg
    import name` counts as importing pkg.name when that is a module, else pkg."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cqil_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("cqil_kernels"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES or sub in EXTENSIONS else base)
    return found - {name}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
EXTENSIONS = {"cqil_kernels._C"}  # compiled, imported by name like a module
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_spec_model_imports_no_backend_and_no_loader():
    allowed = {"cqil_kernels.config", "cqil_kernels.generation", "cqil_kernels.packing"}
    assert GRAPH["cqil_kernels.model"] <= allowed, GRAPH["cqil_kernels.model"] - allowed
    for leaf in ("cqil_kernels.config", "cqil_kernels.packing", "cqil_kernels.generation", "cqil_kernels.envs",
                 "cqil_kernels.files"):
        assert GRAPH[leaf] <= {"cqil_kernels.files", "cqil_kernels.envs"}, (leaf, GRAPH[leaf])


def test_no_import_cycles():
    """Depth-first search over the import graph; a back edge is a cycle (reported as its path)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_the_compiled_extension_has_one_importer():
    importers = sorted(name for name, deps in GRAPH.items() if "cqil_kernels._C" in deps)
    assert importers == ["cqil_kernels._ext"], importers


def test_no_module_sets_ad_hoc_attributes_on_a_model():
    """Assignments `model.<attr> = ...` outside model.py only touch what the model declares (its
    documented slots: backend, cqil, accelerator, adapters) — no attribute appears from outside."""
    declared = {"backend", "cqil", "accelerator", "adapters"}
    for name, path in MODULES.items():
        if name == "cqil_kernels.model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "model":
                    assert t.attr in declared, f"{name}: model.{t.attr} set from outside model.py"
