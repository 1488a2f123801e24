"""Pair sampling and split logic, without Ray."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_fixtures import SPF, write_synthetic_shards

from se4lip_dist.manifest import Manifest
from se4lip_dist.stream import (
    CROSS,
    FAR,
    HARD,
    POSITIVE,
    READ_COLUMNS,
    PairSpec,
    clip_split,
    make_pair_batch,
    manifest_splits,
    sample_pairs,
)
from se4lip_dist.sync import audio_windows


def _spec(**kw: object) -> PairSpec:
    base = dict(window_frames=5, samples_per_frame=SPF, pairs_per_segment=8,
                hard_negative_fraction=0.5, cross_clip_fraction=0.25, hard_offset_max=3)
    base.update(kw)
    return PairSpec(**base)  # type: ignore[arg-type]


def test_labels_balanced_and_offsets_valid() -> None:
    rng = np.random.default_rng(0)
    n_frames = [75, 40, 250, 75, 12]
    clips = ["a", "b", "c", "d", "e"]
    pairs = [p for _ in range(200) for p in sample_pairs(n_frames, clips, _spec(), rng)]
    labels = Counter(p.label for p in pairs)
    assert labels[1] == labels[0]
    for p in pairs:
        assert 0 <= p.lip_start <= n_frames[p.row] - 5
        assert 0 <= p.audio_start <= n_frames[p.audio_row] - 5
        shift = p.audio_start - p.lip_start
        if p.kind == POSITIVE:
            assert p.label == 1 and p.audio_row == p.row and shift == 0
        elif p.kind == HARD:
            assert p.audio_row == p.row and 2 <= abs(shift) <= 3
        elif p.kind == FAR:
            assert p.audio_row == p.row and abs(shift) > 3
        else:
            assert p.kind == CROSS and clips[p.audio_row] != clips[p.row]


def test_negative_mix_follows_fractions() -> None:
    rng = np.random.default_rng(1)
    n_frames = [100] * 8
    clips = [f"c{i}" for i in range(8)]
    spec = _spec(pairs_per_segment=16, cross_clip_fraction=0.25, hard_negative_fraction=0.5)
    pairs = [p for _ in range(300) for p in sample_pairs(n_frames, clips, spec, rng)]
    kinds = Counter(p.kind for p in pairs if p.label == 0)
    neg = sum(kinds.values())
    assert kinds[CROSS] / neg == pytest.approx(0.25, abs=0.02)
    assert kinds[HARD] / neg == pytest.approx(0.375, abs=0.02)
    assert kinds[FAR] / neg == pytest.approx(0.375, abs=0.02)


def test_short_rows_and_single_clip_fallbacks() -> None:
    rng = np.random.default_rng(2)
    # One clip only: no cross-clip negatives possible; 6 frames (span 1) allows no negative at all.
    pairs = sample_pairs([6, 80, 80], ["x", "x", "x"], _spec(cross_clip_fraction=1.0), rng)
    assert {p.row for p in pairs} == {1, 2}
    assert all(p.kind != CROSS for p in pairs)
    assert Counter(p.label for p in pairs)[1] == 8
    # Span 3 <= hard_offset_max: far falls back to hard.
    pairs = sample_pairs([8], ["y"], _spec(hard_negative_fraction=0.0, cross_clip_fraction=0), rng)
    assert {p.kind for p in pairs if p.label == 0} == {HARD}
    # Rows shorter than the window yield nothing.
    assert sample_pairs([4], ["z"], _spec(), rng) == []


def test_odd_pairs_per_segment_stays_balanced() -> None:
    rng = np.random.default_rng(3)
    pairs = sample_pairs([50] * 4, list("abcd"), _spec(pairs_per_segment=5), rng)
    assert len(pairs) == 20
    assert Counter(p.label for p in pairs)[1] == 10


def test_split_is_deterministic_and_manifest_wins() -> None:
    ids = [f"clip{i}" for i in range(2000)]
    first = [clip_split(c, None, 0.1) for c in ids]
    assert first == [clip_split(c, None, 0.1) for c in ids]
    assert first.count("val") / len(ids) == pytest.approx(0.1, abs=0.02)
    assert clip_split("clip1", "val", 0.1) == "val"
    assert clip_split("clip1", "train", 0.99) == "train"
    assert clip_split("clip1", "test", 0.1) == "test"


def _read_batch(path: str) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=READ_COLUMNS)
    return {c: np.asarray(table[c].to_pylist(), dtype=object) for c in READ_COLUMNS}


def test_make_pair_batch_on_real_shard(tmp_path) -> None:
    manifest = write_synthetic_shards(tmp_path, n_clips=6, n_frames=30, clips_per_shard=6,
                                      val_clips=2)
    assert manifest_splits(manifest, 0.1)["val"] == ["synth004", "synth005"]
    batch = _read_batch(Manifest.load(tmp_path).shard_paths(tmp_path)[0])
    spec = _spec(pairs_per_segment=4)
    out = make_pair_batch(batch, spec=spec, split="train", val_fraction=0.1, seed=None)
    assert out["wav"].shape == (16, 5 * SPF) and out["wav"].dtype == np.float32
    assert out["lips"].shape == (16, 5, 48, 48, 3) and out["lips"].dtype == np.uint8
    assert out["label"].sum() == 8
    val1 = make_pair_batch(batch, spec=spec, split="val", val_fraction=0.1, seed=7)
    val2 = make_pair_batch(batch, spec=spec, split="val", val_fraction=0.1, seed=7)
    assert len(val1["label"]) == 8
    np.testing.assert_array_equal(val1["wav"], val2["wav"])
    np.testing.assert_array_equal(val1["kind"], val2["kind"])


def test_positive_audio_is_the_aligned_window(tmp_path) -> None:
    write_synthetic_shards(tmp_path, n_clips=2, n_frames=30, val_clips=0)
    batch = _read_batch(Manifest.load(tmp_path).shard_paths(tmp_path)[0])
    out = make_pair_batch(batch, spec=_spec(cross_clip_fraction=0), split="train",
                          val_fraction=0.1, seed=3)
    from se4lip_dist.shards import decode_audio
    audios = [decode_audio(a) for a in batch["audio"]]
    windows = [audio_windows(a, 5, SPF) for a in audios]
    for wav in out["wav"]:
        hits = [(r, int(np.flatnonzero((w == wav).all(axis=1))[0]))
                for r, w in enumerate(windows) if (w == wav).all(axis=1).any()]
        assert hits, "every audio window comes from a row at a frame boundary"
    assert out["label"].mean() == 0.5
