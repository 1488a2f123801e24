"""Running ``se4lip-dist`` commands on a Ray cluster through the Ray Jobs API.

``submit_job`` wraps ``ray.job_submission.JobSubmissionClient``: it uploads the project folder
as the job's ``working_dir`` (without virtualenvs, runs and data), passes the caller's non-secret
MLflow/S3 settings as job env vars (never a secret: see :mod:`se4lip_dist.credentials`), follows
the job's logs and maps its final status to an exit code. ``list_jobs``, ``job_logs`` and
``stop_job`` complete the set.

Ray 2.60 turns token authentication on by default; the dashboard then wants
``Authorization: Bearer <token>``. Ray's own client only sends it when ``RAY_AUTH_MODE=token``
is set locally, so a token-protected cluster fails with a bare 401 for anyone who has the token
file but not the variable. We send the token ourselves whenever we find one.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.exceptions import AuthenticationError

from se4lip_dist.credentials import SETTINGS_ENV, check_command, check_shippable
from se4lip_dist.storage import redact_uri

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ENTRYPOINT = "se4lip-dist"
"""Console script the job runs; the cluster's image (or runtime env) must provide it."""

DEFAULT_EXCLUDES: tuple[str, ...] = (
    # No trailing slashes: Ray prunes a matched directory instead of walking every file in it.
    "/.venv",
    "/.git",
    "/se4lip-runs",
    "/data",
    "/mlruns",
    "/mlartifacts",
    "/out",
    "/build",
    "/dist",
    "*.db",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
)
"""Paths left out of the uploaded ``working_dir`` (on top of ``.gitignore``/``.rayignore``)."""

PASSTHROUGH_ENV: tuple[str, ...] = SETTINGS_ENV
"""Caller env vars copied into the job's runtime env when set: settings, never secrets."""

ADDRESS_COMMANDS: frozenset[str] = frozenset({"prepare", "train", "tune", "extract", "subject"})
"""Commands with ``--address``: a submitted one gets ``--address auto`` unless it names one."""

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class RemoteError(RuntimeError):
    """The cluster cannot be reached, or the Jobs API refused a request."""


class RemoteAuthError(RemoteError):
    """The cluster has token authentication on and our token is missing or wrong."""


@dataclass(frozen=True)
class JobInfo:
    """One Ray job as ``jobs list`` shows it (no runtime env: it holds credentials).

    Attributes:
        job_id: the submission id (``raysubmit_...``), or the driver job id for non-API jobs.
        status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.
        entrypoint: the shell command the job runs.
        start_time: start, seconds since the epoch (None before it starts).
        end_time: end, seconds since the epoch (None while it runs).
        message: Ray's status message (e.g. why it failed).
    """

    job_id: str
    status: str
    entrypoint: str
    start_time: float | None = None
    end_time: float | None = None
    message: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "job_id": self.job_id, "status": self.status, "entrypoint": self.entrypoint,
            "start_time": self.start_time, "end_time": self.end_time, "message": self.message,
            "metadata": self.metadata,
        }


def exit_code(status: str) -> int:
    """Exit status for a final job status: 0 for SUCCEEDED, 1 for FAILED or STOPPED."""
    return 0 if str(status) == "SUCCEEDED" else 1


def resolve_auth_token(token: str | None = None) -> str | None:
    """The Ray auth token: argument, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ~/.ray/auth_token.

    Returns:
        The token, or None when there is none (clusters with auth off need none).
    """
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")]
    for p in paths:
        if p and Path(p).is_file():
            text = Path(p).read_text().strip()
            if text:
                return text
    return None


def _auth_message(address: str, had_token: bool, detail: str) -> str:
    first = detail.strip().splitlines()[0] if detail.strip() else "authentication failed"
    if had_token:
        hint = ("the token we sent was rejected: use the cluster's token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; on the head: `ray get-auth-token`)")
    else:
        hint = ("the cluster has token authentication on and no token was found: set "
                "RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token here "
                "(KubeRay: the Secret <cluster>-auth-token)")
    return f"Ray at {redact_uri(address)} refused the request ({first}); {hint}"


def _call(address: str, had_token: bool, fn: Callable[[], Any]) -> Any:
    """Run one Jobs API call, turning Ray's connection and auth errors into RemoteError."""
    try:
        return fn()
    except AuthenticationError as e:
        raise RemoteAuthError(_auth_message(address, had_token, str(e))) from e
    except ConnectionError as e:
        raise RemoteError(
            f"cannot reach the Ray dashboard at {redact_uri(address)}: {e}. Is the cluster up "
            "and its dashboard port (8265) reachable (`ray dashboard cluster.yaml`, "
            "`kubectl port-forward svc/<cluster>-head-svc 8265`)?"
        ) from e
    except RuntimeError as e:
        text = str(e)
        if "status code 401" in text or "status code 403" in text:
            raise RemoteAuthError(_auth_message(address, had_token, text)) from e
        raise RemoteError(f"Ray Jobs API at {redact_uri(address)}: {text}") from e


def job_client(address: str, token: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for the dashboard at ``address`` that sends our auth token if we have one.

    Args:
        address: dashboard URL, e.g. ``http://127.0.0.1:8265``.
        token: Ray auth token (default: see :func:`resolve_auth_token`).

    Raises:
        RemoteError: the dashboard does not answer.
        RemoteAuthError: it answers 401/403.
    """
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - ray[default] is a dependency
        raise RemoteError("the Jobs API needs `pip install 'ray[default]'`") from e

    tok = resolve_auth_token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    return _call(address, tok is not None,
                 lambda: JobSubmissionClient(address, headers=headers))


def project_root() -> Path | None:
    """The source checkout this package runs from (has pyproject.toml), or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def build_runtime_env(
    working_dir: str | Path | None = None,
    *,
    env_vars: Mapping[str, str] | None = None,
    passthrough: Sequence[str] = PASSTHROUGH_ENV,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The runtime env of a submitted job.

    Args:
        working_dir: folder uploaded as the job's working directory (default: this project's
            checkout when running from one; pass ``""`` to upload nothing and rely on the
            cluster's installed package).
        env_vars: extra env vars for the job (win over the passthrough ones).
        passthrough: names copied from our environment when set.
        excludes: gitignore-style patterns left out of the upload.

    Returns:
        A dict for ``JobSubmissionClient.submit_job(runtime_env=...)``.

    Raises:
        SecretInJobError: a variable would carry a secret into Ray's job records.
    """
    env = {k: os.environ[k] for k in passthrough if os.environ.get(k)}
    env.update(env_vars or {})
    check_shippable(env)
    runtime_env: dict[str, Any] = {}
    wd = project_root() if working_dir is None else (Path(working_dir) if working_dir else None)
    if wd is not None:
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = list(excludes)
    if env:
        runtime_env["env_vars"] = env
    return runtime_env


def job_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--address auto`` added for Ray commands that name no address.

    Inside a job, ``auto`` joins the cluster the job runs on; a command without ``--address``
    would try to start a second, local Ray on the head node instead.
    """
    args = list(argv)
    if not args:
        raise ValueError("nothing to submit: give the se4lip-dist command after `--`")
    if args[0] in ADDRESS_COMMANDS and not any(
        a == "--address" or a.startswith("--address=") for a in args
    ):
        args += ["--address", "auto"]
    return args


def submit_job(
    address: str,
    argv: Sequence[str],
    runtime_env: Mapping[str, Any] | None = None,
    *,
    wait: bool = True,
    stream_logs: Callable[[str], None] | None = None,
    token: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> tuple[str, str]:
    """Submit ``se4lip-dist <argv>`` as a Ray job; optionally wait for it, following its logs.

    Args:
        address: dashboard URL of the cluster.
        argv: the se4lip-dist command line, e.g. ``["tune", "--data", "s3://..."]``.
        runtime_env: the job's runtime env (default: :func:`build_runtime_env`).
        wait: block until the job ends.
        stream_logs: called with each new chunk of the job's output while waiting.
        token: Ray auth token (default: :func:`resolve_auth_token`).
        submission_id: a job id of your choosing (default: Ray's ``raysubmit_...``).
        entrypoint_num_cpus: CPUs reserved for the job's driver (default: none, as Ray does).
        poll_s: seconds between status polls.
        timeout_s: give up waiting after this long (the job keeps running).

    Returns:
        ``(job_id, status)``; status is the final one when waiting, else the current one.
        Map it to an exit code with :func:`exit_code`.

    Raises:
        RemoteError: the cluster is unreachable, refuses the job, or ``timeout_s`` passed.
        SecretInJobError: the command line or the env would carry a secret.
    """
    args = job_argv(argv)
    check_command(args)
    client = job_client(address, token)
    had_token = resolve_auth_token(token) is not None
    entrypoint = shlex.join([ENTRYPOINT, *args])
    env = dict(build_runtime_env() if runtime_env is None else runtime_env)
    check_shippable(env.get("env_vars", {}))
    job_id = _call(address, had_token, lambda: client.submit_job(
        entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        metadata={"se4lip.command": shlex.join(list(argv))[:1000]},
    ))
    if not wait:
        return job_id, str(_call(address, had_token, lambda: client.get_job_status(job_id)))
    status = wait_for_job(client, job_id, stream_logs=stream_logs, poll_s=poll_s,
                          timeout_s=timeout_s, address=address)
    return job_id, status


def wait_for_job(
    client: JobSubmissionClient,
    job_id: str,
    *,
    stream_logs: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    address: str = "",
) -> str:
    """Block until the job reaches a terminal status; return it.

    Logs come through the dashboard's log websocket; if that drops (proxies, restarts) we
    fall back to polling the full log and emitting only what is new.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    emitted = [0]
    tailed = False
    if stream_logs is not None:
        try:
            asyncio.run(_tail(client, job_id, stream_logs, deadline, emitted))
            tailed = True
        except Exception:  # any websocket trouble: poll from where it stopped
            tailed = False
    while True:
        status = str(client.get_job_status(job_id))
        if stream_logs is not None and not tailed:
            logs = client.get_job_logs(job_id)
            if len(logs) > emitted[0]:
                stream_logs(logs[emitted[0]:])
                emitted[0] = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise RemoteError(
                f"job {job_id} still {status} after {timeout_s:.0f} s on {redact_uri(address)}; "
                f"follow it with `se4lip-dist jobs logs --follow {job_id}`"
            )
        time.sleep(poll_s)


async def _tail(
    client: JobSubmissionClient, job_id: str, emit: Callable[[str], None],
    deadline: float | None, emitted: list[int],
) -> None:
    """Stream the log websocket until it closes (the job ended), counting characters emitted."""
    async def run() -> None:
        async for chunk in client.tail_job_logs(job_id):
            emit(chunk)
            emitted[0] += len(chunk)

    if deadline is None:
        await run()
    else:
        await asyncio.wait_for(run(), timeout=max(deadline - time.monotonic(), 0.1))


def list_jobs(address: str, token: str | None = None) -> list[JobInfo]:
    """All jobs the cluster knows, newest first."""
    client = job_client(address, token)
    details = _call(address, resolve_auth_token(token) is not None, client.list_jobs)
    jobs = [
        JobInfo(
            job_id=d.submission_id or d.job_id or "?",
            status=str(d.status),
            entrypoint=d.entrypoint,
            start_time=d.start_time / 1000 if d.start_time else None,
            end_time=d.end_time / 1000 if d.end_time else None,
            message=d.message,
            metadata=dict(d.metadata or {}),
        )
        for d in details
    ]
    return sorted(jobs, key=lambda j: j.start_time or 0.0, reverse=True)


def job_logs(address: str, job_id: str, *, follow: bool = False,
             stream_logs: Callable[[str], None] | None = None,
             token: str | None = None) -> str:
    """A job's logs so far; with ``follow``, stream them to ``stream_logs`` until it ends.

    Returns:
        The logs (with ``follow``: the job's final status instead).
    """
    client = job_client(address, token)
    had_token = resolve_auth_token(token) is not None
    if follow:
        return _call(address, had_token, lambda: wait_for_job(
            client, job_id, stream_logs=stream_logs or (lambda s: None), address=address))
    return _call(address, had_token, lambda: client.get_job_logs(job_id))


def stop_job(address: str, job_id: str, token: str | None = None) -> bool:
    """Ask the cluster to stop a job.

    Returns:
        True if a stop was requested, False if the job had already ended.
    """
    client = job_client(address, token)
    return bool(_call(address, resolve_auth_token(token) is not None,
                      lambda: client.stop_job(job_id)))


__all__ = [
    "ADDRESS_COMMANDS",
    "DEFAULT_EXCLUDES",
    "PASSTHROUGH_ENV",
    "JobInfo",
    "RemoteAuthError",
    "RemoteError",
    "build_runtime_env",
    "exit_code",
    "job_argv",
    "job_client",
    "job_logs",
    "list_jobs",
    "redact_uri",
    "resolve_auth_token",
    "submit_job",
    "wait_for_job",
]
