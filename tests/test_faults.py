"""Injected faults and security defaults (issue 7).

- a Ray Train worker SIGKILLed mid-epoch: the run restarts from its last checkpoint and every
  epoch is logged exactly once;
- an ``extract`` job SIGKILLed after its first finished input: the rerun keeps the finished
  outputs byte for byte and completes the rest (the tune driver kill lives in test_tune.py);
- an unreachable MLflow server: ``train``, ``tune``, ``extract`` fail fast, before Ray starts;
- malicious pickles as checkpoints and registered weights are refused, never executed;
- the local dashboard and MLflow helper bind to 127.0.0.1; credentials never reach output
  or MLflow params.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from shard_fixtures import TINY_TRAIN, register_random_model, write_synthetic_shards
from typer.testing import CliRunner

from se4lip_dist.cli import app
from se4lip_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cr3t"
SPEECH = ["model.gru_layers=1", "model.embed_dim=16"]


def _closed_port() -> int:
    import standin  # cluster/local/standin.py, loaded by conftest.py

    return standin.free_port()


def _session_members(sid: int) -> set[int]:
    """Live processes of session ``sid``: a driver started with ``start_new_session`` and the
    local Ray it started, workers included (they take process groups, not sessions, of their
    own); never another cluster on this machine."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True,
                         check=True).stdout
    return {int(pid) for pid, s, stat in (line.split() for line in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")}


# ---------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this touches ``marker``: stands in for arbitrary code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Path.touch, (Path(self.marker),)


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Payload(marker)}, path)
    return path


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Control: the payload really runs under a full unpickler, so its absence below means
    the loaders refused it rather than the payload being inert."""
    marker = tmp_path / "pwned"
    torch.load(_evil(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    from se4lip_dist.train import TrainError, load_checkpoint_dir

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    _evil(ckpt / "model.pt", marker)
    torch.save({"state": {}, "param_groups": []}, ckpt / "optim.pt")
    (ckpt / "state.json").write_text(json.dumps({"epoch": 1, "step": 1, "history": []}))
    with pytest.raises(TrainError, match="refused to load") as err:
        load_checkpoint_dir(ckpt)
    assert str(ckpt) in str(err.value)
    assert not marker.exists(), "a pickled payload ran while loading a checkpoint"


def _speech_folder(folder: Path, *, lips: bool) -> tuple[Path, Any]:
    """A local logged-model layout: speech_encoder.pt + config.yaml (+ lip_encoder.pt)."""
    from se4lip_dist.models import build_model
    from se4lip_dist.registry import CONFIG_FILE, LIPS_FILE, WEIGHTS_FILE, _part

    cfg = load_config("cpu-small", overrides=SPEECH)
    state = build_model(cfg.model, window_frames=cfg.train.window_frames).state_dict()
    folder.mkdir(parents=True)
    torch.save(_part(state, "speech."), folder / WEIGHTS_FILE)
    if lips:
        torch.save(_part(state, "lips."), folder / LIPS_FILE)
    (folder / CONFIG_FILE).write_text(cfg.to_yaml())
    return folder, cfg


def test_registry_loaders_refuse_pickled_code_in_weights(tmp_path: Path) -> None:
    from se4lip_dist.registry import (
        LIPS_FILE,
        WEIGHTS_FILE,
        RegistryError,
        load_encoder,
        load_sync_model,
    )

    marker = tmp_path / "pwned"
    good, _ = _speech_folder(tmp_path / "good", lips=True)
    load_encoder(str(good))  # the clean folder loads
    load_sync_model(str(good))
    speech_bad, _ = _speech_folder(tmp_path / "speech_bad", lips=True)
    _evil(speech_bad / WEIGHTS_FILE, marker)
    lips_bad, _ = _speech_folder(tmp_path / "lips_bad", lips=True)
    _evil(lips_bad / LIPS_FILE, marker)
    for loader, folder in ((load_encoder, speech_bad), (load_sync_model, speech_bad),
                           (load_sync_model, lips_bad)):
        with pytest.raises(RegistryError, match="refused to load") as err:
            loader(str(folder))
        assert str(folder) in str(err.value)
    assert not marker.exists(), "a pickled payload ran while loading registered weights"


@pytest.mark.timeout(300)
def test_registered_model_with_tampered_artifacts(tmp_path: Path) -> None:
    """A registered version whose artifacts were swapped in the store: the pyfunc's code file
    is never run by se4lip's loaders, and pickled weights are refused (CLI: exit 2)."""
    from se4lip_dist.models import build_model
    from se4lip_dist.registry import (
        WEIGHTS_FILE,
        RegistryError,
        load_encoder,
        load_sync_model,
        log_model,
        register_model,
    )
    from se4lip_dist.tracking import start_run

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = load_config("cpu-small", overrides=SPEECH)
    model = build_model(cfg.model, window_frames=cfg.train.window_frames)
    run_id = start_run(uri, "sec", "r", params={}, tags={}, config_yaml=cfg.to_yaml())
    version = register_model(uri, log_model(uri, run_id, cfg, model.state_dict()), "se4lip-sec")
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        "se4lip-sec", "candidate", str(version))
    marker = tmp_path / "pwned"
    code_files = list((tmp_path / "store").rglob("pyfunc_model.py"))
    assert code_files
    for p in code_files:  # the pyfunc wrapper: only mlflow.pyfunc.load_model runs it
        p.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    load_encoder("models:/se4lip-sec@candidate", uri)
    load_sync_model("models:/se4lip-sec/1", uri)
    assert not marker.exists()

    for p in (tmp_path / "store").rglob(WEIGHTS_FILE):
        _evil(p, marker)
    for loader in (load_encoder, load_sync_model):
        with pytest.raises(RegistryError, match="models:/se4lip-sec@candidate: refused"):
            loader("models:/se4lip-sec@candidate", uri)
    wav = tmp_path / "a.wav"
    from se4lip_dist.synthetic import write_clip

    write_clip(wav, None, np.zeros(16000, np.float32), 25, 16000, audio_codec="pcm_s16le")
    res = CliRunner().invoke(app, ["extract", str(wav), "--model", "models:/se4lip-sec/1",
                                   "--tracking-uri", uri, "--out", str(tmp_path / "feats")])
    assert res.exit_code == 2, res.output
    assert "refused" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "feats").exists()
    assert not marker.exists(), "a pickled payload ran while loading a registered model"


# ---------------------------------------------------------------- binds and secrets


def test_local_ray_binds_dashboard_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from se4lip_dist import runtime

    seen: list[dict[str, Any]] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    runtime.init_ray(None)
    runtime.init_ray(None, dashboard=True)
    assert [kw["dashboard_host"] for kw in seen] == ["127.0.0.1", "127.0.0.1"]
    assert seen[0]["include_dashboard"] is False and seen[1]["include_dashboard"] is True


def test_local_mlflow_helper_binds_to_loopback(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    import standin  # cluster/local/standin.py, loaded by conftest.py

    calls: list[list[str]] = []
    signalled: list[int] = []

    class _Exited:
        pid = 4242

        def __init__(self, cmd: list[str], **_: Any) -> None:
            calls.append(cmd)

        def poll(self) -> int:
            return 1  # "exited at once": the stand-in reports and stops waiting

        def wait(self, timeout: float | None = None) -> int:
            return 1

    monkeypatch.setattr(standin.subprocess, "Popen", _Exited)
    # Pid 4242 is made up: cleaning up after the failed start must not signal a real group.
    monkeypatch.setattr(standin, "kill_process_group", lambda pgid, *a, **k: signalled.append(pgid))
    with pytest.raises(standin.StandinError, match="mlflow exited"):
        standin.MlflowServer.with_sqlite(tmp_path).start()
    (cmd,) = calls
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in cmd
    assert signalled == [4242]


@pytest.mark.parametrize(("uri", "clean"), [
    ("http://bob:s3cret@mlflow.local:5000/x", "http://mlflow.local:5000/x"),
    ("https://token@mlflow.example.com", "https://mlflow.example.com"),
    ("https://:p%40ss@h:443/api?x=1", "https://h:443/api?x=1"),
    ("postgresql://u:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("s3://AKIA:secret@bucket/runs", "s3://bucket/runs"),
    ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ("/plain/path", "/plain/path"),
    ("https://mlflow.example.com/?token=abc123&workspace=w1",
     "https://mlflow.example.com/?token=REDACTED&workspace=w1"),
    ("https://b.s3.amazonaws.com/m.db?X-Amz-Credential=AK/x&X-Amz-Signature=f00&v=2",
     "https://b.s3.amazonaws.com/m.db?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&v=2"),
    ("http://u:p@h:5000/?api_key=k", "http://h:5000/?api_key=REDACTED"),
])
def test_redact_uri(uri: str, clean: str) -> None:
    from se4lip_dist.storage import redact_uri

    assert redact_uri(uri) == clean


def test_run_params_never_hold_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           s3_env: Any) -> None:
    """The real train driver's params and tags, up to the point where Ray would start."""
    from mlflow import MlflowClient

    from se4lip_dist import storage, train

    s3_env.create_bucket("bucket")
    with pytest.raises(storage.StorageError, match="credentials in a URL") as err:
        storage.read_text(f"s3://AKIA:{SECRET}@bucket/x")
    assert SECRET not in str(err.value)

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=6, n_frames=20, val_clips=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def stop(*_: Any, **__: Any) -> None:
        raise RuntimeError("stop before Ray")

    monkeypatch.setattr(train, "_fit", stop)
    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
    with pytest.raises(storage.StorageError, match="credentials in a URL") as err:
        train.run_train(cfg, str(data), tracking_uri=uri, experiment="sec", run_name="r",
                        storage_path=f"s3://AKIA:{SECRET}@bucket/ray")
    assert SECRET not in str(err.value)
    with pytest.raises(RuntimeError, match="stop before Ray"):
        train.run_train(cfg, str(data), tracking_uri=uri, experiment="sec", run_name="r",
                        storage_path="s3://bucket/ray")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sec").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["ray.storage_path"] == "s3://bucket/ray"
    values = [*run.data.params.values(), *run.data.tags.values()]
    assert not [v for v in values if SECRET in v]
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert SECRET not in Path(config).read_text()

    from se4lip_dist.tracking import start_run

    rid = start_run(uri, "sec", "p", params={"a": f"http://u:{SECRET}@h/x", "b": 3}, tags={},
                    config_yaml="")
    assert client.get_run(rid).data.params == {"a": "http://h/x", "b": "3"}


# ---------------------------------------------------------------- unreachable MLflow


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "shards"
    write_synthetic_shards(d, n_clips=8, n_frames=30, val_clips=2, clips_per_shard=4)
    return d


def _unreachable_cases(shards: Path, tmp: Path) -> dict[str, list[str]]:
    space = tmp / "space.yaml"
    space.write_text("preset: cpu-small\nmetric: val/loss\nnum_samples: 1\nscheduler: fifo\n"
                     "params:\n  train.lr: 0.001\n")
    wav = tmp / "a.wav"
    from se4lip_dist.synthetic import write_clip

    write_clip(wav, None, np.zeros(16000, np.float32), 25, 16000, audio_codec="pcm_s16le")
    return {
        "train": ["train", "--data", str(shards), "--storage-path", str(tmp / "ray")],
        "tune": ["tune", "--data", str(shards), "--space", str(space), "--storage-path",
                 str(tmp / "ray")],
        "extract": ["extract", str(wav), "--model", "models:/se4lip@champion", "--out",
                    str(tmp / "feats")],
    }


@pytest.mark.parametrize("command", ["train", "tune", "extract"])
def test_unreachable_tracking_server_fails_fast_before_ray(
        command: str, small_shards: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray.tune  # a cold import of Tune alone takes seconds on a busy host

    import se4lip_dist.extract
    import se4lip_dist.train
    import se4lip_dist.tuning  # noqa: F401

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.chdir(tmp_path)
    args = _unreachable_cases(small_shards, tmp_path)[command]
    uri = f"http://alice:{SECRET}@127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, [*args, "--tracking-uri", uri])
    took = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert "cannot reach the MLflow tracking server" in flat and "127.0.0.1" in flat
    assert SECRET not in res.output and "alice" not in res.output
    assert took < 15, f"{command} took {took:.1f} s to notice"
    assert not ray.is_initialized(), "Ray started before the tracking check"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["a.wav", "space.yaml"], f"{command} wrote {left}"


# ---------------------------------------------------------------- Ray: killed processes


@pytest.fixture
def own_ray() -> Any:
    """A fresh local Ray with the dashboard (State API); other Ray on this machine is left be."""
    import ray

    from se4lip_dist.runtime import init_ray

    init_ray(num_cpus=2, dashboard=True)
    yield ray
    ray.shutdown()


def _epochs_checkpointed(folder: Path) -> set[int]:
    epochs = set()
    for p in folder.glob("checkpoint_*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):  # still being written
            epochs.add(int(json.loads(p.read_text())["epoch"]))
    return epochs


def _killer(storage: Path, name: str, uri: str, info: dict[str, Any]) -> None:
    """Wait for epoch 1's checkpoint, let the controller register it, then SIGKILL a worker."""
    try:
        _kill_a_worker(storage, name, uri, info)
    except Exception as e:  # surfaced by the test, not lost in a thread
        info["error"] = repr(e)


def _kill_a_worker(storage: Path, name: str, uri: str, info: dict[str, Any]) -> None:
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    deadline = time.time() + 300
    while time.time() < deadline:
        if 1 in _epochs_checkpointed(storage / name):
            break
        time.sleep(0.2)
    else:
        info["error"] = "no epoch-1 checkpoint within 300 s"
        return
    time.sleep(3.0)  # > the controller's 2 s poll: the checkpoint is registered by now
    workers = list_actors(address=info["address"],  # ours, whatever else runs here
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=",
                                                                           "ALIVE")])
    if len(workers) != 2:
        info["error"] = f"expected 2 live workers, found {len(workers)}"
        return
    victim = max(workers, key=lambda a: a.pid)
    os.kill(victim.pid, signal.SIGKILL)
    info["pid"] = victim.pid
    run_id = json.loads((storage / name / "se4lip_run.json").read_text())["run_id"]
    info["steps_at_kill"] = [m.step for m in
                             MlflowClient(tracking_uri=uri).get_metric_history(run_id,
                                                                               "train/loss")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_killed_mid_epoch_resumes_from_checkpoint(own_ray: Any, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    from se4lip_dist.train import load_checkpoint_dir, run_train

    dashboard = own_ray._private.worker.get_dashboard_url()
    assert dashboard.split("//")[-1].startswith("127.0.0.1:"), dashboard
    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=24, n_frames=60, val_clips=4, clips_per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    epochs = 3
    # Long enough epochs that the kill, 3 s after epoch 1's checkpoint, lands in training.
    cfg = load_config("cpu-small", overrides=[*TINY_TRAIN, f"train.epochs={epochs}",
                                              "train.pairs_per_segment=160"])
    info: dict[str, Any] = {"address": own_ray.get_runtime_context().gcs_address}
    killer = threading.Thread(target=_killer, args=(storage, "killed", uri, info), daemon=True)
    killer.start()
    result = run_train(cfg, str(data), tracking_uri=uri, experiment="faults", run_name="killed",
                       storage_path=str(storage), max_failures=2)
    killer.join(timeout=5)
    assert "error" not in info, info
    assert info["steps_at_kill"] == [1], f"the kill did not land in epoch 2: {info}"

    # The worker group was replaced: the killed worker is dead and new ones ran.
    actors = list_actors(address=info["address"], limit=100,
                         filters=[("class_name", "=", "RayTrainWorker")])
    assert any(a.pid == info["pid"] and a.state == "DEAD" for a in actors)
    assert len(actors) >= 4, [(a.pid, a.state) for a in actors]

    # Every epoch exactly once: in the result, the checkpoint and MLflow's metric history.
    assert result["epochs"] == epochs
    assert [h["epoch"] for h in result["history"]] == list(range(1, epochs + 1))
    steps = [h["train/steps"] for h in result["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == result["steps"]
    state = load_checkpoint_dir(result["checkpoint"]).state
    assert state["epoch"] == epochs and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    client = MlflowClient(tracking_uri=uri)
    for metric in ("train/loss", "val/loss", "val/sync_acc"):
        history = client.get_metric_history(result["run_id"], metric)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), metric
    assert client.get_run(result["run_id"]).info.status == "FINISHED"


def _extract_argv(inputs: list[Path], out: Path, uri: str) -> list[str]:
    return [sys.executable, "-m", "se4lip_dist", "extract", *map(str, inputs), "--model",
            "models:/se4lip-int@candidate", "--tracking-uri", uri, "--out", str(out),
            "--batch-size", "16", "--json"]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix == ".npy"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_extract_killed_midway_then_rerun(tmp_path: Path) -> None:
    from se4lip_dist.extract import SUCCESS_FILE
    from se4lip_dist.synthetic import make_synthetic_clip

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pinned = register_random_model(uri, load_config("cpu-small", overrides=SPEECH), "se4lip-int")
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        "se4lip-int", "candidate", pinned.rsplit("/", 1)[1])
    clips = tmp_path / "clips"
    clips.mkdir()
    inputs = [Path(make_synthetic_clip(clips / f"c{i}.mp4", 6.0, seed=i, size=(32, 32))["path"])
              for i in range(8)]
    out = tmp_path / "feats"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(_extract_argv(inputs, out, uri), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob(f"*/{SUCCESS_FILE}")):
            assert proc.poll() is None, "extract ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The job's Ray workers outlive the driver briefly (an actor may finish its input): wait
    # for them, so what counts as finished is final.
    deadline = time.time() + 60
    while _session_members(proc.pid) and time.time() < deadline:
        time.sleep(1)
    if left := _session_members(proc.pid):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the killed job's Ray processes {sorted(left)} outlived it by 60 s")
    done_at_kill = sorted(p.parent.name for p in out.glob(f"*/{SUCCESS_FILE}"))
    assert 1 <= len(done_at_kill) < len(inputs), done_at_kill
    finished = {k: v for k, v in _snapshot(out).items() if k.split("/")[0] in done_at_kill}
    mtimes = {k: (out / k).stat().st_mtime_ns for k in finished}

    rerun = subprocess.run(_extract_argv(inputs, out, uri), env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)  # --json: stdout is the JSON object alone
    assert summary["skipped_complete"] == len(done_at_kill)
    assert summary["extracted"] == len(inputs) - len(done_at_kill)
    after = _snapshot(out)
    for k, blob in finished.items():
        assert after[k] == blob, f"{k} changed"
        assert (out / k).stat().st_mtime_ns == mtimes[k], f"{k} was rewritten"
    assert len(list(out.glob(f"*/{SUCCESS_FILE}"))) == len(inputs)
    assert not list(out.rglob("*.tmp")), "temp files left behind"

    # Same bytes as an uninterrupted run, for the inputs the kill cut off too.
    clean = tmp_path / "clean"
    ok = subprocess.run(_extract_argv(inputs, clean, uri), env=env, capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _snapshot(clean) == after


def test_cli_errors_never_print_secret_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some library errors quote a whole runtime env; the CLI blanks secret values first."""
    import typer

    from se4lip_dist import cli

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(cli.console, "print", lambda text, **_: printed.append(text))
    printed: list[str] = []
    with pytest.raises(typer.Exit):
        cli._fail(f"failed to merge {{'AWS_SECRET_ACCESS_KEY': '{SECRET}'}}")
    assert printed and SECRET not in printed[0] and "REDACTED" in printed[0]
