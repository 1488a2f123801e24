"""SE4Lip speech and lip encoders (pure torch + torchaudio).

``build_model(cfg.model)`` gives an :class:`SE4Lip` whose ``forward(wav, lips)`` returns the two
non-negative embeddings that :mod:`se4lip_dist.losses` compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from se4lip_dist.config import ModelConfig
from se4lip_dist.models.lips import ConvBlock, LipEncoder
from se4lip_dist.models.speech import AudioCNN, SpeechEncoder, SpeechFrontend


class SE4Lip(nn.Module):
    """The speech encoder and the lip encoder side by side.

    Args:
        cfg: model config.
        sample_rate: audio sample rate in Hz.
        window_frames: video frames per lip window.
    """

    def __init__(self, cfg: ModelConfig, sample_rate: int = 16000, window_frames: int = 5) -> None:
        super().__init__()
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.window_frames = window_frames
        self.speech = SpeechEncoder(cfg, sample_rate)
        self.lips = LipEncoder(cfg, window_frames)

    def forward(self, wav: Tensor, lips: Tensor) -> tuple[Tensor, Tensor]:
        """Embed a batch of speech-lip pairs.

        Args:
            wav: ``[B, S]`` float waveform in [-1, 1].
            lips: ``[B, 3 * window_frames, lip_height, lip_width]`` float in [0, 1].

        Returns:
            ``(a, v)``: speech and lip embeddings, each ``[B, embed_dim]`` and non-negative.
        """
        return self.speech(wav), self.lips(lips)


def build_model(
    cfg: ModelConfig, *, sample_rate: int = 16000, window_frames: int = 5
) -> SE4Lip:
    """Build the SE4Lip model described by ``cfg``.

    Args:
        cfg: model config.
        sample_rate: audio sample rate in Hz (``DataConfig.sample_rate``).
        window_frames: frames per lip window (``TrainConfig.window_frames``).
    """
    return SE4Lip(cfg, sample_rate=sample_rate, window_frames=window_frames)


def count_parameters(m: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``m`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def lip_input(crops_uint8: Tensor, cfg: ModelConfig) -> Tensor:
    """Turn stored mouth crops into the lip encoder's input.

    Takes the centred band with the aspect ratio of ``lip_height x lip_width`` (from a 96x96 crop
    and a 48x96 input: rows 24..72), resizes it (bilinear, antialiased) only when its size differs,
    scales to [0, 1] and stacks frames on the channel axis, frame-major (frame 0 RGB, frame 1 RGB,
    ...). Runs on the device of ``crops_uint8``.

    Args:
        crops_uint8: ``[B, T, h, w, 3]`` uint8 RGB crops.
        cfg: model config (``lip_height``, ``lip_width``).

    Returns:
        ``[B, 3 * T, lip_height, lip_width]`` float32.
    """
    if crops_uint8.dim() != 5 or crops_uint8.shape[-1] != 3:
        raise ValueError(f"crops must be [B, T, h, w, 3], got {tuple(crops_uint8.shape)}")
    if crops_uint8.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8, got {crops_uint8.dtype}")
    b, t, h, w, _ = crops_uint8.shape
    out_h, out_w = cfg.lip_height, cfg.lip_width
    band_h = round(w * out_h / out_w)
    if band_h <= h:
        top = (h - band_h) // 2
        crops = crops_uint8[:, :, top : top + band_h]
    else:
        band_w = round(h * out_w / out_h)
        left = (w - band_w) // 2
        crops = crops_uint8[:, :, :, left : left + band_w]
    x = crops.permute(0, 1, 4, 2, 3).float().div_(255.0)  # [B, T, 3, bh, bw]
    bh, bw = x.shape[-2:]
    if (bh, bw) != (out_h, out_w):
        x = F.interpolate(
            x.reshape(b * t, 3, bh, bw), size=(out_h, out_w), mode="bilinear",
            align_corners=False, antialias=True,
        ).clamp_(0.0, 1.0)
    return x.reshape(b, 3 * t, out_h, out_w)


__all__ = [
    "AudioCNN",
    "ConvBlock",
    "LipEncoder",
    "SE4Lip",
    "SpeechEncoder",
    "SpeechFrontend",
    "build_model",
    "count_parameters",
    "lip_input",
]
