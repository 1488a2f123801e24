"""Prepare: whole-clip frames per CPU second against the decode bound, and crop accuracy.

In-process, one thread, interleaved per round over the same GRID clips:

- decode bound: ``media.iter_video_frames(threads=1)`` alone (the RGB frames ``prepare``
  decodes), frames per CPU second;
- whole clip: ``prepare.process_clip`` (probe, audio, decode, SCRFD + ``MouthTracker``,
  ``mouth_square`` crops, JPEG, segments) at the config's ``face.detect_every`` and at the other
  intervals of :data:`INTERVALS`, frames per CPU second;
- per-frame detection (``detect_every=1``), the accuracy reference.

Crop-centre error: distance between the crop centres (``mouth_square`` of the stored keypoints)
of each interval and of per-frame detection, over :data:`N_ERROR` clips (untimed; the detector's
outputs are computed once per frame and reused). Then the parallel prepare (``run_prepare``,
2 Ray workers) over more clips, against twice the single-process frames per CPU second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from typing import Any

import harness
import numpy as np

INTERVALS = (5, 10, 15, 25)
"""Detection intervals measured besides per-frame detection (the config default is one)."""
N_ERROR = 20
"""Clips over which the crop-centre error is measured (full run)."""
TARGET_FPS = 1000.0
"""Whole-clip frames per CPU second the issue asks for (GRID, < 1 px mean crop-centre error)."""


def _centres(res: Any, scale: float) -> np.ndarray:
    from se4lip_dist.faces import mouth_square

    kps = np.concatenate([s.keypoints.reshape(-1, 5, 2) for s in res.segments])
    return np.array([mouth_square(k, scale)[:2] for k in kps])


class _MemoDetector:
    """The same detections for the same pixels, computed once (for the untimed error pass)."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.seen: dict[bytes, Any] = {}

    def detect(self, frame: np.ndarray) -> Any:
        key = hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()
        if key not in self.seen:
            self.seen[key] = self.detector.detect(frame)
        return self.seen[key]


def _errors(videos: list[str], cfgs: dict[int, Any], detector: Any) -> dict[int, np.ndarray]:
    """Per-frame crop-centre distance of each interval to per-frame detection."""
    from se4lip_dist.prepare import PrepareInput, clip_id_for, process_clip

    out: dict[int, list[np.ndarray]] = {k: [] for k in cfgs if k != 1}
    scale = cfgs[1].face.mouth_scale
    for v in videos:
        memo = _MemoDetector(detector)
        inp, cid = PrepareInput(v), clip_id_for(v)
        ref = _centres(_ok(process_clip(inp, cid, cfgs[1], memo)), scale)
        for k in out:
            got = _centres(_ok(process_clip(inp, cid, cfgs[k], memo)), scale)
            out[k].append(np.linalg.norm(got - ref, axis=1))
    return {k: np.concatenate(v) for k, v in out.items()}


def _ok(res: Any) -> Any:
    if res.failure:
        raise RuntimeError(res.failure.error)
    return res


def run(quick: bool) -> dict[str, Any]:
    """Decode bound, whole-clip frames per CPU second per interval, error, parallel prepare."""
    import cv2
    import ray
    import torch

    from se4lip_dist import media
    from se4lip_dist.faces import build_detector
    from se4lip_dist.prepare import PrepareInput, clip_id_for, process_clip, run_prepare

    if not harness.grid_available():
        why = harness.missing_reason()
        return harness.result("prepare", {"skipped": why}, [], [f"skipped: {why}"],
                              inputs={"data": None, "why_skipped": why})
    cfg = harness.prepare_config()
    default_k = cfg.face.detect_every
    n_inproc, rounds = (2, 1) if quick else (6, 3)
    n_error = 2 if quick else N_ERROR
    n_par = 1 if quick else 40
    intervals = sorted({default_k, *((5,) if quick else INTERVALS)})
    videos = harness.grid_videos(n_inproc + n_par)
    timed, par_videos = videos[:n_inproc], videos[n_inproc:]
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    detector = build_detector(cfg.face)
    cfgs = {k: dataclasses.replace(cfg, face=dataclasses.replace(cfg.face, detect_every=k))
            for k in [*intervals, 1]}
    inputs = [(PrepareInput(v), clip_id_for(v)) for v in timed]
    process_clip(*inputs[0], cfgs[default_k], detector)  # warm-up

    # Frames per CPU second (1 thread): robust to other users' load; wall kept beside it.
    names = ["decode", *map(str, intervals), "1"]
    fps: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    frames = 0
    for _ in range(rounds):
        for name in names:
            with harness.Timer() as t:
                if name == "decode":
                    frames = sum(1 for v in timed for _ in media.iter_video_frames(
                        v, cfg.data.fps, threads=1))
                else:
                    out = [_ok(process_clip(inp, cid, cfgs[int(name)], detector))
                           for inp, cid in inputs]
                    frames = sum(r.record.frames for r in out)
            fps[name].append(frames / t.cpu)
            wall[name].append(frames / t.s)
    med = {k: harness.median(v) for k, v in fps.items()}
    err_videos = harness.grid_videos(n_error)
    err = _errors(err_videos, cfgs, detector)

    # The parallel prepare: 2 workers, Ray started beforehand so its start-up is not counted.
    out_dir = tempfile.mkdtemp(prefix="se4lip-bench-prep-")
    with harness.Timer() as t_init:
        harness.start_ray()
    try:
        summary = run_prepare(par_videos, out_dir, cfgs[default_k], workers=2)
    finally:
        ray.shutdown()

    def err_stats(e: np.ndarray) -> dict[str, float]:
        return {"mean": round(float(e.mean()), 3), "p95": round(float(np.percentile(e, 95)), 3),
                "max": round(float(e.max()), 3)}

    metrics = {
        "clips_timed": len(inputs), "frames_timed": frames, "rounds": rounds,
        "frame_size": "360x288", "default_detect_every": default_k,
        "frames_per_cpu_s": {k: [round(x, 1) for x in v] for k, v in fps.items()},
        "frames_per_wall_s": {k: [round(x, 1) for x in v] for k, v in wall.items()},
        "centre_error_px_vs_every_frame": {str(k): err_stats(v) for k, v in err.items()},
        "error_clips": len(err_videos), "error_frames": len(next(iter(err.values()))),
        "parallel": {"clips": summary.prepared, "frames": summary.frames,
                     "wall_s": round(summary.wall_seconds, 2),
                     "frames_per_s": round(summary.frames_per_s, 1),
                     "failed": len(summary.failures), "ray_init_s": round(t_init.s, 2)},
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    dec, k0 = med["decode"], str(default_k)
    e0 = float(err[default_k].mean())
    sweep = "; ".join(f"k={k}: {med[str(k)]:.0f} fps/CPU s, {err[k].mean():.2f} px"
                      for k in intervals)
    ratios = [
        harness.ratio(
            f"prepare: whole clip frames per CPU s (detect_every={default_k})", med[k0],
            TARGET_FPS, f"{med[k0] / dec:.2f}x of decode-only {dec:.0f}; mean crop-centre "
            f"error {e0:.2f} px vs per-frame detection (target < 1)",
            unit=" fps", bound=f"decode-only frames per CPU s ({dec:.0f})"),
        harness.ratio(
            "prepare: whole clip / decode-only frames per CPU s", med[k0] / dec, None,
            f"{med[k0]:.0f} vs {dec:.0f} frames per CPU s; {sweep}",
            bound="decode-only (PyAV, 1 thread, to RGB)"),
        harness.ratio(
            "prepare: per-frame detection / decode-only frames per CPU s", med["1"] / dec, None,
            f"{med['1']:.0f} vs {dec:.0f} frames per CPU s (the accuracy reference)",
            bound="decode-only (PyAV, 1 thread, to RGB)"),
        harness.ratio(
            f"prepare: crop-centre error headroom (1 px / mean error, detect_every={default_k})",
            1.0 / max(e0, 1e-9), 1.0,
            f"mean {e0:.2f} px, p95 {np.percentile(err[default_k], 95):.2f} px over "
            f"{len(err_videos)} clips",
            bound="per-frame SCRFD detection (every frame's crop centre)"),
        harness.ratio(
            "prepare: parallel prepare (2 workers) / 2 x single-process frames per CPU s",
            summary.frames_per_s / (2 * med[k0]), None,
            f"{summary.frames_per_s:.0f} frames/s wall for {summary.frames} frames of "
            f"{summary.prepared} clips in {summary.wall_seconds:.1f} s (actor start-up "
            "included, ray.init not)",
            bound="2 cores x whole-clip frames per CPU s"),
    ]
    in_sizes = {"data": "grid", "clips_timed": len(inputs), "frames_timed": frames,
                "error_clips": len(err_videos), "parallel_clips": len(par_videos),
                "parallel_frames": summary.frames}
    return harness.result("prepare", metrics, ratios, inputs=in_sizes)


if __name__ == "__main__":
    harness.main(run)
