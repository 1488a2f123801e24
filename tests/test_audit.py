"""``audit``: injected offsets recovered, clips that cannot be decided left alone, the corrected
copy (trimmed to the overlap, traced per clip) and its re-audit, the Ray job and its MLflow run.

Offset recovery runs with the planted model (tests/planted_sync.py), which knows sync exactly
where the synthetic clips have it; the Ray/MLflow path runs a registered tiny random model,
whose answers are arbitrary, so it asserts what holds whatever the model says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from audit_fixtures import Clip, write_clips
from planted_sync import PlantedSync
from shard_fixtures import SPF, TINY_MODEL, register_random_model

from se4lip_dist.audit import (
    IN_SYNC,
    OFFSET,
    UNDECIDABLE,
    AuditError,
    AuditSettings,
    audit_in_process,
    correct_rows,
    measure,
    run_audit,
)
from se4lip_dist.config import load_config
from se4lip_dist.manifest import Manifest
from se4lip_dist.shards import SCHEMA, iter_rows
from se4lip_dist.sync import shift_audio

INJECTED = (-8, -5, -2, 0, 1, 2, 5, 8)


@pytest.fixture(scope="module")
def cfg():
    return load_config("cpu-small", overrides=["data.crop_size=48", "model.lip_height=32",
                                               "model.lip_width=32"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Clips with injected offsets, plus a short, a silent, a faceless and a dubbed one."""
    out = tmp_path_factory.mktemp("audit") / "shards"
    clips = [Clip(f"shift{k:+d}", shift=k) for k in INJECTED]
    clips += [Clip("short", frames=15), Clip("silent", silent=True),
              Clip("noface", no_face=True), Clip("dubbed", mismatched=True)]
    write_clips(out, clips, seed=3)
    return out


def _by_id(summary) -> dict:  # type: ignore[no-untyped-def]
    return {a.clip_id: a for a in summary.clips}


@pytest.mark.timeout(120)
def test_injected_offsets_are_recovered_and_corrected(cfg, corpus, tmp_path) -> None:
    res = audit_in_process(PlantedSync(), cfg, [str(corpus)], report_dir=str(tmp_path / "rep"),
                           fix_out=str(tmp_path / "fixed"), model_uri="models:/planted/1")
    got = _by_id(res)
    for k in INJECTED:
        a = got[f"shift{k:+d}"]
        assert a.offset == k and a.spread == 0, a
        assert a.status == (IN_SYNC if abs(k) <= 1 else OFFSET), a
        assert a.action == ("corrected" if abs(k) > 1 else "copied")
    assert (got["short"].status, got["short"].reason) == (UNDECIDABLE, "too_short")
    assert (got["silent"].status, got["silent"].reason) == (UNDECIDABLE, "silent")
    assert (got["noface"].status, got["noface"].reason) == (UNDECIDABLE, "no_face")
    assert got["dubbed"].status == UNDECIDABLE, got["dubbed"]  # lips of another clip's speech
    assert got["dubbed"].reason in ("inconsistent", "low_confidence", "search_edge")
    assert res.counts == {IN_SYNC: 2, OFFSET: 6, UNDECIDABLE: 4}
    assert res.histogram == {k: 1 for k in INJECTED}

    # The corrected copy: offsets undone, trimmed by |k|, traced; undecidable clips dropped.
    fixed = Manifest.load(tmp_path / "fixed")
    records = fixed.clips
    assert set(records) == {f"shift{k:+d}" for k in INJECTED}
    for k in INJECTED:
        rec = records[f"shift{k:+d}"]
        assert rec.audit_model == "models:/planted/1"
        assert rec.audit_offset == (k if abs(k) > 1 else 0)
        assert rec.audit_status == (OFFSET if abs(k) > 1 else IN_SYNC)
        assert rec.frames == 100 - (abs(k) if abs(k) > 1 else 0)
        assert rec.source == f"/videos/shift{k:+d}.mp4"
    assert fixed.config["data"]["segment_frames"] == 40

    # Idempotence: auditing the corrected data finds nothing left to fix.
    again = audit_in_process(PlantedSync(), cfg, [str(tmp_path / "fixed")])
    assert {a.clip_id: (a.status, a.offset) for a in again.clips} == {
        f"shift{k:+d}": (IN_SYNC, 1 if k == 1 else 0) for k in INJECTED}

    # The per-clip table and the report.
    table = pa.parquet.read_table(res.report["table"]).to_pylist()
    assert {r["clip_id"]: r["offset"] for r in table}["shift-5"] == -5
    assert {r["offset_at_shift-3"] for r in table if r["clip_id"] == "shift+5"} == {2}
    csv_head = Path(res.report["csv"]).read_text().splitlines()[0].split(",")
    assert csv_head[:4] == ["clip_id", "source", "status", "reason"]
    md = Path(res.report["markdown"]).read_text()
    assert "| offset | 6 | 0.500 |" in md and "too_short 1" in md
    assert Path(res.report["histogram"]).stat().st_size > 0
    assert "<table>" in Path(res.report["html"]).read_text()


@pytest.mark.timeout(120)
def test_undecidable_clips_kept_are_flagged_never_corrected(cfg, corpus, tmp_path) -> None:
    res = audit_in_process(PlantedSync(), cfg, [str(corpus)], fix_out=str(tmp_path / "fixed"),
                           undecidable="keep", model_uri="models:/planted/1")
    assert res.flagged == 4 and res.dropped == 0 and res.corrected == 6
    records = Manifest.load(tmp_path / "fixed").clips
    for cid, frames in (("short", 15), ("silent", 100), ("noface", 100), ("dubbed", 100)):
        rec = records[cid]
        assert (rec.audit_status, rec.audit_offset, rec.frames) == (UNDECIDABLE, None, frames)
    # The kept clip's rows are the original ones, byte for byte.
    orig = Manifest.load(corpus)
    rows = {r["clip_id"]: r for p in orig.shard_paths(corpus) for r in iter_rows(p)
            if r["clip_id"] == "dubbed"}
    new = {r["clip_id"]: r for p in Manifest.load(tmp_path / "fixed").shard_paths(
        tmp_path / "fixed") for r in iter_rows(p) if r["clip_id"] == "dubbed"}
    assert rows["dubbed"]["audio"] == new["dubbed"]["audio"]


def _rows(n: int, segment: int) -> pa.Table:
    """One clip's rows whose frame i has lip 'i', detection score i, audio value i."""
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for seg, s0 in enumerate(range(0, n, segment)):
        s1 = min(n, s0 + segment)
        for key, v in (("clip_id", "c"), ("speaker", None), ("split", None), ("fps", 25),
                       ("sample_rate", 16000), ("crop_size", 8)):
            cols[key].append(v)
        cols["segment"].append(seg)
        cols["start_frame"].append(s0)
        cols["n_frames"].append(s1 - s0)
        cols["clip_frames"].append(n)
        cols["lips"].append([str(i).encode() for i in range(s0, s1)])
        cols["audio"].append(np.repeat(np.arange(s0, s1, dtype="<i2"), SPF).tobytes())
        cols["keypoints"].append([float(i) for i in range(s0, s1) for _ in range(10)])
        cols["det_score"].append([float(i) for i in range(s0, s1)])
        cols["detected"].append([True] * (s1 - s0))
    return pa.Table.from_pydict(cols, schema=SCHEMA)


@pytest.mark.parametrize("k", [3, -3])
def test_correction_shifts_audio_and_trims_both_streams(k: int) -> None:
    out = correct_rows(_rows(50, 20), k, segment_frames=20, window_frames=5)
    lips = [int(j) for r in out["lips"].to_pylist() for j in r]
    audio = np.frombuffer(b"".join(out["audio"].to_pylist()), "<i2")[::SPF]
    assert len(lips) == len(audio) == 47
    assert out["clip_frames"].to_pylist() == [47] * out.num_rows
    assert out["start_frame"].to_pylist() == [0, 20, 40][:out.num_rows]
    # Audio late by k: lip frame i goes with the audio recorded at frame i + k.
    assert (audio - np.asarray(lips) == k).all()
    scores = [int(s) for r in out["det_score"].to_pylist() for s in r]
    assert scores == lips
    with pytest.raises(ValueError, match="fewer than one 5-frame window"):
        correct_rows(_rows(7, 20), k, segment_frames=20, window_frames=5)


def test_measure_sign_and_confidence_threshold(cfg) -> None:
    """A clip whose audio really runs 4 frames late measures +4; a confidence floor above
    anything the model reaches makes it undecidable instead."""
    import shard_fixtures as sf

    rng = np.random.default_rng(0)
    env = sf.envelope(100, rng)
    lips = np.stack([sf.mouth_frame(float(e), 48, 1.0) for e in env])
    audio = shift_audio(sf.audio_from_envelope(env, rng), 4, SPF)
    a = measure(PlantedSync(), cfg, lips, audio, AuditSettings(), clip_id="late")
    assert (a.status, a.offset, a.offsets) == (OFFSET, 4, [1, 4, 7])
    b = measure(PlantedSync(), cfg, lips, audio, AuditSettings(min_confidence=10.0),
                clip_id="late")
    assert (b.status, b.reason, b.offset) == (UNDECIDABLE, "low_confidence", 4)


def test_bad_arguments_and_inputs_are_named(cfg, corpus, tmp_path) -> None:
    with pytest.raises(AuditError, match="inside"):
        AuditSettings(shifts=(-15, 0), max_offset=15)
    with pytest.raises(AuditError, match=r"manifest.json: --fix needs a new folder"):
        audit_in_process(PlantedSync(), cfg, [str(corpus)], fix_out=str(corpus))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(AuditError, match=r"bad/manifest.json: unreadable manifest"):
        audit_in_process(PlantedSync(), cfg, [str(bad)])
    res = audit_in_process(PlantedSync(), cfg, [str(tmp_path / "missing.mp4")])
    [a] = res.clips
    assert a.status == UNDECIDABLE and "missing.mp4" in a.error
    other = cfg.override({"data.fps": 30, "data.sample_rate": 48000})
    with pytest.raises(AuditError, match=r"manifest.json: prepared with data.fps=25"):
        audit_in_process(PlantedSync(), other, [str(corpus)])


@pytest.mark.timeout(180)
def test_videos_are_audited_and_corrected(cfg, tmp_path) -> None:
    """Video inputs go through prepare's clip processing: a late video measures its delay, a
    too-short one is undecidable, and the corrected copy holds the late one undone."""
    from se4lip_dist.media import decode_clip
    from se4lip_dist.synthetic import make_synthetic_clip, write_clip

    vcfg = cfg.override({"face.backend": "none", "data.crop_size": 64, "model.lip_width": 64})
    make_synthetic_clip(tmp_path / "ok.mp4", 3.0, seed=11)
    clip = decode_clip(tmp_path / "ok.mp4")
    write_clip(tmp_path / "late.mp4", clip.frames, shift_audio(clip.audio, 4, SPF), 25, 16000)
    make_synthetic_clip(tmp_path / "tiny.mp4", 0.6, seed=12)
    res = audit_in_process(PlantedSync(), vcfg, [str(tmp_path)], fix_out=str(tmp_path / "fix"),
                           model_uri="models:/planted/1")
    got = {Path(a.source).name: a for a in res.clips}
    assert set(got) == {"ok.mp4", "late.mp4", "tiny.mp4"}, res.clips
    assert (got["ok.mp4"].status, got["ok.mp4"].offset) == (IN_SYNC, 0)
    assert (got["late.mp4"].status, got["late.mp4"].offset) == (OFFSET, 4)
    assert (got["tiny.mp4"].status, got["tiny.mp4"].reason) == (UNDECIDABLE, "too_short")
    recs = {Path(r.source).name: r for r in Manifest.load(tmp_path / "fix").clips.values()}
    assert set(recs) == {"ok.mp4", "late.mp4"}
    assert (recs["late.mp4"].audit_offset, recs["late.mp4"].frames) == (4, 71)
    again = audit_in_process(PlantedSync(), vcfg, [str(tmp_path / "fix")])
    assert {a.offset for a in again.clips} == {0}


@pytest.mark.timeout(180)
def test_no_face_video_is_undecidable(cfg, insightface_root, tmp_path) -> None:
    """A video the detector finds no face in is undecidable, never corrected."""
    from se4lip_dist.synthetic import write_clip

    frames = np.full((50, 128, 128, 3), 90, np.uint8)
    rng = np.random.default_rng(0)
    write_clip(tmp_path / "wall.mp4", frames, 0.2 * rng.standard_normal(50 * SPF)
               .astype(np.float32), 25, 16000)
    icfg = cfg.override({"face.insightface_root": str(insightface_root)})
    res = audit_in_process(PlantedSync(), icfg, [str(tmp_path / "wall.mp4")],
                           fix_out=str(tmp_path / "fix"))
    [a] = res.clips
    assert (a.status, a.reason, a.action) == (UNDECIDABLE, "no_face", "")
    assert Manifest.load(tmp_path / "fix").clips == {}  # an audited copy holding no clip


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_job_logs_its_run_and_writes_the_corrected_copy(corpus, tmp_path) -> None:
    """The Ray Data job (autoscaling actor pool, fractional CPUs) with a registered model:
    the table lands in MLflow as artifacts, and every clip of the copy names the model."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mcfg = load_config("cpu-small", overrides=[*TINY_MODEL, "data.crop_size=48"])
    version_uri = register_random_model(uri, mcfg, "tiny")
    res = run_audit([str(corpus)], version_uri,
                    tracking_uri=uri, fix_out=str(tmp_path / "fixed"), workers=2,
                    settings=AuditSettings(min_confidence=0.0))
    assert len(res.clips) == 12 and sum(res.counts.values()) == 12
    got = _by_id(res)
    for cid, reason in (("short", "too_short"), ("silent", "silent"), ("noface", "no_face")):
        assert (got[cid].status, got[cid].reason, got[cid].action) == (
            UNDECIDABLE, reason, "dropped")
    fixed = Manifest.load(tmp_path / "fixed").clips
    assert set(fixed) == {a.clip_id for a in res.clips if a.status != UNDECIDABLE}
    assert {r.audit_model for r in fixed.values()} <= {version_uri}
    for cid, rec in fixed.items():
        assert rec.audit_offset == (got[cid].offset if got[cid].status == OFFSET else 0)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.pinned_uri"] == version_uri
    assert run.data.metrics["undecidable"] >= 3 and run.data.metrics["clips"] == 12
    files = {f.path for f in client.list_artifacts(res.run_id, "audit")}
    assert {"audit/audit.parquet", "audit/audit.csv", "audit/audit_report.md",
            "audit/offset_histogram.png"} <= files
    assert Path(res.report["table"]).parent == tmp_path / "fixed" / "audit"


@pytest.mark.timeout(180)
def test_cli_audit_in_process(corpus, tmp_path) -> None:
    from typer.testing import CliRunner

    from se4lip_dist.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mcfg = load_config("cpu-small", overrides=[*TINY_MODEL, "data.crop_size=48"])
    version_uri = register_random_model(uri, mcfg, "tiny")
    r = CliRunner().invoke(app, ["audit", str(corpus), "--model", version_uri, "--tracking-uri",
                                 uri, "--workers", "0", "--report", str(tmp_path / "rep"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["clips"] == 12 and doc["reasons"]["too_short"] == 1
    assert (tmp_path / "rep" / "audit.csv").exists()
    r = CliRunner().invoke(app, ["audit", str(corpus), "--model", version_uri, "--tracking-uri",
                                 uri, "--workers", "0", "--shift", "20"])
    assert r.exit_code == 2 and "inside" in r.output


@pytest.mark.timeout(120)
def test_extract_advances_the_audio_by_the_measured_offset(tmp_path) -> None:
    """Features of a video whose audio runs 4 frames late, extracted with audio_offset=4, are
    those of the same video in sync (away from the end, where zeros come in)."""
    import torch

    from se4lip_dist.extract import extract_features
    from se4lip_dist.media import decode_clip
    from se4lip_dist.models import SpeechEncoder
    from se4lip_dist.synthetic import make_synthetic_clip, write_clip

    cfg = load_config("cpu-small", overrides=["model.gru_layers=1", "model.embed_dim=16"])
    torch.manual_seed(0)
    enc = SpeechEncoder(cfg.model, cfg.data.sample_rate).eval()
    make_synthetic_clip(tmp_path / "src.mp4", 2.0, seed=4)
    clip = decode_clip(tmp_path / "src.mp4")
    for name, k in (("sync.mkv", 0), ("late.mkv", 4)):
        write_clip(tmp_path / name, clip.frames, shift_audio(clip.audio, k, SPF), 25, 16000,
                   audio_codec="pcm_s16le")
    ref, _ = extract_features(enc, cfg, str(tmp_path / "sync.mkv"), 25, 32)
    late, _ = extract_features(enc, cfg, str(tmp_path / "late.mkv"), 25, 32)
    fixed, _ = extract_features(enc, cfg, str(tmp_path / "late.mkv"), 25, 32, audio_offset=4)
    keep = len(ref) - 4 - cfg.train.window_frames
    np.testing.assert_allclose(fixed[:keep], ref[:keep], atol=1e-5)
    assert not np.allclose(late[:keep], ref[:keep], atol=1e-3)


def test_injected_benchmark_scores_against_the_right_base() -> None:
    """benchmarks/audit_injected.py: GRID trials are scored against offset 0, other clips
    against their own decided offset at j = 0 (that trial itself not scored), low-confidence
    decisions withdrawn, and clips counted as the units."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from audit_injected import summarise

    def t(clip, group, j, status, offset, conf=0.1):  # type: ignore[no-untyped-def]
        return {"clip": clip, "group": group, "injected": j, "status": status,
                "reason": "", "offset": offset, "confidence": conf}

    trials = [t("g", "grid", -5, OFFSET, -5), t("g", "grid", 0, IN_SYNC, 1),
              t("g", "grid", 5, OFFSET, 3),  # wrong by 2
              t("w", "wild", 0, OFFSET, 3), t("w", "wild", 5, OFFSET, 8),
              t("w", "wild", -5, IN_SYNC, -2, conf=0.001),  # withdrawn below 0.01
              t("u", "unseen", 0, UNDECIDABLE, None), t("u", "unseen", 4, OFFSET, 6),
              t("u", "unseen", -4, OFFSET, -2)]
    s = summarise(trials, 0.01, 1)
    assert (s["trials"], s["decided"], s["correct"], s["wrong"], s[UNDECIDABLE]) == (8, 6, 5, 1, 2)
    assert s["bases"]["w"] == {"offset": 3, "from": "measured at j=0"}
    assert s["bases"]["u"] == {"offset": 2, "from": "median over injections"}
    assert s["clips_decided"] == 3 and s["clips_all_correct"] == 2
    assert s["confusion"][OFFSET] == {IN_SYNC: 0, OFFSET: 5, UNDECIDABLE: 2}
    assert s["confusion"][IN_SYNC] == {IN_SYNC: 1, OFFSET: 0, UNDECIDABLE: 0}


def test_injected_benchmark_shuffles_audio_within_a_group_and_never_keeps_a_clips_own() -> None:
    """``--pairing shuffled`` gives every clip another clip of its group's audio, cut to the
    shorter of the two (the content-blind baseline the audit should call undecidable)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from audit_injected import shuffle_audio

    def clip(name: str, group: str, frames: int) -> dict:
        return {"name": name, "group": group, "lips": np.zeros((frames, 2, 2, 3), np.uint8),
                "audio": np.full(frames * SPF, float(len(name) + frames), np.float32)}

    clips = [clip("a", "grid", 10), clip("bb", "grid", 6), clip("ccc", "grid", 8),
             clip("w", "wild", 5), clip("empty", "wild", 0)]
    out = {c["name"]: c for c in shuffle_audio(clips)}
    assert set(out) == {"a", "bb", "ccc"}  # a group of one usable clip has no other audio
    assert {n: c["audio_of"] for n, c in out.items()} == {"a": "bb", "bb": "ccc", "ccc": "a"}
    for c in out.values():
        assert len(c["audio"]) == len(c["lips"]) * SPF
    assert len(out["a"]["lips"]) == 6 and out["a"]["audio"][0] == 2 + 6


def test_injected_benchmark_takes_grid_clips_the_model_validated_on(tmp_path: Path) -> None:
    """``--heldout SHARDS``: the GRID clips are those the model's own split rule holds out."""
    import sys

    from shard_fixtures import write_synthetic_shards

    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import Manifest
    from se4lip_dist.splits import SplitRule

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from audit_injected import heldout_grid

    write_synthetic_shards(tmp_path / "s", n_clips=12, n_frames=20, val_clips=3)
    cfg = load_config("cpu-small")
    manifest = Manifest.load(tmp_path / "s")
    rule = SplitRule.for_manifest(manifest, cfg)
    rows = manifest.clips_table(["clip_id", "source", "split", "speaker"]).to_pylist()
    val = {Path(r["source"]).name for r in rows
           if rule.role(r["clip_id"], r["split"], r["speaker"]) == "val"}
    picked = heldout_grid(tmp_path / "s", cfg)
    assert len(picked) == 3 and {p.name for p in picked} == val


@pytest.mark.timeout(180)
def test_an_interrupted_fix_resumes_where_it_stopped(cfg, corpus, tmp_path, monkeypatch) -> None:
    """``--fix`` cut after a job's shard is published but before its record is written: the
    rerun keeps the jobs already done, redoes that one, and every kept clip is in the corrected
    copy exactly once; another model or setting refuses to resume."""
    from se4lip_dist import audit, storage

    plan = audit.plan_audit
    monkeypatch.setattr(audit, "plan_audit", lambda *a, **k: plan(*a, clips_per_job=4, **k))
    write = storage.write_atomic
    records: list[str] = []

    def cut_at_second_record(url, data):  # type: ignore[no-untyped-def]
        if f"/{audit.JOBS_DIR}/" in url:
            records.append(url)
            if len(records) == 2:
                raise KeyboardInterrupt  # the driver is killed right there
        return write(url, data)

    monkeypatch.setattr(storage, "write_atomic", cut_at_second_record)
    out = tmp_path / "fixed"
    with pytest.raises(KeyboardInterrupt):
        audit_in_process(PlantedSync(), cfg, [str(corpus)], fix_out=str(out),
                         model_uri="models:/planted/1")
    monkeypatch.setattr(storage, "write_atomic", write)
    assert len(Manifest.load(out).clips) < len(INJECTED)

    with pytest.raises(AuditError, match=r"audit_fix.json: written by an audit --fix with "
                                         r"another model"):
        audit_in_process(PlantedSync(), cfg, [str(corpus)], fix_out=str(out),
                         model_uri="models:/planted/2")
    measured: list[str] = []
    measure_clip = audit.measure

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        measured.append(k["clip_id"])
        return measure_clip(*a, **k)

    monkeypatch.setattr(audit, "measure", counting)
    res = audit_in_process(PlantedSync(), cfg, [str(corpus)], fix_out=str(out),
                           model_uri="models:/planted/1")
    assert res.resumed == 4 and len(res.clips) == 12 and res.counts[OFFSET] == 6
    fixed = Manifest.load(out)
    assert set(fixed.clips) == {f"shift{k:+d}" for k in INJECTED}
    assert fixed.total_clips == len(INJECTED)  # none twice
    rows = [r["clip_id"] for p in fixed.shard_paths(out) for r in iter_rows(p)]
    assert sorted(set(rows)) == sorted(fixed.clips)
    assert len(list(out.glob("shard-*.parquet"))) == len(fixed.shards)  # the cut one is gone
    assert len(measured) == 12 - 4  # the first job's clips were not measured again
    again = audit_in_process(PlantedSync(), cfg, [str(corpus)], fix_out=str(out),
                             model_uri="models:/planted/1")
    assert again.resumed == 12 and len(measured) == 8
    assert Manifest.load(out).total_clips == len(INJECTED)
