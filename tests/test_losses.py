"""Sync losses and offset search on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from se4lip_dist.losses import sync_accuracy, sync_bce_loss, sync_cosine


def test_cosine_identical_orthogonal_and_known_value() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    v = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    cos = sync_cosine(a, v, eps=1e-6)
    expected = torch.tensor([1.0 - 1e-6, 1e-6, 1.0 / math.sqrt(2.0), 1.0 - 1e-6])
    torch.testing.assert_close(cos, expected)


def test_bce_known_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # cosine 1/sqrt(2) for both pairs
    c = 1.0 / math.sqrt(2.0)
    loss = sync_bce_loss(a, v, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((-math.log(c) - math.log(1.0 - c)) / 2.0, rel=1e-5)
    # Cosine 0.5 is chance: ln 2 whatever the label.
    v_half = torch.tensor([[1.0, math.sqrt(3.0)]] * 2)
    for y in ([1.0, 1.0], [0.0, 0.0], [1.0, 0.0]):
        assert sync_bce_loss(a, v_half, torch.tensor(y)).item() == pytest.approx(math.log(2.0))


def test_bce_identical_and_orthogonal_extremes() -> None:
    e = torch.tensor([[0.5, 0.2, 0.0]])
    o = torch.tensor([[0.0, 0.0, 1.0]])
    assert sync_bce_loss(e, e, torch.ones(1)).item() == pytest.approx(0.0, abs=1e-5)
    assert sync_bce_loss(e, o, torch.zeros(1)).item() == pytest.approx(0.0, abs=1e-5)
    # Wrong and confident: -log(eps).
    assert sync_bce_loss(e, o, torch.ones(1)).item() == pytest.approx(-math.log(1e-6), rel=1e-4)


def test_zero_embeddings_are_nan_free_with_finite_grads() -> None:
    a = torch.zeros(4, 8, requires_grad=True)
    v = torch.rand(4, 8, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = sync_bce_loss(a, v, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(a.grad).all() and torch.isfinite(v.grad).all()
    assert torch.isfinite(sync_cosine(a, torch.zeros(4, 8))).all()


def test_gradients_finite_and_pull_positive_pairs_together() -> None:
    torch.manual_seed(0)
    a = torch.rand(6, 16, requires_grad=True)
    v = torch.rand(6, 16)
    loss = sync_bce_loss(a, v, torch.ones(6))
    loss.backward()
    assert torch.isfinite(a.grad).all()
    with torch.no_grad():
        stepped = sync_bce_loss(a - 0.1 * a.grad, v, torch.ones(6))
    assert stepped < loss


def test_bce_under_bf16_autocast_is_float32() -> None:
    a, v = torch.rand(4, 8), torch.rand(4, 8)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sync_bce_loss(a.bfloat16(), v.bfloat16(), y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sync_bce_loss(a, v, y).item(), rel=2e-2)


def test_accuracy() -> None:
    a = torch.tensor([[1.0, 0.0]] * 4)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0]])  # cos ~1, 0, ~1, 0
    assert sync_accuracy(a, v, torch.tensor([1.0, 0.0, 0.0, 1.0])).item() == pytest.approx(0.5)
    assert sync_accuracy(a, v, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(1.0)
    assert sync_accuracy(a, v, torch.ones(4), threshold=-1.0).item() == pytest.approx(1.0)
