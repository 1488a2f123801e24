"""The loopback stand-in of the production cluster (cluster/local/standin.py) works.

- S3: moto's server answers pyarrow.fs (standard AWS variables only) and boto3 alike;
- MLflow: a real server on PostgreSQL with artifacts served from that S3; the client only
  talks HTTP, the run is in PostgreSQL and the artifact object is in the bucket;
- Ray: an autoscaling cluster starts with zero workers, scales up for work (CPU and declared
  GPU node types), back down when idle, loses a killed node, and leaves nothing running;
- ``standin.py up``/``down``: the whole stand-in for a person, with Ray token auth.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import standin  # cluster/local/standin.py, loaded by conftest.py

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "cluster" / "local" / "standin.py"
VENV_BIN = Path(sys.executable).parent


def _ps_naming(text: str) -> list[str]:
    """``ps`` lines (not zombies) whose command line names ``text``."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines()
            if text in line and line.split()[1][0] != "Z" and "ps -eo" not in line]


def _driver(cluster: standin.AutoscalingRay, code: str, timeout: float,
            extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A Ray driver for ``cluster`` in its own process (never in the pytest process)."""
    env = {**os.environ, **cluster.env(), "RAY_SCHEDULER_EVENTS": "0", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"Ray driver still running after {timeout:g} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    # Ray may print its own lines (autoscaler events) around the driver's one JSON line.
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


# --- S3 ---------------------------------------------------------------------------------------


def test_s3_round_trip_through_pyarrow_and_boto3(s3_env: standin.S3Server) -> None:
    import boto3
    import pyarrow.fs

    s3_env.create_bucket("standin-rt")
    fs, path = pyarrow.fs.FileSystem.from_uri("s3://standin-rt/a/hello.txt")
    assert isinstance(fs, pyarrow.fs.S3FileSystem)  # endpoint from AWS_ENDPOINT_URL alone
    with fs.open_output_stream(path) as f:
        f.write(b"from pyarrow")
    client = boto3.client("s3")  # endpoint and dummy credentials from the environment
    body = client.get_object(Bucket="standin-rt", Key="a/hello.txt")["Body"].read()
    assert body == b"from pyarrow"
    client.put_object(Bucket="standin-rt", Key="b/back.txt", Body=b"from boto3")
    with fs.open_input_stream("standin-rt/b/back.txt") as f:
        assert f.read() == b"from boto3"
    listed = fs.get_file_info(pyarrow.fs.FileSelector("standin-rt", recursive=True))
    assert {i.path for i in listed if i.is_file} == {"standin-rt/a/hello.txt",
                                                     "standin-rt/b/back.txt"}


# --- MLflow on PostgreSQL with S3 artifacts ---------------------------------------------------


def test_mlflow_server_postgres_backend_and_s3_artifacts(
    mlflow_server: standin.MlflowServer, postgres: standin.Postgres,
    s3_server: standin.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3
    import psycopg2
    from mlflow.tracking import MlflowClient

    # The client knows the server's URL and nothing else: no S3 endpoint, no credentials.
    for k in [*s3_server.env(), "MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(k, raising=False)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.create_experiment(f"standin-{os.getpid()}-{time.time_ns()}")
    run = client.create_run(exp_id, run_name="standin")
    client.log_metric(run.info.run_id, "val_offset_acc", 0.75, step=3)
    (tmp_path / "note.txt").write_text("artifact through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), artifact_path="docs")
    client.set_terminated(run.info.run_id)

    got = client.get_run(run.info.run_id)
    assert got.data.metrics["val_offset_acc"] == 0.75 and got.info.status == "FINISHED"
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # served, not direct S3
    back = client.download_artifacts(run.info.run_id, "docs/note.txt", str(tmp_path / "dl"))
    assert Path(back).read_text() == "artifact through the server"

    # The run is in PostgreSQL ...
    with psycopg2.connect(postgres.libpq_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = %s",
                    (run.info.run_id, "val_offset_acc"))
        assert cur.fetchone() == (0.75,)
    # ... and the artifact object in the moto bucket.
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=standin.S3_REGION,
                      aws_access_key_id=standin.S3_ACCESS_KEY,
                      aws_secret_access_key=standin.S3_SECRET_KEY)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="mlflow/")["Contents"]]
    (key,) = [k for k in keys if run.info.run_id in k and k.endswith("docs/note.txt")]
    assert s3.get_object(Bucket="mlflow", Key=key)["Body"].read() == b"artifact through the server"


def test_mlflow_server_command_line_keeps_secrets_and_binds_loopback(
    mlflow_server: standin.MlflowServer, postgres: standin.Postgres,
) -> None:
    argv = mlflow_server.argv()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in argv
    assert postgres.uri.startswith("postgresql+psycopg2://mlflow:")
    assert mlflow_server.service is not None
    cmdline = Path(f"/proc/{mlflow_server.service.pid}/cmdline").read_bytes().decode()
    assert postgres.password not in cmdline  # the store URI travels in the environment
    leader = standin.processes()[postgres.service.pid] if postgres.service else None
    assert leader is not None and "-h\x00127.0.0.1" in Path(
        f"/proc/{leader.pid}/cmdline").read_bytes().decode()


# --- units: config shape, process bookkeeping -------------------------------------------------


def test_autoscaling_config_is_shaped_like_cluster_yaml_and_passes_ray_schema() -> None:
    import yaml
    from ray.autoscaler._private.util import validate_config

    cluster = standin.AutoscalingRay(Path("/tmp/se4lip-cfg"), port=6390, node_ip="192.0.2.1")
    cfg = cluster.autoscaling_config()
    validate_config(copy.deepcopy(cfg))
    assert cfg["provider"]["gcs_address"] == "192.0.2.1:6390"
    types = cfg["available_node_types"]
    prod = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0} == \
        prod["available_node_types"][prod["head_node_type"]]["resources"]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values())
    assert workers["gpu_node"]["resources"]["GPU"] == 1
    assert cfg["max_workers"] == sum(v["max_workers"] for v in workers.values())
    with pytest.raises(standin.StandinError, match="108 bytes"):
        standin.AutoscalingRay(Path("/tmp") / ("x" * 40))


def test_stop_recorded_stops_the_group_and_its_children_and_nothing_else(
    tmp_path: Path,
) -> None:
    # A child that leaves the group (as Ray workers do with setsid) still goes with its parent.
    svc = standin.start_service("sleeper", ["sh", "-c", "setsid sleep 301 & sleep 300 & wait"],
                                tmp_path)
    bystander = subprocess.Popen(["sleep", "302"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(standin.descendants([svc.pid])) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = standin.descendants([svc.pid])
        assert len(tree) == 3
        # A record whose pid was reused by someone else (other start time) is left alone.
        entries = json.loads((tmp_path / standin.RECORD).read_text())
        entries.append({"name": "reused", "pid": bystander.pid, "pgid": bystander.pid,
                        "starttime": 1, "stop_signal": int(signal.SIGTERM)})
        (tmp_path / standin.RECORD).write_text(json.dumps(entries))
        assert standin.stop_recorded(tmp_path, grace_s=5) == ["sleeper"]
        assert not any(standin._alive(p) for p in tree)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        svc.proc.wait(timeout=10)


# --- the autoscaling Ray cluster (slow: real raylets) -----------------------------------------


SCALE_UP = """
    import json, os, time, ray
    ray.init(logging_level="ERROR")

    @ray.remote(num_cpus=0.5)
    def on_cpu():
        return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0.5)
    def state_api():  # what Ray's State API (Train's placement-group cleaner) asks on a node
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    @ray.remote(num_cpus=0.5, num_gpus=1)
    def on_gpu():  # only scheduled on the declared GPU: no CUDA is touched
        return ray.get_runtime_context().get_node_id()

    t = time.monotonic()
    cpu_node = ray.get(on_cpu.remote(), timeout=150)
    t_cpu = time.monotonic() - t
    gpu_node = ray.get(on_gpu.remote(), timeout=150)
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    print(json.dumps({"cpu": cpu_node, "gpu": gpu_node, "t_cpu": t_cpu,
                      "cpu_res": nodes.get(cpu_node), "gpu_res": nodes.get(gpu_node),
                      "state_api": ray.get(state_api.remote(), timeout=150)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_autoscaling_ray_scales_from_zero_and_back_and_stops_clean(
    autoscaling_ray_factory: Any,
) -> None:
    t0 = time.monotonic()
    cluster = autoscaling_ray_factory(idle_timeout_minutes=0.1)
    timings = {"head up": time.monotonic() - t0}
    assert cluster.alive_worker_nodes() == []  # zero workers until work asks for them
    head = standin.processes()[cluster.service.pid]
    assert "--num-cpus=0" in head.argv

    t = time.monotonic()
    res = _finish(_driver(cluster, SCALE_UP, 300), 300)
    timings["scale-up (first task done)"] = res["t_cpu"]
    timings["cpu + gpu tasks"] = time.monotonic() - t
    assert res["cpu_res"]["CPU"] == 1 and "GPU" not in res["cpu_res"], res
    assert res["gpu_res"]["GPU"] == 1, res
    assert res["cpu"] != res["gpu"]
    # A worker node's processes reach this cluster's State API, whatever else runs here.
    assert res["state_api"] == cluster.dashboard_url, res

    t = time.monotonic()
    cluster.wait_for_workers(0, 180, at_least=False)  # idle nodes removed after 6 s
    timings["scale-down to 0"] = time.monotonic() - t
    assert not standin.naming(f"--node_id={res['cpu']}")

    t = time.monotonic()
    temp_dir = str(cluster.temp_dir)
    cluster.stop()
    timings["stop"] = time.monotonic() - t
    assert not _ps_naming(temp_dir)
    print("timings:", {k: round(v, 1) for k, v in timings.items()})


NODE_LOSS = """
    import json, os, time, ray
    ray.init(logging_level="ERROR")
    marks = os.environ["MARKS"]

    @ray.remote(num_cpus=0.5, max_retries=2)
    def work():
        node = ray.get_runtime_context().get_node_id()
        first = not os.path.exists(marks)
        with open(marks, "a") as f:
            f.write(node + "\\n")
        if first:
            time.sleep(300)  # the test kills this node meanwhile
        return node

    print(json.dumps({"finished_on": ray.get(work.remote(), timeout=300)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_node_loses_that_node_and_its_work_moves(autoscaling_ray: standin.AutoscalingRay,
                                                      tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    driver = _driver(autoscaling_ray, NODE_LOSS, 360, {"MARKS": str(marks)})
    try:
        deadline = time.monotonic() + 180
        while not marks.exists():
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the task never started on a worker node"
            time.sleep(0.5)
        victim = marks.read_text().split()[0]
        assert victim in {n["node_id"] for n in autoscaling_ray.alive_worker_nodes()}
        others = {n["node_id"] for n in autoscaling_ray.alive_worker_nodes()} - {victim}

        t = time.monotonic()
        killed = autoscaling_ray.kill_node(victim)
        table = standin.processes()
        assert not any(standin._alive(p) for p in killed)
        assert not standin.naming(f"--node_id={victim}", table)
        # Only that node: the head and any other worker's raylet still run.
        assert autoscaling_ray.service is not None and autoscaling_ray.service.alive()
        for other in others:
            assert standin.naming(f"--node_id={other}", table)
        deadline = time.monotonic() + 120
        while victim in {n["node_id"] for n in autoscaling_ray.alive_worker_nodes()}:
            assert time.monotonic() < deadline, "GCS still lists the killed node as ALIVE"
            time.sleep(0.5)
        gone_s = time.monotonic() - t

        res = _finish(driver, 300)  # the retried task ran on a node started to replace it
        assert res["finished_on"] != victim
        print(f"killed node dropped from ALIVE after {gone_s:.1f} s; work moved after "
              f"{time.monotonic() - t:.1f} s")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()


# --- the whole stand-in, from the command line (slow) -----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_standin_up_and_down_from_the_command_line() -> None:
    """`standin.py up` starts S3 + PostgreSQL MLflow + autoscaling Ray with token auth and
    writes env.sh; clients need exactly those variables; `down` leaves nothing running."""
    state = standin.make_state_dir()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env = {**base, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    t = time.monotonic()
    up = subprocess.run([sys.executable, str(STANDIN), "up", "--dir", str(state),
                         "--auth", "token"], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
    timings = {"up": time.monotonic() - t}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"source {state / 'env.sh'}" in up.stdout
        exported = dict(line.removeprefix("export ").split("=", 1)
                        for line in (state / "env.sh").read_text().splitlines())
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS",
                "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"} <= set(exported)
        assert exported["RAY_AUTH_MODE"] == "token"
        recorded = json.loads((state / standin.RECORD).read_text())
        assert {e["name"] for e in recorded} == {"s3", "postgres", "mlflow", "ray-head",
                                                 "ray-temp-dir"}
        cenv = {**env, **exported}
        with urllib.request.urlopen(f"{exported['MLFLOW_TRACKING_URI']}/health", timeout=10):
            pass
        jobs = subprocess.run([str(VENV_BIN / "se4lip-dist"), "jobs", "list", "--json"],
                              env=cenv, capture_output=True, text=True, timeout=120, check=False)
        assert jobs.returncode == 0 and json.loads(jobs.stdout) == [], jobs.stderr
        # Token auth is on: a wrong token is refused with a message that says so.
        bad = subprocess.run([str(VENV_BIN / "se4lip-dist"), "jobs", "list"],
                             env={**cenv, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True,
                             text=True, timeout=120, check=False)
        assert bad.returncode == 2 and "token we sent was rejected" in bad.stderr, bad.stderr
        again = subprocess.run([sys.executable, str(STANDIN), "up", "--dir", str(state)],
                               env=env, capture_output=True, text=True, timeout=60, check=False)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        t = time.monotonic()
        down = subprocess.run([sys.executable, str(STANDIN), "down", "--dir", str(state)],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        timings["down"] = time.monotonic() - t
        print("timings:", {k: round(v, 1) for k, v in timings.items()})
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _ps_naming(str(state))
    for e in recorded:
        if "pgid" in e:
            assert not [p for p in standin.processes().values()
                        if p.pgid == e["pgid"] and p.state != "Z"], e
    subprocess.run(["rm", "-rf", str(state)], check=False)
