"""Sync losses and metrics on speech/lip embeddings (Eq. 5-6 of SE4Lip).

The AV-offset search lives in :mod:`se4lip_dist.sync`.

Tensors in, tensors out: nothing here needs a process group. Everything is computed in float32,
also under bf16 autocast (``F.binary_cross_entropy`` refuses autocast, so Eq. 6 is written out).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sync_cosine(a: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Cosine similarity of Eq. 5, clamped into ``[eps, 1 - eps]``.

    Embeddings are non-negative (both encoders end in ReLU), so the cosine is in [0, 1]; the clamp
    keeps the logs of Eq. 6 finite. A zero vector gives cosine ``eps`` (not NaN).

    Args:
        a: ``[B, D]`` speech embeddings.
        v: ``[B, D]`` lip embeddings.
        eps: clamp margin and norm floor.

    Returns:
        ``[B]`` float32 cosines.
    """
    a32, v32 = a.float(), v.float()
    a_n = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    v_n = v32 / v32.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (a_n * v_n).sum(dim=-1).clamp(eps, 1.0 - eps)


def sync_bce_loss(a: Tensor, v: Tensor, y: Tensor) -> Tensor:
    """Eq. 6: mean binary cross-entropy of :func:`sync_cosine` against labels.

    Args:
        a: ``[B, D]`` speech embeddings.
        v: ``[B, D]`` lip embeddings.
        y: ``[B]`` labels, 1 for an in-sync pair and 0 otherwise.

    Returns:
        Scalar float32 loss (``ln 2`` at chance, cosine 0.5).
    """
    cos = sync_cosine(a, v)
    y32 = y.float().reshape(cos.shape)
    return -(y32 * torch.log(cos) + (1.0 - y32) * torch.log1p(-cos)).mean()


@torch.no_grad()
def sync_accuracy(a: Tensor, v: Tensor, y: Tensor, threshold: float = 0.5) -> Tensor:
    """LatentSync's sync accuracy: share of pairs with ``(cos > threshold) == y``.

    Args:
        a: ``[B, D]`` speech embeddings.
        v: ``[B, D]`` lip embeddings.
        y: ``[B]`` labels in {0, 1}.
        threshold: cosine above which a pair is called in sync.

    Returns:
        Scalar float32 in [0, 1].
    """
    pred = sync_cosine(a, v) > threshold
    return (pred == (y.reshape(pred.shape) > 0.5)).float().mean()


__all__ = [
    "sync_accuracy",
    "sync_bce_loss",
    "sync_cosine",
]
