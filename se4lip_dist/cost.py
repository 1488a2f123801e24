"""Extraction cost of a speech encoder, and the accuracy-versus-cost Pareto front.

Two costs, both per second of 16 kHz audio, the unit a renderer pays per subject:

- ``cost/gflop_per_audio_s``: a function of the model config alone (:func:`gflop_per_audio_s`):
  the multiply-adds of the learned layers (GRU gates, convolutions, mel filterbank), counted
  as 2 FLOPs each like ``torch.utils.flop_counter``, plus the FFTs of the STFT front end
  (``5 N log2 N`` per frame). A test checks it against ``FlopCounterMode`` on the real modules.
- ``cost/rtf``: the measured real-time factor (seconds of compute per second of audio) of the
  audio encoder on the device it trains on (:func:`measure_rtf`); it depends on the machine.

Pure torch: imported by ``train`` (every epoch reports the costs) and the registry gate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from se4lip_dist.config import Config, ModelConfig
from se4lip_dist.models.speech import AudioCNN

GFLOP = "cost/gflop_per_audio_s"
RTF = "cost/rtf"
COSTS = (GFLOP, RTF)
"""Cost metrics every training epoch reports (lower is cheaper)."""
RTF_SECONDS = 4.0
"""Audio a RTF measurement embeds (one batch), after one untimed warm-up pass."""


def _conv_out(n: int, stride: int) -> int:
    return (n + 2 * 1 - 3) // stride + 1  # 3x3 kernel, padding 1


def _frames(m: ModelConfig, samples: int) -> int:
    return samples // m.hop_length + 1  # center=True


def learned_flops(m: ModelConfig, samples: int) -> int:
    """FLOPs of the learned layers (and the mel matmul) for one ``samples``-long waveform."""
    t = _frames(m, samples)
    feats = m.n_fft // 2 + 1
    flops = 0
    if m.frontend == "mel":
        flops += 2 * t * feats * m.n_mels
        feats = m.n_mels
    if m.backbone == "gru":
        h, cin = m.embed_dim, feats
        for _ in range(m.gru_layers):
            flops += 2 * t * 3 * h * (cin + h)  # input and hidden projections of 3 gates
            cin = h
        return flops
    height, width, cin = feats, t, 1
    for i, c in enumerate(m.cnn_channels):
        s = AudioCNN.STRIDES[i] if i < len(AudioCNN.STRIDES) else 2
        sh, sw = (s, s) if isinstance(s, int) else s
        height, width = _conv_out(height, sh), _conv_out(width, sw)
        flops += 2 * 9 * height * width * (cin * c + 2 * c * c)  # strided block + 2 residual
        cin = c
    flops += 2 * 9 * height * width * cin * m.embed_dim
    return flops + 2 * m.embed_dim * m.embed_dim  # 1x1 head on the pooled vector


def fft_flops(m: ModelConfig, samples: int) -> float:
    """The STFT's FFTs (``5 N log2 N`` per frame, the usual radix-2 count)."""
    return _frames(m, samples) * 5 * m.n_fft * math.log2(m.n_fft)


def gflop_per_audio_s(cfg: Config) -> float:
    """GFLOP the speech encoder of ``cfg`` spends per second of audio (one 1 s window)."""
    sr = cfg.data.sample_rate
    return (learned_flops(cfg.model, sr) + fft_flops(cfg.model, sr)) / 1e9


def measure_rtf(speech: nn.Module, sample_rate: int, device: Any,
                seconds: float = RTF_SECONDS) -> float:
    """Real-time factor of ``speech`` on ``device``: wall seconds per second of audio.

    One ``seconds``-long waveform (the extractor's chunking embeds long windows), one warm-up
    pass, then the best of three timed passes (the least disturbed by other work).
    """
    # Its own generator: timing must not advance the training's global RNG (rank 0 only).
    gen = torch.Generator(device=device or "cpu").manual_seed(0)
    wav = torch.randn(1, int(seconds * sample_rate), device=device, generator=gen) * 0.1
    was_training = speech.training
    speech.eval()
    best = math.inf
    with torch.no_grad():
        for i in range(4):
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            speech(wav)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = min(best, time.perf_counter() - t0)
    speech.train(was_training)
    return best / seconds


def encoder_costs(cfg: Config, speech: nn.Module, device: Any) -> dict[str, float]:
    """Both costs of the speech encoder ``speech`` built from ``cfg`` (``cost/*`` metrics)."""
    return {GFLOP: gflop_per_audio_s(cfg), RTF: measure_rtf(speech, cfg.data.sample_rate, device)}


def pareto_front(rows: Sequence[dict[str, Any]], metric: str, cost: str,
                 mode: str = "max") -> list[dict[str, Any]]:
    """The rows no other row dominates over (``metric`` by ``mode``, ``cost`` min).

    A row dominates another when it is at least as good on both and better on one. Rows
    lacking either value are left out. Returned cheapest first.
    """
    sign = 1.0 if mode == "max" else -1.0
    ok = [r for r in rows if _finite(r.get(metric)) and _finite(r.get(cost))]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ga, gb = sign * a[metric], sign * b[metric]
        return ga >= gb and a[cost] <= b[cost] and (ga > gb or a[cost] < b[cost])

    front = [r for r in ok if not any(dominates(o, r) for o in ok)]
    return sorted(front, key=lambda r: (r[cost], -sign * r[metric]))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


__all__ = ["COSTS", "GFLOP", "RTF", "encoder_costs", "fft_flops", "gflop_per_audio_s",
           "learned_flops", "measure_rtf", "pareto_front"]
