"""Lip feature extractor: the CNN of the SE4Lip paper's Table 2 (Wav2Lip SyncNet face encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from se4lip_dist.config import ModelConfig


class ConvBlock(nn.Module):
    """Wav2Lip's ``Conv2d`` block: Conv2d -> BatchNorm2d -> (+ input) -> ReLU.

    Args:
        cin: input channels.
        cout: output channels.
        kernel_size: convolution kernel.
        stride: convolution stride.
        padding: convolution padding.
        residual: add the input before the ReLU (needs ``cin == cout`` and a shape-preserving conv).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual and cin != cout:
            raise ValueError(f"a residual block needs cin == cout, got {cin} -> {cout}")
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding)
        self.bn = nn.BatchNorm2d(cout)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        if self.residual:
            out = out + x
        return F.relu(out)


def _res(c: int) -> ConvBlock:
    return ConvBlock(c, c, 3, 1, 1, residual=True)


class LipEncoder(nn.Module):
    """Table 2's lip CNN: a stack of ``window_frames`` RGB frames -> a non-negative embedding.

    Layer list at ``lip_channels=(32, 64, 128, 256, 512)`` and ``embed_dim=512`` is exactly Table 2.
    Other widths scale the stages (every 512 after the 4th stage becomes ``lip_channels[4]``); the
    last 1x1 conv maps to ``embed_dim`` and, like Wav2Lip, ends in ReLU so cosines lie in [0, 1].

    At 96x96 and 48x96 the map before the 1x1 conv is already 1x1. Smaller inputs are zero-padded
    to 3x3 before the (4,1)-stride conv, and any map still larger than 1x1 is average-pooled.

    Args:
        cfg: model config (``lip_channels``, ``embed_dim``).
        window_frames: frames stacked on the channel axis (input channels ``3 * window_frames``).
    """

    def __init__(self, cfg: ModelConfig, window_frames: int = 5) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = cfg.lip_channels
        self.window_frames = window_frames
        self.in_channels = 3 * window_frames
        self.embed_dim = cfg.embed_dim
        self.body = nn.Sequential(
            ConvBlock(self.in_channels, c1, 7, 1, 3),
            ConvBlock(c1, c2, 5, (1, 2), 1),
            _res(c2),
            _res(c2),
            ConvBlock(c2, c3, 3, 2, 1),
            _res(c3),
            _res(c3),
            ConvBlock(c3, c4, 3, 2, 1),
            _res(c4),
            ConvBlock(c4, c5, 3, 2, 1),
            _res(c5),
            ConvBlock(c5, c5, 3, 2, 1),
        )
        self.squeeze = ConvBlock(c5, c5, 3, (4, 1), 0)
        self.head = ConvBlock(c5, cfg.embed_dim, 1, 1, 0)

    def features(self, lips: Tensor) -> Tensor:
        """Pre-flatten feature map ``[B, embed_dim, 1, 1]`` (non-negative)."""
        if lips.dim() != 4 or lips.shape[1] != self.in_channels:
            raise ValueError(
                f"lips must be [B, {self.in_channels}, H, W], got {tuple(lips.shape)}"
            )
        x = self.body(lips)
        h, w = x.shape[-2:]
        if h < 3 or w < 3:
            # Inputs under ~35 px leave less than the 3x3 the (4,1)-stride conv needs.
            x = F.pad(x, (0, max(0, 3 - w), 0, max(0, 3 - h)))
        x = self.squeeze(x)
        if x.shape[-2:] != (1, 1):
            x = F.adaptive_avg_pool2d(x, 1)
        return self.head(x)

    def forward(self, lips: Tensor) -> Tensor:
        """Embed a lip window.

        Args:
            lips: ``[B, 3 * window_frames, H, W]`` float in [0, 1], frame-major channels.

        Returns:
            ``[B, embed_dim]`` non-negative embeddings.
        """
        return torch.flatten(self.features(lips), 1)


__all__ = ["ConvBlock", "LipEncoder"]
