"""``init_ray`` beside another Ray on the same machine (issue 22).

A ``ray start --head`` records its address in ``<Ray temp dir>/ray_current_cluster``; Ray's own
``ray.init()`` joins whatever that file names, and a State API call made without an address
(Train V2's placement-group cleaner makes one every second) picks its cluster from that file or,
without it, from the raylets it sees on the host. Here a real head of our own runs beside the
local cluster ``init_ray`` starts, in both situations: its file in the Ray temp dir of the
process, or not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import standin  # cluster/local/standin.py, loaded by conftest.py

VENV_BIN = Path(sys.executable).parent

PROBE = """
import json, ray
from ray.util.state import get_actor
from se4lip_dist.runtime import init_ray

init_ray(num_cpus=2, dashboard=True)

@ray.remote(num_cpus=0)
class Pinger:
    def ping(self):
        return True

@ray.remote(num_cpus=0)
def state_of(actor_id):
    # What the placement-group cleaner asks about the Train controller, from a worker.
    try:
        found = get_actor(actor_id, timeout=30)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None if found is None else found.state

pinger = Pinger.remote()
ray.get(pinger.ping.remote())
ctx = ray.get_runtime_context()
print(json.dumps({"gcs": ctx.gcs_address,
                  "cpus": ray.cluster_resources().get("CPU"),
                  "nodes": len([n for n in ray.nodes() if n["Alive"]]),
                  "actor_state": ray.get(state_of.remote(pinger._actor_id.hex()))}))
ray.shutdown()
"""


@dataclass
class Head:
    """A ``ray start --head`` of this test module: its GCS address and its folders."""

    address: str
    root: Path
    """``RAY_TMPDIR`` under which the head's temp dir (``root/ray``) lies."""


@pytest.fixture(scope="module")
def other_head() -> Iterator[Head]:
    """A 1-CPU ``ray start --head`` on free ports in a temp dir of its own; at the end, exactly
    its processes (the ones naming that temp dir, the command's group, their children) stop."""
    root = standin.make_state_dir("se4lip-head-")  # short: Ray's socket paths < 108 bytes
    temp = root / "ray"
    argv = [str(VENV_BIN / "ray"), "start", "--head", "--block",
            f"--port={standin.free_port()}", f"--temp-dir={temp}", "--num-cpus=1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={standin.free_port()}",
            # Ray's fixed defaults (10001, 52365) collide with any other Ray on the host.
            f"--ray-client-server-port={standin.free_port()}",
            f"--dashboard-agent-listen-port={standin.free_port()}",
            f"--object-store-memory={256 * 1024**2}", "--disable-usage-stats"]
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = standin.start_service("other-head", argv, root, env,
                                 unset=["RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
    try:
        # `ray start` writes the file once the head is up.
        deadline = time.monotonic() + 180
        while not (temp / "ray_current_cluster").exists():
            if not head.alive() or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up: {head.log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Head((temp / "ray_current_cluster").read_text().strip(), root)
    finally:
        table = standin.processes()
        ours = standin.descendants(standin.naming(str(temp), table) | {head.pid}, table)
        targets = {p: table[p].starttime for p in ours}
        head.stop(grace_s=15)
        standin.kill_pids(targets, grace_s=5)
        left = standin.naming(str(temp))
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"the head's processes outlived the test: {sorted(left)}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("head_file", [True, False], ids=["head-in-temp-dir", "head-elsewhere"])
def test_init_ray_starts_its_own_cluster_beside_a_running_head(
        other_head: Head, head_file: bool) -> None:
    """A new local cluster with the CPUs asked for, whose workers' State API calls reach it.

    ``head-in-temp-dir``: the head's ``ray_current_cluster`` is in this process's Ray temp
    dir, as after a plain ``ray start --head`` (Ray would join it, or the State API would ask
    it about our actors). ``head-elsewhere``: no such file; the State API would see two
    clusters' raylets and refuse to choose.
    """
    root = other_head.root if head_file else standin.make_state_dir("se4lip-rt-")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(root), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                             text=True, timeout=240, check=False)
    finally:
        if not head_file:
            shutil.rmtree(root, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["gcs"] != other_head.address, got
    assert (got["cpus"], got["nodes"]) == (2.0, 1), got
    assert got["actor_state"] == "ALIVE", got
