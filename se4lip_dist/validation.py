"""Validation: one protocol that scores an encoder on held-out clips.

It is used three ways and gives the same numbers for the same model and data each time: every
epoch inside the training workers (each rank scores its share, the sums are reduced), the
registry gate (new version, current champion and a random-init encoder on the same clips), and
``se4lip-dist models compare``.

What is scored (all settings are in :class:`Protocol`, recorded with every score):

- **sync pairs**: ``pairs_per_segment`` pairs per validation row, drawn with a fixed seed from
  fixed groups of rows, so every model and every worker count sees the same pairs: BCE, sync
  accuracy (cosine > 0.5), accuracy on hard negatives;
- **AV offset** of every validation unit (a whole clip, or a ``val_chunk_frames`` piece of one;
  at most ``val_max_clips`` clips) with the audio as recorded and delayed/advanced by each of
  ``val_shifts`` frames (:func:`sync.clip_sync`). ``val/shift_acc``, the headline, is the share
  of units whose offset is found within one frame at *every* shift: a model that ignores its
  input answers one offset whatever the shift and scores 0. ``val/offset_acc`` (the share of
  (unit, shift) trials) and ``val/offset_acc_shift{s}`` stand beside it. Every interval counts
  units, not trials: the shifts of one clip are one clip's evidence.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from se4lip_dist import storage
from se4lip_dist.collectives import all_gather, all_reduce_sum
from se4lip_dist.config import HEADLINE, Config
from se4lip_dist.losses import sync_bce_loss, sync_cosine
from se4lip_dist.manifest import Manifest
from se4lip_dist.models import build_model, lip_input
from se4lip_dist.shards import decode_audio, decode_lips
from se4lip_dist.splits import SplitRule, clip_frames, crop_rows, stable_unit
from se4lip_dist.stream import HARD, READ_COLUMNS, PairSpec, make_pair_batch
from se4lip_dist.sync import (
    ClipSync,
    bootstrap_interval,
    chance_offset_accuracy,
    clip_sync,
    constant_floor,
    wilson_interval,
)

PAIR_SEED = 0
"""Seed of the validation pairs, fixed apart from ``train.seed``: models trained with different
seeds are scored on the same pairs."""
ROWS_PER_GROUP = 16
"""Validation rows per pair-sampling group (cross-clip negatives come from the same group)."""
SUBSET_SALT = "se4lip-val-subset"

METRICS: dict[str, str] = {
    HEADLINE: "max",
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
    held_out_for: str = ""
    """Another model whose training frames were cut out too (the gate's like-for-like set)."""

    @property
    def digest(self) -> str:
        """Short hash of the protocol: equal digests mean comparable scores."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        shifts = ", ".join(f"{s:+d}" for s in self.shifts)
        pieces = (f" in {self.chunk_frames}-frame pieces" if self.chunk_frames else "")
        both = f", only frames {self.held_out_for} never trained on" if self.held_out_for else ""
        return (f"{self.clips} clips of data {self.data_hash} ({self.split}{both}){pieces}, "
                f"offsets "
                f"searched over +-{self.max_offset} frames with the audio shifted by {shifts} "
                f"frames, {self.pairs_per_segment} pairs per row (seed {self.pair_seed})")


@dataclass(frozen=True)
class HeldOut:
    """The frames another model (the champion) never trained on, per clip id.

    ``train_end[c]`` is the first frame of clip ``c`` after that model's training frames (its
    training range is always a head ``[0, end)``: whole clips or a time split's head); clips it
    never saw are absent and wholly held out. Clip ids hash the input video, so this holds
    across shard folders prepared from the same videos.
    """

    name: str
    train_end: dict[str, int]

    @classmethod
    def of(cls, name: str, manifest: Manifest, cfg: Config) -> HeldOut:
        """What a model trained with ``cfg`` on ``manifest`` held out."""
        # A model's training range is a head [0, end) of each clip, so its length is the end.
        return cls(name, clip_frames(manifest, SplitRule.for_manifest(manifest, cfg))["train"])

    def ranges(self, clip_id: str, split: Any, speaker: Any,
               clip_frames: int) -> dict[str, tuple[int, int]]:
        """The :meth:`SplitRule.ranges` shape, so :func:`splits.crop_rows` can cut with it."""
        return {"val": (self.train_end.get(clip_id, 0), clip_frames)}

    def crop(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` cut to the frames held out here too; rows left empty are dropped."""
        if not rows:
            return rows
        cut = crop_rows(_as_batch(rows), self, "val")  # type: ignore[arg-type]
        return [{c: cut[c][i] for c in READ_COLUMNS} for i in range(len(cut["clip_id"]))]


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
             manifest: Manifest | None = None,
             held_out: HeldOut | None = None) -> ValidationSet:
        """Read this rank's share of the validation rows of a prepared folder.

        Args:
            held_out: keep only frames that another model never trained on either (the gate's
                like-for-like set); clips left with none drop out.

        Raises:
            ValidationError: the folder has no validation clips (left).
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
            chunk_frames=tc.val_chunk_frames, held_out_for=held_out.name if held_out else "",
        )
        # Every rank reads the same rows (cut to their validation frames), in the same order,
        # then keeps its share: the groups, hence the pairs, do not depend on the world size.
        rows = _read_rows(data_dir, manifest, set(chosen), rule)
        if held_out is not None:
            rows = held_out.crop(rows)
            chosen = sorted({r["clip_id"] for r in rows})
            if not chosen:
                raise ValidationError(f"{data_dir}: no validation frames are held out for "
                                      f"{held_out.name} too")
            protocol = replace(protocol, clips=len(chosen))
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
    index = manifest.clips_table(["clip_id", "shard"])
    for c, shard in zip(index["clip_id"].to_pylist(), index["shard"].to_pylist(), strict=True):
        if c in clip_ids:
            by_shard.setdefault(shard, []).append(c)
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


def _units(vset: ValidationSet, cfg: Config) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(unit name, lips, audio)`` of every unit this rank searches: whole clips, or the
    ``chunk_frames`` pieces of each (named ``clip#k``)."""
    spf, chunk = cfg.data.samples_per_frame, vset.protocol.chunk_frames
    out = []
    for cid, rows in vset.clip_rows.items():
        lips = np.concatenate([decode_lips(list(r["lips"])) for r in rows])
        audio = np.concatenate([decode_audio(r["audio"]) for r in rows])
        for k, (a, b) in enumerate(search_pieces(len(lips), chunk)):
            out.append((cid if chunk is None else f"{cid}#{k}", lips[a:b],
                        audio[a * spf:b * spf]))
    return out


def _search_units(model: Any, cfg: Config, units: list[tuple[str, np.ndarray, np.ndarray]],
                  p: Protocol, keep_curve: bool) -> tuple[list[ClipSync], int]:
    """The shift protocol's offset search on each unit; also how many were too short."""
    searched: list[ClipSync] = []
    too_short = 0
    for name, lips, audio in units:
        try:
            searched.append(clip_sync(model, cfg, lips, audio, shifts=p.shifts,
                                      max_offset=p.max_offset, clip_id=name,
                                      keep_distances=keep_curve and not searched))
        except ValueError:
            too_short += 1
    return searched, too_short


def score_shuffled(model: Any, cfg: Config, vset: ValidationSet) -> dict[str, float]:
    """The offset scores of ``model`` when every unit's lips get the next unit's audio.

    A content-blind baseline: an encoder that reads lips and speech cannot follow shifts of a
    voice that is not moving those lips, so whatever it scores here it scores without sync.
    Single process only (the pairing needs every unit). Fewer than two units give NaN scores.
    """
    units = _units(vset, cfg)
    if len(units) < 2:
        return {"val/shift_acc": float("nan"), "val/units": float(len(units))}
    paired = [(f"{name}~{units[(i + 1) % len(units)][0]}", lips, units[(i + 1) % len(units)][2])
              for i, (name, lips, _) in enumerate(units)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        searched, _ = _search_units(model, cfg, paired, vset.protocol, False)
    model.train(was_training)
    return offset_metrics(searched, vset.protocol)


def offset_metrics(clips: list[ClipSync], p: Protocol) -> dict[str, float]:
    """The AV-offset scores of searched units, every interval over units (module docstring)."""
    units = len(clips)
    consistent = sum(c.consistent for c in clips)
    per_unit = [float(np.mean(c.hits)) for c in clips]
    lo, hi = wilson_interval(consistent, units)
    olo, ohi = bootstrap_interval(per_unit)
    floor = constant_floor(p.shifts, p.max_offset)
    nan = float("nan")
    out = {
        "val/shift_acc": consistent / units if units else nan,
        "val/shift_acc_ci_low": lo,
        "val/shift_acc_ci_high": hi,
        "val/units": float(units),
        "val/offset_acc": float(np.mean(per_unit)) if units else nan,
        "val/offset_acc_ci_low": olo,
        "val/offset_acc_ci_high": ohi,
        "val/offset_trials": float(sum(len(c.hits) for c in clips)),
        "val/offset_chance": chance_offset_accuracy(p.max_offset),
        "val/constant_shift_acc": floor["consistent"],
        "val/constant_offset_acc": floor["offset"],
        "val/clips": float(len({c.clip_id.split("#")[0] for c in clips})),
        "val/searched": float(units),
        "val/windows": float(sum(c.windows for c in clips)),
    }
    zero = p.shifts.index(0)
    out["val/lse_d"] = float(np.mean([c.lse_d[zero] for c in clips])) if units else nan
    out["val/lse_c"] = float(np.mean([c.lse_c[zero] for c in clips])) if units else nan
    for j, s in enumerate(p.shifts):
        hits = sum(c.hits[j] for c in clips)
        out[f"val/offset_acc_shift{s}"] = hits / units if units else nan
        slo, shi = wilson_interval(hits, units)
        out[f"val/offset_acc_shift{s}_ci_low"] = slo
        out[f"val/offset_acc_shift{s}_ci_high"] = shi
    return out


def score(
    model: Any,
    cfg: Config,
    vset: ValidationSet,
    device: torch.device | str = "cpu",
    *,
    keep_curve: bool = False,
    reduce: Callable[[list[float]], list[float]] | None = None,
    gather: Callable[[Any], list[Any]] = all_gather,
) -> ValidationResult:
    """Score a whole :class:`~se4lip_dist.models.SE4Lip` (unwrapped, any device) on ``vset``.

    Under ``torch.distributed`` every rank must call this with its own share; the returned
    metrics and clips are the whole set's on every rank.

    Returns:
        ``val/...`` metrics (see module docstring and :func:`offset_metrics`) and the per-unit
        offset searches.
    """
    device = torch.device(device)
    reduce = reduce or functools.partial(all_reduce_sum, device=device)
    p = vset.protocol
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pair_sums = _pair_sums(model, cfg, vset, device)
        searched, too_short = _search_units(model, cfg, _units(vset, cfg), p, keep_curve)
    model.train(was_training)

    sums = reduce([*pair_sums[:7], float(too_short), *pair_sums[7:]])
    clips = sorted((c for part in gather(searched) for c in part), key=lambda c: c.clip_id)
    metrics = {**offset_metrics(clips, p), "val/too_short": sums[7],
               **_pair_metrics(sums[:7], sums[8:], cfg.model.embed_dim)}
    return ValidationResult(metrics=metrics, clips=clips, protocol=p)


def _pair_sums(model: Any, cfg: Config, vset: ValidationSet, device: torch.device) -> list[float]:
    """This rank's sums over its validation pairs: loss, correct, pairs, hard negatives right,
    hard negatives, speech and lip embedding norms, then per dimension how often the speech and
    the lip embeddings were positive."""
    p = vset.protocol
    spec = PairSpec(window_frames=cfg.train.window_frames,
                    samples_per_frame=cfg.data.samples_per_frame,
                    pairs_per_segment=p.pairs_per_segment,
                    hard_negative_fraction=p.hard_negative_fraction,
                    cross_clip_fraction=p.cross_clip_fraction, hard_offset_max=p.hard_offset_max)
    dim = cfg.model.embed_dim
    loss_sum = correct = n = hard_ok = hard_n = a_norm = v_norm = 0.0
    a_alive = torch.zeros(dim, dtype=torch.float64)
    v_alive = torch.zeros(dim, dtype=torch.float64)
    chunk = max(cfg.train.batch_size * 2, 32)
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
    return [loss_sum, correct, n, hard_ok, hard_n, a_norm, v_norm,
            *a_alive.tolist(), *v_alive.tolist()]


def _pair_metrics(sums: list[float], alive: list[float], dim: int) -> dict[str, float]:
    """The pair metrics of the whole set from the reduced :func:`_pair_sums`."""
    loss_sum, correct, n, hard_ok, hard_n, a_norm, v_norm = sums

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {"val/loss": ratio(loss_sum, n),
            "val/sync_acc": ratio(correct, n),
            "val/hard_neg_acc": ratio(hard_ok, hard_n),
            "val/pairs": n,
            # Collapse watch: a collapsed encoder gives flat distances, a meaningless offset.
            "val/speech_norm": ratio(a_norm, n),
            "val/lip_norm": ratio(v_norm, n),
            "val/speech_dead_frac": (sum(c == 0 for c in alive[:dim]) / dim if n
                                     else float("nan")),
            "val/lip_dead_frac": (sum(c == 0 for c in alive[dim:]) / dim if n
                                  else float("nan"))}


def model_from_state(model_state: dict[str, Any], cfg: Config) -> Any:
    """A whole SE4Lip of ``cfg``'s architecture and window with ``model_state`` loaded."""
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    model.load_state_dict(model_state)
    return model


def score_state(model_state: dict[str, Any], cfg: Config, vset: ValidationSet) -> ValidationResult:
    """Score a whole-model ``state_dict`` built with ``cfg`` (its architecture and window) on
    ``vset`` in this process (the registry gate and ``models compare``)."""
    return score(model_from_state(model_state, cfg), cfg, vset)


__all__ = [
    "HEADLINE",
    "LEGACY_METRICS",
    "METRICS",
    "PAIR_SEED",
    "HeldOut",
    "Protocol",
    "ValidationError",
    "ValidationResult",
    "ValidationSet",
    "is_better",
    "metric_name",
    "model_from_state",
    "offset_metrics",
    "score",
    "score_shuffled",
    "score_state",
    "search_pieces",
]
