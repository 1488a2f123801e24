"""LMD: zero against itself, positive against a different mouth, blind to where the face is.

The dlib tests need the ``lmd`` extra (``.ci/run`` installs it). One uses the face photo that
the insightface package ships, so it runs without ``../shared``; one uses a real GRID clip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from se4lip_dist.lmd import mouth_distance, run_lmd

needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None
    or importlib.util.find_spec("face_recognition_models") is None,
    reason="LMD needs dlib: pip install -e '.[lmd]' (.ci/run installs it)")


def test_mouth_distance_ignores_translation() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 50, (20, 2))
    assert mouth_distance(pts, pts + np.array([7.0, -3.0])) == pytest.approx(0.0, abs=1e-12)
    wider = pts.copy()
    wider[:, 0] = (pts[:, 0] - pts[:, 0].mean()) * 1.5 + pts[:, 0].mean()
    assert mouth_distance(wider, pts) > 0


def _packaged_face(size: int = 224) -> np.ndarray:
    """The face photo insightface ships (``data/images``), ``size`` x ``size`` RGB."""
    from PIL import Image

    spec = importlib.util.find_spec("insightface")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "data" / "images" / "Tom_Hanks_54745.png"
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))


def _open_mouth(face: np.ndarray, stretch: float = 1.35) -> np.ndarray:
    """The same face with everything below the nose stretched down: a more open mouth."""
    from PIL import Image

    h, w = face.shape[:2]
    top = int(h * 0.68)
    lower = Image.fromarray(face[top:]).resize((w, int((h - top) * stretch)), Image.BICUBIC)
    out = face.copy()
    out[top:] = np.asarray(lower)[:h - top]
    return out


def _shifted(face: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The face moved by (dx, dy) pixels, edges repeated."""
    h, w = face.shape[:2]
    padded = np.pad(face, ((abs(dy),) * 2, (abs(dx),) * 2, (0, 0)), mode="edge")
    return padded[abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


@needs_dlib
@pytest.mark.timeout(120)
def test_lmd_packaged_face(tmp_path: Path) -> None:
    from se4lip_dist.synthetic import write_clip

    face = _packaged_face()

    def clip(name: str, image: np.ndarray, n: int) -> Path:
        path = tmp_path / name
        write_clip(path, np.stack([image] * n), np.zeros(640 * n, np.float32), 25, 16000)
        return path

    gt = clip("gt.mp4", face, 10)
    same = run_lmd(gt, gt)
    assert same["lmd"] == 0.0 and same["frames"] == 10 and same["no_face_frames"] == 0

    # Mouth points are centred on their own mean: moving the whole face changes little ...
    moved = run_lmd(clip("moved.mp4", _shifted(face, 9, -6), 10), gt)
    # ... a more open mouth changes a lot; a shorter video is compared over its own length.
    opened = run_lmd(clip("open.mp4", _open_mouth(face), 8), gt)
    assert moved["frames"] == 10 and moved["lmd"] < 1.0
    assert opened["lmd"] > 2.0 and opened["lmd"] > 3 * moved["lmd"]
    assert opened["length_mismatch"] and (opened["pred_frames"], opened["gt_frames"]) == (8, 10)
    assert opened["frames"] == 8


@needs_dlib
@pytest.mark.shared_data
@pytest.mark.timeout(120)
def test_lmd_real_face(shared_data: Path, tmp_path: Path) -> None:
    from se4lip_dist.media import decode_clip
    from se4lip_dist.synthetic import write_clip

    gt = shared_data / "grid_s1" / "video" / "bbaf2n.mp4"
    same = run_lmd(gt, gt, max_frames=25)
    assert same["lmd"] == 0.0 and same["frames"] == 25 and same["no_face_frames"] == 0

    # The same face 5 frames later and 10 frames shorter: mouths differ, lengths mismatch.
    clip = decode_clip(gt)
    shifted = tmp_path / "shifted.mp4"
    write_clip(shifted, clip.frames[5:-5], clip.audio[5 * 640:-5 * 640], 25, 16000)
    r = run_lmd(shifted, gt, max_frames=25)
    assert r["lmd"] > 0.5
    assert (r["pred_frames"], r["gt_frames"]) == (len(clip.frames) - 10, len(clip.frames))
    assert r["length_mismatch"] and r["frames"] + r["no_face_frames"] == 25
