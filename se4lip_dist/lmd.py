"""Lip landmark distance (LMD) between two videos of the same speech.

The renderer papers (AD-NeRF, ER-NeRF, SyncTalk, TalkingGaussian ``LMDMeter``) compute, per
frame, 68 facial landmarks on the predicted and the ground-truth image, keep the mouth points
48..67, centre each set on its own mean, and average the L2 distance between corresponding
points; the score is the mean over frames, in pixels. They detect landmarks with FAN
(``face_alignment``); we use dlib's 68-point shape predictor (the same iBUG-300W point layout),
so our numbers are close to, not identical with, theirs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from se4lip_dist.media import MediaError, count_output_frames, iter_video_frames, probe

MOUTH = slice(48, 68)


class LMDError(RuntimeError):
    """dlib is missing, a video cannot be read, or no frame has a face in both videos."""


class MouthLandmarks:
    """dlib face detector + 68-point predictor; :meth:`__call__` gives mouth points or None."""

    def __init__(self) -> None:
        try:
            import dlib
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # face_recognition_models imports pkg_resources
                import face_recognition_models
        except ImportError as e:
            raise LMDError("LMD needs dlib and its landmark model: "
                           "pip install 'se4lip-dist[lmd]' (dlib-bin, face_recognition_models, "
                           "setuptools<81)") from e
        self.detector = dlib.get_frontal_face_detector()
        model = face_recognition_models.pose_predictor_model_location()
        self.predictor = dlib.shape_predictor(model)
        self._dlib = dlib

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        """Mouth landmarks ``[20, 2]`` (pixels) of the largest face, or None without a face."""
        img = np.ascontiguousarray(frame_rgb)
        faces = self.detector(img, 0)
        if len(faces) == 0:
            faces = self.detector(img, 1)  # upsampling finds faces smaller than ~80 px
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self.predictor(img, face)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        return pts[MOUTH]


def mouth_distance(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean L2 distance between mouth point sets after centring each on its own mean."""
    p = pred - pred.mean(axis=0)
    g = gt - gt.mean(axis=0)
    return float(np.linalg.norm(p - g, axis=1).mean())


def _landmarks(path: str, fps: int, max_frames: int | None,
               marker: MouthLandmarks) -> Iterator[np.ndarray | None]:
    for i, frame in enumerate(iter_video_frames(path, fps)):
        if max_frames is not None and i >= max_frames:
            return
        yield marker(frame)


def _count(path: str, fps: int) -> int:
    return count_output_frames(probe(path), fps)


def run_lmd(pred_video: str | Path, gt_video: str | Path, *, fps: int = 25,
            max_frames: int | None = None) -> dict[str, Any]:
    """LMD of a rendered video against ground truth, frames aligned by index at ``fps``.

    Args:
        pred_video: the generated video.
        gt_video: the ground-truth video of the same speech.
        fps: both videos are resampled to this rate before frames are paired.
        max_frames: compare at most this many leading frames.

    Returns:
        ``lmd`` (mean over frames, pixels), ``frames`` (frames compared), ``pred_frames``,
        ``gt_frames``, ``length_mismatch``, ``no_face_frames`` (skipped: no face in one video),
        ``landmarks`` ("dlib-68").

    Raises:
        LMDError: dlib missing, unreadable video, or no frame with a face in both.
    """
    pred, gt = str(pred_video), str(gt_video)
    marker = MouthLandmarks()
    try:
        n_pred, n_gt = _count(pred, fps), _count(gt, fps)
        common = min(n_pred, n_gt) if max_frames is None else min(n_pred, n_gt, max_frames)
        dists: list[float] = []
        missing = 0
        for a, b in zip(_landmarks(pred, fps, common, marker),
                        _landmarks(gt, fps, common, marker), strict=False):
            if a is None or b is None:
                missing += 1
                continue
            dists.append(mouth_distance(a, b))
    except MediaError as e:
        raise LMDError(str(e)) from e
    if not dists:
        raise LMDError(f"{pred} vs {gt}: no frame has a detectable face in both videos")
    return {
        "lmd": float(np.mean(dists)),
        "frames": len(dists),
        "pred_frames": n_pred,
        "gt_frames": n_gt,
        "length_mismatch": n_pred != n_gt,
        "no_face_frames": missing,
        "landmarks": "dlib-68",
        "pred": pred,
        "gt": gt,
    }


__all__ = ["LMDError", "MouthLandmarks", "mouth_distance", "run_lmd"]
