"""CLI output contract: with --json, stdout holds exactly one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


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


def _run_cli(code: str, *args: str, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if k not in ("SE4LIP_VERBOSE",)}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120, env=full_env)


# A command that makes the kinds of noise Ray and MLflow make: Python logging (MLflow's INFO,
# Ray Data's plans), print (raylet warnings echoed on the driver), raw writes to fd 2 (the
# core worker's C++ log lines) and a child process (Ray's own processes inherit fds 1 and 2).
NOISY = """
    import logging, os, sys
    from se4lip_dist import cli

    @cli.app.command("noisy")
    def noisy(as_json: cli.JsonOpt = False, crash: bool = False) -> None:
        cli._quiet_ray(as_json)
        logging.basicConfig()
        logging.getLogger("mlflow.store").warning("library-logging-noise")
        print("library-print-noise")
        os.write(2, b"core_worker.cc:1 E raw-fd-noise\\n")
        os.system("echo child-process-noise")
        if crash:
            raise ZeroDivisionError("crash-message")
        cli.out.print("own-output")
        if as_json:
            cli._emit_json({"ok": 1})

    sys.argv = ["se4lip-dist", *sys.argv[1:]]
    cli.main()
"""
NOISE = ("library-logging-noise", "library-print-noise", "raw-fd-noise", "child-process-noise")


def test_library_output_goes_to_a_log_file(tmp_path) -> None:
    import re
    from pathlib import Path

    res = _run_cli(NOISY, "noisy", env={"SE4LIP_LOG_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout == "own-output\n"
    logs = re.findall(r"^logs: (\S+) ", res.stderr, flags=re.M)
    assert len(logs) == 1 and not any(n in res.stderr for n in NOISE), res.stderr
    log = Path(logs[0])
    assert log.parent == tmp_path and log.name.startswith("noisy-")
    assert all(n in log.read_text() for n in NOISE)

    as_json = _run_cli(NOISY, "noisy", "--json", env={"SE4LIP_LOG_DIR": str(tmp_path)})
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"ok": 1}
    assert not any(n in as_json.stderr for n in NOISE)


def test_verbose_keeps_library_output_on_the_terminal(tmp_path) -> None:
    for args, env in ((("--verbose", "noisy"), {}), (("noisy",), {"SE4LIP_VERBOSE": "1"})):
        res = _run_cli(NOISY, *args, env={"SE4LIP_LOG_DIR": str(tmp_path), **env})
        assert res.returncode == 0, res.stderr
        both = res.stdout + res.stderr
        assert all(n in both for n in NOISE) and "own-output" in res.stdout
        assert "logs:" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_a_crash_in_quiet_mode_still_shows_its_traceback(tmp_path) -> None:
    res = _run_cli(NOISY, "noisy", "--crash", env={"SE4LIP_LOG_DIR": str(tmp_path)})
    assert res.returncode == 1
    assert "ZeroDivisionError" in res.stderr and "crash-message" in res.stderr


def test_help_shows_no_type_after_flags() -> None:
    from typer.testing import CliRunner

    from se4lip_dist.cli import app

    for args in (["--help"], ["train", "--help"], ["extract", "--help"], ["submit", "--help"]):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output, res.output
    assert "<int>" in CliRunner().invoke(app, ["train", "--help"],
                                         env={"COLUMNS": "200"}).output


def test_no_progress_bar_is_left_after_an_error(tmp_path) -> None:
    from typer.testing import CliRunner

    from se4lip_dist.cli import app

    res = CliRunner().invoke(app, ["prepare", str(tmp_path / "no-such-folder"), "--out",
                                   str(tmp_path / "shards"), "--face-backend", "none",
                                   "--workers", "0"])
    assert res.exit_code == 1
    bars = [line for line in res.output.splitlines() if line.startswith("prepare ━")]
    assert not bars and "0/0" not in res.output and "0/?" not in res.output, res.output


def test_trials_table_shows_epochs_and_the_best_so_far() -> None:
    from rich.console import Console

    from se4lip_dist.cli import _trials_table
    from se4lip_dist.tuning import TrialRow

    m = "val/offset_acc"
    rows = [TrialRow("trial-a", {"model.gru_layers": 1}, "RUNNING", 2,
                     {m: 0.5, f"best/{m}": 0.75}, best_epoch=1),
            TrialRow("trial-b", {"model.gru_layers": 2}, "TERMINATED", 4,
                     {m: 0.9, f"best/{m}": 0.9}, best_epoch=4)]
    console = Console(width=200, record=True)
    console.print(_trials_table(rows, m, "trials", epochs=4))
    text = console.export_text()
    assert "2/4" in text and "4/4" in text
    assert "best so far: trial-b, val/offset_acc 0.9 at epoch 4" in text
    console.print(_trials_table(rows, m, "trials", epochs=4, mode="min"))
    assert "best so far: trial-a" in console.export_text()


@pytest.mark.timeout(120)
def _run_in_pty(code: str, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -c code args`` with a terminal as stdin, stdout and stderr."""
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm",
                                                             **env}, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_live_displays_on_a_terminal_keep_library_output_in_the_log(tmp_path) -> None:
    # rich's live displays catch sys.stdout/sys.stderr while they run and print it on the
    # terminal; the quickstart's view runs for minutes while Ray prints worker output.
    code = NOISY.replace('''    @cli.app.command("noisy")''', '''    @cli.app.command("noisy-live")
    def noisy_live() -> None:
        cli._quiet_ray(False)
        view = cli._QuickstartView(4)
        view.step("step-title")
        print("library-print-noise")
        sys.stderr.write("library-stderr-noise\\n")
        view.note("own-note")
        view.close()

    @cli.app.command("noisy")''')
    rc, output = _run_in_pty(code, "noisy-live", env={"SE4LIP_LOG_DIR": str(tmp_path)})
    assert rc == 0, output
    assert "step-title" in output and "own-note" in output and "logs: " in output
    assert "library-print-noise" not in output and "library-stderr-noise" not in output, output
    log = next(tmp_path.iterdir()).read_text()
    assert "library-print-noise" in log and "library-stderr-noise" in log


# --- options that set config keys are declared once, from config.py ----------------------

# Options whose flag matches a config key's name but mean something else.
NOT_CONFIG_KEYS = {
    ("extract", "--batch-size"): "windows per encoder call, not training pairs per step",
}


def _cli_options() -> list[tuple[str, object]]:
    import typer.core
    import typer.main

    from se4lip_dist import cli

    def walk(group: object, prefix: str = "") -> list[tuple[str, object]]:
        found = []
        for name, cmd in group.commands.items():  # type: ignore[attr-defined]
            if hasattr(cmd, "commands"):
                found += walk(cmd, f"{prefix}{name} ")
            else:
                found += [(prefix + name, p) for p in cmd.params
                          if isinstance(p, typer.core.TyperOption)]
        return found

    return walk(typer.main.get_command(cli.app))


def test_every_option_named_after_a_config_key_is_that_key() -> None:
    from dataclasses import fields

    from se4lip_dist import cli
    from se4lip_dist.config import _SECTIONS

    keys = {f"{s}.{f.name}": f.name for s, cls in _SECTIONS.items() for f in fields(cls)}
    by_name: dict[str, set[str]] = {}
    for key, name in keys.items():
        by_name.setdefault(name, set()).add(key)
    hand_made = []
    for command, opt in _cli_options():
        flag = max(opt.opts, key=len).removeprefix("--").replace("-", "_")
        section, _, leaf = flag.partition("_")
        named = by_name.get(flag, set()) | ({f"{section}.{leaf}"} & set(keys))
        if not named or (command, max(opt.opts, key=len)) in NOT_CONFIG_KEYS:
            continue
        if cli.KEY_OPTIONS.get(opt.name) not in named:
            hand_made.append(f"{command} {opt.opts} (config: {sorted(named)})")
    assert not hand_made, "declare these with _key_opt so the key exists once:\n" + "\n".join(
        hand_made)


def test_key_options_match_the_config_types_and_docs() -> None:
    import types
    import typing
    from pathlib import Path

    from se4lip_dist import cli
    from se4lip_dist.config import key_doc, key_hint

    def plain(hint: object) -> set[object]:
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        return {str if a is Path else a for a in args if a is not type(None)}

    checked = 0
    for command, opt in _cli_options():
        key = cli.KEY_OPTIONS.get(opt.name)
        if key is None or opt.name not in _annotations(command):
            continue
        declared = _annotations(command)[opt.name]
        assert plain(declared) == plain(key_hint(key)), (command, opt.opts, declared, key)
        assert key_doc(key) and key_doc(key) in opt.help and key in opt.help, (command, opt.help)
        checked += 1
    assert checked >= 15


def _annotations(command: str) -> dict[str, object]:
    import typing

    from se4lip_dist import cli

    fn = getattr(cli, command.replace("-", "_").split()[-1], None)
    if fn is None:
        return {}
    hints = typing.get_type_hints(fn, vars(cli), include_extras=True)
    return {k: typing.get_args(v)[0] if typing.get_origin(v) is typing.Annotated else v
            for k, v in hints.items()}


def test_key_option_values_become_config_overrides(tmp_path) -> None:
    from se4lip_dist import cli

    sets = cli._key_sets(epochs=3, split="time", init=None, insightface_root=tmp_path)
    assert sets == ["train.epochs=3", "train.split=time",
                    f"face.insightface_root={tmp_path.resolve()}"]
    cfg = cli._config("cpu-small", None, [], sets)
    assert (cfg.train.epochs, cfg.train.split) == (3, "time")
    assert cfg.face.insightface_root == str(tmp_path.resolve())


@pytest.mark.parametrize("argv", [
    ["prepare", "x.mp4", "--out", "o"], ["train", "--data", "d"], ["tune", "--data", "d"],
    ["extract", "x.wav"], ["evaluate", "x.mp4"], ["subject", "x.mp4", "--out", "o"],
    ["quickstart"], ["audit", "shards"],
])
def test_quiet_settings_come_before_ray_and_mlflow_are_imported(argv: list[str]) -> None:
    # Ray Data reads RAY_DATA_DISABLE_PROGRESS_BARS when it is imported: a stage module
    # imported before the quiet settings would keep its progress bars on.
    code = textwrap.dedent(f"""
        import sys
        from se4lip_dist import cli

        def record(*args, **kwargs):
            loaded = [m for m in ("ray.data", "ray.train", "mlflow") if m in sys.modules]
            print("LOADED", loaded)
            raise SystemExit(0)

        cli._quiet_ray = record
        sys.argv = ["se4lip-dist", *{argv!r}]
        cli.main()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in res.stdout + res.stderr, res.stdout + res.stderr


def test_ranked_table_shows_costs_and_the_front(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    from se4lip_dist import cli

    rec = Console(width=250, record=True)
    monkeypatch.setattr(cli, "out", rec)
    monkeypatch.setattr(cli, "console", rec)
    m = "val/offset_acc"
    trials = [{"trial": "trial-a", "status": "DONE", "epoch": 1, "best_epoch": 1,
               "params": {"model.gru_layers": 1}, m: 0.8, "cost/gflop_per_audio_s": 0.0099,
               "cost/rtf": 0.0004},
              {"trial": "trial-b", "status": "DONE", "epoch": 1, "best_epoch": 1,
               "params": {"model.gru_layers": 2}, m: 0.7, "cost/gflop_per_audio_s": 0.0114,
               "cost/rtf": 0.0007}]
    cli._render_ranked({"metric": m, "mode": "max", "name": "t", "trials": trials,
                        "front": trials[:1], "best": {"trial": "trial-a"}, "stopped_early": 0,
                        "wall_s": 1.0, "tracking_uri": "sqlite:///x.db",
                        "registered": {"name": "n", "version": 1, "alias": "champion",
                                       "reason": "r"}})
    lines = rec.export_text().splitlines()
    a = next(line for line in lines if "trial-a" in line and "0.0099" in line)
    b = next(line for line in lines if "trial-b" in line and "0.0114" in line)
    assert a.rstrip(" │|").endswith("*") and not b.rstrip(" │|").endswith("*")
