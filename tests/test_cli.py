"""CLI output contract: with --json, stdout holds exactly one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_json_mode_keeps_child_process_output_off_stdout() -> None:
    # Ray's raylet and Tune write to the inherited fd 1, not to sys.stdout; a child process
    # writing to fd 1 stands in for them here.
    code = textwrap.dedent("""
        import os, sys
        from se4lip_dist import cli

        @cli.app.command("noisy")
        def noisy(as_json: cli.JsonOpt = False) -> None:
            import atexit
            atexit.register(print, "atexit-noise")  # as MLflow's "View run" lines
            os.system("echo raylet-noise")
            print("python-noise")
            cli._emit_json({"ok": 1, "nan": float("nan")})

        sys.argv = ["se4lip-dist", "noisy", "--json"]
        cli.main()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"ok": 1, "nan": None}
    assert all(n in res.stderr for n in ("raylet-noise", "python-noise", "atexit-noise"))


def test_without_json_stdout_is_untouched() -> None:
    code = textwrap.dedent("""
        import os, sys
        from se4lip_dist import cli

        @cli.app.command("noisy")
        def noisy() -> None:
            os.system("echo child-line")

        sys.argv = ["se4lip-dist", "noisy"]
        cli.main()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "child-line\n"


def test_console_script_goes_through_main() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    # `app` directly would skip the --json stdout handling in `main`.
    assert pyproject["project"]["scripts"]["se4lip-dist"] == "se4lip_dist.cli:main"
