"""A loopback stand-in for the production path: S3 API, PostgreSQL-backed MLflow, autoscaling Ray.

Used by the tests (tests/conftest.py imports it) and by ``cluster/local/up.sh`` for a person to
try the same thing. Every service binds 127.0.0.1, runs in its own process group under one state
folder, and is stopped by that process group's id, never by Ray's own stop command or by
process name.

    python cluster/local/standin.py up --dir /tmp/se4lip-standin   # prints the env to source
    python cluster/local/standin.py down --dir /tmp/se4lip-standin

Services:
- :class:`S3Server`: moto's S3 server (``moto_server``), credentials are dummies.
- :class:`Postgres`: Debian's PostgreSQL in a fresh data dir, run as the ``postgres`` OS user.
- :class:`MlflowServer`: ``mlflow server`` with a PostgreSQL (or sqlite) backend store and
  artifacts served from the loopback S3 (or a local folder).
- :class:`AutoscalingRay`: a Ray head with 0 CPUs and Ray's fake multi-node provider: worker
  nodes are extra raylets the autoscaler starts on demand and removes when idle.
- :class:`Standin`: all of them together, with one ``env()`` for clients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

S3_ACCESS_KEY = "standin"
S3_SECRET_KEY = "standin-secret"
S3_REGION = "us-east-1"

RECORD = "services.json"
"""File in the state folder listing every process group started there (read by ``down``)."""

STATE_FILES = frozenset({RECORD, "services.tmp", "env.sh", "autoscaling.json", "ray_auth_token",
                         "pg", "ray", "mlflow.db", "artifacts"})
"""What ``up`` writes in its folder besides ``*.log`` and ``*.pid`` (and may clear on a rerun)."""

# Ray's unix sockets live at <temp dir>/session_<date>_<pid>/sockets/<name>; the whole path must
# stay below 108 bytes (sun_path), which leaves about 40 for the temp dir itself.
MAX_RAY_TEMP_DIR = 40

DEFAULT_NODE_TYPES: dict[str, dict[str, Any]] = {
    # cluster.yaml's worker types scaled down to a 2-core machine. gpu_node only *declares* a GPU:
    # the scheduler and autoscaler plan with it, but nothing can run CUDA on it here.
    "cpu_node": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 2},
    "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 1},
}
HEAD_NODE_TYPE = "ray.head.default"  # the name the fake provider gives the head


class StandinError(RuntimeError):
    """A stand-in service that did not come up (the message names its log file)."""


# --- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One process as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    state: str
    starttime: int
    argv: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return Proc(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), state=fields[0],
                starttime=int(fields[19]), argv=argv)


def processes() -> dict[int, Proc]:
    """Every process on this machine, by pid (zombies included)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (p := _read_proc(int(name))) is not None:
            table[p.pid] = p
    return table


def descendants(pids: Iterable[int], table: Mapping[int, Proc] | None = None) -> set[int]:
    """``pids`` and all their children, grandchildren, ... (in ``table``, default: now)."""
    table = processes() if table is None else table
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out: set[int] = set()
    todo = [p for p in pids if p in table]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def naming(text: str, table: Mapping[int, Proc] | None = None) -> set[int]:
    """Live processes whose command line names ``text`` (never this process).

    ``text`` must end there or be followed by ``/`` or a separator: ``/tmp/x/ray`` names
    ``--temp-dir=/tmp/x/ray`` and ``/tmp/x/ray/session_1/...``, not ``/tmp/x/ray-results``.
    """
    table = processes() if table is None else table
    pattern = re.compile(re.escape(text) + r"(?![\w.-])")
    return {p.pid for p in table.values()
            if p.state != "Z" and p.pid != os.getpid() and pattern.search(p.cmdline)}


def _alive(pid: int, starttime: int | None = None) -> bool:
    p = _read_proc(pid)
    return p is not None and p.state != "Z" and (starttime is None or p.starttime == starttime)


def kill_pids(pids: Iterable[int] | Mapping[int, int], grace_s: float = 10.0,
              first: int = signal.SIGTERM) -> None:
    """Signal each process (``first``, then SIGKILL what is left after ``grace_s``).

    A process is identified by pid *and* start time (given as ``{pid: starttime}``, or read
    now), so a pid reused meanwhile is never hit.
    """
    if isinstance(pids, Mapping):
        targets = dict(pids)
    else:
        table = processes()
        targets = {pid: table[pid].starttime for pid in pids if pid in table}
    for pid, start in targets.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, first)
    _wait_gone(targets, grace_s)
    for pid, start in targets.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _wait_gone(targets, 5.0)


def _wait_gone(targets: Mapping[int, int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p, s) for p, s in targets.items()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(p.pgid == pgid and p.state != "Z" for p in processes().values())


def kill_process_group(pgid: int, grace_s: float = 10.0, first: int = signal.SIGTERM) -> None:
    """Send ``first`` to the process group ``pgid``; SIGKILL what is left after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, first)
    deadline = time.time() + grace_s
    while time.time() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def make_state_dir(prefix: str = "se4lip-", parent: str = "/tmp") -> Path:
    """A fresh, short state folder (``/tmp/se4lip-XXXXXXXX``) that the postgres user can enter.

    Short because Ray's socket paths under it must stay below 108 bytes; mode 0755 because
    PostgreSQL runs as its own OS user and needs to reach its data dir inside.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


# --- services ---------------------------------------------------------------------------------


@dataclass
class Service:
    """One process group started by the stand-in, with its log file."""

    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        """The leader's pid, also the process group id."""
        return self.proc.pid

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop this service's whole process group."""
        kill_process_group(self.proc.pid, grace_s, self.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def alive(self) -> bool:
        return self.proc.poll() is None


def _record(state_dir: Path, entry: dict[str, Any]) -> None:
    path = state_dir / RECORD
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if e["name"] != entry["name"]] + [entry]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)


def start_service(name: str, argv: list[str], state_dir: Path,
                  env: dict[str, str] | None = None, *, unset: Sequence[str] = (),
                  cwd: Path | None = None, stop_signal: int = signal.SIGTERM) -> Service:
    """Start ``argv`` in its own session (process group); output goes to ``state_dir/NAME.log``.

    The pid (= process group id) and its start time are recorded in ``state_dir/services.json``
    so that ``down`` can stop exactly this group later, from another process.

    Args:
        name: service name (log and pid file names).
        argv: the command.
        state_dir: folder for ``NAME.log``, ``NAME.pid`` and the record.
        env: variables added to this process's environment.
        unset: variables removed from it.
        cwd: working directory.
        stop_signal: what ``stop`` sends the group first.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / f"{name}.log"
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=full_env, cwd=cwd)
    (state_dir / f"{name}.pid").write_text(str(proc.pid))
    info = _read_proc(proc.pid)
    _record(state_dir, {"name": name, "pid": proc.pid, "pgid": proc.pid,
                        "starttime": info.starttime if info else None, "log": str(log),
                        "stop_signal": int(stop_signal)})
    return Service(name, proc, log, stop_signal)


def wait_http(url: str, service: Service, timeout_s: float) -> None:
    """Poll ``url`` until it answers (any HTTP status), or raise naming the service's log."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not service.alive():
            raise StandinError(f"{service.name} exited; see {service.log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise StandinError(f"{service.name} did not answer {url} within {timeout_s:g} s; "
                       f"see {service.log}")


def _venv_exe(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


@dataclass
class S3Server:
    """moto's S3 API on 127.0.0.1 (``moto_server``), with dummy credentials.

    Args:
        state_dir: folder for the log and pid files.
        port: TCP port (default: a free one).
    """

    state_dir: Path
    port: int = 0
    service: Service | None = field(default=None, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs (what users export for real S3 too)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_REGION": S3_REGION,
            # MLflow's S3 artifact repository reads its own variable.
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self, timeout_s: float = 60.0) -> S3Server:
        self.port = self.port or free_port()
        argv = [_venv_exe("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.service = start_service("s3", argv, Path(self.state_dir))
        try:
            wait_http(f"{self.endpoint}/moto-api/", self.service, timeout_s)
        except StandinError:
            self.stop()
            raise
        return self

    def create_bucket(self, name: str) -> None:
        """Create a bucket (idempotent)."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ACCESS_KEY,
                          aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION)
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``.

    Raises:
        StandinError: PostgreSQL is not installed (says what to install).
    """
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        raise StandinError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                           "`apt-get install -y postgresql` (.ci/run does this)")
    return found[-1].parent


def _as_user(user: str) -> list[str]:
    """Prefix that runs a command as ``user`` in the same process (no extra parent left behind)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]


@dataclass
class Postgres:
    """PostgreSQL in a fresh data dir under ``state_dir``, on 127.0.0.1 only, with an MLflow DB.

    PostgreSQL refuses to run as root, so ``initdb`` and the server run as the ``postgres`` OS
    user; its unix socket is in the state folder, TCP is on 127.0.0.1 with password auth.

    Args:
        state_dir: folder for ``pg/`` (data dir, socket), the log and pid files; every parent
            must be enterable by the postgres user (see :func:`make_state_dir`).
        port: TCP port (default: a free one).
        database: database created for MLflow, owned by ``user``.
        user: login role created for MLflow.
        os_user: the OS user the server runs as.
    """

    state_dir: Path
    port: int = 0
    database: str = "mlflow"
    user: str = "mlflow"
    os_user: str = "postgres"
    password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    service: Service | None = field(default=None, init=False)

    @property
    def root(self) -> Path:
        return Path(self.state_dir) / "pg"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def libpq_uri(self) -> str:
        """``postgresql://`` URI of the MLflow database (psql, psycopg2; holds the password)."""
        return (f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                f"{self.database}")

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the MLflow database, for ``mlflow server --backend-store-uri``.

        The driver is named: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3,
        while what is installed (and what production images ship) is psycopg2.
        """
        return self.libpq_uri.replace("postgresql://", "postgresql+psycopg2://", 1)

    def _run(self, argv: list[str], log: Path, timeout_s: float, what: str) -> None:
        with open(log, "ab") as f:
            try:
                res = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, timeout=timeout_s, check=False,
                                     cwd=self.root)
            except subprocess.TimeoutExpired as e:
                raise StandinError(f"{what} took over {timeout_s:g} s; see {log}") from e
        if res.returncode != 0:
            raise StandinError(f"{what} failed (exit {res.returncode}); see {log}")

    def start(self, timeout_s: float = 120.0) -> Postgres:
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            raise StandinError("setpriv is missing (util-linux): needed to run PostgreSQL as "
                               f"the {self.os_user} user")
        bin_dir = postgres_bin_dir()
        state = Path(self.state_dir)
        data = self.root / "data"
        if data.exists():
            raise StandinError(f"{data} exists: PostgreSQL starts from a fresh data dir; "
                               "remove it or use another state folder")
        data.mkdir(parents=True)
        as_user: list[str] = []
        if os.geteuid() == 0:
            as_user = _as_user(self.os_user)
            for p in (self.root, data):
                shutil.chown(p, self.os_user, self.os_user)
            if subprocess.run([*as_user, "test", "-w", str(data)], check=False).returncode:
                raise StandinError(f"the {self.os_user} OS user cannot write {data}: every "
                                   "parent folder must be enterable by it (make_state_dir() "
                                   "makes such a folder)")
        log = state / "postgres.log"
        pwfile = self.root / "superuser-pw"
        # initdb's superuser gets a throwaway password: TCP needs one, the unix socket (in our
        # own folder) is trusted for setting up the MLflow role below.
        pwfile.write_text(secrets.token_hex(16))
        if as_user:
            shutil.chown(pwfile, self.os_user, self.os_user)
        pwfile.chmod(0o600)
        self._run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                   "--pwfile", str(pwfile), "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale"],
                  log, timeout_s, "initdb")
        pwfile.unlink()
        self.port = self.port or free_port()
        argv = [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.socket_dir),
                # A throwaway test database: durability buys nothing and costs fsyncs.
                "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=50"]
        # SIGINT is PostgreSQL's "fast shutdown": it does not wait for clients to disconnect.
        self.service = start_service("postgres", argv, state, cwd=self.root,
                                     stop_signal=signal.SIGINT)
        try:
            self._wait_ready(bin_dir, timeout_s)
            sql = [f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                   f"CREATE DATABASE {self.database} OWNER {self.user}"]
            psql = [str(bin_dir / "psql"), "-h", str(self.socket_dir), "-p", str(self.port),
                    "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
            self._run([*psql, *(a for s in sql for a in ("-c", s))], state / "psql.log", 60,
                      "creating the MLflow role and database")
        except StandinError:
            self.stop()
            raise
        return self

    def _wait_ready(self, bin_dir: Path, timeout_s: float) -> None:
        assert self.service is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.service.alive():
                raise StandinError(f"postgres exited; see {self.service.log}")
            ready = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1",
                                    "-p", str(self.port)], check=False, timeout=30)
            if ready.returncode == 0:
                return
            time.sleep(0.3)
        raise StandinError(f"postgres did not accept connections on 127.0.0.1:{self.port} "
                           f"within {timeout_s:g} s; see {self.service.log}")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- MLflow -----------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1: one worker, served artifacts, job execution off.

    Clients only talk HTTP to it (``MLFLOW_TRACKING_URI``); the server alone reads the backend
    store and writes the artifacts. Build one with :meth:`with_postgres` (the production shape)
    or :meth:`with_sqlite` (cheaper).

    Args:
        state_dir: folder for the log, pid files and (sqlite) store.
        backend_store_uri: ``postgresql://...`` or ``sqlite:///...``; passed in the server's
            environment, not its command line, so the database password stays out of ``ps``.
        artifacts_destination: ``s3://bucket/prefix`` or a local folder.
        server_env: extra environment of the server (the S3 variables for ``s3://``).
        port: TCP port (default: a free one).
    """

    state_dir: Path
    backend_store_uri: str
    artifacts_destination: str
    server_env: dict[str, str] = field(default_factory=dict, repr=False)
    port: int = 0
    service: Service | None = field(default=None, init=False)

    @classmethod
    def with_postgres(cls, state_dir: Path, postgres: Postgres, s3: S3Server,
                      bucket: str = "mlflow", prefix: str = "mlflow", port: int = 0,
                      ) -> MlflowServer:
        """A server on a started :class:`Postgres`, artifacts in ``s3://bucket/prefix``."""
        s3.create_bucket(bucket)
        return cls(state_dir, postgres.uri, f"s3://{bucket}/{prefix}", s3.env(), port)

    @classmethod
    def with_sqlite(cls, state_dir: Path, s3: S3Server | None = None, bucket: str = "mlflow",
                    port: int = 0) -> MlflowServer:
        """A server on ``state_dir/mlflow.db``; artifacts on ``s3`` if given, else local."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{state_dir.resolve() / 'mlflow.db'}"
        if s3 is None:
            return cls(state_dir, uri, str(state_dir.resolve() / "artifacts"), {}, port)
        s3.create_bucket(bucket)
        return cls(state_dir, uri, f"s3://{bucket}/mlflow", s3.env(), port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client exports: only the tracking URI."""
        return {"MLFLOW_TRACKING_URI": self.url}

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--serve-artifacts",
                "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        self.port = self.port or free_port()
        env = {**self.server_env, "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
               # Its scheduled-job runner is not needed, and off it starts twice as fast.
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.service = start_service("mlflow", self.argv(), Path(self.state_dir), env,
                                     unset=("MLFLOW_TRACKING_URI",), cwd=Path(self.state_dir))
        try:
            wait_http(f"{self.url}/health", self.service, timeout_s)
        except StandinError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- autoscaling Ray --------------------------------------------------------------------------


def _node_ip() -> str:
    """The IP Ray's fake provider gives the worker nodes it starts (Ray's own lookup)."""
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


@dataclass
class AutoscalingRay:
    """A local Ray cluster that starts with zero workers and autoscales (fake multi-node provider).

    The head has 0 CPUs (like cluster.yaml's); worker nodes of ``node_types`` are extra raylets
    the autoscaler starts on this machine when tasks ask for resources and removes after
    ``idle_timeout_minutes``. Everything runs under ``temp_dir``, which is how :meth:`stop`
    and :meth:`kill_node` find exactly this cluster's processes.

    Args:
        state_dir: folder for the autoscaling config, log and pid files; ``state_dir/ray`` is
            the Ray temp dir unless ``temp_dir`` is given (it must be short).
        node_types: worker node types: ``{name: {"resources": {...}, "min_workers",
            "max_workers"}}`` (default: ``cpu_node`` {CPU: 1} x2, ``gpu_node`` {CPU: 1, GPU: 1}).
        idle_timeout_minutes: how long an idle worker node lives.
        auth_mode: ``disabled`` or ``token`` (a token is generated in the state folder).
        env_vars: extra environment of every Ray process (workers included), e.g. S3 variables,
            like an instance profile or pod env on a real cluster.
        port: GCS port (default: a free one).
        dashboard_port: dashboard / Jobs API port (default: a free one).
        temp_dir: Ray's temp dir (default ``state_dir/ray``).
        node_ip: the IP every node advertises (default: Ray's own lookup, which the fake
            provider also uses for the worker nodes it starts).
        object_store_mb: object store of each node (Ray's default, 30% of RAM per node, is
            too much for several nodes on one machine).
    """

    state_dir: Path
    node_types: dict[str, dict[str, Any]] = field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_NODE_TYPES)))
    idle_timeout_minutes: float = 0.5
    auth_mode: str = "disabled"
    env_vars: dict[str, str] = field(default_factory=dict, repr=False)
    port: int = 0
    dashboard_port: int = 0
    temp_dir: Path | None = None
    node_ip: str = ""
    object_store_mb: int = 512
    service: Service | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.temp_dir = Path(self.temp_dir or self.state_dir / "ray")
        if len(str(self.temp_dir)) > MAX_RAY_TEMP_DIR:
            raise StandinError(f"Ray temp dir {self.temp_dir} is too long (Ray's unix socket "
                               f"paths must stay below 108 bytes): keep it within "
                               f"{MAX_RAY_TEMP_DIR} characters, e.g. make_state_dir()")
        if self.auth_mode not in ("disabled", "token"):
            raise StandinError(f"auth_mode must be 'disabled' or 'token', not {self.auth_mode!r}")

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``--address``)."""
        return f"{self.node_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / Jobs API URL (``se4lip-dist submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.state_dir / "ray_auth_token"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "autoscaling.json"

    def env(self) -> dict[str, str]:
        """What a client exports to use this cluster."""
        out = {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
               "RAY_AUTH_MODE": self.auth_mode, "RAY_USAGE_STATS_ENABLED": "0"}
        if self.auth_mode == "token":
            out["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        return out

    def autoscaling_config(self) -> dict[str, Any]:
        """The cluster config the head's autoscaler reads (the fake provider's schema)."""
        store = {"object_store_memory": self.object_store_mb * 1024**2}
        workers = {name: {"node_config": {}, "min_workers": 0, **spec,
                          "resources": {**store, **spec["resources"]}}
                   for name, spec in self.node_types.items()}
        return {
            "cluster_name": f"se4lip-standin-{self.port}",
            "max_workers": sum(int(t["max_workers"]) for t in workers.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         # Without it the fake nodes dial GCS port 6379 and retry forever.
                         "gcs_address": self.address},
            "auth": {"ssh_user": "ubuntu"}, "docker": {},
            "available_node_types": {
                HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **workers,
            },
            "head_node_type": HEAD_NODE_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self, timeout_s: float = 120.0) -> AutoscalingRay:
        """Start the head (0 CPUs, autoscaler on, dashboard on 127.0.0.1); no worker nodes yet."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        assert self.temp_dir is not None
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.node_ip = self.node_ip or _node_ip()
        self.port = self.port or free_port()
        self.dashboard_port = self.dashboard_port or free_port()
        self.config_path.write_text(json.dumps(self.autoscaling_config(), indent=1))
        env = {**self.env_vars, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": self.auth_mode,
               # On SIGTERM a node drains for 30 s by default; nothing here needs draining.
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               # Jobs run `se4lip-dist`: installed on every node, as the cluster images have it.
               "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                        os.environ.get("PATH", os.defpath)])}
        # Every process of this cluster (the fake nodes inherit the head's environment) finds
        # it through its own dashboard: the State API's guess from the host's raylets fails
        # beside any other Ray on the machine, and Ray Train's placement-group cleaner (which
        # removes the ranks' reservations of a trial ASHA stopped) then dies, leaking them.
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        unset = ["RAY_ADDRESS", "RAY_AUTH_TOKEN"]
        if self.auth_mode == "token":
            if not self.token_path.exists():
                self.token_path.touch(mode=0o600)
                self.token_path.write_text(secrets.token_hex(32))
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        else:
            unset.append("RAY_AUTH_TOKEN_PATH")
        argv = [_venv_exe("ray"), "start", "--head", "--block",
                f"--autoscaling-config={self.config_path}", "--num-cpus=0",
                f"--port={self.port}", f"--node-ip-address={self.node_ip}",
                f"--temp-dir={self.temp_dir}",
                f"--object-store-memory={self.object_store_mb * 1024**2}",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--include-dashboard", "true",
                # Ray's fixed defaults (10001, 52365) collide with any other Ray on the host.
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                "--disable-usage-stats"]
        # Recorded first, so that `down` (newest first) stops the head before sweeping its dir.
        _record(self.state_dir, {"name": "ray-temp-dir", "scan": str(self.temp_dir)})
        self.service = start_service("ray-head", argv, self.state_dir, env, unset=unset)
        try:
            wait_http(f"{self.dashboard_url}/api/version", self.service, timeout_s)
            self._wait(lambda: self._nodes() is not None, timeout_s, "the head in the state API")
        except StandinError:
            with contextlib.suppress(StandinError):  # the start error is the one to report
                self.stop()
            raise
        return self

    # -- nodes --

    def _nodes(self) -> list[dict[str, Any]] | None:
        """All nodes from the dashboard's state API, or None when it does not answer."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?limit=1000&detail=1")
        if self.auth_mode == "token":
            req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        data = body.get("data", {}).get("result", {})
        return list(data.get("result", [])) if body.get("result") else None

    def alive_worker_nodes(self) -> list[dict[str, Any]]:
        """The worker nodes (not the head) that are ALIVE now.

        Each is a dict from Ray's state API: ``node_id``, ``node_ip``, ``resources_total``,
        ``labels``, ... plus ``node_type`` (the autoscaler's node type name).

        Raises:
            StandinError: the dashboard does not answer.
        """
        nodes = self._nodes()
        if nodes is None:
            raise StandinError(f"the Ray dashboard at {self.dashboard_url} does not answer; "
                               f"see {self.state_dir / 'ray-head.log'} and {self.temp_dir}")
        out = []
        for n in nodes:
            if n.get("state") == "ALIVE" and not n.get("is_head_node"):
                labels = n.get("labels") or {}
                n = {**n, "node_type": labels.get("ray.io/node-group") or
                     labels.get("ray.io/node-type-name") or self._type_of(n)}
                out.append(n)
        return out

    def _type_of(self, node: dict[str, Any]) -> str | None:
        total = node.get("resources_total") or {}
        for name, spec in self.node_types.items():
            if all(float(total.get(k, 0)) == float(v) for k, v in spec["resources"].items()) \
                    and float(total.get("GPU", 0)) == float(spec["resources"].get("GPU", 0)):
                return name
        return None

    def wait_for_workers(self, n: int, timeout_s: float, *, at_least: bool = True) -> list[dict]:
        """Wait until ``n`` (or, with ``at_least``, ``>= n``) worker nodes are alive.

        Raises:
            StandinError: not within ``timeout_s`` (names the autoscaler's log).
        """
        def ok() -> bool:
            k = len(self.alive_worker_nodes())
            return k >= n if at_least else k == n

        self._wait(ok, timeout_s, f"{'>= ' if at_least else ''}{n} alive worker node(s)")
        return self.alive_worker_nodes()

    def _wait(self, ok: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.service is not None and not self.service.alive():
                raise StandinError(f"the Ray head exited; see {self.service.log}")
            if ok():
                return
            time.sleep(0.5)
        raise StandinError(f"no {what} within {timeout_s:g} s; see {self.monitor_log()} and "
                           f"{self.state_dir / 'ray-head.log'}")

    def monitor_log(self) -> Path:
        """The autoscaler's log (Ray's ``monitor.log`` in the current session)."""
        assert self.temp_dir is not None
        return self.temp_dir / "session_latest" / "logs" / "monitor.log"

    def node_processes(self, node_id: str) -> set[int]:
        """Pids of one node of this cluster: its raylet, agents and their workers."""
        table = processes()
        temp = str(self.temp_dir)
        roots = {p.pid for p in table.values() if p.state != "Z"
                 and any(a.startswith(f"--temp_dir={temp}") or a.startswith(f"--temp-dir={temp}")
                         for a in p.argv)
                 and any(a in (f"--node_id={node_id}", f"--node-id={node_id}") for a in p.argv)}
        return descendants(roots, table)

    def kill_node(self, node_id: str) -> set[int]:
        """SIGKILL the raylet of worker node ``node_id`` and that node's processes (a lost node).

        Only processes whose command line names this cluster's temp dir and that node's id, and
        their children (the node's Ray workers), are signalled.

        Returns:
            The pids killed.

        Raises:
            StandinError: no raylet of that node runs, or it is the head.
        """
        head = self.service.pid if self.service is not None else None
        pids = self.node_processes(node_id)
        table = processes()
        if not any(Path(table[p].argv[0]).name == "raylet" for p in pids if table[p].argv):
            raise StandinError(f"no raylet of node {node_id} under {self.temp_dir}")
        if any("--head" in table[p].argv for p in pids) or head in pids:
            raise StandinError(f"node {node_id} is the head; kill_node takes worker nodes")
        # The raylet first: were an agent to die before it, the raylet would exit on its own and
        # tell GCS, which is not what a lost node does.
        raylets = {p for p in pids if table[p].argv and Path(table[p].argv[0]).name == "raylet"}
        kill_pids({p: table[p].starttime for p in raylets}, grace_s=0, first=signal.SIGKILL)
        kill_pids({p: table[p].starttime for p in pids - raylets if p in table}, grace_s=0,
                  first=signal.SIGKILL)
        return pids

    def leftovers(self) -> set[int]:
        """Live processes naming this cluster's temp dir (nothing, once stopped)."""
        return naming(str(self.temp_dir))

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the head's process group and every process naming the temp dir, with children.

        Raises:
            StandinError: something of this cluster still runs afterwards.
        """
        stop_recorded(self.state_dir, grace_s, only=("ray-head", "ray-temp-dir"))
        if self.service is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.service.proc.wait(timeout=5)
            self.service = None
        left = self.leftovers()
        if left:
            table = processes()
            raise StandinError("left running after stop: " + "; ".join(
                f"{p} {table[p].cmdline[:120]}" for p in sorted(left) if p in table))

    def __enter__(self) -> AutoscalingRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- stopping what was recorded ---------------------------------------------------------------


def _recorded_group(entry: dict[str, Any], table: Mapping[int, Proc]) -> set[int]:
    """Members of a recorded process group that are still ours (never a reused pid's)."""
    pgid, start = int(entry["pgid"]), entry.get("starttime")
    leader = table.get(int(entry["pid"]))
    if leader is not None and start is not None and leader.starttime != start:
        return set()  # the pid was reused by someone else: not ours
    # Linux does not hand out a pid while a process group of that id exists, so members of the
    # group that started after our leader are ours even when the leader has already exited.
    return {p.pid for p in table.values() if p.pgid == pgid and p.state != "Z"
            and (start is None or p.starttime >= start)}


def stop_recorded(state_dir: Path, grace_s: float = 15.0,
                  only: Sequence[str] | None = None) -> list[str]:
    """Stop what ``services.json`` in ``state_dir`` records, newest first.

    Each recorded process group is verified to still be ours (leader start time) before it is
    signalled: the leader gets its stop signal and ``grace_s`` to take its group down, then
    whatever is left of the group gets SIGTERM and SIGKILL. Entries with ``scan`` name a
    folder: every process whose command line names it is stopped too. The children of all of
    them go with them (Ray workers start sessions of their own).

    Args:
        state_dir: the state folder.
        grace_s: seconds a service gets to stop before SIGKILL.
        only: names of the entries to stop (default: all).

    Returns:
        Names of the entries that had something running.
    """
    path = Path(state_dir) / RECORD
    entries = json.loads(path.read_text()) if path.exists() else []
    stopped = []
    for entry in reversed(entries):
        if only is not None and entry["name"] not in only:
            continue
        table = processes()
        if "scan" in entry:
            group: set[int] = naming(entry["scan"], table)
        else:
            group = _recorded_group(entry, table)
        targets = {p: table[p].starttime for p in descendants(group, table)}
        if not targets:
            continue
        stopped.append(entry["name"])
        leader = int(entry.get("pid", 0))
        if leader in group:
            # The leader first, with its own signal (PostgreSQL: SIGINT = fast shutdown;
            # `ray start --block`: SIGTERM takes the head's processes down in order).
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, int(entry.get("stop_signal", signal.SIGTERM)))
            _wait_gone({leader: targets[leader]}, grace_s)
        kill_pids(targets, min(grace_s, 5.0))
    return stopped


# --- all of it --------------------------------------------------------------------------------


@dataclass
class Standin:
    """S3 + PostgreSQL-backed MLflow with S3 artifacts + an autoscaling Ray, on loopback.

    Args:
        state_dir: a short folder (see :func:`make_state_dir`) for everything.
        buckets: buckets created on the S3 server (MLflow's artifacts go to ``mlflow``).
        idle_timeout_minutes: idle time before a Ray worker node is removed.
        auth_mode: Ray auth, ``disabled`` or ``token``.
        node_types: Ray worker node types (default :data:`DEFAULT_NODE_TYPES`).
        ports: fixed ports by name (``s3``, ``postgres``, ``mlflow``, ``gcs``, ``dashboard``).
    """

    state_dir: Path
    buckets: tuple[str, ...] = ("se4lip-data", "se4lip-ray", "mlflow")
    idle_timeout_minutes: float = 1.0
    auth_mode: str = "disabled"
    node_types: dict[str, dict[str, Any]] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    s3: S3Server | None = field(default=None, init=False)
    postgres: Postgres | None = field(default=None, init=False)
    mlflow: MlflowServer | None = field(default=None, init=False)
    ray: AutoscalingRay | None = field(default=None, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)

    def start(self) -> Standin:
        self.state_dir = Path(self.state_dir)
        try:
            t = time.monotonic()
            self.s3 = S3Server(self.state_dir, self.ports.get("s3", 0)).start()
            for b in self.buckets:
                self.s3.create_bucket(b)
            self.timings["s3"] = time.monotonic() - t
            t = time.monotonic()
            self.postgres = Postgres(self.state_dir, self.ports.get("postgres", 0)).start()
            self.timings["postgres"] = time.monotonic() - t
            t = time.monotonic()
            self.mlflow = MlflowServer.with_postgres(self.state_dir, self.postgres, self.s3,
                                                     port=self.ports.get("mlflow", 0)).start()
            self.timings["mlflow"] = time.monotonic() - t
            t = time.monotonic()
            self.ray = AutoscalingRay(
                self.state_dir, idle_timeout_minutes=self.idle_timeout_minutes,
                auth_mode=self.auth_mode,
                # Every Ray process finds S3 and MLflow the way pods do on the real cluster.
                env_vars={**self.s3.env(), **self.mlflow.env()},
                port=self.ports.get("gcs", 0), dashboard_port=self.ports.get("dashboard", 0),
                **({"node_types": self.node_types} if self.node_types else {})).start()
            self.timings["ray"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        (self.state_dir / "env.sh").write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items()))
        return self

    def env(self) -> dict[str, str]:
        """Every variable a client exports: AWS_*, MLFLOW_TRACKING_URI, RAY_*."""
        out: dict[str, str] = {}
        for part in (self.s3, self.mlflow, self.ray):
            if part is not None:
                out.update(part.env())
        return out

    def stop(self) -> None:
        """Stop everything started (Ray, MLflow, PostgreSQL, S3), newest first.

        Raises:
            StandinError: something of the Ray cluster still runs afterwards (the other
                services are stopped all the same).
        """
        try:
            if self.ray is not None:
                self.ray.stop()
        finally:
            self.ray = None
            for name in ("mlflow", "postgres", "s3"):
                part = getattr(self, name)
                if part is not None:
                    part.stop()
                    setattr(self, name, None)
            stop_recorded(self.state_dir)

    def __enter__(self) -> Standin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- command line -----------------------------------------------------------------------------


def _describe(types: Mapping[str, Mapping[str, Any]]) -> str:
    def res(t: Mapping[str, Any]) -> str:
        return json.dumps({k: v for k, v in t["resources"].items() if k != "object_store_memory"})

    return ", ".join(f"{name} {res(t)} x0..{t['max_workers']}" for name, t in types.items())


def _up(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    record = state / RECORD
    if record.exists():
        table = processes()
        running = [e["name"] for e in json.loads(record.read_text())
                   if ("scan" in e and naming(e["scan"], table))
                   or ("pgid" in e and _recorded_group(e, table))]
        if running:
            print(f"already running in {state} ({', '.join(running)}); run `down` first",
                  file=sys.stderr)
            return 1
        record.unlink()
    if state.exists():
        ours = [p for p in state.iterdir() if p.name in STATE_FILES or p.suffix in (".log", ".pid")]
        others = sorted(p.name for p in state.iterdir() if p not in ours)
        if others:
            print(f"{state} holds files the stand-in did not write ({', '.join(others[:5])}); "
                  "use another --dir", file=sys.stderr)
            return 1
        # A fresh PostgreSQL data dir and Ray session every time.
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    ports = {k: v for k, v in (("s3", args.s3_port), ("postgres", args.postgres_port),
                               ("mlflow", args.mlflow_port), ("gcs", args.gcs_port),
                               ("dashboard", args.dashboard_port)) if v}
    types = json.loads(json.dumps(DEFAULT_NODE_TYPES))
    types["cpu_node"]["resources"]["CPU"] = args.worker_cpus
    types["cpu_node"]["max_workers"] = args.cpu_nodes
    types["gpu_node"]["max_workers"] = args.gpu_nodes
    types = {k: t for k, t in types.items() if t["max_workers"] > 0}
    t0 = time.monotonic()
    try:
        standin = Standin(state, idle_timeout_minutes=args.idle_timeout_minutes,
                          auth_mode=args.auth, node_types=types, ports=ports).start()
    except StandinError as e:
        print(f"up failed: {e}", file=sys.stderr)
        return 1
    took = time.monotonic() - t0
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in standin.timings.items())
    assert standin.ray is not None and standin.mlflow is not None and standin.s3 is not None
    print(f"up in {took:.1f} s ({parts}); state in {state}\n"
          f"  Ray       {standin.ray.address} (0 workers, autoscaling; auth {args.auth})\n"
          f"  workers   {_describe(types)}\n"
          f"  dashboard {standin.ray.dashboard_url}\n"
          f"  MLflow    {standin.mlflow.url} (PostgreSQL, artifacts s3://mlflow/mlflow)\n"
          f"  S3        {standin.s3.endpoint} (buckets {', '.join(standin.buckets)})\n"
          f"source {state / 'env.sh'}\n"
          f"stop with: python {Path(__file__).resolve()} down --dir {state}")
    return 0


def _down(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    if not (state / RECORD).exists():
        print(f"nothing recorded in {state}", file=sys.stderr)
        return 0
    stopped = stop_recorded(state, args.grace)
    entries = json.loads((state / RECORD).read_text())
    left = set()
    for e in entries:
        table = processes()
        left |= naming(e["scan"], table) if "scan" in e else _recorded_group(e, table)
    for name in stopped:
        print(f"stopped {name}")
    if left:
        print(f"still running: {sorted(left)}", file=sys.stderr)
        return 1
    (state / RECORD).unlink()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``up`` / ``down`` of the whole stand-in (see the module docstring)."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="standin.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start S3, PostgreSQL, MLflow and an autoscaling Ray")
    up.add_argument("--dir", default=env.get("SE4LIP_LOCAL_DIR", "/tmp/se4lip-local"))
    up.add_argument("--auth", choices=("token", "disabled"), default="token",
                    help="Ray token auth (Ray's GCS and raylets listen on every interface)")
    up.add_argument("--idle-timeout-minutes", type=float, default=1.0,
                    help="idle time before a worker node is removed")
    up.add_argument("--worker-cpus", type=float, default=1.0,
                    help="logical CPUs of a cpu_node worker")
    up.add_argument("--cpu-nodes", type=int, default=2, help="most cpu_node workers")
    up.add_argument("--gpu-nodes", type=int, default=1,
                    help="most gpu_node workers (a declared GPU: no CUDA here)")
    for name in ("s3", "postgres", "mlflow", "gcs", "dashboard"):
        up.add_argument(f"--{name}-port", type=int, default=0)
    down = sub.add_parser("down", help="stop exactly what `up` started")
    down.add_argument("--dir", default=env.get("SE4LIP_LOCAL_DIR", "/tmp/se4lip-local"))
    down.add_argument("--grace", type=float, default=15.0,
                      help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    return _up(args) if args.cmd == "up" else _down(args)


if __name__ == "__main__":
    sys.exit(main())
