"""Ray Data streaming of prepared shards into training pairs.

Shard rows (one segment of a clip each, see :mod:`se4lip_dist.shards`) are read lazily with
``ray.data.read_parquet`` (:func:`row_dataset`) and streamed as stored, JPEG frames and int16 PCM,
to the training workers. Each worker turns them into audio/lip pairs in Ray's prefetch threads
(:func:`iter_pair_batches`): the object store and the streaming coordinator move compact rows
rather than decoded windows, and a frame is decoded by the process that trains on it.

A pair is a ``window_frames`` lip window plus an audio window of the same length:

- positive (label 1): the audio that belongs to exactly those frames;
- hard negative: audio of the same segment shifted by 2..``hard_offset_max`` frames;
- far negative: audio of the same segment shifted further than ``hard_offset_max`` frames;
- cross-clip negative: audio of another clip's row in the same batch.

Half of the pairs of every row are positive. The sampling itself (:func:`sample_pairs`) is pure
numpy so it is unit-tested without Ray; :func:`make_pair_batch` applies it to a batch of rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow.compute as pc
import ray.data
import torch
from ray.data import FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn

from se4lip_dist.config import Config
from se4lip_dist.manifest import Manifest, ManifestError
from se4lip_dist.shards import decode_audio, decode_lips
from se4lip_dist.splits import SplitRule, clip_frames, crop_rows
from se4lip_dist.storage import fs_and_paths

POSITIVE, HARD, FAR, CROSS = 0, 1, 2, 3
"""Pair kinds in the ``kind`` column."""
KIND_NAMES = ("positive", "hard", "far", "cross")

READ_COLUMNS = ["clip_id", "split", "speaker", "segment", "start_frame", "n_frames",
                "clip_frames", "sample_rate", "fps", "lips", "audio"]


@dataclass(frozen=True)
class PairSpec:
    """Everything :func:`sample_pairs` needs, picklable into Ray Data tasks."""

    window_frames: int = 5
    samples_per_frame: int = 640
    pairs_per_segment: int = 8
    hard_negative_fraction: float = 0.5
    cross_clip_fraction: float = 0.25
    hard_offset_max: int = 3

    @classmethod
    def from_config(cls, cfg: Config) -> PairSpec:
        """Pair sampling settings of a resolved config."""
        t = cfg.train
        return cls(
            window_frames=t.window_frames,
            samples_per_frame=cfg.data.samples_per_frame,
            pairs_per_segment=t.pairs_per_segment,
            hard_negative_fraction=t.hard_negative_fraction,
            cross_clip_fraction=t.cross_clip_fraction,
            hard_offset_max=t.hard_offset_max,
        )


class Pair(NamedTuple):
    """One sampled pair: lips of ``row`` from ``lip_start``, audio of ``audio_row``."""

    row: int
    lip_start: int
    audio_row: int
    audio_start: int
    label: int
    kind: int


def sample_pairs(
    n_frames: Sequence[int],
    clip_ids: Sequence[str],
    spec: PairSpec,
    rng: np.random.Generator,
) -> list[Pair]:
    """Sample balanced pairs for a batch of rows.

    Every row with at least ``window_frames`` frames yields ``pairs_per_segment`` pairs, half of
    them positive (odd counts alternate the extra pair between rows). A negative is cross-clip
    with probability ``cross_clip_fraction`` when another clip is in the batch; otherwise it is
    hard (shift 2..``hard_offset_max``) with probability ``hard_negative_fraction`` and far
    (beyond ``hard_offset_max``) else. When a row is too short for the drawn kind the next
    feasible kind is used (far -> hard -> cross); a row that can yield no negative at all is
    skipped entirely so labels stay balanced.

    Args:
        n_frames: frames per row.
        clip_ids: clip id per row (cross-clip negatives take audio from a different clip).
        spec: sampling settings.
        rng: random generator (seed it for reproducible validation pairs).

    Returns:
        The pairs, grouped by row.
    """
    t = spec.window_frames
    hmax = spec.hard_offset_max
    k = spec.pairs_per_segment
    usable = [i for i, n in enumerate(n_frames) if n >= t]
    pairs: list[Pair] = []
    odd_extra = 0
    for i in usable:
        span = n_frames[i] - t  # largest shift that keeps both windows in the row
        others = [j for j in usable if clip_ids[j] != clip_ids[i]]
        if span < 2 and not others:
            continue
        n_pos = k // 2
        if k % 2:
            n_pos += odd_extra
            odd_extra ^= 1
        for _ in range(n_pos):
            s = int(rng.integers(0, span + 1))
            pairs.append(Pair(i, s, i, s, 1, POSITIVE))
        for _ in range(k - n_pos):
            pairs.append(_negative(i, span, hmax, others, n_frames, t, spec, rng))
    return pairs


def _negative(
    i: int,
    span: int,
    hmax: int,
    others: list[int],
    n_frames: Sequence[int],
    t: int,
    spec: PairSpec,
    rng: np.random.Generator,
) -> Pair:
    kind = FAR
    if others and rng.random() < spec.cross_clip_fraction:
        kind = CROSS
    elif rng.random() < spec.hard_negative_fraction:
        kind = HARD
    if kind == FAR and span <= hmax:
        kind = HARD
    if kind == HARD and span < 2:
        kind = CROSS  # sample_pairs guarantees `others` is non-empty here
    if kind == CROSS:
        j = others[int(rng.integers(len(others)))]
        s = int(rng.integers(0, span + 1))
        return Pair(i, s, j, int(rng.integers(0, n_frames[j] - t + 1)), 0, CROSS)
    lo, hi = (2, min(hmax, span)) if kind == HARD else (hmax + 1, span)
    shift = int(rng.integers(lo, hi + 1)) * (1 if rng.random() < 0.5 else -1)
    # Lip start range that keeps the shifted audio window inside the row.
    s_lo, s_hi = max(0, -shift), span - max(0, shift)
    s = int(rng.integers(s_lo, s_hi + 1))
    return Pair(i, s, i, s + shift, 0, kind)


def _batch_rng(batch: dict[str, Any], seed: int | None) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    key = "|".join(f"{c}:{s}" for c, s in zip(batch["clip_id"], batch["segment"], strict=True))
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8])])


def make_pair_batch(
    batch: dict[str, Any],
    *,
    spec: PairSpec,
    rule: SplitRule | None = None,
    role: str = "train",
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Turn a batch of shard rows into a batch of pairs (training collate, validation pairs).

    With a ``rule``, rows are first cut to the frames ``role`` may use (other clips, or the
    other part of a clip under a time split, are dropped). JPEGs are decoded only for the frames
    the pairs use.

    Args:
        batch: numpy batch with at least the :data:`READ_COLUMNS` columns.
        spec: pair sampling settings.
        rule: the split rule; None keeps every row as it is (already selected by the caller).
        role: ``train`` or ``val``.
        seed: the pairs are a function of ``seed`` and the rows; None draws fresh pairs.

    Returns:
        Columns ``wav`` float32 [P, window_frames*samples_per_frame], ``lips`` uint8
        [P, window_frames, h, w, 3], ``label`` float32 [P], ``kind`` int8 [P] (shuffled order).
    """
    source = crop_rows(batch, rule, role) if rule is not None else batch
    rows = {k: np.asarray(v) for k, v in source.items()}
    clip_ids = [str(c) for c in rows["clip_id"]]
    n_frames = [int(n) for n in rows["n_frames"]]
    rng = _batch_rng(rows, seed)
    pairs = sample_pairs(n_frames, clip_ids, spec, rng)
    t, spf = spec.window_frames, spec.samples_per_frame
    if not pairs:
        return _empty_pairs(t, spf)
    order = rng.permutation(len(pairs))
    audio_cache: dict[int, np.ndarray] = {}
    frame_cache: dict[tuple[int, int], np.ndarray] = {}

    def frames(r: int, start: int) -> np.ndarray:
        need = [f for f in range(start, start + t) if (r, f) not in frame_cache]
        if need:
            jpegs = rows["lips"][r]
            for f, img in zip(need, decode_lips([jpegs[f] for f in need]), strict=True):
                frame_cache[(r, f)] = img
        return np.stack([frame_cache[(r, f)] for f in range(start, start + t)])

    wav, lips, label, kind = [], [], [], []
    for idx in order:
        p = pairs[idx]
        if p.audio_row not in audio_cache:
            audio_cache[p.audio_row] = decode_audio(rows["audio"][p.audio_row])
        a = audio_cache[p.audio_row]
        wav.append(a[p.audio_start * spf:(p.audio_start + t) * spf])
        lips.append(frames(p.row, p.lip_start))
        label.append(p.label)
        kind.append(p.kind)
    return {
        "wav": np.stack(wav).astype(np.float32),
        "lips": np.stack(lips),
        "label": np.asarray(label, np.float32),
        "kind": np.asarray(kind, np.int8),
    }


def _empty_pairs(t: int, spf: int) -> dict[str, np.ndarray]:
    return {
        "wav": np.zeros((0, t * spf), np.float32),
        "lips": np.zeros((0, t, 1, 1, 3), np.uint8),
        "label": np.zeros((0,), np.float32),
        "kind": np.zeros((0,), np.int8),
    }


def read_shards(data_dir: str, *, shuffle_files: bool = False, seed: int | None = None,
                concurrency: int | None = None, row_filter: Any = None) -> ray.data.Dataset:
    """Lazy Ray dataset over the shards a prepared folder's manifest names (columns we need).

    With ``shuffle_files`` the file order is shuffled on every execution (every epoch); with a
    ``seed`` too, the order of execution ``i`` is a function of ``(seed, i)`` (Ray's
    ``FileShuffleConfig`` with ``reseed_after_execution``). ``concurrency`` caps the read tasks
    in flight (None: as many as the CPUs allow); ``row_filter`` is a pyarrow expression
    applied in the Parquet scan.

    Raises:
        ManifestError: no or unreadable manifest, or a manifest with no shards.
        ShardSchemaError: a shard is missing, unreadable or of another schema version.
    """
    manifest = Manifest.load(data_dir)
    paths = manifest.shard_paths(data_dir)
    if not paths:
        raise ManifestError(f"{data_dir}: the manifest lists no shards")
    manifest.check_shards(data_dir)  # refuse shards of another schema version up front
    # Parquet V1 reader: V2 (Ray 2.60's default) starts footer-reader actors to list files on
    # every execution, i.e. every epoch, which delays the first batch of each epoch
    # (benchmarks/bench_pipeline.py); the manifest already lists the files, so V2 buys nothing.

    filesystem, paths = fs_and_paths(paths)
    ctx = ray.data.DataContext.get_current()
    use_v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    shuffle = FileShuffleConfig(seed=seed) if shuffle_files else None
    try:
        # 0-CPU read tasks (``concurrency`` bounds them): a read that needs a CPU slice waits
        # while training ranks and the drivers of trials queued for capacity hold every CPU of
        # the cluster, and the ranks it feeds never finish.
        return ray.data.read_parquet(
            paths, columns=READ_COLUMNS, shuffle=shuffle,
            num_cpus=0, filesystem=filesystem, concurrency=concurrency, filter=row_filter,
        )
    finally:
        ctx.use_datasource_v2 = use_v2


def row_dataset(data_dir: str, cfg: Config) -> ray.data.Dataset:
    """Training rows as stored (JPEG frames, int16 PCM), files in a seeded per-epoch order.

    The stream carries the compact shard rows; pair sampling and JPEG decoding run in the
    consumer (:func:`iter_pair_batches`), so the object store moves encoded frames instead of
    decoded windows, and a row's frames are decoded once, by the process that trains on them.
    Clips with no training frames are filtered out in the Parquet scan (the manifest says which
    they are), so ``streaming_split(equal=True)`` shares out rows that yield pairs. Blocks keep
    their read order (``preserve_order``) so that, for a given ``train.seed``, a single consumer
    sees the same rows in the same batches on every run. One read task per training worker is
    in flight: reading compact rows is cheap, and more fractional-CPU tasks than a node has
    cores make Ray start a worker process per task and kill it when idle, every epoch
    (benchmarks/bench_pipeline.py measures that churn).
    """
    manifest = Manifest.load(data_dir)
    rule = SplitRule.for_manifest(manifest, cfg)
    train = sorted(clip_frames(manifest, rule)["train"])
    ds = read_shards(data_dir, shuffle_files=True, seed=cfg.train.seed,
                     concurrency=cfg.train.num_workers,
                     row_filter=pc.field("clip_id").isin(train))
    ds.context.execution_options.preserve_order = True
    return ds


def pair_seed(seed: int, epoch: int, pass_index: int = 0) -> int:
    """Pair-sampling seed of one pass over the rows: fixed per ``(train.seed, epoch, pass)``,
    different for every epoch and pass (``train.steps_per_epoch`` can take several passes)."""
    return int(np.random.SeedSequence([seed, epoch, pass_index]).generate_state(1)[0])


class PairCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: shard rows -> shuffled pairs as CPU tensors.

    Runs :func:`make_pair_batch` (split crop, pair sampling, decoding of the frames the pairs
    use) in Ray's prefetch threads of the consuming process. Pairs depend on ``seed`` and the
    rows of the batch only, never on the thread or the call order.
    """

    def __init__(self, spec: PairSpec, rule: SplitRule | None, seed: int) -> None:
        self.spec = spec
        self.rule = rule
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = make_pair_batch(batch, spec=self.spec, rule=self.rule, role="train",
                              seed=self.seed)
        return {k: torch.from_numpy(v) for k, v in out.items()}


def iter_pair_batches(
    rows: Any,
    *,
    spec: PairSpec,
    rule: SplitRule | None,
    seed: int,
    batch_size: int,
    device: Any = "cpu",
    rows_per_batch: int = 16,
    shuffle_buffer: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """One pass of training batches of ``batch_size`` pairs from a stream of shard rows.

    Args:
        rows: a Ray ``Dataset`` or ``DataIterator`` of :func:`row_dataset` rows (in training,
            ``ray.train.get_dataset_shard("train")``).
        spec: pair sampling settings.
        rule: the split rule (training frames only); None keeps every row.
        seed: pair-sampling seed of this pass (:func:`pair_seed`); also seeds the row buffer.
        batch_size: pairs per batch; the last incomplete batch is dropped.
        device: where the batches go (Ray moves them after collating).
        rows_per_batch: shard rows sampled together; more rows give more cross-clip choice.
        shuffle_buffer: rows mixed across files before sampling (None: files in shuffled order).
        prefetch_batches: row batches Ray collates ahead of the consumer.

    Yields:
        ``wav``, ``lips``, ``label``, ``kind`` tensors as in :func:`make_pair_batch`.
    """
    carry: dict[str, Any] | None = None  # the pairs of the last block short of a batch
    for block in rows.iter_torch_batches(
            batch_size=rows_per_batch, collate_fn=PairCollate(spec, rule, seed), device=device,
            local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed,
            prefetch_batches=prefetch_batches):
        n = len(block["label"])
        if carry is not None and n:
            # Only one batch straddles two blocks: copy that one, not the whole block.
            need = batch_size - len(carry["label"])
            head = {k: torch.cat([carry[k], v[:need]]) for k, v in block.items()}
            if n < need:
                carry = head
                continue
            yield head
            block = {k: v[need:] for k, v in block.items()}
            n -= need
        elif not n:
            continue  # rows with no pair (validation-only, or shorter than a window)
        full = n // batch_size * batch_size
        for i in range(0, full, batch_size):
            yield {k: v[i:i + batch_size] for k, v in block.items()}
        carry = {k: v[full:] for k, v in block.items()} if full < n else None


__all__ = [
    "CROSS",
    "FAR",
    "HARD",
    "KIND_NAMES",
    "POSITIVE",
    "Pair",
    "PairCollate",
    "PairSpec",
    "iter_pair_batches",
    "make_pair_batch",
    "pair_seed",
    "read_shards",
    "row_dataset",
    "sample_pairs",
]
