"""Run every benchmark, each in a fresh process, and print the ratio table.

    .venv/bin/python benchmarks/run_all.py            # full run (< 15 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke sizes, numbers meaningless

Writes ``benchmarks/results.json`` (every record) and ``benchmarks/results.md`` (the table);
``--quick`` writes them under the system temp folder instead, so smoke runs never overwrite the
published results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_pipeline", "bench_ray_overhead", "bench_extract", "bench_prepare",
              "bench_memory"]


def run_one(name: str, quick: bool, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py`` in its own process; its record, or an error record."""
    out = out_dir / f"{name}.json"
    log = out_dir / f"{name}.log"
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out)]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                cwd=HERE.parent).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    wall = round(time.perf_counter() - t0, 1)
    if rc == 0 and out.is_file():
        rec = json.loads(out.read_text())
        rec["process_wall_s"] = wall
        return rec
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"name": name, "error": f"exit {rc}" if rc != -1 else f"timeout {timeout_s:.0f} s",
            "log_tail": tail, "ratios": [], "metrics": {}, "process_wall_s": wall}


def _fmt(v: float, unit: str) -> str:
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "":
        return f"{v:.2f}"
    return f"{v:.1f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown table of every ratio row, targets and whether they are met."""
    lines = ["| measurement | result | target | met | detail |",
             "| --- | --- | --- | --- | --- |"]
    for rec in records:
        if rec.get("error"):
            lines.append(f"| {rec['name']} | **failed** | | | {rec['error']} |")
        for r in rec["ratios"]:
            target = "" if r["target"] is None else f">= {_fmt(r['target'], r['unit'])}"
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            lines.append(f"| {r['label']} | {_fmt(r['value'], r['unit'])} | {target} | {met} "
                         f"| {r['detail']} |")
    return "\n".join(lines)


def main() -> int:
    """Run the suite; exit status 1 when a benchmark failed (missed targets are not failures)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run a subset")
    p.add_argument("--timeout", type=float, default=600.0, help="per benchmark, seconds")
    a = p.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="se4lip-bench-")) if a.quick else HERE
    logs = Path(tempfile.mkdtemp(prefix="se4lip-bench-logs-"))
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    records = []
    for name in a.only or BENCHMARKS:
        print(f"[{time.perf_counter() - t0:6.0f} s] {name} ...", flush=True)
        rec = run_one(name, a.quick, logs, a.timeout)
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: "
              f"{rec.get('error') or 'ok'} ({rec['process_wall_s']} s)", flush=True)
        records.append(rec)
    wall = time.perf_counter() - t0
    header = (f"Run {time.strftime('%Y-%m-%d %H:%M')}, {platform.node() or 'host'}, "
              f"{os.cpu_count()} CPUs, wall {wall / 60:.1f} min, load average "
              f"{load0[0]:.1f} at start / {os.getloadavg()[0]:.1f} at end"
              f"{' (--quick: sizes too small to mean anything)' if a.quick else ''}.")
    md = f"{header}\n\n{table(records)}\n"
    summary = {"wall_s": round(wall, 1), "quick": a.quick, "header": header,
               "records": records}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "results.md").write_text(md)
    print()
    print(md)
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}; logs: {logs}")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
