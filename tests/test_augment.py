"""Augmentations: each does what it says, keeps shapes and timing, and is off by default."""

from __future__ import annotations

import math

import pytest
import torch

from se4lip_dist.augment import (
    add_noise,
    augment_batch,
    blur,
    change_speed,
    reverberate,
    shift_and_zoom,
)
from se4lip_dist.config import AugmentConfig

SR = 16000


def _tone(freq: float, n: int = 3200) -> torch.Tensor:
    t = torch.arange(n) / SR
    return torch.sin(2 * math.pi * freq * t)[None]


def _crossings(x: torch.Tensor) -> int:
    return int(((x[:-1] < 0) & (x[1:] >= 0)).sum())


def test_noise_hits_the_requested_snr() -> None:
    g = torch.Generator().manual_seed(0)
    wav = _tone(200).repeat(8, 1)
    out = add_noise(wav, torch.full((8,), 10.0), g)
    snr = 10 * torch.log10(wav.pow(2).mean(1) / (out - wav).pow(2).mean(1))
    assert torch.allclose(snr, torch.full((8,), 10.0), atol=0.01)


def test_speed_changes_pitch_and_keeps_length() -> None:
    wav = _tone(400)
    assert torch.allclose(change_speed(wav, torch.tensor([1.0])), wav, atol=1e-6)
    faster = change_speed(wav, torch.tensor([1.1]))
    assert faster.shape == wav.shape
    assert _crossings(faster[0, 800:2400]) == pytest.approx(_crossings(wav[0, 800:2400]) * 1.1,
                                                           abs=2)


def test_reverb_keeps_length_loudness_and_onset() -> None:
    g = torch.Generator().manual_seed(1)
    wav = torch.zeros(2, 3200)
    wav[:, 1600:1700] = 1.0  # a burst in the middle of the window
    out = reverberate(wav, torch.tensor([0.3, 0.5]), SR, g)
    assert out.shape == wav.shape
    assert torch.allclose(out.norm(dim=1), wav.norm(dim=1), rtol=1e-4)
    assert out[:, :1600].abs().max() < 1e-4  # nothing before the onset: timing is kept
    assert (out[:, 1700:].abs().sum(1) > 0).all()  # a tail after it


def test_image_augmentations_keep_shapes_and_identity_at_zero() -> None:
    g = torch.Generator().manual_seed(2)
    lips = torch.rand(3, 5, 3, 24, 24)
    assert torch.allclose(shift_and_zoom(lips, 0.0, 0.0, g), lips, atol=1e-5)
    moved = shift_and_zoom(lips, 0.1, 0.1, g)
    assert moved.shape == lips.shape and not torch.allclose(moved, lips)
    flat = torch.full((1, 2, 3, 16, 16), 0.4)
    assert torch.allclose(blur(flat, torch.tensor([1.0])), flat, atol=1e-6)
    assert blur(lips, torch.full((3,), 1.0)).var() < lips.var()


def test_augment_batch_off_by_default_seeded_and_typed() -> None:
    wav = torch.randn(4, 3200) * 0.1
    lips = torch.randint(0, 256, (4, 5, 24, 24, 3), dtype=torch.uint8)
    cfg = AugmentConfig()
    assert not cfg.enabled
    w, lp = augment_batch(wav, lips, cfg, SR, torch.Generator().manual_seed(0))
    assert torch.equal(w, wav) and torch.equal(lp, lips)
    on = AugmentConfig(noise_p=1, reverb_p=1, speed_p=1, color_p=1, affine_p=1, blur_p=1)
    a = augment_batch(wav, lips, on, SR, torch.Generator().manual_seed(3))
    b = augment_batch(wav, lips, on, SR, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == wav.shape and a[1].shape == lips.shape and a[1].dtype == torch.uint8
    assert not torch.equal(a[0], wav) and not torch.equal(a[1], lips)
