"""Face detection, face selection, mouth tracking and mouth-centred crops.

The detector (InsightFace SCRFD, 5 keypoints) runs on every ``detect_every``-th frame, on the
last one and, where the face moved, between them; :class:`MouthTracker` smooths the detected
keypoints over neighbouring detections and interpolates them for the frames in between,
streaming with a bounded frame buffer. For already-cropped, face-centred renderer output
(SyncTalk/ER-NeRF style) :class:`FixedMouthDetector` stands in for the detector with a fixed
mouth position.

Keypoint order everywhere: left eye, right eye, nose, left mouth corner, right mouth corner
(image coordinates, pixels).
"""

from __future__ import annotations

import bisect
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from se4lip_dist.config import FaceConfig
from se4lip_dist.media import Picture, warp

INSIGHTFACE_ROOT_ENV = "SE4LIP_INSIGHTFACE_ROOT"
"""Environment variable naming the InsightFace model root when the config does not."""
MODEL_ZOO_URL = "https://github.com/deepinsight/insightface/releases/download/model-zoo/"
"""Where InsightFace's own downloader fetches model packs (``<pack>.zip``)."""

# Fixed detections are built on a frontal template where eye-to-mouth distance equals
# inter-ocular distance; these are the template's other proportions (relative to that distance).
_TEMPLATE_MOUTH_HALF_WIDTH = 0.4
_TEMPLATE_NOSE_ABOVE_MOUTH = 0.45
_STRIDE = 32
"""SCRFD's coarsest feature stride: its input sides must be multiples of it."""
Frame = np.ndarray | Picture
"""A video frame: RGB uint8 ``[H, W, 3]``, or a decoded Picture converted only where needed."""
_REFINE_MIN_GAP = 4
"""Detections at least this many frames apart may get one midway (``refine_motion``)."""


class FaceModelError(Exception):
    """The InsightFace model root or pack is missing or unusable."""


class NoFaceError(Exception):
    """Too many detections in a clip found no face."""


@dataclass(frozen=True)
class Detection:
    """One detected face.

    Attributes:
        box: (x1, y1, x2, y2) in pixels.
        kps: (5, 2) float32 keypoints: left eye, right eye, nose, left/right mouth corner.
        score: detector confidence.
    """

    box: tuple[float, float, float, float]
    kps: np.ndarray
    score: float


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB frame."""

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        """Return all faces found in an (H, W, 3) uint8 RGB frame."""
        ...


def default_insightface_root() -> Path:
    """``$SE4LIP_INSIGHTFACE_ROOT`` when set, else ``~/.insightface`` (InsightFace's own)."""
    return Path(os.environ.get(INSIGHTFACE_ROOT_ENV) or "~/.insightface").expanduser()


def find_detector_model(root: str | None, pack: str = "buffalo_sc") -> Path:
    """Locate ``<root>/models/<pack>/det_*.onnx`` without touching the network.

    Args:
        root: InsightFace model root; None means :func:`default_insightface_root`.
        pack: model pack name.

    Raises:
        FaceModelError: the root, pack folder or detector file does not exist; the message
            names the three ways out and where a model pack comes from.
    """
    base = Path(root).expanduser() if root is not None else default_insightface_root()
    pack_dir = base / "models" / pack
    hint = (
        f"face detection needs an InsightFace model root holding models/{pack}/det_*.onnx "
        f"(models are never downloaded). Either pass --insightface-root DIR, or set "
        f"{INSIGHTFACE_ROOT_ENV}=DIR, or use --face-backend none for already-cropped, "
        f"face-centred video (a fixed mouth box). To get the pack: unzip InsightFace's "
        f"{MODEL_ZOO_URL}{pack}.zip into DIR/models/{pack}/ (InsightFace's models are for "
        "non-commercial research only)"
    )
    if not base.is_dir():
        raise FaceModelError(f"InsightFace root {base} does not exist; {hint}")
    if not pack_dir.is_dir():
        raise FaceModelError(f"InsightFace pack folder {pack_dir} does not exist; {hint}")
    candidates = sorted(pack_dir.glob("det_*.onnx"))
    if not candidates:
        raise FaceModelError(f"no det_*.onnx detector in {pack_dir}; {hint}")
    return candidates[0]


class InsightFaceDetector:
    """SCRFD face detector from an InsightFace pack, on CPU with a fixed thread count."""

    def __init__(
        self,
        root: str | None,
        pack: str = "buffalo_sc",
        det_size: int = 320,
        threshold: float = 0.5,
        threads: int = 1,
    ) -> None:
        """Load ``<root>/models/<pack>/det_*.onnx`` (checked first: never downloads).

        Args:
            root: InsightFace model root; None: ``$SE4LIP_INSIGHTFACE_ROOT`` or
                ``~/.insightface``.
            pack: model pack whose detector is used.
            det_size: square detector input side in pixels.
            threshold: minimum detection score.
            threads: onnxruntime intra-op threads.

        Raises:
            FaceModelError: the model file is missing or cannot be loaded.
        """
        self.model_path = find_detector_model(root, pack)
        try:
            import onnxruntime as ort
            from insightface.model_zoo.scrfd import SCRFD
        except ImportError as e:
            raise FaceModelError(
                f"face detection needs insightface and onnxruntime: pip install insightface "
                f"onnxruntime ({e})"
            ) from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Busy-waiting worker threads steal the core from the parallel clip on a small machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(self.model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            # SCRFD copies these session options into its fixed-size session per input size.
            self._model = SCRFD(model_file=str(self.model_path), session=session)
        except Exception as e:
            raise FaceModelError(f"cannot load detector {self.model_path}: {e}") from e
        self.det_size = (int(det_size), int(det_size))
        self.threshold = float(threshold)
        self._model.prepare(ctx_id=-1, input_size=self.det_size, det_thresh=self.threshold)

    def input_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """Detector input (width, height) for a frame: its longer side at ``det_size``.

        The shorter side is padded to the next multiple of 32 (SCRFD's largest stride) plus one
        stride of margin, not to a square: the same pixels at the same scale with less padding
        to compute over. Without the margin, keypoints of a face near the bottom or right edge
        move by pixels (the two-face test in tests/test_bad_inputs.py).
        """
        h, w = frame_hw
        side = self.det_size[0]
        if w >= h:
            return side, min(side, _STRIDE * (math.ceil(side * h / w / _STRIDE) + 1))
        return min(side, _STRIDE * (math.ceil(side * w / h / _STRIDE) + 1)), side

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        """Return the faces in an RGB uint8 frame (SCRFD itself expects BGR)."""
        bgr = np.ascontiguousarray(frame_rgb[..., ::-1])
        det, kpss = self._model.detect(bgr, input_size=self.input_size(bgr.shape[:2]),
                                       det_thresh=self.threshold)
        out = []
        for i in range(det.shape[0]):
            x1, y1, x2, y2, score = (float(v) for v in det[i])
            kps = np.asarray(kpss[i], dtype=np.float32).reshape(5, 2)
            out.append(Detection(box=(x1, y1, x2, y2), kps=kps, score=score))
        return out


class FixedMouthDetector:
    """Fixed mouth position for face-centred, pre-cropped video (backend ``none``).

    Returns one detection whose mouth-corner midpoint is at ``(x*W, y*H)`` and whose keypoint
    geometry makes :func:`mouth_square` give a crop side of ``side*min(H, W)``.
    """

    def __init__(
        self, fixed_mouth: tuple[float, float, float], mouth_scale: float = 0.9
    ) -> None:
        """Args:
        fixed_mouth: mouth centre x, y and crop side as fractions of the frame.
        mouth_scale: the value later passed to :func:`mouth_square` (needed to hit the side).
        """
        x, y, side = (float(v) for v in fixed_mouth)
        if side <= 0 or mouth_scale <= 0:
            raise ValueError("fixed_mouth side and mouth_scale must be positive")
        self.fixed_mouth = (x, y, side)
        self.mouth_scale = float(mouth_scale)

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        """Return the single fixed detection for this frame's size."""
        h, w = frame_rgb.shape[:2]
        x, y, side = self.fixed_mouth
        cx, cy = x * w, y * h
        # mouth_square: side = mouth_scale * (eye-mouth + inter-ocular) = mouth_scale * 2f here.
        f = side * min(h, w) / (2.0 * self.mouth_scale)
        mw, nose = _TEMPLATE_MOUTH_HALF_WIDTH * f, _TEMPLATE_NOSE_ABOVE_MOUTH * f
        kps = np.array(
            [
                [cx - f / 2, cy - f],
                [cx + f / 2, cy - f],
                [cx, cy - nose],
                [cx - mw, cy],
                [cx + mw, cy],
            ],
            dtype=np.float32,
        )
        box = (cx - f, cy - 1.8 * f, cx + f, cy + 0.8 * f)
        return [Detection(box=box, kps=kps, score=1.0)]


def build_detector(cfg: FaceConfig, threads: int = 1) -> FaceDetector:
    """Detector for ``cfg.backend`` (``insightface`` or ``none``).

    Raises:
        FaceModelError: backend ``insightface`` and the model is missing.
    """
    if cfg.backend == "none":
        return FixedMouthDetector(cfg.fixed_mouth, mouth_scale=cfg.mouth_scale)
    if cfg.backend == "insightface":
        return InsightFaceDetector(
            cfg.insightface_root,
            pack=cfg.pack,
            det_size=cfg.det_size,
            threshold=cfg.det_threshold,
            threads=threads,
        )
    raise ValueError(f"unknown face backend {cfg.backend!r}")


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def select_face(
    dets: list[Detection], prev: Detection | None, frame_hw: tuple[int, int]
) -> Detection | None:
    """Pick the speaker's face among the detections.

    With ``prev``, the detection overlapping it most (IoU > 0.1) wins, so a larger face that
    appears elsewhere does not steal the track; otherwise (or when none overlaps) the largest,
    most central face wins (InsightFace's ``area - 2 * squared centre offset``).

    Args:
        dets: detections of one frame.
        prev: the face selected at the previous detection, if any.
        frame_hw: (height, width) of the frame.

    Returns:
        The selected detection, or None when ``dets`` is empty.
    """
    if not dets:
        return None
    if prev is not None:
        ious = [_iou(d.box, prev.box) for d in dets]
        best = int(np.argmax(ious))
        if ious[best] > 0.1:
            return dets[best]
    h, w = frame_hw

    def value(d: Detection) -> float:
        x1, y1, x2, y2 = d.box
        off2 = ((x1 + x2) / 2 - w / 2) ** 2 + ((y1 + y2) / 2 - h / 2) ** 2
        return (x2 - x1) * (y2 - y1) - 2.0 * off2

    return max(dets, key=value)


def mouth_square(kps: np.ndarray, mouth_scale: float) -> tuple[float, float, float]:
    """Square mouth crop from 5 keypoints.

    Centre: midpoint of the mouth corners. Side: ``mouth_scale * (eye_mouth + inter_ocular)``,
    where ``eye_mouth`` is the distance from the eye midpoint to the mouth midpoint and
    ``inter_ocular`` the distance between the eyes. On a frontal face the two are about equal;
    their sum is steadier than either alone (yaw shrinks the eye distance, pitch the eye-mouth
    distance). At ``mouth_scale`` 0.9 the square spans roughly the face-box width: the whole
    mouth with the nose base and the chin, like Wav2Lip's lower face.

    Args:
        kps: (5, 2) keypoints.
        mouth_scale: crop side per unit of ``eye_mouth + inter_ocular``.

    Returns:
        (cx, cy, side) in pixels.
    """
    k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    mouth = (k[3] + k[4]) / 2
    return float(mouth[0]), float(mouth[1]), max(mouth_scale * face_size(k), 1.0)


def face_size(kps: np.ndarray) -> float:
    """``eye_mouth + inter_ocular`` of 5 keypoints: the length :func:`mouth_square` scales."""
    k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    eye_mouth = float(np.linalg.norm((k[3] + k[4]) / 2 - (k[0] + k[1]) / 2))
    return eye_mouth + float(np.linalg.norm(k[1] - k[0]))


def crop_square(
    frame: np.ndarray | Picture, cx: float, cy: float, side: float, out_size: int
) -> np.ndarray:
    """Resample the axis-aligned square centred at (cx, cy) to ``out_size`` pixels.

    Coordinates are pixel indices (pixel i's centre is at i, as for detector keypoints).
    Sub-pixel accurate: the centre of output pixel u samples input
    ``cx - side/2 + (u + 0.5) * side / out_size``. Areas outside the frame replicate the border.
    A :class:`~se4lip_dist.media.Picture` is cropped from its decoded planes where it can be
    (:func:`~se4lip_dist.media.warp`), without converting the whole frame.

    Returns:
        (out_size, out_size, 3) uint8.
    """
    if side <= 0 or out_size <= 0:
        raise ValueError("side and out_size must be positive")
    # Large reductions alias with bilinear sampling: warp at ~1:1 first, then area-average.
    mid = out_size if side <= 1.5 * out_size else math.ceil(side)
    s = side / mid
    x0 = cx - side / 2 + 0.5 * s
    y0 = cy - side / 2 + 0.5 * s
    m = np.array([[s, 0.0, x0], [0.0, s, y0]], dtype=np.float64)
    out = warp(frame, m, mid)
    if mid != out_size:
        out = cv2.resize(out, (out_size, out_size), interpolation=cv2.INTER_AREA)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return out.astype(np.uint8, copy=False)


@dataclass
class TrackedFrame:
    """One frame with its tracked keypoints.

    Attributes:
        index: frame index in the clip.
        frame: the frame as given (an RGB array or a :class:`~se4lip_dist.media.Picture`).
        kps: (5, 2) float32 smoothed/interpolated keypoints.
        score: detector score at detected frames, interpolated between them; 0.0 where no face
            was found and the keypoints were carried over.
        detected: the detector ran on this frame and found a face.
    """

    index: int
    frame: Frame
    kps: np.ndarray
    score: float
    detected: bool


@dataclass
class _Det:
    """One detector run: its frame, the selected face's keypoints (None: no face), its score."""

    t: int
    kps: np.ndarray | None
    score: float
    face: Detection | None = None


@dataclass
class _Anchor:
    """A frame whose keypoints are settled; frames before it are interpolated towards it."""

    t: float
    kps: np.ndarray
    score: float


class DetectionSchedule:
    """Which frames the detector runs on, and the smoothed keypoints its detections settle.

    The detector runs on every k-th frame and the last (the *regular* detections). With
    ``refine_motion`` > 0, two consecutive detections whose keypoints moved by more than that
    fraction of the face size (:func:`face_size`), or of which one found no face, get a
    detection midway between them, and so on recursively down to a few frames apart.

    Smoothing fits a straight line per keypoint coordinate to the valid detections within
    ``smooth_window`` detections centred on each one and evaluates it there: in the interior
    with no gaps this is exactly the centred moving average, and unlike a plain average it
    stays unbiased at clip edges, across gaps and at the irregular last detection. A detection
    becomes an *anchor* (:meth:`anchors`) once the detections its smoothing window needs have
    run.

    State of one pass (:meth:`reset`): the counts, the detections a future smoothing window can
    still reach, the next detection to anchor, the last selected face and the frames where a
    face was found and that are not emitted yet (``found``).
    """

    def __init__(self, detector: FaceDetector, detect_every: int, smooth_window: int,
                 refine_motion: float) -> None:
        self.detector = detector
        self.k = int(detect_every)
        self.refine_motion = float(refine_motion)
        self.half = int(smooth_window) // 2
        self.reset()

    def reset(self) -> None:
        """Forget the last pass."""
        self.n_detections = 0
        self.n_missing = 0
        self.missing_frames: list[int] = []
        self.regular = 0  # detections on every k-th frame and the last
        self.regular_missing = 0
        self.found: set[int] = set()  # frames where a face was detected, until emitted
        self._dets: list[_Det] = []  # detections a future smoothing window can still reach
        self._first = 0  # detection number of _dets[0]
        self._next = 0  # next detection number to turn into an anchor
        self._face: Detection | None = None  # the face selected at the last detection

    @property
    def missing_fraction(self) -> float:
        """Share of the regular detections that found no face, 0.0 before any."""
        return self.regular_missing / self.regular if self.regular else 0.0

    def due(self, i: int, is_last: bool) -> bool:
        """True when frame ``i`` gets a regular detection."""
        return i % self.k == 0 or is_last

    def detect(self, i: int, frame: Frame, frame_at: Callable[[int], Frame | None]) -> None:
        """Detect on frame ``i``, then between it and the previous detection if needed
        (``frame_at(t)``: a frame not yet emitted, None once it is)."""
        det = self._run_detector(i, frame)
        self.regular += 1
        self.regular_missing += det.kps is None
        self._face = det.face or self._face
        if self.refine_motion > 0 and self._dets:
            self._refine(self._dets[-1], det, frame_at)
        self._dets.append(det)

    def _run_detector(self, i: int, frame: Frame) -> _Det:
        face = select_face(self.detector.detect(np.asarray(frame)), self._face, frame.shape[:2])
        self.n_detections += 1
        if face is None:
            self.n_missing += 1
            bisect.insort(self.missing_frames, i)
            return _Det(i, None, 0.0)
        self.found.add(i)
        return _Det(i, np.asarray(face.kps, dtype=np.float64).reshape(5, 2), float(face.score),
                    face)

    def _refine(self, a: _Det, b: _Det, frame_at: Callable[[int], Frame | None]) -> None:
        """Append detections strictly between ``a`` and ``b``, in time order, while the face
        moved more than ``refine_motion`` of its size between two of them, or was found at one
        and missed at the other (where it left or came back)."""
        if b.t - a.t < _REFINE_MIN_GAP or (a.kps is None and b.kps is None):
            return
        if a.kps is not None and b.kps is not None:
            size = (face_size(a.kps) + face_size(b.kps)) / 2
            if np.linalg.norm(b.kps - a.kps, axis=1).max() <= self.refine_motion * size:
                return
        t = (a.t + b.t) // 2
        frame = frame_at(t)
        if frame is None:
            return  # already emitted (a long gap was carried over)
        mid = self._run_detector(t, frame)
        self._refine(a, mid, frame_at)
        self._dets.append(mid)
        self._refine(mid, b, frame_at)

    def anchors(self, ended: bool) -> list[_Anchor]:
        """Every detection with a face whose smoothing window is complete (all at the end),
        as an anchor, in time order."""
        out: list[_Anchor] = []
        total = self._first + len(self._dets)
        while self._next < total and (ended or self._next + self.half < total):
            d = self._dets[self._next - self._first]
            if d.kps is not None:
                out.append(_Anchor(float(d.t), self._smoothed(self._next), d.score))
            self._next += 1
        # Keep the newest detection: the next one may refine towards it.
        drop = max(0, min(self._next - self.half, total - 1) - self._first)
        del self._dets[:drop]
        self._first += drop
        return out

    def _smoothed(self, j: int) -> np.ndarray:
        """Line fit over the valid detections within ``half`` of detection ``j``, at its frame."""
        lo = max(0, j - self.half - self._first)
        window = [d for d in self._dets[lo : j + self.half + 1 - self._first]
                  if d.kps is not None]
        ts = np.array([d.t for d in window], dtype=np.float64)
        ks = np.stack([d.kps for d in window]).astype(np.float64).reshape(len(window), -1)
        t0 = self._dets[j - self._first].t
        if len(window) == 1 or np.ptp(ts) == 0:
            return ks.mean(axis=0).reshape(5, 2)
        tc = ts - ts.mean()
        slope = (tc[:, None] * (ks - ks.mean(axis=0))).sum(axis=0) / (tc**2).sum()
        return (ks.mean(axis=0) + slope * (t0 - ts.mean())).reshape(5, 2)


class KeypointInterpolator:
    """The frames not yet emitted, emitted with keypoints interpolated between two anchors.

    State: the pending frames (in order) and the last anchor emitted.
    """

    def __init__(self) -> None:
        self.pending: deque[tuple[int, Frame]] = deque()
        self.anchor: _Anchor | None = None

    def push(self, i: int, frame: Frame) -> None:
        """Hold frame ``i`` until the anchor after it is known."""
        self.pending.append((i, frame))

    def frame_at(self, t: int) -> Frame | None:
        """Pending frame ``t``; None when it was emitted already."""
        if not self.pending or not self.pending[0][0] <= t <= self.pending[-1][0]:
            return None
        return self.pending[t - self.pending[0][0]][1]

    def emit_until(self, t_end: float, anchor: _Anchor | None,
                   found: set[int]) -> list[TrackedFrame]:
        """Emit pending frames up to ``t_end``, interpolated from the last anchor to ``anchor``.

        Without a last anchor the frames take ``anchor``'s keypoints, without ``anchor`` the last
        one's (carried over, score 0.0). ``found``: frames where a face was detected (emitted
        ones are removed from it).
        """
        last = self.anchor
        out = []
        while self.pending and self.pending[0][0] <= t_end:
            i, frame = self.pending.popleft()
            kps, score = _interpolate(last, anchor, i)
            out.append(TrackedFrame(index=i, frame=frame, kps=np.asarray(kps, dtype=np.float32),
                                    score=float(score), detected=i in found))
            found.discard(i)
        if anchor is not None:
            self.anchor = anchor
        return out

    def carry_oldest(self, found: set[int]) -> list[TrackedFrame]:
        """Emit the oldest pending frame with the last keypoints (a long gap: stop waiting);
        there must be a last anchor."""
        assert self.anchor is not None
        t_old = self.pending[0][0]
        kps = self.anchor.kps
        out = self.emit_until(t_old, None, found)
        self.anchor = _Anchor(float(t_old), kps, 0.0)
        return out


class MouthTracker:
    """Detect every k-th frame and where the face moved, smooth, interpolate (streaming).

    Detection scheduling and smoothing are a :class:`DetectionSchedule`; buffering and
    interpolation between its anchors a :class:`KeypointInterpolator`. A still head costs one
    detection per k frames, a moving one is followed closely, and where a face leaves or comes
    back is found to within a frame or two.

    A detection's buffered frames are emitted once it is an anchor, interpolated from the
    previous anchor, so about ``detect_every * (smooth_window // 2 + 1)`` frames are buffered.
    A gap of missed detections longer than ``max_buffer`` frames carries the last keypoints
    forward (score 0.0) instead of waiting; a clip whose first ``max_buffer`` frames hold no
    face at all raises :class:`NoFaceError`.
    """

    def __init__(
        self,
        detector: FaceDetector,
        detect_every: int = 5,
        smooth_window: int = 3,
        max_missing_fraction: float = 0.5,
        max_buffer: int = 100,
        refine_motion: float = 0.0,
    ) -> None:
        """Args:
        detector: face detector.
        detect_every: run the detector on frames 0, k, 2k, ... and on the last frame.
        smooth_window: detections in the centred smoothing window (odd; 1 disables).
        max_missing_fraction: raise NoFaceError when more of the regular detections (every
            k-th frame and the last) than this missed.
        max_buffer: most frames held while waiting for a face (raised to what smoothing needs).
        refine_motion: keypoint motion between detections, as a fraction of the face size,
            above which the frame midway is detected too (0 disables).
        """
        if detect_every < 1 or smooth_window < 1:
            raise ValueError("detect_every and smooth_window must be >= 1")
        if refine_motion < 0:
            raise ValueError("refine_motion must be >= 0")
        self.detector = detector
        self.schedule = DetectionSchedule(detector, detect_every, smooth_window, refine_motion)
        self.max_missing_fraction = float(max_missing_fraction)
        self.max_buffer = max(int(max_buffer), self.schedule.k * (self.schedule.half + 1) + 2)
        self._reset()

    def _reset(self) -> None:
        """A fresh pass: no detections, no frames held, zero counts."""
        self.schedule.reset()
        self.frames = KeypointInterpolator()
        self.n_frames = 0
        self.max_buffered = 0

    @property
    def n_detections(self) -> int:
        """Detector runs of the pass (regular and refining)."""
        return self.schedule.n_detections

    @property
    def n_missing(self) -> int:
        """Detector runs that found no face."""
        return self.schedule.n_missing

    @property
    def missing_frames(self) -> list[int]:
        """Frames whose detection found no face, in order."""
        return self.schedule.missing_frames

    @property
    def missing_fraction(self) -> float:
        """Share of the regular detections (every k-th frame and the last) that found no face,
        0.0 before any: an even sample of the clip, unlike refinement's detections."""
        return self.schedule.missing_fraction

    def track(self, frames: Iterable[Frame]) -> Iterator[TrackedFrame]:
        """Yield a :class:`TrackedFrame` per input frame, in order.

        Raises:
            NoFaceError: no face at all, a face-less start longer than ``max_buffer`` frames,
                or ``missing_fraction > max_missing_fraction`` (raised at the end).
        """
        self._reset()
        sched, buf = self.schedule, self.frames
        for i, frame, is_last in _with_last(frames):
            buf.push(i, frame)
            self.n_frames = i + 1
            self.max_buffered = max(self.max_buffered, len(buf.pending))
            if sched.due(i, is_last):
                sched.detect(i, frame, buf.frame_at)
                if not is_last:
                    yield from self._emit_anchored(ended=False)
            if len(buf.pending) > self.max_buffer and not is_last:
                if buf.anchor is None:
                    raise NoFaceError(f"no face in the first {len(buf.pending)} frames "
                                      f"({self.n_missing}/{self.n_detections} detections missed)")
                yield from buf.carry_oldest(sched.found)
        self._check_faces()
        yield from self._emit_anchored(ended=True)
        yield from buf.emit_until(math.inf, None, sched.found)

    def _emit_anchored(self, ended: bool) -> list[TrackedFrame]:
        """Emit the frames up to every anchor the schedule has settled."""
        out: list[TrackedFrame] = []
        for anchor in self.schedule.anchors(ended):
            out += self.frames.emit_until(anchor.t, anchor, self.schedule.found)
        return out

    def _check_faces(self) -> None:
        s = self.schedule
        if s.n_detections == 0:
            raise NoFaceError("no frames")
        if s.n_missing == s.n_detections or s.missing_fraction > self.max_missing_fraction:
            raise NoFaceError(
                f"no face in {s.regular_missing}/{s.regular} detections "
                f"({s.missing_fraction:.0%} > {self.max_missing_fraction:.0%}) over "
                f"{self.n_frames} frames; missed at frames {s.missing_frames[:20]}"
            )


def _interpolate(last: _Anchor | None, anchor: _Anchor | None,
                 i: int) -> tuple[np.ndarray, float]:
    """Keypoints and score of frame ``i`` between two anchors (either may be missing)."""
    if anchor is None or last is None:
        src = anchor if last is None else last
        assert src is not None
        return src.kps, (src.score if i == src.t else 0.0)
    if anchor.t == last.t:
        return anchor.kps, anchor.score
    a = (i - last.t) / (anchor.t - last.t)
    return (1 - a) * last.kps + a * anchor.kps, (1 - a) * last.score + a * anchor.score


def _with_last(frames: Iterable[Frame]) -> Iterator[tuple[int, Frame, bool]]:
    """``(index, frame, is_last)`` for each frame (one frame of look-ahead)."""
    it = iter(frames)
    sentinel = object()
    cur = next(it, sentinel)
    i = 0
    while cur is not sentinel:
        frame = cur if isinstance(cur, Picture) else np.asarray(cur)
        cur = next(it, sentinel)
        yield i, frame, cur is sentinel
        i += 1


__all__ = [
    "INSIGHTFACE_ROOT_ENV",
    "Detection",
    "DetectionSchedule",
    "FaceDetector",
    "FaceModelError",
    "FixedMouthDetector",
    "InsightFaceDetector",
    "KeypointInterpolator",
    "MouthTracker",
    "NoFaceError",
    "TrackedFrame",
    "build_detector",
    "crop_square",
    "default_insightface_root",
    "face_size",
    "find_detector_model",
    "mouth_square",
    "select_face",
]
