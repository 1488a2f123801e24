"""Prepared-shards folders of synthetic clips with known audio offsets, for the audit tests.

Built from :mod:`shard_fixtures`' talking mouths (lips follow the loudness envelope at offset
0), then broken on purpose per clip: audio delayed by ``shift`` frames, silenced, shortened,
without a detected face, or dubbed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shard_fixtures import FPS, SR, make_segments

from se4lip_dist.manifest import ClipRecord, Manifest
from se4lip_dist.shards import ShardWriter, segments_to_table


@dataclass(frozen=True)
class Clip:
    """One synthetic clip to write."""

    clip_id: str
    shift: int = 0
    """Audio delayed by this many frames (wrapping): the clip's true offset."""
    frames: int = 100
    silent: bool = False
    no_face: bool = False
    mismatched: bool = False
    """Lips of another clip's speech (a dub): no offset fits."""


def write_clips(out_dir: str | Path, clips: list[Clip], *, crop: int = 48, seed: int = 0,
                clips_per_shard: int = 4, segment_frames: int = 40) -> Manifest:
    """Write ``clips`` as a prepared-shards folder (shards, index files, manifest.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = Manifest(config={"data": {"fps": FPS, "sample_rate": SR, "crop_size": crop,
                                         "segment_frames": segment_frames}})
    writer = ShardWriter(out, shard_bytes=1 << 62, prefix="shard")
    pending: dict[str, ClipRecord] = {}
    for i, c in enumerate(clips):
        segs = make_segments(c.clip_id, c.frames, rng, crop=crop, segment_frames=segment_frames,
                             split="train", audio_shift=c.shift)
        other = make_segments(c.clip_id, c.frames, rng, crop=crop,
                              segment_frames=segment_frames) if c.mismatched else segs
        for s, o in zip(segs, other, strict=True):
            s.lips_jpeg = o.lips_jpeg
            if c.silent:
                s.audio = np.zeros_like(s.audio)
            if c.no_face:  # as prepare records a face found in 1 of 10 regular detections
                s.detected = np.zeros_like(s.detected)
        writer.add(c.clip_id, segments_to_table(segs))
        pending[c.clip_id] = ClipRecord(source=f"/videos/{c.clip_id}.mp4", frames=c.frames,
                                        segments=len(segs), shard="", speaker="synth",
                                        split="train", missing_fraction=0.9 if c.no_face else 0.0)
        if len(pending) == clips_per_shard or i == len(clips) - 1:
            info = writer.flush()
            assert info is not None
            manifest.add_shard(info, pending)
            pending = {}
    manifest.save(out)
    return manifest
