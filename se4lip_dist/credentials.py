"""What a job may carry to the cluster, and what stays on the nodes.

Ray keeps a job's ``runtime_env`` (and every task's and actor's) in its GCS tables: ``ray job
list``, the dashboard's job page and the State API show it to anyone who reaches the dashboard.
So jobs, joined drivers and Train workers carry only non-secret settings (endpoints, region,
a tracking URI without credentials). Credentials reach the nodes the way clusters do it: the
node's role or service account (instance profile, IRSA), a Kubernetes Secret in the pod spec,
a shared credentials file or ``AWS_PROFILE`` on the node, MLflow's own auth config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

SETTINGS_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
"""Non-secret settings every process of a job needs: carried to jobs, joined drivers, workers."""

SECRET_ENV: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
"""Secret values: never carried, never printed."""

NODE_ENV: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)
"""Set on each node, never carried: who the node is (carrying ours would mismatch the node's
own secret) and files of its own."""

HOW_NODES_GET_CREDENTIALS = (
    "give the nodes their own credentials instead: (1) the node's role or service account "
    "(instance profile, IRSA / workload identity), (2) a Kubernetes Secret mounted as env or "
    "file in the RayCluster pod spec (cluster/raycluster.yaml), or (3) a shared credentials "
    "file / AWS_PROFILE and MLflow's auth config on every node (cluster/README.md, "
    "\"Credentials\")")


class SecretInJobError(ValueError):
    """A job was asked to carry a secret value in its runtime env."""


def _secret_values() -> dict[str, str]:
    return {k: os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 4}


def _has_password(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return bool(parts.scheme and parts.password)


def _why_secret(key: str, value: str, secrets: Mapping[str, str]) -> str | None:
    if key in SECRET_ENV:
        return "is a secret"
    if _has_password(value):
        return "holds a URL with a password"
    if any(s in value for s in secrets.values()):
        return "holds a secret value"
    return None


def _refuse(what: str, why: str) -> SecretInJobError:
    return SecretInJobError(
        f"refusing to send {what} to the cluster: it {why}, and Ray shows a job's command "
        f"and environment to anyone who can reach its dashboard (`ray job list`, the State "
        f"API); {HOW_NODES_GET_CREDENTIALS}")


def check_shippable(env: Mapping[str, str]) -> None:
    """Raise :class:`SecretInJobError` if ``env`` would put a secret into Ray's records.

    A secret is a variable of :data:`SECRET_ENV`, a URL with a password in it, or any value
    that holds one of this process's secret values.
    """
    secrets = _secret_values()
    for key, value in env.items():
        if why := _why_secret(key, value, secrets):
            raise _refuse(key, why)


def check_command(args: list[str]) -> None:
    """Raise :class:`SecretInJobError` if a job's command line holds a secret (see
    :func:`check_shippable`): Ray records the entrypoint with the job."""
    secrets = _secret_values()
    for i, arg in enumerate(args, 1):
        if why := _why_secret("", arg, secrets):
            raise _refuse(f"argument {i} of the command", why)


def job_env() -> dict[str, str]:
    """The :data:`SETTINGS_ENV` variables set here, checked by :func:`check_shippable`."""
    env = {k: os.environ[k] for k in SETTINGS_ENV if os.environ.get(k)}
    check_shippable(env)
    return env


def left_behind() -> list[str]:
    """Credential variables set here that a job does not carry (the nodes need their own)."""
    return [k for k in (*NODE_ENV, *SECRET_ENV) if os.environ.get(k)]


def keep_secrets_out_of_tune() -> None:
    """Stop Ray Tune from copying this process's AWS keys into every trial actor's runtime env.

    Tune does that by default (``ray.tune.execution.class_cache``), and the State API then
    shows them; trials on the cluster's nodes use the nodes' own credentials instead.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(
        k for k in class_cache.ENV_VARS_TO_PROPAGATE
        if k not in (*SECRET_ENV, *NODE_ENV) and not k.startswith("AWS_"))


def redact_secrets(text: str) -> str:
    """``text`` with this process's secret values replaced by ``REDACTED`` (library errors
    sometimes quote a runtime env verbatim)."""
    for value in _secret_values().values():
        text = text.replace(value, "REDACTED")
    return text
