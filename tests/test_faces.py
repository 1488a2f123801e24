"""Face detection, selection, tracking and mouth crops."""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from se4lip_dist.config import FaceConfig
from se4lip_dist.faces import (
    Detection,
    FaceDetector,
    FaceModelError,
    FixedMouthDetector,
    InsightFaceDetector,
    MouthTracker,
    NoFaceError,
    TrackedFrame,
    build_detector,
    crop_square,
    mouth_square,
    select_face,
)

_SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = Path(os.environ.get("SE4LIP_SHARED_DATA", _SHARED / "data"))
INSIGHTFACE_ROOT = Path(
    os.environ.get("SE4LIP_INSIGHTFACE_ROOT", SHARED_DATA.parent / "models" / "insightface")
)


# ---------------------------------------------------------------- fixed detector and crops


def test_fixed_mouth_crop_centres_on_drawn_mouth() -> None:
    h, w = 200, 300
    img = np.full((h, w, 3), 40, np.uint8)
    mx, my = int(0.5 * w), int(0.75 * h)
    img[my - 2 : my + 3, mx - 2 : mx + 3] = (255, 0, 0)
    (det,) = FixedMouthDetector((0.5, 0.75, 0.35), mouth_scale=0.9).detect(img)
    assert det.kps.shape == (5, 2) and det.kps.dtype == np.float32
    cx, cy, side = mouth_square(det.kps, 0.9)
    assert (cx, cy) == pytest.approx((mx, my))
    assert side == pytest.approx(0.35 * min(h, w))
    crop = crop_square(img, cx, cy, side, 71)
    assert crop.shape == (71, 71, 3) and crop.dtype == np.uint8
    assert tuple(crop[35, 35]) == (255, 0, 0)
    assert tuple(crop[0, 0]) == (40, 40, 40)


@pytest.mark.parametrize("mouth_scale", [0.5, 0.9, 1.7])
def test_fixed_mouth_side_independent_of_scale(mouth_scale: float) -> None:
    img = np.zeros((120, 90, 3), np.uint8)
    (det,) = FixedMouthDetector((0.4, 0.6, 0.5), mouth_scale=mouth_scale).detect(img)
    cx, cy, side = mouth_square(det.kps, mouth_scale)
    assert (cx, cy, side) == pytest.approx((36.0, 72.0, 45.0))


def test_crop_square_subpixel_and_border_replicate() -> None:
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (50, 1, 3))
    crop = crop_square(ramp, 100.0, 25.0, 11, 11)
    assert crop[5, :, 0].tolist() == list(range(95, 106))
    half = crop_square(ramp, 100.5, 25.0, 11, 11)
    assert np.abs(half[5, :, 0].astype(float) - np.arange(95.5, 106.5)).max() <= 0.5
    # Square entirely left of the frame: every pixel replicates column 0.
    off = crop_square(ramp, -40.0, 25.0, 20, 16)
    assert (off == 0).all()
    # Partly off the bottom-right corner: replicated edge values, right shape.
    corner = crop_square(ramp, 199.0, 49.0, 40, 32)
    assert corner.shape == (32, 32, 3)
    assert (corner[:, -1, 0] == 199).all()


def test_crop_square_large_downscale_keeps_centre() -> None:
    img = np.zeros((700, 700, 3), np.uint8)
    img[340:361, 290:311] = 255  # 21 px white square centred at (300, 350)
    crop = crop_square(img, 300.0, 350.0, 300.0, 96)
    assert crop.shape == (96, 96, 3)
    w = crop[..., 0].astype(np.float64)
    ys, xs = np.mgrid[:96, :96]
    assert (w * xs).sum() / w.sum() == pytest.approx(47.5, abs=0.05)
    assert (w * ys).sum() / w.sum() == pytest.approx(47.5, abs=0.05)


def test_build_detector_none_backend() -> None:
    det = build_detector(FaceConfig(backend="none", fixed_mouth=(0.5, 0.7, 0.4)))
    assert isinstance(det, FixedMouthDetector)
    (d,) = det.detect(np.zeros((512, 512, 3), np.uint8))
    assert mouth_square(d.kps, FaceConfig().mouth_scale)[2] == pytest.approx(0.4 * 512)


# ---------------------------------------------------------------- face selection


def _face(cx: float, cy: float, size: float, score: float = 0.9) -> Detection:
    f = size / 2.5
    kps = np.array(
        [[cx - f / 2, cy - f / 2], [cx + f / 2, cy - f / 2], [cx, cy],
         [cx - 0.4 * f, cy + f / 2], [cx + 0.4 * f, cy + f / 2]],
        np.float32,
    )
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    return Detection(box=box, kps=kps, score=score)


def test_select_face_largest_and_central() -> None:
    hw = (400, 400)
    assert select_face([], None, hw) is None
    small, big = _face(200, 200, 40), _face(210, 190, 120)
    assert select_face([small, big], None, hw) is big
    corner = _face(40, 40, 80)
    centre = _face(200, 200, 70)
    assert select_face([corner, centre], None, hw) is centre


def test_select_face_keeps_identity_with_prev() -> None:
    hw = (400, 600)
    prev = _face(150, 200, 80)
    same = _face(153, 202, 82)
    intruder = _face(450, 200, 200)
    assert select_face([intruder, same], None, hw) is intruder
    assert select_face([intruder, same], prev, hw) is same
    # The tracked face vanished: fall back to the best remaining one.
    assert select_face([intruder], prev, hw) is intruder


# ---------------------------------------------------------------- tracking


def _frames(n: int):
    """Tiny frames that carry their own index (the fake detector reads it back)."""
    for i in range(n):
        f = np.zeros((4, 4, 3), np.uint8)
        f[0, 0, 0], f[0, 0, 1] = divmod(i, 256)
        yield f


def _index(frame: np.ndarray) -> int:
    return int(frame[0, 0, 0]) * 256 + int(frame[0, 0, 1])


BASE = np.array([[30, 40], [60, 40], [45, 55], [35, 70], [55, 70]], np.float64)
VEL = np.array([0.7, -0.3])


class MovingFace:
    """Face moving linearly; misses on ``miss`` frames; adds ``noise(i)`` to the keypoints."""

    def __init__(self, miss=(), noise=None) -> None:
        self.calls: list[int] = []
        self.miss = set(miss)
        self.noise = noise

    def kps(self, i: float) -> np.ndarray:
        return BASE + VEL * i

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        i = _index(frame_rgb)
        self.calls.append(i)
        if i in self.miss:
            return []
        k = self.kps(i) + (self.noise(i) if self.noise else 0.0)
        box = (k[:, 0].min() - 10, k[:, 1].min() - 10, k[:, 0].max() + 10, k[:, 1].max() + 10)
        return [Detection(box=box, kps=k.astype(np.float32), score=0.5 + 0.01 * (i % 7))]


@pytest.mark.parametrize(("n", "k"), [(23, 5), (21, 5), (1, 5), (7, 1), (10, 4)])
def test_detector_runs_on_every_kth_and_last_frame(n: int, k: int) -> None:
    fake = MovingFace()
    out = list(MouthTracker(fake, detect_every=k, smooth_window=3).track(_frames(n)))
    expected = sorted(set(range(0, n, k)) | {n - 1})
    assert fake.calls == expected
    assert [t.index for t in out] == list(range(n))
    assert [t.index for t in out if t.detected] == expected


@pytest.mark.parametrize("smooth_window", [1, 3, 5])
def test_linear_motion_interpolated_exactly(smooth_window: int) -> None:
    fake = MovingFace()
    tracker = MouthTracker(fake, detect_every=5, smooth_window=smooth_window)
    out = list(tracker.track(_frames(48)))
    for t in out:
        np.testing.assert_allclose(t.kps, fake.kps(t.index), atol=1e-4)
        assert t.kps.shape == (5, 2) and t.kps.dtype == np.float32
    # Scores: exact at detections, linear in between.
    assert out[10].score == pytest.approx(0.5 + 0.01 * 3)
    assert out[12].score == pytest.approx(0.6 * (0.5 + 0.03) + 0.4 * (0.5 + 0.01))
    assert tracker.n_detections == 11 and tracker.n_missing == 0


class StepFace(MovingFace):
    """A still face that jumps ``shift`` pixels sideways at frame ``at``, with optional noise."""

    def __init__(self, at: int, shift: float = 12.0, noise: float = 0.0,
                 miss: Iterable[int] = ()) -> None:
        super().__init__(miss=miss, noise=(
            lambda i: np.random.default_rng(i).normal(0, noise, (5, 2))) if noise else None)
        self.at, self.shift = at, shift

    def kps(self, i: float) -> np.ndarray:
        return BASE + np.array([self.shift if i >= self.at else 0.0, 0.0])


def test_refinement_leaves_a_still_face_at_every_kth_frame() -> None:
    fake = StepFace(at=10**6, noise=0.3)
    tracker = MouthTracker(fake, detect_every=32, smooth_window=1, refine_motion=0.03)
    out = list(tracker.track(_frames(100)))
    assert fake.calls == [0, 32, 64, 96, 99]
    assert [t.index for t in out] == list(range(100))


def test_refinement_finds_where_the_face_jumped() -> None:
    fake = StepFace(at=37)
    plain = list(MouthTracker(StepFace(at=37), 32, smooth_window=1).track(_frames(70)))
    tracker = MouthTracker(fake, detect_every=32, smooth_window=1, refine_motion=0.03)
    out = list(tracker.track(_frames(70)))
    # Bisection between 32 and 64 down to detections 2 frames apart around the jump.
    assert sorted(fake.calls) == [0, 32, 36, 38, 40, 48, 64, 69]
    assert tracker.n_detections == 8 and tracker.n_missing == 0
    assert [t.index for t in out] == list(range(70))
    assert [t.index for t in out if t.detected] == sorted(fake.calls)
    for t in out:
        if t.index != 37:  # the one frame between the detections either side of the jump
            np.testing.assert_allclose(t.kps, fake.kps(t.index), atol=1e-4)
    wrong = [t.index for t in plain if not np.allclose(t.kps, fake.kps(t.index), atol=1e-4)]
    assert len(wrong) > 20  # a fixed interval smears the jump over most of 32..64


@pytest.mark.parametrize("smooth_window", [1, 3])
def test_refinement_follows_continuous_motion(smooth_window: int) -> None:
    fake = MovingFace()
    tracker = MouthTracker(fake, detect_every=32, smooth_window=smooth_window,
                           refine_motion=0.03, max_buffer=40)
    out = list(tracker.track(_frames(150)))
    assert [t.index for t in out] == list(range(150))
    calls = sorted(fake.calls)
    assert len(calls) == len(set(calls)) and calls[0] == 0 and calls[-1] == 149
    # 0.76 px per frame on a face of size 60: detections end up 2-3 frames apart.
    assert max(np.diff(calls)) <= 3
    for t in out:
        np.testing.assert_allclose(t.kps, fake.kps(t.index), atol=1e-4)
    assert tracker.max_buffered <= tracker.max_buffer


def test_refinement_finds_where_the_face_left_and_came_back() -> None:
    fake = StepFace(at=10**6, miss=range(50, 80))  # a still face, gone for frames 50..79
    tracker = MouthTracker(fake, detect_every=32, smooth_window=1, refine_motion=0.03)
    out = list(tracker.track(_frames(100)))
    assert [t.index for t in out] == list(range(100))
    assert sorted(fake.calls) == [0, 32, 48, 50, 52, 56, 64, 72, 76, 78, 80, 96, 99]
    assert tracker.missing_frames == [50, 52, 56, 64, 72, 76, 78]
    # The fraction that decides a clip's fate counts the regular detections only (1 of 5).
    assert tracker.n_missing == 7 and tracker.missing_fraction == pytest.approx(1 / 5)
    assert [t.index for t in out if t.detected] == [0, 32, 48, 80, 96, 99]


def test_refine_motion_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="refine_motion"):
        MouthTracker(MovingFace(), refine_motion=-0.1)
    with pytest.raises(Exception, match="refine_motion"):
        FaceConfig(refine_motion=-0.1)


def test_smoothing_averages_neighbouring_detections() -> None:
    jitter = {i: (1.0 if (i // 5) % 2 else -1.0) for i in range(0, 60, 5)}
    fake = MovingFace(noise=lambda i: jitter.get(i, 0.0))
    raw = list(MouthTracker(fake, 5, 1).track(_frames(56)))
    smooth = list(MouthTracker(MovingFace(noise=fake.noise), 5, 3).track(_frames(56)))
    # Interior detection at frame 25: centred mean of -1, +1, -1 = -1/3.
    err_raw = raw[25].kps - fake.kps(25)
    err_smooth = smooth[25].kps - fake.kps(25)
    np.testing.assert_allclose(err_raw, 1.0, atol=1e-4)
    np.testing.assert_allclose(err_smooth, -1.0 / 3.0, atol=1e-4)
    resid = [np.abs(t.kps - fake.kps(t.index)).mean() for t in smooth[5:50]]
    resid_raw = [np.abs(t.kps - fake.kps(t.index)).mean() for t in raw[5:50]]
    assert np.mean(resid) < 0.5 * np.mean(resid_raw)


def test_gaps_are_interpolated() -> None:
    fake = MovingFace(miss={10, 15})
    tracker = MouthTracker(fake, detect_every=5, smooth_window=3)
    out = list(tracker.track(_frames(40)))
    for t in out:
        np.testing.assert_allclose(t.kps, fake.kps(t.index), atol=1e-4)
    assert not out[10].detected and not out[15].detected and out[20].detected
    assert 0.5 <= out[12].score <= 0.6
    assert tracker.n_missing == 2 and tracker.missing_fraction == pytest.approx(2 / 9)


def test_leading_and_trailing_misses_carry_nearest_face() -> None:
    fake = MovingFace(miss={0, 5, 35, 39})
    out = list(MouthTracker(fake, detect_every=5, smooth_window=3).track(_frames(40)))
    for t in out[:10]:
        np.testing.assert_allclose(t.kps, fake.kps(10), atol=1e-4)
        assert t.score == 0.0
    for t in out[31:]:
        np.testing.assert_allclose(t.kps, fake.kps(30), atol=1e-4)
        assert t.score == 0.0
    for t in out[10:31]:
        np.testing.assert_allclose(t.kps, fake.kps(t.index), atol=1e-4)
        assert t.score > 0.0


def test_no_face_error_when_most_detections_miss() -> None:
    fake = MovingFace(miss=set(range(0, 100, 5)) - {0, 50})
    tracker = MouthTracker(fake, detect_every=5, smooth_window=3, max_missing_fraction=0.5)
    with pytest.raises(NoFaceError, match=r"no face in 18/20 detections \(90%"):
        list(tracker.track(_frames(96)))
    with pytest.raises(NoFaceError):
        list(MouthTracker(MovingFace(miss=set(range(10))), 5, 3).track(_frames(10)))
    with pytest.raises(NoFaceError):
        list(MouthTracker(MovingFace(), 5, 3).track(iter([])))


def test_buffer_stays_bounded_on_long_clip() -> None:
    fake = MovingFace()
    tracker = MouthTracker(fake, detect_every=5, smooth_window=3)
    n = 0
    for t in tracker.track(_frames(2000)):
        assert t.index == n
        n += 1
    assert n == 2000 and len(fake.calls) == 401  # 0, 5, ..., 1995 and the last, 1999
    assert tracker.max_buffered <= 5 * 2 + 1


def test_long_gap_carries_keypoints_with_bounded_buffer() -> None:
    miss = set(range(100, 200, 5))
    fake = MovingFace(miss=miss)
    tracker = MouthTracker(fake, detect_every=5, smooth_window=3, max_buffer=30)
    out = list(tracker.track(_frames(400)))
    assert len(out) == 400
    assert tracker.max_buffered <= 31
    # Early in the gap the last face is carried over with score 0; after it the track is exact.
    np.testing.assert_allclose(out[130].kps, fake.kps(95), atol=1e-4)
    assert out[130].score == 0.0
    np.testing.assert_allclose(out[250].kps, fake.kps(250), atol=1e-4)
    with pytest.raises(NoFaceError, match="first"):
        list(MouthTracker(MovingFace(miss=set(range(0, 200))), 5, 3, max_buffer=30)
             .track(_frames(400)))


# ---------------------------------------------------------------- model files


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_model_root_raises_face_model_error(tmp_path: Path, no_network) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FaceModelError, match=r"nowhere.*--insightface-root"):
        InsightFaceDetector(str(root))
    (tmp_path / "models").mkdir()
    with pytest.raises(FaceModelError, match=r"models/buffalo_sc"):
        InsightFaceDetector(str(tmp_path), pack="buffalo_sc")
    (tmp_path / "models" / "buffalo_sc").mkdir()
    (tmp_path / "models" / "buffalo_sc" / "w600k_mbf.onnx").write_bytes(b"")
    with pytest.raises(FaceModelError, match=r"det_\*\.onnx"):
        build_detector(FaceConfig(insightface_root=str(tmp_path)))
    assert not (root / "models").exists()


# ---------------------------------------------------------------- real data


def _decode(path: Path, limit: int | None = None) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="rgb24"))
            if limit is not None and len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def grid_clip() -> Path:
    clips = sorted((SHARED_DATA / "grid_s1" / "video").glob("*.mp4"))
    if not clips:
        pytest.skip(f"no GRID clips under {SHARED_DATA} (set SE4LIP_SHARED_DATA)")
    return clips[0]


@pytest.fixture(scope="module")
def scrfd() -> InsightFaceDetector:
    if not (INSIGHTFACE_ROOT / "models" / "buffalo_sc").is_dir():
        pytest.skip(f"no InsightFace buffalo_sc under {INSIGHTFACE_ROOT} "
                    "(set SE4LIP_INSIGHTFACE_ROOT)")
    return InsightFaceDetector(str(INSIGHTFACE_ROOT), det_size=320, threads=1)


@pytest.mark.shared_data
def test_scrfd_finds_grid_speaker(grid_clip: Path, scrfd: InsightFaceDetector) -> None:
    for frame in _decode(grid_clip, limit=30)[::10]:
        dets = scrfd.detect(frame)
        assert len(dets) == 1
        d = dets[0]
        assert d.score > 0.6
        x1, y1, x2, y2 = d.box
        mx, my = (d.kps[3] + d.kps[4]) / 2
        assert x1 < mx < x2 and (y1 + y2) / 2 < my < y2
        assert d.kps[0, 0] < d.kps[1, 0]  # left eye is on the image's left


@pytest.mark.shared_data
def test_detector_input_fits_the_frame_not_a_square(scrfd: InsightFaceDetector) -> None:
    # The longer side at det_size; the shorter side padded to SCRFD's stride (32) plus one
    # stride of margin (without it, keypoints of a face near the edge move by pixels).
    assert scrfd.input_size((288, 360)) == (320, 288)
    assert scrfd.input_size((360, 288)) == (288, 320)
    assert scrfd.input_size((700, 700)) == (320, 320)
    assert scrfd.input_size((1080, 1920)) == (320, 224)


@pytest.mark.shared_data
def test_fitted_input_finds_the_same_keypoints(grid_clip: Path,
                                               scrfd: InsightFaceDetector) -> None:
    for frame in _decode(grid_clip, limit=30)[::10]:
        (fit,) = scrfd.detect(frame)
        bgr = np.ascontiguousarray(frame[..., ::-1])
        _, kpss = scrfd._model.detect(bgr, input_size=(320, 320), det_thresh=0.5)
        assert np.abs(fit.kps - kpss[0]).max() < 1.0


@pytest.mark.shared_data
def test_default_tracking_follows_every_frame_detection(
    grid_clip: Path, scrfd: InsightFaceDetector
) -> None:
    cfg = FaceConfig()
    frames = _decode(grid_clip)
    sparse = MouthTracker(scrfd, cfg.detect_every, cfg.smooth_window,
                          refine_motion=cfg.refine_motion)
    dense = MouthTracker(scrfd, 1, 1)
    a = np.array([mouth_square(t.kps, cfg.mouth_scale)[:2] for t in sparse.track(frames)])
    b = np.array([mouth_square(t.kps, cfg.mouth_scale)[:2] for t in dense.track(frames)])
    err = np.linalg.norm(a - b, axis=1)
    print(f"default tracking vs every-frame crop-centre error on {grid_clip.name}: "
          f"mean {err.mean():.2f} px, max {err.max():.2f} px, {sparse.n_detections} detections")
    assert err.mean() < 2.0
    assert sparse.n_detections < len(frames) / 5


# ---------------------------------------------------------------- the rewrite changes nothing
# MouthTracker was rewritten from nested generators sharing a state dict into a class with
# explicit state. The old implementation is frozen below and both run on the same frames and
# detections: every frame's keypoints, score and flag, the counters and the errors must match.

@dataclass
class _RefDet:
    t: int
    kps: np.ndarray | None
    score: float


class ReferenceMouthTracker:
    """FROZEN REFERENCE: ``faces.MouthTracker`` before its rewrite (commit bbe980c). Do not edit."""

    def __init__(
        self,
        detector: FaceDetector,
        detect_every: int = 5,
        smooth_window: int = 3,
        max_missing_fraction: float = 0.5,
        max_buffer: int = 100,
    ) -> None:
        """Args:
        detector: face detector.
        detect_every: run the detector on frames 0, k, 2k, ... and on the last frame.
        smooth_window: detections in the centred smoothing window (odd; 1 disables).
        max_missing_fraction: raise NoFaceError when more detections than this missed.
        max_buffer: most frames held while waiting for a face (raised to what smoothing needs).
        """
        if detect_every < 1 or smooth_window < 1:
            raise ValueError("detect_every and smooth_window must be >= 1")
        self.detector = detector
        self.k = int(detect_every)
        self.half = int(smooth_window) // 2
        self.max_missing_fraction = float(max_missing_fraction)
        self.max_buffer = max(int(max_buffer), self.k * (self.half + 1) + 2)
        self._reset()

    def _reset(self) -> None:
        self.n_frames = 0
        self.n_detections = 0
        self.n_missing = 0
        self.max_buffered = 0
        self.missing_frames: list[int] = []

    @property
    def missing_fraction(self) -> float:
        """Share of detections that found no face (0.0 before any detection)."""
        return self.n_missing / self.n_detections if self.n_detections else 0.0

    def track(self, frames: Iterable[np.ndarray]) -> Iterator[TrackedFrame]:
        """Yield a :class:`TrackedFrame` per input frame, in order.

        Raises:
            NoFaceError: no face at all, a face-less start longer than ``max_buffer`` frames,
                or ``missing_fraction > max_missing_fraction`` (raised at the end).
        """
        self._reset()
        buf: deque[tuple[int, np.ndarray]] = deque()
        dets: list[_RefDet] = []  # detections not yet needed by any future smoothing window
        base = 0  # detection number of dets[0]
        nxt = 0  # next detection number to turn into an anchor
        # Last emitted anchor: (time, kps, score); None before the first face.
        state: dict[str, Any] = {"anchor": None, "prev": None}
        detected_at: set[int] = set()

        def emit_until(t_end: float, anchor: tuple[float, np.ndarray, float] | None):
            """Pop buffered frames with index <= t_end, interpolating toward ``anchor``."""
            last = state["anchor"]
            while buf and buf[0][0] <= t_end:
                i, fr = buf.popleft()
                if anchor is None or last is None:
                    src = anchor if last is None else last
                    kps, score = src[1], (src[2] if i == src[0] else 0.0)
                elif anchor[0] == last[0]:
                    kps, score = anchor[1], anchor[2]
                else:
                    a = (i - last[0]) / (anchor[0] - last[0])
                    kps = (1 - a) * last[1] + a * anchor[1]
                    score = (1 - a) * last[2] + a * anchor[2]
                yield TrackedFrame(
                    index=i,
                    frame=fr,
                    kps=np.asarray(kps, dtype=np.float32),
                    score=float(score),
                    detected=i in detected_at,
                )
            if anchor is not None:
                state["anchor"] = anchor
                detected_at.discard(anchor[0])

        def smoothed(j: int) -> np.ndarray:
            window = [
                d
                for d in dets[max(0, j - self.half - base) : j + self.half + 1 - base]
                if d.kps is not None
            ]
            ts = np.array([d.t for d in window], dtype=np.float64)
            ks = np.stack([d.kps for d in window]).astype(np.float64).reshape(len(window), -1)
            t0 = dets[j - base].t
            if len(window) == 1 or np.ptp(ts) == 0:
                return ks.mean(axis=0).reshape(5, 2)
            tc = ts - ts.mean()
            slope = (tc[:, None] * (ks - ks.mean(axis=0))).sum(axis=0) / (tc**2).sum()
            return (ks.mean(axis=0) + slope * (t0 - ts.mean())).reshape(5, 2)

        def finalize(ended: bool):
            nonlocal nxt, base
            total = base + len(dets)
            while nxt < total and (ended or nxt + self.half < total):
                d = dets[nxt - base]
                if d.kps is not None:
                    anchor = (float(d.t), smoothed(nxt), d.score)
                    yield from emit_until(d.t, anchor)
                nxt += 1
            # Keep only detections a future smoothing window can still reach.
            drop = max(0, nxt - self.half - base)
            del dets[:drop]
            base += drop

        def detect(i: int, fr: np.ndarray) -> None:
            faces = self.detector.detect(fr)
            face = select_face(faces, state["prev"], fr.shape[:2])
            self.n_detections += 1
            if face is None:
                self.n_missing += 1
                self.missing_frames.append(i)
                dets.append(_RefDet(i, None, 0.0))
            else:
                state["prev"] = face
                detected_at.add(i)
                dets.append(_RefDet(i, np.asarray(face.kps, dtype=np.float64).reshape(5, 2),
                                 float(face.score)))

        it = iter(frames)
        sentinel = object()
        cur = next(it, sentinel)
        i = 0
        while cur is not sentinel:
            frame = np.asarray(cur)
            cur = next(it, sentinel)
            is_last = cur is sentinel
            buf.append((i, frame))
            self.n_frames = i + 1
            self.max_buffered = max(self.max_buffered, len(buf))
            if i % self.k == 0 or is_last:
                detect(i, frame)
                if not is_last:
                    yield from finalize(ended=False)
            if len(buf) > self.max_buffer and not is_last:
                if state["anchor"] is None:
                    raise NoFaceError(
                        f"no face in the first {len(buf)} frames "
                        f"({self.n_missing}/{self.n_detections} detections missed)"
                    )
                # Long gap: carry the last keypoints over rather than buffer the whole gap.
                t_old = buf[0][0]
                a = state["anchor"]
                yield from emit_until(t_old, None)
                state["anchor"] = (float(t_old), a[1], 0.0)
            i += 1

        if self.n_detections == 0:
            raise NoFaceError("no frames")
        if self.n_missing == self.n_detections or self.missing_fraction > (
            self.max_missing_fraction
        ):
            raise NoFaceError(
                f"no face in {self.n_missing}/{self.n_detections} detections "
                f"({self.missing_fraction:.0%} > {self.max_missing_fraction:.0%}) over "
                f"{self.n_frames} frames; missed at frames {self.missing_frames[:20]}"
            )
        yield from finalize(ended=True)
        yield from emit_until(math.inf, None)


def _track_outcome(tracker: Any, frames: list[np.ndarray]) -> dict[str, Any]:
    """Everything a tracker pass produces, the error (if any) included."""
    out: list[TrackedFrame] = []
    error = None
    try:
        out.extend(tracker.track(iter(frames)))
    except NoFaceError as e:
        error = str(e)
    return {"frames": out, "error": error,
            "counts": (tracker.n_frames, tracker.n_detections, tracker.n_missing,
                       tracker.max_buffered, list(tracker.missing_frames))}


def _assert_same_tracks(frames: list[np.ndarray], detector: FaceDetector, k: int, smooth: int,
                        max_buffer: int = 100, crops: bool = False) -> dict[str, Any]:
    new = _track_outcome(MouthTracker(detector, k, smooth, max_buffer=max_buffer), frames)
    old = _track_outcome(ReferenceMouthTracker(detector, k, smooth, max_buffer=max_buffer),
                         frames)
    where = f"detect_every={k} smooth_window={smooth} max_buffer={max_buffer}"
    assert new["error"] == old["error"], where
    assert new["counts"] == old["counts"], where
    assert len(new["frames"]) == len(old["frames"]), where
    for a, b in zip(new["frames"], old["frames"], strict=True):
        assert (a.index, a.score, a.detected) == (b.index, b.score, b.detected), where
        assert a.frame is b.frame is frames[a.index]
        assert a.kps.dtype == b.kps.dtype == np.float32
        assert np.array_equal(a.kps, b.kps), (where, a.index, a.kps - b.kps)
        if crops:
            ca = crop_square(a.frame, *mouth_square(a.kps, 0.9), 96)
            cb = crop_square(b.frame, *mouth_square(b.kps, 0.9), 96)
            assert np.array_equal(ca, cb), (where, a.index)
    return new


def _stamp(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Copies carrying their index in pixel (0, 0), as :func:`_frames` does."""
    out = []
    for i, f in enumerate(frames):
        f = f.copy()
        f[0, 0, 0], f[0, 0, 1] = divmod(i, 256)
        out.append(f)
    return out


class DrawnFaceDetector:
    """The synthetic face's mouth found from its dark pixels, with seeded jitter and scores;
    no face on ``miss`` frames and a larger second face on ``second`` frames."""

    def __init__(self, miss: Iterable[int] = (), second: Iterable[int] = (),
                 seed: int = 0) -> None:
        self.miss, self.second, self.seed = set(miss), set(second), seed

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        i = _index(frame_rgb)
        if i in self.miss:
            return []
        rng = np.random.default_rng([self.seed, i])
        gray = frame_rgb[4:].mean(-1)
        ys, xs = np.nonzero(gray <= np.percentile(gray, 3))
        cx, cy = xs.mean(), ys.mean() + 4
        kps = np.array([[cx - 20, cy - 35], [cx + 20, cy - 35], [cx, cy - 18],
                        [cx - 12, cy], [cx + 12, cy]]) + rng.normal(0, 1.5, (5, 2))
        box = (cx - 45, cy - 70, cx + 45, cy + 25)
        faces = [Detection(box, kps.astype(np.float32), float(rng.uniform(0.5, 0.99)))]
        if i in self.second:  # larger and elsewhere: wins unless the track holds on
            big = (box[0] + 60, box[1] - 10, box[2] + 90, box[3] + 20)
            faces.insert(0, Detection(big, (kps + np.array([75.0, 5.0])).astype(np.float32), 0.9))
        return faces


@pytest.fixture(scope="module")
def drawn_frames(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    from se4lip_dist.media import iter_video_frames
    from se4lip_dist.synthetic import make_synthetic_clip

    path = tmp_path_factory.mktemp("drawn") / "talk.mp4"
    make_synthetic_clip(path, 8.0, seed=4, size=(160, 160))
    return _stamp(list(iter_video_frames(str(path), 25)))


_RNG = np.random.default_rng(7)
DRAWN_CASES = {
    "clean": {},
    "sparse misses and a second face": {"miss": _RNG.choice(200, 50, replace=False).tolist(),
                                        "second": range(30, 200, 9)},
    "long gap": {"miss": range(60, 140)},
    "misses at both ends": {"miss": [*range(0, 24), *range(181, 200)]},
    "no face for the first 120 frames": {"miss": range(0, 120)},
    "mostly missing": {"miss": _RNG.choice(200, 140, replace=False).tolist()},
}
SETTINGS = [(5, 1), (5, 3), (3, 5), (1, 1), (4, 3), (7, 1)]


@pytest.mark.parametrize("case", sorted(DRAWN_CASES))
def test_tracker_matches_frozen_reference_on_synthetic_clips(
        case: str, drawn_frames: list[np.ndarray]) -> None:
    detector = DrawnFaceDetector(**DRAWN_CASES[case])
    for k, smooth in SETTINGS:
        for max_buffer in (100, 30):
            _assert_same_tracks(drawn_frames, detector, k, smooth, max_buffer,
                                crops=(k, smooth, max_buffer) == (5, 1, 100))


def test_tracker_reference_cases_reach_every_branch(drawn_frames: list[np.ndarray]) -> None:
    """The cases above are not all alike: carried gaps, the early and the final NoFaceError."""
    gap = _assert_same_tracks(drawn_frames, DrawnFaceDetector(miss=range(60, 140)), 5, 3, 30)
    assert gap["error"] is None and gap["frames"][100].score == 0.0
    early = _assert_same_tracks(drawn_frames, DrawnFaceDetector(miss=range(0, 120)), 5, 3, 30)
    assert early["error"] is not None and "first" in early["error"]
    late = _assert_same_tracks(drawn_frames,
                               DrawnFaceDetector(miss=DRAWN_CASES["mostly missing"]["miss"]),
                               5, 3)
    assert late["error"] is not None and late["error"].startswith("no face in")
    assert len(late["frames"]) > 0  # frames were streamed before the verdict


class _MemoDetector:
    """The same detections for the same pixels, computed once (SCRFD is the slow part)."""

    def __init__(self, detector: FaceDetector) -> None:
        self.detector = detector
        self.seen: dict[bytes, list[Detection]] = {}

    def detect(self, frame_rgb: np.ndarray) -> list[Detection]:
        key = hashlib.blake2b(np.ascontiguousarray(frame_rgb).tobytes(), digest_size=16).digest()
        if key not in self.seen:
            self.seen[key] = self.detector.detect(frame_rgb)
        return self.seen[key]


def _real_clips() -> list[str]:
    grid = sorted((SHARED_DATA / "grid_s1" / "video").glob("*.mp4"))[:3]
    wild = sorted((SHARED_DATA / "wild").glob("*.mp4"))
    return [str(p.relative_to(SHARED_DATA)) for p in [*grid, *wild]]


@pytest.mark.shared_data
@pytest.mark.timeout(300)
@pytest.mark.parametrize("clip", _real_clips() or ["grid_s1/video (absent)"])
def test_tracker_matches_frozen_reference_on_real_clips(
        clip: str, shared_data: Path, insightface_root: Path) -> None:
    from se4lip_dist.media import iter_video_frames

    path = shared_data / clip
    if not path.is_file():
        pytest.skip(f"{path} not found (set SE4LIP_SHARED_DATA)")
    frames = list(iter_video_frames(str(path), 25))
    scrfd = _MemoDetector(InsightFaceDetector(str(insightface_root), det_size=320, threads=1))
    for k, smooth, max_buffer in [(5, 1, 100), (5, 3, 100), (2, 3, 100), (5, 3, 12)]:
        out = _assert_same_tracks(frames, scrfd, k, smooth, max_buffer, crops=True)
        assert out["error"] is None and len(out["frames"]) == len(frames)
