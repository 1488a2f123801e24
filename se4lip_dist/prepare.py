"""``prepare``: videos -> 25 fps frames + 16 kHz audio -> mouth tracking -> lip crops -> shards.

The per-clip work (:func:`process_clip`) is a pure function of one input file. With Ray, a run
is a streaming Ray Data pipeline: read tasks list the inputs page by page, and an autoscaling
pool of :class:`ClipWorker` actors (each loads the face detector once) fetches, hashes, prepares
and writes every block of inputs as one shard plus its index file; the driver only commits index
files into ``manifest.json`` (:mod:`se4lip_dist.manifest`) and counts outcomes, so it never
touches a video or a crop. Every file is published atomically, and a shard is named by the
clips it holds, so a crash, a Ctrl-C or a lost worker never leaves a half-written shard nor a
clip twice; a rerun adopts what a killed run published and redoes only the rest.

Inputs, ``--out`` and ``--preview`` may be local paths or URLs (``s3://bucket/prefix``; see
:mod:`se4lip_dist.storage`): a remote video is downloaded by the worker that prepares it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from se4lip_dist import faces, media, storage
from se4lip_dist.config import Config
from se4lip_dist.faces import FaceModelError, build_detector
from se4lip_dist.manifest import (
    FAILURES,
    MANIFEST,
    ClipRecord,
    IndexedShardWriter,
    Manifest,
    ManifestCommitter,
    ManifestError,
    append_failures,
    recover,
)
from se4lip_dist.media import MediaError, MediaInfo
from se4lip_dist.placement import DEFAULT_TIMEOUT_S, PlacementError, wait_placeable
from se4lip_dist.runtime import cluster_cpus, init_ray
from se4lip_dist.shards import Segment, ShardInfo, encode_jpeg, segments_to_table

VIDEO_EXTS = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".ts"}
MANIFEST_EXTS = {".csv", ".jsonl"}
PREVIEW_TILES = 16
LIST_PAGE = 1000
"""Inputs listed per page (an S3 ListObjectsV2 page)."""
CLIPS_PER_SHARD = 64
LISTING_TASKS = 4
"""Most read tasks that list the inputs: each is a Ray worker process (they take no CPU, so
nothing else bounds how many run), and ``prepare *.mp4`` may name thousands of items."""
"""Default most clips per shard: a block of inputs one worker prepares and a lost one redoes."""
WORKER_CPUS = 1.0


class PrepareError(RuntimeError):
    """A problem that stops the whole run (bad output folder, detector that cannot load)."""


@dataclass(frozen=True)
class PrepareInput:
    """One video to prepare, with optional labels from a manifest."""

    path: str
    speaker: str | None = None
    split: str | None = None
    origin: str | None = None
    """``manifest.csv:3`` when the input is a manifest line (failures name both)."""

    @property
    def name(self) -> str:
        """How failures name the input: the path, with its manifest line if it has one."""
        return f"{self.origin} ({self.path})" if self.origin else self.path


@dataclass
class Failure:
    """An input that could not be prepared, and why."""

    input: str
    error: str
    stage: str
    traceback: str | None = None
    """Where the error was raised (kept so a coding bug does not read as bad input)."""

    def to_json(self) -> dict[str, Any]:
        out = {"input": self.input, "stage": self.stage, "error": self.error}
        if self.traceback:
            out["traceback"] = self.traceback
        return out


@dataclass
class ClipResult:
    """What one clip's processing returns to the driver."""

    input: PrepareInput
    clip_id: str
    segments: list[Segment] = field(default_factory=list)
    record: ClipRecord | None = None
    preview: np.ndarray | None = None
    failure: Failure | None = None
    seconds: float = 0.0


@dataclass
class PrepareSummary:
    """The outcome of a ``prepare`` run."""

    out_dir: str
    inputs: int = 0
    prepared: int = 0
    skipped: int = 0
    duplicates: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    frames: int = 0
    video_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_written: int = 0
    total_clips: int = 0
    total_frames: int = 0
    first_dispatch_s: float = 0.0
    """Seconds from the start until a worker took up the first input."""
    manifest_saves: int = 0
    worker_cpu_seconds: float = 0.0
    """CPU seconds of the clip workers' processes (start-up and Ray's threads included)."""
    workers_used: int = 0

    @property
    def frames_per_worker_cpu_s(self) -> float:
        """Frames prepared per CPU second of the clip workers: the cost that sizes a cluster."""
        return self.frames / self.worker_cpu_seconds if self.worker_cpu_seconds > 0 else 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def bytes_per_video_minute(self) -> float:
        return self.bytes_written / (self.video_seconds / 60) if self.video_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "inputs": self.inputs,
            "prepared": self.prepared,
            "skipped_complete": self.skipped,
            "duplicates": self.duplicates,
            "failed": len(self.failures),
            "failures": [f.to_json() for f in self.failures],
            "frames": self.frames,
            "wall_seconds": round(self.wall_seconds, 2),
            "frames_per_s": round(self.frames_per_s, 1),
            "bytes_per_video_minute": round(self.bytes_per_video_minute),
            "total_clips": self.total_clips,
            "total_frames": self.total_frames,
            "first_dispatch_s": round(self.first_dispatch_s, 2),
            "workers_used": self.workers_used,
            "worker_cpu_seconds": round(self.worker_cpu_seconds, 2),
            "frames_per_worker_cpu_s": round(self.frames_per_worker_cpu_s, 1),
        }


# ---------------------------------------------------------------- inputs


def _ext(url: str) -> str:
    return os.path.splitext(storage.basename(url))[1].lower()


def iter_input_pages(item: str, page_size: int = LIST_PAGE
                     ) -> Iterator[tuple[list[PrepareInput], list[Failure]]]:
    """The inputs of one command-line item, a page at a time.

    ``item`` may be local or a URL: a video, a folder or prefix (searched recursively, listed
    page by page, so the first videos are known before the last page is listed), or a CSV/JSONL
    manifest. Bad entries (missing paths, unreachable buckets, malformed manifest lines) become
    :class:`Failure` records so the rest of the run goes on. Whether a manifest line's video
    exists is found out by the worker that fetches it (one request per video, in parallel).
    """
    try:
        kind = storage.kind(item)
        if kind == "dir":
            found = 0
            for page in storage.iter_files(item, page_size):
                videos = [PrepareInput(f) for f in page if _ext(f) in VIDEO_EXTS]
                found += len(videos)
                if videos:
                    yield videos, []
            if not found:
                yield [], [Failure(item, "no video files in this folder", "input")]
            return
    except storage.StorageError as e:
        yield [], [Failure(item, str(e), "input")]
        return
    if _ext(item) in MANIFEST_EXTS:
        got, bad = _read_input_manifest(item)
        yield got[:page_size], bad
        for i in range(page_size, len(got), page_size):
            yield got[i:i + page_size], []
    elif kind == "file":
        yield [PrepareInput(item)], []
    else:
        yield [], [Failure(item, "no such file or folder", "input")]


def collect_inputs(items: Iterable[str]) -> tuple[list[PrepareInput], list[Failure]]:
    """Every input of ``items`` (see :func:`iter_input_pages`), with the failures of listing;
    a manifest line naming no file is a failure here (one request per line, in turn)."""
    inputs: list[PrepareInput] = []
    failures: list[Failure] = []
    for item in items:
        for got, bad in iter_input_pages(item):
            failures.extend(bad)
            for inp in got:
                problem = _missing(inp) if inp.origin else None
                if problem is None:
                    inputs.append(inp)
                else:
                    failures.append(problem)
    return inputs, failures


def _missing(inp: PrepareInput) -> Failure | None:
    """The failure of a manifest line whose file is not there, or None."""
    try:
        found = storage.is_file(inp.path)
    except storage.StorageError as e:
        return Failure(inp.name, str(e), "input")
    return None if found else Failure(inp.name, "no such file", "input")


def _read_input_manifest(path: str) -> tuple[list[PrepareInput], list[Failure]]:
    """Rows of ``path,speaker,split`` (CSV with header) or JSON objects per line (JSONL).

    Relative video paths resolve against the manifest's folder (or prefix).
    """
    try:
        text = storage.read_text(path)
    except storage.StorageNotFoundError:
        return [], [Failure(path, "no such manifest file", "input")]
    except (OSError, UnicodeDecodeError) as e:
        return [], [Failure(path, f"cannot read manifest: {e}", "input")]
    inputs: list[PrepareInput] = []
    failures: list[Failure] = []
    base = storage.parent(path)
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    if _ext(path) == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((n, obj if isinstance(obj, dict) else None, "not a JSON object"))
            except json.JSONDecodeError as e:
                rows.append((n, None, f"malformed JSON: {e.msg}"))
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            return [], [Failure(path, "CSV manifest needs a header with a 'path' column",
                                "input")]
        for n, row in enumerate(reader, 2):
            rows.append((n, row if None not in row else None, "too many fields"))
    for n, row, why in rows:
        where = f"{path}:{n}"
        if row is None:
            failures.append(Failure(where, why, "input"))
            continue
        raw = str(row.get("path") or "").strip()
        if not raw:
            failures.append(Failure(where, "missing 'path'", "input"))
            continue
        video = raw if storage.is_absolute(raw) else storage.join(base, raw)
        split = (row.get("split") or None) and str(row["split"]).strip()
        if split not in (None, "", "train", "val", "test"):
            failures.append(Failure(where, f"split must be train|val|test, got {split!r}",
                                    "input"))
            continue
        inputs.append(PrepareInput(video, (row.get("speaker") or None) and
                                   str(row["speaker"]).strip(), split or None, where))
    return inputs, failures


def clip_id_for(path: str | Path) -> str:
    """Stable id: a filesystem-safe stem plus a hash of the file's (or object's) bytes.

    Content hashing makes reruns resume even when the folder moved, and identical files
    given twice are recognised as one clip.

    Raises:
        OSError: the file cannot be read (a :class:`~se4lip_dist.storage.StorageError`).
    """
    return clip_id_from(str(path), storage.sha256(str(path)))


def clip_id_from(path: str, digest: str) -> str:
    """The clip id of ``path`` whose content has SHA-256 ``digest`` (:func:`clip_id_for`)."""
    stem = os.path.splitext(storage.basename(str(path)))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:48] or "clip"
    return f"{stem}-{digest[:10]}"


# ---------------------------------------------------------------- one clip


def process_clip(inp: PrepareInput, clip_id: str, cfg: Config, detector: Any) -> ClipResult:
    """Decode, track the mouth, crop and segment one video. Never raises for bad input.

    Args:
        inp: the input video.
        clip_id: its id (see :func:`clip_id_for`).
        cfg: resolved config (``data`` and ``face`` sections are used).
        detector: a ``se4lip_dist.faces.FaceDetector``.
    """
    start = time.perf_counter()
    try:
        with storage.local_copy(inp.path) as local:
            return prepare_local(inp, clip_id, local, cfg, detector)
    except OSError as e:  # the download (a local file needs none)
        msg = str(e) if inp.path in str(e) else f"{inp.path}: cannot download: {e}"
        return ClipResult(inp, clip_id, failure=Failure(inp.path, msg, "download"),
                          seconds=time.perf_counter() - start)


def prepare_local(inp: PrepareInput, clip_id: str, local: str, cfg: Config,
                  detector: Any) -> ClipResult:
    """:func:`process_clip` of ``inp`` whose content is at the local path ``local``."""
    start = time.perf_counter()
    result = ClipResult(inp, clip_id)
    _process_local(result, local, cfg, detector)
    if result.failure:
        result.segments, result.record, result.preview = [], None, None
    result.seconds = time.perf_counter() - start
    return result


def segment_bounds(n_frames: int, segment_frames: int, window_frames: int) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of a clip's shard rows.

    Consecutive runs of ``segment_frames``; a last run shorter than one window is useless alone
    and joins the previous one (so a row may hold up to ``segment_frames + window_frames - 1``).
    """
    bounds: list[tuple[int, int]] = []
    for s0 in range(0, n_frames, segment_frames):
        s1 = min(n_frames, s0 + segment_frames)
        if bounds and s1 - s0 < window_frames:
            bounds[-1] = (bounds[-1][0], s1)
        else:
            bounds.append((s0, s1))
    return bounds


def _probe_streams(path: str, name: str) -> MediaInfo:
    """``media.probe`` of a local file that must hold both video and audio (``MediaError``)."""
    info = media.probe(path)
    if not info.has_video:
        raise media.MediaError(f"{name}: no video stream")
    if not info.has_audio:
        raise media.MediaError(f"{name}: no audio stream")
    return info


def input_problem(inp: PrepareInput) -> Failure | None:
    """Why a local input can never be prepared (not media, no video or audio), or None.

    The same check and message as the decode stage of :func:`process_clip`, without decoding; a
    URL is not downloaded for it (None). Used to name unusable inputs before blaming anything
    else, e.g. a face detector that cannot load.
    """
    if not storage.is_local(inp.path):
        return None
    try:
        _probe_streams(inp.path, inp.path)
    except MediaError as e:
        msg = str(e) if inp.path in str(e) else f"{inp.path}: {e}"
        return Failure(inp.path, msg, "decode")
    return None


def _process_local(result: ClipResult, path: str, cfg: Config, detector: Any) -> None:
    """The body of :func:`process_clip` on a local copy ``path`` of ``result.input``."""
    inp, data = result.input, cfg.data
    stage = "decode"
    try:
        info = _probe_streams(path, inp.path)
        audio = media.decode_audio(path, data.sample_rate, info=info)
        stage = "faces"
        track = _track_mouth(path, info, cfg, detector)
        stage = "segment"
        n = len(track.jpegs)
        if n < cfg.train.window_frames:
            raise ValueError(
                f"{inp.path}: clip has {n} frames at {data.fps} fps, shorter than one "
                f"{cfg.train.window_frames}-frame window"
            )
        result.segments = _segments(result, track, _fit_length(audio, n * data.samples_per_frame),
                                    cfg)
        de = track.detected
        result.record = ClipRecord(
            source=storage.absolute(inp.path), frames=n, segments=len(result.segments), shard="",
            speaker=inp.speaker, split=inp.split, duration_s=round(n / data.fps, 3),
            src_fps=info.src_fps, vfr=info.vfr,
            missing_fraction=round(track.missing_fraction, 4),
            mean_det_score=round(float(track.scores[de].mean()) if de.any() else 0.0, 4),
        )
        result.preview = _contact_sheet(track.tiles)
    except Exception as e:  # every per-clip error becomes a failure record, never a crash
        msg = (str(e) or type(e).__name__).replace(path, inp.path)
        if inp.path not in msg:
            msg = f"{inp.path}: {msg}"
        result.failure = Failure(inp.path, msg, stage,
                                 traceback.format_exc().replace(path, inp.path))


@dataclass
class MouthTrack:
    """A clip's mouth, frame by frame: the JPEG lip crop, the face keypoints, the detector's
    score, whether the detector ran on that frame, and a few crops for the preview sheet."""

    jpegs: list[bytes]
    keypoints: np.ndarray
    scores: np.ndarray
    detected: np.ndarray
    tiles: list[np.ndarray]
    missing_fraction: float


def _track_mouth(path: str, info: Any, cfg: Config, detector: Any) -> MouthTrack:
    """Decode the pictures of ``path`` at ``data.fps`` and crop the tracked mouth of each."""
    data, face = cfg.data, cfg.face
    tracker = faces.MouthTracker(
        detector, detect_every=face.detect_every, refine_motion=face.refine_motion,
        smooth_window=face.smooth_window, max_missing_fraction=face.max_missing_fraction)
    jpegs: list[bytes] = []
    kps: list[np.ndarray] = []
    scores: list[float] = []
    detected: list[bool] = []
    tiles: list[np.ndarray] = []
    # One decoder thread: clips run one per core, and threads cost CPU time per frame.
    for tf in tracker.track(media.iter_pictures(path, data.fps, info=info, threads=1)):
        cx, cy, side = faces.mouth_square(tf.kps, face.mouth_scale)
        crop = faces.crop_square(tf.frame, cx, cy, side, data.crop_size)
        jpegs.append(encode_jpeg(crop, data.jpeg_quality))
        kps.append(np.asarray(tf.kps, np.float32))
        scores.append(float(tf.score))
        detected.append(bool(tf.detected))
        if tf.index % 5 == 0 and len(tiles) < 4 * PREVIEW_TILES:
            tiles.append(crop)
    return MouthTrack(jpegs, np.stack(kps) if kps else np.zeros((0, 5, 2), np.float32),
                      np.asarray(scores, np.float32), np.asarray(detected, bool), tiles,
                      float(tracker.missing_fraction))


def _segments(result: ClipResult, track: MouthTrack, audio: np.ndarray,
              cfg: Config) -> list[Segment]:
    """The clip cut into training segments (``audio`` fitted to the frames already)."""
    data, inp, spf = cfg.data, result.input, cfg.data.samples_per_frame
    n = len(track.jpegs)
    return [
        Segment(clip_id=result.clip_id, segment=seg, start_frame=s0, clip_frames=n,
                fps=data.fps, sample_rate=data.sample_rate, crop_size=data.crop_size,
                lips_jpeg=track.jpegs[s0:s1], audio=audio[s0 * spf:s1 * spf],
                keypoints=track.keypoints[s0:s1], det_score=track.scores[s0:s1],
                detected=track.detected[s0:s1], speaker=inp.speaker, split=inp.split)
        for seg, (s0, s1) in enumerate(segment_bounds(n, data.segment_frames,
                                                      cfg.train.window_frames))
    ]


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x, np.zeros(n - len(x), x.dtype)])


def _contact_sheet(tiles: list[np.ndarray]) -> np.ndarray | None:
    """Up to 16 crops spread over the clip, in 2 rows."""
    if not tiles:
        return None
    idx = np.linspace(0, len(tiles) - 1, min(PREVIEW_TILES, len(tiles))).round().astype(int)
    chosen = [tiles[i] for i in idx]
    per_row = (len(chosen) + 1) // 2
    rows = []
    for r in range(0, len(chosen), per_row):
        row = chosen[r : r + per_row]
        row += [np.zeros_like(chosen[0])] * (per_row - len(row))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


# ---------------------------------------------------------------- what becomes of an input


@dataclass
class ClipOutcome:
    """What became of one input (what ``on_result`` receives): small, so it crosses from a
    worker to the driver at a constant cost per clip."""

    input: str
    status: str
    """``prepared``, ``skipped`` (already in the folder), ``duplicate`` or ``failed``."""
    clip_id: str = ""
    frames: int = 0
    duplicate_of: str = ""
    failure: Failure | None = None
    seconds: float = 0.0
    started: float = 0.0
    """Wall-clock time (``time.time()``) at which a worker took the input up."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["failure"] = asdict(self.failure) if self.failure else None
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClipOutcome:
        f = d.get("failure")
        return cls(**{**d, "failure": Failure(**f) if f else None})


@dataclass(frozen=True)
class PrepareBackend:
    """Where inputs come from and how one becomes shard rows.

    The real media path by default; ``benchmarks/scale_sim.py`` swaps in fakes to measure
    everything around it (listing, planning, index writing and reading) at corpus scale. The
    functions run in the workers, so they must be picklable.
    """

    list_pages: Callable[[str, int], Iterator[tuple[list[PrepareInput], list[Failure]]]] = \
        iter_input_pages
    """``(item, page_size)`` -> pages of ``(inputs, failures)``."""
    fetch: Callable[[str], Any] = storage.local_copy
    """``path`` -> a context manager holding a local copy of its content."""
    digest: Callable[[str], str] = storage.sha256
    """Local copy -> hex SHA-256 of the content (the clip id's hash)."""
    process: Callable[[PrepareInput, str, str, Config, Any], ClipResult] = prepare_local
    """``(input, clip id, local path, cfg, detector)`` -> :class:`ClipResult`."""


class ClipRegistry:
    """The run's one view of which clips are done or taken, shared by every worker (a Ray actor
    beside the driver, or a plain object in-process).

    Done: the clip ids of the folder's committed index, held as one sorted byte-string array.
    Taken: content digests claimed by an input of this run, so a second input with the same
    bytes is a duplicate. A claim is keyed by the input's place in the listing, so a retried
    task gets the same answer for the same input. Workers claim in parallel: of two identical
    inputs, the one claimed first is kept (in-process, the first in listing order).
    """

    def __init__(self, manifest: Manifest) -> None:
        ids = manifest.clips_table(["clip_id"])["clip_id"].to_numpy(zero_copy_only=False)
        self.done = np.sort(ids.astype(bytes)) if len(ids) else np.array([], dtype="S1")
        self.taken: dict[str, tuple[str, str]] = {}

    def claim(self, entries: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """``(listing key, clip id, path)`` per input -> ``(status, first path)``: ``new``,
        ``done`` or ``duplicate`` (of the input that first claimed the same content)."""
        out = []
        for key, cid, path in entries:
            digest = cid.rsplit("-", 1)[1]
            first_key, first_path = self.taken.setdefault(digest, (key, path))
            if first_key != key:
                out.append(("duplicate", first_path))
            elif self._is_done(cid):
                out.append(("done", ""))
            else:
                out.append(("new", ""))
        return out

    def _is_done(self, cid: str) -> bool:
        b = cid.encode()
        i = int(np.searchsorted(self.done, b))
        return i < len(self.done) and self.done[i] == b


def listing_rows(item_index: int, item: str, page_size: int, block_rows: Callable[[int], int],
                 list_pages: Callable[[str, int], Iterator[tuple[list[PrepareInput],
                                                                list[Failure]]]],
                 ) -> Iterator[list[dict[str, Any]]]:
    """Blocks of listing rows of one command-line item (``block_rows(page length)`` rows each).

    A row is an input (``path``, ``speaker``, ``split``, ``origin``) or a listing failure
    (``error`` set, ``path`` naming what failed); ``key`` is ``"<item>:<row>"``, the row's place
    in the listing, stable when a listing is retried.
    """
    n = 0
    for inputs, failures in list_pages(item, page_size):
        rows = [{"key": "", "path": f.input, "speaker": None, "split": None, "origin": None,
                 "error": f.error} for f in failures]
        rows += [{"key": "", "path": i.path, "speaker": i.speaker, "split": i.split,
                  "origin": i.origin, "error": None} for i in inputs]
        for r in rows:
            r["key"] = f"{item_index}:{n}"
            n += 1
        size = block_rows(len(rows))
        for i in range(0, len(rows), size):
            yield rows[i:i + size]


class _Listing(Datasource):
    """Ray Data source of the listing: up to :data:`LISTING_TASKS` read tasks, each listing a
    contiguous run of the command-line items and yielding blocks as pages are listed (so clips
    are dispatched before a large prefix is listed to the end)."""

    def __init__(self, items: list[str], clips_per_block: int, workers_hint: int,
                 list_pages: Callable[..., Any]) -> None:
        self.items = items
        self.clips_per_block = clips_per_block
        self.workers_hint = workers_hint
        self.list_pages = list_pages

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(functools.partial(_read_items, run.tolist(), self), meta)
                for run in np.array_split(np.arange(len(self.items)), self.tasks) if len(run)]

    @property
    def tasks(self) -> int:
        """How many read tasks list the items."""
        return max(1, min(len(self.items), LISTING_TASKS))

    def block_rows(self, page: int) -> int:
        # Blocks are the unit of work (one actor task, one shard): small pages are spread over
        # the workers instead of queued behind one of them.
        return max(1, min(self.clips_per_block, -(-page // (2 * self.workers_hint))))


def _read_items(indices: list[int], source: _Listing) -> Iterator[pa.Table]:
    # One row per block of inputs: Ray Data merges a read task's rows into blocks by bytes,
    # so a row per input would reach the workers as a few huge blocks.
    for i in indices:
        for rows in listing_rows(i, source.items[i], LIST_PAGE, source.block_rows,
                                 source.list_pages):
            yield pa.table({"block": [json.dumps(rows)]})


def count_listing(items: list[str], list_pages: Callable[..., Any]) -> int:
    """How many listing rows (inputs and listing failures) ``items`` give: the progress total.

    Its own pass over the listing: the pipeline's read tasks pause while the workers are busy
    (Ray Data's backpressure), so they finish listing only near the end of a run.
    """
    return sum(len(got) + len(bad) for item in items for got, bad in list_pages(item, LIST_PAGE))


class ClipWorker:
    """Prepares blocks of listed inputs: fetch, hash, claim, decode, detect, crop, and write
    the shard and its index itself. A Ray Data actor (one detector load per actor), or called
    in-process with ``workers=0``.

    A block's shard is named by its clips' content (:func:`se4lip_dist.shards.content_name`),
    so when Ray Data retries a block on another actor after a worker or node was lost, the same
    shard and index are published again, never a second copy.
    """

    def __init__(self, cfg_dict: dict[str, Any], out: str, preview: str | None, registry: Any,
                 clips_per_shard: int, backend: PrepareBackend, detector: Any = None) -> None:
        _single_thread()
        self.cfg = Config.from_dict(cfg_dict)
        self.detector = detector if detector is not None else build_detector(self.cfg.face)
        self.out, self.preview = out, preview
        self.registry = registry
        self.clips_per_shard = clips_per_shard
        self.backend = backend

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's entry point: one block of inputs in (a row of the listing), one row out
        (its shards and outcomes)."""
        shards: list[ShardInfo] = []
        outcomes: list[ClipOutcome] = []
        rows = [r for block in batch["block"].to_pylist() for r in json.loads(block)]
        self.run(rows, outcomes.append, shards.append, keep_partial=False)
        return pa.table({"shards": [json.dumps([asdict(s) for s in shards])],
                         "outcomes": [json.dumps([o.to_json() for o in outcomes])],
                         "worker": [f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"],
                         "cpu_s": [time.process_time()]})

    def run(self, rows: list[dict[str, Any]], on_outcome: Callable[[ClipOutcome], None],
            on_shard: Callable[[ShardInfo], None], *, keep_partial: bool) -> None:
        """Prepare ``rows``; ``on_shard`` gets each shard right after its index is published.

        With ``keep_partial`` the clips finished before an exception (Ctrl-C) are written as a
        shard on the way out; a Ray task leaves that to its retry instead (a shard of part of a
        block would duplicate those clips once the retry writes the whole block).
        """
        writer = IndexedShardWriter(self.out, self.cfg.data.shard_bytes, self.clips_per_shard)
        ok = False
        try:
            with contextlib.ExitStack() as stack:
                staged = [self._stage(r, stack) for r in rows]
                todo = [s for s in staged if isinstance(s, _Staged)]
                claims = self._claim([(s.key, s.clip_id, s.inp.path) for s in todo])
                verdicts = iter(claims)
                for s in staged:
                    if isinstance(s, ClipOutcome):
                        on_outcome(s)
                        continue
                    status, first = next(verdicts)
                    if status == "new":
                        on_outcome(self._prepare(s, writer, on_shard))
                    else:
                        on_outcome(ClipOutcome(s.inp.path, "skipped" if status == "done" else
                                               "duplicate", s.clip_id, duplicate_of=first,
                                               started=s.started))
                    s.release()
            ok = True
        finally:
            if ok or keep_partial:
                info = writer.flush()
                if info is not None:
                    on_shard(info)

    def _claim(self, entries: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        if not entries:
            return []
        if isinstance(self.registry, ClipRegistry):
            return self.registry.claim(entries)
        return ray.get(self.registry.claim.remote(entries))

    def _stage(self, row: dict[str, Any], stack: contextlib.ExitStack) -> _Staged | ClipOutcome:
        """Fetch and hash one input (or say why it cannot be)."""
        started = time.time()
        if row["error"] is not None:
            return ClipOutcome(row["path"], "failed",
                               failure=Failure(row["path"], row["error"], "input"),
                               started=started)
        inp = PrepareInput(row["path"], row["speaker"], row["split"], row["origin"])
        own = stack.enter_context(contextlib.ExitStack())
        local = None
        try:
            local = own.enter_context(self.backend.fetch(inp.path))
            digest = self.backend.digest(local)
        except OSError as e:
            own.close()
            return ClipOutcome(inp.path, "failed", failure=_fetch_failure(inp, e, local),
                               started=started)
        return _Staged(row["key"], inp, clip_id_from(inp.path, digest), local, own, started)

    def _prepare(self, s: _Staged, writer: IndexedShardWriter,
                 on_shard: Callable[[ShardInfo], None]) -> ClipOutcome:
        res = self.backend.process(s.inp, s.clip_id, s.local, self.cfg, self.detector)
        if res.failure is not None:
            return ClipOutcome(s.inp.path, "failed", s.clip_id, failure=res.failure,
                               seconds=res.seconds, started=s.started)
        assert res.record is not None
        info = writer.add(s.clip_id, segments_to_table(res.segments), res.record)
        if info is not None:
            on_shard(info)
        if self.preview and res.preview is not None:
            _write_png(storage.join(self.preview, f"{s.clip_id}.png"), res.preview)
        return ClipOutcome(s.inp.path, "prepared", s.clip_id, frames=res.record.frames,
                           seconds=res.seconds, started=s.started)


@dataclass
class _Staged:
    """An input fetched and hashed, waiting for its claim."""

    key: str
    inp: PrepareInput
    clip_id: str
    local: str
    copy: contextlib.ExitStack
    started: float

    def release(self) -> None:
        """Remove the local copy (a downloaded video) now rather than at the end of the block."""
        self.copy.close()


def _fetch_failure(inp: PrepareInput, e: OSError, local: str | None) -> Failure:
    """The failure record of an input that could not be downloaded (``local`` None) or read."""
    if inp.origin and isinstance(e, storage.StorageNotFoundError) and not isinstance(
            e, storage.BucketNotFoundError):
        return Failure(inp.name, "no such file", "input")
    if inp.origin:
        return Failure(inp.name, str(e), "input")
    if local is not None or storage.is_local(inp.path):
        msg = str(e) if inp.path in str(e) else f"{inp.path}: cannot read: {e}"
        return Failure(inp.path, msg, "input")
    msg = str(e) if inp.path in str(e) else f"{inp.path}: cannot download: {e}"
    return Failure(inp.path, msg, "download")


def _single_thread() -> None:
    # Parallelism comes from running one clip per core; threads inside would oversubscribe.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


# ---------------------------------------------------------------- the run


class _Driver:
    """The driver's side of a run: commits shards, counts outcomes, calls back. Constant work
    per outcome and (amortised) per shard; it never sees clip data."""

    def __init__(self, out: str, manifest: Manifest, summary: PrepareSummary, fps: int,
                 on_start: Callable[[int], None] | None,
                 on_result: Callable[[ClipOutcome], None] | None) -> None:
        self.out = out
        self.committer = ManifestCommitter(manifest, out)
        self.summary = summary
        self.fps = fps
        self.on_start, self.on_result = on_start, on_result
        self.total: int | None = None
        self.waiting: list[ClipOutcome] = []
        self.first_started = 0.0
        self.cpu: dict[str, float] = {}

    def start(self, total: int) -> None:
        """The number of inputs is known: ``on_start``, then the outcomes that waited for it."""
        if self.total is not None:
            return
        self.total = total
        if self.on_start:
            self.on_start(total)
        waiting, self.waiting = self.waiting, []
        for o in waiting:
            self._report(o)

    def worker_cpu(self, worker: str, cpu_s: float) -> None:
        """A clip worker's process CPU time so far (the latest report of each counts)."""
        self.cpu[worker] = max(cpu_s, self.cpu.get(worker, 0.0))
        self.summary.worker_cpu_seconds = sum(self.cpu.values())
        self.summary.workers_used = len(self.cpu)

    def shard(self, info: ShardInfo) -> None:
        self.committer.add(info)
        self.summary.bytes_written += info.bytes

    def outcome(self, o: ClipOutcome) -> None:
        s = self.summary
        s.inputs += 1
        if o.started and (not self.first_started or o.started < self.first_started):
            self.first_started = o.started
        if o.status == "prepared":
            s.prepared += 1
            s.frames += o.frames
            s.video_seconds += o.frames / self.fps
        elif o.status == "skipped":
            s.skipped += 1
        elif o.status == "duplicate":
            s.duplicates.append(f"{o.input} (same content as {o.duplicate_of})")
        elif o.failure is not None:
            s.failures.append(o.failure)
        if self.on_result is None:
            return
        if self.total is None:
            self.waiting.append(o)
        else:
            self._report(o)

    def _report(self, o: ClipOutcome) -> None:
        if self.on_result:
            self.on_result(o)

    def finish(self) -> None:
        """Commit what is left and record the failures (also after an exception)."""
        self.committer.flush()
        append_failures(self.out, [{**f.to_json(), "time": time.time()}
                                   for f in self.summary.failures])


def run_prepare(
    items: list[str],
    out_dir: str | Path,
    cfg: Config,
    *,
    workers: int | None = None,
    min_workers: int = 1,
    clips_per_shard: int = CLIPS_PER_SHARD,
    address: str | None = None,
    preview_dir: str | Path | None = None,
    placement_timeout_s: float = DEFAULT_TIMEOUT_S,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ClipOutcome], None] | None = None,
    backend: PrepareBackend | None = None,
) -> PrepareSummary:
    """Prepare videos into shards under ``out_dir``; resumes an existing folder.

    With Ray, a streaming Ray Data pipeline: the inputs are listed in read tasks, and an
    autoscaling pool of clip workers (:class:`ClipWorker`) fetches, hashes, prepares and writes
    each block of inputs as one shard plus its index; the driver only commits index files into
    ``manifest.json`` and counts outcomes. A rerun skips the clips the folder's index holds.

    Args:
        items: video files, folders, or CSV/JSONL manifests (local or URLs).
        out_dir: shard folder or URL prefix (an existing one must have the same data/face
            config); nothing is written there before the first clip is done.
        cfg: resolved config.
        workers: most clip workers at once (the pool grows to it while there is work and the
            cluster has room); 0 runs in this process without Ray; None: no bound but the
            cluster's.
        min_workers: clip workers the cluster must hold before the run starts.
        clips_per_shard: most clips in one shard (also the unit of work a lost worker redoes).
        address: Ray cluster address (None starts a local Ray).
        preview_dir: where to write one PNG contact sheet of lip crops per clip (local or URL).
        placement_timeout_s: how long the first ``min_workers`` may wait for the cluster.
        on_start: called with the number of inputs, before the first ``on_result``.
        on_result: called with each input's :class:`ClipOutcome` (for progress bars).
        backend: where inputs come from and how they are processed (the real media path).

    Raises:
        PrepareError: the output folder is unreachable or incompatible, the face detector cannot
            load while some input is a usable video (when none is, the inputs' failures are
            reported instead), or the cluster cannot hold the clip workers.
    """
    t0, t0_wall = time.perf_counter(), time.time()
    out = storage.absolute(str(out_dir))
    summary = PrepareSummary(out_dir=out)
    preview = storage.absolute(str(preview_dir)) if preview_dir else None
    backend = backend or PrepareBackend()
    manifest = _open_output(out, preview, cfg)
    detector = _detector_or_input_failures(items, cfg, out, summary)
    if detector is None:
        summary.wall_seconds = time.perf_counter() - t0
        return summary
    on_ray = workers != 0 and bool(items)
    if on_ray:
        max_workers = workers
        min_workers = _start_ray(address, workers, min_workers, placement_timeout_s)
    try:
        _ready_folder(out, manifest)
    except storage.StorageError as e:
        raise PrepareError(str(e)) from e
    driver = _Driver(out, manifest, summary, cfg.data.fps, on_start, on_result)
    try:
        try:
            if on_ray:
                _run_on_ray(items, out, preview, cfg, manifest, driver, backend,
                            min_workers, max_workers, clips_per_shard, placement_timeout_s)
            else:
                _run_in_process(items, out, preview, cfg, manifest, driver, backend,
                                clips_per_shard, detector)
        finally:
            # On Ctrl-C or a crash, every shard whose index is published stays committed.
            driver.finish()
    except storage.StorageError as e:  # --out or --preview cannot be written
        raise PrepareError(str(e)) from e
    summary.wall_seconds = time.perf_counter() - t0
    summary.first_dispatch_s = driver.first_started - t0_wall if driver.first_started else 0.0
    summary.total_clips = manifest.total_clips
    summary.total_frames = manifest.total_frames
    summary.manifest_saves = driver.committer.saves
    return summary


def _open_output(out: str, preview: str | None, cfg: Config) -> Manifest:
    """The output folder's manifest (or a new one), after checking the buckets are there."""
    try:
        for where in (out, preview):
            if where:
                storage.check_bucket(where)
        return _open_manifest(out, cfg)
    except storage.StorageError as e:
        raise PrepareError(str(e)) from e


def _detector_or_input_failures(items: list[str], cfg: Config, out: str,
                                summary: PrepareSummary) -> Any:
    """The face detector, or None when it cannot load and no input was usable anyway.

    Fails the whole run early, with one message, when the detector itself cannot load, unless
    no input could be prepared anyway: then the inputs' failures go into ``summary`` and
    ``failures.jsonl`` as the problem to report.
    """
    try:
        return build_detector(cfg.face)
    except FaceModelError as e:
        inputs, failures = collect_inputs(items)
        unusable = [f for inp in inputs if (f := input_problem(inp)) is not None]
        if len(unusable) < len(inputs):
            raise PrepareError(str(e)) from e
        summary.failures = failures + unusable
        summary.inputs = len(summary.failures)
        append_failures(out, [{**f.to_json(), "time": time.time()} for f in summary.failures])
        return None


def _start_ray(address: str | None, workers: int | None, min_workers: int,
               timeout_s: float) -> int:
    """Join or start Ray and wait until the cluster can hold the first clip workers (before
    anything is written); returns how many the pool starts with at least."""
    min_workers = max(1, min(min_workers, workers or min_workers))
    init_ray(address)
    what = f"{min_workers} clip worker{'s' if min_workers > 1 else ''}"
    try:
        wait_placeable({"CPU": WORKER_CPUS}, min_workers, what, timeout_s)
    except PlacementError as e:
        raise PrepareError(str(e)) from e
    return min_workers


def _run_in_process(items: list[str], out: str, preview: str | None, cfg: Config,
                    manifest: Manifest, driver: _Driver, backend: PrepareBackend,
                    clips_per_shard: int, detector: Any) -> None:
    rows = [r for i, item in enumerate(items)
            for block in listing_rows(i, item, LIST_PAGE, lambda n: max(1, n), backend.list_pages)
            for r in block]
    driver.start(len(rows))
    worker = ClipWorker(cfg.to_dict(), out, preview, ClipRegistry(manifest), clips_per_shard,
                        backend, detector=detector)
    cpu0 = time.process_time()
    for i in range(0, len(rows), clips_per_shard):
        worker.run(rows[i:i + clips_per_shard], driver.outcome, driver.shard, keep_partial=True)
        driver.worker_cpu("in-process", time.process_time() - cpu0)


def _run_on_ray(items: list[str], out: str, preview: str | None, cfg: Config,
                manifest: Manifest, driver: _Driver, backend: PrepareBackend,
                min_workers: int, max_workers: int | None, clips_per_shard: int,
                timeout_s: float) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Beside the driver: it lives and dies with the run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    registry = ray.remote(ClipRegistry).options(num_cpus=0, scheduling_strategy=here).remote(
        manifest)
    hint = max_workers or max(1, int(cluster_cpus()))
    # Start with what the cluster holds now (no more than the bound): a fixed machine is busy
    # at once, an autoscaling cluster with no worker node yet starts from min_workers.
    free = int(ray.available_resources().get("CPU", 0) // WORKER_CPUS)
    initial = max(min_workers, min(max_workers or free, free))
    # Listing tasks take no CPU: on a small node the clip workers hold every core, and a read
    # task waiting for one would stall the whole pipeline. One block per read task asked for,
    # or Ray Data splits the listing's blocks (which are the shards) to reach its minimum.
    listing = _Listing(items, clips_per_shard, hint, backend.list_pages)
    ds = ray.data.read_datasource(listing, num_cpus=0, override_num_blocks=listing.tasks)
    # Every listing row (a block of inputs) its own Ray Data block: the unit a worker takes.
    ds.context.target_max_block_size = 1
    ds = ds.map_batches(
        ClipWorker, batch_size=None, batch_format="pyarrow", num_cpus=WORKER_CPUS,
        compute=ray.data.ActorPoolStrategy(min_size=min_workers, max_size=max_workers,
                                           initial_size=initial),
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "out": out, "preview": preview,
                               "registry": registry, "clips_per_shard": clips_per_shard,
                               "backend": backend},
    )
    count = ray.remote(num_cpus=0)(count_listing).remote(items, backend.list_pages)
    ctx = ray.data.DataContext.get_current()
    wait_before = ctx.wait_for_min_actors_s
    # The first workers were placeable; loading the detector gets a bounded wait as well.
    ctx.wait_for_min_actors_s = max(1, math.ceil(timeout_s))
    try:
        for row in ds.iter_rows():
            for d in json.loads(row["shards"]):
                driver.shard(ShardInfo(**d))
            for o in json.loads(row["outcomes"]):
                driver.outcome(ClipOutcome.from_json(o))
            driver.worker_cpu(row["worker"], row["cpu_s"])
            if driver.total is None and ray.wait([count], timeout=0)[0]:
                driver.start(_count_or(count, driver.summary.inputs))
        driver.start(_count_or(count, driver.summary.inputs))
    except ray.exceptions.GetTimeoutError as e:
        raise PrepareError(f"{min_workers} clip worker(s) did not start within {timeout_s:g} s: "
                           f"{e}") from e
    except ray.exceptions.RayError as e:
        raise PrepareError(f"the prepare job failed: {e}") from e
    finally:
        ctx.wait_for_min_actors_s = wait_before
        ray.kill(registry)
        ray.cancel(count)


def _count_or(count: Any, fallback: int) -> int:
    """The listing count, or ``fallback`` when counting failed (it only feeds progress)."""
    try:
        return int(ray.get(count))
    except ray.exceptions.RayError:
        return fallback


_LEGACY_VALUES = {"face.refine_motion": 0.0}
"""Config keys added after shards were first written, with what a manifest without them used."""


def _open_manifest(out: str, cfg: Config) -> Manifest:
    """Load the folder's manifest (checking the config matches) or start a new one.

    A manifest that names no shard constrains nothing (older versions wrote one even when every
    clip failed): it is replaced by one with this run's config.
    """
    wanted = {"data": cfg.to_dict()["data"], "face": cfg.to_dict()["face"]}
    if storage.exists(storage.join(out, MANIFEST)):
        try:
            manifest = Manifest.load(out)
        except ManifestError as e:
            raise PrepareError(str(e)) from e
        if not manifest.shards:
            return Manifest(config=wanted)
        diffs = []  # (key, value the folder was prepared with, value of this run)
        for sec, values in wanted.items():
            have = manifest.config.get(sec) or {}
            for k, v in values.items():
                key = f"{sec}.{k}"
                old = have.get(k, _LEGACY_VALUES.get(key))
                # Where the detector weights live does not change what the shards contain.
                if old != v and key != "face.insightface_root":
                    diffs.append((key, old, v))
        if diffs:
            changes = "; ".join(f"{key}: {old!r} -> {v!r}" for key, old, v in diffs)
            keep = [f"--set {key}={old}" for key, old, _ in diffs
                    if isinstance(old, int | float | str) and not isinstance(old, bool)]
            hint = (f", or add to it with its config: {' '.join(keep)}"
                    if len(keep) == len(diffs) else "")
            raise PrepareError(
                f"{out}: already holds shards prepared with another config ({changes}); "
                f"use a new --out folder{hint}"
            )
        return manifest
    return Manifest(config=wanted)


def _ready_folder(out: str, manifest: Manifest) -> None:
    """Before writing: an old-layout manifest is rewritten with index files, what a killed run
    left is adopted or removed (:func:`se4lip_dist.manifest.recover`)."""
    adopted, _ = recover(manifest, out)
    if manifest.legacy or adopted:
        manifest.save(out)


def _write_png(url: str, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{url}: PNG encoding failed")
    storage.write_atomic(url, buf.tobytes())


__all__ = [
    "CLIPS_PER_SHARD",
    "FAILURES",
    "ClipOutcome",
    "ClipRegistry",
    "ClipResult",
    "ClipWorker",
    "Failure",
    "PrepareBackend",
    "PrepareError",
    "PrepareInput",
    "PrepareSummary",
    "clip_id_for",
    "clip_id_from",
    "collect_inputs",
    "count_listing",
    "input_problem",
    "iter_input_pages",
    "listing_rows",
    "prepare_local",
    "process_clip",
    "run_prepare",
    "segment_bounds",
]
