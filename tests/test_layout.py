"""The package layout's rules, checked on the source of src/vitq (parsed with ``ast``; nothing is imported):

- no import cycle among vitq modules, imports inside functions included (only vitq/cli/ may import lazily);
- no source file over 450 lines;
- argparse (and subcommand code) only under vitq/cli/;
- no calibration method, refiner or exporter names a model family's own classes;
- no private name (leading underscore) imported from another vitq module.

Every failure message lists each violation with its file and line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = SRC / "vitq"
MAX_LINES = 450
LAZY_OK = "vitq.cli"  # its modules may import inside functions (start-up time): their edges do not count
FAMILY_FREE = ("vitq.methods", "vitq.refine", "vitq.export")
# quantized classes that belong to one family wherever they live; besides these, every quantized (Q...) class
# defined under vitq/models and every subclass of the family-neutral bases counts (see family_classes)
NEUTRAL_BASES = ("QAttentionBase", "QTransformerBlock")
ISSUE_EXAMPLES = ("QAttention", "QWindowAttention", "QBlock", "QSwinBlock", "QHFAttention", "QHFLayer")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported vitq module
    names: tuple[str, ...]  # names taken from it (from ... import a, b); () for a plain import
    line: int
    in_function: bool
    type_checking: bool

    def where(self) -> str:
        return f"{path_of(self.source)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def path_of(module: str) -> str:
    return str(sources()[module].relative_to(SRC.parent))


@cache
def tree(module: str) -> ast.Module:
    path = sources()[module]
    return ast.parse(path.read_text(), str(path))


def is_package(module: str) -> bool:
    return sources()[module].name == "__init__.py"


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def imports(module: str) -> tuple[Import, ...]:
    """Every import of a vitq module in ``module``, wherever it is written."""
    return collect_imports(module, tree(module), set(sources()))


def collect_imports(module: str, root: ast.AST, mods: set[str]) -> tuple[Import, ...]:
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in mods:
                    found.append(Import(module, alias.name, (), node.lineno, in_function, type_checking))
        elif isinstance(node, ast.ImportFrom):
            target = absolute(module, node)
            if under(target, "vitq"):
                plain = tuple(a.name for a in node.names if f"{target}.{a.name}" not in mods)
                for a in node.names:  # `from vitq.x import y` where y is a submodule imports that module
                    if f"{target}.{a.name}" in mods:
                        found.append(Import(module, f"{target}.{a.name}", (), node.lineno, in_function,
                                            type_checking))
                if plain and target in mods:
                    found.append(Import(module, target, plain, node.lineno, in_function, type_checking))
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_checking or (isinstance(node, ast.If) and _is_type_checking(node.test)
                                   and child in node.body)
            visit(child, fn, tc)

    visit(root, False, False)
    return tuple(found)


# ------------------------------------------------------------------------------------------------ import cycles
def import_graph() -> dict[str, dict[str, list[Import]]]:
    """module -> imported module -> the imports making that edge (vitq/cli's and TYPE_CHECKING's left out)."""
    graph: dict[str, dict[str, list[Import]]] = {m: defaultdict(list) for m in sources()}
    for m in sources():
        if under(m, LAZY_OK):
            continue
        for imp in imports(m):
            if not imp.type_checking and imp.target != m:
                graph[m][imp.target].append(imp)
    return graph


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(graph: dict[str, dict], start: str, members: set[str]) -> list[str]:
    """A shortest import chain start -> ... -> start inside one component."""
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                chain = [v]
                while prev[chain[-1]] is not None:
                    chain.append(prev[chain[-1]])
                return [start, *reversed(chain[:-1]), start] if len(chain) > 1 else [start, v, start]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    return [start]


def describe_edge(graph, a: str, b: str) -> str:
    where = ", ".join(f"{i.where()}{' (in a function)' if i.in_function else ''}" for i in graph[a][b])
    return f"{a} -> {b} [{where}]"


def test_no_import_cycles():
    graph = import_graph()
    problems = []
    for comp in strongly_connected(graph):
        members = set(comp)
        cycle = shortest_cycle(graph, comp[0], members)
        lines = [f"  {describe_edge(graph, a, b)}" for a, b in zip(cycle, cycle[1:])]
        inner = [f"    {describe_edge(graph, a, b)}" for a in comp for b in sorted(graph[a]) if b in members]
        problems.append(f"cycle among {len(comp)} modules {comp}; e.g.\n" + "\n".join(lines)
                        + "\n  every import inside it:\n" + "\n".join(inner))
    assert not problems, "import cycles (imports in functions count; only vitq/cli may import lazily):\n" + \
        "\n".join(problems)


def test_the_checker_sees_function_level_relative_and_submodule_imports():
    mods = {"vitq", "vitq.quant", "vitq.quant.base", "vitq.quant.uniform", "vitq.scheme", "vitq.cli"}
    code = ("import torch\nfrom .base import EPS\nfrom .. import scheme\nfrom vitq import cli, VitqError\n"
            "def f():\n    import vitq.quant\n")
    found = {(i.target, i.names, i.in_function) for i in collect_imports("vitq.quant.uniform", ast.parse(code), mods)}
    assert found == {("vitq.quant.base", ("EPS",), False), ("vitq.scheme", (), False), ("vitq.cli", (), False),
                     ("vitq", ("VitqError",), False), ("vitq.quant", (), True)}
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]


# ------------------------------------------------------------------------------------------------- file length
def test_no_source_file_over_the_limit():
    too_long = {path_of(m): n for m, p in sources().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"source files over {MAX_LINES} lines (split them by idea): " + ", ".join(
        f"{p} ({n} lines)" for p, n in sorted(too_long.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------ argparse only in cli
def test_argparse_and_subcommands_only_under_cli():
    found = []
    for m in sources():
        if under(m, "vitq.cli"):
            continue
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
                found.append(f"{path_of(m)}:{node.lineno}: import argparse")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
                found.append(f"{path_of(m)}:{node.lineno}: from argparse import ...")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "add_command":
                found.append(f"{path_of(m)}:{node.lineno}: defines add_command (a subcommand)")
            elif isinstance(node, ast.Attribute) and node.attr in ("add_parser", "add_subparsers"):
                found.append(f"{path_of(m)}:{node.lineno}: calls .{node.attr} (a subcommand)")
    assert not found, "argparse / subcommand code outside vitq/cli:\n  " + "\n  ".join(found)


# ------------------------------------------------------------------------------------ family-neutral algorithms
def family_classes() -> dict[str, str]:
    """Class name -> where it is defined: every quantized class (Q...) defined under vitq/models, every
    subclass (through any depth, by name) of the family-neutral bases, and the issue's own examples."""
    bases: dict[str, set[str]] = {}
    home: dict[str, str] = {}
    for m in sources():
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))}
                bases.setdefault(node.name, set()).update(names)
                home.setdefault(node.name, f"{path_of(m)}:{node.lineno}")
                if under(m, "vitq.models") and node.name.startswith("Q"):
                    home[node.name] = f"{path_of(m)}:{node.lineno}"
    family = {n for n, where in home.items() if where.startswith("src/vitq/models/") and n.startswith("Q")}

    def derives(name: str, seen: frozenset = frozenset()) -> bool:
        return any(b in NEUTRAL_BASES or (b not in seen and derives(b, seen | {name}))
                   for b in bases.get(name, ()))

    family |= {n for n in bases if n not in NEUTRAL_BASES and derives(n)}
    family |= set(ISSUE_EXAMPLES)
    return {n: home.get(n, "(not defined)") for n in sorted(family)}


def test_family_classes_are_found():
    classes = family_classes()
    assert set(ISSUE_EXAMPLES) <= set(classes)
    assert any(n.startswith("QLevit") for n in classes), classes  # derived from vitq/models/levit.py


def test_algorithms_do_not_name_family_classes():
    classes = family_classes()
    found = []
    for m in sources():
        if not any(under(m, p) for p in FAMILY_FREE):
            continue
        for node in ast.walk(tree(m)):
            named = None
            if isinstance(node, ast.Name) and node.id in classes:
                named = node.id
            elif isinstance(node, ast.Attribute) and node.attr in classes:
                named = node.attr
            elif isinstance(node, ast.alias) and node.name.rpartition(".")[2] in classes:
                named = node.name
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in classes:
                named = repr(node.value)
            if named:
                found.append(f"{path_of(m)}:{getattr(node, 'lineno', '?')}: {named}")
    assert not found, ("methods, refiners and exporters name a family's own classes (use QAttentionBase, "
                       "QWeighted, QTransformerBlock; refuse with a VitqError what they cannot handle):\n  "
                       + "\n  ".join(found))


# ----------------------------------------------------------------------------------------------- private names
def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_across_modules():
    mods = sources()
    found = []
    for m in mods:
        module_aliases: dict[str, str] = {}  # local name -> vitq module it is bound to
        for imp in imports(m):
            if imp.target == m:
                continue
            for name in imp.names:
                if private(name):
                    found.append(f"{imp.where()}: imports {name} from {imp.target}")
            parts = imp.target.split(".")
            hidden = [p for p in parts if private(p)]
            # a private module is for its own package: vitq._version may be imported anywhere in vitq
            if hidden and not under(m, ".".join(parts[: parts.index(hidden[0])])):
                found.append(f"{imp.where()}: imports the private module {imp.target}")
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        module_aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = absolute(m, node)
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        module_aliases[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.Attribute) and private(node.attr):
                owner = ast.unparse(node.value)
                if owner in module_aliases and module_aliases[owner] != m:
                    found.append(f"{path_of(m)}:{node.lineno}: uses {owner}.{node.attr} of "
                                 f"{module_aliases[owner]}")
    assert not found, "private names used across vitq modules (make them public where another module needs " \
        "them):\n  " + "\n  ".join(found)
