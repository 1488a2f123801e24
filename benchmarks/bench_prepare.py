"""Prepare: whole-clip frames per CPU second against the decode bound, and crop accuracy.

In-process, one thread, interleaved per round over the same GRID clips:

- decode bound: ``media.iter_video_frames(threads=1)`` alone (every frame decoded to RGB),
  frames per CPU second;
- whole clip: ``prepare.process_clip`` (probe, audio, decode, SCRFD + ``MouthTracker``,
  ``mouth_square`` crops, JPEG, segments) with the config's tracking (``face.detect_every`` and
  ``face.refine_motion``) and with the fixed intervals of :data:`INTERVALS`, frames per CPU
  second;
- per-frame detection (``detect_every=1``), the accuracy reference.

Crop-centre error: distance between the crop centres (``mouth_square`` of the stored keypoints)
of each setting and of per-frame detection, over :data:`N_ERROR` GRID clips (still heads) and
over the four ``wild`` clips (moving heads; as a share of the crop side, with detections per
frame), untimed (the detector's outputs are computed once per frame and reused). Then the
parallel prepare (``run_prepare``, 2 Ray workers) over more clips, against twice the
single-process frames per CPU second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from typing import Any

import harness
import numpy as np

INTERVALS = (5, 10, 15, 25)
"""Fixed detection intervals (``refine_motion`` 0) measured beside the config's tracking."""
N_ERROR = 20
"""GRID clips over which the crop-centre error is measured (full run)."""
TARGET_FPS = 1000.0
"""Whole-clip frames per CPU second the issue asks for (GRID, < 1 px mean crop-centre error)."""
DEFAULT = "default"
"""Label of the config's own tracking setting."""


def _squares(res: Any, scale: float) -> np.ndarray:
    from se4lip_dist.faces import mouth_square

    kps = np.concatenate([s.keypoints.reshape(-1, 5, 2) for s in res.segments])
    return np.array([mouth_square(k, scale) for k in kps])


class _MemoDetector:
    """The same detections for the same pixels, computed once (for the untimed error pass)."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.seen: dict[bytes, Any] = {}
        self.calls = 0

    def detect(self, frame: np.ndarray) -> Any:
        self.calls += 1
        key = hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()
        if key not in self.seen:
            self.seen[key] = self.detector.detect(frame)
        return self.seen[key]


def _errors(videos: list[str], cfgs: dict[str, Any], detector: Any) -> dict[str, dict[str, Any]]:
    """Per setting: crop-centre distance to per-frame detection (px and share of the crop
    side, every frame of every video) and detections per frame."""
    from se4lip_dist.prepare import PrepareInput, clip_id_for, process_clip

    out: dict[str, dict[str, Any]] = {k: {"px": [], "side": [], "det": 0, "frames": 0}
                                      for k in cfgs if k != "1"}
    scale = cfgs["1"].face.mouth_scale
    for v in videos:
        memo = _MemoDetector(detector)
        inp, cid = PrepareInput(v), clip_id_for(v)
        ref = _squares(_ok(process_clip(inp, cid, cfgs["1"], memo)), scale)
        for k, acc in out.items():
            memo.calls = 0
            got = _squares(_ok(process_clip(inp, cid, cfgs[k], memo)), scale)
            e = np.linalg.norm(got[:, :2] - ref[:, :2], axis=1)
            acc["px"].append(e)
            acc["side"].append(e / ref[:, 2])
            acc["det"] += memo.calls
            acc["frames"] += len(e)
    return {k: {"px": np.concatenate(a["px"]), "side": np.concatenate(a["side"]),
                "det_per_frame": a["det"] / a["frames"]} for k, a in out.items()}


def _ok(res: Any) -> Any:
    if res.failure:
        raise RuntimeError(res.failure.error)
    return res


def _setting(cfg: Any, k: int | None) -> Any:
    """The config with a fixed interval ``k`` (no refinement), or as it is (None)."""
    if k is None:
        return cfg
    return dataclasses.replace(cfg, face=dataclasses.replace(cfg.face, detect_every=k,
                                                             refine_motion=0.0))


def run(quick: bool) -> dict[str, Any]:
    """Decode bound, whole-clip frames per CPU second per setting, error, parallel prepare."""
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
    face = cfg.face
    n_inproc, rounds = (2, 1) if quick else (6, 3)
    n_error = 2 if quick else N_ERROR
    n_par = 1 if quick else 40
    intervals = (5,) if quick else INTERVALS
    videos = harness.grid_videos(n_inproc + n_par)
    timed, par_videos = videos[:n_inproc], videos[n_inproc:]
    wild = harness.wild_videos()[: 1 if quick else None]
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    detector = build_detector(face)
    cfgs = {DEFAULT: _setting(cfg, None), **{str(k): _setting(cfg, k) for k in intervals},
            "1": _setting(cfg, 1)}
    inputs = [(PrepareInput(v), clip_id_for(v)) for v in timed]
    process_clip(*inputs[0], cfgs[DEFAULT], detector)  # warm-up

    # Frames per CPU second (1 thread): robust to other users' load; wall kept beside it.
    names = ["decode", *cfgs]
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
                    out = [_ok(process_clip(inp, cid, cfgs[name], detector))
                           for inp, cid in inputs]
                    frames = sum(r.record.frames for r in out)
            fps[name].append(frames / t.cpu)
            wall[name].append(frames / t.s)
    med = {k: harness.median(v) for k, v in fps.items()}
    err_videos = harness.grid_videos(n_error)
    err = _errors(err_videos, cfgs, detector)
    wild_err = _errors(wild, cfgs, detector) if wild else {}

    # The parallel prepare: 2 workers, Ray started beforehand so its start-up is not counted.
    out_dir = tempfile.mkdtemp(prefix="se4lip-bench-prep-")
    with harness.Timer() as t_init:
        harness.start_ray()
    try:
        summary = run_prepare(par_videos, out_dir, cfgs[DEFAULT], workers=2)
    finally:
        ray.shutdown()

    def err_stats(e: dict[str, Any]) -> dict[str, float]:
        px = e["px"]
        return {"mean": round(float(px.mean()), 3), "p95": round(float(np.percentile(px, 95)), 3),
                "max": round(float(px.max()), 3),
                "mean_side_pct": round(100 * float(e["side"].mean()), 3),
                "det_per_frame": round(e["det_per_frame"], 3)}

    setting = (f"detect_every={face.detect_every}, refine_motion={face.refine_motion}")
    metrics = {
        "clips_timed": len(inputs), "frames_timed": frames, "rounds": rounds,
        "frame_size": "360x288", "default_setting": setting,
        "frames_per_cpu_s": {k: [round(x, 1) for x in v] for k, v in fps.items()},
        "frames_per_wall_s": {k: [round(x, 1) for x in v] for k, v in wall.items()},
        "centre_error_px_vs_every_frame": {k: err_stats(v) for k, v in err.items()},
        "wild_centre_error_vs_every_frame": {k: err_stats(v) for k, v in wild_err.items()},
        "error_clips": len(err_videos), "error_frames": len(err[DEFAULT]["px"]),
        "wild_clips": len(wild),
        "parallel": {"clips": summary.prepared, "frames": summary.frames,
                     "wall_s": round(summary.wall_seconds, 2),
                     "frames_per_s": round(summary.frames_per_s, 1),
                     "failed": len(summary.failures), "ray_init_s": round(t_init.s, 2)},
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    dec, d = med["decode"], med[DEFAULT]
    e0 = err[DEFAULT]
    sweep = "; ".join(f"every {k}: {med[k]:.0f} fps/CPU s, {err[k]['px'].mean():.2f} px"
                      for k in map(str, intervals))
    ratios = [
        harness.ratio(
            f"prepare: whole clip frames per CPU s ({setting})", d,
            TARGET_FPS, f"{d / dec:.2f}x of decode-only {dec:.0f}; mean crop-centre error "
            f"{e0['px'].mean():.2f} px vs per-frame detection (target < 1), "
            f"{e0['det_per_frame']:.3f} detections per frame",
            unit=" fps", bound=f"decode-only frames per CPU s ({dec:.0f})"),
        harness.ratio(
            "prepare: whole clip / decode-only frames per CPU s", d / dec, None,
            f"{d:.0f} vs {dec:.0f} frames per CPU s; fixed intervals: {sweep}",
            bound="decode-only (PyAV, 1 thread, to RGB)"),
        harness.ratio(
            "prepare: per-frame detection / decode-only frames per CPU s", med["1"] / dec, None,
            f"{med['1']:.0f} vs {dec:.0f} frames per CPU s (the accuracy reference)",
            bound="decode-only (PyAV, 1 thread, to RGB)"),
        harness.ratio(
            f"prepare: crop-centre error headroom (1 px / mean error, {setting})",
            1.0 / max(float(e0["px"].mean()), 1e-9), 1.0,
            f"mean {e0['px'].mean():.2f} px, p95 {np.percentile(e0['px'], 95):.2f} px over "
            f"{len(err_videos)} GRID clips",
            bound="per-frame SCRFD detection (every frame's crop centre)"),
    ]
    if wild_err:
        w0, w5 = wild_err[DEFAULT], wild_err["5"]
        fixed = "; ".join(f"every {k}: {100 * wild_err[k]['side'].mean():.2f} %"
                          for k in map(str, intervals))
        ratios.append(harness.ratio(
            "prepare, moving heads (wild clips): detect_every=5 / default crop-centre error",
            float(w5["side"].mean() / max(w0["side"].mean(), 1e-9)), None,
            f"{100 * w0['side'].mean():.2f} vs {100 * w5['side'].mean():.2f} % of the crop "
            f"side ({w0['px'].mean():.2f} vs {w5['px'].mean():.2f} px) at "
            f"{w0['det_per_frame']:.2f} vs {w5['det_per_frame']:.2f} detections per frame, "
            f"{len(wild)} clips; fixed intervals: {fixed}",
            bound="per-frame SCRFD detection"))
    ratios.append(harness.ratio(
        "prepare: parallel prepare (2 workers) / 2 x single-process frames per CPU s",
        summary.frames_per_s / (2 * d), None,
        f"{summary.frames_per_s:.0f} frames/s wall for {summary.frames} frames of "
        f"{summary.prepared} clips in {summary.wall_seconds:.1f} s (actor start-up "
        "included, ray.init not)",
        bound="2 cores x whole-clip frames per CPU s"))
    in_sizes = {"data": "grid", "clips_timed": len(inputs), "frames_timed": frames,
                "error_clips": len(err_videos), "wild_clips": len(wild),
                "parallel_clips": len(par_videos), "parallel_frames": summary.frames}
    return harness.result("prepare", metrics, ratios, inputs=in_sizes)


if __name__ == "__main__":
    harness.main(run)
