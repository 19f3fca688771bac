"""The shape of the code: imports run one way (no cycle, at most 5 modules deep) and the tools (tools/: the memory
plan, the benchmark, the transfer set) stay out of the five design-card files' module-level imports.

    python tests/test_shape.py      # prints the import graph, each module's longest chain, and the line counts
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("model", "data", "latro", "eval", "train")  # the design card's five files


def modules():
    """{name: path} of the product: the top-level modules and tools/*.py (as "tools.name")."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found |= {f"tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py")}
    return found


def imports(path, names, top_level_only=False):
    """The product modules `path` imports: anywhere in it, or only in statements at module level."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return sorted(found & set(names) - {path.stem})


def graph(top_level_only=False):
    names = modules()
    return {m: imports(p, names, top_level_only) for m, p in names.items()}


def longest_chain(g, m, seen=()):
    if m in seen:
        raise AssertionError(f"import cycle: {' -> '.join(seen + (m,))}")
    return [m] + max((longest_chain(g, d, seen + (m,)) for d in g[m]), key=len, default=[])


def test_imports_run_one_way_at_most_five_deep():
    g = graph()
    chains = {m: longest_chain(g, m) for m in g}  # raises on a cycle, naming it
    deepest = max(chains.values(), key=len)
    assert len(deepest) <= 5, " -> ".join(deepest)


def test_the_core_never_imports_a_tool_at_module_level():
    g = graph(top_level_only=True)
    for m in CORE:
        assert not [d for d in g[m] if d.startswith("tools")], (m, g[m])


if __name__ == "__main__":
    g, top = graph(), graph(top_level_only=True)
    for m in sorted(g, key=lambda m: (len(longest_chain(g, m)), m)):
        lazy = sorted(set(g[m]) - set(top[m]))
        print(f"{m:<16} imports {', '.join(top[m]) or '-'}" + (f"; inside functions: {', '.join(lazy)}" if lazy else "")
              + f"  | longest chain: {' -> '.join(longest_chain(g, m))}")
    lines = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    print(f"lines: {sum(lines.values())} in all, {sum(lines[m] for m in CORE)} in the five design-card files; " +
          ", ".join(f"{m} {n}" for m, n in sorted(lines.items(), key=lambda kv: -kv[1])))
    sys.exit(0)
