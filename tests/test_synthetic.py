"""Synthetic talking mouth: deterministic per seed, mouth follows the speech envelope."""

from __future__ import annotations

import numpy as np

from se4lip_dist.media import decode_clip
from se4lip_dist.synthetic import make_synthetic_clip, make_synthetic_dataset, speech_like_audio


def test_speech_like_audio_is_deterministic_per_seed():
    a0, e0 = speech_like_audio(2.0, 16000, seed=0)
    a1, e1 = speech_like_audio(2.0, 16000, seed=0)
    b, _ = speech_like_audio(2.0, 16000, seed=1)
    assert a0.shape == e0.shape == (32000,) and a0.dtype == np.float32
    np.testing.assert_array_equal(a0, a1)
    np.testing.assert_array_equal(e0, e1)
    assert not np.allclose(a0, b)
    assert e0.min() >= 0.0 and e0.max() <= 1.0 and np.abs(a0).max() <= 1.0
    assert (e0 < 0.05).mean() > 0.1  # pauses between syllables exist


def _mouth_darkness(frames: np.ndarray) -> np.ndarray:
    """Dark pixels in the fixed mouth crop (0.5, 0.75, side 0.35) of each frame."""
    h, w = frames.shape[1:3]
    side = int(0.35 * min(h, w))
    y0, x0 = int(0.75 * h - side / 2), int(0.5 * w - side / 2)
    crop = frames[:, y0 : y0 + side, x0 : x0 + side].astype(np.float32).mean(axis=3)
    return (crop < 60).sum(axis=(1, 2)).astype(np.float64)


def test_clip_mouth_follows_envelope(tmp_path):
    meta = make_synthetic_clip(tmp_path / "a.mp4", 3.0, seed=5)
    clip = decode_clip(tmp_path / "a.mp4")
    assert clip.frames.shape == (75, 128, 128, 3) and meta["n_frames"] == 75
    assert clip.audio.shape == (48000,)
    # Frame i's opening against the audio energy in its own window [i*640, (i+1)*640).
    energy = np.sqrt((clip.audio.reshape(75, 640) ** 2).mean(axis=1))
    dark = _mouth_darkness(clip.frames)
    assert np.corrcoef(dark, meta["mouth_open"])[0, 1] > 0.9
    assert np.corrcoef(dark, energy)[0, 1] > 0.8
    # Shifting the audio by a few frames breaks the correspondence: sync is learnable.
    assert np.corrcoef(dark[5:], energy[:-5])[0, 1] < 0.5


def test_clips_deterministic_and_seeds_differ(tmp_path):
    a = make_synthetic_clip(tmp_path / "a.mkv", 1.0, seed=1)
    b = make_synthetic_clip(tmp_path / "b.mkv", 1.0, seed=1)
    c = make_synthetic_clip(tmp_path / "c.mkv", 1.0, seed=2)
    assert a["mouth_open"] == b["mouth_open"] != c["mouth_open"]
    ca, cb, cc = (decode_clip(tmp_path / f"{k}.mkv") for k in "abc")
    np.testing.assert_array_equal(ca.frames, cb.frames)
    np.testing.assert_array_equal(ca.audio, cb.audio)
    assert not np.array_equal(ca.frames, cc.frames)


def test_dataset(tmp_path):
    paths = make_synthetic_dataset(tmp_path / "ds", 3, seconds=1.0, seed=7, size=(96, 80))
    assert [p.name for p in paths] == ["syn_00000.mp4", "syn_00001.mp4", "syn_00002.mp4"]
    clip = decode_clip(paths[1])
    assert clip.frames.shape == (25, 80, 96, 3) and clip.audio.shape == (16000,)
