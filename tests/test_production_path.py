"""The production path on its loopback stand-in (cluster/local/standin.py), end to end.

Shards and Ray results on a real S3 API, an ``mlflow server`` with a PostgreSQL store and S3
artifacts, and a Ray cluster that starts with zero workers and autoscales:

prepare to S3 -> ``se4lip-dist submit -- tune`` (4 trials of 2 DDP ranks, more than the cluster
holds at once) on the autoscaling cluster ->
best encoder registered on the MLflow server -> ``extract`` from ``models:/...@champion`` on the
worker nodes, features written to S3 -> every frame accounted for; the cluster scales up and back
down, and nothing is left running. A second test kills the node running a trial mid-epoch.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from shard_fixtures import TINY_MODEL

pytestmark = pytest.mark.slow

DATA, RESULTS = "se4lip-data", "se4lip-ray"
# About ten clips held out: enough units for the gate to promote (train.val_min_units).
CLIPS, SECONDS = 32, 3.0
TRAIN_SET = [*TINY_MODEL, "train.lr=0.002", "train.pairs_per_segment=64",
             "train.val_fraction=0.3"]
# One rank of 0.5 CPU and a 0.25-CPU trial driver: a 1-CPU worker node holds one trial and a
# Ray Data task; the 0-CPU head holds only the job's driver.
TRIAL_FLAGS = ["--cpus-per-trial", "0.75", "--num-workers-per-trial", "1",
               "--max-concurrent-trials", "1"]


def _cli(args: list[str], env: dict[str, str], timeout: float,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "se4lip_dist", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _last_json(stdout: str) -> Any:
    return json.loads(stdout.strip().splitlines()[-1])


class _NodeWatch:
    """Polls the cluster's live worker nodes in the background: the most seen at once."""

    def __init__(self, cluster: Any) -> None:
        self.cluster, self.most, self.seen = cluster, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            try:
                n = len(self.cluster.alive_worker_nodes())
            except Exception:  # the state API may be briefly unavailable under load
                continue
            self.most, self.seen = max(self.most, n), self.seen + 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.most


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    from se4lip_dist.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("videos")
    return {"train": make_synthetic_dataset(root / "train", CLIPS, SECONDS),
            "heldout": make_synthetic_dataset(root / "heldout", 2, SECONDS, seed=10_000)}


# The caller's own secrets: a job must carry none of them (the nodes have their own).
CALLER_SECRETS = {"MLFLOW_TRACKING_USERNAME": "se4lip",
                  "MLFLOW_TRACKING_PASSWORD": f"caller-pw-{os.getpid()}-9f3c"}


def _node_env(s3_server: Any) -> dict[str, str]:
    """What every node starts with, as an instance profile or a pod's Secret gives it."""
    return {**s3_server.env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


def _client_env(s3_server: Any, cluster: Any, mlflow_url: str) -> dict[str, str]:
    env = {**os.environ, **s3_server.env(), **cluster.env(), "MLFLOW_TRACKING_URI": mlflow_url,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", **CALLER_SECRETS}
    env.pop("RAY_ADDRESS", None)  # the client submits through the Jobs API, never joins
    return env


def _ray_records(dashboard: str) -> str:
    """Everything Ray shows about jobs, tasks and actors to whoever reaches its dashboard."""
    import urllib.request

    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_jobs, list_tasks

    parts = [repr(JobSubmissionClient(dashboard).list_jobs())]
    with urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=60) as r:
        parts.append(r.read().decode())
    cli = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address",
                          dashboard], capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 0, cli.stderr[-2000:]
    parts.append(cli.stdout)
    for listing in (list_jobs, list_tasks, list_actors):
        parts.append(repr(listing(address=dashboard, detail=True, limit=10_000,
                                  raise_on_missing_output=False)))
    return "\n".join(parts)


def _assert_no_secret_in_records(dashboard: str, secrets: dict[str, str]) -> None:
    records = _ray_records(dashboard)
    # The scan sees runtime envs: the job's non-secret settings are there.
    assert "AWS_ENDPOINT_URL" in records and "MLFLOW_TRACKING_URI" in records
    leaked = sorted(k for k, v in secrets.items() if v in records)
    assert not leaked, f"Ray's records show {leaked}"


def _space(path: Path) -> Path:
    """Four trials (two samples of a two-point grid), each to its last epoch: the one that
    queues waits for a whole trial (ASHA's early stops are tests/test_tuning_asha.py's)."""
    path.write_text(yaml.safe_dump({
        "preset": "cpu-small", "metric": "val/offset_acc", "num_samples": 2,
        "scheduler": "fifo", "params": {"model.gru_layers": {"grid": [1, 2]}},
    }))
    return path


# Four trials at once, each a 0.25-CPU driver and two DDP ranks of 0.5 CPU, on one 2-CPU node:
# the four drivers and one trial's ranks fit, the other trials queue for capacity in turn.
QUEUE_NODES = {"cpu_node": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1}}
QUEUE_FLAGS = ["--cpus-per-trial", "1.25", "--num-workers-per-trial", "2",
               "--max-concurrent-trials", "4"]


def _prepare_to_s3(videos: dict[str, list[Path]], s3_server: Any, env: dict[str, str],
                   work: Path) -> None:
    import boto3

    for b in (DATA, RESULTS):
        s3_server.create_bucket(b)
    done = _cli(["prepare", str(videos["train"][0].parent), "--out", f"s3://{DATA}/shards",
                 "--preset", "cpu-small", "--face-backend", "none", "--workers", "0",
                 "--json"], env, timeout=600, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _last_json(done.stdout)["total_clips"] == CLIPS
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint,
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                      region_name=env["AWS_DEFAULT_REGION"])
    for v in videos["heldout"]:
        s3.upload_file(str(v), DATA, f"heldout/{v.name}")


def _submit(cluster: Any, env: dict[str, str], command: list[str], timeout: float,
            work: Path) -> subprocess.CompletedProcess:
    return _cli(["submit", "--address", cluster.dashboard_url, "--working-dir", "",
                 "--timeout", str(timeout), "--", *command], env, timeout=timeout + 60,
                cwd=work)


@pytest.mark.timeout(900)
def test_submitted_job_carries_no_secret(s3_server, mlflow_server, autoscaling_ray_factory,
                                         tmp_path: Path) -> None:
    """A real ``submit -- train`` from a shell holding S3 and MLflow secrets: the job reads its
    shards from S3 and logs to MLflow with the nodes' own credentials, and neither the Jobs API
    (``ray job list``, the dashboard's job API) nor the State API's job, task and actor records
    hold a secret value. A command line with a password in a URL is refused before it leaves."""
    import boto3
    from mlflow import MlflowClient
    from shard_fixtures import write_synthetic_shards

    cluster = autoscaling_ray_factory(idle_timeout_minutes=0.2, env_vars=_node_env(s3_server))
    env = _client_env(s3_server, cluster, mlflow_server.url)
    secrets = {k: env[k] for k in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")}
    for b in (DATA, RESULTS):
        s3_server.create_bucket(b)
    local = tmp_path / "shards"
    write_synthetic_shards(local, n_clips=10, n_frames=40, val_clips=2, clips_per_shard=5)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint,
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                      region_name=env["AWS_DEFAULT_REGION"])
    for f in local.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), DATA, f"leak/{f.relative_to(local)}")

    train = ["train", "--data", f"s3://{DATA}/leak", "--storage-path", f"s3://{RESULTS}/leak",
             "--tracking-uri", mlflow_server.url, "--experiment", "leak", "--name", "leak",
             "--epochs", "1", "--max-steps", "2", "--json"]
    for o in [*TINY_MODEL, "train.num_workers=1", "train.cpus_per_worker=0.5"]:
        train += ["--set", o]
    done = _submit(cluster, env, train, timeout=600, work=tmp_path)
    assert done.returncode == 0, (done.stdout[-6000:], done.stderr[-6000:])
    _assert_no_secret_in_records(cluster.dashboard_url, secrets)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("leak").experiment_id])
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
    assert "not sent to the cluster: " in done.stderr and "MLFLOW_TRACKING_PASSWORD" in done.stderr

    # A password in a URL on the command line would sit in the job's entrypoint: refused.
    host = mlflow_server.url.split("://", 1)[1]
    refused = _submit(cluster, env, ["train", "--data", f"s3://{DATA}/leak", "--tracking-uri",
                                     f"http://se4lip:{secrets['MLFLOW_TRACKING_PASSWORD']}@{host}"],
                      timeout=60, work=tmp_path)
    assert refused.returncode == 2 and "refusing to send argument" in refused.stderr
    assert secrets["MLFLOW_TRACKING_PASSWORD"] not in refused.stderr + refused.stdout


@pytest.mark.timeout(3000)
def test_tune_on_autoscaling_cluster_with_s3_and_mlflow_server(
        videos, s3_server, mlflow_server, autoscaling_ray_factory, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    # The one node outlives the few seconds between the tune and extract jobs: a node removed
    # as idle while extract's pool starts on it would be the test's doing, not the product's.
    cluster = autoscaling_ray_factory(idle_timeout_minutes=0.5, env_vars=_node_env(s3_server),
                                      node_types=QUEUE_NODES)
    env = _client_env(s3_server, cluster, mlflow_server.url)
    assert cluster.alive_worker_nodes() == []  # the cluster starts with no worker at all
    _prepare_to_s3(videos, s3_server, env, tmp_path)

    watch = _NodeWatch(cluster)
    t0 = time.perf_counter()
    space = _space(tmp_path / "s.yaml")
    tune_cmd = ["tune", "--data", f"s3://{DATA}/shards", "--space", str(space),
                "--storage-path", f"s3://{RESULTS}/results", "--tracking-uri", mlflow_server.url,
                "--epochs", "3", "--register", "se4lip-e2e", "--name", "e2e",
                "--experiment", "e2e", *QUEUE_FLAGS, "--json"]
    for o in TRAIN_SET:
        tune_cmd += ["--set", o]
    done = _submit(cluster, env, tune_cmd, timeout=2100, work=tmp_path)
    tune_wall = time.perf_counter() - t0
    most = watch.stop()
    assert done.returncode == 0, (done.stdout[-6000:], done.stderr[-6000:])
    assert most >= 1, "the autoscaler never added a worker node"
    # More trials asked for at once than the cluster holds: none failed for want of room.
    # (Whether Tune starts them together, so that some queue and say so, is its own choice;
    # tests/test_placement.py and tests/test_tune.py prove the waiting and its lines.)
    job_log = done.stdout + done.stderr
    waited = sorted({line.split("'s ")[0] for line in job_log.splitlines()
                     if "waiting for capacity" in line})
    assert "PlacementError" not in job_log, job_log[-6000:]

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    champion = client.get_model_version_by_alias("se4lip-e2e", "champion")
    assert champion.version == "1", champion
    assert float(champion.tags["gate.val/offset_acc"]) >= 0.5, champion.tags
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs]
    assert any(r.data.tags.get("se4lip.kind") == "tune" for r in runs)
    trials = [r for r in runs if r.data.tags.get("se4lip.trial")]
    assert len(trials) == 4 and all(r.data.params["train.num_workers"] == "2" for r in trials)

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint,
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                      region_name=env["AWS_DEFAULT_REGION"])

    def keys(bucket: str, prefix: str) -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    assert any("checkpoint" in k for k in keys(RESULTS, "results/e2e"))
    assert any(k.endswith("speech_encoder.pt") for k in keys("mlflow", "mlflow"))

    # Features for the held-out clips from @champion, by actors on the worker nodes (the head
    # has no CPU), read from and written to S3.
    watch = _NodeWatch(cluster)
    done = _submit(cluster, env, [
        "extract", f"s3://{DATA}/heldout", "--model", "models:/se4lip-e2e@champion",
        "--tracking-uri", mlflow_server.url, "--out", f"s3://{DATA}/features", "--json"],
        timeout=900, work=tmp_path)
    watch.stop()
    assert done.returncode == 0, (done.stdout[-6000:], done.stderr[-6000:])
    frames = int(SECONDS * 25)
    for v in videos["heldout"]:
        body = s3.get_object(Bucket=DATA, Key=f"features/{v.stem}/aud_se4lip.npy")["Body"]
        feats = np.load(io.BytesIO(body.read()))
        assert feats.shape == (frames, 32), (v.name, feats.shape)  # one row per video frame
        assert np.isfinite(feats).all()
        marker = s3.get_object(Bucket=DATA, Key=f"features/{v.stem}/_SUCCESS.json")["Body"]
        assert json.loads(marker.read())["model"]["version"] == 1

    _assert_no_secret_in_records(
        cluster.dashboard_url, {k: env[k] for k in ("AWS_SECRET_ACCESS_KEY",
                                                    "MLFLOW_TRACKING_PASSWORD")})

    # Idle workers go away again.
    cluster.wait_for_workers(0, timeout_s=240, at_least=False)
    print(f"\nproduction path: tune job {tune_wall:.0f} s, at most {most} worker nodes, "
          f"{len(waited)} trials waited for capacity: {waited}")


def _train_worker_nodes(cluster: Any) -> dict[str, str]:
    """Node id -> state of every Ray Train worker actor the cluster has seen."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, limit=1000, raise_on_missing_output=False,
                         filters=[("class_name", "=", "RayTrainWorker")])
    return {a.node_id: a.state for a in actors}


@pytest.mark.timeout(2400)
def test_node_loss_mid_trial_resumes_from_its_s3_checkpoint(
        videos, s3_server, mlflow_server, autoscaling_ray_factory, tmp_path: Path) -> None:
    """Kill the raylet of the node training a trial after its first checkpoint: the trial
    resumes on another node from S3, the search finishes, one version is registered and no
    MLflow run is left RUNNING."""
    from mlflow import MlflowClient

    from se4lip_dist.remote import job_client, wait_for_job

    cluster = autoscaling_ray_factory(idle_timeout_minutes=0.5, env_vars=_node_env(s3_server))
    env = _client_env(s3_server, cluster, mlflow_server.url)
    _prepare_to_s3(videos, s3_server, env, tmp_path)
    space = tmp_path / "one.yaml"
    space.write_text(yaml.safe_dump({"preset": "cpu-small", "metric": "val/offset_acc",
                                     "num_samples": 1, "scheduler": "fifo",
                                     "params": {"model.gru_layers": 1}}))
    cmd = ["tune", "--data", f"s3://{DATA}/shards", "--space", str(space), "--storage-path",
           f"s3://{RESULTS}/loss", "--tracking-uri", mlflow_server.url, "--epochs", "3",
           "--register", "se4lip-loss", "--name", "loss", "--experiment", "loss",
           *TRIAL_FLAGS, "--json"]
    for o in [*TRAIN_SET, "train.pairs_per_segment=160"]:  # epochs long enough to land in
        cmd += ["--set", o]
    started = _cli(["submit", "--address", cluster.dashboard_url, "--working-dir", "",
                    "--no-wait", "--json", "--", *cmd], env, timeout=120, cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    job_id = _last_json(started.stdout)["job_id"]

    client = MlflowClient(tracking_uri=mlflow_server.url)
    deadline = time.time() + 900
    victim = None
    while time.time() < deadline and victim is None:
        time.sleep(2)
        exp = client.get_experiment_by_name("loss")
        runs = client.search_runs([exp.experiment_id], "tags.`se4lip.trial` != ''") if exp \
            else []
        if any(r.data.metrics.get("val/offset_acc") is not None for r in runs):
            alive = [n for n, state in _train_worker_nodes(cluster).items() if state == "ALIVE"]
            if alive:
                victim = alive[0]
    assert victim, "no trial finished its first epoch within 900 s"
    killed = cluster.kill_node(victim)
    assert killed

    status = wait_for_job(job_client(cluster.dashboard_url), job_id, timeout_s=1500,
                          address=cluster.dashboard_url)
    assert status == "SUCCEEDED", job_client(cluster.dashboard_url).get_job_logs(job_id)[-6000:]
    nodes = _train_worker_nodes(cluster)
    assert nodes.get(victim) == "DEAD" and any(n != victim for n in nodes), nodes

    registry = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert len(registry.search_model_versions("name = 'se4lip-loss'")) == 1
    exp = client.get_experiment_by_name("loss")
    runs = client.search_runs([exp.experiment_id])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    (trial,) = [r for r in runs if r.data.tags.get("se4lip.trial")]
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/offset_acc")]
    assert sorted(set(steps)) == [1, 2, 3], steps  # resumed after epoch 1, not restarted
