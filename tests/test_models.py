"""Speech and lip encoders: Table 2 shapes, any-length audio, lip input, import purity, learning."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import se4lip_dist
from se4lip_dist.config import ModelConfig, load_config, replace
from se4lip_dist.losses import sync_accuracy, sync_bce_loss
from se4lip_dist.models import (
    LipEncoder,
    SpeechEncoder,
    SpeechFrontend,
    build_model,
    count_parameters,
    lip_input,
)

PAPER = load_config("paper").model
SMALL = load_config("cpu-small").model

# Table 2 as (in, out, kernel, stride, padding); the residual blocks are 3x3, stride 1, padding 1.
TABLE2 = [
    (15, 32, 7, 1, 3), (32, 64, 5, (1, 2), 1), (64, 64, 3, 1, 1), (64, 64, 3, 1, 1),
    (64, 128, 3, 2, 1), (128, 128, 3, 1, 1), (128, 128, 3, 1, 1), (128, 256, 3, 2, 1),
    (256, 256, 3, 1, 1), (256, 512, 3, 2, 1), (512, 512, 3, 1, 1), (512, 512, 3, 2, 1),
    (512, 512, 3, (4, 1), 0), (512, 512, 1, 1, 0),
]


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else x


def test_lip_encoder_layers_are_table2() -> None:
    convs = [m for m in LipEncoder(PAPER).modules() if isinstance(m, nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs]
    want = [(i, o, _pair(k), _pair(s), _pair(p)) for i, o, k, s, p in TABLE2]
    assert got == want
    assert sum(isinstance(m, nn.BatchNorm2d) for m in LipEncoder(PAPER).modules()) == len(TABLE2)


@pytest.mark.parametrize(("cfg", "name"), [(PAPER, "paper"), (SMALL, "cpu-small")])
def test_lip_encoder_reaches_1x1_without_pooling(cfg: ModelConfig, name: str) -> None:
    torch.manual_seed(0)
    enc = LipEncoder(cfg, window_frames=5).eval()
    seen: dict[str, tuple[int, ...]] = {}
    enc.squeeze.register_forward_hook(lambda _m, _i, out: seen.update(squeeze=tuple(out.shape)))
    x = torch.rand(2, 15, cfg.lip_height, cfg.lip_width)
    with torch.no_grad():
        feats = enc.features(x)
        out = enc(x)
    assert seen["squeeze"] == (2, cfg.lip_channels[4], 1, 1)  # 1x1 before any pooling
    assert feats.shape == (2, cfg.embed_dim, 1, 1)
    assert out.shape == (2, cfg.embed_dim)
    assert (out >= 0).all()
    print(f"{name} LipEncoder parameters: {count_parameters(enc):,}")


@pytest.mark.parametrize(("h", "w"), [(16, 32), (32, 32), (64, 64), (128, 96)])
def test_lip_encoder_other_sizes(h: int, w: int) -> None:
    enc = LipEncoder(SMALL, window_frames=3).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 9, h, w))
    assert out.shape == (2, SMALL.embed_dim) and (out >= 0).all()


def test_lip_encoder_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="lips must be"):
        LipEncoder(SMALL, window_frames=5)(torch.rand(2, 9, 48, 96))


def test_stft_frontend_shape() -> None:
    fe = SpeechFrontend(PAPER, 16000).eval()
    assert fe.n_features == 257
    assert fe.num_frames(3200) == 26
    out = fe(torch.rand(3, 3200) * 2 - 1)
    assert out.shape == (3, 26, 257) and torch.isfinite(out).all()
    assert torch.isfinite(fe(torch.zeros(1, 3200))).all()  # silence hits the log floor
    with pytest.raises(ValueError, match="samples"):
        fe(torch.zeros(1, 256))


def test_mel_frontend_shape() -> None:
    fe = SpeechFrontend(replace(PAPER, frontend="mel"), 16000).eval()
    assert fe(torch.rand(2, 3200) * 2 - 1).shape == (2, 26, PAPER.n_mels)


@pytest.mark.parametrize("num_samples", [1600, 3200, 16000])
def test_speech_encoder_paper_any_length(num_samples: int) -> None:
    torch.manual_seed(0)
    enc = SpeechEncoder(PAPER, 16000).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, num_samples) * 2 - 1)
    assert out.shape == (2, 512) and (out >= 0).all()
    if num_samples == 3200:
        print(f"paper SpeechEncoder parameters: {count_parameters(enc):,}")


@pytest.mark.parametrize(
    ("frontend", "backbone"), [("stft", "gru"), ("mel", "gru"), ("stft", "cnn"), ("mel", "cnn")]
)
def test_speech_encoder_variants(frontend: str, backbone: str) -> None:
    cfg = replace(SMALL, frontend=frontend, backbone=backbone)
    enc = SpeechEncoder(cfg, 16000)
    out = enc(torch.rand(2, 3200) * 2 - 1)  # train mode: BatchNorm batch stats
    assert out.shape == (2, SMALL.embed_dim) and (out >= 0).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    enc.eval()
    with torch.no_grad():
        for num_samples in (1600, 16000):
            out = enc(torch.rand(1, num_samples) * 2 - 1)
            assert out.shape == (1, SMALL.embed_dim) and (out >= 0).all()


@pytest.mark.parametrize("cfg", [PAPER, SMALL], ids=["paper", "cpu-small"])
def test_int8_speech_encoder_stays_close_to_fp32(cfg: ModelConfig) -> None:
    from se4lip_dist.models.speech import int8_fidelity, quantize_int8

    torch.manual_seed(0)
    enc = SpeechEncoder(cfg, 16000).eval()
    q = quantize_int8(enc)
    assert ".quantized." in type(q.gru).__module__  # the GRU itself runs on int8 weights
    wav = (torch.rand(8, 3200) * 2 - 1) * 0.3
    assert int8_fidelity(enc, q, wav) > 0.999
    with torch.no_grad():
        for n in (1600, 48000):  # any length, like the float encoder
            out = q(torch.rand(2, n) * 2 - 1)
            assert out.shape == (2, cfg.embed_dim) and (out >= 0).all()
    assert enc.gru is not None and not any(".quantized." in type(m).__module__
                                           for m in enc.modules())  # the original is untouched
    # The check can fail: another encoder's embeddings are far from this one's.
    torch.manual_seed(1)
    other = quantize_int8(SpeechEncoder(cfg, 16000).eval())
    assert int8_fidelity(enc, other, wav) < 0.99


@pytest.mark.parametrize("preset", ["paper", "cpu-small"])
def test_build_model_forward(preset: str) -> None:
    cfg = load_config(preset)
    model = build_model(
        cfg.model, sample_rate=cfg.data.sample_rate, window_frames=cfg.train.window_frames
    ).eval()
    wav = torch.rand(2, cfg.data.samples_per_frame * cfg.train.window_frames) * 2 - 1
    lips = torch.rand(2, 3 * cfg.train.window_frames, cfg.model.lip_height, cfg.model.lip_width)
    with torch.no_grad():
        a, v = model(wav, lips)
    assert a.shape == v.shape == (2, cfg.model.embed_dim)


def _block(cin: int, cout: int, k: int) -> int:
    """Conv2d (k x k, with bias) + BatchNorm2d (weight, bias) parameters."""
    return cin * cout * k * k + cout + 2 * cout


def _lip_layers(m: ModelConfig, window_frames: int) -> list[tuple[int, int, int]]:
    """(in, out, kernel) of the lip CNN: Table 2 with the stage widths of ``m``."""
    c1, c2, c3, c4, c5 = m.lip_channels
    return [(3 * window_frames, c1, 7), (c1, c2, 5), (c2, c2, 3), (c2, c2, 3), (c2, c3, 3),
            (c3, c3, 3), (c3, c3, 3), (c3, c4, 3), (c4, c4, 3), (c4, c5, 3), (c5, c5, 3),
            (c5, c5, 3), (c5, c5, 3), (c5, m.embed_dim, 1)]


def _gru_speech(m: ModelConfig) -> int:
    """BatchNorm1d over the STFT bins + nn.GRU(bins, embed_dim, gru_layers)."""
    f, h = m.n_fft // 2 + 1, m.embed_dim
    return 2 * f + sum(3 * ((f if layer == 0 else h) * h + h * h + 2 * h)
                       for layer in range(m.gru_layers))


@pytest.mark.parametrize(("preset", "speech", "lips"), [
    ("paper", 12_216_322, 9_932_544),
    ("cpu-small", 248_194, 795_312),
])
def test_parameter_counts_are_the_architectures(preset: str, speech: int, lips: int) -> None:
    """Exact counts, from the layer list of the paper (Table 2, an 8-layer 512-wide GRU) and
    from the formulas: a layer added, dropped or resized changes them."""
    cfg = load_config(preset)
    model = build_model(cfg.model, window_frames=cfg.train.window_frames)
    if preset == "paper":
        assert sum(_block(i, o, k) for i, o, k, _, _ in TABLE2) == lips
    assert sum(_block(*layer) for layer in _lip_layers(cfg.model, 5)) == lips
    assert _gru_speech(cfg.model) == speech
    assert count_parameters(model.lips) == lips
    assert count_parameters(model.speech) == speech
    assert count_parameters(model) == speech + lips


def test_lip_input_centred_band_frame_major() -> None:
    crops = torch.randint(0, 256, (2, 5, 96, 96, 3), dtype=torch.uint8)
    x = lip_input(crops, SMALL)  # 48x96: rows 24..72, no resize
    assert x.shape == (2, 15, 48, 96) and x.dtype == torch.float32
    torch.testing.assert_close(x[1, 3 * 2 + 1], crops[1, 2, 24:72, :, 1].float() / 255)
    assert x.min() >= 0 and x.max() <= 1
    full = lip_input(crops, PAPER)  # 96x96: the whole crop
    torch.testing.assert_close(full[0, 3 * 4 + 2], crops[0, 4, :, :, 2].float() / 255)


def test_lip_input_resizes_when_sizes_differ() -> None:
    crops = torch.full((1, 2, 128, 128, 3), 200, dtype=torch.uint8)
    x = lip_input(crops, SMALL)  # band rows 32..96 of 128, resized 64x128 -> 48x96
    assert x.shape == (1, 6, 48, 96)
    torch.testing.assert_close(x, torch.full_like(x, 200 / 255))
    tall = lip_input(crops, replace(SMALL, lip_height=96, lip_width=48))  # column band
    assert tall.shape == (1, 6, 96, 48)
    with pytest.raises(TypeError):
        lip_input(crops.float(), SMALL)


def test_import_purity() -> None:
    root = Path(se4lip_dist.__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    code = (
        "import sys, se4lip_dist.models, se4lip_dist.losses; "
        "print(sorted(m for m in ('ray', 'mlflow', 'typer') if m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def _sync_batch(g: torch.Generator, b: int, frames: int = 5, spf: int = 640):
    """Lip brightness per frame follows the audio envelope (y=1) or another envelope (y=0)."""
    env = (torch.rand(b, frames, generator=g) < 0.5).float()
    other = (torch.rand(b, frames, generator=g) < 0.5).float()
    y = (torch.rand(b, generator=g) < 0.5).float()
    lip_env = torch.where(y[:, None] > 0, env, other)
    wav = torch.randn(b, frames * spf, generator=g) * 0.5 * env.repeat_interleave(spf, 1)
    lips = lip_env.repeat_interleave(3, 1)[:, :, None, None].expand(b, 3 * frames, 16, 32)
    lips = lips + 0.05 * torch.randn(b, 3 * frames, 16, 32, generator=g)
    return wav.clamp(-1, 1), lips.clamp(0, 1), y


def test_tiny_training_learns_sync() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads on a busy 2-core box
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(
            gru_layers=1, embed_dim=32, lip_channels=(8, 8, 16, 16, 32), lip_height=16, lip_width=32
        )
        model = build_model(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(150):
            wav, lips, y = _sync_batch(g, 32)
            loss = sync_bce_loss(*model(wav, lips), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            wav, lips, y = _sync_batch(torch.Generator().manual_seed(123), 256)
            a, v = model(wav, lips)
            val_loss = sync_bce_loss(a, v, y).item()
            acc = sync_accuracy(a, v, y).item()
    finally:
        torch.set_num_threads(threads)
    print(f"tiny sync task: held-out BCE {val_loss:.3f} (ln 2 = {math.log(2):.3f}), acc {acc:.3f}")
    assert val_loss < 0.62
    assert acc > 0.6
