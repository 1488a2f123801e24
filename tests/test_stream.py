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


def test_collate_gives_the_pairs_of_make_pair_batch_as_tensors(tmp_path) -> None:
    """The training collate is make_pair_batch (same pairs for the same seed and rows)."""
    import torch

    from se4lip_dist.stream import PairCollate

    write_synthetic_shards(tmp_path, n_clips=4, n_frames=30, val_clips=0)
    batch = _read_batch(Manifest.load(tmp_path).shard_paths(tmp_path)[0])
    spec = _spec()
    out = PairCollate(spec, None, seed=11)(batch)
    ref = make_pair_batch(batch, spec=spec, seed=11)
    assert set(out) == set(ref)
    for k, v in ref.items():
        assert isinstance(out[k], torch.Tensor)
        np.testing.assert_array_equal(out[k].numpy(), v)
    other = PairCollate(spec, None, seed=12)(batch)
    assert not torch.equal(other["wav"], out["wav"])


def test_pair_seed_differs_per_epoch_and_pass() -> None:
    from se4lip_dist.stream import pair_seed

    seeds = {pair_seed(s, e, k) for s in (0, 1) for e in range(4) for k in range(3)}
    assert len(seeds) == 24 and pair_seed(0, 1) == pair_seed(0, 1, 0)


@pytest.fixture(scope="module")
def ray_session():  # type: ignore[no-untyped-def]
    import ray

    from se4lip_dist.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_stream_repeats_per_seed_and_epoch(tmp_path, ray_session) -> None:
    """One consumer: the same seed gives the same batches (file order and pairs); the next
    epoch, or another seed, gives others. Batches are full; rows without a training pair
    (validation clips: dropped in the read task) are never delivered."""
    import torch

    from se4lip_dist.config import load_config
    from se4lip_dist.splits import SplitRule
    from se4lip_dist.stream import iter_pair_batches, pair_seed, row_dataset

    write_synthetic_shards(tmp_path, n_clips=12, n_frames=30, val_clips=3, clips_per_shard=1)
    cfg = load_config("cpu-small", overrides=["train.pairs_per_segment=4"])
    rule = SplitRule.for_manifest(Manifest.load(tmp_path), cfg)
    spec = PairSpec.from_config(cfg)

    def epochs(seed: int) -> list[list[np.ndarray]]:
        it = row_dataset(str(tmp_path), cfg.override({"train.seed": seed})).streaming_split(
            1, equal=True)[0]
        out = []
        for epoch in range(2):
            batches = list(iter_pair_batches(it, spec=spec, rule=rule, batch_size=12,
                                             seed=pair_seed(seed, epoch), rows_per_batch=1))
            assert all(len(b["label"]) == 12 for b in batches)
            assert all(b["lips"].dtype == torch.uint8 for b in batches)
            out.append([b["wav"].numpy() for b in batches])
        return out

    a, b, c = epochs(5), epochs(5), epochs(6)
    # 9 training clips x 4 pairs in batches of 12: batches straddle 2 and 3 collated rows.
    assert len(a[0]) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.stack(x), np.stack(y))
    assert not np.array_equal(np.stack(a[0]), np.stack(a[1]))
    assert not np.array_equal(np.stack(a[0]), np.stack(c[0]))



@pytest.mark.timeout(300)
def test_reads_go_on_when_trials_hold_every_cpu(tmp_path, ray_session) -> None:
    """On a cluster, trials waiting for capacity hold CPU slices (their drivers) and running
    trials hold the rest (their ranks): the running trials' shard reads must still run."""
    import threading
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from se4lip_dist.stream import read_shards

    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=4, n_frames=20, val_clips=1, clips_per_shard=2)
    # Built first, as a trial builds it before it queues: Ray Data samples the files then.
    ds = read_shards(str(data))
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60  # the sampling tasks' leases end
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    held = placement_group([{"CPU": total}])
    assert held.wait(30)
    rows: list[int] = []
    try:
        reader = threading.Thread(target=lambda: rows.append(len(ds.take_all())), daemon=True)
        reader.start()
        reader.join(timeout=90)
        assert rows == [4], "the reads waited for a CPU that trials held"
    finally:
        remove_placement_group(held)
