"""The import graph of ``sparsejax``, ``scaling`` and ``pallas_kernels`` (docs/design.md,
"Layers"), read with ``ast`` (nothing is imported).

An import is an edge from the importing module to the module it names: ``import a.b`` to
``a.b``; ``from pkg import name`` to ``pkg.name`` when that is a module of the packages, else to
``pkg`` (outside the packages always ``pkg.name``); relative imports resolved. Imports run when
the module loads ("module"), inside a function body ("local"), or under ``if TYPE_CHECKING:``
("type", never run). Checks:

* no cycle among module and local imports (a strongly connected component of more than one
  module is reported with one cycle through it);
* ``pallas_kernels`` and ``scaling`` import nothing of ``sparsejax``;
* the library (``sparsejax``'s top-level modules, ``methods/``, ``models/``; not ``cli.py`` or
  ``__main__.py``) imports nothing of the run framework, downstream use, sweeps, results or the
  CLI (``sparsejax/__init__.py`` may name ``sparsejax.downstream`` under ``TYPE_CHECKING`` for its
  lazy attributes, which ``importlib`` imports on first use);
* function-local imports are only those in :data:`LOCAL_IMPORTS` (optional or heavy modules
  and the CLI's subcommands) and :data:`LOCAL_IMPORTS_TO_HOIST`; a new one fails the test,
  which prints it, and so does an entry no import uses any more.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparsejax", "scaling", "pallas_kernels")
FRAMEWORK = ("sparsejax.run", "sparsejax.downstream", "sparsejax.sweep", "sparsejax.results",
             "sparsejax.cli")

# (importing module, imported module or a package prefix of it) -> why it is imported late.
LOCAL_IMPORTS: dict[tuple[str, str], str] = {
    ("sparsejax", "importlib"): "lazy sparsejax.load/Loaded/load_export (module __getattr__)",
    ("pallas_kernels", "pallas_kernels.layers"): "lazy NNX layers: the kernels work without flax",
    ("sparsejax.cli", "sparsejax.run"): "each subcommand imports its modules when it runs",
    ("sparsejax.cli", "sparsejax.downstream"): "subcommand (export, soup, oneshot)",
    ("sparsejax.cli", "sparsejax.sweep"): "subcommand (sweep)",
    ("sparsejax.cli", "scaling.cli"): "subcommand (fit)",
    ("sparsejax.cli", "sparsejax.results"): "subcommand (plot)",
    ("sparsejax.cli", "absl"): "config-file parsing, for the commands that take --config",
    ("sparsejax.cli", "ml_collections"): "config-file parsing, for the commands that take --config",
    ("sparsejax.cli", "importlib"): "checks that ray is installed for --backend ray",
    # the worker pins its CPU affinity first (XLA sizes its CPU thread pool when its backend
    # starts); note that ``python -m`` has run sparsejax/sweep/__init__.py before, which
    # already imports sparsejax.run.experiment through sparsejax.sweep.plan
    ("sparsejax.sweep.worker", "sparsejax.run.experiment"): "after the CPU affinity is set",
    ("sparsejax.sweep.worker", "ml_collections"): "after the CPU affinity is set",
    ("sparsejax.sweep.launcher", "sparsejax.sweep.ray_backend"): "ray: optional extra",
    ("sparsejax.run.outputs", "wandb"): "heavy, and only when wandb.enabled",
    ("sparsejax.run.mask_methods", "sparsejax.models.gpt"): "flax: only sparsity.method=block's "
    "check; the schema must refuse a bad key before flax loads (test_cli_errors)",
    ("sparsejax.run.tokenizer", "tokenizers"): "optional extra bpe, only for BPE tokenizers",
    ("pallas_kernels.block_sparse.kernel", "jax.experimental.pallas.tpu"): "TPU backend only",
    ("pallas_kernels.block_sparse.kernel", "jax.experimental.pallas.triton"): "GPU backend only",
    ("pallas_kernels.nm.kernel", "jax.experimental.pallas.tpu"): "TPU backend only",
    ("pallas_kernels.nm.kernel", "jax.experimental.pallas.triton"): "GPU backend only",
    ("pallas_kernels.cpu.abi", "jaxlib"): "fallback for a jax without jax.ffi.include_dir",
    ("pallas_kernels.cpu.cache", "numba"): "numba loads only when native kernels compile",
    ("pallas_kernels.cpu.native", "llvmlite"): "only when native kernels are first used",
}
# Local imports with no reason to be local, in files being rewritten elsewhere: hoist each to
# the top of its module, then delete its entry here.
LOCAL_IMPORTS_TO_HOIST: dict[tuple[str, str], str] = {}  # none left


class Import(NamedTuple):
    importer: str  # dotted module name
    path: Path
    line: int
    target: str  # dotted module name (a module of the packages, or an external one)
    kind: str  # "module", "local" or "type"
    function: str | None  # the enclosing function of a local import
    text: str  # the statement


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted name -> file of every module of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module
    tops = {name.split(".")[0] for name in known}
    if base.split(".")[0] not in tops:  # outside the packages: no way to tell a module apart
        return [f"{base}.{alias.name}" for alias in node.names]
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
            for alias in node.names]


def imports(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every import statement of every module of ``packages``, one row per imported name."""
    known = modules(root, packages)
    rows: list[Import] = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, function: str | None, type_only: bool,
                  module: str = module, path: Path = path, is_package: bool = is_package) -> None:
            if isinstance(node, ast.Import | ast.ImportFrom):
                kind = "local" if function else ("type" if type_only else "module")
                for target in _targets(node, module, is_package, known):
                    rows.append(Import(module, path, node.lineno, target, kind, function,
                                       ast.unparse(node)))
                return
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                name = getattr(node, "name", "<lambda>")
                for child in ast.iter_child_nodes(node):
                    visit(child, function or name, type_only)
                return
            if isinstance(node, ast.If) and function is None and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, function, True)
                for child in node.orelse:
                    visit(child, function, type_only)
                return
            for child in ast.iter_child_nodes(node):
                visit(child, function, type_only)

        visit(tree, None, False)
    return rows


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def runtime_graph(rows: list[Import], known: dict[str, Path]) -> dict[str, set[str]]:
    """Edges of module and function-local imports between modules of the packages."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for r in rows:
        if r.kind != "type" and r.target in known and r.target != r.importer:
            graph[r.importer].add(r.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through every strongly connected component of more than
    one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    out = []
    for component in components:  # a shortest cycle through the component's first module
        members, first = set(component), component[0]
        previous: dict[str, str] = {}
        frontier = [first]
        while frontier and first not in previous:
            nxt = []
            for node in frontier:
                for child in sorted(graph[node] & members):
                    if child not in previous:
                        previous[child] = node
                        nxt.append(child)
            frontier = nxt
        path = [first]
        while path[-1] != first or len(path) == 1:
            path.append(previous[path[-1]])
        out.append(path[::-1])
    return out


def _show(rows: list[Import]) -> str:
    return "\n".join(f"  {r.path.relative_to(ROOT) if r.path.is_relative_to(ROOT) else r.path}"
                     f":{r.line}: {r.text}  ({r.importer} -> {r.target})" for r in rows)


def allowed_local(row: Import) -> tuple[str, str] | None:
    """The allowlist entry that covers a local import, or ``None``."""
    for entry in (*LOCAL_IMPORTS, *LOCAL_IMPORTS_TO_HOIST):
        if row.importer == entry[0] and _within(row.target, entry[1]):
            return entry
    return None


def library(module: str) -> bool:
    """The Optax library: ``sparsejax``'s top-level modules, ``methods/`` and ``models/``."""
    parts = module.split(".")
    if parts[0] != "sparsejax" or module in ("sparsejax.cli", "sparsejax.__main__"):
        return False
    return len(parts) <= 2 and not any(_within(module, f) for f in FRAMEWORK) or (
        len(parts) >= 2 and parts[1] in ("methods", "models"))


def framework_imports_of_library(rows: list[Import]) -> list[Import]:
    """Library imports of the run framework, downstream use, sweeps or the CLI (except the
    type declarations of ``sparsejax/__init__.py``'s lazy attributes)."""
    return [r for r in rows if library(r.importer) and any(_within(r.target, f) for f in FRAMEWORK)
            and not (r.importer == "sparsejax" and r.kind == "type")]


def sparsejax_imports_of(rows: list[Import], packages: tuple[str, ...]) -> list[Import]:
    return [r for r in rows if r.importer.split(".")[0] in packages
            and _within(r.target, "sparsejax")]


@pytest.fixture(scope="module")
def rows() -> list[Import]:
    return imports()


def test_the_graph_covers_the_packages(rows):
    known = modules(ROOT)
    assert {"sparsejax", "sparsejax.run.train", "scaling.fit", "pallas_kernels.cpu.native",
            "sparsejax.sweep.worker", "sparsejax.downstream.loading"} <= set(known)
    graph = runtime_graph(rows, known)
    assert "sparsejax.run.configlib" in graph["sparsejax.run.experiment"]  # from pkg import mod
    assert "sparsejax.run.experiment" in graph["sparsejax.sweep.worker"]  # a local import
    assert sum(len(v) for v in graph.values()) > 150


def test_no_import_cycles(rows):
    found = cycles(runtime_graph(rows, modules(ROOT)))
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_pallas_kernels_and_scaling_import_nothing_of_sparsejax(rows):
    bad = sparsejax_imports_of(rows, ("pallas_kernels", "scaling"))
    assert not bad, "pallas_kernels and scaling must not import sparsejax:\n" + _show(bad)


def test_the_library_imports_nothing_of_the_framework(rows):
    assert library("sparsejax.masks") and library("sparsejax.methods.dst")
    assert library("sparsejax.models.gpt") and library("sparsejax")
    assert not library("sparsejax.run.train") and not library("sparsejax.cli")
    bad = framework_imports_of_library(rows)
    assert not bad, ("the library (sparsejax top level, methods/, models/) imports the run "
                     "framework:\n" + _show(bad))


def test_function_local_imports_are_listed(rows):
    local = [r for r in rows if r.kind == "local"]
    print("function-local imports:\n" + _show(local))
    new = [r for r in local if allowed_local(r) is None]
    assert not new, ("new function-local imports (import at the top of the module, or add an "
                     "entry with its reason to LOCAL_IMPORTS in tests/test_layout.py):\n"
                     + _show(new))


def test_every_listed_local_import_is_still_there(rows):
    used = {allowed_local(r) for r in rows if r.kind == "local"}
    stale = sorted((set(LOCAL_IMPORTS) | set(LOCAL_IMPORTS_TO_HOIST)) - used)
    assert not stale, f"entries no local import uses any more (delete them): {stale}"


# ---------------------------------------------------------------- the checks on planted code


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_planted_cycle_local_import_and_relative_import(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    from pkg import c\n",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "from pkg.sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "def f():\n    from ..a import x\n    import wandb\n",
        "pkg/d.py": "from pkg import a, helper\n",
    })
    rows = imports(root, ("pkg",))
    kinds = {(r.importer, r.target): r.kind for r in rows}
    assert kinds[("pkg", "pkg")] == "type"  # pkg.c is no module: the edge is to pkg
    assert kinds[("pkg.a", "pkg.b")] == "module"
    assert kinds[("pkg.sub.c", "pkg.a")] == "local" and kinds[("pkg.sub.c", "wandb")] == "local"
    assert kinds[("pkg.d", "pkg.a")] == "module" and kinds[("pkg.d", "pkg")] == "module"
    graph = runtime_graph(rows, modules(root, ("pkg",)))
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    graph["pkg.sub.c"].clear()  # the local import closed the cycle
    assert cycles(graph) == []


def test_planted_layer_violations(tmp_path):
    root = _package(tmp_path, {
        "sparsejax/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from sparsejax.downstream import loading\n",
        "sparsejax/masks.py": "def f():\n    from sparsejax.run import train\n",
        "sparsejax/methods/__init__.py": "from sparsejax.sweep import plan\n",
        "sparsejax/cli.py": "from sparsejax.run import train\n",
        "sparsejax/run/__init__.py": "",
        "sparsejax/run/train.py": "",
        "sparsejax/sweep/__init__.py": "",
        "sparsejax/sweep/plan.py": "",
        "sparsejax/downstream/__init__.py": "",
        "sparsejax/downstream/loading.py": "",
        "scaling/__init__.py": "from sparsejax import schedules\n",
        "pallas_kernels/__init__.py": "import sparsejax.masks\n",
    })
    rows = imports(root)
    assert {(r.importer, r.target) for r in framework_imports_of_library(rows)} == {
        ("sparsejax.masks", "sparsejax.run.train"), ("sparsejax.methods", "sparsejax.sweep.plan")}
    assert {(r.importer, r.target) for r in sparsejax_imports_of(
        rows, ("pallas_kernels", "scaling"))} == {("scaling", "sparsejax"),
                                                  ("pallas_kernels", "sparsejax.masks")}
    local = [r for r in rows if r.kind == "local"]
    assert [allowed_local(r) for r in local] == [None]  # masks -> run.train is listed nowhere
