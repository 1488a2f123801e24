"""Tiny synthetic shards straight from numpy: a mouth that opens with the audio's loudness.

Each clip has a random syllable envelope (per video frame); the audio is a noisy buzz scaled by
that envelope and the lip crop is a face-coloured square with a dark mouth ellipse whose height
follows the same envelope. Audio and lips are therefore in sync at offset 0 and nowhere else,
which is all a sync model needs to learn.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from se4lip_dist.manifest import INDEX_GLOB, MANIFEST, ClipRecord, Manifest
from se4lip_dist.shards import Segment, ShardWriter, encode_jpeg, segments_to_table

FPS = 25
SR = 16000
SPF = SR // FPS

TINY_MODEL = [
    "model.gru_layers=1", "model.embed_dim=32", "model.lip_channels=[8,16,16,32,32]",
    "model.lip_height=32", "model.lip_width=32", "model.cnn_channels=[8,16,16,32]",
    "train.batch_size=16", "train.pairs_per_segment=16", "train.max_offset=8",
    "train.shuffle_buffer=64",
]
"""A model and sampler small enough for Ray Train tests on 2 cores (offset search +-8 frames:
the validation shifts of +-3 stay clear of the search edges)."""
TINY_TRAIN = [*TINY_MODEL, "train.lr=0.002", "train.num_workers=2", "train.cpus_per_worker=0.4"]
"""TINY_MODEL with a learning rate that learns sync in a few epochs, on 2 workers."""


def register_random_model(uri: str, cfg, name: str, *, speech_only: bool = False) -> str:  # type: ignore[no-untyped-def]
    """Log and register a seeded random-weight SE4Lip of ``cfg``; returns its version URI."""
    import torch

    from se4lip_dist.models import build_model
    from se4lip_dist.registry import log_model, register_model, speech_state_dict
    from se4lip_dist.tracking import start_run

    torch.manual_seed(0)
    model = build_model(cfg.model, window_frames=cfg.train.window_frames)
    state = model.state_dict()
    run_id = start_run(uri, "train", "r", params={}, tags={}, config_yaml=cfg.to_yaml())
    version = register_model(uri, log_model(uri, run_id, cfg,
                                            speech_state_dict(state) if speech_only else state),
                             name, run_id=run_id)
    return f"models:/{name}/{version}"


def envelope(n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Per-frame loudness in [0, 1]: syllables of 2-6 frames separated by 1-5 silent frames."""
    env = np.zeros(n_frames, np.float32)
    f = int(rng.integers(0, 3))
    while f < n_frames:
        length = int(rng.integers(2, 7))
        env[f:f + length] = rng.uniform(0.4, 1.0)
        f += length + int(rng.integers(1, 6))
    return env


def audio_from_envelope(env: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 audio (len(env) * 640 samples): a 150-250 Hz buzz plus noise, scaled per frame."""
    n = len(env) * SPF
    t = np.arange(n) / SR
    f0 = rng.uniform(150, 250)
    carrier = 0.6 * np.sign(np.sin(2 * np.pi * f0 * t)) + 0.4 * rng.standard_normal(n)
    gain = np.repeat(env, SPF)
    return (0.3 * gain * carrier + 0.005 * rng.standard_normal(n)).astype(np.float32)


def mouth_frame(opening: float, size: int, shade: float) -> np.ndarray:
    """A size x size RGB crop with a dark ellipse whose height grows with ``opening``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    ry, rx = 2 + opening * size * 0.22, size * 0.28
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([200, 150, 130], np.float32) * shade
    img[inside] = (40, 10, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_segments(
    clip_id: str, n_frames: int, rng: np.random.Generator, *, crop: int = 48,
    segment_frames: int = 250, split: str | None = None, audio_shift: int = 0,
) -> list[Segment]:
    """The segments of one synthetic clip (audio delayed by ``audio_shift`` frames, wrapping)."""
    env = envelope(n_frames, rng)
    audio = np.roll(audio_from_envelope(env, rng), audio_shift * SPF)
    shade = float(rng.uniform(0.8, 1.1))
    jpegs = [encode_jpeg(mouth_frame(float(e), crop, shade), 90) for e in env]
    segs = []
    for seg, start in enumerate(range(0, n_frames, segment_frames)):
        n = min(segment_frames, n_frames - start)
        segs.append(Segment(
            clip_id=clip_id, segment=seg, start_frame=start, clip_frames=n_frames, fps=FPS,
            sample_rate=SR, crop_size=crop, lips_jpeg=jpegs[start:start + n],
            audio=audio[start * SPF:(start + n) * SPF],
            keypoints=np.zeros((n, 10), np.float32), det_score=np.ones(n, np.float32),
            detected=np.ones(n, bool), speaker="synth", split=split,
        ))
    return segs


def write_synthetic_shards(
    out_dir: str | Path, *, n_clips: int = 24, n_frames: int = 60, crop: int = 48,
    seed: int = 0, clips_per_shard: int = 6, val_clips: int = 4, segment_frames: int = 250,
    train_audio_shift: int = 0,
) -> Manifest:
    """Write a prepared-shards folder (shards + manifest.json) of synthetic clips.

    The last ``val_clips`` clips get ``split="val"``, the others ``"train"``. With
    ``train_audio_shift`` the training clips' audio is delayed by that many frames (a model
    trained on them learns the wrong offset); the validation clips stay in sync.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = Manifest(config={"data": {"fps": FPS, "sample_rate": SR, "crop_size": crop}})
    writer = ShardWriter(out, shard_bytes=1 << 62, prefix="shard")
    pending: dict[str, ClipRecord] = {}
    for c in range(n_clips):
        cid = f"synth{c:03d}"
        split = "val" if c >= n_clips - val_clips else "train"
        segs = make_segments(cid, n_frames, rng, crop=crop, segment_frames=segment_frames,
                             split=split,
                             audio_shift=train_audio_shift if split == "train" else 0)
        writer.add(cid, segments_to_table(segs))
        pending[cid] = ClipRecord(source=f"{cid}.mp4", frames=n_frames, segments=len(segs),
                                  shard="", speaker="synth", split=split)
        if len(pending) == clips_per_shard or c == n_clips - 1:
            info = writer.flush()
            assert info is not None
            for rec in pending.values():
                rec.shard = info.file
            manifest.add_shard(info, pending)
            pending = {}
    manifest.save(out)
    return manifest


def downgrade_to_layout1(out_dir: str | Path) -> dict:
    """Rewrite a prepared folder the way se4lip-dist wrote it before per-shard index files:
    every clip record inside ``manifest.json`` (``clips``, and clip ids per shard), no index
    files. Returns the JSON written."""
    out = Path(out_dir)
    m = Manifest.load(out)
    clips = m.clips
    d = m.to_json()
    del d["layout"]
    d["shards"] = [{k: v for k, v in asdict(s).items() if k != "index"}
                   | {"clips": sorted(c for c, r in clips.items() if r.shard == s.file)}
                   for s in m.shards]
    d["clips"] = {k: asdict(v) for k, v in sorted(clips.items())}
    for p in out.glob(INDEX_GLOB):
        p.unlink()
    (out / MANIFEST).write_text(json.dumps(d, indent=1))
    return d
