"""prepare's scale-out on the autoscaling stand-in: the same GRID clips on 1 and on 2 worker nodes.

For each node count ``n``: a fresh autoscaling stand-in (``cluster/local/standin.py``: 0-CPU
head, up to ``n`` worker nodes of 1 CPU each, none at the start), and a driver process joined to
it that runs the product's ``run_prepare`` over the same clips into a new shard folder with
``workers=n`` and ``min_workers=n`` (the run waits for ``n`` nodes, as a platform team's job
would on a pool sized for it). Reported per run: clips and frames prepared, wall seconds, the
clip workers' process CPU seconds (start-up, detector load and Ray's threads included; the
summary's ``worker_cpu_seconds``), frames per worker CPU second, and the driver process's own
CPU seconds. Scale-out efficiency is frames per worker CPU second with ``n`` nodes over that
with 1: adding a node should cost no per-node efficiency (goal >= 0.9).

Wall-clock speed-up is printed too but means little on a 2-core machine, where two 1-CPU nodes,
the head and the driver share two cores.

    python benchmarks/scale_out.py                     # 900 GRID clips, 1 and 2 nodes
    python benchmarks/scale_out.py --clips 60 --nodes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import harness

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cluster" / "local"))

DRIVER = """
    import json, os, sys, time
    sys.path.insert(0, os.environ["BENCH_DIR"])
    import harness
    from se4lip_dist.prepare import run_prepare

    videos = json.loads(os.environ["VIDEOS"])
    n = int(os.environ["NODES"])
    c0 = time.process_time()
    s = run_prepare(videos, os.environ["OUT"], harness.prepare_config(), workers=n, min_workers=n,
                    placement_timeout_s=600)
    print(json.dumps({"summary": s.to_json(), "driver_cpu_s": time.process_time() - c0}))
"""


def run_once(videos: list[str], nodes: int, work: Path) -> dict[str, Any]:
    """Prepare ``videos`` on a fresh stand-in with up to ``nodes`` 1-CPU worker nodes."""
    import standin

    state = standin.make_state_dir()
    types = {"cpu_node": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": nodes}}
    cluster = standin.AutoscalingRay(state, node_types=types, idle_timeout_minutes=2).start()
    try:
        env = {**os.environ, **cluster.env(), "BENCH_DIR": str(Path(__file__).parent),
               "VIDEOS": json.dumps(videos), "NODES": str(nodes),
               "OUT": str(work / f"shards-{nodes}")}
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(DRIVER)], env=env,
                           capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"prepare on {nodes} node(s) failed:\n{p.stderr[-3000:]}")
        out = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    finally:
        cluster.stop()
    s = out["summary"]
    if s["failed"] or s["prepared"] != len(videos):
        raise RuntimeError(f"{nodes} node(s): {s['prepared']} of {len(videos)} clips prepared, "
                           f"{s['failed']} failed: {s['failures'][:3]}")
    return {"nodes": nodes, "clips": s["prepared"], "frames": s["frames"],
            "wall_s": s["wall_seconds"], "workers_used": s["workers_used"],
            "worker_cpu_s": s["worker_cpu_seconds"],
            "frames_per_worker_cpu_s": s["frames_per_worker_cpu_s"],
            "driver_cpu_s": round(out["driver_cpu_s"], 2)}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows, each run's efficiency and speed-up against the 1-node run."""
    base = next((r for r in rows if r["nodes"] == 1), rows[0])
    lines = ["| worker nodes | clips | frames | wall s | clip workers | worker CPU s | frames per "
             "worker CPU s | efficiency vs 1 node | wall speed-up | driver CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        eff = r["frames_per_worker_cpu_s"] / base["frames_per_worker_cpu_s"]
        speed = (r["frames"] / r["wall_s"]) / (base["frames"] / base["wall_s"])
        lines.append(f"| {r['nodes']} | {r['clips']} | {r['frames']:,} | {r['wall_s']:.1f} | "
                     f"{r['workers_used']} | {r['worker_cpu_s']:.1f} | "
                     f"{r['frames_per_worker_cpu_s']:.0f} | {eff:.2f}x | {speed:.2f}x | "
                     f"{r['driver_cpu_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=900, help="GRID clips (spread over the corpus)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", help="also write the JSON record here")
    a = p.parse_args()
    if not harness.grid_available():
        sys.exit(f"scale_out needs the shared GRID clips and detector: {harness.missing_reason()}")
    videos = harness.grid_videos(a.clips)
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="se4lip-scale-out-") as tmp:
        for n in a.nodes:
            rows.append(run_once(videos, n, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    rec = {"rows": rows, "load_avg_end": os.getloadavg(), "wall_s": round(time.time() - t0),
           "commit": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                    capture_output=True, text=True).stdout.strip()}
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1, default=str))
    print(table(rows))


if __name__ == "__main__":
    main()
