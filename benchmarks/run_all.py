"""Run every benchmark, each in a fresh process, and print the ratio table.

    .venv/bin/python benchmarks/run_all.py            # full run (< 15 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke sizes, numbers meaningless

Writes ``benchmarks/results.json`` (every record, the machine/load/versions/git record and
input sizes) and ``benchmarks/results.md`` (the table, each row with its bound and the previous
run's value); the run they replace is kept as ``results.previous.json``/``.md``. ``--quick``
writes under the system temp folder instead, so smoke runs never overwrite the published results
(their numbers are labelled meaningless). Inputs come from ``../shared/data`` through
``harness.grid_shards`` (a cached, deterministic prepared subset), never a developer's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402  (benchmarks/ is not a package)

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


def table(records: list[dict[str, Any]], previous: dict[str, dict[str, Any]] | None = None,
          quick: bool = False) -> str:
    """Markdown table of every ratio row: its bound, target, whether met, previous value.

    ``previous`` maps a row label to that row in the previous run (:func:`previous_rows`).
    """
    previous = previous or {}
    lines = ["| measurement | result | previous | bound | target | met | detail |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rec in records:
        if rec.get("error"):
            lines.append(f"| {rec['name']} | **failed** | | | | | {rec['error']} |")
        if rec.get("metrics", {}).get("skipped"):
            lines.append(f"| {rec['name']} | skipped | | | | | {rec['metrics']['skipped']} |")
        for r in rec["ratios"]:
            target = "" if r["target"] is None else f">= {_fmt(r['target'], r['unit'])}"
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            value = _fmt(r["value"], r["unit"]) + (" (smoke)" if quick else "")
            old = previous.get(r["label"])
            prev = _fmt(old["value"], old.get("unit", r["unit"])) if old else ""
            lines.append(f"| {r['label']} | {value} | {prev} | {r.get('bound', '')} | {target} "
                         f"| {met} | {r['detail']} |")
    return "\n".join(lines)


def previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Ratio rows of an earlier ``results.json`` by label ({} when absent or unreadable)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {r["label"]: r for rec in old.get("records", []) for r in rec.get("ratios", [])}


def inputs_lines(records: list[dict[str, Any]]) -> str:
    """One line per benchmark saying what it measured (data kind and sizes)."""
    out = []
    for rec in records:
        inp = rec.get("inputs") or {}
        if inp:
            sizes = ", ".join(f"{k} {v}" for k, v in inp.items() if v is not None)
            out.append(f"- {rec['name']}: {sizes}")
    return "\n".join(out)


def header(env: dict[str, Any], wall_s: float, quick: bool) -> str:
    """The run's one-paragraph environment record for ``results.md``."""
    pk = env.get("packages", {})
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    commit = (env.get("git_commit") or "no git")[:10]
    dirty = " (dirty tree)" if env.get("git_dirty") else ""
    return (f"Run {time.strftime('%Y-%m-%d %H:%M')}, {env.get('host') or 'host'} "
            f"({env.get('cpu_model')}, {env.get('cpu_count')} CPUs, {env.get('cpus_usable')} "
            f"usable), wall {wall_s / 60:.1f} min, load average {env['load_avg'][0]:.1f} at "
            f"start / {env['load_avg_end'][0]:.1f} at end; commit {commit}{dirty}; Python "
            f"{env.get('python')}, {versions}; shared data "
            f"{'present' if env.get('grid_available') else 'ABSENT (synthetic inputs)'}"
            f"{'. --quick: smoke-test sizes, the numbers are meaningless' if quick else ''}.")


def main() -> int:
    """Run the suite; exit status 1 when a benchmark failed (missed targets are not failures)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run a subset")
    p.add_argument("--timeout", type=float, default=600.0, help="per benchmark, seconds")
    p.add_argument("--out-dir", type=Path,
                   help="write results.json/.md here (default: benchmarks/, or a temp folder "
                        "with --quick); a results.json already there is the previous run")
    a = p.parse_args()
    out_dir = a.out_dir or (Path(tempfile.mkdtemp(prefix="se4lip-bench-")) if a.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="se4lip-bench-logs-"))
    env = harness.environment()
    t0 = time.perf_counter()
    records = []
    for name in a.only or BENCHMARKS:
        print(f"[{time.perf_counter() - t0:6.0f} s] {name} ...", flush=True)
        rec = run_one(name, a.quick, logs, a.timeout)
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: "
              f"{rec.get('error') or 'ok'} ({rec['process_wall_s']} s)", flush=True)
        records.append(rec)
    wall = time.perf_counter() - t0
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    prev_json = out_dir / "results.json"
    previous = previous_rows(prev_json)
    if prev_json.is_file():
        # Keep the run this one replaces beside it.
        for ext in ("json", "md"):
            old = out_dir / f"results.{ext}"
            if old.is_file():
                old.replace(out_dir / f"results.previous.{ext}")
    head = header(env, wall, a.quick)
    md = (f"{head}\n\n{table(records, previous, a.quick)}\n\nInputs:\n"
          f"{inputs_lines(records)}\n")
    summary = {"wall_s": round(wall, 1), "quick": a.quick, "header": head,
               "environment": env, "records": records}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "results.md").write_text(md)
    print()
    print(md)
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}; logs: {logs}")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
