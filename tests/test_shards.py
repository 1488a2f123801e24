from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from se4lip_dist.manifest import ClipRecord, Manifest, ManifestError
from se4lip_dist.shards import (
    SCHEMA,
    SCHEMA_VERSION,
    Segment,
    ShardSchemaError,
    ShardWriter,
    check_schema,
    decode_audio,
    decode_lips,
    encode_jpeg,
    iter_rows,
    segments_to_table,
)


def _segment(clip: str, n: int = 10, seed: int = 0) -> Segment:
    rng = np.random.default_rng(seed)
    crops = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(n)]
    return Segment(
        clip_id=clip, segment=0, start_frame=0, clip_frames=n, fps=25, sample_rate=16000,
        crop_size=32, lips_jpeg=[encode_jpeg(c, 95) for c in crops],
        audio=rng.uniform(-0.5, 0.5, n * 640).astype(np.float32),
        keypoints=rng.uniform(0, 100, (n, 5, 2)), det_score=np.full(n, 0.9),
        detected=np.arange(n) % 5 == 0, speaker="s1", split="train",
    )


def test_roundtrip_keeps_frames_and_audio_aligned(tmp_path: Path) -> None:
    seg = _segment("a", n=12)
    table = segments_to_table([seg])
    assert table.schema == SCHEMA
    pq.write_table(table, tmp_path / "s.parquet")
    (row,) = list(iter_rows(tmp_path / "s.parquet"))
    assert row["n_frames"] == 12 and len(row["lips"]) == 12
    audio = decode_audio(row["audio"])
    assert audio.shape == (12 * 640,)
    np.testing.assert_allclose(audio, seg.audio, atol=1 / 32767)
    lips = decode_lips(row["lips"])
    assert lips.shape == (12, 32, 32, 3)
    assert abs(int(lips[7].mean()) - 70) <= 2
    assert len(row["keypoints"]) == 120 and row["detected"][5]


def test_audio_length_must_match_frames() -> None:
    seg = _segment("a", n=4)
    seg.audio = seg.audio[:-1]
    with pytest.raises(ValueError, match="audio samples"):
        segments_to_table([seg])


def test_older_schema_version_is_refused(tmp_path: Path) -> None:
    table = segments_to_table([_segment("a")])
    old = table.replace_schema_metadata({b"se4lip.schema_version": b"0"})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(ShardSchemaError, match="version 0"):
        check_schema(tmp_path / "old.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ShardSchemaError, match="not a se4lip shard"):
        check_schema(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ShardSchemaError, match="not a readable Parquet"):
        check_schema(tmp_path / "junk.parquet")
    assert SCHEMA_VERSION == 1


def test_writer_bounds_size_and_writes_atomically(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, shard_bytes=1024 * 1024, prefix="shard-t")
    infos = []
    for i in range(30):
        info = w.add(f"c{i}", segments_to_table([_segment(f"c{i}", n=20, seed=i)]))
        if info:
            infos.append(info)
    last = w.flush()
    if last:
        infos.append(last)
    assert len(infos) >= 2, "30 clips of ~0.1 MB must span several 1 MB shards"
    assert sum(i.rows for i in infos) == 30
    assert sum(i.clips for i in infos) == 30
    ids = [r["clip_id"] for i in infos for r in iter_rows(tmp_path / i.file, ["clip_id"])]
    assert sorted(ids) == sorted(f"c{i}" for i in range(30))
    assert not list(tmp_path.glob(".*.tmp"))
    for i in infos:
        assert pq.read_metadata(tmp_path / i.file).num_rows == i.rows
        assert i.frames == 20 * i.rows


def test_manifest_roundtrip_and_hash(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, shard_bytes=1 << 30, prefix="shard-m")
    w.add("a", segments_to_table([_segment("a")]))
    info = w.flush()
    m = Manifest(config={"data": {"fps": 25}})
    m.add_shard(info, {"a": ClipRecord(source="a.mp4", frames=10, segments=1, shard=info.file)})
    m.save(tmp_path)
    back = Manifest.load(tmp_path)
    assert back.clips["a"].frames == 10 and back.total_frames == 10
    assert back.content_hash() == m.content_hash() and len(m.content_hash()) == 16
    assert back.shard_paths(tmp_path) == [str((tmp_path / info.file).resolve())]
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path / "missing")
