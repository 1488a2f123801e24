"""Splits by clip, speaker and time: which frames train and which validate."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_fixtures import SPF, write_synthetic_shards

from se4lip_dist.config import load_config
from se4lip_dist.manifest import ClipRecord, Manifest
from se4lip_dist.shards import decode_audio
from se4lip_dist.splits import SplitError, SplitRule, clip_frames, crop_rows, stable_unit
from se4lip_dist.stream import READ_COLUMNS


def test_clip_split_is_deterministic_and_the_manifest_wins() -> None:
    rule = SplitRule("clip", 0.1)
    ids = [f"clip{i}" for i in range(2000)]
    first = [rule.role(c, None) for c in ids]
    assert first == [rule.role(c, None) for c in ids]
    assert first.count("val") / len(ids) == pytest.approx(0.1, abs=0.02)
    assert rule.role("clip1", "val") == "val" and rule.role("clip1", "train") == "train"
    assert rule.role("clip1", "test") is None  # kept out of both
    assert 0 <= stable_unit("x") < 1


def _manifest(speakers: list[str], frames: int = 100) -> Manifest:
    m = Manifest(config={})
    for i, spk in enumerate(speakers):
        m.clips[f"c{i:02d}"] = ClipRecord(source=f"c{i}.mp4", frames=frames, segments=1,
                                          shard="s", speaker=spk)
    return m


def test_speaker_split_holds_out_whole_speakers() -> None:
    cfg = load_config("cpu-small", overrides=["train.split=speaker", "train.val_fraction=0.25"])
    m = _manifest([s for s in "abcdefgh" for _ in range(3)])
    rule = SplitRule.for_manifest(m, cfg)
    assert len(rule.val_speakers) == 2
    roles = clip_frames(m, rule)
    val_speakers = {m.clips[c].speaker for c in roles["val"]}
    train_speakers = {m.clips[c].speaker for c in roles["train"]}
    assert val_speakers == set(rule.val_speakers) and not val_speakers & train_speakers
    with pytest.raises(SplitError, match="at least two speakers"):
        SplitRule.for_manifest(_manifest(["a", "a"]), cfg)


@pytest.mark.parametrize("n", [100, 251, 1000])
def test_time_split_ranges_leave_a_guard_gap(n: int) -> None:
    cfg = load_config("cpu-small", overrides=["train.split=time", "train.val_fraction=0.1"])
    rule = SplitRule.for_manifest(_manifest(["a"], n), cfg)
    assert rule.guard == cfg.train.window_frames + cfg.train.max_offset
    (tr0, tr1), (va0, va1) = rule.frames("train", n), rule.frames("val", n)
    assert tr0 == 0 and va1 == n and va1 - va0 == round(0.1 * n)
    assert va0 - tr1 == rule.guard  # no validation window or offset search reaches training


def test_crop_rows_cuts_segments_at_the_split(tmp_path) -> None:
    """Two clips of 300 frames in segments of 120: the tail and head of every clip, exact."""
    m = write_synthetic_shards(tmp_path, n_clips=2, n_frames=300, val_clips=0,
                               segment_frames=120)
    table = pq.read_table(m.shard_paths(tmp_path)[0], columns=READ_COLUMNS)
    batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in READ_COLUMNS}
    cfg = load_config("cpu-small", overrides=["train.split=time", "train.val_fraction=0.2"])
    rule = SplitRule.for_manifest(m, cfg)
    full = {(c, int(s)): decode_audio(a) for c, s, a in
            zip(batch["clip_id"], batch["segment"], batch["audio"], strict=True)}
    for role in ("train", "val"):
        lo, hi = rule.frames(role, 300)
        out = crop_rows(batch, rule, role)
        for cid in ("synth000", "synth001"):
            idx = [i for i, c in enumerate(out["clip_id"]) if c == cid]
            covered = sorted(f for i in idx for f in range(
                out["start_frame"][i], out["start_frame"][i] + out["n_frames"][i]))
            assert covered == list(range(lo, hi)), (role, cid)
            for i in idx:
                n = int(out["n_frames"][i])
                assert len(out["lips"][i]) == n
                audio = decode_audio(out["audio"][i])
                assert len(audio) == n * SPF
                seg = int(out["segment"][i])
                offset = out["start_frame"][i] - seg * 120
                np.testing.assert_array_equal(
                    audio, full[(cid, seg)][offset * SPF:(offset + n) * SPF])


def test_long_tails_are_searched_in_pieces() -> None:
    from se4lip_dist.validation import search_pieces

    assert search_pieces(545, None) == [(0, 545)]
    assert search_pieces(100, 75) == [(0, 100)]  # too short for two pieces: one search
    assert search_pieces(545, 75) == [(0, 75), (75, 150), (150, 225), (225, 300), (300, 375),
                                      (375, 450), (450, 545)]
