"""The sync protocol: windows, the offset search, shifted-audio scoring, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from se4lip_dist.config import load_config
from se4lip_dist.models import build_model
from se4lip_dist.sync import (
    ClipSync,
    audio_windows,
    bootstrap_interval,
    chance_offset_accuracy,
    clip_sync,
    constant_floor,
    embedding_distance,
    lip_windows,
    mcnemar_p,
    offset_distances,
    predict_offset,
    shift_audio,
    sliding_windows,
    wilson_interval,
)

SPF = 640


def test_embedding_distance() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    v = torch.tensor([[5.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    torch.testing.assert_close(
        embedding_distance(a, v), torch.tensor([0.0, math.sqrt(2.0), 0.0]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("shift", [-7, -1, 0, 3, 5])
def test_offset_search_recovers_planted_shift(shift: int) -> None:
    g = torch.Generator().manual_seed(shift + 100)
    n, k, d = 60, 10, 32
    base = torch.rand(n + 2 * k, d, generator=g)
    a_seq = base[k : k + n]
    v_seq = base[k + shift : k + shift + n]  # v[t] == a[t + shift]
    v_seq = v_seq + 0.01 * torch.rand(n, d, generator=g)
    dists = offset_distances(a_seq, v_seq, max_offset=k)
    assert dists.shape == (2 * k + 1,)
    offset, min_dist, conf = predict_offset(dists)
    assert offset == shift
    assert min_dist == pytest.approx(dists.min().item())
    assert min_dist < 0.05
    assert conf == pytest.approx((dists.median() - dists.min()).item())
    assert conf > 0.1


def test_offset_distances_hand_case_and_errors() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    dists = offset_distances(a, v, max_offset=1)
    # shift -1: v[1:3] vs a[0:2] -> 0; shift 0: orthogonal; shift +1: v[0:2] vs a[1:3] -> 0.
    torch.testing.assert_close(dists, torch.tensor([0.0, math.sqrt(2.0), 0.0]), atol=1e-6, rtol=0)
    assert predict_offset(torch.tensor([3.0, 1.0, 2.0, 4.0, 5.0])) == (-1, 1.0, 2.0)
    with pytest.raises(ValueError):
        offset_distances(a, v, max_offset=3)
    with pytest.raises(ValueError):
        predict_offset(torch.ones(4))


def test_sliding_windows_shapes() -> None:
    x = np.arange(20 * 2).reshape(20, 2)
    w = sliding_windows(x, 5)
    assert w.shape == (16, 5, 2)
    np.testing.assert_array_equal(w[3], x[3:8])
    a = np.arange(40)
    aw = sliding_windows(a, 8, 4)
    assert aw.shape == (9, 8)
    np.testing.assert_array_equal(aw[2], a[8:16])
    assert sliding_windows(a, 41).shape == (0, 41)


@pytest.mark.parametrize("t", [4, 5])
def test_lip_and_audio_windows_cover_the_same_frames(t: int) -> None:
    """Odd and even windows alike: window i is frames i..i+T-1 and exactly their audio."""
    n = 12
    lips = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    audio = np.repeat(np.arange(n, dtype=np.float32), SPF)
    lw, aw = lip_windows(lips, t), audio_windows(audio, t, SPF)
    assert len(lw) == len(aw) == n - t + 1
    for i in range(n - t + 1):
        frames = lw[i][:, 0, 0, 0].tolist()
        assert frames == list(range(i, i + t))
        assert sorted(set(aw[i].tolist())) == frames


def test_shift_audio() -> None:
    a = np.arange(1, 11, dtype=np.float32)
    np.testing.assert_array_equal(shift_audio(a, 2, 2), [0, 0, 0, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(shift_audio(a, -1, 2), [3, 4, 5, 6, 7, 8, 9, 10, 0, 0])


def test_wilson_interval_and_chance() -> None:
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert chance_offset_accuracy(15) == pytest.approx(3 / 31)


def test_a_constant_answer_is_never_shift_consistent() -> None:
    """Under shifts -3, 0, +3 the best constant hits one shift in three (the old headline's
    1/3) and no unit at every shift; shifts within the tolerance of one offset would allow it."""
    assert constant_floor((-3, 0, 3), 15) == {"consistent": 0.0, "offset": pytest.approx(1 / 3)}
    assert constant_floor((0, 1), 15) == {"consistent": 1.0, "offset": 1.0}
    unit = ClipSync("c", 40, 36, [-3, 0, 3], [0, 0, 0], [0.0] * 3, [0.0] * 3)
    assert unit.hits == [False, True, False] and not unit.consistent
    assert ClipSync("c", 40, 36, [-3, 0, 3], [-2, 1, 3], [0.0] * 3, [0.0] * 3).consistent


def test_mcnemar_exact_one_sided() -> None:
    assert mcnemar_p(0, 0) == 1.0  # no discordant unit: never evidence for the newcomer
    assert mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p(4, 0) == pytest.approx(1 / 16)  # 4 wins and no loss is not enough at 0.05
    assert mcnemar_p(6, 2) == pytest.approx(37 / 256)
    assert mcnemar_p(0, 5) == 1.0
    assert mcnemar_p(17, 1) < 1e-4


def test_bootstrap_interval_over_units() -> None:
    lo, hi = bootstrap_interval([1.0] * 10)
    assert lo == hi == 1.0
    lo, hi = bootstrap_interval([0.0, 1 / 3, 2 / 3, 1.0] * 5)
    assert lo < 0.5 < hi and hi - lo < 0.5
    assert bootstrap_interval([0.0, 1.0] * 5) == bootstrap_interval([0.0, 1.0] * 5)  # seeded
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def _tiny_model():  # type: ignore[no-untyped-def]
    cfg = load_config("cpu-small", overrides=[
        "model.gru_layers=1", "model.embed_dim=16", "model.lip_channels=[4,8,8,16,16]",
        "model.lip_height=16", "model.lip_width=16", "train.max_offset=6",
        "train.window_frames=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, window_frames=cfg.train.window_frames).eval()
    return model, cfg


def test_clip_sync_equals_shift_audio_then_search() -> None:
    """The padded single-pass search gives exactly what shifting the audio and searching gives."""
    model, cfg = _tiny_model()
    rng = np.random.default_rng(0)
    n = 30
    lips = rng.integers(0, 255, (n, 24, 24, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(n * SPF)).astype(np.float32)
    shifts = (-3, 0, 2)
    res = clip_sync(model, cfg, lips, audio, shifts=shifts, keep_distances=True)
    assert res.windows == n - 4 + 1 and res.shifts == list(shifts)
    for s in shifts:
        one = clip_sync(model, cfg, lips, shift_audio(audio, s, SPF), shifts=(0,),
                        keep_distances=True)
        np.testing.assert_allclose(res.distances[s], one.distances[0], rtol=1e-5, atol=1e-6)
        assert res.offsets[shifts.index(s)] == one.offsets[0]
    with pytest.raises(ValueError, match="too short"):
        clip_sync(model, cfg, lips[:8], audio[:8 * SPF])


class _Oracle(torch.nn.Module):
    """Speech and lip 'encoders' that embed the frame index stamped into their input: an
    ideal sync model whose distance is zero exactly at the true alignment."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.speech = self._speech
        self.lips = self._lips

    @staticmethod
    def _onehot(idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(idx.long().clamp(0, 63), 64).float()

    def _speech(self, wav: torch.Tensor) -> torch.Tensor:
        # The first sample of an audio window carries its first frame's index.
        return self._onehot(torch.round(wav[:, 0] * 1000))

    def _lips(self, x: torch.Tensor) -> torch.Tensor:
        return self._onehot(torch.round(x[:, 0, 0, 0] * 255))


@pytest.mark.parametrize("shift", [-3, 0, 3])
def test_clip_sync_finds_each_shift_exactly(shift: int) -> None:
    _, cfg = _tiny_model()
    n = 30
    lips = np.zeros((n, 16, 16, 3), np.uint8)
    lips[:, :, :, :] = np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None]
    audio = np.repeat(np.arange(1, n + 1, dtype=np.float32) / 1000, SPF)
    res = clip_sync(_Oracle(), cfg, lips, audio, shifts=(shift,))
    assert res.offsets == [shift] and res.hits == [True]
