"""The import rules of ARCHITECTURE.md, checked on the source: each layer imports only
the layers below it, and no module imports itself back through others."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Installed name of each folder (pyproject.toml's package-dir).
FOLDERS = {"bpttgen": "bpttgen", "derive": "bpttgen.derive", "codegen": "bpttgen.codegen",
           "generated": "bpttgen.generated"}
#: Layer -> the layers it may import.
ALLOWED = {
    "api": {"api", "derive"},
    "derive": {"derive"},
    "build": {"build", "derive", "runtime"},
    "runtime": {"runtime"},
    "app": {"app", "build", "derive", "runtime", "generated"},
    "generated": {"runtime"},
}


def _modules():
    """{dotted name: path} of every module of the installed package."""
    out = {}
    for folder, package in FOLDERS.items():
        for root, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), os.path.join(ROOT, folder))
                    parts = rel[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    out[".".join([package, *parts])] = os.path.join(root, f)
    return out


MODULES = _modules()


def layer(name):
    for prefix, layer_name in (("bpttgen.codegen.runtime", "runtime"),
                               ("bpttgen.codegen.app", "app"), ("bpttgen.codegen", "build"),
                               ("bpttgen.derive", "derive"), ("bpttgen.generated", "generated")):
        if name == prefix or name.startswith(prefix + "."):
            return layer_name
    return "api"


def imports(name):
    """The package modules ``name`` imports (at any depth of its code)."""
    path = MODULES[name]
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_only_the_layers_below(name):
    bad = sorted(t for t in GRAPH[name] if layer(t) not in ALLOWED[layer(name)])
    assert not bad, f"{name} ({layer(name)}) imports {bad}: see ARCHITECTURE.md"


def test_no_import_cycles():
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_runtime_needs_no_sympy_or_jinja2():
    for name, path in MODULES.items():
        if layer(name) in ("runtime", "generated"):
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) \
                        else [node.module or ""]
                    assert not any(m.split(".")[0] in ("sympy", "jinja2") for m in mods), name


def test_no_script_folder_shadows_an_installed_package():
    """Tests put bench/ and experiments/ on sys.path to import their scripts; a script
    named like an installed package (bench/cuda.py and NVIDIA's ``cuda``, then
    bench/distributed.py and dask's ``distributed``) then hides that package from
    every later test in the same worker: a failure that depends on scheduling."""
    import importlib.util
    import sys

    folders = [os.path.join(ROOT, f) for f in ("bench", "experiments", "tests")]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path
                   if os.path.abspath(p or os.curdir) not in folders + [ROOT]]
    try:
        clashes = []
        for folder in folders:
            for f in os.listdir(folder):
                stem = f[:-3]
                if f.endswith(".py") and stem not in sys.modules and \
                        importlib.util.find_spec(stem) is not None:
                    clashes.append(os.path.join(os.path.basename(folder), f))
    finally:
        sys.path[:] = saved
    assert not clashes, f"these scripts shadow installed modules: {clashes}"
