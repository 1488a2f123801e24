"""LMD on a real GRID face: zero against itself, positive against a time-shifted copy."""

from __future__ import annotations

import numpy as np
import pytest

from se4lip_dist.lmd import mouth_distance, run_lmd

pytest.importorskip("dlib", reason="LMD needs dlib: pip install 'se4lip-dist[lmd]'")


def test_mouth_distance_ignores_translation() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 50, (20, 2))
    assert mouth_distance(pts, pts + np.array([7.0, -3.0])) == pytest.approx(0.0, abs=1e-12)
    wider = pts.copy()
    wider[:, 0] = (pts[:, 0] - pts[:, 0].mean()) * 1.5 + pts[:, 0].mean()
    assert mouth_distance(wider, pts) > 0


@pytest.mark.shared_data
@pytest.mark.timeout(120)
def test_lmd_real_face(shared_data, tmp_path) -> None:
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
