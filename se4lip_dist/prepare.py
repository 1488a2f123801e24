"""``prepare``: videos -> 25 fps frames + 16 kHz audio -> mouth tracking -> lip crops -> shards.

The per-clip work (:func:`process_clip`) is a pure function of one input file; Ray actors run it
in parallel (each actor loads the face detector once), and the driver alone writes shards and the
manifest, so a crash or Ctrl-C never leaves a half-written shard or a manifest naming one.

Inputs, ``--out`` and ``--preview`` may be local paths or URLs (``s3://bucket/prefix``; see
:mod:`se4lip_dist.storage`): a remote video is downloaded by the worker that decodes it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import ray
import torch
from ray.util import ActorPool

from se4lip_dist import faces, media, storage
from se4lip_dist.config import Config
from se4lip_dist.faces import FaceModelError, build_detector
from se4lip_dist.manifest import (
    FAILURES,
    MANIFEST,
    ClipRecord,
    Manifest,
    ManifestError,
    append_failures,
)
from se4lip_dist.media import MediaError, MediaInfo
from se4lip_dist.placement import DEFAULT_TIMEOUT_S, PlacementError, wait_placeable
from se4lip_dist.runtime import cluster_cpus, init_ray
from se4lip_dist.shards import SHARD_GLOB, Segment, ShardWriter, encode_jpeg, segments_to_table

VIDEO_EXTS = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".ts"}
MANIFEST_EXTS = {".csv", ".jsonl"}
PREVIEW_TILES = 16


class PrepareError(RuntimeError):
    """A problem that stops the whole run (bad output folder, detector that cannot load)."""


@dataclass(frozen=True)
class PrepareInput:
    """One video to prepare, with optional labels from a manifest."""

    path: str
    speaker: str | None = None
    split: str | None = None


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
        }


# ---------------------------------------------------------------- inputs


def _ext(url: str) -> str:
    return os.path.splitext(storage.basename(url))[1].lower()


def collect_inputs(items: Iterable[str]) -> tuple[list[PrepareInput], list[Failure]]:
    """Expand files, folders (recursively) and CSV/JSONL manifests into inputs.

    Each item may be local or a URL (``s3://bucket/prefix`` is searched like a folder). Bad
    entries (missing paths, unreachable buckets, malformed manifest lines) become
    :class:`Failure` records so the rest of the run goes on.
    """
    inputs: list[PrepareInput] = []
    failures: list[Failure] = []
    for item in items:
        try:
            kind = storage.kind(item)
            if kind == "dir":
                found = [f for f in storage.list_files(item) if _ext(f) in VIDEO_EXTS]
                if not found:
                    failures.append(Failure(item, "no video files in this folder", "input"))
                inputs.extend(PrepareInput(f) for f in found)
                continue
        except storage.StorageError as e:
            failures.append(Failure(item, str(e), "input"))
            continue
        if _ext(item) in MANIFEST_EXTS:
            got, bad = _read_input_manifest(item)
            inputs.extend(got)
            failures.extend(bad)
        elif kind == "file":
            inputs.append(PrepareInput(item))
        else:
            failures.append(Failure(item, "no such file or folder", "input"))
    return inputs, failures


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
        try:
            found = storage.is_file(video)
        except storage.StorageError as e:
            failures.append(Failure(f"{where} ({video})", str(e), "input"))
            continue
        if not found:
            failures.append(Failure(f"{where} ({video})", "no such file", "input"))
            continue
        split = (row.get("split") or None) and str(row["split"]).strip()
        if split not in (None, "", "train", "val", "test"):
            failures.append(Failure(where, f"split must be train|val|test, got {split!r}",
                                    "input"))
            continue
        inputs.append(PrepareInput(video, (row.get("speaker") or None) and
                                   str(row["speaker"]).strip(), split or None))
    return inputs, failures


def clip_id_for(path: str | Path) -> str:
    """Stable id: a filesystem-safe stem plus a hash of the file's (or object's) bytes.

    Content hashing makes reruns resume even when the folder moved, and identical files
    given twice are recognised as one clip.

    Raises:
        OSError: the file cannot be read (a :class:`~se4lip_dist.storage.StorageError`).
    """
    digest = storage.sha256(str(path))
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
    result = ClipResult(inp, clip_id)
    try:
        with storage.local_copy(inp.path) as local:
            _process_local(result, local, cfg, detector)
    except OSError as e:  # the download (a local file needs none)
        msg = str(e) if inp.path in str(e) else f"{inp.path}: cannot download: {e}"
        result.failure = Failure(inp.path, msg, "download")
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
    inp, clip_id = result.input, result.clip_id
    data, face = cfg.data, cfg.face
    stage = "decode"
    try:
        info = _probe_streams(path, inp.path)
        audio = media.decode_audio(path, data.sample_rate, info=info)
        stage = "faces"
        tracker = faces.MouthTracker(
            detector,
            detect_every=face.detect_every,
            refine_motion=face.refine_motion,
            smooth_window=face.smooth_window,
            max_missing_fraction=face.max_missing_fraction,
        )
        jpegs: list[bytes] = []
        kps: list[np.ndarray] = []
        scores: list[float] = []
        detected: list[bool] = []
        tiles: list[np.ndarray] = []
        # One decoder thread: clips run one per core, and threads cost CPU time per frame.
        frames = media.iter_pictures(path, data.fps, info=info, threads=1)
        for tf in tracker.track(frames):
            cx, cy, side = faces.mouth_square(tf.kps, face.mouth_scale)
            crop = faces.crop_square(tf.frame, cx, cy, side, data.crop_size)
            jpegs.append(encode_jpeg(crop, data.jpeg_quality))
            kps.append(np.asarray(tf.kps, np.float32))
            scores.append(float(tf.score))
            detected.append(bool(tf.detected))
            if tf.index % 5 == 0 and len(tiles) < 4 * PREVIEW_TILES:
                tiles.append(crop)
        n = len(jpegs)
        stage = "segment"
        if n < cfg.train.window_frames:
            raise ValueError(
                f"{inp.path}: clip has {n} frames at {data.fps} fps, shorter than one "
                f"{cfg.train.window_frames}-frame window"
            )
        spf = data.samples_per_frame
        audio = _fit_length(audio, n * spf)
        kp = np.stack(kps)
        sc = np.asarray(scores, np.float32)
        de = np.asarray(detected, bool)
        for seg, (s0, s1) in enumerate(segment_bounds(n, data.segment_frames,
                                                      cfg.train.window_frames)):
            result.segments.append(
                Segment(
                    clip_id=clip_id, segment=seg, start_frame=s0, clip_frames=n,
                    fps=data.fps, sample_rate=data.sample_rate, crop_size=data.crop_size,
                    lips_jpeg=jpegs[s0:s1], audio=audio[s0 * spf : s1 * spf],
                    keypoints=kp[s0:s1], det_score=sc[s0:s1], detected=de[s0:s1],
                    speaker=inp.speaker, split=inp.split,
                )
            )
        result.record = ClipRecord(
            source=storage.absolute(inp.path), frames=n, segments=len(result.segments), shard="",
            speaker=inp.speaker, split=inp.split, duration_s=round(n / data.fps, 3),
            src_fps=info.src_fps, vfr=info.vfr,
            missing_fraction=round(float(tracker.missing_fraction), 4),
            mean_det_score=round(float(sc[de].mean()) if de.any() else 0.0, 4),
        )
        result.preview = _contact_sheet(tiles)
    except Exception as e:  # every per-clip error becomes a failure record, never a crash
        msg = (str(e) or type(e).__name__).replace(path, inp.path)
        if inp.path not in msg:
            msg = f"{inp.path}: {msg}"
        result.failure = Failure(inp.path, msg, stage,
                                 traceback.format_exc().replace(path, inp.path))


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


# ---------------------------------------------------------------- the run


class _ClipWorker:
    """Ray actor body: loads the detector once and prepares clips."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        _single_thread()

        self.cfg = Config.from_dict(cfg_dict)
        self.detector = build_detector(self.cfg.face)

    def process(self, inp: PrepareInput, clip_id: str) -> ClipResult:
        return process_clip(inp, clip_id, self.cfg, self.detector)


def _single_thread() -> None:
    # Parallelism comes from running one clip per core; threads inside would oversubscribe.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def run_prepare(
    items: list[str],
    out_dir: str | Path,
    cfg: Config,
    *,
    workers: int | None = None,
    address: str | None = None,
    preview_dir: str | Path | None = None,
    placement_timeout_s: float = DEFAULT_TIMEOUT_S,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ClipResult], None] | None = None,
) -> PrepareSummary:
    """Prepare videos into shards under ``out_dir``; resumes an existing folder.

    Args:
        items: video files, folders, or CSV/JSONL manifests (local or URLs).
        out_dir: shard folder or URL prefix (an existing one must have the same data/face
            config); nothing is written there before the first clip is done.
        cfg: resolved config.
        workers: parallel clip workers; 0 runs in this process without Ray; None = Ray CPUs.
        address: Ray cluster address (None starts a local Ray).
        preview_dir: where to write one PNG contact sheet of lip crops per clip (local or URL).
        placement_timeout_s: how long the clip workers may wait for the cluster to hold them.
        on_start: called with the number of clips to process.
        on_result: called after each clip (for progress bars).

    Raises:
        PrepareError: the output folder is unreachable or incompatible, the face detector cannot
            load while some input is a usable video (when none is, the inputs' failures are
            reported instead), or the cluster cannot hold the clip workers.
    """
    t0 = time.perf_counter()
    out = storage.absolute(str(out_dir))
    summary = PrepareSummary(out_dir=out)
    preview = storage.absolute(str(preview_dir)) if preview_dir else None
    try:
        for where in (out, preview):
            if where:
                storage.check_bucket(where)
        manifest = _open_manifest(out, cfg)
    except storage.StorageError as e:
        raise PrepareError(str(e)) from e

    inputs, failures = collect_inputs(items)
    summary.inputs = len(inputs) + len(failures)
    todo: list[tuple[PrepareInput, str]] = []
    seen: dict[str, str] = {}
    for inp in inputs:
        try:
            cid = clip_id_for(inp.path)
        except OSError as e:
            msg = str(e) if inp.path in str(e) else f"{inp.path}: cannot read: {e}"
            failures.append(Failure(inp.path, msg, "input"))
            continue
        digest = cid.rsplit("-", 1)[1]
        if digest in seen:
            summary.duplicates.append(f"{inp.path} (same content as {seen[digest]})")
            continue
        seen[digest] = inp.path
        if cid in manifest.clips:
            summary.skipped += 1
            continue
        todo.append((inp, cid))

    # Fail the whole run early, with one message, when the detector itself cannot load, unless
    # no input could be prepared anyway: then the inputs are the problem to report.

    detector: Any = None
    if todo:
        try:
            detector = build_detector(cfg.face)
        except FaceModelError as e:
            unusable = [f for inp, _ in todo if (f := input_problem(inp)) is not None]
            if len(unusable) < len(todo):
                raise PrepareError(str(e)) from e
            failures.extend(unusable)
            todo = []
    # Before anything is written: a cluster that cannot hold the workers fails here.
    pool = _ClipPool.start(todo, cfg, workers, address, placement_timeout_s) \
        if todo and workers != 0 else None
    _remove_orphans(out, manifest)

    writer = ShardWriter(out, cfg.data.shard_bytes, prefix=f"shard-{int(time.time()):x}")
    pending: dict[str, ClipRecord] = {}

    def commit(info: Any) -> None:
        if info is None:
            return
        for cid in info.clips:
            pending[cid].shard = info.file
        manifest.add_shard(info, {cid: pending.pop(cid) for cid in info.clips})
        # The manifest only ever names published shards, and exists only once one does.
        manifest.save(out)
        summary.bytes_written += info.bytes

    if on_start:
        on_start(len(todo))
    results = pool.results() if pool else (process_clip(inp, cid, cfg, detector)
                                           for inp, cid in todo)
    try:
        try:
            for res in results:
                if res.failure:
                    failures.append(res.failure)
                else:
                    assert res.record is not None
                    pending[res.clip_id] = res.record
                    summary.prepared += 1
                    summary.frames += res.record.frames
                    summary.video_seconds += res.record.frames / cfg.data.fps
                    commit(writer.add(res.clip_id, segments_to_table(res.segments)))
                    if preview and res.preview is not None:
                        _write_png(storage.join(preview, f"{res.clip_id}.png"), res.preview)
                if on_result:
                    on_result(res)
        finally:
            # On Ctrl-C or a crash, keep every clip that finished: flush them as one shard.
            commit(writer.flush())
            append_failures(out, [{**f.to_json(), "time": time.time()} for f in failures])
    except storage.StorageError as e:  # --out or --preview cannot be written
        raise PrepareError(str(e)) from e
    summary.failures = failures
    summary.wall_seconds = time.perf_counter() - t0
    summary.total_clips = len(manifest.clips)
    summary.total_frames = manifest.total_frames
    return summary


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


def _remove_orphans(out: str, manifest: Manifest) -> None:
    """Delete temp files and shards no manifest names (left by a killed run; their clips redo)."""
    named = {s.file for s in manifest.shards}
    storage.remove_temp_files(out)
    for f in storage.glob(storage.join(out, SHARD_GLOB)):
        if storage.basename(f) not in named:
            storage.delete(f)


class _ClipPool:
    """Ray actors that prepare clips, started only once the cluster can hold them."""

    def __init__(self, pool: Any, todo: list[tuple[PrepareInput, str]]) -> None:
        self.pool = pool
        self.todo = todo

    @classmethod
    def start(cls, todo: list[tuple[PrepareInput, str]], cfg: Config, workers: int | None,
              address: str | None, timeout_s: float) -> _ClipPool:
        """Start the actors; :class:`PrepareError` when the cluster cannot hold them in time."""
        init_ray(address)
        n = min(workers or max(1, int(cluster_cpus())), len(todo))
        request = {"CPU": 1.0}
        what = f"{n} clip worker{'s' if n > 1 else ''}"
        try:
            wait_placeable(request, n, what, timeout_s)
        except PlacementError as e:
            raise PrepareError(str(e)) from e
        actor_cls = ray.remote(num_cpus=request["CPU"])(_ClipWorker)
        cfg_dict = cfg.to_dict()
        actors = [actor_cls.remote(cfg_dict) for _ in range(n)]
        ready = [a.__ray_ready__.remote() for a in actors]
        # Placeable now; start-up (loading the detector) gets its own bounded wait.
        done, _ = ray.wait(ready, num_returns=n, timeout=max(1.0, timeout_s))
        if len(done) < n:
            for a in actors:
                ray.kill(a)
            raise PrepareError(f"only {len(done)} of {what} started within {timeout_s:g} s "
                               "(raise the placement timeout or lower --workers)")
        try:
            ray.get(done)  # a worker whose constructor failed raises here
        except ray.exceptions.RayActorError as e:
            for a in actors:
                ray.kill(a)
            raise PrepareError(f"a clip worker could not start: {e}") from e
        return cls(ActorPool(actors), todo)

    def results(self) -> Iterator[ClipResult]:
        """Results in completion order."""
        yield from self.pool.map_unordered(lambda a, v: a.process.remote(*v), self.todo)


def _write_png(url: str, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{url}: PNG encoding failed")
    storage.write_atomic(url, buf.tobytes())


__all__ = [
    "FAILURES",
    "ClipResult",
    "Failure",
    "PrepareError",
    "PrepareInput",
    "PrepareSummary",
    "clip_id_for",
    "collect_inputs",
    "input_problem",
    "process_clip",
    "run_prepare",
    "segment_bounds",
]
