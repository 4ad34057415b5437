"""polydatum's modules import each other one way: no import cycles (DESIGN.md §3).

grimp reads the import graph of the package from its source. Imports inside functions
count (they make a cycle at run time just the same, only later); imports under
``if TYPE_CHECKING:`` do not (they never run). A cycle is a strongly connected
component of that graph: modules that all reach each other through imports.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path

import grimp
import pytest

import polydatum

ROOT = Path(__file__).resolve().parent.parent

#: Cycles in the package, each as the set of modules tied together in it. None are left
#: (issue 14 removed the last, the core's); the test fails when one appears.
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()


def import_graph() -> grimp.ImportGraph:
    # cache_dir=None: no .grimp_cache written into the checkout.
    return grimp.build_graph("polydatum", exclude_type_checking_imports=True, cache_dir=None)


def strongly_connected_components(
    edges: Mapping[str, Iterable[str]],
) -> list[frozenset[str]]:
    """The components of more than one module, or of one that imports itself (Tarjan's
    algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                child = pending.pop(0)
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, sorted(edges.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(frozenset(component))
    return found


def cycles(graph: grimp.ImportGraph) -> list[frozenset[str]]:
    return strongly_connected_components(
        {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    )


def chains(graph: grimp.ImportGraph, component: frozenset[str]) -> list[str]:
    """The component as module chains: for each import inside it, the shortest cycle
    through that import, ``a -> b (line 12) -> a (line 30)``."""
    seen: set[tuple[str, ...]] = set()
    lines: list[str] = []
    for importer in sorted(component):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & component):
            back = graph.find_shortest_chain(importer=imported, imported=importer) or (imported,)
            loop = (importer, *back)  # importer -> imported -> ... -> importer
            start = loop.index(min(loop[:-1]))
            key = loop[start:-1] + loop[:start]  # the same cycle, whichever import found it
            if key in seen:
                continue
            seen.add(key)
            ring = (*key, key[0])
            steps = [ring[0]]
            for a, b in pairwise(ring):
                where = sorted(
                    d["line_number"] for d in graph.get_import_details(importer=a, imported=b)
                )
                steps.append(f"{b} (line {', '.join(map(str, where))} of {a})")
            lines.append(" -> ".join(steps))
    return lines


def describe(graph: grimp.ImportGraph, components: Iterable[frozenset[str]]) -> str:
    parts = []
    for component in sorted(components, key=sorted):
        parts.append(f"  {{{', '.join(sorted(component))}}}:")
        parts.extend(f"    {chain}" for chain in chains(graph, component))
    return "\n".join(parts)


def test_the_graph_holds_every_module_of_the_package() -> None:
    root = Path(polydatum.__file__).parent
    on_disk = {
        ".".join(("polydatum", *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for path in root.rglob("*.py")
    }
    assert import_graph().modules == on_disk


def test_no_import_cycles_but_the_known_ones() -> None:
    graph = import_graph()
    found = set(cycles(graph))
    new = found - KNOWN_CYCLES
    gone = KNOWN_CYCLES - found
    message = []
    if new:
        message.append(f"import cycles in polydatum:\n{describe(graph, new)}")
    if gone:
        message.append(
            "these KNOWN_CYCLES are no longer in the package as listed (removed or "
            "changed): update KNOWN_CYCLES\n"
            + "\n".join(f"  {{{', '.join(sorted(c))}}}" for c in sorted(gone, key=sorted))
        )
    assert not message, "\n".join(message)


def test_sql_imports_safe_imports_sql_engine_and_never_back() -> None:
    graph = import_graph()
    assert graph.direct_import_exists(importer="polydatum.sql", imported="polydatum.safe")
    assert graph.direct_import_exists(importer="polydatum.safe", imported="polydatum.sql_engine")
    assert graph.direct_import_exists(importer="polydatum.sql", imported="polydatum.sql_engine")
    for importer, imported in [
        ("polydatum.safe", "polydatum.sql"),
        ("polydatum.sql_engine", "polydatum.sql"),
        ("polydatum.sql_engine", "polydatum.safe"),
    ]:
        assert not graph.chain_exists(importer=importer, imported=imported), (
            f"{importer} reaches {imported}: "
            f"{' -> '.join(graph.find_shortest_chain(importer=importer, imported=imported) or ())}"
        )


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, set()),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, {frozenset({"a", "b"})}),
        ({"a": {"a"}, "b": set()}, {frozenset({"a"})}),
        (
            {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}},
            {frozenset({"a", "b", "c"}), frozenset({"d", "e"})},
        ),
    ],
)
def test_the_cycle_finder_finds_cycles(
    edges: dict[str, set[str]], expected: set[frozenset[str]]
) -> None:
    assert set(strongly_connected_components(edges)) == expected


def test_a_cycle_is_reported_as_module_chains() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b", line_number=3, line_contents="import p.b")
    graph.add_import(importer="p.b", imported="p.a", line_number=9, line_contents="import p.a")
    graph.add_import(importer="p.b", imported="p.c", line_number=4, line_contents="import p.c")
    (component,) = cycles(graph)
    assert component == {"p.a", "p.b"}
    assert chains(graph, component) == ["p.a -> p.b (line 3 of p.a) -> p.a (line 9 of p.b)"]


def test_the_layer_contracts_of_pyproject_hold() -> None:
    """``[tool.importlinter]`` in pyproject.toml: the layers, top to bottom (no import up,
    none across one layer's modules), the lifecycle free of OpenTelemetry, structlog
    and everything above it, the telemetry free of contexts, the DAL and the registry."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout


def test_the_registry_has_a_module_of_its_own_and_the_old_path_still_works() -> None:
    from polydatum import DataManager
    from polydatum.dal import DataAccessLayer as OldDal
    from polydatum.dal import DataManager as OldDataManager
    from polydatum.registry import DataManager as Registry

    assert DataManager is OldDataManager is Registry
    assert Registry.__module__ == "polydatum.registry"
    assert OldDal.__module__ == "polydatum.access"
    graph = import_graph()
    assert not graph.chain_exists(importer="polydatum.registry", imported="polydatum.dal")
