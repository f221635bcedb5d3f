"""The import contract of the package: layers, no loops, project imports at module level.

Read from the source with ``ast`` (nothing is imported). A module may import from its own layer or the layers below
it; no set of modules imports itself round a loop; a project import inside a function is allowed only where
:data:`LAZY` says why (the CLI's commands load what they run, and ``import rtlynx.ops`` loads no build machinery).
Imports under ``if __name__ == "__main__":`` are script entry points, not part of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rtlynx"

# Bottom to top. A module belongs to the layer of its longest listed prefix.
LAYERS = [
    ("leaves", ["rtlynx._files", "rtlynx._compile", "rtlynx.validate", "rtlynx.reference", "rtlynx.data", "rtlynx.models"]),
    ("config", ["rtlynx.config", "rtlynx.presets", "rtlynx._version"]),
    ("ops", ["rtlynx.ops"]),
    ("kernel families", ["rtlynx.backends", "rtlynx.families", "rtlynx.benchtools"]),
    ("sites", ["rtlynx.sites", "rtlynx.schedule"]),
    ("nn", ["rtlynx.nn", "rtlynx._txn"]),
    ("integrations", ["rtlynx.integrations", "rtlynx.cudagraphs"]),
    ("api", ["rtlynx.api"]),
    ("applications", ["rtlynx.distill", "rtlynx.calib_plan", "rtlynx.distill_global", "rtlynx.recording",
                      "rtlynx.select", "rtlynx.parallel", "rtlynx.io", "rtlynx.pipelines", "rtlynx.analysis", "rtlynx.demo", "rtlynx.eval", "rtlynx.train",
                      "rtlynx.testing"]),
    ("commands", ["rtlynx.commands", "rtlynx.cli", "rtlynx.__main__"]),
    ("package", ["rtlynx"]),
]

# Modules whose functions may import project modules, and why ("pkg.*": every module below pkg).
LAZY = {
    "rtlynx.commands.*": "each command loads what it runs, so `rtlynx --help` and the parser stay fast",
    "rtlynx.ops": "the build machinery loads only when a kernel library must be built (tests/test_ops_cpu.py)",
    "rtlynx.ops._lib": "the build machinery loads only when a kernel library must be built",
}


def module_name(path: Path, root: Path = PKG) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_main_guard(node) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators))


def imports_of(name: str, path: Path, modules) -> list[tuple[str, int, bool]]:
    """``[(imported project module, line, inside a function)]``."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    out = []

    def target(mod: str, names) -> list[str]:
        got = []
        for n in names:  # `from pkg import submodule` imports the submodule
            got.append(f"{mod}.{n}" if f"{mod}.{n}" in modules else mod)
        return got

    def visit(node, in_func: bool):
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, in_func) for a in node.names if a.name.split(".")[0] == "rtlynx")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "rtlynx":
                out.extend((t, node.lineno, in_func) for t in target(mod, [a.name for a in node.names]))
        inner = in_func or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def layer_of(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{name} is in no layer of tests/test_imports.py: place it"
    return best[0]


def graph():
    modules = all_modules()
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_no_upward_imports():
    _, edges = graph()
    bad = [f"{a}:{line} imports {b} ({LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]})"
           for a, imps in edges.items() for b, line, _ in imps if layer_of(b) > layer_of(a)]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_loops():
    modules, edges = graph()
    succ = {a: {b for b, _, _ in imps if b in modules and b != a} for a, imps in edges.items()}
    index, low, stack, on, loops = {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            strong(v)
    assert not loops, f"import loops: {loops}"


def test_project_imports_at_module_level():
    _, edges = graph()
    bad = [f"{a}:{line} imports {b} inside a function" for a, imps in edges.items() for b, line, in_func in imps
           if in_func and not any(a == k or (k.endswith(".*") and a.startswith(k[:-1])) for k in LAZY)]
    assert not bad, "move these to the top of the module, or say in LAZY why they must wait:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "rtlynx"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("from .. import api\n")
    (pkg / "api.py").write_text("def f():\n    from . import ops\n")
    modules = {module_name(p, pkg): p for p in pkg.rglob("*.py")}
    e_ops = imports_of("rtlynx.ops", pkg / "ops" / "__init__.py", modules)
    e_api = imports_of("rtlynx.api", pkg / "api.py", modules)
    assert [(b, f) for b, _, f in e_ops] == [("rtlynx.api", False)]
    assert [(b, f) for b, _, f in e_api] == [("rtlynx.ops", True)]
    assert layer_of("rtlynx.api") > layer_of("rtlynx.ops")

