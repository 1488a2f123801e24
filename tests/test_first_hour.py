"""What a new user meets: the README's first commands, the quickstart's output and the
follow-up commands it prints, run exactly as printed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SE4LIP = Path(sys.executable).with_name("se4lip-dist")


def _first_block(readme: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_two_commands_that_need_no_activated_venv() -> None:
    readme = (ROOT / "README.md").read_text()
    install, tests = _first_block(readme)
    assert tests == "bash .ci/run"
    # Every program after the venv exists is the venv's own (a fresh shell has no se4lip-dist).
    steps = [shlex.split(step) for step in install.split("&&")]
    assert steps[0][:3] == ["python3.11", "-m", "venv"]
    assert all(step[0].startswith(".venv/bin/") for step in steps[1:]), install
    assert steps[-1][:2] == [".venv/bin/se4lip-dist", "quickstart"]
    # Sections below use bare commands: the README says once how to get them on PATH.
    intro = readme[:readme.index("## Data flow")]
    assert "source .venv/bin/activate" in intro


def _result(tmp_path: Path) -> dict:
    """A quickstart result with paths long enough to wrap at 80 columns, one with a space."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "with space"
    store = deep / "se4lip-runs" / "mlflow.db"
    return {
        "shards": str(deep / "shards"), "model_uri": "models:/se4lip-quickstart/1",
        "alias": "champion", "reason": "first version above chance", "features":
        str(deep / "features"), "model_name": "se4lip-quickstart",
        "heldout": [str(deep / "heldout" / f"syn_{i:05d}.mp4") for i in range(4)],
        "evaluate_flags": ["--face-backend", "none"], "tracking_uri": f"sqlite:///{store}",
        "consistent": 4, "evaluated": 4,
    }


def test_follow_up_commands_split_back_into_their_arguments(tmp_path: Path) -> None:
    from se4lip_dist.quickstart import follow_up_commands

    res = _result(tmp_path)
    listed, shown, evaluate = (shlex.split(c) for c in follow_up_commands(res, "/x y/se4lip-dist"))
    uri = ["--tracking-uri", res["tracking_uri"]]
    assert listed == ["/x y/se4lip-dist", "models", "list", *uri]
    assert shown == ["/x y/se4lip-dist", "models", "show", "se4lip-quickstart", *uri]
    assert evaluate == ["/x y/se4lip-dist", "evaluate", *res["heldout"], "--model",
                        res["model_uri"], *uri, "--face-backend", "none", "--shift", "-3",
                        "--shift", "0", "--shift", "3"]


def test_quickstart_summary_is_not_wrapped_when_stdout_is_a_pipe(tmp_path: Path) -> None:
    from se4lip_dist.quickstart import follow_up_commands

    res = _result(tmp_path)
    code = textwrap.dedent(f"""
        from se4lip_dist import cli
        cli._print_quickstart_summary({res!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    printed = [line.strip() for line in lines[lines.index("next:") + 1:]]
    assert printed == follow_up_commands(res, str(SE4LIP))
    assert min(len(line) for line in printed) > 80  # long enough that wrapping would show
    ui = next(line for line in lines if line.startswith("MLflow UI: "))
    assert ui.endswith(f"ui --backend-store-uri {res['tracking_uri']}")
    assert f"shards:    {res['shards']}" in lines


def test_extract_run_name_says_what_ran() -> None:
    from se4lip_dist.extract import run_name

    model = {"uri": "models:/se4lip@champion", "name": "se4lip", "version": 3}
    assert run_name(model, "/data/features/") == "extract se4lip v3 -> features"
    run = run_name({"uri": "runs:/abc/model"}, "s3://b/feats")
    assert run == "extract runs:/abc/model -> feats"


def test_default_experiment_keeps_its_artifacts_beside_the_store(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from mlflow import MlflowClient

    from se4lip_dist.tracking import ensure_experiment

    monkeypatch.chdir(tmp_path)  # MLflow's default would be ./mlruns/0 here
    store = tmp_path / "runs" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    ensure_experiment(uri, "se4lip")
    default = MlflowClient(tracking_uri=uri).get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location == (store.parent / "artifacts" / "0").as_uri()


def _follow_ups(output: str) -> list[str]:
    lines = output.splitlines()
    start = lines.index("next:") + 1
    return [line.strip() for line in lines[start:] if line.startswith("  ")]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quickstart_then_its_follow_ups_as_printed(tmp_path: Path) -> None:
    """README line 1 (minus the install) in an empty folder, then every printed command."""
    from mlflow import MlflowClient

    env = {**os.environ, "SE4LIP_LOG_DIR": str(tmp_path / "logs")}
    env.pop("SE4LIP_VERBOSE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    qs = subprocess.run([str(SE4LIP), "quickstart"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=2000, env=env)
    output = qs.stdout + qs.stderr
    assert qs.returncode == 0, output

    # One screen, no library chatter: that went to the log file named on the first line.
    lines = output.splitlines()
    assert len(lines) <= 40, output
    noise = re.compile(r"\bINFO\b|\bWARNING\b|core_worker|raylet|\x1b\[|View run|Failed to "
                       r"convert|%\|")
    assert not [line for line in lines if noise.search(line)], output
    log = Path(re.findall(r"^logs: (\S+) ", qs.stderr, flags=re.M)[0])
    assert log.is_relative_to(tmp_path / "se4lip-quickstart") and log.stat().st_size > 0

    ui = next(line for line in qs.stdout.splitlines() if line.startswith("MLflow UI: "))
    assert os.access(shlex.split(ui.removeprefix("MLflow UI: "))[0], os.X_OK), ui

    commands = _follow_ups(qs.stdout)
    assert [shlex.split(c)[1:3][: 2 if i < 2 else 1] for i, c in enumerate(commands)] == [
        ["models", "list"], ["models", "show"], ["evaluate"]]
    elsewhere = tmp_path / "elsewhere"  # they must not depend on the folder they run in
    elsewhere.mkdir()
    for command in commands:
        run = subprocess.run(shlex.split(command), cwd=elsewhere, capture_output=True,
                             text=True, timeout=900, env=env)
        assert run.returncode == 0, (command, run.stdout + run.stderr)
        assert "se4lip-quickstart" in run.stdout, (command, run.stdout)
    assert not (elsewhere / "se4lip-runs").exists()

    # The extract run says what it is; the store's Default experiment sits beside it.
    uri = shlex.split(commands[0])[-1]
    client = MlflowClient(tracking_uri=uri)
    extract = client.get_experiment_by_name("se4lip-extract")
    names = [r.info.run_name for r in client.search_runs([extract.experiment_id])]
    assert names and all(n.startswith("extract se4lip-quickstart v") for n in names), names
    store = Path(uri.removeprefix("sqlite:///"))
    assert client.get_experiment("0").artifact_location.startswith(store.parent.as_uri())


def test_a_venv_symlink_is_ignored_too() -> None:
    """Worktrees share one environment through a ``.venv`` symlink. ``.venv/`` matches only a
    directory, so ``git add -A`` committed the symlink, and checking that commit out over a
    real ``.venv`` (ignored, hence expendable to git) replaced the environment with the link."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    # --no-index with a path git cannot see as a directory: what a symlink looks like to git.
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", ".venv"], cwd=ROOT)
    assert done.returncode == 0, ".venv (a symlink) is not ignored: see .gitignore"
