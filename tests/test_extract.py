"""``extract``: per-frame features, centred windows, the resumable Ray job, bad inputs, specs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import register_random_model

from se4lip_dist.config import load_config
from se4lip_dist.extract import (
    FRAME_FILE,
    PARQUET_FILE,
    SUCCESS_FILE,
    WINDOW_FILE,
    expand_inputs,
    frame_windows,
    output_names,
    run_extract,
)
from se4lip_dist.media import count_output_frames, decode_audio, probe
from se4lip_dist.sync import centred_audio_windows
from se4lip_dist.synthetic import make_synthetic_clip, speech_like_audio, write_clip

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.gru_layers=1", "model.embed_dim=16"]


# ---------------------------------------------------------------- pure helpers


def test_centred_windows_match_hand_built_ones() -> None:
    spf, t = 640, 5
    audio = np.arange(10 * spf, dtype=np.float32) + 1.0
    win = centred_audio_windows(audio, 10, t, spf)
    assert win.shape == (10, t * spf)
    padded = np.concatenate([np.zeros(2 * spf), audio, np.zeros(2 * spf)]).astype(np.float32)
    for i in range(10):
        # Frame i's window spans frames i-2 .. i+2 (zeros beyond the ends).
        np.testing.assert_array_equal(win[i], padded[i * spf:(i + 5) * spf])
    even = centred_audio_windows(audio, 10, 4, spf)
    # Even windows hold whole frames, as training windows do: frames i-1 .. i+2 (they used to
    # start half a frame earlier, so no training window matched them).
    np.testing.assert_array_equal(even[3], audio[2 * spf:6 * spf])


def test_frame_windows_layout() -> None:
    feats = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    w = frame_windows(feats)
    assert w.shape == (20, 16, 3)
    np.testing.assert_array_equal(w[:, 8], feats)
    np.testing.assert_array_equal(w[10], feats[2:18])
    np.testing.assert_array_equal(w[0, :9], np.repeat(feats[:1], 9, axis=0))
    np.testing.assert_array_equal(w[19, 8:], np.repeat(feats[19:], 8, axis=0))


def test_inputs_folders_audio_and_name_collisions(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for p in ("a/x.wav", "b/x.mp4", "a/y.flac", "a/notes.txt"):
        (tmp_path / p).write_bytes(b"0")
    paths, bad = expand_inputs([str(tmp_path), str(tmp_path / "a" / "x.wav"),
                                str(tmp_path / "missing.mp4")])
    assert sorted(Path(p).name for p in paths) == ["x.mp4", "x.wav", "y.flac"]
    assert len(bad) == 1 and "missing.mp4" in bad[0].input
    names = output_names(paths)
    assert len(set(names.values())) == 3
    assert names[str(tmp_path / "a" / "y.flac")] == "y"
    assert all(n.startswith("x-") for p, n in names.items() if Path(p).stem == "x")
    assert names == output_names(paths)  # stable across runs


# ---------------------------------------------------------------- the Ray job


def register_with_alias(uri: str, cfg, name: str, alias: str = "candidate") -> str:  # type: ignore[no-untyped-def]
    """Register a random speech encoder, point ``alias`` at it; returns models:/NAME@ALIAS."""
    from mlflow import MlflowClient

    version = register_random_model(uri, cfg, name, speech_only=True).rsplit("/", 1)[1]
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, alias,
                                                                                version)
    return f"models:/{name}@{alias}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny random speech encoder registered as se4lip-x@candidate in a sqlite store."""
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    return uri, register_with_alias(uri, load_config("cpu-small", overrides=TINY), "se4lip-x")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    make_synthetic_clip(d / "talk.mp4", 3.0, seed=1)
    (d / "other").mkdir()
    make_synthetic_clip(d / "other" / "talk.mp4", 1.2, seed=2)
    audio, _ = speech_like_audio(2.0, seed=3)
    write_clip(d / "voice.wav", None, audio, 25, 16000, audio_codec="pcm_s16le")
    (d / "broken.mp4").write_bytes(b"not a video at all")
    frames = np.zeros((10, 64, 64, 3), np.uint8)
    write_clip(d / "silent.mp4", frames, None, 25, 16000)
    return d


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from se4lip_dist.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*.npy"))}


@pytest.mark.timeout(300)
def test_extract_resume_idempotent_bad_inputs(tmp_path, registered, media_dir,
                                              ray_session) -> None:
    from mlflow import MlflowClient

    from se4lip_dist.registry import embed_waveforms, load_encoder

    uri, model_uri = registered
    out = tmp_path / "feats"
    good = [str(media_dir / "talk.mp4"), str(media_dir / "voice.wav"),
            str(media_dir / "other" / "talk.mp4")]
    bad = [str(media_dir / "broken.mp4"), str(media_dir / "silent.mp4"),
           str(media_dir / "nope.mp4")]
    s1 = run_extract(good + bad, model_uri, out, tracking_uri=uri, batch_size=32,
                     concurrency=2, parquet=True)
    assert s1.extracted == 3 and s1.skipped == 0
    assert s1.exit_code == 1 and not s1.ok
    errors = {Path(f.input).name: f.error for f in s1.failures}
    assert set(errors) == {"broken.mp4", "silent.mp4", "nope.mp4"}
    assert "broken.mp4" in errors["broken.mp4"]
    assert "no audio stream" in errors["silent.mp4"]
    assert s1.model["version"] == 1 and s1.model["pinned_uri"] == "models:/se4lip-x/1"

    names = {p: n for p, n in output_names([str(Path(g).resolve()) for g in good]).items()}
    folders = {Path(p).name + ("-other" if Path(p).parent.name == "other" else ""): out / n
               for p, n in names.items()}
    assert len({f.name for f in folders.values()}) == 3  # the two talk.mp4 do not collide

    # One row per video frame (audio only: floor(duration * fps)); windowed layout matches.
    enc, cfg = load_encoder("models:/se4lip-x/1", uri)
    n_video = count_output_frames(probe(good[0]), 25)
    assert n_video == 75
    for key, n in (("talk.mp4", 75), ("voice.wav", 50), ("talk.mp4-other", 30)):
        feats = np.load(folders[key] / FRAME_FILE)
        win = np.load(folders[key] / WINDOW_FILE)
        assert feats.shape == (n, 16) and feats.dtype == np.float32
        assert win.shape == (n, 16, 16)
        np.testing.assert_array_equal(win[:, 8], feats)
        marker = json.loads((folders[key] / SUCCESS_FILE).read_text())
        assert marker["frames"] == n and marker["dim"] == 16
        assert marker["model"]["version"] == 1
        import pyarrow.parquet as pq

        table = pq.read_table(folders[key] / PARQUET_FILE)
        assert table.column_names == ["clip", "frame", "feature"] and table.num_rows == n

    # Features come from windows centred on each frame, zero-padded at the edges.
    audio = decode_audio(good[0], 16000, n_samples=75 * 640)
    padded = np.concatenate([np.zeros(1280, np.float32), audio, np.zeros(1280, np.float32)])
    feats = np.load(folders["talk.mp4"] / FRAME_FILE)
    for i in (0, 1, 37, 74):
        ref = embed_waveforms(enc, padded[None, i * 640:(i + 5) * 640], cfg)[0]
        np.testing.assert_allclose(feats[i], ref, rtol=1e-4, atol=1e-5)

    run = MlflowClient(tracking_uri=uri).get_run(s1.run_id)
    assert run.data.params["model.version"] == "1"
    assert run.data.metrics["extracted"] == 3 and run.data.metrics["failed"] == 3
    assert run.data.metrics["real_time_factor"] > 0

    # A rerun does no work: everything skipped, no file rewritten.
    before = _files(out)
    s2 = run_extract(good, model_uri, out, tracking_uri=uri, batch_size=32, parquet=True)
    assert (s2.extracted, s2.skipped, s2.exit_code) == (0, 3, 0)
    assert _files(out) == before

    # An interrupted run: one input has no marker and half its outputs, another lost a file and
    # a half-written temp file lies around. The rerun redoes exactly those, byte for byte.
    talk = folders["talk.mp4"]
    (talk / SUCCESS_FILE).unlink()
    (talk / WINDOW_FILE).unlink()
    (talk / f".{FRAME_FILE}.123.tmp").write_bytes(b"partial")
    (folders["voice.wav"] / FRAME_FILE).unlink()
    s3 = run_extract(good, model_uri, out, tracking_uri=uri, batch_size=32, parquet=True)
    assert (s3.extracted, s3.skipped) == (2, 1)
    after = _files(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    voice_window = str((folders["voice.wav"] / WINDOW_FILE).relative_to(out))
    assert after[voice_window][1] == before[voice_window][1]  # only the missing file rewritten

    # Same input + model in a fresh folder: byte-identical files (determinism).
    fresh = tmp_path / "fresh"
    run_extract([good[1]], model_uri, fresh, tracking_uri=uri, batch_size=32, fmt="frame")
    assert (fresh / "voice" / FRAME_FILE).read_bytes() == \
        (folders["voice.wav"] / FRAME_FILE).read_bytes()
    assert not (fresh / "voice" / WINDOW_FILE).exists()
    shutil.rmtree(fresh)


@pytest.mark.timeout(300)
def test_extract_plans_in_the_pipeline_with_an_autoscaling_pool(
        tmp_path, registered, media_dir, ray_session, monkeypatch) -> None:
    """Marker reads run in Ray tasks, not one after another on the driver; the encoder pool is
    autoscaling (1 to ``concurrency`` actors); complete inputs come back as ``skipped`` rows."""
    from ray.data import ActorPoolStrategy

    from se4lip_dist import extract

    uri, model_uri = registered
    clips = [str(media_dir / "talk.mp4"), str(media_dir / "voice.wav")]
    out = tmp_path / "feats"
    run_extract(clips[:1], model_uri, out, tracking_uri=uri, fmt="frame")

    def on_driver(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the driver read a marker")

    pools: list[ActorPoolStrategy] = []
    real_pool = extract.ActorPoolStrategy

    def recording_pool(**kw):  # type: ignore[no-untyped-def]
        pools.append(real_pool(**kw))
        return pools[-1]

    monkeypatch.setattr(extract, "plan_input", on_driver)
    monkeypatch.setattr(extract, "_read_marker", on_driver)
    monkeypatch.setattr(extract, "ActorPoolStrategy", recording_pool)
    rows: list[dict] = []
    s = run_extract(clips, model_uri, out, tracking_uri=uri, fmt="frame", concurrency=2,
                    on_result=rows.append)
    assert (s.extracted, s.skipped, s.exit_code) == (1, 1, 0)
    assert sorted(r["status"] for r in rows) == ["done", "skipped"]
    (pool,) = pools
    assert (pool.min_size, pool.max_size) == (1, 2)


@pytest.mark.timeout(300)
def test_extract_int8_close_to_fp32_and_kept_apart(tmp_path, registered, media_dir,
                                                   ray_session) -> None:
    uri, _ = registered
    # cpu-small's real width (128-d, 2 layers): the 16-d test encoder drifts too far for int8
    # (cosine ~0.995 on the probe), which run_extract rightly refuses.
    model_uri = register_with_alias(uri, load_config("cpu-small"), "se4lip-q")
    clip = [str(media_dir / "talk.mp4")]
    run_extract(clip, model_uri, tmp_path / "f", tracking_uri=uri, fmt="frame")
    ref = np.load(tmp_path / "f" / "talk" / FRAME_FILE)
    s = run_extract(clip, model_uri, tmp_path / "f", tracking_uri=uri, fmt="frame",
                    precision="int8")
    assert (s.extracted, s.skipped) == (1, 0)  # an fp32 marker does not satisfy int8
    q = np.load(tmp_path / "f" / "talk" / FRAME_FILE)
    marker = json.loads((tmp_path / "f" / "talk" / SUCCESS_FILE).read_text())
    assert marker["settings"]["precision"] == "int8"
    assert q.shape == ref.shape and not np.array_equal(q, ref)
    num = (q * ref).sum(1)
    den = np.linalg.norm(q, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-12), 1.0)
    # Near-silent frames (small embeddings) drift most; GRID speech stays above 0.9998.
    assert cos.min() > 0.995 and np.median(cos) > 0.9999, (cos.min(), np.median(cos))


def test_extract_precision_refusals(tmp_path, registered, monkeypatch) -> None:
    from se4lip_dist import extract

    uri, model_uri = registered
    clip = [str(tmp_path / "none.mp4")]
    with pytest.raises(extract.ExtractError, match="precision must be one of"):
        run_extract(clip, model_uri, tmp_path / "a", tracking_uri=uri, precision="fp16")
    with pytest.raises(extract.ExtractError, match="drop --use-gpu"):
        run_extract(clip, model_uri, tmp_path / "b", tracking_uri=uri, precision="int8",
                    use_gpu=True)
    monkeypatch.setattr(extract, "INT8_MIN_COSINE", 1.01)  # no encoder can pass this
    with pytest.raises(extract.ExtractError, match=r"se4lip-x@candidate: int8 embeddings drift"):
        run_extract(clip, model_uri, tmp_path / "c", tracking_uri=uri, precision="int8")
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before writing anything


@pytest.mark.timeout(120)
def test_gpu_actors_on_a_cluster_without_gpus_fail_fast(tmp_path, registered, media_dir,
                                                         ray_session) -> None:
    """No node has a GPU and no autoscaler can add one: refused at once, nothing written."""
    import time

    from se4lip_dist.extract import ExtractError

    uri, model_uri = registered
    t0 = time.monotonic()
    with pytest.raises(ExtractError, match=r"1 encoder actor: each needs CPU 0.5, GPU 1, but no "
                                           r"node of this Ray cluster has enough GPU"):
        run_extract([str(media_dir / "talk.mp4"), str(media_dir / "voice.wav")], model_uri,
                    tmp_path / "feats", tracking_uri=uri, use_gpu=True, concurrency=2)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "feats").exists()


@pytest.mark.timeout(120)
def test_actors_that_never_fit_fail_after_the_placement_timeout(tmp_path, registered, media_dir,
                                                                ray_session) -> None:
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from se4lip_dist.extract import ExtractError

    uri, model_uri = registered
    busy = placement_group([{"CPU": 1.8}])  # another job holding most of the cluster
    ray.get(busy.ready(), timeout=60)
    try:
        t0 = time.monotonic()
        with pytest.raises(ExtractError, match=r"1 encoder actor \(CPU 0.5 each\) could not be "
                                               r"placed within 2 s: CPU 0.2 of 2 free"):
            run_extract([str(media_dir / "talk.mp4")], model_uri, tmp_path / "feats",
                        tracking_uri=uri, placement_timeout_s=2)
        assert time.monotonic() - t0 < 30
        assert not (tmp_path / "feats").exists()
    finally:
        remove_placement_group(busy)


@pytest.mark.shared_data
@pytest.mark.timeout(300)
def test_grid_rows_per_frame(tmp_path, registered, shared_data, ray_session) -> None:
    uri, model_uri = registered
    clips = sorted((shared_data / "grid_s1" / "video").glob("*.mp4"))[:3]
    s = run_extract([str(c) for c in clips], model_uri, tmp_path, tracking_uri=uri)
    assert s.ok and s.extracted == 3, s.to_json()
    for c in clips:
        n = count_output_frames(probe(c), 25)
        assert np.load(tmp_path / c.stem / FRAME_FILE).shape == (n, 16)
    assert s.real_time_factor > 0


# ---------------------------------------------------------------- job specs


@pytest.mark.parametrize("spec", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_runtime_envs_are_valid(spec: Path) -> None:
    import yaml
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(spec.read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]


def test_extract_job_entry_point_parses(tmp_path) -> None:
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["extract_job.py", "--help"]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "jobs" / "extract_job.py"), run_name="__main__")
        assert e.value.code == 0
    finally:
        sys.argv = argv


@pytest.mark.parametrize("job,command", [("extract_job", "extract"), ("tune_job", "tune"),
                                         ("subject_job", "subject"), ("audit_job", "audit")])
def test_job_scripts_run_the_cli_command(job: str, command: str, monkeypatch) -> None:
    import runpy

    from se4lip_dist import cli

    calls = []
    monkeypatch.setattr(cli, "app", lambda args, prog_name: calls.append(args))
    ns = runpy.run_path(str(ROOT / "jobs" / f"{job}.py"))
    ns["main"](["IN", "--out", "o"])
    assert calls[0][:4] == [command, "IN", "--out", "o"]
    # The extraction and audit jobs print their summary as JSON, as jobs/README.md says.
    assert ("--json" in calls[0]) == (command in ("extract", "audit"))
