"""The README's module map: every module of the package, in an order imports respect."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> list[list[str]]:
    """Names in the first column of each row of the README's module map."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| module (`se4lip_dist/`) | owns |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([n.rstrip("/") for n in re.findall(r"`([^`]+)`", line.split("|")[1])])
    return rows


def _module_map() -> set[str]:
    return {name for row in _rows() for name in row}


def _imported(path: Path) -> set[str]:
    """Package modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "se4lip_dist":
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("se4lip_dist.")}
    return found


def test_readme_module_map_matches_the_package() -> None:
    listed = _module_map()
    pkg = ROOT / "se4lip_dist"
    modules = {p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    modules |= {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    listed_files = {name for name in listed if "*" not in name}
    assert modules - listed_files == set(), "modules missing from the README's map"
    assert {n for n in listed_files if not (pkg / n).exists()} == set(), "mapped but absent"


def test_modules_import_only_their_own_or_earlier_rows() -> None:
    pkg = ROOT / "se4lip_dist"
    row_of = {name.removesuffix(".py"): i for i, row in enumerate(_rows()) for name in row
              if "*" not in name}
    later = []
    for name, i in row_of.items():
        files = [pkg / f"{name}.py"] if (pkg / f"{name}.py").exists() else (pkg / name).glob("*.py")
        for f in files:
            for dep in _imported(f) & set(row_of):
                if row_of[dep] > i:
                    later.append(f"{f.relative_to(ROOT)} imports {dep} (a later row)")
    assert not later, "\n".join(later)


def test_no_import_cycle_inside_the_package() -> None:
    """Modules of one row may import each other, but never in a circle."""
    pkg = ROOT / "se4lip_dist"
    deps: dict[str, set[str]] = {}
    for f in pkg.rglob("*.py"):
        name = f.relative_to(pkg).parts[0].removesuffix(".py")
        deps.setdefault(name, set()).update(_imported(f) - {name})

    def reaches(start: str, node: str, seen: set[str]) -> list[str] | None:
        for dep in sorted(deps.get(node, ())):
            if dep == start:
                return [node, dep]
            if dep not in seen:
                seen.add(dep)
                path = reaches(start, dep, seen)
                if path:
                    return [node, *path]
        return None

    cycles = [" -> ".join(path) for m in sorted(deps) if (path := reaches(m, m, set()))]
    assert not cycles, "\n".join(cycles)
