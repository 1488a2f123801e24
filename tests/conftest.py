"""Shared fixtures: where the shared real data lives, and skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SE4LIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
INSIGHTFACE_ROOT = Path(
    os.environ.get("SE4LIP_INSIGHTFACE_ROOT", SHARED_DATA.parent / "models" / "insightface")
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-video folder; skips the test when it is absent."""
    if not (SHARED_DATA / "grid_s1" / "video").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SE4LIP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def insightface_root() -> Path:
    """A model root holding models/buffalo_sc/det_500m.onnx; skips when absent."""
    if not (INSIGHTFACE_ROOT / "models" / "buffalo_sc").is_dir():
        pytest.skip(f"InsightFace model root not found at {INSIGHTFACE_ROOT}")
    return INSIGHTFACE_ROOT


def _load_standin():  # type: ignore[no-untyped-def]
    """cluster/local/standin.py: the loopback stand-in both up.sh and these fixtures use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("standin", ROOT / "cluster" / "local" /
                                                  "standin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["standin"] = module
    spec.loader.exec_module(module)
    return module


standin = _load_standin()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real S3 API (moto server) on 127.0.0.1 for the whole session."""
    server = standin.S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The standard AWS variables pointing at the loopback S3, set for one test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def _require(what: str, start):  # type: ignore[no-untyped-def]
    """Start a stand-in service; a missing binary or a failed start fails the test, loudly."""
    try:
        return start()
    except (standin.StandinError, FileNotFoundError) as e:
        pytest.fail(f"{what} of the loopback stand-in did not start: {e} "
                    "(`.ci/run` installs what it needs: `apt-get install -y postgresql`, "
                    "`pip install -e '.[dev]'`)", pytrace=False)


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """Debian's PostgreSQL on 127.0.0.1 (fresh data dir, run as the postgres OS user) with an
    ``mlflow`` database and role, for the whole session; ``.uri`` is its SQLAlchemy URI."""
    import shutil

    state = standin.make_state_dir("se4lip-pg-")
    server = _require("PostgreSQL", lambda: standin.Postgres(state).start())
    yield server
    server.stop()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real ``mlflow server`` on 127.0.0.1: PostgreSQL backend store, artifacts served from
    ``s3://mlflow/mlflow`` on the loopback S3 (the production shape), for the whole session."""
    server = _require("the MLflow server", lambda: standin.MlflowServer.with_postgres(
        tmp_path_factory.mktemp("mlflow-pg"), postgres, s3_server).start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_sqlite_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The cheaper variant: ``mlflow server`` on a sqlite store with local served artifacts."""
    server = _require("the MLflow server (sqlite)", lambda: standin.MlflowServer.with_sqlite(
        tmp_path_factory.mktemp("mlflow-sqlite")).start())
    yield server
    server.stop()


def _autoscaling_clusters():  # type: ignore[no-untyped-def]
    """A factory of autoscaling Ray clusters; every one is stopped and checked gone at the end."""
    import shutil

    started = []

    def make(**kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("idle_timeout_minutes", 0.1)
        state = standin.make_state_dir()
        cluster = standin.AutoscalingRay(state, **kwargs)
        started.append(cluster)
        return _require("the autoscaling Ray cluster", cluster.start)

    yield make
    for cluster in started:
        cluster.stop()  # raises if anything naming its temp dir survived
        if os.environ.get("SE4LIP_KEEP_STANDIN") != "1":  # keep the logs to debug a failure
            shutil.rmtree(cluster.state_dir, ignore_errors=True)


@pytest.fixture
def autoscaling_ray_factory():  # type: ignore[no-untyped-def]
    """``make(**AutoscalingRay kwargs)`` -> a started autoscaling Ray cluster (0 workers, fake
    multi-node provider, auth disabled); all are stopped after the test, nothing left running."""
    yield from _autoscaling_clusters()


@pytest.fixture
def autoscaling_ray(autoscaling_ray_factory):  # type: ignore[no-untyped-def]
    """One autoscaling Ray cluster for one test: 0-CPU head, ``cpu_node`` {CPU: 1} x0..2 and
    ``gpu_node`` {CPU: 1, GPU: 1 (declared only)} x0..1, idle nodes removed after 6 s."""
    return autoscaling_ray_factory()


@pytest.fixture(scope="module")
def autoscaling_ray_module():  # type: ignore[no-untyped-def]
    """The same cluster shared by the tests of one module."""
    clusters = _autoscaling_clusters()
    yield next(clusters)()
    next(clusters, None)
