"""Which frames train and which validate: by clip, by speaker, or by time inside each clip.

One :class:`SplitRule` (``train.split``) decides it everywhere: the training pairs
(:mod:`se4lip_dist.stream`), the validation set and the registry gate
(:mod:`se4lip_dist.validation`), and the driver's checks.

- ``clip``: whole clips; a split recorded by ``prepare`` wins (``val``/``valid``/``dev`` -> val,
  ``train`` -> train, anything else is kept out of both), else a stable hash of the clip id puts
  about ``val_fraction`` of the clips in validation.
- ``speaker``: whole speakers (the manifest's ``speaker``): validation speakers never train, so
  the scores say how the encoder does on voices and faces it never saw. Needs two speakers.
- ``time``: every clip trains on its head and validates on its tail (the last ``val_fraction``
  of its frames, as ER-NeRF holds out the end of a subject's video), with a guard gap of
  ``guard`` frames between them (default: window + max offset), so no validation window and no
  offset search reaches a training frame. This is the per-subject regime: one person, one video.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from se4lip_dist.config import Config

SPLITS = ("clip", "speaker", "time")
VAL_SPLIT_NAMES = frozenset({"val", "valid", "validation", "dev"})
TRAIN_SPLIT_NAMES = frozenset({"train", "training"})
ROLES = ("train", "val")


class SplitError(ValueError):
    """A split that cannot be made on this data (one speaker, too short clips, ...)."""


def stable_unit(text: str) -> float:
    """A float in [0, 1) from a stable hash of ``text`` (identical across processes and runs)."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


SPLIT_COLUMNS = ["clip_id", "split", "speaker", "frames"]
"""The clip-record columns (:meth:`se4lip_dist.manifest.Manifest.clips_table`) a split reads."""


@dataclass(frozen=True)
class SplitRule:
    """How frames are divided between training and validation (picklable into Ray tasks).

    Build it with :meth:`for_manifest` so that a speaker split knows its validation speakers.
    """

    kind: str = "clip"
    val_fraction: float = 0.1
    guard: int = 0
    """Frames left out between a clip's training head and validation tail (``time``)."""
    val_speakers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_manifest(cls, manifest: Any, cfg: Config) -> SplitRule:
        """The rule of ``cfg.train.split`` for the clips of ``manifest``.

        Raises:
            SplitError: a speaker split with fewer than two speakers.
        """
        tc = cfg.train
        guard = tc.split_guard if tc.split_guard is not None else (
            tc.window_frames + tc.max_offset)
        if tc.split != "speaker":
            return cls(tc.split, tc.val_fraction, guard)
        speakers = sorted({s or "" for s in manifest.clips_table(["speaker"])["speaker"]
                           .unique().to_pylist()})
        if len(speakers) < 2:
            raise SplitError(f"train.split=speaker needs clips of at least two speakers; the "
                             f"manifest names {speakers or ['none']}: use train.split=clip or "
                             "time, or give prepare a manifest with a speaker column")
        ranked = sorted(speakers, key=lambda s: stable_unit(f"se4lip-speaker:{s}"))
        n_val = min(len(speakers) - 1, max(1, round(tc.val_fraction * len(speakers))))
        return cls("speaker", tc.val_fraction, guard, frozenset(ranked[:n_val]))

    def role(self, clip_id: str, split: str | None, speaker: str | None = None) -> str | None:
        """``train``, ``val``, ``both`` (time split) or None (kept out: a ``test`` clip)."""
        if split:
            s = split.lower()
            if s not in VAL_SPLIT_NAMES and s not in TRAIN_SPLIT_NAMES:
                return None
            if self.kind == "clip":
                return "val" if s in VAL_SPLIT_NAMES else "train"
        if self.kind == "time":
            return "both"
        if self.kind == "speaker":
            return "val" if (speaker or "") in self.val_speakers else "train"
        return "val" if stable_unit(f"se4lip-split:{clip_id}") < self.val_fraction else "train"

    def frames(self, role: str, clip_frames: int) -> tuple[int, int]:
        """The frame range ``[start, stop)`` of a clip used for ``role`` under a time split."""
        cut = clip_frames - max(1, round(self.val_fraction * clip_frames))
        if role == "val":
            return cut, clip_frames
        return 0, max(0, cut - self.guard)

    def ranges(self, clip_id: str, split: str | None, speaker: str | None,
               clip_frames: int) -> dict[str, tuple[int, int]]:
        """Frame ranges of a clip per role (empty for a role it has no frames in)."""
        r = self.role(clip_id, split, speaker)
        if r is None:
            return {}
        if r == "both":
            return {role: self.frames(role, clip_frames) for role in ROLES}
        return {r: (0, clip_frames)}

    def describe(self) -> str:
        if self.kind == "time":
            return (f"time: the last {self.val_fraction:.0%} of every clip validates, a "
                    f"{self.guard}-frame gap before it, the rest trains")
        if self.kind == "speaker":
            return f"speaker: {', '.join(sorted(self.val_speakers))} validate"
        return (f"clip: the manifest's split, else a clip-id hash (val_fraction "
                f"{self.val_fraction:g})")


def clip_frames(manifest: Any, rule: SplitRule) -> dict[str, dict[str, int]]:
    """Frames per role for every clip of a manifest: ``{"train": {id: n}, "val": {id: n}}``.

    Reads only the ``clip_id``, ``split``, ``speaker`` and ``frames`` columns of its index.
    """
    out: dict[str, dict[str, int]] = {role: {} for role in ROLES}
    table = manifest.clips_table(SPLIT_COLUMNS).sort_by("clip_id")
    for cid, split, speaker, frames in zip(*(table[c].to_pylist() for c in SPLIT_COLUMNS),
                                           strict=True):
        for role, (a, b) in rule.ranges(cid, split, speaker, frames).items():
            if b > a:
                out[role][cid] = b - a
    return out


def crop_rows(batch: dict[str, Any], rule: SplitRule, role: str) -> dict[str, np.ndarray]:
    """Rows of a shard batch cut to the frames ``role`` may use; rows with none are dropped.

    Needs the columns ``clip_id``, ``split``, ``speaker``, ``start_frame``, ``clip_frames``,
    ``n_frames``, ``sample_rate``, ``fps``, ``lips`` (JPEG per frame) and ``audio`` (int16 PCM);
    cropping slices the JPEG list and the PCM bytes (nothing is decoded).
    """
    keep: list[int] = []
    cols: dict[str, list[Any]] = {k: [] for k in batch}
    for i in range(len(batch["clip_id"])):
        ranges = rule.ranges(str(batch["clip_id"][i]), batch["split"][i],
                             batch["speaker"][i], int(batch["clip_frames"][i]))
        if role not in ranges:
            continue
        lo, hi = ranges[role]
        start, n = int(batch["start_frame"][i]), int(batch["n_frames"][i])
        a, b = max(lo, start) - start, min(hi, start + n) - start
        if b <= a:
            continue
        keep.append(i)
        spf_bytes = 2 * int(batch["sample_rate"][i]) // int(batch["fps"][i])
        for k in batch:
            v = batch[k][i]
            if k == "lips":
                v = list(v)[a:b]
            elif k == "audio":
                v = bytes(v)[a * spf_bytes:b * spf_bytes]
            elif k == "n_frames":
                v = b - a
            elif k == "start_frame":
                v = start + a
            cols[k].append(v)
    out: dict[str, np.ndarray] = {}
    for k, values in cols.items():
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        out[k] = arr
    return out


__all__ = [
    "ROLES",
    "SPLITS",
    "SPLIT_COLUMNS",
    "SplitError",
    "SplitRule",
    "clip_frames",
    "crop_rows",
    "stable_unit",
]
