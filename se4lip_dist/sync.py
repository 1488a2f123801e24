"""The audio-visual sync protocol, written once: windows, the offset search and its scores.

Conventions every stage uses (training pairs, validation, the registry gate, ``evaluate``):

- Frame ``i`` of a clip owns audio samples ``[i * spf, (i + 1) * spf)`` (``prepare`` makes it so).
- Window ``i`` of ``T`` frames is lip frames ``i .. i + T - 1`` plus the audio of exactly those
  frames (:func:`lip_windows`, :func:`audio_windows`); odd and even ``T`` are treated alike.
- The window *centred on* frame ``c`` (per-frame features: ``extract``, ``probe-visemes``) is
  window ``c - (T - 1) // 2`` (:func:`centred_audio_windows`, :func:`window_lead`).
- Shift ``s`` compares lip window ``t`` with audio window ``t + s``: ``s > 0`` means the sound of
  a mouth movement comes ``s`` frames later (syncnet_python prints the opposite sign).
- :func:`shift_audio` delays the audio by ``K`` frames (zeros shifted in, length kept), so an
  in-sync clip should then score offset ``K``; a prediction is correct when
  ``|offset - K| <= OFFSET_TOLERANCE``.
- A clip (or a held-out piece of one) is the independent unit of evidence. It is
  *shift-consistent* when the offset search recovers every applied shift
  (:attr:`ClipSync.consistent`): a model that ignores its input answers the same offset
  whatever the shift and scores 0. Its intervals (:func:`wilson_interval`,
  :func:`bootstrap_interval`) and paired comparisons (:func:`mcnemar_p`) count units, never
  (unit, shift) trials.
- Distances are L2 distances of L2-normalised embeddings, in ``[0, sqrt(2)]``: this encoder's
  scale, not SyncNet's. LSE-D is the minimum of the mean distance over shifts, LSE-C the median
  minus the minimum (syncnet_python's definitions).

Pure numpy/torch: nothing here needs Ray, MLflow or a process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from se4lip_dist.config import Config
from se4lip_dist.models import lip_input

OFFSET_TOLERANCE = 1
"""A predicted offset within this many frames of the expected one counts as correct."""
EMBED_BATCH = 64
"""Windows per encoder call in the offset search."""


def sliding_windows(x: np.ndarray, window: int, step: int = 1) -> np.ndarray:
    """Views ``x[i*step : i*step + window]`` stacked on a new first axis (no copy)."""
    n = (len(x) - window) // step + 1
    if n <= 0:
        return np.zeros((0, window, *x.shape[1:]), x.dtype)
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)[::step]
    # sliding_window_view puts the window axis last; move it next to the batch axis.
    return np.moveaxis(view, -1, 1)[:n]


def lip_windows(lips: np.ndarray, window_frames: int) -> np.ndarray:
    """``[W, T, h, w, 3]`` lip windows of ``[N, h, w, 3]`` frames; window i starts at frame i."""
    return sliding_windows(lips, window_frames)


def audio_windows(audio: np.ndarray, window_frames: int, spf: int) -> np.ndarray:
    """``[W, T * spf]`` audio windows; window ``i`` is the audio of frames ``i .. i + T - 1``."""
    return sliding_windows(audio, window_frames * spf, spf)


def window_lead(window_frames: int) -> int:
    """Frames a window starts before the frame it is centred on: ``(T - 1) // 2``.

    The centred window of frame ``c`` is training window ``c - window_lead(T)``, i.e. frames
    ``c - (T - 1) // 2 .. c + T // 2``: for odd ``T`` exactly centred, for even ``T`` the extra
    frame lies after ``c``.
    """
    return (window_frames - 1) // 2


def centred_audio_windows(audio: np.ndarray, n_frames: int, window_frames: int,
                          spf: int) -> np.ndarray:
    """``[N, T * spf]`` audio windows, one centred on each of ``n_frames`` video frames.

    Row ``c`` is :func:`audio_windows` window ``c - window_lead(T)`` of the same audio (frames
    ``c - (T - 1) // 2 .. c + T // 2``), with zeros where that window reaches past either end,
    so every frame gets a window and each one pairs with the lip window a training pair of the
    same frames would use.

    Args:
        audio: float32 ``[S]`` on the video clock (frame ``i`` owns ``[i * spf, (i + 1) * spf)``).
        n_frames: number of video frames N.
        window_frames: frames per window ``T`` (``train.window_frames``).
        spf: samples per video frame.

    Returns:
        float32 ``[N, T * spf]`` (a strided view; copy slices before mutating them).
    """
    lead = window_lead(window_frames) * spf
    need = (n_frames + window_frames - 1) * spf
    padded = np.zeros(need, np.float32)
    body = np.asarray(audio, np.float32)[: max(0, need - lead)]
    padded[lead : lead + len(body)] = body
    return audio_windows(padded, window_frames, spf)[:n_frames]


def shift_audio(audio: np.ndarray, frames: int, spf: int) -> np.ndarray:
    """Delay the audio by ``frames`` video frames (negative: advance), keeping its length.

    ``out[s] = audio[s - frames * spf]``; samples shifted in from outside are zeros.
    """
    k = frames * spf
    out = np.zeros_like(audio)
    if k >= 0:
        out[k:] = audio[: max(0, len(audio) - k)]
    else:
        out[: len(audio) + k] = audio[-k:]
    return out


def embedding_distance(a: Tensor, v: Tensor) -> Tensor:
    """Euclidean distance between L2-normalised embeddings, ``[B]`` in ``[0, sqrt(2)]``."""
    a_n = F.normalize(a.float(), dim=-1, eps=1e-6)
    v_n = F.normalize(v.float(), dim=-1, eps=1e-6)
    return (a_n - v_n).norm(dim=-1)


def offset_distances(a_seq: Tensor, v_seq: Tensor, max_offset: int) -> Tensor:
    """Mean embedding distance at every audio shift, following syncnet_python's ``calc_pdist``.

    Shift ``s`` compares ``v_seq[t]`` with ``a_seq[t + s]`` over the ``t`` where both exist (unlike
    ``calc_pdist``, no zero padding enters the mean).

    Args:
        a_seq: ``[T, D]`` per-window speech embeddings.
        v_seq: ``[T2, D]`` per-window lip embeddings (window-aligned with ``a_seq``).
        max_offset: largest shift tried, in frames.

    Returns:
        ``[2 * max_offset + 1]`` float32; index ``i`` is shift ``i - max_offset``.

    Raises:
        ValueError: when some shift would leave no overlapping windows.
    """
    if a_seq.dim() != 2 or v_seq.dim() != 2 or a_seq.shape[1] != v_seq.shape[1]:
        raise ValueError(f"need [T, D] sequences, got {tuple(a_seq.shape)}, {tuple(v_seq.shape)}")
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    n_a, n_v = a_seq.shape[0], v_seq.shape[0]
    if max_offset >= n_a or max_offset >= n_v:
        raise ValueError(f"max_offset {max_offset} needs more than {max_offset} windows, "
                         f"got {n_a} audio and {n_v} video")
    out = []
    for s in range(-max_offset, max_offset + 1):
        t0, t1 = max(0, -s), min(n_v, n_a - s)
        out.append(embedding_distance(a_seq[t0 + s : t1 + s], v_seq[t0:t1]).mean())
    return torch.stack(out)


def predict_offset(dists: Tensor) -> tuple[int, float, float]:
    """AV offset and syncnet_python-style scores from :func:`offset_distances` output.

    Returns:
        ``(offset, min_dist, confidence)``: the best shift, its distance (LSE-D-like) and
        ``median - min`` (LSE-C-like; ``torch.median``, the lower median, as in syncnet_python).
    """
    if dists.dim() != 1 or dists.numel() % 2 != 1:
        raise ValueError(f"dists must be [2 * max_offset + 1], got {tuple(dists.shape)}")
    max_offset = dists.numel() // 2
    min_val, min_idx = torch.min(dists, dim=0)
    conf = torch.median(dists) - min_val
    return int(min_idx) - max_offset, float(min_val), float(conf)


def is_hit(offset: int, expected: int) -> bool:
    """Whether a predicted offset counts as correct for an expected one."""
    return abs(offset - expected) <= OFFSET_TOLERANCE


def chance_offset_accuracy(max_offset: int) -> float:
    """Offset accuracy of a uniformly random prediction over ``+-max_offset``."""
    return min(1.0, (2 * OFFSET_TOLERANCE + 1) / (2 * max_offset + 1))


def constant_floor(shifts: tuple[int, ...] | list[int], max_offset: int) -> dict[str, float]:
    """What the best content-blind constant answer scores under the shift protocol.

    Returns:
        ``consistent``: the share of units it gets right at every shift (1 only when one offset
        lies within :data:`OFFSET_TOLERANCE` of all of ``shifts``), and ``offset``: its best
        share of (unit, shift) trials.
    """
    best_any = best_all = 0.0
    for c in range(-max_offset, max_offset + 1):
        hits = [is_hit(c, s) for s in shifts]
        best_any = max(best_any, sum(hits) / len(hits))
        best_all = max(best_all, float(all(hits)))
    return {"consistent": best_all, "offset": best_any}


def wilson_interval(hits: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); ``(nan, nan)`` when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(per_unit: list[float], *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean over independent units (``(nan, nan)`` if none)."""
    x = np.asarray(per_unit, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def mcnemar_p(new_only: int, old_only: int) -> float:
    """One-sided exact McNemar p-value that the new model wins more paired units than the old.

    Args:
        new_only: units the new model gets right and the old one does not.
        old_only: units the old model gets right and the new one does not.

    Returns:
        ``P(X >= new_only)`` for ``X ~ Binomial(new_only + old_only, 1/2)``; 1.0 with no
        discordant unit (equal evidence never favours the newcomer).
    """
    n = new_only + old_only
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(new_only, n + 1)) / 2.0**n)


@dataclass
class ClipSync:
    """The offset search on one clip, at each expected shift."""

    clip_id: str
    frames: int
    windows: int
    shifts: list[int]
    offsets: list[int]
    """Predicted offset per expected shift (same order as ``shifts``)."""
    lse_d: list[float]
    lse_c: list[float]
    distances: dict[int, list[float]] = field(default_factory=dict)
    """Mean distance per searched offset, for each expected shift (when kept)."""

    @property
    def hits(self) -> list[bool]:
        return [is_hit(o, s) for o, s in zip(self.offsets, self.shifts, strict=True)]

    @property
    def consistent(self) -> bool:
        """Every applied shift recovered: the unit's headline hit."""
        return all(self.hits)

    def to_row(self) -> dict[str, Any]:
        """One flat row per clip (an MLflow table row)."""
        row: dict[str, Any] = {"clip_id": self.clip_id, "frames": self.frames,
                               "windows": self.windows, "shift_consistent": self.consistent}
        for s, o, d, c, h in zip(self.shifts, self.offsets, self.lse_d, self.lse_c, self.hits,
                                 strict=True):
            row[f"offset_at_shift{s}"] = o
            row[f"correct_at_shift{s}"] = h
            row[f"lse_d_at_shift{s}"] = round(d, 4)
            row[f"lse_c_at_shift{s}"] = round(c, 4)
        return row


def _embed(encoder: Any, x: np.ndarray, device: torch.device) -> Tensor:
    outs = []
    for i in range(0, len(x), EMBED_BATCH):
        chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + EMBED_BATCH])).to(device)
        outs.append(encoder(chunk).float())
    return torch.cat(outs) if outs else torch.zeros(0)


def clip_sync(
    model: Any,
    cfg: Config,
    lips: np.ndarray,
    audio: np.ndarray,
    *,
    shifts: tuple[int, ...] | list[int] = (0,),
    max_offset: int | None = None,
    clip_id: str = "",
    keep_distances: bool = False,
) -> ClipSync:
    """Search the AV offset of one clip with its audio shifted by each of ``shifts`` frames.

    Equivalent to :func:`shift_audio` then the offset search for every shift, but the lip
    windows and the audio windows are embedded once: the audio is zero-padded by the largest
    shift on both sides, and shift ``K`` reads its windows ``K`` windows back in that sequence.

    Args:
        model: an :class:`~se4lip_dist.models.SE4Lip` (``.speech``, ``.lips``), eval mode.
        cfg: its config (window, samples per frame, lip input size, ``train.max_offset``).
        lips: uint8 ``[N, h, w, 3]`` mouth crops, one per video frame.
        audio: float32 audio on the same clock (cut or zero-padded to ``N * spf``).
        shifts: expected offsets to score (0: the clip as recorded).
        max_offset: search range (default ``cfg.train.max_offset``).
        clip_id: name recorded in the result.
        keep_distances: keep the distance curve of every shift.

    Raises:
        ValueError: fewer windows than the offset search needs.
    """
    t, spf = cfg.train.window_frames, cfg.data.samples_per_frame
    m = cfg.train.max_offset if max_offset is None else max_offset
    n = len(lips)
    w = n - t + 1
    if w <= m:
        raise ValueError(f"{n} frames give {max(w, 0)} windows of {t} frames: too short for a "
                         f"+-{m} frame offset search")
    audio = np.asarray(audio, np.float32)[: n * spf]
    if len(audio) < n * spf:
        audio = np.pad(audio, (0, n * spf - len(audio)))
    pad = max((abs(s) for s in shifts), default=0)
    padded = np.pad(audio, (pad * spf, pad * spf))
    device = next(model.parameters()).device
    with torch.no_grad():
        v_seq = _embed(lambda x: model.lips(lip_input(x, cfg.model)), lip_windows(lips, t),
                       device)
        a_all = _embed(model.speech, audio_windows(padded, t, spf), device)
    out = ClipSync(clip_id=clip_id, frames=n, windows=w, shifts=list(shifts), offsets=[],
                   lse_d=[], lse_c=[])
    for s in shifts:
        # Window t of the audio delayed by s frames is padded window t - s + pad.
        a_seq = a_all[pad - s: pad - s + w]
        dists = offset_distances(a_seq, v_seq, m).cpu()
        offset, lse_d, lse_c = predict_offset(dists)
        out.offsets.append(offset)
        out.lse_d.append(lse_d)
        out.lse_c.append(lse_c)
        if keep_distances:
            out.distances[s] = [float(d) for d in dists]
    return out


__all__ = [
    "EMBED_BATCH",
    "OFFSET_TOLERANCE",
    "ClipSync",
    "audio_windows",
    "bootstrap_interval",
    "centred_audio_windows",
    "chance_offset_accuracy",
    "clip_sync",
    "constant_floor",
    "embedding_distance",
    "is_hit",
    "lip_windows",
    "mcnemar_p",
    "offset_distances",
    "predict_offset",
    "shift_audio",
    "sliding_windows",
    "wilson_interval",
    "window_lead",
]
