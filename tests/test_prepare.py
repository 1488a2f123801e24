"""prepare: synthetic and real video -> shards + manifest; resume; bad input; interrupts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from se4lip_dist.cli import app
from se4lip_dist.config import load_config
from se4lip_dist.manifest import Manifest
from se4lip_dist.prepare import PrepareError, collect_inputs, run_prepare
from se4lip_dist.shards import decode_audio, decode_lips, iter_rows
from se4lip_dist.synthetic import make_synthetic_clip, write_clip

FIXED = load_config("cpu-small", overrides=["face.backend=none"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("clips")
    metas = [make_synthetic_clip(d / f"syn_{i}.mp4", 2.0, seed=i, size=(128, 128))
             for i in range(3)]
    return d, metas


def _rows_by_clip(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for s in Manifest.load(out).shard_paths(out):
        for r in iter_rows(s):
            rows.setdefault(r["clip_id"], []).append(r)
    return rows


def test_synthetic_clips_become_aligned_shards(clips, tmp_path: Path) -> None:
    d, metas = clips
    out = tmp_path / "shards"
    s = run_prepare([str(d)], out, FIXED, workers=0, preview_dir=tmp_path / "prev")
    assert (s.prepared, len(s.failures), s.total_frames) == (3, 0, 150)
    m = Manifest.load(out)
    assert sorted(c.frames for c in m.clips.values()) == [50, 50, 50]
    assert sum(sh.rows for sh in m.shards) == 3
    for sh in m.shards:
        assert pq.read_metadata(out / sh.file).num_rows == sh.rows
    assert len(list((tmp_path / "prev").glob("*.png"))) == 3
    by_source = {Path(c.source).name: cid for cid, c in m.clips.items()}
    rows = _rows_by_clip(out)
    for meta in metas:
        (row,) = rows[by_source[Path(meta["path"]).name]]
        assert len(decode_audio(row["audio"])) == 50 * 640
        # The crop is centred on the drawn mouth: the non-skin area at its centre grows with the
        # mouth opening of the same frame (so crops and frames are not shifted either).
        lips = decode_lips(row["lips"]).astype(np.float32)
        c = lips.shape[1] // 2
        skin = np.median(lips, axis=(1, 2), keepdims=True)
        mouth = (np.abs(lips - skin).sum(-1) > 60)[:, c - 24 : c + 24, c - 32 : c + 32]
        r = np.corrcoef(mouth.mean(axis=(1, 2)), meta["mouth_open"])[0, 1]
        assert r > 0.9, f"mouth area vs mouth opening correlation {r:.2f}"


def test_rerun_resumes_and_adds_only_missing(clips, tmp_path: Path) -> None:
    d, _ = clips
    out = tmp_path / "shards"
    first = run_prepare([str(d / "syn_0.mp4")], out, FIXED, workers=0)
    assert first.prepared == 1
    shards_before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    again = run_prepare([str(d)], out, FIXED, workers=0)
    assert (again.prepared, again.skipped) == (2, 1)
    for name, mtime in shards_before.items():
        assert (out / name).stat().st_mtime_ns == mtime, "an existing shard was rewritten"
    third = run_prepare([str(d)], out, FIXED, workers=0)
    assert (third.prepared, third.skipped, third.total_clips) == (0, 3, 3)
    assert len(_rows_by_clip(out)) == 3


def test_manifest_records_absolute_sources(clips, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = clips
    monkeypatch.chdir(d)  # the user types a relative path
    run_prepare(["syn_0.mp4"], tmp_path / "shards", FIXED, workers=0)
    (rec,) = Manifest.load(tmp_path / "shards").clips.values()
    assert rec.source == str(d / "syn_0.mp4")


def test_other_config_on_same_folder_is_refused(clips, tmp_path: Path) -> None:
    d, _ = clips
    out = tmp_path / "shards"
    run_prepare([str(d / "syn_0.mp4")], out, FIXED, workers=0)
    other = FIXED.override({"data.crop_size": 64})
    with pytest.raises(PrepareError, match="crop_size"):
        run_prepare([str(d)], out, other, workers=0)


def test_folder_from_before_refine_motion_takes_more_clips_with_its_config(
        clips, tmp_path: Path) -> None:
    """A manifest written before ``face.refine_motion`` existed (fixed every-5th-frame
    detection): today's defaults are refused with the flags that keep adding to it."""
    import json

    d, _ = clips
    out = tmp_path / "shards"
    old = FIXED.override({"face.detect_every": 5, "face.refine_motion": 0.0})
    run_prepare([str(d / "syn_0.mp4")], out, old, workers=0)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["face"]["refine_motion"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrepareError) as e:
        run_prepare([str(d)], out, FIXED, workers=0)
    msg = str(e.value)
    assert "face.detect_every: 5 -> 32; face.refine_motion: 0.0 -> 0.03" in msg
    sets = msg.split("add to it with its config: ")[1].split()
    assert sets == ["--set", "face.detect_every=5", "--set", "face.refine_motion=0.0"]
    again = run_prepare([str(d)], out, FIXED.override(dict(a.split("=") for a in sets[1::2])),
                        workers=0)
    assert (again.prepared, again.skipped) == (2, 1)


def test_failed_run_writes_no_manifest_and_a_rerun_may_change_config(
        clips, tmp_path: Path) -> None:
    """A run that prepared nothing leaves no manifest, so the folder does not pin a config."""
    d, _ = clips
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    out = tmp_path / "shards"
    s = run_prepare([str(bad)], out, FIXED, workers=0)
    assert (s.prepared, len(s.failures)) == (0, 1)
    assert not (out / "manifest.json").exists()
    assert len((out / "failures.jsonl").read_text().splitlines()) == 1
    other = FIXED.override({"data.crop_size": 64})
    again = run_prepare([str(d / "syn_0.mp4")], out, other, workers=0)
    assert again.prepared == 1
    assert Manifest.load(out).config["data"]["crop_size"] == 64


def test_manifest_without_shards_does_not_pin_the_config(clips, tmp_path: Path) -> None:
    """A shard-less manifest written by an older version is replaced, not obeyed."""
    d, _ = clips
    out = tmp_path / "shards"
    Manifest(config={"data": {"crop_size": 96}, "face": {}}).save(out)
    s = run_prepare([str(d / "syn_0.mp4")], out, FIXED.override({"data.crop_size": 64}),
                    workers=0)
    assert s.prepared == 1 and Manifest.load(out).config["data"]["crop_size"] == 64


def test_interrupt_keeps_finished_clips(clips, tmp_path: Path) -> None:
    d, _ = clips
    out = tmp_path / "shards"
    seen = []

    def boom(res) -> None:
        seen.append(res)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_prepare([str(d)], out, FIXED, workers=0, on_result=boom)
    assert len(Manifest.load(out).clips) == 2
    (out / ".shard-x.parquet.tmp").write_bytes(b"partial")
    (out / "shard-orphan-00000.parquet").write_bytes(b"from a killed run")
    rest = run_prepare([str(d)], out, FIXED, workers=0)
    assert (rest.prepared, rest.skipped) == (1, 2)
    assert not (out / ".shard-x.parquet.tmp").exists()
    assert not (out / "shard-orphan-00000.parquet").exists()
    assert sum(len(v) for v in _rows_by_clip(out).values()) == 3


def test_bad_inputs_are_reported_and_others_processed(clips, tmp_path: Path) -> None:
    d, _ = clips
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("this is not a video")
    good = (d / "syn_1.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 3])
    frames = np.zeros((50, 64, 64, 3), np.uint8)
    write_clip(bad / "silent.mp4", frames, None, 25, 16000)
    write_clip(bad / "audio_only.m4a", None, np.zeros(16000, np.float32), 25, 16000)
    write_clip(bad / "short.mp4", frames[:3], np.zeros(3 * 640, np.float32), 25, 16000)
    (bad / "dup.mp4").write_bytes((d / "syn_0.mp4").read_bytes())
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,speaker,split\n"
        f"{d / 'syn_2.mp4'},spk,val\n"
        "missing/clip.mp4,spk,train\n"
        f"{d / 'syn_0.mp4'},spk,train,extra-field\n"
    )
    items = [str(d / "syn_0.mp4"), str(bad), str(bad / "audio_only.m4a"), str(listing),
             str(tmp_path / "nope.mp4")]
    out = tmp_path / "shards"
    result = CliRunner().invoke(
        app, ["prepare", *items, "--out", str(out), "--preset", "cpu-small",
              "--face-backend", "none", "--workers", "0", "--json"]
    )
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    errors = {Path(f["input"].split(" (")[0].split(":")[0]).name: f["error"]
              for f in summary["failures"]}
    assert set(errors) >= {"empty.mp4", "text.mp4", "truncated.mp4", "silent.mp4",
                           "audio_only.m4a", "short.mp4", "nope.mp4", "list.csv"}
    for name, err in errors.items():
        if name != "list.csv":
            assert name in err or name == "nope.mp4", f"{name}: error does not name it: {err}"
    assert "no audio" in errors["silent.mp4"]
    assert "no video" in errors["audio_only.m4a"]
    assert "shorter than one" in errors["short.mp4"]
    assert summary["prepared"] == 2, summary  # syn_0 (+ its duplicate) and syn_2
    assert len(summary["duplicates"]) == 1 and "dup.mp4" in summary["duplicates"][0]
    m = Manifest.load(out)
    assert sorted(c.frames for c in m.clips.values()) == [50, 50]
    assert {c.split for c in m.clips.values()} == {None, "val"}
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert len(lines) == len(summary["failures"])
    assert not list(out.glob(".*.tmp"))


def test_manifest_inputs(tmp_path: Path, clips) -> None:
    d, _ = clips
    jl = tmp_path / "in.jsonl"
    jl.write_text(
        json.dumps({"path": str(d / "syn_0.mp4"), "speaker": "a", "split": "train"}) + "\n"
        + "{not json\n"
        + json.dumps({"path": str(d / "syn_1.mp4"), "split": "holdout"}) + "\n"
        + json.dumps(["a list"]) + "\n"
    )
    inputs, failures = collect_inputs([str(jl)])
    assert [(Path(i.path).name, i.speaker, i.split) for i in inputs] == [
        ("syn_0.mp4", "a", "train")
    ]
    assert [f.input for f in failures] == [f"{jl}:2", f"{jl}:3", f"{jl}:4"]
    assert "malformed JSON" in failures[0].error and "holdout" in failures[1].error


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path, clips) -> None:
    d, _ = clips
    p = tmp_path / "locked.mp4"
    p.write_bytes((d / "syn_0.mp4").read_bytes())
    p.chmod(0)
    s = run_prepare([str(p)], tmp_path / "out", FIXED, workers=0)
    assert len(s.failures) == 1 and "locked.mp4" in s.failures[0].error


@pytest.mark.timeout(240)
def test_parallel_on_ray_matches_in_process(clips, tmp_path: Path) -> None:
    import ray

    d, _ = clips
    events: list = []
    try:
        s = run_prepare([str(d)], tmp_path / "ray", FIXED, workers=2,
                        on_start=lambda n: events.append(n), on_result=events.append)
    finally:
        ray.shutdown()
    local = run_prepare([str(d)], tmp_path / "local", FIXED, workers=0)
    assert s.prepared == local.prepared == 3
    assert events[0] == 3 and [o.status for o in events[1:]] == ["prepared"] * 3
    # The clip workers' own CPU (their processes, start-up included), not the driver's.
    assert 1 <= s.workers_used <= 2 and s.worker_cpu_seconds > 0.5, s.to_json()
    assert s.frames_per_worker_cpu_s == pytest.approx(s.frames / s.worker_cpu_seconds)
    assert local.workers_used == 1 and local.worker_cpu_seconds > 0
    a, b = _rows_by_clip(tmp_path / "ray"), _rows_by_clip(tmp_path / "local")
    assert a.keys() == b.keys()
    for cid in a:
        assert a[cid][0]["audio"] == b[cid][0]["audio"]
        assert a[cid][0]["lips"] == b[cid][0]["lips"]


@pytest.mark.timeout(300)
def test_a_worker_lost_mid_block_costs_only_its_clips(tmp_path: Path) -> None:
    """A clip worker's process dies in the middle of a block (after preparing part of it): Ray
    Data retries the block on a restarted worker, every clip ends up in exactly one shard."""
    import functools

    import prepare_faults
    import ray
    from ray import cloudpickle

    from se4lip_dist.prepare import PrepareBackend
    from se4lip_dist.runtime import init_ray

    d = tmp_path / "clips"
    d.mkdir()
    for i in range(6):
        make_synthetic_clip(d / f"c{i}.mp4", 1.0, seed=i, size=(64, 64))
    marker = tmp_path / "died"
    cloudpickle.register_pickle_by_value(prepare_faults)
    # Blocks of 3: c4 is the 2nd input of the 2nd block, so c3 (its 1st) is prepared and lost.
    backend = PrepareBackend(process=functools.partial(prepare_faults.die_once, str(marker),
                                                       "c4.mp4"))
    init_ray(num_cpus=2)
    try:
        s = run_prepare([str(d)], tmp_path / "out", FIXED, workers=1, clips_per_shard=3,
                        backend=backend)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(prepare_faults)
    assert marker.exists(), "the worker never died: the test proved nothing"
    assert (s.prepared, len(s.failures), s.total_clips) == (6, 0, 6)
    calls = [p.name.rsplit(".", 1)[0] for p in Path(f"{marker}.calls").iterdir()]
    # Only the lost block's work is redone: c3 (done before the death) and c4 (its victim).
    assert {c for c in calls if calls.count(c) > 1} == {"c3.mp4", "c4.mp4"}, sorted(calls)
    rows = _rows_by_clip(tmp_path / "out")
    assert len(rows) == 6 and all(len(v) == 1 for v in rows.values())
    out = tmp_path / "out"
    assert {p.name for p in out.glob("shard-*.parquet")} == {
        sh.file for sh in Manifest.load(out).shards}


@pytest.mark.timeout(180)
def test_workers_the_cluster_cannot_hold_fail_in_bounded_time(clips, tmp_path: Path) -> None:
    """No unbounded wait: workers that never fit fail with the resource named, writing nothing."""
    import time

    import ray
    from ray.util.placement_group import placement_group

    from se4lip_dist.runtime import init_ray

    d, _ = clips
    out = tmp_path / "shards"
    init_ray(num_cpus=2)
    try:
        busy = placement_group([{"CPU": 1.5}])  # another job holding most of the cluster
        ray.get(busy.ready(), timeout=60)
        t0 = time.monotonic()
        with pytest.raises(PrepareError, match=r"1 clip worker \(CPU 1 each\) could not be placed "
                                               r"within 2 s: CPU 0.5 of 2 free"):
            run_prepare([str(d)], out, FIXED, workers=1, placement_timeout_s=2)
        assert time.monotonic() - t0 < 30
        assert not out.exists()
    finally:
        ray.shutdown()


def test_grid_clips_with_scrfd(shared_data: Path, insightface_root: Path, tmp_path: Path) -> None:
    vids = sorted((shared_data / "grid_s1" / "video").glob("*.mp4"))[:3]
    cfg = load_config("paper", overrides=[f"face.insightface_root={insightface_root}"])
    s = run_prepare([str(v) for v in vids], tmp_path / "grid", cfg, workers=0)
    assert s.prepared == 3 and not s.failures
    for c in Manifest.load(tmp_path / "grid").clips.values():
        assert c.frames in (74, 75)
        assert c.missing_fraction == 0.0 and c.mean_det_score > 0.6


# ---------------------------------------------------------------- segmentation edge cases


@pytest.mark.parametrize(("n", "bounds"), [
    (5, [(0, 5)]),  # shorter than one segment
    (16, [(0, 16)]),  # exactly one segment
    (17, [(0, 17)]),  # one frame over: too short alone, joins the segment before
    (20, [(0, 20)]),  # a tail of window - 1 frames joins too
    (21, [(0, 16), (16, 21)]),  # a tail of exactly one window stays a row
    (32, [(0, 16), (16, 32)]),  # exactly two segments
    (36, [(0, 16), (16, 36)]),  # only the last tail merges
])
def test_segment_bounds(n: int, bounds: list[tuple[int, int]]) -> None:
    from se4lip_dist.prepare import segment_bounds

    assert segment_bounds(n, 16, 5) == bounds


def test_segment_bounds_never_drop_frames_when_a_window_exceeds_a_segment() -> None:
    from se4lip_dist.prepare import segment_bounds

    # Every tail is shorter than the 20-frame window; the frames after the first merge used to
    # be dropped (the loop stopped there).
    assert segment_bounds(40, 16, 20) == [(0, 40)]


@pytest.mark.parametrize(("frames", "rows"), [(16, [16]), (17, [17]), (21, [16, 5]),
                                              (36, [16, 20])])
def test_segments_of_a_prepared_clip(frames: int, rows: list[int], tmp_path: Path) -> None:
    from se4lip_dist.faces import build_detector
    from se4lip_dist.prepare import PrepareInput, process_clip

    cfg = FIXED.override({"data.segment_frames": 16})
    path = tmp_path / "clip.mp4"
    make_synthetic_clip(path, frames / 25, seed=frames, size=(64, 64))
    whole = process_clip(PrepareInput(str(path)), "c", FIXED, build_detector(FIXED.face))
    res = process_clip(PrepareInput(str(path)), "c", cfg, build_detector(cfg.face))
    assert res.failure is None and len(whole.segments) == 1
    assert [len(s.lips_jpeg) for s in res.segments] == rows
    assert [s.segment for s in res.segments] == list(range(len(rows)))
    assert [s.start_frame for s in res.segments] == [sum(rows[:i]) for i in range(len(rows))]
    assert {s.clip_frames for s in res.segments} == {frames} and res.record.segments == len(rows)
    # Cut anywhere, the rows hold the same frames, audio and keypoints as the uncut clip.
    (ref,) = whole.segments
    assert [j for s in res.segments for j in s.lips_jpeg] == ref.lips_jpeg
    np.testing.assert_array_equal(np.concatenate([s.audio for s in res.segments]), ref.audio)
    np.testing.assert_array_equal(np.concatenate([s.keypoints for s in res.segments]),
                                  ref.keypoints)
    for s in res.segments:
        assert len(s.audio) == len(s.lips_jpeg) * 640 == len(s.detected) * 640


def test_a_clip_is_probed_once_and_decoded_on_one_thread(tmp_path: Path, monkeypatch) -> None:
    """The packet scan reads the whole file: the decode stages reuse the first probe's result.

    One decoder thread: clips run one per core, and decoder threads cost CPU time per frame.
    """
    from se4lip_dist import media
    from se4lip_dist.faces import build_detector
    from se4lip_dist.prepare import PrepareInput, process_clip

    path = tmp_path / "clip.mp4"
    make_synthetic_clip(path, 1.0, seed=3, size=(64, 64))
    probes: list[str] = []
    threads: list[int] = []
    real_probe, real_iter = media.probe, media.iter_pictures

    def counting_probe(p: str) -> media.MediaInfo:
        probes.append(str(p))
        return real_probe(p)

    def recording_iter(*a, **k):  # type: ignore[no-untyped-def]
        threads.append(k.get("threads", 0))
        return real_iter(*a, **k)

    monkeypatch.setattr(media, "probe", counting_probe)
    monkeypatch.setattr(media, "iter_pictures", recording_iter)
    res = process_clip(PrepareInput(str(path)), "c", FIXED, build_detector(FIXED.face))
    assert res.failure is None and res.record.frames == 25
    assert len(probes) == 1 and threads == [1]


# ---------------------------------------------------------------- the failures table


def test_failures_table_shows_the_file_name_of_a_long_path(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*(["a_rather_long_folder_name_for_a_dataset"] * 5))
    deep.mkdir(parents=True)
    bad = deep / "speaker_0042_take_03.mp4"
    bad.write_text("not a video")
    (deep / "take (1).mp4").write_text("not a video either")
    listing = deep / "clips.csv"
    listing.write_text("path,speaker,split\ngone.mp4,s,train\n")
    res = CliRunner().invoke(app, ["prepare", str(bad), str(deep / "take (1).mp4"),
                                   str(listing), "--out",
                                   str(tmp_path / "out"), "--preset", "cpu-small",
                                   "--face-backend", "none", "--workers", "0"],
                             env={"COLUMNS": "100"})
    assert res.exit_code == 1, res.output
    table = res.stdout[res.stdout.index("failures (also in failures.jsonl)"):]
    first_cells = [line.split("│")[1].strip() for line in table.splitlines()
                   if line.startswith("│")]
    # The whole name on one line, first; nothing cut (the folder folds instead).
    assert "speaker_0042_take_03.mp4" in first_cells, table
    assert "take (1).mp4" in first_cells, table
    assert "gone.mp4 (clips.csv:2)" in first_cells, table  # a manifest line's missing file
    assert "…" not in table


def test_many_items_are_listed_by_a_bounded_number_of_read_tasks(tmp_path: Path) -> None:
    """``prepare a.mp4 b.mp4 ...`` (a shell glob) lists every item once, in order, from a few
    read tasks: each is a Ray worker process that takes no CPU, so one per item would start
    as many processes as the command line names files."""
    from se4lip_dist.prepare import LISTING_TASKS, _Listing, iter_input_pages

    items = []
    for i in range(50):
        (tmp_path / f"v{i:02d}.mp4").write_bytes(b"x")
        items.append(str(tmp_path / f"v{i:02d}.mp4"))
    tasks = _Listing(items, 64, 2, iter_input_pages).get_read_tasks(200)
    assert 1 <= len(tasks) <= LISTING_TASKS
    rows = [r for t in tasks for block in t() for r in json.loads(block["block"][0].as_py())]
    assert [r["path"] for r in rows] == items
    assert [r["key"] for r in rows] == [f"{i}:0" for i in range(50)]
