"""Every third-party module the package imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED_HERE = {"dlib": ["dlib-bin"]}
"""Optional modules whose distribution may be absent from the test venv (the ``lmd`` extra)."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(required, optional) distribution names from pyproject.toml, normalised."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}

    optional = {n for reqs in project.get("optional-dependencies", {}).values()
                for n in names(reqs)}
    return names(project["dependencies"]), optional


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module -> package files importing it (function-local included)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "se4lip_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top != "se4lip_dist" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_imported_distribution_is_declared() -> None:
    required, optional = _declared()
    by_module = md.packages_distributions()
    missing = {}
    for module, files in _imports().items():
        dists = {_norm(d) for d in by_module.get(module, NOT_INSTALLED_HERE.get(module, []))}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed here"
        # lmd.py's dlib is the optional `lmd` extra; everything else must be a dependency.
        allowed = required | optional if files == {"se4lip_dist/lmd.py"} else required
        if not dists & allowed:
            missing[module] = (sorted(dists), sorted(files))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_opencv_is_the_build_insightface_needs() -> None:
    """insightface requires opencv-python; the headless build beside it breaks cv2."""
    required, optional = _declared()
    assert "opencv-python" in required
    assert "opencv-python-headless" not in required | optional
