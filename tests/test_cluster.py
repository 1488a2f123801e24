"""Cluster deployment: cluster.yaml, KubeRay/MLflow manifests, the Jobs API wrapper, and the
loopback stand-in of the production cluster (slow: cluster/local/up.sh) whose autoscaling Ray
trains across two worker nodes, runs a submitted job and tracks into a real ``mlflow server``
on PostgreSQL with S3 artifacts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import standin  # cluster/local/standin.py, loaded by conftest.py
import yaml
from typer.testing import CliRunner

from se4lip_dist import remote
from se4lip_dist.cli import app

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LOCAL = CLUSTER / "local"
VENV_BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_VERSION = "2.60.0"
MLFLOW_VERSION = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"]
                      if d.startswith("mlflow=="))

# Files allowed to bind all interfaces, and why (cluster/README.md says the same).
WILDCARD_BINDS = {
    "cluster.yaml": "the head's dashboard inside the VPC, reached through `ray dashboard`",
    "cluster/raycluster.yaml": "pod IP behind the head's ClusterIP Service",
    "cluster/rayjob-tune.yaml": "pod IP behind the head's ClusterIP Service",
    "cluster/rayjob-extract.yaml": "pod IP behind the head's ClusterIP Service",
    "cluster/mlflow.yaml": "pod IP behind the mlflow ClusterIP Service",
}


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _yaml_files() for d in _docs(p)]


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for p, d in _all_docs():
        if d["kind"] == "RayCluster":
            specs.append((p.name, d["spec"]))
        elif d["kind"] == "RayJob":
            specs.append((p.name, d["spec"]["rayClusterSpec"]))
    return specs


def _validate_cluster_yaml(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# --- cluster.yaml -----------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_schema() -> None:
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = _validate_cluster_yaml(cfg)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert {v["node_config"]["InstanceType"].split(".")[0] for v in workers.values()} <= {
        "g5", "p4d", "p5", "g6"}
    assert sum(v.get("min_workers", 0) for v in workers.values()) == 0  # scales from zero
    assert all(v["max_workers"] >= 1 for v in workers.values())
    assert cfg["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def test_cluster_yaml_pins_package_and_token_auth() -> None:
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    setup = " ".join(cfg["setup_commands"])
    assert f"@v{VERSION}" in setup, "install the package at the release tag of this version"
    assert f"ray[default,train,tune,data]=={RAY_VERSION}" in setup
    for cmd in (*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]):
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"])


def test_cluster_yaml_nodes_bring_their_own_credentials() -> None:
    """Nodes get S3 from an instance profile and MLflow's basic auth from its credentials file;
    no secret rides in the docker env or the start commands."""
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for name, node_type in cfg["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), name
    assert any(k.endswith(".mlflow/credentials") for k in cfg["file_mounts"])
    text = json.dumps([cfg["docker"], cfg["setup_commands"], cfg["head_start_ray_commands"],
                       cfg["worker_start_ray_commands"]])
    from se4lip_dist.credentials import SECRET_ENV

    assert not [k for k in SECRET_ENV if k in text]


@pytest.mark.parametrize("where", ["top", "node_type", "docker"])
def test_cluster_yaml_typo_is_rejected(where: str) -> None:
    import jsonschema

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    if where == "top":
        cfg["idle_timout_minutes"] = 5
    elif where == "node_type":
        cfg["available_node_types"]["head"]["resourcez"] = {"CPU": 0}
    else:
        cfg["docker"]["imagee"] = cfg["docker"]["image"]
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        _validate_cluster_yaml(cfg)


# --- Kubernetes manifests ---------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_loads(path: Path) -> None:
    docs = _docs(path)
    assert docs
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), path
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "se4lip"


def test_expected_manifests_exist() -> None:
    kinds = {(p.name, d["kind"]) for p, d in _all_docs()}
    assert ("raycluster.yaml", "RayCluster") in kinds
    assert {("rayjob-tune.yaml", "RayJob"), ("rayjob-extract.yaml", "RayJob")} <= kinds
    assert {("mlflow.yaml", "Deployment"), ("mlflow.yaml", "Service")} <= kinds
    assert ("storage.yaml", "ServiceAccount") in kinds


@pytest.mark.parametrize("name,spec", _ray_cluster_specs(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_ray_pods(name: str, spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for gname, group in groups:
        # Credentials from the pod's identity and Secrets, never from a job.
        assert group["template"]["spec"]["serviceAccountName"] == "se4lip-ray", gname
        for c in group["template"]["spec"]["containers"]:
            assert re.search(rf"ray{re.escape(RAY_VERSION)}-py311-gpu$", c["image"]), c["image"]
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), (name, gname, kind)
            env = {e["name"]: e for e in c["env"]}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow.se4lip")
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in env[k]["valueFrom"], "credentials only from Secrets"
            if gname != "head":
                assert int(res["requests"]["nvidia.com/gpu"]) >= 1
                assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_ray_image_dockerfile_pins_ray() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in text
    assert f"ray[default,train,tune,data]=={RAY_VERSION}" in text


def test_mlflow_deployment() -> None:
    docs = _docs(CLUSTER / "mlflow.yaml")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"].endswith(f":{MLFLOW_VERSION}")
    assert f"mlflow[auth]=={MLFLOW_VERSION}" in (CLUSTER / "mlflow.Dockerfile").read_text()
    args = c["args"]

    def arg(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert arg("--backend-store-uri").startswith("postgresql://")
    assert "$(MLFLOW_DB_PASSWORD)" in arg("--backend-store-uri"), "password from a Secret"
    assert arg("--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in args
    assert arg("--app-name") == "basic-auth"
    hosts = arg("--allowed-hosts").split(",")
    assert "mlflow.se4lip.svc.cluster.local:5000" in hosts and "*" not in hosts
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith("basic_auth.ini")
    vols = dep["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "mlflow-auth" for v in vols)
    assert {"requests", "limits"} <= set(c["resources"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert svc["spec"]["type"] == "ClusterIP"
    assert "postgresql" in (CLUSTER / "mlflow-basic_auth.ini.example").read_text()


def test_only_intended_wildcard_binds() -> None:
    files = [ROOT / "cluster.yaml",
             *sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".md")]
    found = {str(p.relative_to(ROOT)) for p in files if "0.0.0.0" in p.read_text(errors="ignore")}
    assert found == set(WILDCARD_BINDS), "a new 0.0.0.0 bind: justify it here and in the README"
    readme = (CLUSTER / "README.md").read_text()
    assert "0.0.0.0" in readme
    for script in (ROOT / "cluster.yaml", *LOCAL.glob("*.sh")):
        text = script.read_text()
        # Ray's own stop command kills every Ray on the host.
        assert not re.search(r"^\s*[^#\n]*\bray\s+stop\b", text, re.M), script.name
    # up.sh runs standin.py: its dashboard, MLflow, S3 and PostgreSQL bind loopback only.
    code = (LOCAL / "standin.py").read_text()
    for bind in ('"--dashboard-host", "127.0.0.1"', '"--host", "127.0.0.1"',
                 '"-H", "127.0.0.1"', '"-h", "127.0.0.1"'):
        assert bind in code, bind
    assert '/standin.py" up' in (LOCAL / "up.sh").read_text()


# --- entrypoints and documented commands match the CLI ----------------------------------------


def _cli_commands() -> dict[str, set[str]]:
    """``{"train": {"--data", ...}, "jobs list": {...}}`` from the typer app."""
    import typer.main

    group = typer.main.get_command(app)
    out: dict[str, set[str]] = {}

    def walk(cmd: Any, prefix: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            full = f"{prefix}{name}"
            if getattr(sub, "commands", None):
                walk(sub, full + " ")
            else:
                out[full] = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)
                             if o.startswith("-")}

    walk(group, "")
    return out


def _documented_commands() -> list[tuple[str, str]]:
    """(source, command line) for every RayJob entrypoint and se4lip-dist line in the README."""
    cmds = [(p.name, d["spec"]["entrypoint"]) for p, d in _all_docs() if d["kind"] == "RayJob"]
    readme = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            m = re.search(r"(?:^|\s)(se4lip-dist\s.*)$", line)
            if m:
                cmds.append(("README.md", m.group(1)))
    return cmds


def _check_command(argv: list[str], commands: dict[str, set[str]]) -> None:
    assert argv[0] == "se4lip-dist", argv
    name = argv[1]
    if name == "jobs":
        name = f"jobs {argv[2]}"
    # A documented command the CLI lacks is drift between the docs and the code: fail.
    assert name in commands, f"`se4lip-dist {name}` is documented but not a CLI command"
    rest = argv[2:]
    inner = None
    if name == "submit" and "--" in rest:
        rest, inner = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    for tok in rest:
        if tok.startswith("--"):
            assert tok.split("=", 1)[0] in commands[name], f"`{name}` has no option {tok}"
    if inner is not None:
        _check_command(["se4lip-dist", *inner], commands)


@pytest.mark.parametrize("source,line", _documented_commands(),
                         ids=lambda x: x[:60] if isinstance(x, str) else "")
def test_entrypoints_match_cli(source: str, line: str) -> None:
    argv = shlex.split(line.replace("$", ""))
    assert argv[1] in {"tune", "extract", "train", "prepare", "submit", "jobs", "presets"}
    if source.startswith("rayjob-"):
        assert argv[1] == source.removeprefix("rayjob-").removesuffix(".yaml")
        assert "--address" in argv and argv[argv.index("--address") + 1] == "auto"
    _check_command(argv, _cli_commands())


def test_a_documented_command_missing_from_the_cli_fails() -> None:
    commands = _cli_commands()
    with pytest.raises(AssertionError, match="not a CLI command"):
        _check_command(["se4lip-dist", "no-such-command", "--x"], commands)
    with pytest.raises(AssertionError, match="has no option --no-such-option"):
        _check_command(["se4lip-dist", "train", "--no-such-option"], commands)


def test_documented_commands_cover_submit_and_jobs() -> None:
    lines = [line for _, line in _documented_commands()]
    assert any(x.startswith("se4lip-dist submit") and "-- tune" in x for x in lines)
    assert any(x.startswith("se4lip-dist jobs logs") for x in lines)


# --- remote.py units --------------------------------------------------------------------------


def test_runtime_env_passes_settings_never_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "se4lip")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAXYZ")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    env = remote.build_runtime_env(env_vars={"X": "1"})
    assert env["working_dir"] == str(ROOT)
    assert {"/.venv", "/se4lip-runs", "/data"} <= set(env["excludes"])
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                               "AWS_ENDPOINT_URL": "http://s3:9000", "X": "1"}
    assert "working_dir" not in remote.build_runtime_env("")
    assert remote.redact_uri("http://u:p@mlflow:5000/x") == "http://mlflow:5000/x"


@pytest.mark.parametrize("env_vars, named", [
    ({"AWS_SECRET_ACCESS_KEY": "anything"}, "AWS_SECRET_ACCESS_KEY"),
    ({"MLFLOW_TRACKING_TOKEN": "tok-123"}, "MLFLOW_TRACKING_TOKEN"),
    ({"DB": "postgresql://u:pw@db/mlflow"}, "DB"),
    ({"X": "key=s3cret-key"}, "X"),  # a secret value of this shell under another name
])
def test_runtime_env_refuses_a_secret(env_vars: dict[str, str], named: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from se4lip_dist.credentials import SecretInJobError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    with pytest.raises(SecretInJobError, match=f"refusing to send {named} .*instance profile"):
        remote.build_runtime_env("", env_vars=env_vars)


def test_a_tracking_uri_with_a_password_is_not_carried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Joined drivers and Train workers get the same settings as a submitted job."""
    from se4lip_dist.credentials import SecretInJobError
    from se4lip_dist.runtime import worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw-123@mlflow:5000")
    with pytest.raises(SecretInJobError, match="MLFLOW_TRACKING_URI"):
        worker_env()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-123")
    assert worker_env()["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "pw-123" not in repr(worker_env())


def test_submit_refuses_a_secret_before_contacting_the_cluster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    port = standin.free_port()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    for args in (["--env", "AWS_SECRET_ACCESS_KEY=s3cret-key", "--", "presets"],
                 ["--", "train", "--tracking-uri", "http://u:s3cret-key@mlflow:5000"]):
        res = CliRunner().invoke(app, ["submit", "--address", f"http://127.0.0.1:{port}",
                                       "--working-dir", "", *args])
        assert res.exit_code == 2, res.output
        assert "refusing to send" in res.output and "cannot reach" not in res.output
        assert "s3cret-key" not in res.output


def test_job_argv_joins_the_cluster() -> None:
    assert remote.job_argv(["train", "--data", "d"]) == [
        "train", "--data", "d", "--address", "auto"]
    given = ["train", "--address=ray://h:10001"]
    assert remote.job_argv(given) == given
    assert remote.job_argv(["presets"]) == ["presets"]
    with pytest.raises(ValueError):
        remote.job_argv([])
    assert [remote.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 1]


def test_auth_token_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert remote.resolve_auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert remote.resolve_auth_token() == "home"
    (tmp_path / "tok").write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert remote.resolve_auth_token() == "file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert remote.resolve_auth_token() == "env"
    assert remote.resolve_auth_token("arg") == "arg"


def test_submit_to_nothing_fails_clearly() -> None:
    port = standin.free_port()
    res = CliRunner().invoke(app, ["submit", "--address", f"http://127.0.0.1:{port}", "--",
                                   "presets"])
    assert res.exit_code == 2
    assert "cannot reach the Ray dashboard" in res.output


# --- slow: a real two-node Ray on loopback + a real MLflow server ------------------------------


def _cli(*args: str, env: dict[str, str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "se4lip-dist"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _group_members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines()
            if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")]


PROBE = """
import json, sys, ray, ray.train
from ray.train.torch import TorchTrainer

def per_worker(config):
    ctx = ray.train.get_context()
    node = ray.get_runtime_context().get_node_id()
    open(f"{config['out']}/rank{ctx.get_world_rank()}", "w").write(node)

ray.init(address=sys.argv[1])
at_start = len([n for n in ray.nodes() if n["Alive"]])
# STRICT_SPREAD: the autoscaler has to start one worker node per rank.
TorchTrainer(per_worker, train_loop_config={"out": sys.argv[2]},
             scaling_config=ray.train.ScalingConfig(
                 num_workers=2, resources_per_worker={"CPU": 0.5},
                 placement_strategy="STRICT_SPREAD"),
             run_config=ray.train.RunConfig(name="probe", storage_path=sys.argv[3])).fit()
print(json.dumps({"nodes_at_start": at_start,
                  "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
"""


def _rest(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_node_ray_train_jobs_and_mlflow(tmp_path: Path) -> None:
    """cluster/local/up.sh's stand-in (S3, PostgreSQL-backed MLflow with S3 artifacts, Ray
    autoscaling from zero workers, token auth): training spans two worker nodes the autoscaler
    starts; jobs run through the Jobs API; a wrong token fails clearly; down.sh stops exactly
    the processes up.sh started. Other Ray on this machine is left be: the stand-in has its own
    ports and temp dir, and every client here names its cluster."""
    # Ray's unix socket paths live under the state dir and must stay below 108 bytes.
    state = standin.make_state_dir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env = {**base, "SE4LIP_LOCAL_DIR": str(state), "PYTHON": sys.executable,
           "RAY_AUTH_MODE": "token", "HOME": str(tmp_path),
           # Logical CPUs per worker node (2 cores here): a train worker plus Ray Data's tasks.
           "WORKER_CPUS": "3", "CPU_NODES": "2", "GPU_NODES": "0",
           # Nodes stay between the steps below (scaling down is test_standin's business).
           "IDLE_TIMEOUT_MINUTES": "3",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    up = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True,
                        timeout=400, check=False)
    record = state / standin.RECORD
    groups = {e["name"]: e["pgid"] for e in
              (json.loads(record.read_text()) if record.exists() else []) if "pgid" in e}
    timings: dict[str, float] = {"up": time.monotonic() - t0}
    try:
        assert up.returncode == 0, up.stdout + up.stderr + _tail_logs(state)
        assert set(groups) == {"s3", "postgres", "mlflow", "ray-head"}
        exported = dict(line.removeprefix("export ").split("=", 1)
                        for line in (state / "env.sh").read_text().splitlines())
        gcs, dash = exported["RAY_ADDRESS"], exported["RAY_API_SERVER_ADDRESS"]
        mlflow_url = exported["MLFLOW_TRACKING_URI"]
        assert exported["RAY_AUTH_MODE"] == "token"
        # Every client runs with the Ray auth mode and token env.sh exports; no S3 variables:
        # clients only talk HTTP to MLflow.
        cenv = {**env, **{k: v for k, v in exported.items() if k.startswith("RAY_")}}

        # 1. A bare TorchTrainer: two workers, one per worker node, both started on demand.
        t = time.monotonic()
        (tmp_path / "probe.py").write_text(PROBE)
        (tmp_path / "ranks").mkdir()
        probe = subprocess.run(
            [sys.executable, str(tmp_path / "probe.py"), gcs, str(tmp_path / "ranks"),
             str(tmp_path / "probe-results")],
            env=cenv, capture_output=True, text=True, timeout=300, check=False)
        assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
        counts = json.loads(probe.stdout.strip().splitlines()[-1])
        assert counts == {"nodes_at_start": 1, "nodes": 3}, counts  # the head, then 2 more
        nodes = {p.name: p.read_text() for p in (tmp_path / "ranks").iterdir()}
        assert set(nodes) == {"rank0", "rank1"} and len(set(nodes.values())) == 2, nodes
        timings["probe (2 nodes from zero)"] = time.monotonic() - t

        # 2. A job through the Jobs API (our CLI), exit status mapped from the job's.
        t = time.monotonic()
        res = _cli("submit", "--address", dash, "--", "presets", env=cenv, timeout=300,
                   cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "cpu-small" in res.stdout and "SUCCEEDED" in res.stderr
        res = _cli("jobs", "list", "--address", dash, "--json", env=cenv, timeout=60, cwd=ROOT)
        assert res.returncode == 0 and any(j["status"] == "SUCCEEDED"
                                           for j in json.loads(res.stdout))
        timings["submit presets"] = time.monotonic() - t

        # 3. Token auth: a wrong token and no token both fail with a message that says so.
        bad = _cli("jobs", "list", "--address", dash, env={**cenv, "RAY_AUTH_TOKEN": "0" * 64},
                   timeout=60, cwd=ROOT)
        assert bad.returncode == 2 and "token we sent was rejected" in bad.stderr, bad.stderr
        no_env = {k: v for k, v in cenv.items() if k != "RAY_AUTH_TOKEN_PATH"}
        none = _cli("jobs", "list", "--address", dash, env=no_env, timeout=60, cwd=ROOT)
        assert none.returncode == 2 and "no token was found" in none.stderr, none.stderr

        # 4. train on both worker nodes, tracked in the mlflow server; found again through
        # REST, its artifacts in the S3 bucket behind the server.
        from shard_fixtures import write_synthetic_shards

        t = time.monotonic()
        data = tmp_path / "shards"
        write_synthetic_shards(data, n_clips=12, n_frames=40, val_clips=2, clips_per_shard=6)
        tiny = ["model.gru_layers=1", "model.embed_dim=32", "model.lip_channels=[8,16,16,32,32]",
                "model.lip_height=32", "model.lip_width=32", "train.batch_size=16",
                "train.pairs_per_segment=8", "train.max_offset=4", "train.shuffle_buffer=64",
                # 1.6 CPU per worker on 3-CPU nodes: two never fit on one node, so they span
                # both, and each node keeps more than a CPU for Ray Data's tasks.
                "train.num_workers=2", "train.cpus_per_worker=1.6"]
        res = _cli("train", "--data", str(data), "--epochs", "1", "--max-steps", "4",
                   *[a for s in tiny for a in ("--set", s)], "--address", gcs,
                   "--tracking-uri", mlflow_url, "--experiment", "cluster-it",
                   "--register", "se4lip-cluster-it", "--name", "two-node",
                   "--storage-path", str(tmp_path / "ray-results"), "--json",
                   env=cenv, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        # Joining a cluster, Ray echoes worker logs and raylet warnings: none may reach stdout.
        result = json.loads(res.stdout)
        assert len(set(result["worker_node_ids"])) == 2, result["worker_node_ids"]
        exp = _rest(mlflow_url, "experiments/get-by-name?experiment_name=cluster-it")
        runs = _rest(mlflow_url, "runs/search",
                     {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
        (run,) = [r for r in runs if r["info"]["run_id"] == result["run_id"]]
        assert run["info"]["status"] == "FINISHED"
        # Served artifacts: the server stores them, clients only see mlflow-artifacts:/ URIs.
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")
        assert {m["key"] for m in run["data"]["metrics"]} >= {"val/loss", "val/offset_acc"}
        model = _rest(mlflow_url, "registered-models/get?name=se4lip-cluster-it")
        versions = model["registered_model"]["latest_versions"]
        assert versions and versions[0]["run_id"] == result["run_id"]
        import boto3

        s3 = boto3.client("s3", endpoint_url=exported["AWS_ENDPOINT_URL"],
                          aws_access_key_id=exported["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"],
                          region_name=exported["AWS_DEFAULT_REGION"])
        objects = s3.list_objects_v2(Bucket="mlflow", Prefix="mlflow/").get("Contents", [])
        assert any(result["run_id"] in o["Key"] for o in objects), objects[:5]
        timings["train 2 nodes"] = time.monotonic() - t
    finally:
        t = time.monotonic()
        down = subprocess.run([str(LOCAL / "down.sh")], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        timings["down"] = time.monotonic() - t
        print("timings:", {k: round(v, 1) for k, v in timings.items()})
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 15  # SIGKILLed processes take a moment to become zombies
    while any(_group_members(p) for p in groups.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for name, pgid in groups.items():
        assert not _group_members(pgid), (name, _group_members(pgid))
    leftover = subprocess.run(["pgrep", "-af", str(state)], capture_output=True, text=True,
                              check=False).stdout
    assert not leftover.strip(), leftover
    shutil.rmtree(state, ignore_errors=True)


def _tail_logs(state: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                   for p in sorted(state.glob("*.log")))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_mlflow_server_helper(tmp_path: Path) -> None:
    """The stand-in's sqlite MLflow server answers REST on 127.0.0.1 with served artifacts;
    stop ends its process group."""
    with standin.MlflowServer.with_sqlite(tmp_path / "mlflow") as server:
        assert server.url.startswith("http://127.0.0.1:")
        exp_id = _rest(server.url, "experiments/create", {"name": "helper"})["experiment_id"]
        exp = _rest(server.url, f"experiments/get?experiment_id={exp_id}")["experiment"]
        assert exp["artifact_location"].startswith("mlflow-artifacts:")
        assert server.service is not None
        pid = server.service.pid
        assert _group_members(pid)
    assert not _group_members(pid)
    assert urllib.parse.urlsplit(server.url).hostname == "127.0.0.1"


def test_tune_trials_do_not_carry_the_drivers_aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime env (the State API
    shows them); tune turns that off, and the trials use their nodes' own credentials."""
    from ray.tune.execution import class_cache

    from se4lip_dist.credentials import keep_secrets_out_of_tune

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAXYZ")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)

    def trial_env() -> dict[str, str]:
        class Trainable:
            pass

        actor = class_cache._ActorClassCache().get(Trainable)
        return actor._default_options["runtime_env"]["env_vars"]

    assert trial_env()["AWS_SECRET_ACCESS_KEY"] == "s3cret-key"  # Tune's default
    keep_secrets_out_of_tune()
    env = trial_env()
    assert not [k for k in env if k.startswith("AWS_")], env
