"""Validation: one protocol that scores an encoder on held-out clips.

It is used three ways and gives the same numbers for the same model and data each time: every
epoch inside the training workers (each rank scores its share, the sums are reduced), the
registry gate (new version, current champion and a random-init encoder on the same clips), and
``se4lip-dist models compare``.

What is scored (all settings are in :class:`Protocol`, recorded with every score):

- **sync pairs**: ``pairs_per_segment`` pairs per validation row, drawn with a fixed seed from
  fixed groups of rows, so every model and every worker count sees the same pairs: BCE, sync
  accuracy (cosine > 0.5), accuracy on hard negatives;
- **AV offset** of every validation clip (whole clips, at most ``val_max_clips``) with the audio
  as recorded and delayed/advanced by each of ``val_shifts`` frames (:func:`sync.clip_sync`). An
  encoder whose distance curve bottoms out near zero whatever the audio cannot score well.
  ``val/offset_acc`` is the share of (clip, shift) trials found within one frame, reported with
  its Wilson 95 % interval and the counts behind it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from se4lip_dist import storage
from se4lip_dist.config import Config
from se4lip_dist.losses import sync_bce_loss, sync_cosine
from se4lip_dist.manifest import Manifest
from se4lip_dist.models import build_model, lip_input
from se4lip_dist.shards import decode_audio, decode_lips
from se4lip_dist.splits import SplitRule, clip_frames, crop_rows, stable_unit
from se4lip_dist.stream import HARD, READ_COLUMNS, PairSpec, make_pair_batch
from se4lip_dist.sync import ClipSync, chance_offset_accuracy, clip_sync, wilson_interval

PAIR_SEED = 0
"""Seed of the validation pairs, fixed apart from ``train.seed``: models trained with different
seeds are scored on the same pairs."""
ROWS_PER_GROUP = 16
"""Validation rows per pair-sampling group (cross-clip negatives come from the same group)."""
SUBSET_SALT = "se4lip-val-subset"

METRICS: dict[str, str] = {
    "val/offset_acc": "max",
    "val/sync_acc": "max",
    "val/hard_neg_acc": "max",
    "val/loss": "min",
}
"""Metrics a run, a search or the gate can rank by, and which direction is better."""
LEGACY_METRICS = {"val_offset_acc": "val/offset_acc", "val_sync_acc": "val/sync_acc",
                  "val_hard_neg_acc": "val/hard_neg_acc", "val_loss": "val/loss"}
TIE_BREAK = "val/loss"
"""Decides between two scores equal on the ranking metric (lower is better)."""


class ValidationError(ValueError):
    """A validation set that cannot be built (no validation clips, unknown metric)."""


def metric_name(name: str) -> str:
    """The canonical name of a ranking metric (``val_offset_acc`` -> ``val/offset_acc``).

    Raises:
        ValidationError: not a metric validation reports.
    """
    canonical = LEGACY_METRICS.get(name, name)
    if canonical not in METRICS:
        raise ValidationError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}")
    return canonical


def is_better(new: dict[str, float], old: dict[str, float], metric: str, mode: str) -> bool:
    """Whether scores ``new`` beat ``old`` on ``metric`` (ties broken by lower ``val/loss``)."""
    a, b = new.get(metric, float("nan")), old.get(metric, float("nan"))
    if not np.isfinite(a):
        return False
    if not np.isfinite(b):
        return True
    if a != b:
        return a > b if mode == "max" else a < b
    la, lb = new.get(TIE_BREAK, float("nan")), old.get(TIE_BREAK, float("nan"))
    return bool(np.isfinite(la) and (not np.isfinite(lb) or la < lb))


@dataclass(frozen=True)
class Protocol:
    """Everything that decides a validation score besides the model."""

    data_hash: str
    """Content hash of the shards (``Manifest.content_hash``)."""
    split: str
    """How validation clips were chosen."""
    clips: int
    """Validation clips scored."""
    max_offset: int
    shifts: tuple[int, ...]
    pair_seed: int
    pairs_per_segment: int
    hard_negative_fraction: float
    cross_clip_fraction: float
    hard_offset_max: int
    chunk_frames: int | None = None
    rows_per_group: int = ROWS_PER_GROUP

    @property
    def digest(self) -> str:
        """Short hash of the protocol: equal digests mean comparable scores."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        shifts = ", ".join(f"{s:+d}" for s in self.shifts)
        pieces = (f" in {self.chunk_frames}-frame pieces" if self.chunk_frames else "")
        return (f"{self.clips} clips of data {self.data_hash} ({self.split}){pieces}, offsets "
                f"searched over +-{self.max_offset} frames with the audio shifted by {shifts} "
                f"frames, {self.pairs_per_segment} pairs per row (seed {self.pair_seed})")


@dataclass
class ValidationSet:
    """The validation rows one rank scores, and the protocol they follow.

    Build it with :meth:`load`; rank ``r`` of ``world`` holds clips ``r, r + world, ...`` for the
    offset search and pair groups ``r, r + world, ...`` for the sync pairs.
    """

    protocol: Protocol
    clip_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Clip id -> its rows (segments in order), for the clips this rank searches."""
    groups: list[list[dict[str, Any]]] = field(default_factory=list)
    """Row groups this rank draws pairs from."""

    @classmethod
    def load(cls, data_dir: str, cfg: Config, *, rank: int = 0, world: int = 1,
             manifest: Manifest | None = None) -> ValidationSet:
        """Read this rank's share of the validation rows of a prepared folder.

        Raises:
            ValidationError: the folder has no validation clips.
        """
        manifest = manifest or Manifest.load(data_dir)
        tc = cfg.train
        rule = SplitRule.for_manifest(manifest, cfg)
        val_frames = clip_frames(manifest, rule)["val"]
        if not val_frames:
            raise ValidationError(f"{data_dir}: no validation frames ({rule.describe()})")
        chosen = sorted(val_frames)
        if len(chosen) > tc.val_max_clips:
            chosen = sorted(sorted(chosen, key=lambda c: stable_unit(f"{SUBSET_SALT}:{c}"))
                            [: tc.val_max_clips])
        split = rule.describe()
        if len(chosen) < len(val_frames):
            split += f"; a fixed subset of {len(chosen)} of {len(val_frames)} validation clips"
        protocol = Protocol(
            data_hash=manifest.content_hash(), split=split, clips=len(chosen),
            max_offset=tc.max_offset, shifts=tuple(tc.val_shifts), pair_seed=PAIR_SEED,
            pairs_per_segment=tc.pairs_per_segment,
            hard_negative_fraction=tc.hard_negative_fraction,
            cross_clip_fraction=tc.cross_clip_fraction, hard_offset_max=tc.hard_offset_max,
            chunk_frames=tc.val_chunk_frames,
        )
        # Every rank reads the same rows (cut to their validation frames), in the same order,
        # then keeps its share: the groups, hence the pairs, do not depend on the world size.
        rows = _read_rows(data_dir, manifest, set(chosen), rule)
        groups = [rows[i:i + ROWS_PER_GROUP] for i in range(0, len(rows), ROWS_PER_GROUP)]
        by_clip: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_clip.setdefault(r["clip_id"], []).append(r)
        return cls(protocol=protocol,
                   clip_rows={c: by_clip[c] for c in chosen[rank::world] if c in by_clip},
                   groups=groups[rank::world])


def _read_rows(data_dir: str, manifest: Manifest, clip_ids: set[str],
               rule: SplitRule) -> list[dict[str, Any]]:
    """The rows of ``clip_ids`` cut to their validation frames, sorted by (clip, segment);
    only the shards that hold them are read."""
    by_shard: dict[str, list[str]] = {}
    for c in clip_ids:
        by_shard.setdefault(manifest.clips[c].shard, []).append(c)
    paths = dict(zip([s.file for s in manifest.shards], manifest.shard_paths(data_dir),
                     strict=True))
    rows: list[dict[str, Any]] = []
    for shard, ids in sorted(by_shard.items()):
        fs, path = storage.resolve(paths[shard])
        table = pq.read_table(path, columns=READ_COLUMNS, filesystem=fs,
                              filters=[("clip_id", "in", sorted(ids))])
        cut = crop_rows({c: np.asarray(table[c].to_pylist(), dtype=object)
                         for c in READ_COLUMNS}, rule, "val")
        rows += [{c: cut[c][i] for c in READ_COLUMNS} for i in range(len(cut["clip_id"]))]
    found = {r["clip_id"] for r in rows}
    if found != clip_ids:
        raise ValidationError(f"{data_dir}: the shards lack validation rows of "
                              f"{sorted(clip_ids - found)[:3]} that the manifest names")
    return sorted(rows, key=lambda r: (r["clip_id"], int(r["segment"])))


def search_pieces(n: int, size: int | None) -> list[tuple[int, int]]:
    """Frame ranges searched separately: the whole clip, or consecutive ``size``-frame pieces
    (a shorter remainder joins the last piece)."""
    if size is None or n < 2 * size:
        return [(0, n)]
    starts = list(range(0, n - size + 1, size))
    return [(a, a + size) for a in starts[:-1]] + [(starts[-1], n)]


def _as_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch: dict[str, np.ndarray] = {}
    for col in READ_COLUMNS:
        values = [r[col] for r in rows]
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        batch[col] = arr
    return batch


@dataclass
class ValidationResult:
    """Scores of one model under one protocol."""

    metrics: dict[str, float]
    clips: list[ClipSync]
    protocol: Protocol

    def table(self) -> dict[str, list[Any]]:
        """Per-clip results as columns (``mlflow.log_table``)."""
        rows = [c.to_row() for c in self.clips]
        keys = list(rows[0]) if rows else ["clip_id"]
        return {k: [r.get(k) for r in rows] for k in keys}


def _reducer(device: torch.device) -> Callable[[list[float]], list[float]]:
    """Sum across ranks under torch.distributed (on ``device``: NCCL reduces CUDA tensors only)."""
    def reduce(values: list[float]) -> list[float]:
        if not (dist.is_available() and dist.is_initialized()):
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    return reduce


def _default_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def score(
    model: Any,
    cfg: Config,
    vset: ValidationSet,
    device: torch.device | str = "cpu",
    *,
    keep_curve: bool = False,
    reduce: Callable[[list[float]], list[float]] | None = None,
    gather: Callable[[Any], list[Any]] = _default_gather,
) -> ValidationResult:
    """Score a whole :class:`~se4lip_dist.models.SE4Lip` (unwrapped, any device) on ``vset``.

    Under ``torch.distributed`` every rank must call this with its own share; the returned
    metrics and clips are the whole set's on every rank.

    Returns:
        ``val/...`` metrics (see module docstring) and the per-clip offset searches.
    """
    device = torch.device(device)
    reduce = reduce or _reducer(device)
    p = vset.protocol
    spec = PairSpec(window_frames=cfg.train.window_frames,
                    samples_per_frame=cfg.data.samples_per_frame,
                    pairs_per_segment=p.pairs_per_segment,
                    hard_negative_fraction=p.hard_negative_fraction,
                    cross_clip_fraction=p.cross_clip_fraction, hard_offset_max=p.hard_offset_max)
    dim = cfg.model.embed_dim
    was_training = model.training
    model.eval()
    loss_sum = correct = n = hard_ok = hard_n = a_norm = v_norm = 0.0
    a_alive = torch.zeros(dim, dtype=torch.float64)
    v_alive = torch.zeros(dim, dtype=torch.float64)
    chunk = max(cfg.train.batch_size * 2, 32)
    with torch.no_grad():
        for group in vset.groups:
            pairs = make_pair_batch(_as_batch(group), spec=spec, seed=p.pair_seed)
            for i in range(0, len(pairs["label"]), chunk):
                y = torch.from_numpy(pairs["label"][i:i + chunk]).to(device)
                wav = torch.from_numpy(pairs["wav"][i:i + chunk]).to(device)
                lips = torch.from_numpy(pairs["lips"][i:i + chunk]).to(device)
                kind = torch.from_numpy(pairs["kind"][i:i + chunk]).to(device)
                a, v = model(wav, lip_input(lips, cfg.model))
                a_norm += float(a.float().norm(dim=1).sum())
                v_norm += float(v.float().norm(dim=1).sum())
                a_alive += (a > 0).sum(0).double().cpu()
                v_alive += (v > 0).sum(0).double().cpu()
                loss_sum += float(sync_bce_loss(a, v, y)) * len(y)
                ok = (sync_cosine(a, v) > 0.5) == (y > 0.5)
                hard = kind == HARD
                correct += float(ok.sum())
                hard_ok += float((ok & hard).sum())
                hard_n += float(hard.sum())
                n += len(y)
        searched: list[ClipSync] = []
        too_short = 0
        spf = cfg.data.samples_per_frame
        for cid, rows in vset.clip_rows.items():
            lips_np = np.concatenate([decode_lips(list(r["lips"])) for r in rows])
            audio = np.concatenate([decode_audio(r["audio"]) for r in rows])
            for k, (a, b) in enumerate(search_pieces(len(lips_np), p.chunk_frames)):
                name = cid if p.chunk_frames is None else f"{cid}#{k}"
                try:
                    searched.append(clip_sync(model, cfg, lips_np[a:b],
                                              audio[a * spf:b * spf], shifts=p.shifts,
                                              max_offset=p.max_offset, clip_id=name,
                                              keep_distances=keep_curve and not searched))
                except ValueError:
                    too_short += 1
    model.train(was_training)

    per_shift = [0.0] * (2 * len(p.shifts))  # hits, trials per shift
    lse_d = lse_c = windows = 0.0
    for c in searched:
        for j, h in enumerate(c.hits):
            per_shift[2 * j] += float(h)
            per_shift[2 * j + 1] += 1.0
        zero = c.shifts.index(0) if 0 in c.shifts else 0
        lse_d += c.lse_d[zero]
        lse_c += c.lse_c[zero]
        windows += c.windows
    n_ids = len({c.clip_id.split("#")[0] for c in searched})
    sums = reduce([loss_sum, correct, n, hard_ok, hard_n, a_norm, v_norm, lse_d, lse_c, windows,
                   float(len(searched)), float(too_short), float(n_ids), *per_shift,
                   *a_alive.tolist(), *v_alive.tolist()])
    (loss_sum, correct, n, hard_ok, hard_n, a_norm, v_norm, lse_d, lse_c, windows, n_searched,
     too_short, n_clips) = sums[:13]
    per_shift = sums[13:13 + len(per_shift)]
    alive = sums[13 + len(per_shift):]
    clips = sorted((c for part in gather(searched) for c in part), key=lambda c: c.clip_id)

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    hits, trials = sum(per_shift[0::2]), sum(per_shift[1::2])
    lo, hi = wilson_interval(hits, trials)
    metrics: dict[str, float] = {
        "val/offset_acc": ratio(hits, trials),
        "val/offset_acc_ci_low": lo,
        "val/offset_acc_ci_high": hi,
        "val/offset_chance": chance_offset_accuracy(p.max_offset),
        "val/offset_trials": trials,
        "val/clips": n_clips,
        "val/searched": n_searched,
        "val/too_short": too_short,
        "val/windows": windows,
        "val/lse_d": ratio(lse_d, n_searched),
        "val/lse_c": ratio(lse_c, n_searched),
        "val/loss": ratio(loss_sum, n),
        "val/sync_acc": ratio(correct, n),
        "val/hard_neg_acc": ratio(hard_ok, hard_n),
        "val/pairs": n,
        # Collapse watch: a collapsed encoder gives flat distances and a meaningless offset.
        "val/speech_norm": ratio(a_norm, n),
        "val/lip_norm": ratio(v_norm, n),
        "val/speech_dead_frac": sum(c == 0 for c in alive[:dim]) / dim if n else float("nan"),
        "val/lip_dead_frac": sum(c == 0 for c in alive[dim:]) / dim if n else float("nan"),
    }
    for j, s in enumerate(p.shifts):
        metrics[f"val/offset_acc_shift{s}"] = ratio(per_shift[2 * j], per_shift[2 * j + 1])
    return ValidationResult(metrics=metrics, clips=clips, protocol=p)


def score_state(model_state: dict[str, Any], cfg: Config, vset: ValidationSet) -> ValidationResult:
    """Score a whole-model ``state_dict`` built with ``cfg`` (its architecture and window) on
    ``vset`` in this process (the registry gate and ``models compare``)."""
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    model.load_state_dict(model_state)
    return score(model, cfg, vset)


__all__ = [
    "LEGACY_METRICS",
    "METRICS",
    "PAIR_SEED",
    "Protocol",
    "ValidationError",
    "ValidationResult",
    "ValidationSet",
    "is_better",
    "metric_name",
    "score",
    "score_state",
    "search_pieces",
]
