"""Speech feature extractor: STFT (or mel) front end, then a GRU (the paper) or conv backbone."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from torch.ao.quantization import quantize_dynamic

from se4lip_dist.config import ModelConfig
from se4lip_dist.models.lips import ConvBlock

LOG_FLOOR = 1e-5
"""Magnitude floor before the log (Wav2Lip's ``max(1e-5, S)``, i.e. -100 dB)."""


class SpeechFrontend(nn.Module):
    """Waveform -> normalised log-magnitude spectrogram frames.

    ``stft``: ``|STFT|`` with ``n_fft // 2 + 1`` linear bins (the paper). ``mel``: magnitude mel
    with ``n_mels`` bands. Both use ``center=True`` (``S // hop_length + 1`` frames), then
    ``log(max(mag, 1e-5))``.

    Normalisation: ``BatchNorm1d`` over the frequency bins (PANNs' ``bn0``). It standardises every
    bin with statistics learnt over the training set, so unlike a per-utterance or per-frame norm it
    keeps absolute loudness (silence vs. speech, which drives mouth opening) and gives the same
    features for a frame whatever the length of the clip at eval time.

    Args:
        cfg: model config (``frontend``, ``n_fft``, ``win_length``, ``hop_length``, ``n_mels``).
        sample_rate: audio sample rate in Hz (used by the mel filterbank).
    """

    def __init__(self, cfg: ModelConfig, sample_rate: int) -> None:
        super().__init__()
        self.kind = cfg.frontend
        self.n_fft = cfg.n_fft
        self.hop_length = cfg.hop_length
        self.sample_rate = sample_rate
        self.spec: nn.Module
        if cfg.frontend == "stft":
            self.spec = torchaudio.transforms.Spectrogram(
                n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
                power=1.0, center=True,
            )
            self.n_features = cfg.n_fft // 2 + 1
        else:
            self.spec = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
                hop_length=cfg.hop_length, n_mels=cfg.n_mels, power=1.0, center=True,
            )
            self.n_features = cfg.n_mels
        self.norm = nn.BatchNorm1d(self.n_features)

    def num_frames(self, num_samples: int) -> int:
        """Spectrogram frames for ``num_samples`` samples (``center=True``)."""
        return num_samples // self.hop_length + 1

    def forward(self, wav: Tensor) -> Tensor:
        """Compute features.

        Args:
            wav: ``[B, S]`` float waveform in [-1, 1], ``S > n_fft // 2``.

        Returns:
            ``[B, T, F]`` with ``T = S // hop_length + 1``.
        """
        if wav.dim() != 2:
            raise ValueError(f"wav must be [B, S], got {tuple(wav.shape)}")
        if wav.shape[1] <= self.n_fft // 2:
            raise ValueError(
                f"wav needs more than n_fft // 2 = {self.n_fft // 2} samples, got {wav.shape[1]}"
            )
        # The STFT and log stay in float32 even under bf16 autocast.
        with torch.autocast(device_type=wav.device.type, enabled=False):
            mag = self.spec(wav.float())  # [B, F, T]
            feats = self.norm(torch.log(mag.clamp_min(LOG_FLOOR)))
        return feats.transpose(1, 2).contiguous()


class AudioCNN(nn.Module):
    """Wav2Lip-style conv audio encoder over a ``[B, 1, F, T]`` spectrogram.

    Each stage is a strided ``ConvBlock`` and two residual blocks; strides follow Wav2Lip's audio
    encoder (1, (3,1), 3, (3,2), then 2). A 3x3 conv to ``embed_dim``, global average pooling (so
    any F and T work) and a 1x1 ``ConvBlock`` (ending in ReLU) give the embedding.

    Args:
        channels: stage widths (``ModelConfig.cnn_channels``).
        embed_dim: output size.
    """

    STRIDES: tuple[int | tuple[int, int], ...] = (1, (3, 1), 3, (3, 2))

    def __init__(self, channels: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i, c in enumerate(channels):
            stride = self.STRIDES[i] if i < len(self.STRIDES) else 2
            layers += [
                ConvBlock(cin, c, 3, stride, 1),
                ConvBlock(c, c, 3, 1, 1, residual=True),
                ConvBlock(c, c, 3, 1, 1, residual=True),
            ]
            cin = c
        layers.append(ConvBlock(cin, embed_dim, 3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.head = ConvBlock(embed_dim, embed_dim, 1, 1, 0)

    def forward(self, feats: Tensor) -> Tensor:
        """``[B, T, F]`` features -> ``[B, embed_dim]`` non-negative embeddings."""
        x = self.body(feats.transpose(1, 2).unsqueeze(1))
        return torch.flatten(self.head(F.adaptive_avg_pool2d(x, 1)), 1)


class SpeechEncoder(nn.Module):
    """Speech window -> non-negative embedding.

    ``gru``: ``nn.GRU(F, embed_dim, gru_layers)``; the embedding is the last time step of the last
    layer (the paper), passed through ReLU so that, as in Wav2Lip's SyncNet, both embeddings are
    non-negative and their cosine lies in [0, 1] for the BCE of Eq. 6. ``cnn``: :class:`AudioCNN`.
    Any waveform length above ``n_fft // 2`` samples is accepted.

    Args:
        cfg: model config.
        sample_rate: audio sample rate in Hz.
    """

    def __init__(self, cfg: ModelConfig, sample_rate: int = 16000) -> None:
        super().__init__()
        self.frontend = SpeechFrontend(cfg, sample_rate)
        self.backbone_kind = cfg.backbone
        self.embed_dim = cfg.embed_dim
        self.gru: nn.GRU | None = None
        self.cnn: AudioCNN | None = None
        if cfg.backbone == "gru":
            self.gru = nn.GRU(
                self.frontend.n_features, cfg.embed_dim, num_layers=cfg.gru_layers,
                batch_first=True,
            )
        else:
            self.cnn = AudioCNN(cfg.cnn_channels, cfg.embed_dim)

    def forward(self, wav: Tensor) -> Tensor:
        """Embed speech.

        Args:
            wav: ``[B, S]`` float waveform in [-1, 1].

        Returns:
            ``[B, embed_dim]`` non-negative embeddings.
        """
        feats = self.frontend(wav)
        if self.gru is not None:
            out, _ = self.gru(feats)
            return F.relu(out[:, -1])
        assert self.cnn is not None
        return self.cnn(feats)


def quantize_int8(encoder: SpeechEncoder) -> nn.Module:
    """A CPU copy of ``encoder`` with int8 dynamically quantized GRU and linear weights.

    Activations stay float (quantized on the fly per batch), so any waveform length still works.
    Faster on CPU for a wide GRU, with embeddings close to float32 (``benchmarks/`` has the
    numbers); :func:`int8_fidelity` measures the drift for a given encoder.
    """
    model = copy.deepcopy(encoder).cpu().eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not in this stack); the
        # dynamic GRU/Linear kernels (fbgemm/qnnpack) are still the ones torch ships.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.GRU, nn.Linear}, dtype=torch.qint8)


def min_cosine(a: Tensor, b: Tensor) -> float:
    """Smallest row-wise cosine similarity of two ``[N, D]`` embedding sets.

    Two all-zero ReLU embeddings count as identical (``cosine_similarity`` would call them 0).
    """
    both_zero = (a.abs().sum(1) == 0) & (b.abs().sum(1) == 0)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).min())


def int8_fidelity(encoder: SpeechEncoder, quantized: nn.Module, wav: Tensor) -> float:
    """Smallest cosine similarity between float32 and int8 embeddings of ``wav`` ``[B, S]``."""
    with torch.no_grad():
        return min_cosine(encoder.cpu().eval()(wav), quantized(wav))


__all__ = ["AudioCNN", "SpeechEncoder", "SpeechFrontend", "int8_fidelity", "min_cosine",
           "quantize_int8"]
