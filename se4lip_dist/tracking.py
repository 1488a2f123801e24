"""MLflow tracking: where runs go, and what a training run records.

The driver resolves the tracking URI, checks that a remote server answers (before Ray starts),
creates the experiment and the run; rank 0 of the training workers then logs into that run
through :class:`RunLogger` (an ``MlflowClient`` bound to a run id), so no process depends on
MLflow's global "active run" state.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from se4lip_dist.plots import offset_curve_figure, pyplot, save_figure
from se4lip_dist.storage import redact_uri

T = TypeVar("T")

RUNS_DIR = "se4lip-runs"
"""Folder under the working directory that holds the embedded store, artifacts and checkpoints."""


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or the store cannot be used."""


def default_tracking_uri(base: str | Path | None = None) -> str:
    """The embedded store: ``sqlite:///<base>/se4lip-runs/mlflow.db`` (base defaults to cwd)."""
    root = Path(base or os.getcwd()).resolve() / RUNS_DIR
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Argument, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store under cwd."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a remote (http/https) tracking server does not answer ``/health``.

    Local stores (sqlite, file) get their folder created instead.

    Raises:
        TrackingError: the server is unreachable or answers with an error.
    """
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status >= 400:
                    raise TrackingError(f"MLflow server {redact_uri(uri)} answered {resp.status}")
        except urllib.error.HTTPError as e:
            # An auth-protected server may refuse /health without credentials: it is up.
            if e.code in (401, 403):
                return
            raise TrackingError(f"MLflow server {redact_uri(uri)} answered HTTP {e.code}") from e
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {redact_uri(uri)}: {e}. Start it, "
                "or drop --tracking-uri/MLFLOW_TRACKING_URI to use the local store"
            ) from e
    elif scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    elif scheme in ("", "file"):
        Path(urlsplit(uri).path or uri).mkdir(parents=True, exist_ok=True)


def check_cluster_store(uri: str, command: str) -> None:
    """A run on a Ray cluster logs from its workers' nodes: refuse a node-local store.

    Raises:
        TrackingError: ``uri`` is a sqlite file or a folder, which every node would create
            separately on its own disk.
    """
    if urlsplit(uri).scheme in ("sqlite", "file", ""):
        raise TrackingError(
            f"{command} on a Ray cluster logs from the workers' nodes, and the MLflow store "
            f"{redact_uri(uri)} is a file on each node's own disk: pass --tracking-uri "
            "http://<mlflow server> (or set MLFLOW_TRACKING_URI) to a server every node "
            "reaches; cluster/README.md shows one")


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the experiment if missing (in the driver: sqlite schema creation races otherwise).

    Returns:
        The experiment id.
    """
    if urlsplit(tracking_uri).scheme == "sqlite":
        _create_sqlite_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if urlsplit(tracking_uri).scheme == "sqlite":
        # Keep artifacts next to the sqlite store instead of MLflow's ./mlruns default.
        db = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db.parent / "artifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:
        # Another process created it between the lookup and here (two commands starting on a
        # fresh store); a server reports that as a constraint error, not always as "exists".
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _create_sqlite_store(tracking_uri: str) -> None:
    """Create a missing embedded store with its ``Default`` experiment's artifacts beside it
    (``artifacts/0``); MLflow would point it at ``./mlruns/0`` under the current folder."""
    db = Path(tracking_uri[len("sqlite:///"):])
    if db.is_file():
        return

    SqlAlchemyStore(tracking_uri, (db.parent / "artifacts").resolve().as_uri())


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""Opens experiments in MLflow 3's model-training view (runs, charts, models), not GenAI's."""


def existing_store(uri: str) -> None:
    """Raise :class:`TrackingError` when a local store does not exist (reading must not create
    an empty one); remote servers are checked with :func:`check_reachable`."""
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise TrackingError(
                f"no MLflow store at {path}: nothing was tracked there yet. Runs go to "
                f"./{RUNS_DIR}/mlflow.db under the folder a command ran in; pass "
                "--tracking-uri (or MLFLOW_TRACKING_URI) to read another store")
    elif scheme in ("http", "https"):
        check_reachable(uri)
    elif scheme in ("", "file") and not Path(urlsplit(uri).path or uri).is_dir():
        raise TrackingError(f"no MLflow store at {uri}")


def run_context_tags(command: str) -> dict[str, str]:
    """What the MLflow UI shows as a run's source, user and git commit."""
    tags = {
        "mlflow.source.name": f"se4lip-dist {command}",
        "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL",
    }
    with contextlib.suppress(KeyError, OSError):
        tags["mlflow.user"] = getpass.getuser()
    rev = git_revision()
    if rev:
        tags["mlflow.source.git.commit"] = rev
    return tags


def log_datasets(tracking_uri: str, run_id: str, *, data_hash: str, source: str,
                 splits: dict[str, list[str]]) -> None:
    """Record the shards a run used in MLflow's Datasets panel, one dataset per split.

    Args:
        data_hash: the manifest's content hash (the shards' identity).
        source: where the shards are (credentials removed before logging).
        splits: ``{"training": clip ids, "validation": clip ids}``; each split's digest hashes
            the data hash and its clip ids, so a different split shows as a different dataset.
    """
    inputs = []
    for context, clips in splits.items():
        digest = hashlib.sha256(f"{data_hash}:{context}:{','.join(sorted(clips))}".encode())
        inputs.append(DatasetInput(
            Dataset(name=f"shards-{data_hash}-{context}", digest=digest.hexdigest()[:16],
                    source_type="se4lip-shards",
                    source=json.dumps({"uri": redact_uri(source), "manifest_hash": data_hash}),
                    profile=json.dumps({"clips": len(clips)})),
            tags=[InputTag("mlflow.data.context", context)]))
    MlflowClient(tracking_uri=tracking_uri).log_inputs(run_id, datasets=inputs)


def log_parent_model(tracking_uri: str, run_id: str, info: dict[str, Any]) -> None:
    """Record the model a run started from (``train.init``): a tag, and MLflow's model input
    (lineage shown on both models) when the source is a logged model; once per run."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = redact_uri(info.get("pinned_uri") or info["uri"])
    if client.get_run(run_id).data.tags.get("se4lip.init") == parent:
        return  # a restarted run: recorded already
    client.set_tag(run_id, "se4lip.init", parent)
    if info.get("model_id"):
        client.log_inputs(run_id, models=[LoggedModelInput(info["model_id"])])


def set_description(tracking_uri: str, run_id: str, text: str) -> None:
    """The run's description (markdown) in the MLflow UI."""
    MlflowClient(tracking_uri=tracking_uri).set_tag(run_id, "mlflow.note.content", text)


def git_revision(path: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path`` (None outside git or no commit)."""
    where = Path(path or Path(__file__).parent)
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    config_yaml: str,
    command: str = "train",
    description: str | None = None,
) -> str:
    """Create the experiment (if needed) and a run with params, tags and the config file.

    The run also gets MLflow's source/user/git tags (:func:`run_context_tags` for ``command``)
    and, when given, a markdown ``description``.

    Returns:
        The new run id.
    """
    exp_id = ensure_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri=tracking_uri)
    all_tags = {**run_context_tags(command), **tags}
    if description:
        all_tags["mlflow.note.content"] = description
    run = client.create_run(exp_id, run_name=run_name,
                            tags={k: v for k, v in all_tags.items() if v is not None})
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a log_batch at 100 params
        client.log_batch(run_id, params=items[i:i + 100])
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again."""
    MlflowClient(tracking_uri=tracking_uri).update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close a run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


def _param_value(v: Any) -> str:
    text = redact_uri(v) if isinstance(v, str) else str(v)
    return text[:6000]


class RunLogger:
    """Logs metrics and artifacts of one run from any process (used by rank 0).

    Args:
        tracking_uri: the resolved tracking URI.
        run_id: the run created by the driver.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (non-finite values are skipped)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, int | float) and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def plots(self, history: list[dict[str, float]], offset_curve: dict[str, Any] | None) -> None:
        """Loss/accuracy curves and a distance-vs-offset curve, as PNG artifacts under plots/."""
        plt = pyplot()
        with tempfile.TemporaryDirectory() as tmp:
            if history:
                fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
                epochs = [h["epoch"] for h in history]
                for key in ("train/loss", "val/loss"):
                    if all(key in h for h in history):
                        ax1.plot(epochs, [h[key] for h in history], marker="o", label=key)
                ax1.set_xlabel("epoch")
                ax1.set_ylabel("BCE")
                ax1.legend()
                for key in ("val/sync_acc", "val/shift_acc", "val/offset_acc"):
                    if all(key in h for h in history):
                        ax2.plot(epochs, [h[key] for h in history], marker="o", label=key)
                ax2.set_xlabel("epoch")
                ax2.set_ylim(0, 1)
                ax2.legend()
                fig.tight_layout()
                save_figure(fig, Path(tmp) / "curves.png")
                self.client.log_artifact(self.run_id, str(Path(tmp) / "curves.png"), "plots")
            if offset_curve:
                fig = offset_curve_figure(
                    offset_curve["distances"],
                    f"{offset_curve.get('clip_id', 'val clip')}: offset "
                    f"{offset_curve.get('offset')}", predicted=offset_curve.get("offset"))
                save_figure(fig, Path(tmp) / "offset_curve.png")
                self.client.log_artifact(self.run_id, str(Path(tmp) / "offset_curve.png"), "plots")

    def text(self, text: str, artifact_file: str) -> None:
        """Log a text artifact."""
        self.client.log_text(self.run_id, text, artifact_file)

    def figure(self, fig: Any, name: str, folder: str = "plots") -> None:
        """Log a matplotlib figure as ``folder/name`` (PNG) and close it."""
        with tempfile.TemporaryDirectory() as tmp:
            save_figure(fig, Path(tmp) / name)
            self.client.log_artifact(self.run_id, str(Path(tmp) / name), folder)

    def system_metrics(self, *, resume: bool = False) -> Any:
        """Start MLflow's system-metrics monitor (CPU, memory, disk, network, GPU when
        available) for this run; call ``.finish()`` on the returned monitor at the end."""
        monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        return monitor

    def table(self, columns: dict[str, list[Any]], artifact_file: str) -> None:
        """Log a table (MLflow shows it in the run's artifacts and evaluation views)."""
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)


def job_tracking_uri(uri: str | None, address: str | None, command: str) -> str:
    """The tracking URI a job logs to, checked before Ray starts: a server that does not answer
    fails in seconds, and a node-local store is refused for a job on a Ray cluster."""
    uri = resolve_tracking_uri(uri)
    check_reachable(uri)
    if address or os.environ.get("RAY_ADDRESS"):
        check_cluster_store(uri, command)
    return uri


def none_if_missing(call: Callable[[], T]) -> T | None:
    """``call()``, or None where MLflow answers that the thing asked for does not exist; every
    other error is raised (a caller must not read a failing store as "none")."""
    try:
        return call()
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


__all__ = [
    "RUNS_DIR",
    "RunLogger",
    "TrackingError",
    "check_cluster_store",
    "check_reachable",
    "default_tracking_uri",
    "end_run",
    "ensure_experiment",
    "existing_store",
    "git_revision",
    "job_tracking_uri",
    "log_datasets",
    "log_parent_model",
    "none_if_missing",
    "reopen_run",
    "resolve_tracking_uri",
    "run_context_tags",
    "set_description",
    "start_run",
]
