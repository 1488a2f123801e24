"""A planted sync model: knows sync exactly where the synthetic clips have it.

Its lip embedding is the mouth's dark area per frame and its speech embedding the audio's
loudness per frame, so on synthetic talking mouths (tests/shard_fixtures.py,
se4lip_dist.synthetic), whose mouth opening follows the loudness envelope at offset 0, the
offset search finds exactly the offset the audio was given. No training, no mocks of the
search itself.
"""

from __future__ import annotations

import torch
from torch import nn

SPF = 640


class Loudness(nn.Module):
    """Speech 'embedding': the loudness of each frame of the window, centred."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = wav.reshape(wav.shape[0], -1, SPF)
        rms = frames.pow(2).mean(-1).sqrt()
        return rms - rms.mean(-1, keepdim=True)  # the shape over the window, not the level


class MouthArea(nn.Module):
    """Lip 'embedding': the dark (open-mouth) area of each frame of the window, centred."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        gray = x.reshape(b, c // 3, 3, h, w).mean(2)
        area = (gray < 0.3).float().mean((-1, -2))
        return area - area.mean(-1, keepdim=True)


class PlantedSync(nn.Module):
    """Stands in for SE4Lip: ``.speech`` and ``.lips`` with signed, zero-mean 'embeddings'."""

    def __init__(self) -> None:
        super().__init__()
        self.speech = Loudness()
        self.lips = MouthArea()
