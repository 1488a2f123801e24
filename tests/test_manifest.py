"""The shard index: per-shard Parquet index files, a manifest.json that grows with shards (not
clips), old-layout folders read and migrated, and crashes between the writes of a shard, its
index and the manifest that lose nothing and duplicate nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import downgrade_to_layout1, make_segments, write_synthetic_shards
from typer.testing import CliRunner

from se4lip_dist import manifest as manifest_mod
from se4lip_dist.cli import app
from se4lip_dist.config import load_config
from se4lip_dist.manifest import (
    INDEX_GLOB,
    MANIFEST,
    ClipRecord,
    IndexedShardWriter,
    Manifest,
    ManifestCommitter,
    ManifestError,
)
from se4lip_dist.prepare import run_prepare
from se4lip_dist.shards import SHARD_GLOB, ShardInfo, iter_rows, segments_to_table
from se4lip_dist.splits import SplitRule, clip_frames
from se4lip_dist.synthetic import make_synthetic_clip

FIXED = load_config("cpu-small", overrides=["face.backend=none"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clips")
    for i in range(4):
        make_synthetic_clip(d / f"syn_{i}.mp4", 1.0, seed=i, size=(64, 64))
    return d


def _rows_per_clip(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in Manifest.load(out).shard_paths(out):
        for r in iter_rows(s, ["clip_id"]):
            counts[r["clip_id"]] = counts.get(r["clip_id"], 0) + 1
    return counts


def _record(i: int, split: str | None = None) -> ClipRecord:
    return ClipRecord(source=f"c{i}.mp4", frames=20 + i, segments=1, shard="",
                      speaker=f"spk{i % 3}", split=split)


# ---------------------------------------------------------------- append and read


def test_index_files_append_per_shard_and_readers_load_only_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    writer = IndexedShardWriter(str(tmp_path), shard_bytes=1 << 30, max_clips=3)
    m = Manifest(config={"data": {"fps": 25}})
    for i in range(7):
        cid = f"clip{i:02d}"
        info = writer.add(cid, segments_to_table(make_segments(cid, 20 + i, rng)), _record(i))
        if info is not None:
            m.add_shard(info)
            m.save(tmp_path)
    m.add_shard(writer.flush())
    m.save(tmp_path)

    assert [s.clips for s in m.shards] == [3, 3, 1]
    assert sorted(p.name for p in tmp_path.glob(INDEX_GLOB)) == sorted(
        f"index-{s.file}" for s in m.shards)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    assert "clips" not in raw and raw["layout"] == 2
    assert raw["totals"] == {"clips": 7, "frames": sum(20 + i for i in range(7)), "shards": 3,
                             "bytes": sum(s.bytes for s in m.shards)}
    # manifest.json holds one line per shard, nothing per clip.
    assert "clip0" not in (tmp_path / MANIFEST).read_text()

    back = Manifest.load(tmp_path)
    assert back.total_clips == 7 and back.content_hash() == m.content_hash()
    t = back.clips_table(["clip_id", "split", "speaker"])
    assert t.column_names == ["clip_id", "split", "speaker"] and t.num_rows == 7
    rec = back.clips["clip04"]
    assert (rec.frames, rec.speaker, rec.source) == (24, "spk1", "c4.mp4")
    assert rec.shard == m.shards[1].file
    assert _rows_per_clip(tmp_path) == {f"clip{i:02d}": 1 for i in range(7)}


def test_load_reads_no_index_until_clips_are_asked_for(tmp_path: Path) -> None:
    m = write_synthetic_shards(tmp_path, n_clips=6, clips_per_shard=2)
    (tmp_path / m.shards[0].index).unlink()
    back = Manifest.load(tmp_path)  # manifest.json alone
    assert back.total_clips == 6 and back.shard_paths(tmp_path)
    with pytest.raises(ManifestError, match="unreadable shard index"):
        back.clips_table(["clip_id"])


def test_commits_rewrite_the_manifest_a_logarithmic_number_of_times(tmp_path: Path) -> None:
    """A constant cost per shard: rewrites of a file that grows with the shards stay in
    proportion to them; the last commit writes everything."""
    m = Manifest(config={})
    committer = ManifestCommitter(m, str(tmp_path))
    n = 2000
    for i in range(n):
        committer.add(ShardInfo(file=f"shard-{i:05d}.parquet", rows=1, frames=10, bytes=1,
                                sha256="x", clips=1, index=f"index-shard-{i:05d}.parquet"))
    committer.flush()
    assert len(Manifest.load(tmp_path).shards) == n
    assert committer.saves < 60  # a save per shard would be 2000; growth by 1/8 each: ~55


# ---------------------------------------------------------------- old layout


def test_old_layout_folder_is_read_as_it_is(tmp_path: Path) -> None:
    m = write_synthetic_shards(tmp_path, n_clips=6, clips_per_shard=2, val_clips=2)
    before = {"hash": m.content_hash(), "roles": clip_frames(m, SplitRule("clip", 0.1))}
    downgrade_to_layout1(tmp_path)
    assert not list(tmp_path.glob(INDEX_GLOB))
    old = Manifest.load(tmp_path)
    assert old.legacy and old.total_clips == 6 and old.content_hash() == before["hash"]
    assert clip_frames(old, SplitRule("clip", 0.1)) == before["roles"]
    assert old.clips["synth000"].shard == m.shards[0].file


def test_prepare_migrates_an_old_layout_folder_and_resumes_it(clips: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = run_prepare([str(clips / "syn_0.mp4"), str(clips / "syn_1.mp4")], out, FIXED,
                        workers=0)
    assert first.prepared == 2
    old_hash = Manifest.load(out).content_hash()
    old = downgrade_to_layout1(out)
    again = run_prepare([str(clips)], out, FIXED, workers=0)
    assert (again.prepared, again.skipped, again.total_clips) == (2, 2, 4)
    raw = json.loads((out / MANIFEST).read_text())
    assert raw["layout"] == 2 and "clips" not in raw
    m = Manifest.load(out)
    assert not m.legacy and len(list(out.glob(INDEX_GLOB))) == len(m.shards)
    for cid, rec in old["clips"].items():  # every old record survives the migration
        assert m.clips[cid].source == rec["source"] and m.clips[cid].frames == rec["frames"]
    old_files = {s["file"] for s in old["shards"]}
    old_part = Manifest(config={}, shards=[s for s in m.shards if s.file in old_files])
    assert old_part.content_hash() == old_hash  # the old shards are the same data
    assert _rows_per_clip(out) == dict.fromkeys(m.clips, 1)


def test_prepare_without_inputs_only_migrates(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    run_prepare([str(clips / "syn_0.mp4")], out, FIXED, workers=0)
    downgrade_to_layout1(out)
    res = CliRunner().invoke(app, ["prepare", "--out", str(out), "--preset", "cpu-small",
                                   "--face-backend", "none", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["total_clips"] == 1
    assert json.loads((out / MANIFEST).read_text())["layout"] == 2
    assert len(list(out.glob(INDEX_GLOB))) == 1


# ---------------------------------------------------------------- crashes between writes


class _Crash(BaseException):
    """A kill: not an Exception, so nothing on the way out treats it as a per-clip error."""


def test_crash_between_shard_and_index_loses_and_duplicates_nothing(
        clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    run_prepare([str(clips / "syn_0.mp4")], out, FIXED, workers=0)
    real = manifest_mod.write_index

    def crash(*a, **k):  # type: ignore[no-untyped-def]
        raise _Crash

    monkeypatch.setattr(manifest_mod, "write_index", crash)
    with pytest.raises(_Crash):
        run_prepare([str(clips)], out, FIXED, workers=0)
    assert len(list(out.glob(SHARD_GLOB))) == 2  # the new shard is there, without its index
    monkeypatch.setattr(manifest_mod, "write_index", real)
    again = run_prepare([str(clips)], out, FIXED, workers=0)
    assert (again.prepared, again.skipped, again.total_clips) == (3, 1, 4)
    m = Manifest.load(out)
    assert {p.name for p in out.glob(SHARD_GLOB)} == {s.file for s in m.shards}
    assert _rows_per_clip(out) == dict.fromkeys(m.clips, 1) and len(m.clips) == 4


def test_crash_before_the_manifest_commit_keeps_the_published_shards(
        clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    run_prepare([str(clips / "syn_0.mp4")], out, FIXED, workers=0)
    # Killed after the workers published their shards and indexes, before any commit.
    monkeypatch.setattr(ManifestCommitter, "add", lambda self, info: None)
    run_prepare([str(clips)], out, FIXED, workers=0, clips_per_shard=1)
    monkeypatch.undo()
    assert len(Manifest.load(out).shards) == 1  # the commits never happened
    assert len(list(out.glob(INDEX_GLOB))) == 4  # but every shard and index was published
    again = run_prepare([str(clips)], out, FIXED, workers=0)
    assert (again.prepared, again.skipped, again.total_clips) == (0, 4, 4)  # adopted, not redone
    m = Manifest.load(out)
    assert _rows_per_clip(out) == dict.fromkeys(m.clips, 1) and len(m.clips) == 4


def test_a_retried_block_republishes_the_same_shard(clips: Path, tmp_path: Path) -> None:
    """A block written twice (a Ray retry after a lost worker) gives one shard, not two."""
    from se4lip_dist.faces import build_detector
    from se4lip_dist.prepare import ClipRegistry, ClipWorker, PrepareBackend, listing_rows

    out = tmp_path / "shards"
    out.mkdir()
    rows = [r for b in listing_rows(0, str(clips), 100, lambda n: n, PrepareBackend().list_pages)
            for r in b]
    registry = ClipRegistry(Manifest(config={}))
    worker = ClipWorker(FIXED.to_dict(), str(out), None, registry, 64, PrepareBackend(),
                        detector=build_detector(FIXED.face))
    first: list[ShardInfo] = []
    again: list[ShardInfo] = []
    worker.run(rows, lambda o: None, first.append, keep_partial=False)
    worker.run(rows, lambda o: None, again.append, keep_partial=False)
    assert [s.file for s in first] == [s.file for s in again]
    assert [s.sha256 for s in first] == [s.sha256 for s in again]
    assert len(list(out.glob(SHARD_GLOB))) == 1 and len(list(out.glob(INDEX_GLOB))) == 1
