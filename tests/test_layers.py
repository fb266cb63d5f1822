"""The package's shape (docs/design.md §1): every module has a layer, imports point down only, no import
cycles, the ONNX runtime is torch-free, and no module grows past MAX_LINES.

Imports are read with `ast` from the source (nothing is imported): module-level ones and those inside
functions, `if TYPE_CHECKING:` blocks and try/except fallbacks, absolute and relative, and
`importlib.import_module("...")` / `__import__("...")` with a constant name. `from P import n` is an
edge to P.n when that is a module (or package), else to P.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

PKG = "fastdiff"
ROOT = Path(__file__).resolve().parents[1] / PKG
MAX_LINES = 400

# Lower number = lower layer; a module may import modules of its own layer or lower ones.
# "x.*" covers the module or package x and everything under it. A new module gets its place here.
LAYERS: dict[int, tuple[str, list[str]]] = {
    0: ("core", ["fastdiff", "fastdiff.schedule", "fastdiff.multistep", "fastdiff.noise", "fastdiff.nn.*", "fastdiff.data",
                 "fastdiff.files", "fastdiff.machine", "fastdiff.request", "fastdiff.images",
                 "fastdiff.checkpoint", "fastdiff.onnx_format", "fastdiff.onnx_export", "fastdiff.onnx_quant"]),
    1: ("ops", ["fastdiff.ops", "fastdiff.reference", "fastdiff._C"]),
    2: ("sampling", ["fastdiff.sampling"]),
    3: ("engine", ["fastdiff.engine", "fastdiff.runtimes"]),
    4: ("applications", ["fastdiff.train", "fastdiff.export.*", "fastdiff.metrics", "fastdiff.likelihood", "fastdiff.evaluate",
                         "fastdiff.bench.*", "fastdiff.interop.*", "fastdiff.serve.*", "fastdiff.diffusers",
                         "fastdiff.distributed"]),
    5: ("cli", ["fastdiff.cli.*", "fastdiff.__main__"]),
}

TORCH_FREE = "fastdiff.export.runtime"
# torch itself and third-party packages that import it.
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio", "safetensors.torch", "diffusers", "transformers",
                  "accelerate")


class Edge(NamedTuple):
    src: str
    dst: str
    where: str  # path:line
    typing_only: bool = False  # inside `if TYPE_CHECKING:`: never runs


def layer_of(module: str, layers: dict = LAYERS) -> int | None:
    for level, (_, patterns) in layers.items():
        for pat in patterns:
            if pat.endswith(".*") and (module == pat[:-2] or module.startswith(pat[:-1])):
                return level
            if module == pat:
                return level
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """(node, inside an `if TYPE_CHECKING:` body) for every node of the tree."""
    todo = [(tree, False)]
    while todo:
        node, typing_only = todo.pop()
        yield node, typing_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += [(n, True) for n in node.body] + [(n, typing_only) for n in node.orelse]
        else:
            todo += [(n, typing_only) for n in ast.iter_child_nodes(node)]


class Tree:
    """The import graph of the package at `root` (a folder holding __init__.py)."""

    def __init__(self, root: Path, always: tuple[str, ...] = ()):
        self.root = Path(root)
        self.pkg = self.root.name
        self.always = always  # modules that exist without a .py (compiled extensions)

    def name(self, path: Path) -> str:
        parts = list(path.relative_to(self.root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    @cached_property
    def sources(self) -> dict[str, Path]:
        return {self.name(p): p for p in sorted(self.root.rglob("*.py")) if "__pycache__" not in p.parts}

    @cached_property
    def modules(self) -> frozenset[str]:
        names = set(self.sources) | set(self.always)
        for p in self.root.rglob("*"):
            if p.suffix in (".so", ".pyd") and "__pycache__" not in p.parts:
                rel = p.relative_to(self.root.parent)
                names.add(".".join((*rel.parent.parts, p.name.split(".")[0])))
        return frozenset(names)

    def ours(self, name: str) -> bool:
        return name == self.pkg or name.startswith(self.pkg + ".")

    def resolve(self, name: str) -> str:
        """The module that importing `name` loads: its longest prefix that is a module of the package."""
        parts = name.split(".")
        while parts and ".".join(parts) not in self.modules:
            parts.pop()
        return ".".join(parts) or self.pkg

    def imports(self, module: str) -> list[tuple[str, int, bool]]:
        """(absolute imported name, line, typing only) for every import in module, at any depth."""
        path = self.sources[module]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: list[tuple[str, int, bool]] = []
        for node, typing_only in _walk(tree):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno, typing_only) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not self.ours(base):
                    found.append((base, node.lineno, typing_only))
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in self.modules else base, node.lineno, typing_only))
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
                found.append((node.args[0].value, node.lineno, typing_only))
        return sorted(found, key=lambda f: (f[1], f[0]))

    @cached_property
    def graph(self) -> tuple[dict[str, list[Edge]], dict[str, list[Edge]]]:
        """(edges between the package's modules, one per pair; imports of other packages), by importer."""
        internal: dict[str, list[Edge]] = defaultdict(list)
        external: dict[str, list[Edge]] = defaultdict(list)
        for module, path in self.sources.items():
            rel = path.relative_to(self.root.parent)
            seen: dict[str, int] = {}
            for name, line, typing_only in self.imports(module):
                where = f"{rel}:{line}"
                if not self.ours(name):
                    external[module].append(Edge(module, name, where, typing_only))
                    continue
                dst = self.resolve(name)
                if dst == module:
                    continue
                if dst not in seen:
                    seen[dst] = len(internal[module])
                    internal[module].append(Edge(module, dst, where, typing_only))
                elif not typing_only and internal[module][seen[dst]].typing_only:  # a real import wins
                    internal[module][seen[dst]] = Edge(module, dst, where, False)
        return dict(internal), dict(external)

    # --- the checks; each returns its offending lines ---------------------------------------------------
    def unmapped(self, layers: dict = LAYERS) -> list[str]:
        return [f"add {m} to the layer map (LAYERS in tests/test_layers.py)"
                for m in sorted(self.modules) if layer_of(m, layers) is None]

    def upward(self, layers: dict = LAYERS) -> list[str]:
        bad = []
        for module, edges in sorted(self.graph[0].items()):
            for e in edges:
                lo, hi = layer_of(e.src, layers), layer_of(e.dst, layers)
                if lo is not None and hi is not None and hi > lo:
                    bad.append(f"{e.src} -> {e.dst} (layer {lo} -> {hi}; {e.where})")
        return bad

    def cycles(self) -> list[str]:
        """Each strongly connected component of more than one module: an example cycle, then every
        edge inside it (each lies on some cycle)."""
        internal = self.graph[0]
        report = []
        for comp in _components(internal):
            members = set(comp)
            report.append(f"cycle among {', '.join(comp)} (e.g. {' -> '.join(_a_cycle(comp, internal))}); "
                          "its edges:")
            report += [f"    {e.src} -> {e.dst} ({e.where})"
                       for m in comp for e in internal.get(m, []) if e.dst in members]
        return report

    def imports_of_torch(self, module: str) -> list[str]:
        """Every chain by which importing `module` can import torch: its fastdiff imports at any depth,
        transitively, and the packages whose __init__ runs first; `if TYPE_CHECKING:` imports excepted."""
        internal, external = self.graph
        parent: dict[str, str | None] = {module: None}
        queue = [module]

        def reach(dst: str, src: str) -> None:
            if dst not in parent:
                parent[dst] = src
                queue.append(dst)

        while queue:
            v = queue.pop(0)
            for e in internal.get(v, []):
                if not e.typing_only:
                    reach(e.dst, v)
            parts = v.split(".")
            for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                reach(".".join(parts[:i]), v)

        def chain(m: str) -> str:
            path = [m]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return " -> ".join(reversed(path))

        return [f"{chain(m)} -> {e.dst} ({e.where})" for m in sorted(parent) for e in external.get(m, [])
                if not e.typing_only and any(e.dst == t or e.dst.startswith(t + ".") for t in TORCH_PACKAGES)]

    def too_long(self, max_lines: int = MAX_LINES) -> list[str]:
        sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in self.sources.values()}
        return [f"{p.relative_to(self.root.parent)}: {n} lines" for p, n in sorted(sizes.items()) if n > max_lines]


def _components(internal: dict[str, list[Edge]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    nodes = sorted(set(internal) | {e.dst for es in internal.values() for e in es})
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            succ = [e.dst for e in internal.get(v, [])]
            if i > 0:
                low[v] = min(low[v], low[succ[i - 1]])
            while i < len(succ) and succ[i] in index:
                if succ[i] in on_stack:
                    low[v] = min(low[v], index[succ[i]])
                i += 1
            if i < len(succ):
                work += [(v, i + 1), (succ[i], 0)]
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return sorted(comps)


def _a_cycle(comp: list[str], internal: dict[str, list[Edge]]) -> list[str]:
    """A shortest cycle through comp[0] inside the component, as [comp[0], ..., comp[0]]."""
    members, start = set(comp), comp[0]
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in internal.get(v, []):
                if e.dst == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if e.dst in members and e.dst not in parent:
                    parent[e.dst] = v
                    nxt.append(e.dst)
        frontier = nxt
    raise AssertionError(f"{comp} is not a strongly connected component")


TREE = Tree(ROOT, always=(f"{PKG}._C",))  # fastdiff._C is built from csrc/: a module even when not compiled
LAYER_NAMES = ", ".join(f"{k} {v[0]}" for k, v in LAYERS.items())


# --- the tests on fastdiff ------------------------------------------------------------------------------
def test_every_module_has_a_layer() -> None:
    missing = TREE.unmapped()
    assert not missing, "modules without a layer:\n  " + "\n  ".join(missing)


def test_imports_point_down() -> None:
    bad = TREE.upward()
    problems = bad + TREE.unmapped()
    assert not problems, (f"{len(bad)} upward import(s); a module may import only its own layer or lower "
                          f"({LAYER_NAMES}):\n  " + "\n  ".join(problems))


def test_no_import_cycles() -> None:
    """Every import counts, function-level ones too: modules in a cycle are one unit in truth."""
    report = TREE.cycles()
    assert not report, "import cycles among fastdiff modules:\n  " + "\n  ".join(report)


def test_export_runtime_never_imports_torch() -> None:
    """fastdiff.export.runtime samples with NumPy + onnxruntime only: neither it nor any fastdiff module it
    imports (at module level or inside functions, transitively) imports torch."""
    assert TORCH_FREE in TREE.sources
    bad = TREE.imports_of_torch(TORCH_FREE)
    assert not bad, (f"{TORCH_FREE} must never import torch; it can through (array-generic code can reach "
                     "torch without an import statement, e.g. sys.modules['torch'], since a tensor argument "
                     "means torch is loaded):\n  " + "\n  ".join(bad))


def test_no_module_over_max_lines() -> None:
    big = TREE.too_long()
    assert not big, f"modules over {MAX_LINES} lines (split them):\n  " + "\n  ".join(big)


# --- the checker itself, on a made-up package -----------------------------------------------------------
def test_checker_on_a_synthetic_package(tmp_path) -> None:
    files = {
        "__init__.py": "from .low import X\n",
        "low.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                  "    from .high import H\n",
        "mid.py": "from . import low\nfrom .sub import deep\n\ndef f():\n    from pkg import high\n    return high\n",
        "high.py": "import pkg.mid as m\nfrom pkg.sub.deep import thing\n",
        "sub/__init__.py": "from .. import low\nfrom . import deep\n",
        "sub/deep.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.mid')\n",
        "free.py": "from .low import X\nfrom . import uses_torch\n",
        "uses_torch.py": "def f():\n    from safetensors.torch import load_file\n",
        "orphan.py": "x = 1\n" * 20,
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    layers = {0: ("a", ["pkg", "pkg.low", "pkg.free", "pkg.uses_torch"]), 1: ("b", ["pkg.sub.*"]),
              2: ("c", ["pkg.mid", "pkg.high"])}
    tree = Tree(tmp_path / "pkg")
    internal, _ = tree.graph
    assert {e.dst for e in internal["pkg.mid"]} == {"pkg.low", "pkg.sub.deep", "pkg.high"}
    assert {e.dst for e in internal["pkg.sub"]} == {"pkg.low", "pkg.sub.deep"}
    assert {e.dst for e in internal["pkg.high"]} == {"pkg.mid", "pkg.sub.deep"}
    assert [(e.dst, e.typing_only) for e in internal["pkg.low"]] == [("pkg.high", True)]
    assert tree.unmapped(layers) == ["add pkg.orphan to the layer map (LAYERS in tests/test_layers.py)"]
    assert tree.upward(layers) == ["pkg.low -> pkg.high (layer 0 -> 2; pkg/low.py:5)",
                                   "pkg.sub.deep -> pkg.mid (layer 1 -> 2; pkg/sub/deep.py:4)"]
    cycles = tree.cycles()
    assert cycles[0].startswith("cycle among pkg.high, pkg.low, pkg.mid, pkg.sub.deep (e.g. pkg.high -> ")
    assert sorted(cycles[1:]) == sorted(["    pkg.high -> pkg.mid (pkg/high.py:1)",
                                         "    pkg.high -> pkg.sub.deep (pkg/high.py:2)",
                                         "    pkg.low -> pkg.high (pkg/low.py:5)",
                                         "    pkg.mid -> pkg.low (pkg/mid.py:1)",
                                         "    pkg.mid -> pkg.sub.deep (pkg/mid.py:2)",
                                         "    pkg.mid -> pkg.high (pkg/mid.py:5)",
                                         "    pkg.sub.deep -> pkg.mid (pkg/sub/deep.py:4)"])
    assert tree.imports_of_torch("pkg.low") == []  # TYPE_CHECKING only
    assert tree.imports_of_torch("pkg.free") == [
        "pkg.free -> pkg.uses_torch -> safetensors.torch (pkg/uses_torch.py:2)"]
    assert tree.too_long(10) == ["pkg/orphan.py: 20 lines"]
