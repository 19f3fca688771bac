"""The shape of the code: imports run one way (no cycle, at most 5 modules deep) and the tools (tools/: the memory
plan, the benchmark, the transfer set) stay out of the five design-card files' module-level imports.

    python tests/test_shape.py      # prints the import graph, each module's longest chain, and the line counts
"""
import ast
import math
import shutil
import subprocess
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


ONE_STEP = """
import sys, torch
import latro, model
policy, tokenizer = model.load(sys.argv[1], "cpu", torch.float32)
reference, _ = model.load(sys.argv[1], "cpu", torch.float32)
cfg = latro.LatroConfig(num_samples=2, max_rationale_tokens=6)
prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("What is 4 + 4?")]
ro = latro.sample(policy, tokenizer, prompts, ["The answer is 5.", "The answer is 8."], cfg, seeds=[0, 1])
terms = latro.compute_advantages(policy, reference, ro, cfg)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
before = [p.detach().clone() for p in policy.parameters()]
policy.train()
losses = latro.backward_on_rollout(policy, ro, terms.advantages, cfg)
optimizer.step()
moved = sum(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))
here = sorted(m for m in sys.modules if m in ("data", "eval", "parallel", "rundir", "train", "tools"))
print(ro.tokens.shape[0], moved, losses["loss"], here)
"""


def test_latro_and_model_alone_run_a_step(tiny_llama_dir, tmp_path):
    """The copy-paste property: latro.py and model.py copied alone into an empty folder run one LaTRO step (sample,
    score, backward, optimizer step) on a checkpoint, and import nothing else of the product."""
    for f in ("latro.py", "model.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "step.py").write_text(ONE_STEP)
    p = subprocess.run([sys.executable, "step.py", tiny_llama_dir], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    rows, moved, loss, here = p.stdout.split(maxsplit=3)
    assert int(rows) == 4 and int(moved) > 0 and here.strip() == "[]", p.stdout
    assert math.isfinite(float(loss))


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
