"""Bad input across ``prepare``, ``extract``, ``evaluate`` and ``train``: one kind per case.

Every media file is generated here (PyAV via :mod:`se4lip_dist.synthetic`). Each case checks
the four promises of issue 7: a message naming the input and the problem, every good input
still processed, exact row counts in the outputs, a non-zero exit status when something failed
and no partial files left behind. Faces are the fixed-box backend except where faces are the
point (SCRFD from the shared model root, GRID speakers from the shared data).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shard_fixtures import register_random_model
from typer.testing import CliRunner

from se4lip_dist.cli import app
from se4lip_dist.config import load_config
from se4lip_dist.manifest import MANIFEST, Manifest
from se4lip_dist.media import count_output_frames, decode_clip, probe
from se4lip_dist.prepare import run_prepare
from se4lip_dist.shards import SHARD_GLOB, decode_audio, decode_lips, iter_rows
from se4lip_dist.synthetic import make_synthetic_clip, speech_like_audio, write_clip

FIXED = load_config("cpu-small", overrides=["face.backend=none"])
FPS, SPF = 25, 640
NON_ASCII = "клип_ünï_日本"


# ---------------------------------------------------------------- media makers


def _noise_frames(n: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(40, 200, (n, h, w, 3), dtype=np.uint8)


def _talk(path: Path, seconds: float = 1.0, *, sample_rate: int = 16000, channels: int = 1,
          size: tuple[int, int] = (64, 64), codec: str = "aac", video_codec: str = "libx264",
          vfr_times: list[float] | None = None, seed: int = 0) -> Path:
    """A video with speech-like audio at any rate and channel count."""
    n = len(vfr_times) if vfr_times else round(seconds * FPS)
    audio, _ = speech_like_audio(seconds, sample_rate, seed)
    if channels == 2:
        audio = np.stack([audio, 0.5 * audio], axis=1)
    write_clip(path, _noise_frames(n, size, seed), audio, FPS, sample_rate, audio_codec=codec,
               video_codec=video_codec, vfr_times=vfr_times)
    return path


def _faststart_copy(src: Path, dst: Path) -> Path:
    """Remux with the index (moov) first, as streamed downloads are laid out."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            o.mux(packet)
    return dst


def _corrupt_payload(src: Path, dst: Path) -> Path:
    """Overwrite 3 kB of the media payload with seeded junk (index left intact)."""
    data = bytearray(src.read_bytes())
    start = data.find(b"mdat") + 200
    data[start:start + 3000] = np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


VFR_TIMES = [0.0, 0.05, 0.08, 0.2, 0.24, 0.3, 0.31, 0.45, 0.5, 0.62, 0.7, 0.71, 0.8, 0.9, 0.96]
"""15 irregular frames spanning 1.0 s (the muxer gives the last one 0.04 s): 25 output frames."""


def _media_set(d: Path) -> dict[str, Path]:
    """Good-but-unusual inputs and bad ones, shared by the prepare/extract/evaluate cases."""
    d.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}
    p["good"] = Path(make_synthetic_clip(d / "good.mp4", 1.2, seed=1, size=(64, 64))["path"])
    p["sr8k"] = _talk(d / "sr8k.mp4", sample_rate=8000, seed=2)
    p["sr44k"] = _talk(d / "sr44k.mp4", sample_rate=44100, seed=3)
    p["sr48k"] = _talk(d / "sr48k.mp4", sample_rate=48000, seed=4)
    p["stereo"] = _talk(d / "stereo48k.mkv", sample_rate=48000, channels=2, codec="pcm_s16le",
                        seed=5)
    p["vfr"] = _talk(d / "vfr.mp4", vfr_times=VFR_TIMES, seed=6)
    p["non_ascii"] = _talk(d / f"{NON_ASCII}.mp4", 0.8, seed=7)
    p["zero"] = d / "zero.mp4"
    p["zero"].write_bytes(b"")
    p["text"] = d / "notes.mp4"
    p["text"].write_text("this is a text file, not a video\n" * 10)
    p["text_non_ascii"] = d / "сломан.mp4"
    p["text_non_ascii"].write_text("не видео\n")
    mp4 = make_synthetic_clip(d.parent / "src2.mp4", 2.0, seed=8, size=(64, 64))["path"]
    data = Path(mp4).read_bytes()
    p["truncated"] = d / "truncated.mp4"  # index at the end: cut before it
    p["truncated"].write_bytes(data[: len(data) // 2])
    fast = _faststart_copy(Path(mp4), d.parent / "fast.mp4").read_bytes()
    p["truncated_download"] = d / "partial_download.mp4"  # index first: 60 % of the payload
    p["truncated_download"].write_bytes(fast[: int(len(fast) * 0.6)])
    p["corrupt"] = _corrupt_payload(Path(mp4), d / "corrupt.mp4")
    p["no_audio"] = d / "no_audio.mp4"
    write_clip(p["no_audio"], _noise_frames(25), None, FPS, 16000)
    p["audio_only"] = d / "voice.wav"
    write_clip(p["audio_only"], None, speech_like_audio(1.0, 16000, 9)[0], FPS, 16000,
               audio_codec="pcm_s16le")
    p["short"] = _talk(d / "short.mp4", 0.12, seed=10)  # 3 frames < one 5-frame window
    return p


# ---------------------------------------------------------------- prepare


def _run_cli(args: list[str]) -> tuple[int, dict[str, Any], str]:
    res = CliRunner().invoke(app, args)
    try:
        payload = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        payload = {}
    return res.exit_code, payload, res.output


def _no_partial_files(out: Path) -> None:
    """No temp files, and every shard on disk is one the manifest names (no orphans)."""
    assert not [p.name for p in out.rglob("*.tmp*")], "temp files left behind"
    if (out / MANIFEST).exists():
        m = Manifest.load(out)
        assert {p.name for p in out.glob(SHARD_GLOB)} == {s.file for s in m.shards}
        for s in m.shards:
            assert pq.read_metadata(out / s.file).num_rows == s.rows


def _rows_by_source(out: Path) -> dict[str, list[dict[str, Any]]]:
    m = Manifest.load(out)
    src = {cid: c.source for cid, c in m.clips.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    for s in m.shard_paths(out):
        for r in iter_rows(s):
            rows.setdefault(src[r["clip_id"]], []).append(r)
    return rows


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _media_set(tmp_path_factory.mktemp("media") / "in")


@pytest.fixture(scope="module")
def prepared(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI ``prepare`` over every kind at once (in-process, no Ray)."""
    root = tmp_path_factory.mktemp("prep")
    listing = root / "list.csv"
    listing.write_text(
        "path,speaker,split\n"
        f"{media['good']},spk,train\n"
        "missing/clip.mp4,spk,train\n"
        f"{media['sr8k']},spk,train,an-extra-field\n"
    )
    jsonl = root / "list.jsonl"
    jsonl.write_text(json.dumps({"path": str(media["sr44k"]), "split": "val"}) + "\n"
                     + "{this is not json\n")
    empty_dir = root / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "readme.txt").write_text("no videos here")
    dup = root / "copy_of_good.mp4"
    dup.write_bytes(media["good"].read_bytes())
    items = [str(media[k]) for k in media if k != "sr44k"] + [
        str(media["good"]),  # the same path twice
        str(dup),  # the same bytes under another name
        str(listing), str(jsonl), str(empty_dir), str(root / "nope.mp4"),
    ]
    out = root / "shards"
    t0 = time.perf_counter()
    code, summary, output = _run_cli(
        ["prepare", *items, "--out", str(out), "--preset", "cpu-small", "--face-backend", "none",
         "--workers", "0", "--json"])
    failures = {f["input"]: f for f in summary.get("failures", [])}
    return {"code": code, "summary": summary, "output": output, "out": out, "root": root,
            "failures": failures, "seconds": time.perf_counter() - t0, "items": items}


def _failure_for(prepared: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [f for i, f in prepared["failures"].items() if name in i]
    assert len(hits) == 1, (name, list(prepared["failures"]))
    return hits[0]


ACCEPTED = {
    # kind: expected frames at 25 fps
    "good": 30, "sr8k": 25, "sr44k": 25, "sr48k": 25, "stereo": 25, "vfr": 25, "non_ascii": 20,
}
REJECTED = {
    # kind: what the error must say
    "zero": "empty file (0 bytes)",
    "text": "not a readable media file",
    "text_non_ascii": "not a readable media file",
    "truncated": "not a readable media file",
    "truncated_download": "of the 50 video frames its index declares are present",
    "corrupt": "packets are corrupt",
    "no_audio": "no audio stream",
    "audio_only": "no video stream",
    "short": "shorter than one 5-frame window",
}


def test_prepare_run_exit_status_counts_and_no_partial_files(prepared: dict[str, Any]) -> None:
    s, out = prepared["summary"], prepared["out"]
    assert prepared["code"] == 1, prepared["output"][-2000:]
    # sr44k arrives through the JSONL manifest; the CSV's sr8k line is malformed but sr8k is
    # also given directly, so it is prepared once.
    assert s["prepared"] == len(ACCEPTED)
    assert s["failed"] == len(REJECTED) + 5  # + missing CSV path, 2 bad lines, empty dir, nope
    assert len(s["duplicates"]) == 3, s["duplicates"]  # good twice, its copy, and via the CSV
    m = Manifest.load(out)
    assert len(m.clips) == len(ACCEPTED)
    assert m.total_frames == sum(ACCEPTED.values()) == s["total_frames"]
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert len(lines) == s["failed"]
    _no_partial_files(out)
    assert prepared["seconds"] < 120


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_prepare_accepts_unusual_media_with_exact_rows(kind: str, media: dict[str, Path],
                                                       prepared: dict[str, Any]) -> None:
    """8/44.1/48 kHz, stereo, VFR and non-ASCII names: exact frames and 640 samples per frame."""
    path = str(media[kind])
    n = ACCEPTED[kind]
    assert count_output_frames(probe(path), FPS) == n
    rows = _rows_by_source(prepared["out"])[path]
    assert sum(r["n_frames"] for r in rows) == n
    for r in rows:
        assert len(decode_audio(r["audio"])) == r["n_frames"] * SPF
        lips = decode_lips(r["lips"])
        assert lips.shape == (r["n_frames"], 96, 96, 3)
        assert len(r["keypoints"]) == r["n_frames"] * 10
    (rec,) = [c for c in Manifest.load(prepared["out"]).clips.values() if c.source == path]
    assert rec.frames == n
    if kind == "vfr":
        assert rec.vfr
    if kind == "sr44k":
        assert rec.split == "val"  # labels from the JSONL manifest survive


def test_prepare_accepts_sample_rates_with_audio_on_the_same_clock(
        media: dict[str, Path], prepared: dict[str, Any]) -> None:
    """Resampled audio keeps its loudness envelope: every rate gives the same 16 kHz signal."""
    rows = _rows_by_source(prepared["out"])
    ref = decode_audio(rows[str(media["sr48k"])][0]["audio"])
    for kind in ("sr8k", "sr44k", "stereo"):
        a = decode_audio(rows[str(media[kind])][0]["audio"])
        assert a.shape == ref.shape and np.abs(a).max() > 0.05, kind


@pytest.mark.parametrize("kind", sorted(REJECTED))
def test_prepare_rejects_bad_media_naming_file_and_problem(
        kind: str, media: dict[str, Path], prepared: dict[str, Any]) -> None:
    path = media[kind]
    f = _failure_for(prepared, path.name)
    assert str(path) in f["error"], f
    assert REJECTED[kind] in f["error"], f
    assert not any(c.source == str(path) for c in Manifest.load(prepared["out"]).clips.values())


def test_prepare_manifest_lines_missing_and_malformed(prepared: dict[str, Any]) -> None:
    root = prepared["root"]
    fails = prepared["failures"]
    missing = [f for i, f in fails.items() if i.startswith(f"{root / 'list.csv'}:3 ")]
    assert len(missing) == 1 and "missing/clip.mp4" in missing[0]["input"]
    assert missing[0]["error"] == "no such file"
    assert fails[f"{root / 'list.csv'}:4"]["error"] == "too many fields"
    assert fails[f"{root / 'list.jsonl'}:2"]["error"].startswith("malformed JSON")
    assert "no video files" in fails[str(root / "empty_dir")]["error"]
    assert "no such file" in fails[str(root / "nope.mp4")]["error"]


def test_prepare_duplicates_become_one_clip(media: dict[str, Path],
                                            prepared: dict[str, Any]) -> None:
    dups = prepared["summary"]["duplicates"]
    assert any("copy_of_good.mp4" in d and str(media["good"]) in d for d in dups)
    good = [c for c in Manifest.load(prepared["out"]).clips.values()
            if c.source == str(media["good"])]
    assert len(good) == 1 and good[0].frames == ACCEPTED["good"]


def test_prepare_non_ascii_name_gets_an_ascii_clip_id(media: dict[str, Path],
                                                      prepared: dict[str, Any]) -> None:
    m = Manifest.load(prepared["out"])
    (cid,) = [k for k, c in m.clips.items() if c.source == str(media["non_ascii"])]
    assert re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{10}", cid), cid
    # failures.jsonl stays valid JSON whatever the names.
    recs = [json.loads(x) for x in (prepared["out"] / "failures.jsonl").read_text().splitlines()]
    assert any("сломан.mp4" in r["input"] for r in recs)


def test_prepare_rerun_redoes_nothing_and_refails_the_same(
        prepared: dict[str, Any]) -> None:
    out = prepared["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(SHARD_GLOB)}
    code, s, _ = _run_cli(["prepare", *prepared["items"], "--out", str(out), "--preset",
                           "cpu-small", "--face-backend", "none", "--workers", "0", "--json"])
    assert code == 1
    assert (s["prepared"], s["skipped_complete"], s["failed"]) == (
        0, len(ACCEPTED), prepared["summary"]["failed"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob(SHARD_GLOB)} == before
    _no_partial_files(out)


def test_prepare_huge_resolution(tmp_path: Path) -> None:
    """3840x2160: decoded one frame at a time, cropped, exact rows."""
    big = tmp_path / "uhd.mp4"
    frames = np.full((6, 2160, 3840, 3), 90, np.uint8)
    frames[:, 1500:1700, 1800:2040] = 30  # a dark "mouth" where the fixed box looks
    write_clip(big, frames, speech_like_audio(6 / FPS, 16000, 0)[0], FPS, 16000,
               video_codec="mpeg4")
    out = tmp_path / "out"
    s = run_prepare([str(big)], out, FIXED, workers=0)
    assert (s.prepared, len(s.failures), s.total_frames) == (1, 0, 6)
    (row,) = _rows_by_source(out)[str(big)]
    assert decode_lips(row["lips"]).shape == (6, 96, 96, 3)
    assert len(decode_audio(row["audio"])) == 6 * SPF
    _no_partial_files(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_prepare_unreadable_file_via_cli(media: dict[str, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(media["good"].read_bytes())
    locked.chmod(0)
    try:
        code, s, _ = _run_cli(["prepare", str(locked), str(media["sr8k"]), "--out",
                               str(tmp_path / "o"), "--preset", "cpu-small", "--face-backend",
                               "none", "--workers", "0", "--json"])
    finally:
        locked.chmod(0o644)
    assert code == 1 and s["prepared"] == 1
    (f,) = s["failures"]
    assert "locked.mp4" in f["error"] and ("permission denied" in f["error"]
                                           or "cannot read" in f["error"])


@pytest.mark.timeout(300)
def test_prepare_bad_inputs_on_ray_workers_match_in_process(
        media: dict[str, Path], prepared: dict[str, Any], tmp_path: Path) -> None:
    """The same verdicts when clips run in Ray actors (failures cross the process boundary)."""
    import ray

    kinds = ["good", "stereo", "vfr", "text", "truncated_download", "no_audio", "short"]
    try:
        s = run_prepare([str(media[k]) for k in kinds], tmp_path / "ray", FIXED, workers=2)
    finally:
        ray.shutdown()
    assert s.prepared == 3 and s.total_frames == sum(ACCEPTED[k] for k in ("good", "stereo",
                                                                            "vfr"))
    got = {Path(f.input).name: f.error for f in s.failures}
    for k in ("text", "truncated_download", "no_audio", "short"):
        assert got[media[k].name] == _failure_for(prepared, media[k].name)["error"]
    _no_partial_files(tmp_path / "ray")


# ---------------------------------------------------------------- faces (SCRFD, GRID)


def test_no_face_is_reported_by_prepare(insightface_root: Path, tmp_path: Path) -> None:
    """A grey video with sound: SCRFD finds nothing; the clip fails with the reason."""
    blank = tmp_path / "blank.mp4"
    write_clip(blank, np.full((25, 128, 128, 3), 120, np.uint8),
               speech_like_audio(1.0, 16000, 0)[0], FPS, 16000)
    cfg = load_config("cpu-small", overrides=[f"face.insightface_root={insightface_root}"])
    s = run_prepare([str(blank)], tmp_path / "out", cfg, workers=0)
    (f,) = s.failures
    assert f.stage == "faces" and str(blank) in f.error and "no face" in f.error
    assert s.prepared == 0 and not list((tmp_path / "out").glob(SHARD_GLOB))
    _no_partial_files(tmp_path / "out")


def _grid(shared_data: Path, i: int) -> Path:
    return sorted((shared_data / "grid_s1" / "video").glob("*.mp4"))[i]


def _scrfd_cfg(root: Path) -> Any:
    return load_config("cpu-small", overrides=[f"face.insightface_root={root}"])


def _keypoints(out: Path, source: str) -> np.ndarray:
    rows = sorted(_rows_by_source(out)[source], key=lambda r: r["start_frame"])
    return np.concatenate([np.asarray(r["keypoints"], np.float32).reshape(-1, 5, 2)
                           for r in rows])


@pytest.mark.shared_data
def test_two_faces_pick_the_larger_central_one_every_frame(
        shared_data: Path, insightface_root: Path, tmp_path: Path) -> None:
    import cv2

    a, b = decode_clip(_grid(shared_data, 0)), decode_clip(_grid(shared_data, 1))
    n = min(len(a.frames), len(b.frames))
    h, w = a.frames.shape[1:3]
    canvas = np.zeros((n, h, 2 * w, 3), np.uint8)
    canvas[:, :, w:] = a.frames[:n]  # the speaker, full size, right half
    small = [cv2.resize(f, (int(w * 0.55), int(h * 0.55))) for f in b.frames[:n]]
    y0 = (h - small[0].shape[0]) // 2
    for i in range(n):  # a smaller second face on the left
        canvas[i, y0:y0 + small[i].shape[0], :small[i].shape[1]] = small[i]
    two = tmp_path / "two_faces.mp4"
    write_clip(two, canvas, a.audio[: n * SPF], FPS, 16000)
    cfg = _scrfd_cfg(insightface_root)
    s = run_prepare([str(two), str(_grid(shared_data, 0))], tmp_path / "out", cfg, workers=0)
    assert s.prepared == 2 and not s.failures
    kp = _keypoints(tmp_path / "out", str(two))
    assert len(kp) == n
    assert (kp[:, :, 0] > w).all(), "the track jumped to the smaller face"
    alone = _keypoints(tmp_path / "out", str(_grid(shared_data, 0)))[:n]
    shifted = alone + np.array([w, 0], np.float32)
    assert np.abs(kp - shifted).max() < 6.0  # the same face, the same keypoints


def _leaving(frames: np.ndarray, start: int, speed: int = 60) -> np.ndarray:
    """From frame ``start`` on, the picture slides right out of the frame (black behind)."""
    out = frames.copy()
    w = frames.shape[2]
    for i in range(start, len(frames)):
        s = min(w, (i - start + 1) * speed)
        out[i] = 0
        out[i, :, s:] = frames[i, :, : w - s]
    return out


@pytest.mark.shared_data
def test_face_leaving_the_frame_midway(shared_data: Path, insightface_root: Path,
                                       tmp_path: Path) -> None:
    """Late exit: kept, keypoints carried over, missed frames flagged. Early exit: refused."""
    clip = decode_clip(_grid(shared_data, 2))
    n = len(clip.frames)
    late, early = tmp_path / "leaves_late.mp4", tmp_path / "leaves_early.mp4"
    write_clip(late, _leaving(clip.frames, 52), clip.audio, FPS, 16000)
    write_clip(early, _leaving(clip.frames, 10), clip.audio, FPS, 16000)
    out = tmp_path / "out"
    s = run_prepare([str(late), str(early)], out, _scrfd_cfg(insightface_root), workers=0)
    assert s.prepared == 1
    (f,) = s.failures
    assert str(early) in f.error and "no face in" in f.error and f.stage == "faces"
    (rec,) = Manifest.load(out).clips.values()
    assert rec.source == str(late) and rec.frames == n
    assert 0.2 < rec.missing_fraction <= 0.5
    rows = sorted(_rows_by_source(out)[str(late)], key=lambda r: r["start_frame"])
    detected = np.concatenate([r["detected"] for r in rows])
    kp = _keypoints(out, str(late))
    # Refinement bisects to where the face slid out (from frame 52 on, 60 px per frame).
    found = np.flatnonzero(detected)
    assert found[0] == 0 and 52 <= found[-1] < 58 and len(found) >= 5
    # After the last detection the keypoints stay put (carried over), never jump or vanish.
    last = int(np.flatnonzero(detected)[-1])
    assert np.allclose(kp[last + 1:], kp[last], atol=1e-3)
    _no_partial_files(out)


# ---------------------------------------------------------------- train: old shards


def _old_schema_folder(tmp_path: Path, level: str) -> Path:
    from shard_fixtures import write_synthetic_shards

    data = tmp_path / f"old_{level}"
    m = write_synthetic_shards(data, n_clips=6, n_frames=20, val_clips=2, clips_per_shard=3)
    if level == "manifest":
        d = json.loads((data / MANIFEST).read_text())
        d["schema_version"] = 0
        (data / MANIFEST).write_text(json.dumps(d))
    else:
        shard = data / m.shards[1].file
        table = pq.read_table(shard)
        pq.write_table(table.replace_schema_metadata({b"se4lip.schema_version": b"0"}), shard)
    return data


@pytest.mark.parametrize("level", ["manifest", "shard"])
def test_train_refuses_shards_of_an_older_schema(level: str, tmp_path: Path) -> None:
    """Refused before Ray or MLflow start: exit 2, the message names the version and the fix."""
    data = _old_schema_folder(tmp_path, level)
    db = tmp_path / "mlruns" / "mlflow.db"
    t0 = time.perf_counter()
    code, _, output = _run_cli(["train", "--data", str(data), "--tracking-uri",
                                f"sqlite:///{db}", "--storage-path", str(tmp_path / "ray")])
    assert code == 2, output
    flat = "".join(output.split())  # rich wraps and folds long lines
    assert "schemaversion0" in flat and "se4lip-distprepare" in flat
    if level == "shard":
        assert "shard-00001.parquet" in flat
    assert time.perf_counter() - t0 < 15
    assert not db.exists() and not (tmp_path / "ray").exists()  # no run, no checkpoints


def test_stream_refuses_shards_of_an_older_schema(tmp_path: Path) -> None:
    from se4lip_dist.shards import ShardSchemaError
    from se4lip_dist.stream import read_shards

    data = _old_schema_folder(tmp_path, "shard")
    with pytest.raises(ShardSchemaError, match="schema version 0"):
        read_shards(str(data))


# ---------------------------------------------------------------- extract / evaluate


EVAL_CFG = ["face.backend=none", "data.crop_size=64", "model.lip_height=32",
            "model.lip_width=64", "model.gru_layers=1", "model.embed_dim=16",
            "model.lip_channels=[8,8,16,16,16]"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny random whole SE4Lip model (speech + lips) registered as se4lip-bad@candidate."""

    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    version = register_random_model(uri, load_config("cpu-small", overrides=EVAL_CFG),
                                    "se4lip-bad").rsplit("/", 1)[1]
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        "se4lip-bad", "candidate", version)
    return uri, "models:/se4lip-bad@candidate"


MISSING_MODELS = ["models:/se4lip-bad@champion", "models:/no-such-model/3",
                  "runs:/0123456789abcdef0123456789abcdef/model", "/no/such/model/folder"]


@pytest.mark.parametrize("model_uri", MISSING_MODELS)
def test_extract_and_evaluate_fail_fast_on_a_missing_model(
        model_uri: str, registered: tuple[str, str], media: dict[str, Path],
        tmp_path: Path) -> None:
    uri, _ = registered
    for cmd in (["extract", str(media["good"]), "--out", str(tmp_path / "feats")],
                ["evaluate", str(media["good"]), "--plot", str(tmp_path / "plots"),
                 "--face-backend", "none"]):
        t0 = time.perf_counter()
        code, _, output = _run_cli([*cmd, "--model", model_uri, "--tracking-uri", uri])
        assert code == 2, (cmd[0], output)
        assert model_uri in "".join(output.split()), (cmd[0], output)  # rich folds long lines
        assert "Traceback" not in output
        assert time.perf_counter() - t0 < 30
    assert list(tmp_path.iterdir()) == [], "a failed start wrote outputs"


def _extract_items(media: dict[str, Path], root: Path) -> list[str]:
    tiny = root / "blip.wav"  # 10 ms of audio: shorter than one 40 ms video frame
    write_clip(tiny, None, np.zeros(160, np.float32), FPS, 16000, audio_codec="pcm_s16le")
    listing = root / "list.jsonl"
    listing.write_text(json.dumps({"path": str(media["sr48k"])}) + "\n"
                       + json.dumps({"path": "gone.mp4"}) + "\n" + "[1, 2\n")
    kinds = ["good", "sr8k", "sr44k", "stereo", "vfr", "non_ascii", "audio_only", "zero",
             "text", "truncated", "truncated_download", "corrupt", "no_audio"]
    return [str(media[k]) for k in kinds] + [str(media["good"]), str(tiny), str(listing)]


EXTRACT_ROWS = {"good": 30, "sr8k": 25, "sr44k": 25, "sr48k": 25, "stereo": 25, "vfr": 25,
                "non_ascii": 20, "audio_only": 25}
EXTRACT_FAILS = {"zero": "empty file", "text": "not a readable media file",
                 "truncated": "not a readable media file",
                 "truncated_download": "truncated file", "corrupt": "audio packets are corrupt",
                 "no_audio": "no audio stream"}


@pytest.mark.timeout(400)
def test_extract_bad_inputs_exact_rows_and_exit_status(
        registered: tuple[str, str], media: dict[str, Path], tmp_path: Path) -> None:
    """One Ray Data job over every kind: outputs only for good inputs, with exact shapes."""
    from se4lip_dist.extract import FRAME_FILE, SUCCESS_FILE, WINDOW_FILE, output_names

    uri, model_uri = registered
    out = tmp_path / "feats"
    items = _extract_items(media, tmp_path)
    code, s, output = _run_cli(["extract", *items, "--model", model_uri, "--tracking-uri", uri,
                                "--out", str(out), "--batch-size", "64", "--json"])
    assert code == 1, output[-3000:]
    assert s["extracted"] == len(EXTRACT_ROWS), s
    assert s["frames"] == sum(EXTRACT_ROWS.values())
    # + the 10 ms blip, the missing and the malformed manifest lines
    assert s["failed"] == len(EXTRACT_FAILS) + 3, s["failures"]
    errors = {f["input"]: f["error"] for f in s["failures"]}
    # Failures inside the actors keep where they were raised (through Ray Data's rows).
    extracted = [f for f in s["failures"] if f["stage"] == "extract"]
    assert len(extracted) == len(EXTRACT_FAILS) + 1  # + the blip
    assert all("Traceback (most recent call last)" in f["traceback"] for f in extracted)
    for kind, why in EXTRACT_FAILS.items():
        (err,) = [e for i, e in errors.items() if Path(i).name == media[kind].name]
        assert str(media[kind]) in err and why in err, (kind, err)
    (blip,) = [e for i, e in errors.items() if i.endswith("blip.wav")]
    assert "shorter than one frame" in blip
    assert any("gone.mp4" in i and "no such file" in e for i, e in errors.items())
    assert any(i == f"{tmp_path / 'list.jsonl'}:3" and "malformed JSON" in e
               for i, e in errors.items())

    paths = [str(media[k].resolve()) for k in EXTRACT_ROWS]
    names = output_names(sorted(set(paths) | {str(Path(i).resolve()) for i in items
                                              if Path(i).suffix in (".mp4", ".mkv", ".wav")
                                              and Path(i).exists()}))
    folders = {p.name for p in out.iterdir()}
    assert folders == {names[p] for p in paths}, "outputs for failed inputs, or a duplicate"
    for kind, n in EXTRACT_ROWS.items():
        folder = out / names[str(media[kind].resolve())]
        assert np.load(folder / FRAME_FILE).shape == (n, 16), kind
        assert np.load(folder / WINDOW_FILE).shape == (n, 16, 16), kind
        assert json.loads((folder / SUCCESS_FILE).read_text())["frames"] == n
    assert not list(out.rglob("*.tmp")), "temp files left behind"


@pytest.mark.timeout(300)
def test_evaluate_bad_inputs_reported_others_scored(
        registered: tuple[str, str], media: dict[str, Path], tmp_path: Path) -> None:
    uri, model_uri = registered
    short = _talk(tmp_path / "brief.mp4", 0.28, seed=11)  # 7 frames: 3 windows < the ±3 search
    good = ["good", "stereo", "non_ascii", "vfr"]
    bad = ["zero", "text", "truncated_download", "no_audio", "audio_only"]
    plots = tmp_path / "plots"
    code, res, output = _run_cli(
        ["evaluate", *[str(media[k]) for k in good + bad], str(short),
         str(tmp_path / "missing.mp4"), "--model", model_uri, "--tracking-uri", uri,
         "--face-backend", "none", "--max-offset", "3", "--plot", str(plots), "--json"])
    assert code == 1, output[-3000:]
    assert (res["evaluated"], res["failed"]) == (len(good), len(bad) + 2)
    by_path = {c.get("path", c["name"]): c for c in res["clips"]}
    for k in good:
        c = by_path[str(media[k])]
        assert "error" not in c and c["frames"] == ACCEPTED[k], c
        assert isinstance(c["offset"], int) and c["lse_d"] >= 0 and c["lse_c"] >= 0, c
    for k in bad:
        c = by_path[str(media[k])]
        assert str(media[k]) in c["error"] and c["offset"] is None, c
    assert "too short" in by_path[str(short)]["error"]
    assert any("missing.mp4" in c["error"] for c in res["clips"] if "error" in c)
    assert len(list(plots.glob("*.png"))) == len(good)
    assert not list(plots.glob(".*"))


def test_evaluate_no_face_with_scrfd(registered: tuple[str, str], insightface_root: Path,
                                     media: dict[str, Path], tmp_path: Path) -> None:
    uri, model_uri = registered
    blank = tmp_path / "blank.mp4"
    write_clip(blank, np.full((30, 128, 128, 3), 120, np.uint8),
               speech_like_audio(1.2, 16000, 0)[0], FPS, 16000)
    code, res, output = _run_cli(
        ["evaluate", str(blank), "--model", model_uri, "--tracking-uri", uri, "--face-backend",
         "insightface", "--insightface-root", str(insightface_root), "--max-offset", "3",
         "--json"])
    assert code == 1, output[-2000:]
    (c,) = res["clips"]
    assert str(blank) in c["error"] and "no face" in c["error"]


# ---------------------------------------------------------------- errors keep their traceback


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise KeyError("a coding bug, not bad input")


def test_prepare_failure_records_keep_the_traceback(media: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug inside per-clip code is recorded with where it happened, not only as a message."""
    from se4lip_dist import faces

    monkeypatch.setattr(faces, "mouth_square", _bug)
    out = tmp_path / "out"
    s = run_prepare([str(media["good"]), str(media["text"])], out, FIXED, workers=0)
    by_name = {Path(f.input).name: f for f in s.failures}
    bug, bad = by_name["good.mp4"], by_name["notes.mp4"]
    assert "KeyError" in bug.traceback and "in _process_local" in bug.traceback
    assert "_bug" in bug.traceback and "a coding bug" in bug.error
    assert "MediaError" in bad.traceback  # bad input keeps its traceback too
    recs = {Path(r["input"]).name: r for r in
            map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert recs["good.mp4"]["traceback"] == bug.traceback
    assert "Traceback (most recent call last)" in recs["good.mp4"]["traceback"]


@pytest.mark.parametrize("how", ["flag", "env", "off"])
def test_prepare_debug_shows_the_traceback_in_the_terminal(
        how: str, media: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from se4lip_dist import faces

    monkeypatch.setattr(faces, "mouth_square", _bug)
    monkeypatch.delenv("SE4LIP_DEBUG", raising=False)
    if how == "env":
        monkeypatch.setenv("SE4LIP_DEBUG", "1")
    args = ["prepare", str(media["good"]), "--out", str(tmp_path / "out"), "--preset",
            "cpu-small", "--face-backend", "none", "--workers", "0"]
    code, _, output = _run_cli(["--debug", *args] if how == "flag" else args)
    assert code == 1
    assert "a coding bug" in output
    shown = "Traceback (most recent call last)" in output and "in _bug" in output
    assert shown == (how != "off"), output[-3000:]


class _Encoder(torch.nn.Module):
    """A speech encoder stand-in: zeros, or a bug."""

    def __init__(self, buggy: bool) -> None:
        super().__init__()
        self.buggy = buggy
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if self.buggy:
            _bug()
        return wav[:, :4] * 0 + self.w


def test_extract_failure_rows_keep_the_traceback(tmp_path: Path) -> None:
    """extract's per-input handler keeps the traceback of whatever went wrong."""
    from se4lip_dist.extract import process_input

    good = make_synthetic_clip(tmp_path / "a.mp4", 0.6, seed=1, size=(64, 64))["path"]
    job = {"path": good, "name": "a", "out_dir": str(tmp_path / "feats"), "todo": [],
           "identity": {}, "settings": {"fps": FPS}, "model": {"uri": "x"}, "batch_size": 8}
    row = process_input(_Encoder(buggy=True), load_config("cpu-small"), job)
    assert row["status"] == "failed" and "a coding bug" in row["error"]
    assert "KeyError" in row["traceback"] and "in extract_features" in row["traceback"]
    ok = process_input(_Encoder(buggy=False), load_config("cpu-small"),
                       {**job, "todo": ["aud_se4lip.npy"]})
    assert ok["status"] == "done" and ok["traceback"] == ""


def test_guard_shows_the_traceback_of_unexpected_errors_with_debug(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch or Ray error is not reduced to one line when --debug asks for more."""
    from se4lip_dist import registry

    def torch_like(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.delenv("SE4LIP_DEBUG", raising=False)
    monkeypatch.setattr(registry, "list_models", torch_like)
    code, _, plain = _run_cli(["models", "list"])
    assert code == 2 and "device-side assert" in plain and "Traceback" not in plain
    assert "RuntimeError" in plain and "--debug" in plain  # says how to see more
    code, _, debug = _run_cli(["--debug", "models", "list"])
    assert code == 2 and "Traceback (most recent call last)" in debug and "torch_like" in debug

    def ours(*args: Any, **kwargs: Any) -> Any:
        raise registry.RegistryError("no registered model named 'x'")

    monkeypatch.setattr(registry, "list_models", ours)
    code, _, plain = _run_cli(["models", "list"])
    assert code == 2 and "no registered model" in plain and "--debug" not in plain


# ---------------------------------------------------------------- the real problem first


NO_DETECTOR = ["--face-backend", "insightface", "--insightface-root", "/nowhere/insightface"]


def _missing_detector_explained(output: str) -> None:
    flat = "".join(output.split())  # rich wraps and folds long lines
    for way in ("--insightface-root", "SE4LIP_INSIGHTFACE_ROOT", "--face-backendnone",
                "releases/download/model-zoo/buffalo_sc.zip"):
        assert way in flat, (way, output)


@pytest.mark.parametrize("kind", ["missing", "text", "zero"])
def test_prepare_reports_bad_inputs_before_a_missing_detector(
        kind: str, media: dict[str, Path], tmp_path: Path) -> None:
    path = str(tmp_path / "no" / "such" / "path") if kind == "missing" else str(media[kind])
    code, s, output = _run_cli(["prepare", path, "--out", str(tmp_path / "out"), "--preset",
                                "cpu-small", "--workers", "0", *NO_DETECTOR, "--json"])
    assert code == 1, output
    (f,) = s["failures"]
    assert path in f["input"]
    assert {"missing": "no such file", "text": "not a readable media file",
            "zero": "empty file"}[kind] in f["error"]
    assert "InsightFace" not in output


def test_prepare_missing_detector_explains_the_ways_out(media: dict[str, Path],
                                                         tmp_path: Path) -> None:
    code, _, output = _run_cli(["prepare", str(media["good"]), str(media["text"]), "--out",
                                str(tmp_path / "out"), "--preset", "cpu-small", "--workers",
                                "0", *NO_DETECTOR])
    assert code == 2
    assert "/nowhere/insightface" in "".join(output.split())
    _missing_detector_explained(output)


def test_insightface_root_from_the_environment(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from se4lip_dist.faces import FaceModelError, find_detector_model

    monkeypatch.setenv("SE4LIP_INSIGHTFACE_ROOT", str(tmp_path / "env-root"))
    with pytest.raises(FaceModelError, match="env-root"):
        find_detector_model(None)
    (tmp_path / "env-root" / "models" / "buffalo_sc").mkdir(parents=True)
    (tmp_path / "env-root" / "models" / "buffalo_sc" / "det_500m.onnx").write_bytes(b"")
    assert find_detector_model(None) == tmp_path / "env-root" / "models" / "buffalo_sc" / \
        "det_500m.onnx"
    # An explicit root still wins over the environment.
    with pytest.raises(FaceModelError, match="elsewhere"):
        find_detector_model(str(tmp_path / "elsewhere"))


@pytest.mark.timeout(120)
def test_evaluate_reports_bad_inputs_before_a_missing_detector(
        registered: tuple[str, str], media: dict[str, Path], tmp_path: Path) -> None:
    uri, model_uri = registered
    missing = str(tmp_path / "no" / "such.mp4")
    base = ["evaluate", "--model", model_uri, "--tracking-uri", uri, "--max-offset", "3",
            *NO_DETECTOR]
    code, res, output = _run_cli([*base, str(media["text"]), missing, "--json"])
    assert code == 1, output[-2000:]
    errors = {c.get("path", c["name"]): c["error"] for c in res["clips"]}
    assert "not a readable media file" in errors[str(media["text"])]
    assert "no such file" in errors[missing]
    assert "InsightFace" not in output
    code, _, output = _run_cli([*base, str(media["good"]), str(media["text"])])
    assert code == 2
    _missing_detector_explained(output)


@pytest.mark.timeout(120)
def test_evaluate_debug_shows_each_failed_clips_traceback(
        registered: tuple[str, str], media: dict[str, Path], tmp_path: Path) -> None:
    uri, model_uri = registered
    args = ["evaluate", str(media["good"]), str(media["no_audio"]), "--model", model_uri,
            "--tracking-uri", uri, "--face-backend", "none", "--max-offset", "3"]
    code, _, plain = _run_cli(args)
    assert code == 1 and "no audio stream" in " ".join(plain.split())
    assert "Traceback" not in plain
    code, _, debug = _run_cli(["--debug", *args])
    assert code == 1 and "Traceback (most recent call last)" in debug
    assert "MediaError" in debug and "_probe_streams" in debug
