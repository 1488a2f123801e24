"""``audit``: measure every clip's audio-video offset, classify it, and optionally correct it.

A renderer or encoder trained on clips whose audio runs late learns late lips; this stage finds
those clips before anything trains on them. Each clip (a prepared clip of a shards folder, or
a video) is searched with the shift protocol of :mod:`se4lip_dist.sync`: its audio is delayed
by each of ``shifts`` frames and the offset searched every time (:func:`~se4lip_dist.sync.
clip_sync`). A clip whose audio really runs ``k`` frames late answers ``k + s`` at shift ``s``,
so the clip's offset is the median of ``offset - shift`` and the clip is *consistent* when
every shift lands within :data:`~se4lip_dist.sync.OFFSET_TOLERANCE` of ``k + s``. Signs follow
:mod:`se4lip_dist.sync`: ``k > 0`` means the sound of a mouth movement comes ``k`` frames late.

Every clip gets one status:

- ``in_sync``: consistent, confident, ``|k| <= sync_tolerance``;
- ``offset``: consistent, confident, ``|k| > sync_tolerance`` (``offset`` holds ``k``);
- ``undecidable``, with a ``reason``: ``too_short`` (fewer windows than the search needs),
  ``silent`` (audio RMS below ``silence_rms``), ``no_face`` (most of the clip's face
  detections found none, or a video with none), ``unreadable`` (a video that cannot be decoded),
  ``inconsistent`` (the shifts disagree), ``search_edge`` (an answer on the edge of the
  search range) or ``low_confidence`` (LSE-C, median minus minimum distance, below
  ``min_confidence`` at some shift). Undecidable clips are never corrected.

The job runs where ``extract`` runs: an autoscaling pool of actors
(:class:`~se4lip_dist.extract.ActorJobPool`), each loading the model once, over jobs of up to
:data:`CLIPS_PER_JOB` clips of one shard (or one video each). The driver writes the per-clip
table (``audit.parquet``, ``audit.csv``), ``audit_report.md``/``.html`` with the offset
histogram (``offset_histogram.png``), and logs all of them to an MLflow run of its own.

With ``fix_out`` the actors also write a corrected copy (a prepared-shards folder): an
``offset`` clip's audio is advanced by its ``k`` frames and both streams are trimmed to their
overlap (``|k|`` frames shorter: for ``k > 0`` the last video frames and the first audio go, for
``k < 0`` the first video frames and the last audio); ``in_sync`` clips are copied unchanged,
undecidable ones are dropped (or kept and flagged). Each clip's index record carries
``audit_status``, ``audit_offset`` (the frames it was corrected by) and ``audit_model`` (the
pinned model that measured it), so training, extraction and evaluation read corrected data and
anyone can trace why a clip changed. A ``--fix`` run that stops part way resumes when run again
with the same model, data and settings: each finished job leaves a record of its clips in
``audit_jobs/`` once its shard is published, and the rerun audits only the jobs without one.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from se4lip_dist import storage
from se4lip_dist.config import Config
from se4lip_dist.evaluate import local_face_overrides
from se4lip_dist.extract import ActorJobPool, output_names
from se4lip_dist.faces import FaceModelError, build_detector
from se4lip_dist.manifest import (
    INDEX_SCHEMA,
    MANIFEST,
    ClipRecord,
    IndexedShardWriter,
    Manifest,
    ManifestCommitter,
    ManifestError,
    recover,
    table_records,
)
from se4lip_dist.placement import DEFAULT_TIMEOUT_S
from se4lip_dist.plots import pyplot, save_figure
from se4lip_dist.prepare import (
    PrepareInput,
    clip_id_for,
    collect_inputs,
    process_clip,
    segment_bounds,
)
from se4lip_dist.registry import RegistryError, load_sync_model, pin_model
from se4lip_dist.shards import (
    SCHEMA,
    ShardInfo,
    ShardSchemaError,
    decode_lips,
    segments_to_table,
)
from se4lip_dist.sync import OFFSET_TOLERANCE, clip_sync, is_hit, wilson_interval
from se4lip_dist.tracking import (
    RunLogger,
    TrackingError,
    check_reachable,
    end_run,
    resolve_tracking_uri,
    start_run,
)

IN_SYNC = "in_sync"
OFFSET = "offset"
UNDECIDABLE = "undecidable"
STATUSES = (IN_SYNC, OFFSET, UNDECIDABLE)
REASONS = ("too_short", "silent", "no_face", "unreadable", "inconsistent", "search_edge",
           "low_confidence")
"""Why a clip is undecidable (see the module docstring)."""
AUDIT_SHIFTS = (-3, 0, 3)
"""Audio shifts every clip is searched at (as in training validation)."""
MIN_CONFIDENCE = 0.01
"""Default least LSE-C (median minus minimum distance, this encoder's scale) of a decision."""
CLIPS_PER_JOB = 16
"""Most clips of one shard an actor audits as one job (the unit a lost actor redoes)."""
UNDECIDABLE_MODES = ("drop", "keep")
TABLE_FILE = "audit.parquet"
CSV_FILE = "audit.csv"
REPORT_FILE = "audit_report.md"
HTML_FILE = "audit_report.html"
HISTOGRAM_FILE = "offset_histogram.png"
FIX_FILE = "audit_fix.json"
"""In a ``fix_out`` folder: the model, data and settings that write it (a rerun with the same
ones resumes it)."""
JOBS_DIR = "audit_jobs"
"""In a ``fix_out`` folder: one record (clip audits and shard) per finished job."""


class AuditError(RuntimeError):
    """A problem that stops the whole audit (bad model, data, output folder or cluster)."""


@dataclass(frozen=True)
class AuditSettings:
    """How clips are measured and classified."""

    shifts: tuple[int, ...] = AUDIT_SHIFTS
    """Audio shifts (frames) each clip is searched at."""
    max_offset: int = 15
    """Search range ``+-max_offset`` frames (syncnet_python's 15)."""
    min_confidence: float = MIN_CONFIDENCE
    """Least LSE-C at every shift for a decision; below it the clip is ``low_confidence``."""
    sync_tolerance: int = OFFSET_TOLERANCE
    """A consistent clip with ``|offset| <=`` this is ``in_sync`` (never corrected)."""
    min_face_fraction: float = 0.5
    """Least share of a clip's regular face detections that found a face (``prepare``
    records ``missing_fraction`` per clip, and drops clips over ``face.max_missing_fraction``;
    a video with no face at all fails there and is ``no_face`` too)."""
    silence_rms: float = 1e-3
    """Audio RMS (full scale 1.0) below which a clip is ``silent``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shifts", tuple(int(s) for s in self.shifts))
        if not self.shifts or len(set(self.shifts)) != len(self.shifts):
            raise AuditError(f"shifts must be distinct and at least one, got {self.shifts}")
        if self.max_offset < 1 or any(abs(s) >= self.max_offset for s in self.shifts):
            raise AuditError(f"every shift must lie inside +-(max_offset - 1), got shifts "
                             f"{self.shifts} with max_offset {self.max_offset}")
        if self.sync_tolerance < 0 or not 0.0 <= self.min_face_fraction <= 1.0:
            raise AuditError("sync_tolerance must be >= 0 and min_face_fraction in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shifts": list(self.shifts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditSettings:
        return cls(**{**d, "shifts": tuple(d.get("shifts", AUDIT_SHIFTS))})


@dataclass
class ClipAudit:
    """The audit of one clip."""

    clip_id: str
    source: str
    status: str
    reason: str = ""
    """Why the clip is undecidable (one of :data:`REASONS`); empty otherwise."""
    offset: int | None = None
    """Measured offset in frames (``> 0``: audio late); None when no search ran."""
    frames: int = 0
    confidence: float | None = None
    """The least LSE-C over the shifts."""
    lse_d: float | None = None
    """LSE-D at the reference shift (0 when searched)."""
    spread: int | None = None
    """Largest minus smallest ``offset - shift`` over the shifts (0: all agree)."""
    face_fraction: float | None = None
    audio_rms: float | None = None
    shifts: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    """Raw search answer at each shift."""
    error: str = ""
    action: str = ""
    """With ``fix_out``: ``copied``, ``corrected``, ``flagged`` (undecidable, kept) or
    ``dropped``."""

    def to_row(self, shifts: tuple[int, ...]) -> dict[str, Any]:
        """One flat table row (the same columns for every clip of a run)."""
        row = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("shifts", "offsets")}
        found = dict(zip(self.shifts, self.offsets, strict=False))
        for s in shifts:
            row[f"offset_at_shift{s}"] = found.get(s)
        return row


def measure(model: Any, cfg: Config, lips: np.ndarray, audio: np.ndarray,
            settings: AuditSettings, *, clip_id: str, source: str = "",
            face_fraction: float | None = None) -> ClipAudit:
    """Audit one clip's arrays: checks, the shift-protocol search, and the decision.

    Args:
        model: an SE4Lip-like model (``.speech``, ``.lips``) in eval mode.
        cfg: its config (window, samples per frame, lip input size).
        lips: uint8 ``[N, h, w, 3]`` mouth crops.
        audio: float32 audio on the same clock (``N * spf`` samples).
        settings: search and decision thresholds.
        clip_id: name recorded in the result.
        source: where the clip came from.
        face_fraction: share of the clip's regular face detections that found a face
            (``1 - missing_fraction`` of its prepare record; None: not checked).
    """
    out = ClipAudit(clip_id=clip_id, source=source, status=UNDECIDABLE, frames=len(lips),
                    shifts=list(settings.shifts))
    audio = np.asarray(audio, np.float32)
    out.audio_rms = round(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
                          if audio.size else 0.0, 6)
    if face_fraction is not None:
        out.face_fraction = round(float(face_fraction), 4)
        if out.face_fraction < settings.min_face_fraction:
            out.reason = "no_face"
            return out
    if out.audio_rms < settings.silence_rms:
        out.reason = "silent"
        return out
    try:
        res = clip_sync(model, cfg, lips, audio, shifts=settings.shifts,
                        max_offset=settings.max_offset, clip_id=clip_id)
    except ValueError as e:
        out.reason, out.error = "too_short", str(e)
        return out
    out.offsets = res.offsets
    base = [o - s for o, s in zip(res.offsets, res.shifts, strict=True)]
    k = int(np.round(np.median(base)))
    ref = res.shifts.index(0) if 0 in res.shifts else 0
    out.offset, out.spread = k, max(base) - min(base)
    out.confidence, out.lse_d = round(min(res.lse_c), 5), round(res.lse_d[ref], 5)
    if any(abs(o) >= settings.max_offset for o in res.offsets):
        out.reason = "search_edge"
    elif not all(is_hit(o, s + k) for o, s in zip(res.offsets, res.shifts, strict=True)):
        out.reason = "inconsistent"
    elif out.confidence < settings.min_confidence:
        out.reason = "low_confidence"
    else:
        out.status = IN_SYNC if abs(k) <= settings.sync_tolerance else OFFSET
    return out


# ---------------------------------------------------------------- clip rows


def clip_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A clip's shard rows (in segment order) -> ``(lips, float32 audio)``."""
    lips = np.concatenate([decode_lips(list(j)) for j in table["lips"].to_pylist()])
    pcm = b"".join(table["audio"].to_pylist())
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0
    return lips, audio


def correct_rows(table: pa.Table, offset: int, segment_frames: int,
                 window_frames: int) -> pa.Table:
    """A clip's shard rows with the audio advanced by ``offset`` frames, both streams trimmed
    to their overlap and cut into segments again (:func:`~se4lip_dist.prepare.segment_bounds`).

    Frame ``i`` of the result is video frame ``i`` (``offset >= 0``) or ``i - offset``
    (``offset < 0``) of the input, with the audio that was recorded ``offset`` frames after it.
    Audio samples are copied as stored (no re-quantisation).

    Raises:
        ValueError: the overlap is shorter than one window.
    """
    rows = table.to_pylist()
    first = rows[0]
    fps, sr = int(first["fps"]), int(first["sample_rate"])
    spf = sr // fps
    lips = [j for r in rows for j in r["lips"]]
    n = len(lips)
    pcm = np.frombuffer(b"".join(r["audio"] for r in rows), dtype="<i2")
    kps = np.concatenate([np.asarray(r["keypoints"], np.float32).reshape(-1, 10)
                          for r in rows])
    scores = np.concatenate([np.asarray(r["det_score"], np.float32) for r in rows])
    detected = np.concatenate([np.asarray(r["detected"], bool) for r in rows])
    k = int(offset)
    m = n - abs(k)
    if m < window_frames:
        raise ValueError(f"{first['clip_id']}: correcting {k} frames leaves {max(m, 0)} frames, "
                         f"fewer than one {window_frames}-frame window")
    v0 = max(0, -k)  # first video frame kept
    a0 = max(0, k)  # first audio frame kept
    pcm = pcm[a0 * spf:(a0 + m) * spf]
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for seg, (s0, s1) in enumerate(segment_bounds(m, segment_frames, window_frames)):
        for key in ("clip_id", "speaker", "split", "fps", "sample_rate", "crop_size"):
            cols[key].append(first[key])
        cols["segment"].append(seg)
        cols["start_frame"].append(s0)
        cols["n_frames"].append(s1 - s0)
        cols["clip_frames"].append(m)
        cols["lips"].append(lips[v0 + s0:v0 + s1])
        cols["audio"].append(pcm[s0 * spf:s1 * spf].tobytes())
        cols["keypoints"].append(kps[v0 + s0:v0 + s1].reshape(-1).tolist())
        cols["det_score"].append(scores[v0 + s0:v0 + s1].tolist())
        cols["detected"].append(detected[v0 + s0:v0 + s1].tolist())
    return pa.Table.from_pydict(cols, schema=SCHEMA)


@dataclass(frozen=True)
class FixPlan:
    """Where and how ``--fix`` writes the corrected copy."""

    out: str
    model: str
    """The pinned model URI recorded per clip."""
    undecidable: str = "drop"
    """``drop`` undecidable clips, or ``keep`` them (flagged in the index)."""
    segment_frames: int = 250
    shard_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.undecidable not in UNDECIDABLE_MODES:
            raise AuditError(f"undecidable must be one of {UNDECIDABLE_MODES}, got "
                             f"{self.undecidable!r}")


# ---------------------------------------------------------------- jobs

ClipItem = tuple[str, str, pa.Table, ClipRecord | None, ClipAudit | None]
"""``(clip id, source, shard rows, index record, why it cannot be audited or None)``."""


class AuditWorker:
    """Audits jobs (a chunk of one shard's clips, or one video) and, with a :class:`FixPlan`,
    writes each job's corrected clips as one shard plus its index. The body of
    :class:`AuditActor`; called in-process by tests and ``workers=0``."""

    def __init__(self, model: Any, cfg: Config, settings: AuditSettings,
                 fix: FixPlan | None = None, detector: Any = None) -> None:
        self.model, self.cfg, self.settings, self.fix = model.eval(), cfg, settings, fix
        self._detector = detector

    @property
    def detector(self) -> Any:
        """The face detector (built on first use: a shard-only job never needs one)."""
        if self._detector is None:
            self._detector = build_detector(self.cfg.face)
        return self._detector

    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """``{"clips": [ClipAudit row dicts], "shards": [ShardInfo dicts]}`` of one job."""
        writer = (IndexedShardWriter(self.fix.out, self.fix.shard_bytes, 1 << 30)
                  if self.fix else None)
        audits: list[ClipAudit] = []
        for cid, source, table, record, problem in self._clips(job):
            if problem is not None:
                audits.append(problem)
                continue
            faces = (1.0 - float(record.missing_fraction or 0.0)
                     if record is not None and job.get("check_faces", True) else None)
            a = self._measure(cid, source, table, faces)
            if writer is not None and self.fix is not None:
                self._write(a, table, record, writer)
            audits.append(a)
        info = writer.flush() if writer is not None else None
        result = {"clips": [asdict(a) for a in audits],
                  "shards": [asdict(info)] if info is not None else []}
        if self.fix is not None:  # after the shard and its index are published
            storage.write_atomic(storage.join(self.fix.out, JOBS_DIR, f"{job_key(job)}.json"),
                                 json.dumps(result))
        return result

    def _measure(self, cid: str, source: str, table: pa.Table,
                 face_fraction: float | None) -> ClipAudit:
        try:
            lips, audio = clip_arrays(table)
            return measure(self.model, self.cfg, lips, audio, self.settings, clip_id=cid,
                           source=source, face_fraction=face_fraction)
        except Exception as e:  # one bad clip is reported; the others are still audited
            return ClipAudit(cid, source, UNDECIDABLE, "unreadable", error=f"{source}: {e}",
                             shifts=list(self.settings.shifts))

    def _write(self, a: ClipAudit, table: pa.Table, record: ClipRecord | None,
               writer: IndexedShardWriter) -> None:
        assert self.fix is not None
        rec = record or ClipRecord(source=a.source, frames=a.frames, segments=table.num_rows,
                                   shard="")
        rec.audit_model, rec.audit_status = self.fix.model, a.status
        if a.status == UNDECIDABLE and self.fix.undecidable == "drop":
            a.action = "dropped"
            return
        if a.status == OFFSET:
            assert a.offset is not None
            try:
                table = correct_rows(table, a.offset, self.fix.segment_frames,
                                     self.cfg.train.window_frames)
            except ValueError as e:
                a.action, a.error = "dropped", str(e)
                return
            rec.audit_offset, a.action = a.offset, "corrected"
            rec.frames, rec.segments = int(table["clip_frames"][0].as_py()), table.num_rows
            rec.duration_s = round(rec.frames / int(table["fps"][0].as_py()), 3)
        else:
            rec.audit_offset = 0 if a.status == IN_SYNC else None
            a.action = "copied" if a.status == IN_SYNC else "flagged"
        writer.add(a.clip_id, table, rec)

    def _clips(self, job: dict[str, Any]) -> Iterator[ClipItem]:
        """``(clip id, source, rows, index record, None)`` per clip of the job, or a
        :class:`ClipAudit` saying why a clip (a video) could not be read."""
        if job["kind"] == "shard":
            yield from self._shard_clips(job)
        else:
            yield self._video_clip(job)

    def _shard_clips(self, job: dict[str, Any]) -> Iterator[ClipItem]:
        ids = sorted(job["clips"])
        fs, path = storage.resolve(job["shard"])
        table = pq.read_table(path, filesystem=fs, filters=[("clip_id", "in", ids)])
        ifs, ipath = storage.resolve(job["index"])
        index = pq.read_table(ipath, filesystem=ifs, schema=INDEX_SCHEMA,
                              filters=[("clip_id", "in", ids)])
        records = table_records(index)
        for cid in ids:
            rows = table.filter(pc.equal(table["clip_id"], cid)).sort_by("segment")
            rec = records.get(cid)
            source = rec.source if rec else cid
            if rows.num_rows == 0:
                yield cid, source, rows, rec, ClipAudit(
                    cid, source, UNDECIDABLE, "unreadable", shifts=list(self.settings.shifts),
                    error=f"{job['shard']}: no rows of {cid}")
                continue
            yield cid, source, rows, rec, None

    def _video_clip(self, job: dict[str, Any]) -> ClipItem:
        path = job["path"]
        empty = SCHEMA.empty_table()
        try:
            cid = clip_id_for(path)
            res = process_clip(PrepareInput(path), cid, self.cfg, self.detector)
        except (OSError, FaceModelError) as e:
            return path, path, empty, None, ClipAudit(
                job["name"], path, UNDECIDABLE, "unreadable", error=f"{path}: {e}",
                shifts=list(self.settings.shifts))
        if res.failure is not None:
            reason = "no_face" if res.failure.stage == "faces" else (
                "too_short" if res.failure.stage == "segment" else "unreadable")
            return cid, path, empty, None, ClipAudit(
                cid, path, UNDECIDABLE, reason, error=res.failure.error,
                shifts=list(self.settings.shifts))
        return cid, path, segments_to_table(res.segments), res.record, None


def _single_thread() -> None:
    # Actors, not threads, are the parallelism (and reductions stay deterministic).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class AuditActor:
    """Ray Data actor: loads the sync model once, then runs :class:`AuditWorker` per job."""

    def __init__(self, model_uri: str, tracking_uri: str, overrides: dict[str, Any],
                 settings: dict[str, Any], fix: dict[str, Any] | None, use_gpu: bool) -> None:
        _single_thread()
        model, cfg = load_sync_model(model_uri, tracking_uri)
        if use_gpu and torch.cuda.is_available():
            model = model.to("cuda")
        self.worker = AuditWorker(model, cfg.override(overrides) if overrides else cfg,
                                  AuditSettings.from_dict(settings),
                                  FixPlan(**fix) if fix else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for j in batch["job"]:
            job = json.loads(str(j))
            try:
                out.append(self.worker.run_job(job))
            except Exception as e:  # a job that cannot be read at all: its clips say why
                where = job.get("shard") or job.get("path")
                out.append({"clips": [asdict(ClipAudit(
                    c, where, UNDECIDABLE, "unreadable", error=f"{where}: {e}",
                    shifts=list(self.worker.settings.shifts)))
                    for c in job.get("clips") or [job.get("name", where)]],
                    "shards": [], "traceback": traceback.format_exc()})
        return {"result": np.asarray([json.dumps(r) for r in out])}


# ---------------------------------------------------------------- planning


@dataclass
class AuditPlan:
    """What an audit reads: the jobs, and the source manifest when ``data`` is shards."""

    jobs: list[dict[str, Any]]
    manifest: Manifest | None
    failures: list[ClipAudit] = field(default_factory=list)
    """Inputs that are not videos at all (named, undecidable)."""


def job_key(job: dict[str, Any]) -> str:
    """A job's stable name across runs (its shard file and clips, or its video)."""
    where = storage.basename(job["shard"]) if job["kind"] == "shard" else job["path"]
    text = json.dumps([job["kind"], where, job.get("clips")])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def is_shards(item: str) -> bool:
    """Whether ``item`` is a prepared-shards folder (it holds ``manifest.json``)."""
    try:
        return storage.is_dir(item) and storage.exists(storage.join(item, MANIFEST))
    except storage.StorageError:
        return False


def plan_audit(data: list[str], cfg: Config, settings: AuditSettings,
               clips_per_job: int = CLIPS_PER_JOB) -> AuditPlan:
    """The jobs of an audit of ``data``: one shards folder, or videos (files, folders and
    CSV/JSONL manifests).

    Raises:
        AuditError: no input, a shards folder given with other inputs, or a shards folder that
            cannot be read or was prepared at another frame rate or sample rate than the model.
    """
    if not data:
        raise AuditError("give a prepared-shards folder or videos to audit")
    shard_dirs = [d for d in data if is_shards(d)]
    if shard_dirs:
        if len(data) > 1:
            raise AuditError(f"audit one prepared-shards folder at a time, or videos; got "
                             f"{shard_dirs[0]} among {len(data)} inputs")
        root = storage.absolute(shard_dirs[0])
        try:
            manifest = Manifest.load(root)
            manifest.check_shards(root)
            index = manifest.clips_table(["clip_id", "shard"])
        except (ManifestError, ShardSchemaError) as e:
            raise AuditError(str(e)) from e
        have = manifest.config.get("data") or {}
        for key in ("fps", "sample_rate"):
            if key in have and have[key] != getattr(cfg.data, key):
                raise AuditError(f"{storage.join(root, MANIFEST)}: prepared with data.{key}="
                                 f"{have[key]}, the model expects {getattr(cfg.data, key)}")
        paths = dict(zip([s.file for s in manifest.shards], manifest.shard_paths(root),
                         strict=True))
        # A fixed mouth box (face.backend none) detects nothing: there is no face check to make.
        faces = (manifest.config.get("face") or {}).get("backend", "insightface") != "none"
        by_shard: dict[str, list[str]] = {}
        for c, s in zip(index["clip_id"].to_pylist(), index["shard"].to_pylist(), strict=True):
            by_shard.setdefault(s, []).append(c)
        jobs = []
        for info in manifest.shards:
            ids = sorted(by_shard.get(info.file, []))
            for i in range(0, len(ids), clips_per_job):
                jobs.append({"kind": "shard", "shard": paths[info.file],
                             "index": storage.join(root, info.index),
                             "clips": ids[i:i + clips_per_job], "check_faces": faces})
        return AuditPlan(jobs, manifest)
    inputs, bad = collect_inputs(data)
    names = output_names([i.path for i in inputs])
    failures = [ClipAudit(f.input, f.input, UNDECIDABLE, "unreadable",
                          error=f.error if f.input in f.error else f"{f.input}: {f.error}",
                          shifts=list(settings.shifts)) for f in bad]
    faces = cfg.face.backend != "none"
    jobs = [{"kind": "video", "path": i.path, "name": names[i.path], "check_faces": faces}
            for i in inputs]
    if not jobs and not failures:
        raise AuditError(f"no videos found in {', '.join(data)}")
    return AuditPlan(jobs, None, failures)


# ---------------------------------------------------------------- the result


@dataclass
class AuditSummary:
    """The outcome of an audit."""

    data: list[str]
    model_uri: str
    model: dict[str, Any]
    settings: AuditSettings
    clips: list[ClipAudit] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)
    """Paths of the table, CSV, report and histogram."""
    fix_out: str | None = None
    corrected: int = 0
    copied: int = 0
    flagged: int = 0
    dropped: int = 0
    resumed: int = 0
    """Clips an earlier, unfinished run of the same ``--fix`` audit had finished."""
    wall_seconds: float = 0.0
    run_id: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(a.status for a in self.clips)
        return {s: c.get(s, 0) for s in STATUSES}

    @property
    def reasons(self) -> dict[str, int]:
        """Undecidable clips per reason."""
        c = Counter(a.reason for a in self.clips if a.status == UNDECIDABLE)
        return {r: c[r] for r in REASONS if c.get(r)}

    @property
    def histogram(self) -> dict[int, int]:
        """Decided clips per measured offset (frames)."""
        c = Counter(a.offset for a in self.clips if a.status != UNDECIDABLE)
        return {int(k): c[k] for k in sorted(c) if k is not None}

    def shares(self) -> dict[str, dict[str, float | None]]:
        """Share of clips per status with its Wilson 95 % interval (over clips)."""
        n = len(self.clips)
        out: dict[str, dict[str, float | None]] = {}
        for s, k in self.counts.items():
            lo, hi = wilson_interval(k, n) if n else (None, None)
            out[s] = {"share": k / n if n else None, "ci_low": lo, "ci_high": hi}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data, "model_uri": self.model_uri, "model": self.model,
            "settings": self.settings.to_dict(), "clips": len(self.clips),
            "counts": self.counts, "shares": self.shares(), "reasons": self.reasons,
            "histogram": {str(k): v for k, v in self.histogram.items()},
            "offset_clips": [{"clip_id": a.clip_id, "source": a.source, "offset": a.offset}
                             for a in self.clips if a.status == OFFSET],
            "report": self.report, "fix_out": self.fix_out, "corrected": self.corrected,
            "copied": self.copied, "flagged": self.flagged, "dropped": self.dropped,
            "resumed": self.resumed, "wall_seconds": round(self.wall_seconds, 2),
            "mlflow_run_id": self.run_id,
        }


def table_columns(clips: list[ClipAudit], shifts: tuple[int, ...]) -> dict[str, list[Any]]:
    """The per-clip table as columns (clip-id order)."""
    rows = [a.to_row(shifts) for a in sorted(clips, key=lambda a: a.clip_id)]
    keys = list(ClipAudit("", "", UNDECIDABLE).to_row(shifts))
    return {k: [r[k] for r in rows] for k in keys}


def _parquet_bytes(cols: dict[str, list[Any]]) -> bytes:
    buf = io.BytesIO()
    types = {"offset": pa.int32(), "frames": pa.int32(), "spread": pa.int32(),
             "confidence": pa.float64(), "lse_d": pa.float64(), "face_fraction": pa.float64(),
             "audio_rms": pa.float64()}
    schema = pa.schema([(k, types.get(k, pa.int32() if k.startswith("offset_at") else
                             pa.string())) for k in cols])
    pq.write_table(pa.Table.from_pydict(cols, schema=schema), buf)
    return buf.getvalue()


def _csv_text(cols: dict[str, list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(cols))
    for row in zip(*cols.values(), strict=True):
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def histogram_figure(summary: AuditSummary) -> Any:
    """Bar chart of decided clips per measured offset, with the undecidable count."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    h = summary.histogram
    m = summary.settings.max_offset
    xs = list(range(-m, m + 1))
    tol = summary.settings.sync_tolerance
    ax.bar(xs, [h.get(x, 0) for x in xs],
           color=["tab:green" if abs(x) <= tol else "tab:red" for x in xs])
    ax.set_xlabel("measured offset (frames; + = audio late)")
    ax.set_ylabel("clips")
    ax.set_title(f"{len(summary.clips)} clips, {summary.counts[UNDECIDABLE]} undecidable")
    fig.tight_layout()
    return fig


def report_markdown(summary: AuditSummary) -> str:
    """The human report: counts with intervals, reasons, histogram, offset clips."""
    st = summary.settings
    n = len(summary.clips)
    lines = [f"# Sync audit of {', '.join(summary.data)}", "",
             f"- model: {summary.model.get('pinned_uri', summary.model_uri)} "
             f"(as given: {summary.model_uri})",
             f"- protocol: audio shifted by {', '.join(str(s) for s in st.shifts)} frames, "
             f"offset searched over +-{st.max_offset}; consistent when every shift is "
             f"recovered within {OFFSET_TOLERANCE} frame of offset + shift; LSE-C >= "
             f"{st.min_confidence:g}; in sync when |offset| <= {st.sync_tolerance}",
             f"- {n} clips", "", "| status | clips | share | 95% CI (over clips) |",
             "| --- | --- | --- | --- |"]
    for s, d in summary.shares().items():
        share = "-" if d["share"] is None else f"{d['share']:.3f}"
        ci = "-" if d["ci_low"] is None else f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
        lines.append(f"| {s} | {summary.counts[s]} | {share} | {ci} |")
    if summary.reasons:
        lines += ["", "Undecidable: " + ", ".join(f"{r} {k}" for r, k in
                                                 summary.reasons.items())]
    lines += ["", "## Measured offsets (decided clips)", "", "| offset | clips |",
              "| --- | --- |"]
    lines += [f"| {k:+d} | {v} |" for k, v in summary.histogram.items()]
    lines += ["", f"![offset histogram]({HISTOGRAM_FILE})"]
    offset = [a for a in summary.clips if a.status == OFFSET]
    if offset:
        lines += ["", "## Offset clips", "", "| clip | offset | confidence | source |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {a.clip_id} | {a.offset:+d} | {a.confidence:.4f} | {a.source} |"
                  for a in sorted(offset, key=lambda a: a.clip_id)]
    if summary.fix_out:
        lines += ["", f"## Correction -> {summary.fix_out}", "",
                  f"corrected {summary.corrected}, copied {summary.copied}, flagged "
                  f"{summary.flagged}, dropped {summary.dropped}"]
    return "\n".join(lines) + "\n"


def report_html(markdown: str) -> str:
    """The Markdown report in a self-contained HTML page (tables as tables)."""
    body, table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-", " "}:
                continue
            if not table:
                body.append("<table>")
                table = True
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("</table>")
            table = False
        if line.startswith("!["):
            body.append(f'<img src="{HISTOGRAM_FILE}" alt="offset histogram">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("</table>")
    return ("<!doctype html><meta charset='utf-8'><title>sync audit</title><style>"
            "td{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}</style>"
            + "\n".join(body) + "\n")


def write_report(summary: AuditSummary, folder: str) -> dict[str, str]:
    """Write the table (Parquet, CSV), the Markdown and HTML report and the histogram into
    ``folder`` (local or a URL), each atomically; returns their paths."""
    root = storage.absolute(folder)
    cols = table_columns(summary.clips, summary.settings.shifts)
    paths = {"table": storage.join(root, TABLE_FILE), "csv": storage.join(root, CSV_FILE),
             "markdown": storage.join(root, REPORT_FILE), "html": storage.join(root, HTML_FILE),
             "histogram": storage.join(root, HISTOGRAM_FILE)}
    summary.report = paths
    storage.write_atomic(paths["table"], _parquet_bytes(cols))
    storage.write_atomic(paths["csv"], _csv_text(cols))
    md = report_markdown(summary)
    storage.write_atomic(paths["markdown"], md)
    storage.write_atomic(paths["html"], report_html(md))
    save_figure(histogram_figure(summary), paths["histogram"])
    return paths


# ---------------------------------------------------------------- the run


class _Collector:
    """The driver's side: counts clips, commits the corrected shards into the output manifest."""

    def __init__(self, summary: AuditSummary, committer: ManifestCommitter | None,
                 on_result: Callable[[ClipAudit], None] | None) -> None:
        self.summary, self.committer, self.on_result = summary, committer, on_result

    def begin(self, plan: AuditPlan, start: FixStart) -> list[dict[str, Any]]:
        """Count the inputs that are no videos and the jobs an earlier run finished; returns
        the jobs left to run."""
        self.add({"clips": [asdict(a) for a in plan.failures], "shards": []})
        jobs = []
        for job in plan.jobs:
            done = start.done.get(job_key(job))
            if done is None:
                jobs.append(job)
            else:  # its shard is in the output manifest already
                self.add(done, commit=False)
                self.summary.resumed += len(done["clips"])
        return jobs

    def add(self, result: dict[str, Any], commit: bool = True) -> None:
        s = self.summary
        if self.committer is not None and commit:
            for d in result["shards"]:
                self.committer.add(ShardInfo(**d))
        for d in result["clips"]:
            a = ClipAudit(**d)
            s.clips.append(a)
            if a.action:
                setattr(s, a.action, getattr(s, a.action) + 1)
            if self.on_result:
                self.on_result(a)


@dataclass
class FixStart:
    """Where a ``--fix`` run starts: its plan, the committer of the output manifest, and the
    results of the jobs an earlier run of the same audit finished (by :func:`job_key`)."""

    plan: FixPlan | None = None
    committer: ManifestCommitter | None = None
    done: dict[str, dict[str, Any]] = field(default_factory=dict)


def _fix_plan(fix_out: str | None, undecidable: str, model: str, cfg: Config,
              manifest: Manifest | None, data: list[str], settings: AuditSettings) -> FixStart:
    if not fix_out:
        return FixStart()
    out = storage.absolute(fix_out)
    data_cfg = dict((manifest.config.get("data") if manifest else None) or cfg.to_dict()["data"])
    face = (manifest.config.get("face") if manifest else None) or cfg.to_dict()["face"]
    plan = FixPlan(out=out, model=model, undecidable=undecidable,
                   segment_frames=int(data_cfg.get("segment_frames", cfg.data.segment_frames)),
                   shard_bytes=int(data_cfg.get("shard_bytes", cfg.data.shard_bytes)))
    config = {"data": data_cfg, "face": face}
    wanted = {"model": model, "data": [storage.absolute(d) for d in data],
              "settings": settings.to_dict(), "undecidable": undecidable}
    marker = storage.join(out, FIX_FILE)
    if not storage.exists(marker):
        if storage.exists(storage.join(out, MANIFEST)):
            raise AuditError(f"{storage.join(out, MANIFEST)}: --fix needs a new folder (this one "
                             "already holds prepared shards that no audit --fix wrote)")
        storage.makedirs(out)
        storage.write_atomic(marker, json.dumps(wanted, indent=1))
        return FixStart(plan, ManifestCommitter(Manifest(config=config), out))
    try:
        earlier = json.loads(storage.read_text(marker))
    except (ValueError, OSError) as e:
        raise AuditError(f"{marker}: unreadable ({e}); give --fix a new folder") from e
    changed = [k for k in wanted if earlier.get(k) != wanted[k]]
    if changed:
        raise AuditError(f"{marker}: written by an audit --fix with another "
                         f"{', '.join(changed)}; rerun it with the same ones to resume, or give "
                         "--fix a new folder")
    committer, done = _resume(out, config)
    return FixStart(plan, committer, done)


def _resume(out: str, config: dict[str, Any]) -> tuple[ManifestCommitter, dict[str, Any]]:
    """The output manifest of an earlier, unfinished ``--fix`` run, made consistent, and the
    results of its finished jobs. A shard whose job left no record (cut between the two) is
    deleted: its job runs again."""
    have = (Manifest.load(out) if storage.exists(storage.join(out, MANIFEST))
            else Manifest(config=config))
    records: dict[str, dict[str, Any]] = {}
    jobs_dir = storage.join(out, JOBS_DIR)
    for name in storage.listdir(jobs_dir) if storage.is_dir(jobs_dir) else []:
        if name.endswith(".json"):
            records[name.removesuffix(".json")] = json.loads(
                storage.read_text(storage.join(jobs_dir, name)))
    recorded = {d["file"] for r in records.values() for d in r["shards"]}
    if recover(have, out, adopt=recorded.__contains__)[0]:
        have.save(out)
    named = {s.file for s in have.shards}
    done = {k: r for k, r in records.items() if all(d["file"] in named for d in r["shards"])}
    return ManifestCommitter(have, out), done


def _commit(committer: ManifestCommitter | None) -> None:
    """Commit the corrected shards; a copy that holds no clip still gets its (empty)
    manifest, so readers see an audited folder rather than an unprepared one."""
    if committer is None:
        return
    committer.flush()
    if not committer.manifest.shards:
        committer.manifest.save(committer.out_dir)


def audit_in_process(model: Any, cfg: Config, data: list[str], *,
                     settings: AuditSettings | None = None, report_dir: str | None = None,
                     fix_out: str | None = None, undecidable: str = "drop",
                     model_uri: str = "(in-process model)",
                     on_result: Callable[[ClipAudit], None] | None = None) -> AuditSummary:
    """Audit ``data`` with an already-loaded model in this process, no Ray, no MLflow run
    (the body of ``run_audit(workers=0)``; tests plant models through it).

    Raises:
        AuditError: as :func:`run_audit`.
    """
    settings = settings or AuditSettings()
    t0 = time.perf_counter()
    plan = plan_audit(data, cfg, settings)
    summary = AuditSummary(list(data), model_uri, {"uri": model_uri, "pinned_uri": model_uri},
                           settings, fix_out=storage.absolute(fix_out) if fix_out else None)
    start = _fix_plan(fix_out, undecidable, model_uri, cfg, plan.manifest, data, settings)
    collect = _Collector(summary, start.committer, on_result)
    jobs = collect.begin(plan, start)
    worker = AuditWorker(model, cfg, settings, start.plan)
    try:
        for job in jobs:
            collect.add(worker.run_job(job))
    finally:
        _commit(start.committer)
    summary.wall_seconds = time.perf_counter() - t0
    if report_dir:
        write_report(summary, report_dir)
    return summary


def run_audit(
    data: list[str],
    model_uri: str,
    *,
    report_dir: str | None = None,
    fix_out: str | None = None,
    undecidable: str = "drop",
    settings: AuditSettings | None = None,
    tracking_uri: str | None = None,
    workers: int = 1,
    min_workers: int = 1,
    use_gpu: bool = False,
    address: str | None = None,
    experiment: str = "se4lip-audit",
    placement_timeout_s: float = DEFAULT_TIMEOUT_S,
    insightface_root: str | None = None,
    face_backend: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ClipAudit], None] | None = None,
) -> AuditSummary:
    """Measure, classify and (with ``fix_out``) correct every clip of ``data``.

    Args:
        data: one prepared-shards folder, or videos (files, folders, CSV/JSONL manifests);
            local or URLs.
        model_uri: the sync model that measures (``models:/NAME@ALIAS``...); pinned first.
        report_dir: where the table and report go (default ``<fix_out>/audit`` with
            ``fix_out``, else ``./audit``).
        fix_out: write a corrected prepared-shards folder here (a new folder).
        undecidable: ``drop`` undecidable clips from ``fix_out`` or ``keep`` them flagged.
        settings: search and decision thresholds.
        tracking_uri: MLflow URI (default: ``MLFLOW_TRACKING_URI`` or the local store).
        workers: most audit actors (0.5 CPU each); 0 runs in this process without Ray.
        min_workers: actors the cluster must hold before the job starts.
        use_gpu: one GPU per actor.
        address: Ray cluster address (None: a local Ray, stopped at the end).
        experiment: MLflow experiment of the audit's run.
        placement_timeout_s: how long the first actors may wait for the cluster.
        insightface_root: face detector root for video inputs (default
            ``SE4LIP_INSIGHTFACE_ROOT``, else the model's config).
        face_backend: ``insightface`` or ``none`` for video inputs.
        on_start: called with the number of jobs.
        on_result: called with each clip's :class:`ClipAudit`.

    Raises:
        AuditError: bad arguments, model, data, output folder, store or cluster.
    """
    t0 = time.perf_counter()
    settings = settings or AuditSettings()
    if workers < 0 or min_workers < 1:
        raise AuditError("workers must be >= 0 and min_workers >= 1")
    uri = resolve_tracking_uri(tracking_uri)
    model, sync_model, cfg, overrides = _audit_model(model_uri, uri, face_backend,
                                                     insightface_root)
    report = report_dir or (storage.join(storage.absolute(fix_out), "audit") if fix_out
                            else "audit")
    try:
        for where in (fix_out, report):
            if where:
                storage.check_bucket(where)
        plan = plan_audit(data, cfg, settings)
        start = _fix_plan(fix_out, undecidable, model["pinned_uri"], cfg, plan.manifest, data,
                          settings)
    except storage.StorageError as e:
        raise AuditError(str(e)) from e
    fix, committer = start.plan, start.committer
    summary = AuditSummary(list(data), model_uri, model, settings,
                           fix_out=fix.out if fix else None)
    collect = _Collector(summary, committer, on_result)
    jobs = collect.begin(plan, start)
    if on_start:
        on_start(len(jobs))
    detector = None
    if any(j["kind"] == "video" for j in jobs):
        try:  # fail once, here, rather than once per video in the actors
            detector = build_detector(cfg.face)
        except FaceModelError as e:
            raise AuditError(str(e)) from e
    run_id = _start_run(uri, experiment, model, summary, cfg, workers, use_gpu, report)
    summary.run_id = run_id
    finished = False
    try:
        if workers == 0:
            worker = AuditWorker(sync_model, cfg, settings, fix, detector=detector)
            for job in jobs:
                collect.add(worker.run_job(job))
        elif jobs:
            actor = {"model_uri": model["pinned_uri"], "tracking_uri": uri,
                     "overrides": overrides, "settings": settings.to_dict(),
                     "fix": asdict(fix) if fix else None, "use_gpu": use_gpu}
            with ActorJobPool(AuditActor, actor, min_workers, min(workers, len(jobs)), use_gpu,
                              address, placement_timeout_s, label="audit actor",
                              error=AuditError, job_name="audit job") as pool:
                for row in pool.run(jobs):
                    collect.add(json.loads(row["result"]))
        finished = True
    finally:
        _commit(committer)  # every corrected shard written so far stays committed
        summary.wall_seconds = time.perf_counter() - t0
        if not finished:
            end_run(uri, run_id, status="FAILED")
    try:
        write_report(summary, report)
    except storage.StorageError as e:
        end_run(uri, run_id, status="FAILED")
        raise AuditError(str(e)) from e
    _end_run(uri, run_id, summary, "FINISHED")
    return summary


def _audit_model(model_uri: str, uri: str, face_backend: str | None,
                 insightface_root: str | None) -> tuple[dict[str, Any], Any, Config,
                                                        dict[str, Any]]:
    """The pinned model, loaded, its config with this machine's face settings, and those."""
    try:
        check_reachable(uri)
        model = pin_model(model_uri, uri)
        sync_model, cfg = load_sync_model(model["pinned_uri"], uri)
    except (RegistryError, TrackingError) as e:
        raise AuditError(str(e)) from e
    overrides = local_face_overrides(face_backend, insightface_root)
    return model, sync_model, cfg.override(overrides) if overrides else cfg, overrides


def _start_run(uri: str, experiment: str, model: dict[str, Any], summary: AuditSummary,
               cfg: Config, workers: int, use_gpu: bool, report: str) -> str:
    st = summary.settings
    params = {"model_uri": model["uri"], "model.pinned_uri": model["pinned_uri"],
              "model.name": model.get("name"), "model.version": model.get("version"),
              "data": ", ".join(summary.data)[:500], "shifts": list(st.shifts),
              "max_offset": st.max_offset, "min_confidence": st.min_confidence,
              "sync_tolerance": st.sync_tolerance, "min_face_fraction": st.min_face_fraction,
              "silence_rms": st.silence_rms, "fix_out": summary.fix_out, "workers": workers,
              "use_gpu": use_gpu, "report_dir": report}
    tags = {"se4lip.model_uri": model["uri"], "se4lip.kind": "audit"}
    if model.get("version") is not None:
        tags["se4lip.model_version"] = str(model["version"])
    label = (f"{model['name']} v{model['version']}"
             if model.get("name") and model.get("version") is not None else model["uri"])
    more = f" +{len(summary.data) - 1}" if len(summary.data) > 1 else ""
    name = f"audit {label} on {summary.data[0].rstrip('/').rsplit('/', 1)[-1]}{more}"
    return start_run(uri, experiment, name, params=params, tags=tags,
                     config_yaml=cfg.to_yaml(), command="audit")


def _end_run(uri: str, run_id: str, summary: AuditSummary, status: str) -> None:
    logger = RunLogger(uri, run_id)
    shares = summary.shares()
    metrics: dict[str, float] = {"clips": len(summary.clips),
                                 "wall_seconds": summary.wall_seconds,
                                 "corrected": summary.corrected, "dropped": summary.dropped}
    for s, k in summary.counts.items():
        metrics[s] = k
        for key in ("share", "ci_low", "ci_high"):
            v = shares[s][key]
            if v is not None:
                metrics[f"{s}_{key}"] = v
    logger.metrics(metrics, step=0)
    logger.table(table_columns(summary.clips, summary.settings.shifts), "audit_table.json")
    logger.text(json.dumps(summary.to_json(), indent=1, default=str), "audit_summary.json")
    with tempfile.TemporaryDirectory() as tmp:
        for path in summary.report.values():
            local = Path(tmp) / storage.basename(path)
            local.write_bytes(storage.read_bytes(path))
            logger.client.log_artifact(run_id, str(local), "audit")
    end_run(uri, run_id, status=status)


__all__ = [
    "AUDIT_SHIFTS",
    "IN_SYNC",
    "MIN_CONFIDENCE",
    "OFFSET",
    "REASONS",
    "STATUSES",
    "UNDECIDABLE",
    "AuditActor",
    "AuditError",
    "AuditPlan",
    "AuditSettings",
    "AuditSummary",
    "AuditWorker",
    "ClipAudit",
    "FixPlan",
    "audit_in_process",
    "clip_arrays",
    "correct_rows",
    "is_shards",
    "measure",
    "plan_audit",
    "report_markdown",
    "run_audit",
    "write_report",
]
