"""tune: resource planning, a real 2-trial Tune + Train V2 search, the champion gate, resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from shard_fixtures import TINY_MODEL, TINY_TRAIN, write_synthetic_shards

from se4lip_dist.tuning import TuneError, TuneOptions, plan_resources


def test_plan_resources_keeps_a_cpu_for_ray_data_locally() -> None:
    r = plan_resources(num_workers=2, cpus_per_trial=None, gpus_per_trial=0,
                       max_concurrent=None, local_cpus=2.0)
    assert r.max_concurrent == 1 and r.num_workers == 2
    assert r.driver_cpus + r.num_workers * r.worker_cpus <= 1.0 + 1e-9
    with pytest.raises(TuneError, match="Ray Data"):
        plan_resources(num_workers=2, cpus_per_trial=1.0, gpus_per_trial=0, max_concurrent=2,
                       local_cpus=2.0)
    with pytest.raises(TuneError, match="no CPU"):
        plan_resources(num_workers=4, cpus_per_trial=0.25, gpus_per_trial=0,
                       max_concurrent=None, local_cpus=8.0)
    with pytest.raises(TuneError, match="has 0 GPU"):
        plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=1,
                       max_concurrent=None, local_cpus=8.0)


def test_plan_resources_on_a_cluster_ignores_its_size_at_start() -> None:
    """An autoscaling cluster starts with a 0-CPU head and no workers: the plan must not read
    that as a 1-CPU cluster (one trial at a time, --max-concurrent-trials refused)."""
    r = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=0,
                       max_concurrent=8, local_cpus=None)
    assert (r.num_workers, r.max_concurrent, r.worker_gpus) == (2, 8, 0)
    assert r.worker_cpus == 1.0
    unbounded = plan_resources(num_workers=4, cpus_per_trial=8.25, gpus_per_trial=0,
                               max_concurrent=None, local_cpus=None)
    assert unbounded.max_concurrent is None and unbounded.worker_cpus == 2.0


def test_plan_resources_never_splits_a_gpu_across_ranks() -> None:
    """--gpus-per-trial 1 with the default worker count used to give two NCCL ranks half a GPU
    each (NCCL refuses duplicate GPUs)."""
    one = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=1,
                         max_concurrent=None, local_cpus=None)
    assert (one.num_workers, one.worker_gpus) == (1, 1)
    assert one.worker_bundle() == {"CPU": 2.0, "GPU": 1.0}  # train.cpus_per_gpu_worker
    four = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=4,
                          max_concurrent=2, local_cpus=None)
    assert (four.num_workers, four.worker_gpus) == (4, 1)
    with pytest.raises(TuneError, match="whole number"):
        plan_resources(num_workers=2, cpus_per_trial=None, gpus_per_trial=1.5,
                       max_concurrent=None, local_cpus=None)
    with pytest.raises(TuneError, match="--num-workers-per-trial 1"):
        plan_resources(num_workers=2, cpus_per_trial=None, gpus_per_trial=1,
                       max_concurrent=None, local_cpus=None)
    local = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=1,
                           max_concurrent=None, local_cpus=16.0, local_gpus=2.0)
    assert (local.num_workers, local.worker_gpus, local.max_concurrent) == (1, 1, 2)


def test_plan_resources_gives_gpu_ranks_cpus_per_gpu_worker() -> None:
    """A GPU trial's ranks decode and sample in their own collate threads: without
    --cpus-per-trial each gets train.cpus_per_gpu_worker CPUs, on a cluster and locally;
    --cpus-per-trial still wins, and CPU trials keep their plan."""
    cluster = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=2,
                             max_concurrent=None, local_cpus=None)
    assert cluster.worker_bundle() == {"CPU": 2.0, "GPU": 1.0} and cluster.num_workers == 2
    assert cluster.driver_cpus == 0.25
    three = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=1,
                           max_concurrent=None, local_cpus=None, gpu_worker_cpus=3.0)
    assert three.worker_bundle() == {"CPU": 3.0, "GPU": 1.0}
    given = plan_resources(num_workers=None, cpus_per_trial=4.25, gpus_per_trial=1,
                           max_concurrent=None, local_cpus=None, gpu_worker_cpus=3.0)
    assert given.worker_bundle() == {"CPU": 4.0, "GPU": 1.0}
    # 8 CPUs, 4 GPUs: 7 CPUs after Ray Data's hold 3 trials of 0.25 + 2 CPUs.
    local = plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=1,
                           max_concurrent=None, local_cpus=8.0, local_gpus=4.0)
    assert (local.worker_cpus, local.max_concurrent) == (2.0, 3)
    with pytest.raises(TuneError, match=r"2\.25 CPUs exceed the 1 CPUs left .* lower "
                                        r"--max-concurrent-trials or train\.cpus_per_gpu_worker"
                                        r".*--cpus-per-trial"):
        plan_resources(num_workers=None, cpus_per_trial=None, gpus_per_trial=1,
                       max_concurrent=None, local_cpus=2.0, local_gpus=1.0)
    cpu = plan_resources(num_workers=2, cpus_per_trial=None, gpus_per_trial=0,
                         max_concurrent=None, local_cpus=None, gpu_worker_cpus=3.0)
    assert cpu.worker_bundle() == {"CPU": 1.0}


def _space(path: Path, params: dict, metric: str = "val/offset_acc",
           num_samples: int = 1) -> Path:
    path.write_text(yaml.safe_dump({
        "preset": "cpu-small", "metric": metric, "num_samples": num_samples, "scheduler": "fifo",
        "params": params,
    }))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tune") / "shards"
    # 8 validation clips: as many units as the gate needs to decide (train.val_min_units).
    write_synthetic_shards(d, n_clips=28, n_frames=40, val_clips=8, clips_per_shard=7)
    return d


@pytest.mark.timeout(1200)
def test_train_then_tune_on_one_name_gate_and_mlflow(shards: Path, tmp_path: Path) -> None:
    """`train --register` and `tune` share one lifecycle: the tune's version is gated against
    the trained champion, a chance-level search is never promoted, nothing registers twice."""
    from mlflow import MlflowClient

    from se4lip_dist.config import load_config
    from se4lip_dist.train import run_train
    from se4lip_dist.tuning import run_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "ray")
    trained = run_train(load_config("cpu-small", overrides=[*TINY_TRAIN, "train.epochs=3"]),
                        str(shards), tracking_uri=uri, experiment="tune-it", run_name="base",
                        register="se4lip-t", storage_path=storage)
    assert (trained["registered"]["version"], trained["registered"]["alias"]) == (1, "champion")

    common = {"tracking_uri": uri, "storage_path": storage, "epochs": 2,
              "overrides": tuple(TINY_MODEL), "register": "se4lip-t", "experiment": "tune-it"}
    good = _space(tmp_path / "good.yaml",
                  {"model.gru_layers": {"grid": [1, 2]}, "train.lr": 2.0e-3})
    seen: list[int] = []
    first = run_tune(str(good), str(shards), TuneOptions(name="good", **common),
                     on_update=lambda rows: seen.append(len(rows)))
    assert len(first["trials"]) == 2 and max(seen) == 2
    reg = first["registered"]
    assert reg["version"] == 2, reg
    # Gated against the trained version 1 (before, tune only looked for a champion and train
    # set another alias, so the tune's version became champion unchallenged).
    assert "champion v1" in reg["reason"] and reg["champion"]["version"] == 1, reg
    assert first["best"]["metrics"]["val/offset_acc"] >= 0.8, first["best"]["metrics"]
    assert first["best"]["epoch"] >= 1 and first["best"]["run_id"]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(first["parent_run_id"])
    assert parent.data.tags["se4lip.kind"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.tags["se4lip.best_run_id"] == first["best"]["run_id"]
    assert "`se4lip-t` v2" in parent.data.tags["mlflow.note.content"]
    exp = client.get_experiment_by_name("tune-it").experiment_id
    children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{first['parent_run_id']}'")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags  # not KILLED
        assert child.info.run_name.startswith("good #") and "gru_layers=" in child.info.run_name
        assert child.data.tags["mlflow.source.name"] == "se4lip-dist tune"
        assert child.data.tags["se4lip.trial_status"] in ("DONE", "STOPPED EARLY")
        assert "model.gru_layers" in child.data.params
        history = client.get_metric_history(child.info.run_id, "val/offset_acc")
        assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(first["parent_run_id"])}
    assert {"trials.md", "trials.json"} <= artifacts

    # A search that cannot learn (lr 1e-9) must not take the champion alias.
    champ_before = int(client.get_model_version_by_alias("se4lip-t", "champion").version)
    bad = _space(tmp_path / "bad.yaml", {"train.lr": 1.0e-9})
    second = run_tune(str(bad), str(shards), TuneOptions(name="bad", **{**common, "epochs": 1}))
    reg = second["registered"]
    assert (reg["version"], reg["alias"]) == (3, "challenger"), reg
    assert ("content-blind floor" in reg["reason"]
            or "not significantly better" in reg["reason"]), reg
    assert int(client.get_model_version_by_alias("se4lip-t", "champion").version) == \
        champ_before
    assert int(client.get_model_version_by_alias("se4lip-t", "challenger").version) == 3

    with pytest.raises(TuneError, match="already exists"):
        run_tune(str(good), str(shards), TuneOptions(name="good", **common))
    again = run_tune(str(good), str(shards), TuneOptions(name="good", resume=True, **common))
    assert again["registered"]["version"] == 2  # a finished tune never registers twice
    assert len(client.search_model_versions("name = 'se4lip-t'")) == 3


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("search", ["random", "tpe", "pbt", "pareto"])
def test_resume_after_killing_the_driver(shards: Path, tmp_path: Path, search: str) -> None:
    """Killed mid-trial, ``--resume`` finishes the same 2 trials (with TPE: its study restored,
    not a fresh search of 2 more; with PBT: its population, each trial from its last Tune
    checkpoint; with a Pareto objective and a cost budget: the multi-objective study) and
    registers once."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # TPE samples: a choice (2 trials), where random search enumerates the same grid.
    kind = "choice" if search in ("tpe", "pareto") else "grid"
    params = {"model.gru_layers": {kind: [1, 2]}, "train.lr": 2.0e-3}
    flags = ["--search", search]
    if search == "pareto":  # a budget every depth meets: the gate, not the budget, decides
        flags = ["--search", "tpe", "--objective", "pareto", "--max-cost", "100"]
    if search == "pbt":  # a population of 2, side by side, perturbing the learning rate
        params = {"train.lr": {"grid": [1.0e-7, 2.0e-3]}}
        flags = ["--scheduler", "pbt", "--max-concurrent-trials", "2"]
    space = _space(tmp_path / "s.yaml", params, num_samples=2 if kind == "choice" else 1)
    argv = [sys.executable, "-m", "se4lip_dist", "tune", "--data", str(shards), "--space",
            str(space), "--epochs", "3", "--tracking-uri", uri, "--storage-path",
            str(tmp_path / "ray"), "--name", "killme", "--register", "se4lip-k", "--json",
            *flags]
    for o in TINY_MODEL:
        argv += ["--set", o]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 600
    try:
        # Kill once a trial has finished an epoch, as Tune records it: polling the sqlite
        # store instead raced the driver creating its tables (one start died unexplained).
        while time.time() < deadline:
            time.sleep(1)
            assert proc.poll() is None, \
                f"tune ended before it could be killed:\n{log.read_text()[-3000:]}"
            if any(p.stat().st_size for p in
                   (tmp_path / "ray" / "killme").glob("trial-*/result.json")):
                break
        else:
            pytest.fail("no trial reported within 600 s")
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended on its own: the assert says why
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(10)  # the killed driver's Ray processes exit on their own
    done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # --json: stdout is the JSON object alone
    assert len(result["trials"]) == 2
    assert all(t["status"] in ("DONE", "STOPPED EARLY") for t in result["trials"])
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(
        "name = 'se4lip-k'")
    assert len(versions) == 1


def test_live_table_callback_pickles_without_its_display() -> None:
    """Tune pickles its callbacks with the experiment: a display hook holding locks (rich's
    Live) used to make `tune` without --json crash with "cannot pickle '_thread.RLock'"."""
    import threading

    import cloudpickle

    from se4lip_dist.tuning import _LiveTable

    lock = threading.RLock()
    seen: list[int] = []
    cb = _LiveTable("val/offset_acc", lambda rows: seen.append(len(rows)) or lock)
    back = cloudpickle.loads(cloudpickle.dumps(cb))
    assert back.on_update is None and back.rows == {}


@pytest.mark.timeout(120)
def test_the_driver_tells_which_trials_wait_for_capacity() -> None:
    """A trial's waiting line (left in Ray's KV) reaches the tune's on_wait hook through the
    callback Tune calls every step, and the live table shows the trial as WAITING."""
    import ray
    from ray.experimental import internal_kv
    from ray.tune import Callback

    from se4lip_dist import tuning
    from se4lip_dist.runtime import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=1)
    try:
        lines: list[str] = []
        rows: list[list[tuning.TrialRow]] = []
        live = tuning._LiveTable("val/shift_acc", rows.append, "qtest", lines.append)
        assert type(live).on_step_end is not Callback.on_step_end  # a hook Tune really calls

        class _Trial:
            config = None

            def __str__(self) -> str:
                return "trial-b"

        live.on_trial_start(0, [], _Trial())
        key = tuning._waiting_key("qtest", "trial-b")
        internal_kv._internal_kv_put(key, "trial trial-b's 2 ranks waiting for capacity",
                                     namespace=tuning._KV_NS)
        live.on_step_end(1, [])
        assert lines == ["trial trial-b's 2 ranks waiting for capacity"]
        assert rows[-1][0].status == "WAITING"
        live.on_step_end(2, [])  # polled at most every few seconds, said once per line
        assert len(lines) == 1
        internal_kv._internal_kv_del(key, namespace=tuning._KV_NS)
        live.polled = 0.0
        live.on_step_end(3, [])
        assert rows[-1][0].status == "RUNNING" and tuning.waiting_trials("qtest") == {}
    finally:
        if started:
            ray.shutdown()
