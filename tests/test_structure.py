"""The house rules that keep crate-fast readable, checked on the source: every import points down (no
cycle among the project's modules, imports inside functions counted), no library module imports a command
line, and the size limits of docs/DESIGN.md §1 hold."""
import ast
import os

import pytest

from crate_fast.data.text import parse_source  # ast.parse, safe from another thread's parse (see there)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# repository folder -> installed package name (setup.py's package_dir)
PACKAGES = {"crate_fast": "crate_fast", "kernels": "crate_fast.kernels", "data": "crate_fast.data"}
MAX_FUNCTION_LINES = 60
LIMITS = {"train.py": 400, "README.md": 200}


def modules() -> dict[str, str]:
    """{module name: file path} of every project module."""
    out = {}
    for folder, name in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].split(os.sep)
                    rel = rel[:-1] if rel[-1] == "__init__" else rel
                    out[".".join([name, *rel])] = os.path.join(dirpath, f)
    return out


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """{module: the project modules it imports}, at module level or inside functions alike."""
    packages = {m for m, p in mods.items() if p.endswith("__init__.py")}
    edges = {}
    for mod, path in mods.items():
        base = mod.split(".") if mod in packages else mod.split(".")[:-1]
        targets = set()
        for node in ast.walk(parse_source(open(path, encoding="utf-8").read())):
            names = []
            if isinstance(node, ast.ImportFrom):
                parent = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                # `from package import submodule` names the submodule; `from module import name`, the module
                names = [f"{parent}.{a.name}" if f"{parent}.{a.name}" in mods else parent for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                while parts and ".".join(parts) not in mods:
                    parts.pop()
                if parts and ".".join(parts) != mod:
                    targets.add(".".join(parts))
        edges[mod] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down():
    mods = modules()
    assert "crate_fast.kernels.reference" in mods and "crate_fast.data.sources" in mods
    found = cycles(imports(mods))
    assert found == [], f"import cycles (imports inside functions counted): {found}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_a_command_line():
    """A module defining main() or run as a script is a command line; only other command lines may import it."""
    mods = modules()
    cli = {m for m, p in mods.items() if any(mark in open(p, encoding="utf-8").read()
                                             for mark in ("\ndef main(", '\nif __name__ == "__main__":'))}
    bad = [(m, sorted(targets & cli)) for m, targets in imports(mods).items() if m not in cli and targets & cli]
    assert bad == [], f"library modules importing a command line: {bad}"


def _is_triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) or "autotune" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


@pytest.mark.parametrize("folder", ["crate_fast", "kernels", "data", "train.py"])
def test_no_function_is_over_60_lines(folder):
    """Triton kernel bodies aside (a kernel is one program)."""
    paths = [os.path.join(ROOT, folder)] if folder.endswith(".py") else \
        [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, folder)) for f in fs if f.endswith(".py")]
    long = []
    for path in paths:
        for node in ast.walk(parse_source(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_size_limits():
    for name, limit in LIMITS.items():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert len(f.read().splitlines()) <= limit, name
    tree = parse_source(open(os.path.join(ROOT, "train.py"), encoding="utf-8").read())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 180
