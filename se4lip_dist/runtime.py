"""Starting or joining Ray the same way in every command.

The one library module that imports Ray inside its functions: the CLI sets the library switches
of :data:`QUIET_ENV` through it, and Ray Data reads them when it is first imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from se4lip_dist.credentials import job_env

OBJECT_STORE_BYTES = 512 * 1024 * 1024
_log_to_driver = True


def set_log_to_driver(enabled: bool) -> None:
    """Whether Ray echoes worker output on this process's stdout (off for ``--json``)."""
    global _log_to_driver
    _log_to_driver = enabled


LOG_DIR_ENV = "SE4LIP_LOG_DIR"
"""Folder for the log files of quiet runs (default: ``<temp dir>/se4lip-dist``)."""
QUIET_ENV: dict[str, str] = {
    # Ray Data's per-operator bars, in this process and in Train workers' streaming splits.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Every tqdm bar (MLflow's artifact copies among them): carriage returns in a log file.
    "TQDM_DISABLE": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # MLflow's "View run ... at: http://..." after every run that ends on a tracking server.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""Library switches for quiet runs; set before Ray starts, so a local Ray's workers inherit
them (a user's own setting wins)."""


def log_file_path(command: str, folder: str | Path | None = None) -> Path:
    """A new log file for one run of ``command``: ``<folder>/<command>-<time>-<pid>.log``
    (folder: ``SE4LIP_LOG_DIR``, else ``<temp dir>/se4lip-dist``)."""
    base = Path(folder or os.environ.get(LOG_DIR_ENV)
                or Path(tempfile.gettempdir()) / "se4lip-dist")
    return base / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class LogRoute:
    """This process's stdout and stderr (file descriptors 1 and 2) sent to a log file.

    Whatever a library writes there lands in the file: the Python logging of Ray, Ray Data,
    Tune and MLflow, the raylet warnings Ray prints on the driver, the C++ log lines of the
    driver's core worker, Python warnings, and Ray workers' output echoed to the driver. The
    terminal stays reachable through :attr:`terminal_out` and :attr:`terminal_err` (copies of
    the original descriptors), which the CLI's own consoles write to.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal_out = os.dup(1)
        self.terminal_err = os.dup(2)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    def restore(self) -> None:
        """Point descriptors 1 and 2 at the terminal again."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.terminal_out, 1)
        os.dup2(self.terminal_err, 2)


def quiet_output(log_path: Path) -> LogRoute:
    """Quiet by default: no progress bars or run-URL banners from libraries, and everything
    else they print (logs, warnings, Ray workers' output) in ``log_path``.

    Call before Ray starts: a local Ray's processes inherit :data:`QUIET_ENV`.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    set_log_to_driver(True)  # workers' output joins the log file, not Ray's session folder
    return LogRoute(log_path)


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             dashboard: bool = False, **kwargs: Any) -> None:
    """Join the cluster at ``address`` or start a local Ray with its dashboard on 127.0.0.1.

    Ray 2.60's core services (GCS, raylet, object manager) still listen on every interface of a
    local head, and ``_node_ip_address`` does not change that; with token auth off, run on a
    trusted network or export ``RAY_AUTH_MODE=token`` before starting.

    Local mode turns off usage stats and token auth (Ray 2.60 enables token auth for new local
    clusters, which then trips ``ray job``/``ray start --address`` clients) unless the user set
    ``RAY_AUTH_MODE`` themselves, and caps the object store so small machines keep their memory.

    A local cluster is always a new one, even when a ``ray start`` head runs on this machine
    (Ray's own ``ray.init()`` would join that one): pass its address to use it.

    Args:
        address: ``ray://`` or ``host:port`` of a running cluster; None uses ``RAY_ADDRESS``
            when set (inside a Ray job) and otherwise starts a local one.
        num_cpus: logical CPUs of the local cluster (default: all cores).
        dashboard: start the dashboard (Tune's placement-group cleanup needs its State API);
            the local cluster's workers get its URL as ``RAY_API_SERVER_ADDRESS``.
        **kwargs: passed on to ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Set by Ray's job supervisor for a submitted job's driver, whose runtime env already
    # carries the job's variables (Ray refuses a second definition of the same keys).
    inside_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if not inside_job and "runtime_env" not in kwargs:
            # Tasks and actors on other nodes do not inherit this shell's environment; they get
            # its settings, never its secrets (the nodes have their own credentials).
            kwargs["runtime_env"] = {"env_vars": job_env()}
        ray.init(address=address, log_to_driver=_log_to_driver, **kwargs)
        pin_ray_data_actors()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    dashboard_port = None
    if dashboard:
        # A State API call without an address (Train V2's placement-group cleaner makes one
        # every second in a worker) otherwise guesses the cluster from the host's raylets and
        # Ray's temp dir: with another Ray on the machine it fails or asks that other cluster.
        dashboard_port = _free_port()
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
            **runtime_env.get("env_vars", {}),
        }
        kwargs["runtime_env"] = runtime_env
    ray.init(
        address="local",  # never a `ray start` head that happens to run on this machine
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=_log_to_driver,
        **kwargs,
    )


@contextlib.contextmanager
def own_sigint() -> Iterator[None]:
    """Give the process its Ctrl-C handler back after a Ray Train or Tune ``fit``.

    ``TorchTrainer.fit`` installs a SIGINT handler that aborts its controller actor and never
    removes it: a later Ctrl-C (while the gate uploads, say) would then raise "Can't find actor"
    instead of KeyboardInterrupt.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_ray_data_actors() -> None:
    """Start Ray Data's detached helper actors (stats, autoscaling coordinator) on this node.

    Ray Data creates them, detached and pinned, on the node of whichever process first runs a
    pipeline. When that is a Tune trial or a Train worker on an autoscaled node, they keep that
    node busy forever and the autoscaler never removes it. A 0-CPU pipeline run here first puts
    them on the driver's node (the head, on a cluster).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ray.data.from_items([0]).map_batches(_identity, num_cpus=0).materialize()
    finally:
        ctx.enable_progress_bars = bars


def _identity(batch: Any) -> Any:
    return batch


def cluster_cpus() -> float:
    """CPUs Ray can schedule on (call after :func:`init_ray`)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def worker_env() -> dict[str, str]:
    """Env for Ray Train workers: the job's settings (no secrets), quiet defaults."""
    env = job_env()
    env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    return env
