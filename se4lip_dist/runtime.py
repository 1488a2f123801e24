"""Starting or joining Ray the same way in every command."""

from __future__ import annotations

import os
from typing import Any

OBJECT_STORE_BYTES = 512 * 1024 * 1024
_log_to_driver = True


def set_log_to_driver(enabled: bool) -> None:
    """Whether Ray echoes worker output on this process's stdout (off for ``--json``)."""
    global _log_to_driver
    _log_to_driver = enabled


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             dashboard: bool = False, **kwargs: Any) -> None:
    """Join the cluster at ``address`` or start a local Ray with its dashboard on 127.0.0.1.

    Ray 2.60's core services (GCS, raylet, object manager) still listen on every interface of a
    local head, and ``_node_ip_address`` does not change that; with token auth off, run on a
    trusted network or export ``RAY_AUTH_MODE=token`` before starting.

    Local mode turns off usage stats and token auth (Ray 2.60 enables token auth for new local
    clusters, which then trips ``ray job``/``ray start --address`` clients) unless the user set
    ``RAY_AUTH_MODE`` themselves, and caps the object store so small machines keep their memory.

    Args:
        address: ``ray://`` or ``host:port`` of a running cluster; None uses ``RAY_ADDRESS``
            when set (inside a Ray job) and otherwise starts a local one.
        num_cpus: logical CPUs of the local cluster (default: all cores).
        dashboard: start the dashboard (Tune's placement-group cleanup needs its State API).
        **kwargs: passed on to ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=_log_to_driver, **kwargs)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=_log_to_driver,
        **kwargs,
    )


def cluster_cpus() -> float:
    """CPUs Ray can schedule on (call after :func:`init_ray`)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
