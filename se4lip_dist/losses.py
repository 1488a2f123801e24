"""Sync losses and metrics on speech/lip embeddings (Eq. 5-6 of SE4Lip; syncnet_python offsets).

Tensors in, tensors out: nothing here needs a process group. Everything is computed in float32,
also under bf16 autocast (``F.binary_cross_entropy`` refuses autocast, so Eq. 6 is written out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def embedding_distance(a: Tensor, v: Tensor) -> Tensor:
    """Euclidean distance between L2-normalised embeddings, ``[B]`` in ``[0, sqrt(2)]``.

    The scale differs from syncnet_python's unnormalised distances (LSE-D around 6-10), so
    compare LSE-D-like numbers only between models scored by this function.
    """
    a_n = F.normalize(a.float(), dim=-1, eps=1e-6)
    v_n = F.normalize(v.float(), dim=-1, eps=1e-6)
    return (a_n - v_n).norm(dim=-1)


def offset_distances(a_seq: Tensor, v_seq: Tensor, max_offset: int) -> Tensor:
    """Mean embedding distance at every audio shift, following syncnet_python's ``calc_pdist``.

    Shift ``s`` compares ``v_seq[t]`` with ``a_seq[t + s]`` over the ``t`` where both exist (unlike
    ``calc_pdist``, no zero padding enters the mean). ``s > 0`` means the audio matching a video
    frame comes ``s`` frames later; syncnet_python reports the opposite sign (``vshift - minidx``).

    Args:
        a_seq: ``[T, D]`` per-frame speech embeddings.
        v_seq: ``[T2, D]`` per-frame lip embeddings (frame-aligned with ``a_seq``).
        max_offset: largest shift tried, in frames.

    Returns:
        ``[2 * max_offset + 1]`` float32; index ``i`` is shift ``i - max_offset``.

    Raises:
        ValueError: when some shift would leave no overlapping frames.
    """
    if a_seq.dim() != 2 or v_seq.dim() != 2 or a_seq.shape[1] != v_seq.shape[1]:
        raise ValueError(f"need [T, D] sequences, got {tuple(a_seq.shape)}, {tuple(v_seq.shape)}")
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    n_a, n_v = a_seq.shape[0], v_seq.shape[0]
    if max_offset >= n_a or max_offset >= n_v:
        raise ValueError(f"max_offset {max_offset} needs more than {max_offset} frames, "
                         f"got {n_a} audio and {n_v} video")
    out = []
    for s in range(-max_offset, max_offset + 1):
        t0, t1 = max(0, -s), min(n_v, n_a - s)
        out.append(embedding_distance(a_seq[t0 + s : t1 + s], v_seq[t0:t1]).mean())
    return torch.stack(out)


def predict_offset(dists: Tensor) -> tuple[int, float, float]:
    """AV offset and syncnet_python-style scores from :func:`offset_distances` output.

    Args:
        dists: ``[2 * max_offset + 1]`` mean distances per shift.

    Returns:
        ``(offset, min_dist, confidence)``: the best shift (same sign as
        :func:`offset_distances`), its distance (LSE-D-like) and ``median - min`` (LSE-C-like;
        ``torch.median``, the lower median, as in syncnet_python).
    """
    if dists.dim() != 1 or dists.numel() % 2 != 1:
        raise ValueError(f"dists must be [2 * max_offset + 1], got {tuple(dists.shape)}")
    max_offset = dists.numel() // 2
    min_val, min_idx = torch.min(dists, dim=0)
    conf = torch.median(dists) - min_val
    return int(min_idx) - max_offset, float(min_val), float(conf)


__all__ = [
    "embedding_distance",
    "offset_distances",
    "predict_offset",
    "sync_accuracy",
    "sync_bce_loss",
    "sync_cosine",
]
