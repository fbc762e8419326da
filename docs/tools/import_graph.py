"""The package graph of bype, read from the imports of its source (so docs/ARCHITECTURE.md stays true).

  python docs/tools/import_graph.py            print the Mermaid diagram and any upward import
  python docs/tools/import_graph.py --check    exit 1 when ARCHITECTURE.md's diagram is stale or an import points up

Nodes are the packages (and the single-module utilities) under bype/, plus the standalone `kernels`.
An edge A --> B means some module of A imports B (at module level or inside a function); the picture leaves
out the arrows a longer path already implies. LAYERS lists the nodes bottom-up: an import may only point to
a lower layer or within a node.
"""
from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = [
    ["kernels"],
    ["seeds", "atomic", "memory", "device_sync", "config"],
    ["parallel"],
    ["models"],
    ["data"],
    ["coreset"],
    ["eval"],
    ["train"],
    ["bench"],
    ["experiment"],
    ["cli"],
]
LEVEL = {node: i for i, layer in enumerate(LAYERS) for node in layer}
BEGIN, END = "<!-- import-graph: begin -->", "<!-- import-graph: end -->"


def node_of(module: str) -> str | None:
    """'bype.coreset.posterior' -> 'coreset'; 'kernels.mixture' -> 'kernels'; others None."""
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] == "bype" and len(parts) > 1:
        return parts[1]
    return None


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def imports(path: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    tree = ast.parse(open(path).read(), path)
    here = module_name(path).split(".")
    package = here if path.endswith("__init__.py") else here[:-1]
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = package[: len(package) - n.level + 1] if n.level else []
            mod = ".".join(base + ([n.module] if n.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in n.names)  # `from bype import checkpoint`
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for top in ("bype", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                src = node_of(module_name(path))
                if src is None or src == "__init__":
                    continue
                for target in filter(None, (node_of(m) for m in imports(path))):
                    if target != src and target in LEVEL:
                        edges.setdefault(src, set()).add(target)
    return edges


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if LEVEL.get(a, 99) <= LEVEL[b])


def reduction(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The edges no longer path implies (the transitive reduction of an acyclic graph): the picture's arrows."""
    def reach(a: str, skip: tuple) -> set[str]:
        seen, todo = set(), [b for b in edges.get(a, ()) if (a, b) != skip]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += edges.get(n, ())
        return seen
    return {a: {b for b in bs if b not in reach(a, (a, b))} for a, bs in edges.items()}


def mermaid(edges: dict[str, set[str]]) -> str:
    lines = ["```mermaid", "flowchart TD"]
    kept = reduction(edges)
    for a in sorted(kept, key=lambda n: (-LEVEL[n], n)):
        lines += [f"  {a} --> {b}" for b in sorted(kept[a], key=lambda n: (-LEVEL[n], n))]
    lines.append("```")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    edges = graph()
    diagram = mermaid(edges)
    bad = upward(edges)
    if "--check" not in argv:
        print(diagram)
        for e in bad:
            print(f"upward import: {e}", file=sys.stderr)
        return 0
    doc = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), doc, re.S)
    stale = m is None or m.group(1).strip() != diagram.strip()
    if stale:
        print("docs/ARCHITECTURE.md: the package diagram is stale; regenerate it with "
              "`python docs/tools/import_graph.py`", file=sys.stderr)
    for e in bad:
        print(f"upward import: {e}", file=sys.stderr)
    return 1 if stale or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
