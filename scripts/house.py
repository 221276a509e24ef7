"""The house, measured: the import rules the layout promises, and the sizes of its largest parts.

    .venv/bin/python scripts/house.py            # a markdown report; exit 1 if a rule is broken

Rules (README, Layout):
- no import cycle among the modules of daemon/ (every import counts: at the top, in a function, or
  under TYPE_CHECKING, since each is a dependency a reader has to follow);
- no `*_pb2` import in daemon/ outside api/ (the servicers) and server.py;
- ctl/ imports from mvllmd only its public in-process entry point (PUBLIC); what the CLI and the
  daemon share lives in the `mvllm` package, which imports neither;
- aiohttp is not imported by daemon/.

Sizes, as a guide rather than a rule: the largest class and module of daemon/, with their line counts,
and the median and 90th percentile of its functions' lengths. Reads the source with `ast`; imports
nothing it measures, so it runs in well under a second.
"""

from __future__ import annotations

import ast
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mvllmd": ROOT / "daemon", "mvllmctl": ROOT / "ctl", "mvllm": ROOT / "protos", "mvllm_sim": ROOT / "sim"}
PUBLIC = {"mvllmd.local"}  # what ctl/ may import of the daemon: `generate-rollouts` without mvllmd
PB2_ALLOWED = ("mvllmd.api", "mvllmd.server")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def modules(package: str) -> list[Module]:
    base = PACKAGES[package]
    found = []
    for path in sorted((base / package).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        parts = path.relative_to(base).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text()
        found.append(Module(name, path, ast.parse(text, str(path)), len(text.splitlines())))
    return found


def imported(module: Module) -> Iterator[str]:
    """Every module name an import statement of `module` names (relative imports resolved)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if module.is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`


def graph(mods: list[Module]) -> dict[str, set[str]]:
    names = {m.name for m in mods}
    edges: dict[str, set[str]] = {m.name: set() for m in mods}
    for m in mods:
        for target in imported(m):
            if target in names and target != m.name and not m.name.startswith(target + "."):
                edges[m.name].add(target)  # a package's own __init__ is not a dependency of its modules
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def offenders(mods: list[Module], wanted: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """Modules outside `allowed` that import something whose name starts with `wanted` (or matches it)."""
    bad = []
    for m in mods:
        if m.name.startswith(allowed) and allowed:
            continue
        hits = _shortest({t for t in imported(m) if _matches(t, wanted)})
        if hits:
            bad.append(f"{m.name} ({', '.join(hits)})")
    return bad


def _shortest(hits: set[str]) -> list[str]:
    """The hits without those another hit names a parent of (`a.b`, not also `a.b.name`)."""
    return sorted(h for h in hits if not any(h.startswith(o + ".") for o in hits))


def _matches(name: str, wanted: str) -> bool:
    if wanted == "*_pb2":
        return any(part.endswith(("_pb2", "_pb2_grpc")) for part in name.split("."))
    return name == wanted or name.startswith(wanted + ".")


def ctl_imports_of_daemon(ctl: list[Module]) -> list[str]:
    bad = []
    for m in ctl:
        hits = [h for h in _shortest({t for t in imported(m) if _matches(t, "mvllmd")})
                if h not in PUBLIC and not h.startswith(tuple(p + "." for p in PUBLIC))]  # fmt: skip
        if hits:
            bad.append(f"{m.name} ({', '.join(hits)})")
    return bad


def shared_imports(shared: list[Module]) -> list[str]:
    bad = []
    for m in shared:
        hits = _shortest({t for t in imported(m) if _matches(t, "mvllmd") or _matches(t, "mvllmctl")})
        if hits:
            bad.append(f"{m.name} ({', '.join(hits)})")
    return bad


def sizes(mods: list[Module]) -> tuple[tuple[str, int], tuple[str, int], list[int]]:
    classes: list[tuple[str, int]] = []
    functions: list[int] = []
    for m in mods:
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ClassDef):
                classes.append((f"{m.name}.{node.name}", _length(node)))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append(_length(node))
    largest_class = max(classes, key=lambda c: c[1])
    largest_module = max(((m.name, m.lines) for m in mods), key=lambda c: c[1])
    return largest_class, largest_module, functions


def _length(node: ast.AST) -> int:
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])  # type: ignore[attr-defined]
    return int(node.end_lineno) - start + 1  # type: ignore[attr-defined]


def main() -> int:
    daemon, ctl, shared = modules("mvllmd"), modules("mvllmctl"), modules("mvllm")
    rules = [
        ("no import cycle in daemon/", [" -> ".join(c) for c in cycles(graph(daemon))]),
        ("no `*_pb2` import in daemon/ outside api/ and server.py", offenders(daemon, "*_pb2", PB2_ALLOWED)),
        (f"ctl/ imports of mvllmd: only {', '.join(sorted(PUBLIC))}", ctl_imports_of_daemon(ctl)),
        ("the shared package `mvllm` imports neither mvllmd nor mvllmctl", shared_imports(shared)),
        ("aiohttp is not imported by daemon/", offenders(daemon, "aiohttp")),
    ]
    largest_class, largest_module, functions = sizes(daemon)
    print("| rule | holds | where it does not |")
    print("|---|---|---|")
    for rule, bad in rules:
        print(f"| {rule} | {'yes' if not bad else 'NO'} | {'; '.join(bad) or '-'} |")
    print()
    print("| measure (daemon/) | value |")
    print("|---|---|")
    print(f"| modules | {len(daemon)}, {sum(m.lines for m in daemon):,} lines |")
    print(f"| largest module | {largest_module[0]}: {largest_module[1]} lines |")
    print(f"| largest class | {largest_class[0]}: {largest_class[1]} lines |")
    deciles = statistics.quantiles(functions, n=10)
    print(f"| functions | {len(functions)}: median {statistics.median(functions):g} lines, "
          f"90th percentile {deciles[-1]:g} |")  # fmt: skip
    return 1 if any(bad for _, bad in rules) else 0


if __name__ == "__main__":
    sys.exit(main())
