"""Shared helpers of the benchmarks: timing, result records, test data, process memory.

Every benchmark module has ``run(quick: bool) -> dict`` returning a :func:`result` record and a
``main()`` that writes it as JSON (``--out``) so ``run_all.py`` can run each one in a fresh
process. Ratios are what we report: both sides run in the same process run, back to back or
interleaved, so a busy shared machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GRID_SHARDS = Path(os.environ.get("SE4LIP_GRID_SHARDS", "/work/data/grid"))
SHARED_DATA = Path(os.environ.get("SE4LIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
GRID_VIDEO = SHARED_DATA / "grid_s1" / "video"
INSIGHTFACE_ROOT = Path(
    os.environ.get("SE4LIP_INSIGHTFACE_ROOT", SHARED_DATA.parent / "models" / "insightface"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def median(xs: Iterable[float]) -> float:
    """Median of a non-empty iterable."""
    return float(statistics.median(list(xs)))


def ratio(label: str, value: float, target: float | None, detail: str = "",
          unit: str = "x") -> dict[str, Any]:
    """One row of the ratio table; ``met`` is None when there is no target."""
    return {"label": label, "value": round(float(value), 3), "unit": unit,
            "target": target, "met": None if target is None else bool(value >= target),
            "detail": detail}


def result(name: str, metrics: dict[str, Any], ratios: list[dict[str, Any]],
           notes: list[str] | None = None) -> dict[str, Any]:
    """A benchmark's record: raw metrics plus the ratio rows it contributes."""
    return {"name": name, "metrics": metrics, "ratios": ratios, "notes": notes or []}


class Timer:
    """``with Timer() as t: ...`` then ``t.s`` wall seconds and ``t.cpu`` process CPU seconds.

    CPU time of a single-threaded job hardly moves when other users load the machine, so the
    in-process benchmarks take their ratios from it and report wall time beside it.
    """

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s = self.cpu = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def main(run: Callable[[bool], dict[str, Any]]) -> None:
    """CLI of one benchmark module: ``[--quick] [--out FILE]``; prints the JSON record."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, no timings)")
    p.add_argument("--out", help="also write the JSON record here")
    a = p.parse_args()
    t0 = time.perf_counter()
    rec = run(a.quick)
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["quick"] = a.quick
    text = json.dumps(rec, indent=1, default=str)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


def start_ray(attempts: int = 3) -> None:
    """``runtime.init_ray`` on 2 CPUs, retried: a saturated machine can time out raylet start."""
    import ray

    from se4lip_dist.runtime import init_ray

    for i in range(attempts):
        try:
            init_ray(None, num_cpus=2)
            return
        except Exception:
            ray.shutdown()
            if i == attempts - 1:
                raise
            time.sleep(5)


# ---------------------------------------------------------------- data


def grid_available() -> bool:
    """True when the prepared GRID shards are present."""
    return (GRID_SHARDS / "manifest.json").is_file()


def grid_subset(out_dir: str | Path, n_rows: int, rows_per_shard: int = 16) -> Path:
    """Copy the first ``n_rows`` rows (whole clips) of the prepared GRID shards into small shards.

    Small shards give Ray Data and the DataLoader the same file-level parallelism.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from se4lip_dist.manifest import Manifest
    from se4lip_dist.shards import ShardWriter

    src = Manifest.load(GRID_SHARDS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(config=src.config)
    writer = ShardWriter(out, shard_bytes=1 << 62, prefix="shard")
    pending: dict[str, Any] = {}
    rows = 0

    def flush() -> None:
        nonlocal pending
        info = writer.flush()
        if info is not None:
            for rec in pending.values():
                rec.shard = info.file
            manifest.add_shard(info, pending)
        pending = {}

    for path in src.shard_paths(GRID_SHARDS):
        for rb in pq.ParquetFile(path).iter_batches(batch_size=64):
            t = pa.Table.from_batches([rb])
            ids = t.column("clip_id").to_pylist()
            for cid in dict.fromkeys(ids):
                idx = [i for i, c in enumerate(ids) if c == cid]
                writer.add(cid, t.take(idx))
                pending[cid] = src.clips[cid]
                rows += len(idx)
                if sum(r.segments for r in pending.values()) >= rows_per_shard:
                    flush()
                if rows >= n_rows:
                    flush()
                    manifest.save(out)
                    return out
    flush()
    manifest.save(out)
    return out


def synthetic_shards(out_dir: str | Path, n_clips: int = 12, n_frames: int = 60) -> Path:
    """Tiny synthetic prepared folder (``tests/shard_fixtures.py``) for ``--quick`` runs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from shard_fixtures import write_synthetic_shards

    write_synthetic_shards(out_dir, n_clips=n_clips, n_frames=n_frames, clips_per_shard=2,
                           val_clips=2)
    return Path(out_dir)


def grid_videos(n: int) -> list[str]:
    """The first ``n`` GRID videos (sorted), or [] when the shared data is absent."""
    if not GRID_VIDEO.is_dir():
        return []
    return [str(p) for p in sorted(GRID_VIDEO.glob("*.mp4"))[:n]]


# ---------------------------------------------------------------- memory


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """Current ``Rss``/``Pss`` in bytes from ``/proc/PID/smaps_rollup`` (empty if unreadable)."""
    out: dict[str, int] = {}
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def peak_rss_self() -> int:
    """This process's peak RSS in bytes (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _descendants(root: int) -> set[int]:
    """Pids whose parent chain reaches ``root`` (our own Ray cluster, not other users')."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            stat = _read(f"/proc/{d}/stat")
            if stat:
                # Field 4 (ppid) follows the parenthesised command name.
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out = set()
    for pid in parent:
        p, seen = pid, 0
        while p in parent and seen < 64:
            p = parent[p]
            seen += 1
            if p == root:
                out.add(pid)
                break
    return out


class ProcSampler(threading.Thread):
    """Samples Rss/Pss of this process's descendants whose command line matches a pattern.

    Ray sets worker process titles (``ray::RayTrainWorker...``, ``ray::MapWorker(...)``), which
    ``/proc/PID/cmdline`` shows. Only descendants of this process are sampled, so other users'
    Ray clusters on the same machine are never counted.
    """

    def __init__(self, patterns: dict[str, str], interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.patterns = patterns
        self.interval_s = interval_s
        self.peaks: dict[str, dict[int, dict[str, int]]] = {k: {} for k in patterns}
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            for pid in _descendants(me):
                cmd = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
                for name, pat in self.patterns.items():
                    if pat in cmd:
                        mem = proc_memory(pid)
                        peak = self.peaks[name].setdefault(pid, {"rss": 0, "pss": 0})
                        for k, v in mem.items():
                            peak[k] = max(peak[k], v)
            self._halt.wait(self.interval_s)

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stop sampling; per pattern: processes seen and the largest per-process peaks (MiB)."""
        self._halt.set()
        self.join(timeout=5)
        out = {}
        for name, per_pid in self.peaks.items():
            vals = list(per_pid.values())
            out[name] = {
                "processes": len(vals),
                "peak_rss_mib": round(max((v["rss"] for v in vals), default=0) / 2**20, 1),
                "peak_pss_mib": round(max((v["pss"] for v in vals), default=0) / 2**20, 1),
            }
        return out


def other_ray_clusters() -> int:
    """Raylets on this machine that are not ours (contention warning for the report)."""
    mine = _descendants(os.getpid())
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in mine:
            cmd = _read(f"/proc/{d}/cmdline")
            if cmd.startswith(("/", "ray")) and "/raylet/raylet" in cmd.split("\0")[0]:
                n += 1
    return n
