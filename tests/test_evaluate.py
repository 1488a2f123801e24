"""``evaluate``: offset recovery and its sign on synthetic talking mouths, plots, bad videos.

The model is planted rather than trained: its lip embedding is the mouth's dark area per frame
and its speech embedding the audio's loudness per frame, so it "knows" sync exactly where the
synthetic clips have it (mouth opening follows the loudness envelope at offset 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from se4lip_dist.config import load_config
from se4lip_dist.evaluate import evaluate_clip, evaluate_videos
from se4lip_dist.media import decode_clip
from se4lip_dist.sync import shift_audio
from se4lip_dist.synthetic import make_synthetic_clip, write_clip

T = 5
SPF = 640


class _Loudness(nn.Module):
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = wav.reshape(wav.shape[0], T, SPF)
        rms = frames.pow(2).mean(-1).sqrt()
        return rms - rms.mean(-1, keepdim=True)  # the shape over the window, not the level


class _MouthArea(nn.Module):
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
        self.speech = _Loudness()
        self.lips = _MouthArea()


@pytest.fixture(scope="module")
def cfg():
    return load_config("cpu-small", overrides=["face.backend=none", "data.crop_size=64",
                                               "model.lip_height=32", "model.lip_width=64"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    paths = [d / f"c{i}.mp4" for i in range(2)]
    for i, p in enumerate(paths):
        make_synthetic_clip(p, 3.0, seed=10 + i)
    return paths


@pytest.mark.timeout(120)
def test_recovers_known_shifts(cfg, clips, tmp_path) -> None:
    model = PlantedSync()
    for k in (-5, 0):
        r = evaluate_clip(model, cfg, clips[0], max_offset=8, shift=k)
        assert abs(r["offset"] - k) <= 1, (k, r["offset"], r["distances"])
        assert r["frames"] == 75 and len(r["distances"]) == 17
        assert r["lse_c"] > 0 and r["lse_d"] == min(r["distances"])
    out = evaluate_videos(model, cfg, [str(p) for p in clips], max_offset=8, shift=3,
                          plot_dir=tmp_path / "plots")
    assert out["offset_accuracy"] == 1.0 and out["evaluated"] == 2, out  # K = 3 on both clips
    assert "not SyncNet's" in out["note"]
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"c0.png", "c1.png"}


@pytest.mark.timeout(120)
def test_sign_on_a_truly_delayed_video(cfg, clips, tmp_path) -> None:
    """A file whose audio really comes 3 frames late gives +3; --shift -3 puts it back at 0."""
    clip = decode_clip(clips[1])
    late = tmp_path / "late.mp4"
    write_clip(late, clip.frames, shift_audio(clip.audio, 3, SPF), 25, 16000)
    model = PlantedSync()
    assert evaluate_clip(model, cfg, late, max_offset=8)["offset"] in (2, 3, 4)
    assert abs(evaluate_clip(model, cfg, late, max_offset=8, shift=-3)["offset"]) <= 1


@pytest.mark.timeout(120)
def test_bad_videos_reported_others_evaluated(cfg, clips, tmp_path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    short = tmp_path / "short.mp4"
    make_synthetic_clip(short, 0.4, seed=3)  # 6 windows < the 8-frame search
    out = evaluate_videos(PlantedSync(), cfg, [str(clips[0]), str(broken), str(short),
                                               str(tmp_path / "missing.mp4")], max_offset=8)
    by_name = {c["name"]: c for c in out["clips"]}
    assert out["evaluated"] == 1 and out["failed"] == 3
    assert "error" not in by_name["c0"]
    assert "broken.mp4" in by_name["broken"]["error"]
    assert "too short" in by_name["short"]["error"]
    assert any("missing.mp4" in c["error"] for c in out["clips"] if "error" in c)
    assert out["offset_accuracy"] == 1.0


def test_real_model_runs_on_a_clip(cfg, clips) -> None:
    """The SE4Lip model itself goes through the same path (random weights: any offset)."""
    from se4lip_dist.models import build_model

    c = cfg.override({"model.gru_layers": 1, "model.embed_dim": 16,
                      "model.lip_channels": [8, 8, 16, 16, 16]})
    torch.manual_seed(0)
    model = build_model(c.model, window_frames=c.train.window_frames)
    r = evaluate_clip(model, c, clips[0], max_offset=5)
    assert -5 <= r["offset"] <= 5 and np.isfinite(r["lse_d"]) and r["lse_c"] >= 0


def test_run_evaluate_loads_by_uri_and_overrides_faces(cfg, clips, monkeypatch) -> None:
    from se4lip_dist import registry
    from se4lip_dist.evaluate import run_evaluate

    # The registered model's config asks for InsightFace; --face-backend none must win.
    stored = cfg.override({"face.backend": "insightface", "face.insightface_root": "/nowhere"})
    seen = {}

    def fake_load(uri, tracking_uri=None):
        seen["args"] = (uri, tracking_uri)
        return PlantedSync(), stored

    monkeypatch.setattr(registry, "load_sync_model", fake_load, raising=False)
    out = run_evaluate([str(clips[0])], "models:/se4lip@champion", tracking_uri="sqlite:///x.db",
                       max_offset=8, shift=-5, face_backend="none")
    assert seen["args"] == ("models:/se4lip@champion", "sqlite:///x.db")
    assert out["offset_accuracy"] == 1.0 and out["model_uri"] == "models:/se4lip@champion"
