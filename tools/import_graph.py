"""The import graph of streamer, read with `ast`: cycles, imports against the layers, borrowed privates.

    python tools/import_graph.py          # prints the problems; exit 1 when there are any
    python tools/import_graph.py --edges  # also prints every edge, layer by layer

Every import counts, including those inside functions (a lazy import still ties the modules).
The layers, lowest first; a module imports only from its own layer or below:

    0  streamer.errors, streamer.formats           words and facts every layer uses
    1  streamer.io.*                               bytes in and out: sources, sinks, the Hub
    2  streamer.quant.*                            the math
    3  streamer.engine.*                           the stages of a conversion
    4  streamer.cli.*, streamer.mirror.*,          the front ends
       streamer.web.*, streamer.compat, app
    -  streamer.localhub.*                         a stand-in Hub for tests and demos: imports
                                                   nothing of streamer outside itself

`streamer/__init__.py` is exempt: it is the public API, resolving `convert` and friends lazily.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("streamer.errors", 0), ("streamer.formats", 0),
    ("streamer.io", 1), ("streamer.quant", 2), ("streamer.engine", 3),
    ("streamer.cli", 4), ("streamer.mirror", 4), ("streamer.web", 4), ("streamer.compat", 4), ("app", 4),
]  # fmt: skip
EXEMPT = {"streamer", "streamer.__main__"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package (and the Space's app.py), by dotted name."""
    mods = {"app": root / "app.py"} if (root / "app.py").exists() else {}
    for path in sorted((root / "streamer").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, name imported from it or "", line) for each streamer import in PATH."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("streamer", "app"):
                    found.append((a.name, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node.level, node.module)
            if target.split(".")[0] not in ("streamer", "app"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # `from pkg import submodule`
                    found.append((sub, "", node.lineno))
                else:
                    found.append((target, a.name, node.lineno))
    return found


def layer(module: str) -> int | None:
    best = None
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, n)
    return best[1] if best else None


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """The edges between modules, and the problems: upward imports, borrowed privates, localhub leaks."""
    files = module_files(root)
    known = set(files)
    edges: dict[str, set[str]] = {m: set() for m in files}
    problems = []
    for mod, path in files.items():
        for target, name, line in imports(mod, path, known):
            if target not in known:
                problems.append(f"{mod}:{line} imports {target}, which does not exist")
                continue
            if target != mod and mod not in EXEMPT:  # the public API's lazy exports tie nothing
                edges[mod].add(target)
            where = f"{path.relative_to(root)}:{line}"
            if name.startswith("_") and not name.startswith("__") and target != mod:
                problems.append(f"{where}: borrows the private name {name} from {target}")
            if mod in EXEMPT:
                continue
            in_hub, to_hub = mod.startswith("streamer.localhub"), target.startswith("streamer.localhub")
            if in_hub and not to_hub:
                problems.append(f"{where}: localhub imports {target} (it must stand alone)")
            lo, hi = layer(target), layer(mod)
            if lo is not None and hi is not None and lo > hi:
                problems.append(f"{where}: {mod} (layer {hi}) imports {target} from above (layer {lo})")
            if hi is None and not in_hub:
                problems.append(f"{where}: {mod} is in no layer: add it to LAYERS")
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    edges, problems = graph()
    found = cycles(edges)
    if "--edges" in argv:
        for mod in sorted(edges, key=lambda m: (layer(m) if layer(m) is not None else -1, m)):
            print(f"[{layer(mod)}] {mod} -> {', '.join(sorted(edges[mod])) or '-'}")
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    for p in problems:
        print(p)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycles, {len(problems)} other problems")
    return 1 if found or problems else 0


if __name__ == "__main__":
    sys.exit(main())
