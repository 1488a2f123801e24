"""Bounded waits for Ray actors: a clear error naming the missing resource instead of a hang.

Ray queues an actor that no node can hold until a node that can appears, and Ray Data's actor
pools wait for their actors without limit by default (``DataContext.wait_for_min_actors_s`` is
-1). On a cluster without a GPU and no autoscaler that could add one, ``extract --use-gpu`` would
wait forever. :func:`wait_placeable` runs before a pool starts:

1. When the alive nodes cannot hold the whole group (``count`` actors: no node has enough of
   some resource for one, or all of them together do not fit, as with two GPU ranks on a
   one-GPU machine) and no autoscaler can add nodes (a local Ray, a hand-assembled or KubeRay
   cluster without autoscaling), it fails at once.
2. Otherwise it reserves the pool's resources with a placement group (which the autoscaler sees
   as demand and scales for), fails as soon as autoscaler v2 reports the demand infeasible, and
   fails after ``timeout_s`` when the resources never became free; then it releases them for
   the pool's actors.
3. With ``queue`` (tune trials), a group the alive nodes could hold once other work frees them
   waits behind that work without a deadline, saying so through ``on_wait``; only waiting for
   nodes that do not come counts against ``timeout_s``.

Autoscaler detection reads what Ray's monitor publishes in the GCS (v2: the autoscaling state;
v1: the ``__autoscaling_status`` record, where a monitor without a cluster config, the
read-only provider, names every node type ``node_<id>``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

DEFAULT_TIMEOUT_S = 600.0
"""Default bound on waiting for a pool's resources (autoscalers may need minutes for a node)."""
_STATUS_WAIT_S = 10.0
_POLL_S = 1.0
_FIRST_NOTE_S = 2.0
"""Seconds of waiting before the first ``on_wait`` line (a free cluster places at once)."""


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested actors (now, or within the allowed time)."""


def describe(request: dict[str, float]) -> str:
    """``{'CPU': 0.5, 'GPU': 1.0}`` -> ``CPU 0.5, GPU 1``."""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(request.items()))


def _nodes() -> list[dict[str, float]]:
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def copies_held(request: dict[str, float], node: dict[str, float]) -> int:
    """How many actors of ``request`` one node's resources hold at once."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0),
               default=0)


def missing_everywhere(request: dict[str, float], nodes: list[dict[str, float]],
                       count: int = 1) -> list[str]:
    """Resources that keep ``count`` actors of ``request`` from fitting on ``nodes`` together.

    Empty when they fit. Else the resources no node has enough of for one actor; else those
    the group needs more of than all nodes have together; else (the totals would do, but no
    split over the nodes does) every resource of ``request``.
    """
    # The actors are alike, so filling each node with as many as it holds is an exact packing.
    if sum(copies_held(request, n) for n in nodes) >= count:
        return []
    lacking = [k for k, v in sorted(request.items())
               if not any(n.get(k, 0.0) + 1e-9 >= v for n in nodes)]
    short = [k for k, v in sorted(request.items())
             if sum(n.get(k, 0.0) for n in nodes) + 1e-9 < v * count]
    return lacking or short or sorted(request)


def _status_reply() -> Any | None:
    """The GCS ``GetClusterStatusReply`` (autoscaler v2 state), or None when unavailable."""
    try:
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address)
                              .get_cluster_status(timeout_s=5))
        return reply
    except Exception:  # private API: fall back to the bounded wait alone
        return None


def _v1_status() -> dict[str, Any] | None:
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw) if raw else None
    except Exception:
        return None


def autoscaler_mode(wait_s: float = _STATUS_WAIT_S) -> str:
    """``"v2"``, ``"v1"`` (an autoscaler with node types to launch), or ``"none"``.

    ``"none"`` also covers Ray's read-only monitor (no cluster config: it cannot add nodes).
    Waits up to ``wait_s`` for a monitor that has not reported yet (it reports every few s).
    """
    deadline = time.monotonic() + wait_s
    while True:
        reply = _status_reply()
        if reply is not None and reply.autoscaling_state.autoscaler_state_version > 0:
            return "v2"
        report = (_v1_status() or {}).get("autoscaler_report") or {}
        types = set((report.get("active_nodes") or {}).keys())
        types |= set((report.get("pending_launches") or {}).keys())
        types |= set((report.get("node_type_mapping") or {}).values())
        if types:  # an empty first report says nothing yet: wait for the next one
            return "v1" if any(not t.startswith("node_") for t in types) else "none"
        if time.monotonic() >= deadline:
            return "none"
        time.sleep(0.5)


def _reported_infeasible(request: dict[str, float]) -> bool:
    """True when autoscaler v2 reports a bundle of this shape as infeasible."""
    reply = _status_reply()
    if reply is None:
        return False
    state = reply.autoscaling_state
    bundles = [dict(r.resources_bundle) for r in state.infeasible_resource_requests]
    for gang in state.infeasible_gang_resource_requests:
        bundles += [dict(r.resources_bundle) for r in gang.requests]
    want = {k: float(v) for k, v in request.items() if v}
    return any(set(b) == set(want) and all(math.isclose(b[k], want[k]) for k in want)
               for b in bundles)


def _free_summary(request: dict[str, float]) -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g} free"
                     for k in sorted(request))


def check_feasible(request: dict[str, float], what: str, count: int = 1) -> None:
    """Raise :class:`PlacementError` at once when the cluster can never hold ``count`` actors
    of ``request`` together.

    That is: the alive nodes cannot hold the whole group (:func:`missing_everywhere`), and no
    autoscaler can add a node.
    """
    nodes = _nodes()
    missing = missing_everywhere(request, nodes, count)
    if not missing:
        return
    mode = autoscaler_mode()
    if mode != "none":
        return
    shapes = "; ".join(sorted({describe({k: v for k, v in n.items() if k in ("CPU", "GPU")
                                         or k in request}) or "nothing"
                               for n in nodes}))
    if missing_everywhere(request, nodes):
        raise PlacementError(
            f"{what}: each needs {describe(request)}, but no node of this Ray cluster has "
            f"enough {', '.join(missing)} (nodes offer: {shapes}) and no autoscaler can add one"
        )
    need = {k: request[k] * count for k in missing}
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in missing}
    held = sum(copies_held(request, n) for n in nodes)
    raise PlacementError(
        f"{what}: each needs {describe(request)}, so the {count} need {describe(need)} "
        f"together, but this Ray cluster has {describe(have)} in all and its nodes hold {held} "
        f"of them (nodes offer: {shapes}); no autoscaler can add nodes: ask for fewer workers "
        "or less per worker, or add nodes"
    )


def wait_placeable(request: dict[str, float], count: int, what: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S, *, queue: bool = False,
                   on_wait: Callable[[str], None] | None = None,
                   wait_every_s: float = 30.0) -> None:
    """Wait until ``count`` actors of ``request`` fit the cluster together, or raise.

    Args:
        request: resources of one actor (``{"CPU": 0.5, "GPU": 1}``).
        count: actors the pool starts.
        what: names the actors in messages (``"2 encoder actors"``).
        timeout_s: how long to wait for the resources to become free.
        queue: wait behind other work: while the alive nodes could hold the group once that
            work frees them (a trial behind other trials), the wait has no deadline;
            ``timeout_s`` counts only the time spent waiting for nodes that are not there.
        on_wait: called with a line saying what the group waits for, once it has waited
            :data:`_FIRST_NOTE_S`, then every ``wait_every_s``.
        wait_every_s: seconds between ``on_wait`` lines.

    Raises:
        PlacementError: impossible on this cluster, reported infeasible, or not free in time.
    """
    began = start = time.monotonic()
    request = {k: float(v) for k, v in request.items() if v}
    check_feasible(request, what, count)
    pg = placement_group([dict(request) for _ in range(count)], strategy="PACK")
    note_at = began + _FIRST_NOTE_S
    try:
        ready = pg.ready()
        while True:
            left = timeout_s - (time.monotonic() - start)
            done, _ = ray.wait([ready], timeout=max(0.0, min(_POLL_S, left)))
            if done:
                return
            if _reported_infeasible(request):
                raise PlacementError(
                    f"{what}: each needs {describe(request)}, and the autoscaler reports that "
                    "no node type it can launch holds that"
                )
            now = time.monotonic()
            behind_others = queue and not missing_everywhere(request, _nodes(), count)
            if behind_others:
                start = now  # the nodes are there; other work holds them and will end
            if on_wait is not None and now >= note_at:
                on_wait(f"{what} waiting for capacity ({now - began:.0f} s): {count} x "
                        f"{describe(request)}; {_free_summary(request)}; "
                        + ("held by other work" if behind_others
                           else "waiting for nodes (the autoscaler sees the demand)"))
                note_at = now + wait_every_s
            if timeout_s - (now - start) <= 0:
                raise PlacementError(
                    f"{what} ({describe(request)} each) could not be placed within "
                    f"{timeout_s:g} s: {_free_summary(request)} (raise the placement timeout, "
                    "lower the concurrency, or add nodes)"
                )
    finally:
        remove_placement_group(pg)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PlacementError",
    "autoscaler_mode",
    "check_feasible",
    "copies_held",
    "describe",
    "missing_everywhere",
    "wait_placeable",
]
