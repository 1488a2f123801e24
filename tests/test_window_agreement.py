"""One window convention: train validation, evaluate, probe and extract agree on the same clip.

Frame ``i`` owns audio samples ``[i * spf, (i + 1) * spf)``; training window ``w`` is frames
``w .. w + T - 1``; the window centred on frame ``c`` (extract, probe) is training window
``c - (T - 1) // 2``. Checked for odd and even ``T`` on one synthetic talking-mouth clip:

- extract's feature of frame ``c`` is the speech embedding of training window ``c - (T - 1) // 2``;
- probe's span feature is the mean of extract's features over the span;
- evaluate (on the video) and train validation (on the shards ``prepare`` made of it) find the
  same offset at every audio shift, and that offset is the shift itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from planted_sync import SPF, Loudness, MouthArea
from torch import nn

from se4lip_dist import media
from se4lip_dist.config import Config, load_config
from se4lip_dist.evaluate import evaluate_clip
from se4lip_dist.extract import extract_features
from se4lip_dist.models import SpeechEncoder
from se4lip_dist.prepare import run_prepare
from se4lip_dist.probe import span_embedding, span_frames
from se4lip_dist.registry import embed_waveforms
from se4lip_dist.sync import audio_windows, centred_audio_windows, window_lead
from se4lip_dist.synthetic import make_synthetic_clip
from se4lip_dist.validation import ValidationSet, score

FPS = 25


def _cfg(t: int) -> Config:
    return load_config("cpu-small", overrides=[
        "face.backend=none", "data.crop_size=64", "model.lip_height=32", "model.lip_width=64",
        "model.gru_layers=1", "model.embed_dim=16", f"train.window_frames={t}",
        "train.max_offset=8"])


def _encoder(cfg: Config) -> SpeechEncoder:
    torch.manual_seed(0)
    return SpeechEncoder(cfg.model, cfg.data.sample_rate).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agree") / "talk.mp4"
    make_synthetic_clip(path, 3.0, seed=21)
    return path


def test_centred_windows_one_rule_for_odd_and_even() -> None:
    audio = np.arange(10 * SPF, dtype=np.float32) + 1.0
    for t, frames_of_3 in ((5, (1, 2, 3, 4, 5)), (3, (2, 3, 4)), (4, (2, 3, 4, 5)),
                           (2, (3, 4)), (1, (3,))):
        win = centred_audio_windows(audio, 10, t, SPF)
        assert win.shape == (10, t * SPF) and win.dtype == np.float32
        # Frame 3's window covers exactly these whole frames (even T: the extra one after it).
        want = np.concatenate([audio[f * SPF:(f + 1) * SPF] for f in frames_of_3])
        np.testing.assert_array_equal(win[3], want)
        assert window_lead(t) == 3 - frames_of_3[0]
        # Inside the clip every centred window is a training window; outside, zeros.
        train = audio_windows(audio, t, SPF)
        lead = window_lead(t)
        np.testing.assert_array_equal(win[lead:lead + len(train)], train)
        if lead:
            assert not win[0, :lead * SPF].any()


@pytest.mark.parametrize("t", [5, 4, 3, 6])
def test_extract_frame_c_is_training_window_c_minus_lead(t: int, clip: Path) -> None:
    cfg = _cfg(t)
    enc = _encoder(cfg)
    feats, _ = extract_features(enc, cfg, str(clip), FPS, batch_size=32)
    n = len(feats)
    audio = media.decode_audio(str(clip), cfg.data.sample_rate, n_samples=n * SPF)
    train = embed_waveforms(enc, np.ascontiguousarray(audio_windows(audio, t, SPF)), cfg)
    lead = window_lead(t)
    assert len(train) == n - t + 1
    np.testing.assert_allclose(feats[lead:lead + len(train)], train, rtol=1e-4, atol=1e-5)
    # The check tells neighbouring windows apart (a half- or one-frame slip would fail it).
    c = n // 2
    assert np.abs(feats[c] - train[c - lead + 1]).max() > 1e-3
    assert np.abs(feats[c] - train[c - lead - 1]).max() > 1e-3


@pytest.mark.parametrize("t", [5, 4])
def test_probe_span_feature_is_the_mean_of_extract_features(t: int, clip: Path) -> None:
    cfg = _cfg(t)
    enc = _encoder(cfg)
    feats, _ = extract_features(enc, cfg, str(clip), FPS, batch_size=32)
    audio = media.decode_audio(str(clip), cfg.data.sample_rate)
    f0, f1 = span_frames(20.4, 31.2, len(audio) // SPF)  # a GRID word's span, in frames
    assert (f0, f1) == (20, 32)
    np.testing.assert_allclose(span_embedding(enc, cfg, audio, f0, f1, SPF),
                               feats[f0:f1].mean(0), rtol=1e-4, atol=1e-5)


class _ZeroPad(nn.Module):
    """Pads embeddings with zeros to ``dim`` (distances and cosines unchanged)."""

    def __init__(self, inner: nn.Module, dim: int) -> None:
        super().__init__()
        self.inner, self.dim = inner, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.inner(x)
        return nn.functional.pad(e, (0, self.dim - e.shape[1]))


class PlantedSync(nn.Module):
    """A deterministic SE4Lip stand-in that knows where the synthetic clip is in sync."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.speech = _ZeroPad(Loudness(), dim)
        self.lips = _ZeroPad(MouthArea(), dim)

    def forward(self, wav: torch.Tensor, lips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.speech(wav), self.lips(lips)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("t", [5, 4])
def test_evaluate_and_train_validation_find_the_same_offsets(t: int, clip: Path,
                                                             tmp_path: Path) -> None:
    cfg = _cfg(t)
    listing = tmp_path / "clips.csv"
    listing.write_text(f"path,speaker,split\n{clip},s,val\n")
    prepared = run_prepare([str(listing)], tmp_path / "shards", cfg, workers=0)
    assert prepared.prepared == 1 and not prepared.failures
    vset = ValidationSet.load(str(tmp_path / "shards"), cfg)
    model = PlantedSync(cfg.model.embed_dim)
    result = score(model, cfg, vset, keep_curve=True)
    (searched,) = result.clips
    assert searched.shifts == list(cfg.train.val_shifts) == [-3, 0, 3]
    assert searched.offsets == searched.shifts, searched  # exact, at every shift
    for shift in searched.shifts:
        ev = evaluate_clip(model, cfg, clip, max_offset=cfg.train.max_offset, shift=shift)
        assert ev["offset"] == shift, (shift, ev["distances"])
        # The shards hold int16 audio, evaluate decodes floats; the planted loudness of a
        # silent window is all quantisation noise, so the curves agree only closely.
        np.testing.assert_allclose(ev["distances"], searched.distances[shift], atol=0.02)
