"""The house rules, checked by reading the source: the package's import graph has no cycle (function-level
imports included), no module imports another module's private name, no package file is over 700 lines, and
only ``fusedrl/_config.py`` names the ``FUSEDRL_*`` environment variables."""

from __future__ import annotations

import ast
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "fusedrl"
MAX_LINES = 700


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, path: pathlib.Path):
    """(target module, imported name or None, line) of every import of the package in ``mod``, at any depth."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fusedrl":
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node, is_pkg)
            if target.split(".")[0] != "fusedrl":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno)


def _graph() -> dict[str, set[str]]:
    g = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, _, _ in _imports(mod, path):
            if target in MODULES and target != mod:
                g[mod].add(target)
    return g


def test_no_import_cycle():
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, name, line in _imports(mod, path):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{name}")
            elif (
                name is None
                and target.rsplit(".", 1)[-1].startswith("_")
                and target not in ("fusedrl._config", "fusedrl._validate", "fusedrl._measure", "fusedrl._C")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports private module {target}")
    assert not bad, "\n".join(bad)


def test_package_files_at_most_700_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not big, f"package files over {MAX_LINES} lines: {big}"


def test_environment_read_in_one_module():
    """Only fusedrl/_config.py names FUSEDRL_ variables or touches os.environ / os.getenv."""
    hits = []
    for path in PKG.rglob("*"):
        if path.is_dir() or path.suffix not in (".py", ".json", ".cpp", ".cu", ".h") or path.name == "_config.py":
            continue
        if path.name == "_build_info.json":  # written at install time, not tracked
            continue
        text = path.read_text(errors="replace")
        for token in ("FUSEDRL_", "os.environ", "os.getenv"):
            if token in text:
                hits.append(f"{path.relative_to(ROOT)}: {token}")
    assert not hits, "\n".join(hits)


def test_nothing_points_outside_the_repository():
    """No file of the repository cites a design document that is not in it."""
    hits = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_dir() or rel.parts[0] in (".git", "build", ".whl", ".out") or "results" in rel.parts:
            continue
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".txt", ".h", ".cu", ".cpp") and path.name != "run":
            continue
        if rel == pathlib.Path(__file__).relative_to(ROOT):
            continue
        text = path.read_text(errors="replace")
        for token in ("DESIGN.md", "../shared"):
            if token in text:
                hits.append(f"{rel}: {token}")
    assert not hits, "\n".join(hits)


def _text_files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_dir() or rel.parts[0] in (".git", "build", ".whl", ".out") or "results" in rel.parts:
            continue
        if path.suffix in (".py", ".md", ".sh", ".toml", ".txt", ".h", ".cu", ".cpp"):
            yield rel, path.read_text(errors="replace")


def test_referenced_repository_paths_exist():
    """Every ``tests/...py``, ``docs/...md``, ``bench/...`` or ``fusedrl/...py`` path a file names exists
    (moves leave no stale pointers behind)."""
    import re

    pat = re.compile(r"(?<![\w/.])((?:tests|docs|bench|fusedrl|csrc)/[\w/]+\.(?:py|md|sh|h|cu|cpp|json))")
    hits = []
    for rel, text in _text_files():
        for m in set(pat.findall(text)):
            if not (ROOT / m).exists():
                hits.append(f"{rel}: {m}")
    assert not hits, "\n".join(sorted(hits))


if __name__ == "__main__":  # print the graph
    for m, deps in sorted(_graph().items()):
        print(m, "->", ", ".join(sorted(deps)))
    print(os.linesep.join(f"{k}" for k in MODULES))
