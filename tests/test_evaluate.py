"""``evaluate``: offset recovery and its sign on synthetic talking mouths, plots, bad videos.

The model is planted rather than trained: its lip embedding is the mouth's dark area per frame
and its speech embedding the audio's loudness per frame, so it "knows" sync exactly where the
synthetic clips have it (mouth opening follows the loudness envelope at offset 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planted_sync import PlantedSync

from se4lip_dist import evaluate as evaluate_mod
from se4lip_dist.config import load_config
from se4lip_dist.evaluate import evaluate_clip, evaluate_videos
from se4lip_dist.media import decode_clip
from se4lip_dist.sync import shift_audio, wilson_interval
from se4lip_dist.synthetic import make_synthetic_clip, write_clip

SPF = 640


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
    for k in (-5, 0, 3):
        r = evaluate_clip(model, cfg, clips[0], max_offset=8, shift=k)
        assert r["offset"] == k, (k, r["offset"], r["distances"])  # exact on synthetic clips
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
    assert evaluate_clip(model, cfg, late, max_offset=8)["offset"] == 3
    assert evaluate_clip(model, cfg, late, max_offset=8, shift=-3)["offset"] == 0


@pytest.fixture(scope="module")
def late_clip(clips, tmp_path_factory):
    """clips[1] with its audio really 3 frames late: found at +3 whatever the shift applied."""
    clip = decode_clip(clips[1])
    late = tmp_path_factory.mktemp("late") / "late.mp4"
    write_clip(late, clip.frames, shift_audio(clip.audio, 3, SPF), 25, 16000)
    return late


@pytest.mark.timeout(180)
def test_multi_shift_counts_consistent_clips(cfg, clips, late_clip, monkeypatch) -> None:
    """--shift -3 --shift 0 --shift 3: one search per clip; a clip counts once, when it
    recovers every shift, and the interval is over clips, not (clip, shift) trials."""
    calls = []
    real = evaluate_mod.clip_sync

    def counting(*args, **kwargs):
        calls.append(tuple(kwargs["shifts"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "clip_sync", counting)
    videos = [str(clips[0]), str(clips[1]), str(late_clip)]
    out = evaluate_videos(PlantedSync(), cfg, videos, max_offset=8, shift=[-3, 0, 3])
    assert calls == [(-3, 0, 3)] * 3  # once per clip, all shifts in that call
    by_name = {c["name"]: c for c in out["clips"]}
    for name in ("c0", "c1"):
        assert by_name[name]["offsets"] == [-3, 0, 3] and by_name[name]["shift_consistent"]
    late = by_name["late"]
    # The late clip reads 3 frames more at every shift: each shift missed, not consistent.
    assert late["offsets"] == [0, 3, 6] and late["correct"] == [False] * 3
    assert not late["shift_consistent"]
    assert (late["shift"], late["offset"]) == (0, 3)  # reported at the unshifted audio
    assert (out["consistent"], out["evaluated"], out["failed"]) == (2, 3, 0)
    assert out["shift_acc"] == pytest.approx(2 / 3)
    lo, hi = wilson_interval(2, 3)
    assert (out["shift_acc_ci_low"], out["shift_acc_ci_high"]) == (lo, hi)
    assert out["shift_acc_ci_low"] < wilson_interval(6, 9)[0]  # 3 clips, not 9 trials: wider
    assert [(p["shift"], p["hits"]) for p in out["per_shift"]] == [(-3, 2), (0, 2), (3, 2)]
    assert (out["hits"], out["trials"]) == (6, 9)
    assert out["offset_accuracy"] == pytest.approx(6 / 9)
    assert out["constant_floor"] == {"consistent": 0.0, "offset": pytest.approx(1 / 3)}
    assert out["shifts"] == [-3, 0, 3] and out["shift"] is None


@pytest.mark.timeout(120)
def test_single_shift_keeps_the_old_keys(cfg, clips, late_clip) -> None:
    out = evaluate_videos(PlantedSync(), cfg, [str(clips[0]), str(late_clip)], max_offset=8,
                          shift=3)
    assert (out["offset_accuracy"], out["hits"], out["evaluated"], out["shift"]) == \
        (0.5, 1, 2, 3)
    assert [c["offset"] for c in out["clips"]] == [3, 6]
    # One shift: consistent means that shift's hit, so the two headlines agree.
    assert (out["shift_acc"], out["consistent"], out["trials"]) == (0.5, 1, 2)
    assert out["shift_acc_ci_low"] == wilson_interval(1, 2)[0]


def test_cli_repeats_shift(cfg, clips, late_clip, monkeypatch) -> None:
    """The evaluate command passes every --shift (negative ones too) and prints the clips
    recovering all of them with their interval."""
    import json

    from typer.testing import CliRunner

    from se4lip_dist.cli import app

    seen = []

    def fake_run(videos, model_uri, *, shift, max_offset, **_kw):
        seen.append(shift)
        return evaluate_videos(PlantedSync(), cfg, videos, max_offset=max_offset, shift=shift)

    monkeypatch.setattr(evaluate_mod, "run_evaluate", fake_run)
    args = ["evaluate", str(clips[0]), str(late_clip), "--max-offset", "8"]
    res = CliRunner().invoke(app, [*args, "--shift", "-3", "--shift", "0", "--shift", "3"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "shift-consistent clips" in res.output and "1/2" in res.output
    assert "offset @-3" in res.output and "at 3: 0.50" in res.output
    res = CliRunner().invoke(app, [*args, "--shift", "-3", "--shift", "3", "--json"])
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert (payload["shifts"], payload["consistent"], payload["evaluated"]) == ([-3, 3], 1, 2)
    res = CliRunner().invoke(app, [*args, "--json"])  # no --shift: 0, as before
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert (payload["shift"], payload["hits"], payload["offset_accuracy"]) == (0, 1, 0.5)
    assert seen == [[-3, 0, 3], [-3, 3], [0]]


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
    """The SE4Lip model itself goes through the same path; what it reports is its curve's."""
    from se4lip_dist.models import build_model

    c = cfg.override({"model.gru_layers": 1, "model.embed_dim": 16,
                      "model.lip_channels": [8, 8, 16, 16, 16]})
    torch.manual_seed(0)
    model = build_model(c.model, window_frames=c.train.window_frames)
    r = evaluate_clip(model, c, clips[0], max_offset=5)
    d = np.asarray(r["distances"])
    assert d.shape == (11,) and np.isfinite(d).all() and (d >= 0).all()
    assert (d <= np.sqrt(2) + 1e-6).all()  # L2 of normalised embeddings
    # Offset, LSE-D and LSE-C are read off that curve (index i is shift i - 5; lower median).
    assert r["offset"] == int(np.argmin(d)) - 5
    assert r["lse_d"] == pytest.approx(d.min())
    assert r["lse_c"] == pytest.approx(np.sort(d)[5] - d.min())
    assert r == evaluate_clip(model, c, clips[0], max_offset=5)  # deterministic


@pytest.mark.timeout(180)
def test_run_evaluate_loads_by_uri_and_overrides_faces(cfg, clips, tmp_path,
                                                       monkeypatch) -> None:
    """A real sqlite registry: the alias resolves, and --face-backend none beats the model's
    stored InsightFace settings (the training machine's detector root)."""
    from mlflow import MlflowClient
    from shard_fixtures import register_random_model

    from se4lip_dist.evaluate import EvaluateError, run_evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = cfg.override({"model.gru_layers": 1, "model.embed_dim": 16,
                          "model.lip_channels": [8, 8, 16, 16, 16]})
    stored = small.override({"face.backend": "insightface", "face.insightface_root": "/nowhere"})
    version = register_random_model(uri, stored, "se4lip-eval").rsplit("/", 1)[1]
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        "se4lip-eval", "champion", version)
    monkeypatch.delenv("SE4LIP_INSIGHTFACE_ROOT", raising=False)
    out = run_evaluate([str(clips[0])], "models:/se4lip-eval@champion", tracking_uri=uri,
                       max_offset=5, face_backend="none")
    assert out["model_uri"] == "models:/se4lip-eval@champion"
    assert (out["evaluated"], out["failed"]) == (1, 0), out["clips"]
    (clip,) = out["clips"]
    assert clip["frames"] == 75 and len(clip["distances"]) == 11
    # The same registered weights, loaded by hand, give the same curve.
    from se4lip_dist.evaluate import load_sync_model

    model, loaded_cfg = load_sync_model(f"models:/se4lip-eval/{version}", uri)
    direct = evaluate_clip(model, loaded_cfg.override({"face.backend": "none"}), clips[0],
                           max_offset=5)
    np.testing.assert_allclose(clip["distances"], direct["distances"], rtol=1e-6)
    # Without the override the stored detector root is used, and named when it is missing.
    with pytest.raises(EvaluateError, match="/nowhere"):
        run_evaluate([str(clips[0])], "models:/se4lip-eval@champion", tracking_uri=uri)
    monkeypatch.setenv("SE4LIP_INSIGHTFACE_ROOT", str(tmp_path / "env-root"))
    with pytest.raises(EvaluateError, match="env-root"):  # this machine's root wins
        run_evaluate([str(clips[0])], "models:/se4lip-eval@champion", tracking_uri=uri)
