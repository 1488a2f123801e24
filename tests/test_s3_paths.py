"""prepare and extract on s3:// paths, against a real S3 API on loopback (moto server).

Inputs, shards, the manifest, previews, features and markers all live in the bucket; the same
resume, refusal and atomicity guarantees as on local folders hold there.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import register_random_model
from typer.testing import CliRunner

from se4lip_dist import storage
from se4lip_dist.cli import app
from se4lip_dist.config import load_config
from se4lip_dist.manifest import MANIFEST, Manifest
from se4lip_dist.prepare import PrepareError, run_prepare
from se4lip_dist.shards import SHARD_GLOB, decode_audio, iter_rows
from se4lip_dist.synthetic import make_synthetic_clip, speech_like_audio, write_clip

BUCKET = "se4lip-data"
FIXED = load_config("cpu-small", overrides=["face.backend=none"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clips")
    for i in range(3):
        make_synthetic_clip(d / f"syn_{i}.mp4", 2.0, seed=i, size=(128, 128))
    return d


@pytest.fixture
def prefix(s3_env) -> str:  # type: ignore[no-untyped-def]
    """A fresh prefix in the loopback bucket (the AWS_* variables point at it)."""
    s3_env.create_bucket(BUCKET)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def s3_ray(s3_server):  # type: ignore[no-untyped-def]
    """A local Ray whose workers inherit the AWS_* variables (as cluster nodes must have)."""
    import ray

    from se4lip_dist.runtime import init_ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        init_ray(num_cpus=2)
        try:
            yield
        finally:
            ray.shutdown()


def _upload(local: Path, url: str) -> str:
    storage.write_atomic(url, local.read_bytes())
    return url


def _boto():  # type: ignore[no-untyped-def]
    """A boto3 client on the loopback S3 (endpoint and credentials from the environment)."""
    import boto3

    return boto3.client("s3")


def _shard_objects(out: str) -> set[str]:
    return {storage.basename(u) for u in storage.glob(storage.join(out, SHARD_GLOB))}


# ---------------------------------------------------------------- prepare


def test_prepare_into_s3_resumes_refuses_and_cleans_orphans(clips: Path, prefix: str) -> None:
    out, prev = f"{prefix}/shards", f"{prefix}/preview"
    first = run_prepare([str(clips / "syn_0.mp4")], out, FIXED, workers=0, preview_dir=prev)
    assert (first.prepared, first.out_dir) == (1, out)
    m = Manifest.load(out)
    (url,) = m.shard_paths(out)
    assert url.startswith(f"{out}/shard-") and m.shards[0].sha256 == storage.sha256(url)
    m.check_shards(out)
    (row,) = list(iter_rows(url))
    assert len(decode_audio(row["audio"])) == 50 * 640
    (png,) = storage.list_files(prev)
    assert storage.read_bytes(png)[:8] == b"\x89PNG\r\n\x1a\n"
    before = storage.stat(url)

    # A killed run's shard that no manifest names is removed, and so is the incomplete multipart
    # upload of a shard it was killed uploading (what test_storage's
    # test_s3_writer_killed_after_its_first_part sees a SIGKILL leave); finished clips are skipped.
    storage.write_atomic(f"{out}/shard-orphan-00000.parquet", b"from a killed run")
    s3, out_key = _boto(), out.split("/", 3)[3]
    up = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{out_key}/shard-killed-00000.parquet")
    s3.upload_part(Bucket=BUCKET, Key=up["Key"], UploadId=up["UploadId"], PartNumber=1,
                   Body=b"part 1 of a killed run")
    again = run_prepare([str(clips)], out, FIXED, workers=0, preview_dir=prev)
    assert (again.prepared, again.skipped, again.total_clips) == (2, 1, 3)
    assert s3.list_multipart_uploads(Bucket=BUCKET, Prefix=out_key).get("Uploads", []) == []
    assert storage.stat(url) == before, "an existing shard was rewritten"
    assert _shard_objects(out) == {s.file for s in Manifest.load(out).shards}
    assert len(storage.list_files(prev)) == 3

    with pytest.raises(PrepareError, match="crop_size"):
        run_prepare([str(clips)], out, FIXED.override({"data.crop_size": 64}), workers=0)


def test_interrupted_prepare_on_s3_names_only_published_shards(clips: Path, prefix: str) -> None:
    out = f"{prefix}/shards"
    seen = []

    def boom(res) -> None:  # type: ignore[no-untyped-def]
        seen.append(res)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_prepare([str(clips)], out, FIXED, workers=0, on_result=boom)
    m = Manifest.load(out)
    assert len(m.clips) == 2 and _shard_objects(out) == {s.file for s in m.shards}
    rest = run_prepare([str(clips)], out, FIXED, workers=0)
    assert (rest.prepared, rest.skipped) == (1, 2)


def test_failed_prepare_on_s3_writes_no_manifest(prefix: str, tmp_path: Path) -> None:
    bad = _upload(_text(tmp_path / "bad.mp4"), f"{prefix}/in/bad.mp4")
    s = run_prepare([bad], f"{prefix}/shards", FIXED, workers=0)
    assert s.prepared == 0 and "bad.mp4" in s.failures[0].error
    assert not storage.exists(f"{prefix}/shards/{MANIFEST}")
    (line,) = storage.read_text(f"{prefix}/shards/failures.jsonl").splitlines()
    assert json.loads(line)["input"] == bad


def _text(p: Path) -> Path:
    p.write_text("not a video")
    return p


@pytest.mark.timeout(300)
def test_prepare_s3_inputs_on_ray_workers(clips: Path, prefix: str, s3_ray,  # type: ignore[no-untyped-def]
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers download and hash S3 videos themselves (the driver never reads one); a labelled
    S3 manifest and bad URLs work too."""
    import pyarrow.fs as pafs
    # Which of two identical inputs a parallel run keeps is whichever is claimed first: the
    # labelled clip is given once, the duplicate is one path given twice.
    _upload(clips / "syn_0.mp4", f"{prefix}/labelled/syn_0.mp4")
    for i in (1, 2):
        _upload(clips / f"syn_{i}.mp4", f"{prefix}/videos/syn_{i}.mp4")
    listing = f"{prefix}/labelled/list.csv"
    storage.write_atomic(listing, "path,speaker,split\nsyn_0.mp4,spk,val\nmissing.mp4,spk,train\n")
    items = [listing, f"{prefix}/videos", f"{prefix}/videos/syn_2.mp4", f"{prefix}/nope.mp4",
             "s3://no-such-bucket-y/x.mp4"]
    out = f"{prefix}/shards"

    def driver_reads_video(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the driver downloaded or hashed a video")

    with monkeypatch.context() as mp:  # in this (the driver's) process only
        mp.setattr(storage, "sha256", driver_reads_video)
        mp.setattr(pafs, "copy_files", driver_reads_video)
        s = run_prepare(items, out, FIXED, workers=1)
    assert (s.prepared, len(s.duplicates)) == (3, 1)
    errors = {f.input: f.error for f in s.failures}
    assert errors[f"{prefix}/nope.mp4"] == "no such file or folder"
    assert "bucket 'no-such-bucket-y' does not exist" in errors["s3://no-such-bucket-y/x.mp4"]
    assert any("missing.mp4" in i and e == "no such file" for i, e in errors.items())
    m = Manifest.load(out)
    assert {c.source: c.split for c in m.clips.values()} == {
        f"{prefix}/labelled/syn_0.mp4": "val", f"{prefix}/videos/syn_1.mp4": None,
        f"{prefix}/videos/syn_2.mp4": None}
    local = run_prepare([str(clips)], Path(str(clips.parent / f"local-{uuid.uuid4().hex}")),
                        FIXED, workers=0)
    rows_s3 = {r["clip_id"]: r["audio"] for u in m.shard_paths(out) for r in iter_rows(u)}
    lm = Manifest.load(local.out_dir)
    rows_local = {r["clip_id"]: r["audio"] for u in lm.shard_paths(local.out_dir)
                  for r in iter_rows(u)}
    assert rows_s3 == rows_local  # same clip ids (content hashes) and the same audio


def test_prepare_cli_keeps_s3_urls_and_names_a_missing_bucket(clips: Path, prefix: str) -> None:
    res = CliRunner().invoke(app, ["prepare", str(clips / "syn_1.mp4"), "--out", f"{prefix}/o",
                                   "--preview", f"{prefix}/p", "--preset", "cpu-small",
                                   "--face-backend", "none", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["out_dir"] == f"{prefix}/o"
    assert storage.exists(f"{prefix}/o/{MANIFEST}") and storage.list_files(f"{prefix}/p")
    res = CliRunner().invoke(app, ["prepare", str(clips / "syn_1.mp4"), "--out",
                                   "s3://no-such-bucket-z/o", "--face-backend", "none",
                                   "--workers", "0"])
    assert res.exit_code == 2
    assert "s3://no-such-bucket-z/o: bucket 'no-such-bucket-z' does not exist" in res.output


# ---------------------------------------------------------------- extract


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cfg = load_config("cpu-small", overrides=["model.gru_layers=1", "model.embed_dim=16"])
    return uri, register_random_model(uri, cfg, "se4lip-s3", speech_only=True)


@pytest.mark.timeout(400)
def test_extract_from_s3_into_s3_resumes_and_matches_local(  # type: ignore[no-untyped-def]
        tmp_path: Path, prefix: str, encoder: tuple[str, str], s3_ray) -> None:
    from se4lip_dist.extract import FRAME_FILE, SUCCESS_FILE, WINDOW_FILE, run_extract

    uri, model_uri = encoder
    media = tmp_path / "media"
    media.mkdir()
    make_synthetic_clip(media / "talk.mp4", 2.0, seed=1)
    audio, _ = speech_like_audio(1.2, seed=3)
    write_clip(media / "voice.wav", None, audio, 25, 16000, audio_codec="pcm_s16le")
    for name in ("talk.mp4", "voice.wav"):
        _upload(media / name, f"{prefix}/media/{name}")
    out = f"{prefix}/feats"
    s1 = run_extract([f"{prefix}/media"], model_uri, out, tracking_uri=uri, batch_size=32,
                     concurrency=2)
    assert (s1.extracted, s1.skipped, s1.exit_code) == (2, 0, 0), s1.to_json()
    feats = np.load(io.BytesIO(storage.read_bytes(f"{out}/talk/{FRAME_FILE}")))
    assert feats.shape == (50, 16) and feats.dtype == np.float32
    win = np.load(io.BytesIO(storage.read_bytes(f"{out}/talk/{WINDOW_FILE}")))
    np.testing.assert_array_equal(win[:, 8], feats)
    marker = json.loads(storage.read_text(f"{out}/talk/{SUCCESS_FILE}"))
    assert marker["input"]["path"] == f"{prefix}/media/talk.mp4"
    assert marker["outputs"][FRAME_FILE]["sha256"] == storage.sha256(f"{out}/talk/{FRAME_FILE}")

    # The same inputs read locally give byte-identical features.
    local = tmp_path / "local"
    run_extract([str(media)], model_uri, local, tracking_uri=uri, batch_size=32)
    for name in ("talk", "voice"):
        for f in (FRAME_FILE, WINDOW_FILE):
            assert storage.read_bytes(f"{out}/{name}/{f}") == (local / name / f).read_bytes()

    # A rerun does nothing; a lost output and marker are redone, the rest is left alone.
    stats = {u: storage.stat(u) for u in storage.list_files(out)}
    s2 = run_extract([f"{prefix}/media"], model_uri, out, tracking_uri=uri, batch_size=32)
    assert (s2.extracted, s2.skipped) == (0, 2)
    assert {u: storage.stat(u) for u in storage.list_files(out)} == stats
    storage.delete(f"{out}/voice/{SUCCESS_FILE}")
    storage.delete(f"{out}/voice/{WINDOW_FILE}")
    s3 = run_extract([f"{prefix}/media"], model_uri, out, tracking_uri=uri, batch_size=32)
    assert (s3.extracted, s3.skipped) == (1, 1)
    assert storage.stat(f"{out}/talk/{FRAME_FILE}") == stats[f"{out}/talk/{FRAME_FILE}"]
    assert storage.read_bytes(f"{out}/voice/{WINDOW_FILE}") == \
        (local / "voice" / WINDOW_FILE).read_bytes()
    assert storage.exists(f"{out}/voice/{SUCCESS_FILE}")


def test_extract_refuses_a_missing_output_bucket(tmp_path: Path, prefix: str,
                                                 encoder: tuple[str, str]) -> None:
    from se4lip_dist.extract import ExtractError, run_extract

    uri, model_uri = encoder
    with pytest.raises(ExtractError, match="bucket 'no-such-bucket-w' does not exist"):
        run_extract([str(tmp_path / "x.wav")], model_uri, "s3://no-such-bucket-w/f",
                    tracking_uri=uri)
