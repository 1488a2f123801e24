"""Corpus scale: what the ``prepare`` driver and the shard index cost per clip, 1k to 1M clips.

Fake media, real everything else. Each corpus size runs in a fresh process on a local Ray:
``prepare.run_prepare`` with a :class:`~se4lip_dist.prepare.PrepareBackend` whose listing yields
synthetic paths (in the listing read task, as an S3 prefix would be paged), whose fetch and
digest need no file, and whose clip processing returns one 1-frame row per clip instead of
decoding; listing, claiming (resume and duplicate checks), the autoscaling worker pool, shard
and index writes by the workers and the driver's commits are the product's own code. Then a
rerun over the same corpus (every clip found in the index and skipped: the planning cost of a
resume), and, in another fresh process, what ``train`` reads before it starts
(``Manifest.load`` + the split columns of every clip via ``splits.clip_frames``).

Reported per size, for the driver process only (the one process a run cannot spread): CPU
seconds (every thread, including Ray Data's executor) and peak resident memory above the
process's baseline, each per clip; index and ``manifest.json`` bytes per clip; seconds from the
call until a worker took up the first clip; and each per-clip figure as a ratio to the smallest
corpus (flat: about 1 or below).

    python benchmarks/scale_sim.py                       # 1k, 10k, 100k, 1M
    python benchmarks/scale_sim.py --sizes 1000 10000    # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SIZES = (1_000, 10_000, 100_000, 1_000_000)
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- the fake media backend


def fake_pages(n: int, item: str, page_size: int) -> Iterator[tuple[list[Any], list[Any]]]:
    """``n`` synthetic inputs, a page at a time (1,000 speakers, no split labels)."""
    from se4lip_dist.prepare import PrepareInput

    for start in range(0, n, page_size):
        yield [PrepareInput(f"{item}/spk{i % 1000:04d}/clip-{i:07d}.mp4", f"spk{i % 1000:04d}")
               for i in range(start, min(n, start + page_size))], []


def fake_fetch(path: str) -> contextlib.AbstractContextManager[str]:
    """Nothing to download: the "local copy" is the path itself."""
    return contextlib.nullcontext(path)


def fake_digest(local: str) -> str:
    """The content hash of a fake input: a hash of its path (every clip distinct)."""
    return hashlib.sha256(local.encode()).hexdigest()


def _jpeg() -> bytes:
    import numpy as np

    from se4lip_dist.shards import encode_jpeg

    return encode_jpeg(np.full((8, 8, 3), 128, np.uint8), 90)


def fake_process(inp: Any, clip_id: str, local: str, cfg: Any, detector: Any) -> Any:
    """One 1-frame shard row and a full clip record, without decoding anything."""
    import numpy as np

    from se4lip_dist.manifest import ClipRecord
    from se4lip_dist.prepare import ClipResult
    from se4lip_dist.shards import Segment

    d = cfg.data
    seg = Segment(clip_id=clip_id, segment=0, start_frame=0, clip_frames=1, fps=d.fps,
                  sample_rate=d.sample_rate, crop_size=d.crop_size, lips_jpeg=[_jpeg()],
                  audio=np.zeros(d.samples_per_frame, np.float32),
                  keypoints=np.zeros((1, 10), np.float32), det_score=np.ones(1, np.float32),
                  detected=np.ones(1, bool), speaker=inp.speaker, split=inp.split)
    rec = ClipRecord(source=inp.path, frames=1, segments=1, shard="", speaker=inp.speaker,
                     split=inp.split, duration_s=0.04, src_fps=25.0, missing_fraction=0.0,
                     mean_det_score=0.9)
    return ClipResult(inp, clip_id, segments=[seg], record=rec)


# ---------------------------------------------------------------- measuring one process


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _mem_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


class Phase:
    """Driver CPU seconds (all threads), wall seconds and peak RSS growth of one step."""

    def __enter__(self) -> Phase:
        _reset_peak()
        self.rss0 = _mem_kib("VmRSS")
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0
        self.peak_mib = max(0, _mem_kib("VmHWM") - self.rss0) / 1024


def run_prepare_sizes(n: int, out: Path, clips_per_shard: int, workers: int) -> dict[str, Any]:
    """Prepare then re-prepare a fake corpus of ``n`` clips into ``out`` (this process is the
    driver)."""
    import ray

    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import INDEX_GLOB, MANIFEST
    from se4lip_dist.prepare import PrepareBackend, run_prepare
    from se4lip_dist.runtime import init_ray

    cfg = load_config("cpu-small", overrides=["face.backend=none"])
    backend = PrepareBackend(list_pages=functools.partial(fake_pages, n), fetch=fake_fetch,
                             digest=fake_digest, process=fake_process)
    init_ray(num_cpus=2)
    # Ray Data's own start-up (executor, stats actor) is not per clip: paid before measuring.
    run_prepare(["sim://warmup"], out.parent / "warmup", cfg, workers=workers,
                backend=PrepareBackend(list_pages=functools.partial(fake_pages, 8),
                                       fetch=fake_fetch, digest=fake_digest,
                                       process=fake_process))
    try:
        with Phase() as first:
            s = run_prepare(["sim://corpus"], out, cfg, workers=workers,
                            clips_per_shard=clips_per_shard, backend=backend)
        with Phase() as again:
            r = run_prepare(["sim://corpus"], out, cfg, workers=workers,
                            clips_per_shard=clips_per_shard, backend=backend)
    finally:
        ray.shutdown()
    if (s.prepared, s.total_clips, r.skipped, r.prepared) != (n, n, n, 0) or s.failures:
        raise RuntimeError(f"unexpected outcome: {s.to_json()} / {r.to_json()}")
    index_bytes = sum(p.stat().st_size for p in out.glob(INDEX_GLOB))
    return {
        "clips": n, "shards": len(list(out.glob(INDEX_GLOB))), "manifest_saves": s.manifest_saves,
        "cpu_s": first.cpu, "wall_s": first.wall, "peak_mib": first.peak_mib,
        "first_dispatch_s": s.first_dispatch_s,
        "index_bytes": index_bytes, "manifest_bytes": (out / MANIFEST).stat().st_size,
        "resume_cpu_s": again.cpu, "resume_wall_s": again.wall, "resume_peak_mib": again.peak_mib,
        "resume_first_dispatch_s": r.first_dispatch_s,
    }


def read_like_train(out: Path) -> dict[str, Any]:
    """What ``train`` reads before it starts: the manifest and every clip's split columns."""
    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import Manifest
    from se4lip_dist.splits import SplitRule, clip_frames

    cfg = load_config("cpu-small", overrides=["train.split=speaker"])
    with Phase() as p:
        m = Manifest.load(out)
        roles = clip_frames(m, SplitRule.for_manifest(m, cfg))
    return {"read_cpu_s": p.cpu, "read_wall_s": p.wall, "read_peak_mib": p.peak_mib,
            "read_clips": sum(len(v) for v in roles.values())}


# ---------------------------------------------------------------- the table


def _child(args: list[str], timeout_s: float) -> dict[str, Any]:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         timeout=timeout_s, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{args}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def measure(sizes: list[int], clips_per_shard: int, workers: int,
            timeout_s: float) -> list[dict[str, Any]]:
    """One fresh driver process per size for prepare + rerun, another for the read."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="se4lip-scale-") as tmp:
        for n in sizes:
            out = Path(tmp) / f"n{n}" / "shards"
            row = _child(["--one", str(n), "--out", str(out), "--clips-per-shard",
                          str(clips_per_shard), "--workers", str(workers)], timeout_s)
            row.update(_child(["--read", str(out)], timeout_s))
            rows.append(row)
            print(f"# {n} clips done: {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: per-clip figures and their ratio to the smallest corpus."""
    base = rows[0]

    def per(r: dict[str, Any], k: str, scale: float) -> float:
        return r[k] * scale / r["clips"]

    def cell(r: dict[str, Any], k: str, scale: float, fmt: str) -> str:
        v, b = per(r, k, scale), per(base, k, scale)
        ratio = f" ({v / b:.2f}x)" if r is not base and b > 0 else ""
        return f"{v:{fmt}}{ratio}"

    head = ("| clips | shards | driver CPU ms/clip | driver peak RSS KiB/clip | "
            "index B/clip | manifest.json B/clip | first clip dispatched (s) | "
            "prepare wall s | resume: driver CPU ms/clip | train's read: CPU ms/clip | "
            "train's read: peak KiB/clip |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['clips']:,} | {r['shards']:,} | {cell(r, 'cpu_s', 1e3, '.3f')} | "
            f"{cell(r, 'peak_mib', 1024, '.2f')} | {cell(r, 'index_bytes', 1, '.1f')} | "
            f"{cell(r, 'manifest_bytes', 1, '.2f')} | {r['first_dispatch_s']:.2f} | "
            f"{r['wall_s']:.0f} | {cell(r, 'resume_cpu_s', 1e3, '.3f')} | "
            f"{cell(r, 'read_cpu_s', 1e3, '.4f')} | {cell(r, 'read_peak_mib', 1024, '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--clips-per-shard", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0, help="Seconds per child process.")
    ap.add_argument("--json", type=Path, help="Also write the measurements here.")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--read", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if a.one:
        print(json.dumps(run_prepare_sizes(a.one, a.out, a.clips_per_shard, a.workers)))
        return
    if a.read:
        print(json.dumps(read_like_train(a.read)))
        return
    rows = measure(sorted(a.sizes), a.clips_per_shard, a.workers, a.timeout)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print(f"clips per shard {a.clips_per_shard}, up to {a.workers} clip workers, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows))


if __name__ == "__main__":
    main()
