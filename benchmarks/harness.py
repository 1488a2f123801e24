"""Shared helpers of the benchmarks: timing, result records, test data, process memory.

Every benchmark module has ``run(quick: bool) -> dict`` returning a :func:`result` record and a
``main()`` that writes it as JSON (``--out``) so ``run_all.py`` can run each one in a fresh
process. Ratios are what we report: both sides run in the same process run, back to back or
interleaved, so a busy shared machine slows both alike.

Inputs come from the project's shared data (``../shared/data``), never from a developer's folder:
:func:`grid_shards` prepares a deterministic GRID subset with the product's own ``prepare`` and
caches it under a key of code version, input hashes and config; without the shared data a
benchmark says so and runs on synthetic inputs (labelled) or skips. Every record carries the
run's :func:`environment` (machine, load, versions, git state) and its input sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SE4LIP_SHARED_DATA") or ROOT.parent / "shared" / "data")
"""The project's shared data (``../shared/data``; ``SE4LIP_SHARED_DATA`` overrides)."""
GRID_VIDEO = SHARED_DATA / "grid_s1" / "video"
WILD_VIDEO = SHARED_DATA / "wild"
INSIGHTFACE_ROOT = Path(
    os.environ.get("SE4LIP_INSIGHTFACE_ROOT") or SHARED_DATA.parent / "models" / "insightface")
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "se4lip-bench"
"""Where :func:`grid_shards` keeps prepared subsets, one folder per cache key."""
CACHE_FORMAT = 1
"""Bumped when the layout of a cached folder changes."""
COMPLETE = "COMPLETE.json"
"""Written last into a cached folder (holding its key record): no marker, no reuse."""
PREPARE_MODULES = ("config", "faces", "manifest", "media", "prepare", "shards", "storage")
"""``se4lip_dist`` modules whose source decides what ``prepare`` writes (part of the key)."""
PREPARE_LIBRARIES = ("av", "opencv-python-headless", "opencv-python", "onnxruntime",
                     "insightface", "numpy", "pyarrow")
"""Distributions whose versions decide what ``prepare`` writes (part of the key)."""
ENV_PACKAGES = ("torch", "torchaudio", "ray", "mlflow", "av", "onnxruntime", "numpy", "pyarrow")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def median(xs: Iterable[float]) -> float:
    """Median of a non-empty iterable."""
    return float(statistics.median(list(xs)))


def ratio(label: str, value: float, target: float | None, detail: str = "",
          unit: str = "x", bound: str = "") -> dict[str, Any]:
    """One row of the ratio table; ``met`` is None when there is no target.

    ``bound`` names what the value is measured against (a physical floor or ceiling, or the
    tool a user would otherwise write), e.g. "decode-only frames per CPU s".
    """
    return {"label": label, "value": round(float(value), 3), "unit": unit,
            "target": target, "met": None if target is None else bool(value >= target),
            "bound": bound, "detail": detail}


def result(name: str, metrics: dict[str, Any], ratios: list[dict[str, Any]],
           notes: list[str] | None = None,
           inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A benchmark's record: raw metrics, the ratio rows it contributes and its input sizes.

    ``inputs`` says what was measured (e.g. ``{"data": "grid", "clips": 6, "frames": 450}``,
    or ``"data": "synthetic"`` with the reason the shared data was not used).
    """
    return {"name": name, "metrics": metrics, "ratios": ratios, "notes": notes or [],
            "inputs": inputs or {}}


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
    """CLI of one benchmark module: ``[--quick] [--out FILE]``; prints the JSON record.

    The record gets the run's environment (:func:`environment`, load average at start and end)
    and, with ``--quick``, a note that its numbers mean nothing.
    """
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a smoke test whose numbers are meaningless")
    p.add_argument("--out", help="also write the JSON record here")
    a = p.parse_args()
    env = environment()
    t0 = time.perf_counter()
    rec = run(a.quick)
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["quick"] = a.quick
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    rec["environment"] = env
    if a.quick:
        rec.setdefault("notes", []).insert(0, QUICK_NOTE)
    text = json.dumps(rec, indent=1, default=str)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


QUICK_NOTE = "--quick: smoke-test sizes; the numbers are meaningless"


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


class SharedDataMissing(FileNotFoundError):
    """``../shared/data`` (GRID video) or the InsightFace detector is not on this machine."""


def grid_available() -> bool:
    """True when the shared GRID video and the SCRFD detector are present."""
    return GRID_VIDEO.is_dir() and any(GRID_VIDEO.glob("*.mp4")) and detector_model() is not None


def detector_model() -> Path | None:
    """The shared SCRFD detector file (``buffalo_sc/det_*.onnx``), or None when absent."""
    found = sorted((INSIGHTFACE_ROOT / "models" / "buffalo_sc").glob("det_*.onnx"))
    return found[0] if found else None


def missing_reason() -> str:
    """One line naming what is absent, for skip messages and synthetic-input labels."""
    if not GRID_VIDEO.is_dir() or not any(GRID_VIDEO.glob("*.mp4")):
        return f"no GRID video under {GRID_VIDEO} (set SE4LIP_SHARED_DATA)"
    if detector_model() is None:
        return f"no SCRFD detector under {INSIGHTFACE_ROOT} (set SE4LIP_INSIGHTFACE_ROOT)"
    return ""


def grid_videos(n: int) -> list[str]:
    """``n`` GRID videos spread evenly over the sorted corpus, or [] when it is absent.

    Deterministic: the same ``n`` gives the same files on every machine with the shared data.
    """
    if not GRID_VIDEO.is_dir():
        return []
    allv = sorted(GRID_VIDEO.glob("*.mp4"))
    n = min(n, len(allv))
    return [str(allv[i * len(allv) // n]) for i in range(n)] if n > 0 else []


def wild_videos() -> list[str]:
    """The talking-head clips of four other people in ``wild/`` (sorted), or []."""
    return sorted(map(str, WILD_VIDEO.glob("*.mp4"))) if WILD_VIDEO.is_dir() else []


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> dict[str, str]:
    """What decides ``prepare``'s output besides its inputs and config.

    A hash of the source of :data:`PREPARE_MODULES` (so an edit invalidates the cache even in a
    dirty tree) and the versions of :data:`PREPARE_LIBRARIES` that are installed.
    """
    h = hashlib.sha256()
    for name in PREPARE_MODULES:
        h.update(name.encode() + b"\0" + (ROOT / "se4lip_dist" / f"{name}.py").read_bytes())
    out = {"cache_format": str(CACHE_FORMAT), "prepare_source_sha256": h.hexdigest()}
    for dist in PREPARE_LIBRARIES:
        v = _dist_version(dist)
        if v:
            out[dist] = v
    return out


def cache_key(videos: list[str], detector: str | Path | None, config: dict[str, Any],
              code: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The cache key of a prepared subset and the record it is derived from.

    The key is a hash of: the code version (:func:`code_version` unless given), every input
    video's name and sha256 in order, the detector file's sha256, and ``config`` (the data and
    face sections ``prepare`` uses, without machine-local paths).
    """
    record = {
        "code": code if code is not None else code_version(),
        "inputs": [[Path(v).name, file_sha256(v)] for v in videos],
        "detector": file_sha256(detector) if detector else None,
        "config": config,
    }
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20], record


def cached_complete(folder: Path, key: str) -> bool:
    """True when ``folder`` is a finished cache entry for ``key`` (its marker names the key)."""
    try:
        return json.loads((folder / COMPLETE).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def build_cached(key: str, record: dict[str, Any], build: Callable[[Path], None],
                 root: Path | None = None) -> Path:
    """``root/<key>``, built by ``build(tmp_folder)`` unless a complete entry exists.

    Built in a private temp folder beside it, marked complete, then renamed into place, so a
    killed build never leaves a folder that looks usable; an incomplete ``root/<key>`` (from an
    older layout or a copy gone wrong) is removed and rebuilt. When another process finished the
    same key first, its folder is kept and ours discarded.
    """
    root = Path(root or CACHE_ROOT)
    final = root / key
    if cached_complete(final, key):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        build(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"key": key, **record}, indent=1))
        if final.exists() and not cached_complete(final, key):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not cached_complete(final, key):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_config(preset: str = "cpu-small", shard_mib: int = 4) -> Any:
    """The config :func:`grid_shards` prepares with: ``preset`` with the shared detector."""
    from se4lip_dist.config import load_config

    return load_config(preset, overrides=[f"face.insightface_root={INSIGHTFACE_ROOT}",
                                          f"data.shard_bytes={shard_mib * 2**20}"])


def grid_shards(n_clips: int, *, preset: str = "cpu-small", shard_mib: int = 4) -> Path:
    """A prepared folder (shards + manifest) of ``n_clips`` GRID clips, cached across runs.

    The clips are :func:`grid_videos` ``(n_clips)``; each is one shard row (a GRID clip is
    shorter than one segment), so rows == clips. The product's own ``run_prepare`` prepares them
    in this process, in input order (same shards on every machine), with ``preset``'s data and
    face config, the shared SCRFD detector and shards of about ``shard_mib`` MiB. The folder is
    ``$XDG_CACHE_HOME/se4lip-bench/<key>`` (``~/.cache`` without it); see :func:`cache_key` for
    what the key covers and :func:`build_cached` for how a half-built folder is never reused.

    Raises:
        SharedDataMissing: the GRID video or the detector is absent (callers fall back to
            synthetic inputs and say so).
        RuntimeError: some clip failed to prepare (sizes would not match the README's).
    """
    from se4lip_dist.prepare import run_prepare

    if not grid_available():
        raise SharedDataMissing(missing_reason())
    videos = grid_videos(n_clips)
    if len(videos) < n_clips:
        raise SharedDataMissing(f"only {len(videos)} GRID videos under {GRID_VIDEO}, "
                                f"{n_clips} asked for")
    cfg = prepare_config(preset, shard_mib)
    conf = cfg.to_dict()
    config = {"data": conf["data"], "face": {k: v for k, v in conf["face"].items()
                                             if k != "insightface_root"}}
    key, record = cache_key(videos, detector_model(), config)

    def build(out: Path) -> None:
        summary = run_prepare(videos, out / "shards", cfg, workers=0)
        if summary.failures or summary.prepared != len(videos):
            raise RuntimeError(f"prepare failed for {len(summary.failures)} of {len(videos)} "
                               f"clips: {[f.error for f in summary.failures[:3]]}")

    return build_cached(key, record, build) / "shards"


def shard_sizes(data_dir: str | Path) -> dict[str, Any]:
    """Clips, rows, frames, shard files and bytes of a prepared folder (from its manifest)."""
    from se4lip_dist.manifest import Manifest

    m = Manifest.load(data_dir)
    return {"clips": m.total_clips, "rows": sum(s.rows for s in m.shards),
            "frames": m.total_frames, "shards": len(m.shards), "bytes": m.total_bytes}


def grid_subset(out_dir: str | Path, n_rows: int) -> Path:
    """Deprecated alias of :func:`grid_shards` (GRID clips are one row each); ignores out_dir."""
    del out_dir
    return grid_shards(n_rows)


def synthetic_shards(out_dir: str | Path, n_clips: int = 12, n_frames: int = 60) -> Path:
    """Tiny synthetic prepared folder (``tests/shard_fixtures.py``) for ``--quick`` runs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from shard_fixtures import write_synthetic_shards

    write_synthetic_shards(out_dir, n_clips=n_clips, n_frames=n_frames, clips_per_shard=2,
                           val_clips=2)
    return Path(out_dir)


# ---------------------------------------------------------------- environment


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Machine, load, versions and code state of this run (recorded beside the numbers)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "host": platform.node(), "machine": platform.machine(), "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "packages": {d: _dist_version(d) for d in ENV_PACKAGES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "shared_data": str(SHARED_DATA), "grid_available": grid_available(),
    }


# ---------------------------------------------------------------- memory


def read_text(path: str) -> str:
    """A small file's text (``/proc`` entries); empty when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """Current ``Rss``/``Pss`` in bytes from ``/proc/PID/smaps_rollup`` (empty if unreadable)."""
    out: dict[str, int] = {}
    for line in read_text(f"/proc/{pid}/smaps_rollup").splitlines():
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
            stat = read_text(f"/proc/{d}/stat")
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
                cmd = read_text(f"/proc/{pid}/cmdline").replace("\0", " ")
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
            cmd = read_text(f"/proc/{d}/cmdline")
            if cmd.startswith(("/", "ray")) and "/raylet/raylet" in cmd.split("\0")[0]:
                n += 1
    return n
