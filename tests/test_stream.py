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
    make_pair_batch,
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


def _read_batch(path: str) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=READ_COLUMNS)
    return {c: np.asarray(table[c].to_pylist(), dtype=object) for c in READ_COLUMNS}


def test_make_pair_batch_on_real_shard(tmp_path) -> None:
    manifest = write_synthetic_shards(tmp_path, n_clips=6, n_frames=30, clips_per_shard=6,
                                      val_clips=2)
    from se4lip_dist.config import load_config
    from se4lip_dist.splits import SplitRule

    rule = SplitRule.for_manifest(manifest, load_config("cpu-small"))
    batch = _read_batch(Manifest.load(tmp_path).shard_paths(tmp_path)[0])
    spec = _spec(pairs_per_segment=4)
    out = make_pair_batch(batch, spec=spec, rule=rule, role="train", seed=None)
    assert out["wav"].shape == (16, 5 * SPF) and out["wav"].dtype == np.float32
    assert out["lips"].shape == (16, 5, 48, 48, 3) and out["lips"].dtype == np.uint8
    assert out["label"].sum() == 8
    val1 = make_pair_batch(batch, spec=spec, rule=rule, role="val", seed=7)
    val2 = make_pair_batch(batch, spec=spec, rule=rule, role="val", seed=7)
    assert len(val1["label"]) == 8
    np.testing.assert_array_equal(val1["wav"], val2["wav"])
    np.testing.assert_array_equal(val1["kind"], val2["kind"])


def test_positive_audio_is_the_aligned_window(tmp_path) -> None:
    write_synthetic_shards(tmp_path, n_clips=2, n_frames=30, val_clips=0)
    batch = _read_batch(Manifest.load(tmp_path).shard_paths(tmp_path)[0])
    out = make_pair_batch(batch, spec=_spec(cross_clip_fraction=0), seed=3)
    from se4lip_dist.shards import decode_audio
    audios = [decode_audio(a) for a in batch["audio"]]
    windows = [audio_windows(a, 5, SPF) for a in audios]
    for wav in out["wav"]:
        hits = [(r, int(np.flatnonzero((w == wav).all(axis=1))[0]))
                for r, w in enumerate(windows) if (w == wav).all(axis=1).any()]
        assert hits, "every audio window comes from a row at a frame boundary"
    assert out["label"].mean() == 0.5


def test_a_batch_without_pairs_keeps_the_tensor_columns(tmp_path) -> None:
    """Rows too short for a window yield no pair: the block must still be typed like the
    others (Ray Data would otherwise pickle it, with a warning, and mix block types)."""
    from se4lip_dist.stream import pair_block

    m = write_synthetic_shards(tmp_path, n_clips=2, n_frames=3, val_clips=0)
    batch = _read_batch(Manifest.load(tmp_path).shard_paths(tmp_path)[0])
    empty = pair_block(batch, spec=_spec(), seed=0)
    full_dir = tmp_path / "full"
    write_synthetic_shards(full_dir, n_clips=2, n_frames=30, val_clips=0)
    full = pair_block(_read_batch(Manifest.load(full_dir).shard_paths(full_dir)[0]),
                      spec=_spec(), seed=0)
    from ray.data.block import BlockAccessor

    typed = BlockAccessor.batch_to_block(full)
    assert empty.num_rows == 0 and empty.schema == typed.schema, (empty.schema, typed.schema)
    assert m.total_frames == 6
