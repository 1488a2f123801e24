"""Training-time augmentations for voices and faces never seen (torch ops, on the worker's device).

Audio (``wav`` float ``[B, S]``): additive noise at a random SNR, reverberation by a synthetic
room response, and speed perturbation (resampling, which moves pitch and vocal-tract length
together; the result is cut or padded back around the window's centre so the window still
belongs to the same frames). Lips (``lips`` uint8 ``[B, T, h, w, 3]``): brightness / contrast /
saturation jitter, a small shift and zoom, and blur; one draw per window, applied alike to its T
frames so the motion between frames is kept.

Each augmentation hits a pair with its own probability (:class:`~se4lip_dist.config.AugmentConfig`,
all 0 by default). Pure torch: no Ray, no MLflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from se4lip_dist.config import AugmentConfig


def _uniform(lo: float, hi: float, n: int, g: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device="cpu").to(device)


def _mask(p: float, n: int, g: torch.Generator, device: torch.device) -> Tensor:
    return (torch.rand(n, generator=g, device="cpu") < p).to(device)


def add_noise(wav: Tensor, snr_db: Tensor, g: torch.Generator) -> Tensor:
    """``wav`` plus white or brown noise (half each) at ``snr_db`` per row."""
    b, s = wav.shape
    white = torch.randn(b, s, generator=g, device="cpu").to(wav.device)
    brown = torch.cumsum(white, dim=1)
    brown = brown - brown.mean(dim=1, keepdim=True)
    use_brown = (torch.rand(b, 1, generator=g) < 0.5).to(wav.device)
    noise = torch.where(use_brown, brown, white)
    p_sig = wav.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-8)
    p_noise = noise.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12)
    scale = torch.sqrt(p_sig / (p_noise * 10 ** (snr_db[:, None] / 10)))
    return wav + scale * noise


def reverberate(wav: Tensor, rt60_s: Tensor, sample_rate: int, g: torch.Generator) -> Tensor:
    """Convolve each row with exponentially decaying noise reaching -60 dB at ``rt60_s``.

    The output keeps the input's length and loudness; the response starts with its direct path,
    so the window keeps its timing.
    """
    b, s = wav.shape
    n = int(sample_rate * float(rt60_s.max()))
    t = torch.arange(n, device=wav.device) / sample_rate
    decay = torch.exp(-6.9078 * t[None, :] / rt60_s[:, None])  # ln(1000): -60 dB at rt60
    ir = torch.randn(b, n, generator=g, device="cpu").to(wav.device) * decay
    ir[:, 0] = 1.0
    ir = ir / ir.norm(dim=1, keepdim=True)
    size = s + n - 1
    nfft = 1 << (size - 1).bit_length()
    out = torch.fft.irfft(torch.fft.rfft(wav, nfft) * torch.fft.rfft(ir, nfft), nfft)[:, :s]
    gain = wav.norm(dim=1, keepdim=True) / out.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return out * gain


def change_speed(wav: Tensor, factor: Tensor) -> Tensor:
    """Resample each row by ``factor`` (> 1: faster, higher) and cut or zero-pad it back to
    the input length around its centre."""
    b, s = wav.shape
    out = torch.empty_like(wav)
    for i in range(b):
        n = max(2, round(s / float(factor[i])))
        y = F.interpolate(wav[i][None, None], size=n, mode="linear", align_corners=False)[0, 0]
        if n >= s:
            start = (n - s) // 2
            out[i] = y[start:start + s]
        else:
            pad = s - n
            out[i] = F.pad(y, (pad // 2, pad - pad // 2))
    return out


def jitter_color(lips: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation of float ``[B, T, 3, h, w]`` crops in [0, 1]."""
    b = lips.shape[0]
    dev = lips.device
    bright = _uniform(1 - strength, 1 + strength, b, g, dev).view(b, 1, 1, 1, 1)
    contrast = _uniform(1 - strength, 1 + strength, b, g, dev).view(b, 1, 1, 1, 1)
    sat = _uniform(1 - strength, 1 + strength, b, g, dev).view(b, 1, 1, 1, 1)
    x = lips * bright
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=2, keepdim=True)
    x = (x - gray) * sat + gray
    return x.clamp(0.0, 1.0)


def shift_and_zoom(lips: Tensor, max_shift: float, max_scale: float,
                   g: torch.Generator) -> Tensor:
    """Shift by up to ``max_shift`` of the side and zoom by up to ``max_scale`` (same for every
    frame of a window; borders replicate)."""
    b, t, c, h, w = lips.shape
    dev = lips.device
    scale = 1 + _uniform(-max_scale, max_scale, b, g, dev)
    tx = _uniform(-2 * max_shift, 2 * max_shift, b, g, dev)  # grid units span 2 per side
    ty = _uniform(-2 * max_shift, 2 * max_shift, b, g, dev)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=lips.dtype)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.repeat_interleave(t, dim=0), [b * t, c, h, w],
                         align_corners=False)
    out = F.grid_sample(lips.reshape(b * t, c, h, w), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.reshape(b, t, c, h, w)


def blur(lips: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with one ``sigma`` (pixels) per window."""
    b, t, c, h, w = lips.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    x = torch.arange(-radius, radius + 1, device=lips.device, dtype=lips.dtype)
    k = torch.exp(-(x[None, :] ** 2) / (2 * sigma[:, None].to(lips.dtype) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # [B, K]
    flat = lips.reshape(b, t * c, h, w)
    pad = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    # Separable, one kernel per window: group the B windows as conv groups.
    kh = k.repeat_interleave(t * c, dim=0)[:, None, None, :]
    kv = k.repeat_interleave(t * c, dim=0)[:, None, :, None]
    y = F.conv2d(pad.reshape(1, b * t * c, h + 2 * radius, w + 2 * radius), kh,
                 groups=b * t * c)
    y = F.conv2d(y, kv, groups=b * t * c)
    return y.reshape(b, t, c, h, w)


def augment_batch(wav: Tensor, lips: Tensor, cfg: AugmentConfig, sample_rate: int,
                  g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Apply the enabled augmentations to a training batch.

    Args:
        wav: float ``[B, S]`` waveforms.
        lips: uint8 ``[B, T, h, w, 3]`` crops.
        cfg: probabilities and ranges.
        sample_rate: audio sample rate.
        g: a CPU generator (seeded per worker for reproducible runs).

    Returns:
        ``(wav, lips)``: float waveforms and uint8 crops of the same shapes.
    """
    b, dev = wav.shape[0], wav.device
    wav = wav.float()
    if cfg.speed_p > 0:
        m = _mask(cfg.speed_p, b, g, dev)
        if m.any():
            factor = _uniform(*cfg.speed_range, b, g, dev)
            wav = torch.where(m[:, None], change_speed(wav, factor), wav)
    if cfg.reverb_p > 0:
        m = _mask(cfg.reverb_p, b, g, dev)
        if m.any():
            rt60 = _uniform(*cfg.reverb_rt60_s, b, g, dev)
            wav = torch.where(m[:, None], reverberate(wav, rt60, sample_rate, g), wav)
    if cfg.noise_p > 0:
        m = _mask(cfg.noise_p, b, g, dev)
        if m.any():
            snr = _uniform(*cfg.noise_snr_db, b, g, dev)
            wav = torch.where(m[:, None], add_noise(wav, snr, g), wav)
    if not (cfg.color_p or cfg.affine_p or cfg.blur_p):
        return wav, lips
    x = lips.permute(0, 1, 4, 2, 3).float() / 255.0  # [B, T, 3, h, w]
    if cfg.color_p > 0:
        m = _mask(cfg.color_p, b, g, dev).view(b, 1, 1, 1, 1)
        x = torch.where(m, jitter_color(x, cfg.color_strength, g), x)
    if cfg.affine_p > 0:
        m = _mask(cfg.affine_p, b, g, dev).view(b, 1, 1, 1, 1)
        x = torch.where(m, shift_and_zoom(x, cfg.affine_shift, cfg.affine_scale, g), x)
    if cfg.blur_p > 0:
        m = _mask(cfg.blur_p, b, g, dev).view(b, 1, 1, 1, 1)
        x = torch.where(m, blur(x, _uniform(0.5, 1.5, b, g, dev)), x)
    out = (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
    return wav, out.contiguous()


__all__ = [
    "add_noise",
    "augment_batch",
    "blur",
    "change_speed",
    "jitter_color",
    "reverberate",
    "shift_and_zoom",
]
