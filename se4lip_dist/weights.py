"""An encoder's weight files, read without executing pickles, and the speech encoder in use.

Shared by :mod:`se4lip_dist.registry` (logging, loading) and :mod:`se4lip_dist.pyfunc_model`
(the code MLflow runs when it loads a logged model), which must not import the registry: the
registry names the pyfunc class for models pickled by earlier versions.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from se4lip_dist.config import Config
from se4lip_dist.models import SpeechEncoder


class RegistryError(RuntimeError):
    """A model that cannot be logged, registered or loaded."""


def build_speech_encoder(cfg: Config, state_dict: dict[str, torch.Tensor]) -> SpeechEncoder:
    """A speech encoder in eval mode with ``state_dict`` loaded (strict)."""
    enc = SpeechEncoder(cfg.model, cfg.data.sample_rate)
    enc.load_state_dict(state_dict)
    return enc.eval()


def load_weights(path: str | Path, source: str | None = None) -> dict[str, Any]:
    """A ``weights_only`` ``torch.load`` (tensor state_dicts, optimizer states); anything else
    (pickled code) is refused with a :class:`RegistryError` naming ``source``, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise RegistryError(f"{source or path}: refused to load {Path(path).name}: not a plain "
                            f"tensor state_dict (weights_only load failed: {reason})") from e


def load_files(weights: str | Path, config: str | Path,
               source: str | None = None) -> tuple[SpeechEncoder, Config]:
    """A speech encoder and its config from a weights file and a config YAML."""
    cfg = Config.from_dict(yaml.safe_load(Path(config).read_text()))
    return build_speech_encoder(cfg, load_weights(weights, source)), cfg


def embed_waveforms(encoder: Any, wav: Any, cfg: Config) -> np.ndarray:
    """Embed a batch of waveforms with a speech encoder (torch, no grad, CPU or its device).

    Args:
        encoder: a :class:`~se4lip_dist.models.SpeechEncoder` (or any ``[B,S] -> [B,D]`` module).
        wav: array-like ``[batch, samples]`` or ``[samples]`` float waveform at 16 kHz.
        cfg: its config (waveforms shorter than ``n_fft`` are zero-padded to it).

    Returns:
        float32 ``[batch, D]``.
    """
    if isinstance(wav, dict):  # a named-tensor pyfunc input
        if len(wav) != 1:
            raise ValueError(f"expected one waveform tensor, got inputs {sorted(wav)}")
        wav = next(iter(wav.values()))
    if hasattr(wav, "to_numpy"):  # pandas
        wav = wav.to_numpy()
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected waveforms [batch, samples], got shape {x.shape}")
    if x.shape[1] < cfg.model.n_fft:
        x = np.pad(x, ((0, 0), (0, cfg.model.n_fft - x.shape[1])))
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return encoder(torch.from_numpy(x).to(device)).float().cpu().numpy()


__all__ = ["RegistryError", "build_speech_encoder", "embed_waveforms", "load_files",
           "load_weights"]
