"""``extract``: per-video-frame speech features from a registered encoder, as a Ray Data job.

One row per input (video or audio file) flows through a streaming Ray Data job: planning tasks
read each input's ``_SUCCESS.json`` marker in parallel (:func:`plan_job`), then an autoscaling
pool of encoder actors (``concurrency`` at most) takes the inputs with work left. Each actor
loads the encoder once, decodes 16 kHz mono audio on the video's clock, embeds one
``train.window_frames`` window centred on every video frame
(:func:`se4lip_dist.sync.centred_audio_windows`: frame ``c`` gets training window
``c - (T - 1) // 2``), and writes the outputs itself, atomically
(:func:`se4lip_dist.storage.write_atomic_with`), into ``out_dir/<name>/``. Inputs and ``out_dir``
may be local or URLs (``s3://bucket/prefix``); a remote input is downloaded by its actor.

- ``aud_se4lip.npy``: float32 ``[N, D]``, N = number of video frames at ``fps`` (audio-only
  inputs: ``floor(duration * fps)``).
- ``aud_se4lip_w16.npy``: float32 ``[N, 16, D]``; row ``i`` holds the features of frames
  ``i - 8 .. i + 7`` (edge frames repeated), so ``[i, 8]`` is frame ``i`` itself. This is the
  ``[N, W, C]`` layout of the ``aud_*.npy`` files that ER-NeRF / TalkingGaussian / SyncTalk load.
- ``aud_se4lip.parquet`` (optional): columns ``clip, frame, feature``.
- ``_SUCCESS.json``, written last: the model (URI as given and as resolved: registered name,
  version, run), the input's sha256, N, D and each output's sha256. A rerun skips inputs whose
  marker matches and whose outputs are present, and writes only the missing outputs of the rest.

The same input and model give byte-identical ``.npy`` files (fixed batch layout, one thread).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy

from se4lip_dist import media, storage
from se4lip_dist.config import Config
from se4lip_dist.media import count_output_frames
from se4lip_dist.models.speech import int8_fidelity, quantize_int8
from se4lip_dist.placement import DEFAULT_TIMEOUT_S, PlacementError, describe, wait_placeable
from se4lip_dist.prepare import VIDEO_EXTS, Failure, collect_inputs
from se4lip_dist.registry import RegistryError, embed_waveforms, load_encoder, pin_model
from se4lip_dist.runtime import init_ray
from se4lip_dist.sync import centred_audio_windows, shift_audio
from se4lip_dist.tracking import (
    RunLogger,
    TrackingError,
    check_reachable,
    end_run,
    git_revision,
    resolve_tracking_uri,
    start_run,
)

AUDIO_EXTS = {".wav", ".m4a", ".mp3", ".flac", ".ogg", ".opus", ".aac"}
FRAME_FILE = "aud_se4lip.npy"
WINDOW_FILE = "aud_se4lip_w16.npy"
PARQUET_FILE = "aud_se4lip.parquet"
SUCCESS_FILE = "_SUCCESS.json"
WINDOW = 16
"""Frames per window of the windowed output (the renderers' DeepSpeech/wav2vec layout)."""
FORMATS = ("frame", "window", "both")
MARKER_VERSION = 1
ACTOR_CPUS = 0.5
"""Fractional on purpose: actors reserving whole CPUs starve Ray Data on small machines."""
PLAN_CPUS = 0.1
"""Planning tasks only read markers."""
JOBS_PER_BLOCK = 16
PRECISIONS = ("fp32", "int8")
INT8_MIN_COSINE = 0.999
"""``--precision int8`` is refused for an encoder whose int8 embeddings drift further than this."""


class ExtractError(RuntimeError):
    """A problem that stops the whole run (bad model URI, bad arguments, Ray failure)."""


@dataclass
class ExtractSummary:
    """The outcome of an ``extract`` run."""

    out_dir: str
    model_uri: str
    model: dict[str, Any] = field(default_factory=dict)
    inputs: int = 0
    extracted: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    frames: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    """Summed per-input actor time (decode + embed + write), without Ray/model start-up."""
    dim: int | None = None
    outputs: list[str] = field(default_factory=list)
    run_id: str | None = None

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failures

    @property
    def exit_code(self) -> int:
        """0 when every input is extracted or skipped, 1 when any failed."""
        return 0 if self.ok else 1

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio processed per wall-clock second (higher is faster)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "model_uri": self.model_uri,
            "model": self.model,
            "inputs": self.inputs,
            "extracted": self.extracted,
            "skipped_complete": self.skipped,
            "failed": len(self.failures),
            "failures": [f.to_json() for f in self.failures],
            "frames": self.frames,
            "dim": self.dim,
            "audio_seconds": round(self.audio_seconds, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "compute_seconds": round(self.compute_seconds, 2),
            "real_time_factor": round(self.real_time_factor, 2),
            "outputs": self.outputs,
            "mlflow_run_id": self.run_id,
            "exit_code": self.exit_code,
        }


# ---------------------------------------------------------------- pure helpers


def frame_windows(features: np.ndarray, width: int = WINDOW) -> np.ndarray:
    """``[N, D]`` -> ``[N, width, D]``: row ``i`` holds frames ``i - width//2 .. i + width//2 - 1``.

    Frames beyond either end repeat the first/last frame, so ``out[i, width // 2] == features[i]``.
    """
    n = len(features)
    idx = np.arange(n)[:, None] + np.arange(width)[None, :] - width // 2
    return np.ascontiguousarray(features[np.clip(idx, 0, n - 1)])


def _stem(path: str) -> str:
    stem = Path(storage.basename(path)).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:64] or "input"


def output_names(paths: list[str]) -> dict[str, str]:
    """Output folder name per input: its stem, plus a short hash of the path when stems collide.

    Args:
        paths: resolved input paths (unique).

    Returns:
        ``{path: name}``; names are unique and filesystem-safe.
    """
    by_stem: dict[str, list[str]] = {}
    for p in paths:
        by_stem.setdefault(_stem(p).lower(), []).append(p)
    names = {}
    for group in by_stem.values():
        for p in group:
            if len(group) == 1:
                names[p] = _stem(p)
            else:
                names[p] = f"{_stem(p)}-{hashlib.sha256(p.encode()).hexdigest()[:8]}"
    return names


def wanted_outputs(fmt: str, parquet: bool) -> list[str]:
    """Output file names for ``--format`` and ``--parquet``."""
    if fmt not in FORMATS:
        raise ExtractError(f"format must be one of {FORMATS}, got {fmt!r}")
    files = []
    if fmt in ("frame", "both"):
        files.append(FRAME_FILE)
    if fmt in ("window", "both"):
        files.append(WINDOW_FILE)
    if parquet:
        files.append(PARQUET_FILE)
    return files


def expand_inputs(items: Iterable[str]) -> tuple[list[str], list[Failure]]:
    """Files, folders (recursive: video and audio files) and CSV/JSONL manifests -> inputs.

    Items may be local or URLs (``s3://bucket/prefix`` is searched like a folder).

    Returns:
        ``(inputs, failures)``: unique resolved paths (URLs stay URLs) in a stable order, and
        bad entries.
    """
    paths: list[str] = []
    failures: list[Failure] = []
    exts = VIDEO_EXTS | AUDIO_EXTS
    for item in items:
        try:
            found = [f for f in storage.list_files(item)
                     if Path(storage.basename(f)).suffix.lower() in exts] \
                if storage.is_dir(item) else None
        except storage.StorageError as e:
            failures.append(Failure(item, str(e), "input"))
            continue
        if found is not None:
            if not found:
                failures.append(Failure(item, f"{item}: no audio or video files in this folder",
                                        "input"))
            paths.extend(found)
        else:
            got, bad = collect_inputs([item])
            paths.extend(i.path for i in got)
            failures.extend(f if f.input in f.error else Failure(f.input, f"{f.input}: {f.error}",
                                                                 f.stage) for f in bad)
    seen: set[str] = set()
    unique = []
    for p in paths:
        r = str(Path(p).resolve()) if storage.is_local(p) else storage.absolute(p)
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique, failures


# ---------------------------------------------------------------- the model


def resolve_model(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """Pin a model URI (:func:`registry.pin_model`): an alias or ``latest`` becomes a fixed
    registered version.

    Actors load the pinned URI, so an alias that moves mid-job cannot mix two models, and the
    ``_SUCCESS`` markers name the exact version.

    Raises:
        ExtractError: the registry or the store does not know the model.
    """
    try:
        return pin_model(model_uri, tracking_uri)
    except (RegistryError, TrackingError) as e:
        raise ExtractError(str(e)) from e


def _model_identity(model: dict[str, Any]) -> dict[str, Any]:
    # A registered version is named by its pinned URI; its LoggedModel id is left out so that
    # markers written before pinning recorded it stay valid.
    return {"pinned_uri": model.get("pinned_uri"), "run_id": model.get("run_id"),
            "model_id": None if model.get("version") is not None else model.get("model_id")}


# ---------------------------------------------------------------- per-input work


def _read_marker(folder: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(storage.join(folder, SUCCESS_FILE)))
    except (OSError, ValueError):
        return None


def plan_input(path: str, folder: str | Path, identity: dict[str, Any],
               settings: dict[str, Any], wanted: list[str]) -> list[str]:
    """The outputs still to write for one input (empty: complete, skip it).

    A marker counts when it names the same model, settings and input bytes (size and mtime
    first; the sha256 only when those changed, so a rerun does not re-read every input).
    ``path`` and ``folder`` may be local or URLs.
    """
    folder = str(folder)
    marker = _read_marker(folder)
    if (marker is None or marker.get("version") != MARKER_VERSION
            or marker.get("model_identity") != identity or marker.get("settings") != settings):
        return list(wanted)
    try:
        st = storage.stat(path)
    except OSError:
        return list(wanted)
    src = marker.get("input", {})
    touched = (st.size, st.mtime_ns) != (src.get("bytes"), src.get("mtime_ns"))
    try:
        if touched and (st.size != src.get("bytes") or storage.sha256(path) != src.get("sha256")):
            return list(wanted)
    except OSError:
        return list(wanted)
    outputs = marker.get("outputs", {})
    missing = []
    for name in wanted:
        try:
            have = storage.stat(storage.join(folder, name)).size
        except OSError:
            have = None
        if name not in outputs or have != outputs[name]["bytes"]:
            missing.append(name)
    return missing


def plan_job(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with ``todo`` (:func:`plan_input`), ``complete`` (nothing to do: skipped) and
    ``fresh`` (no usable marker: every output is rewritten) filled in; runs in the pipeline's
    planning tasks."""
    folder = storage.join(storage.absolute(job["out_dir"]), job["name"])
    todo = plan_input(job["path"], folder, job["identity"], job["settings"], job["wanted"])
    return {**job, "todo": todo, "complete": not todo,
            "fresh": bool(todo) and (todo == job["wanted"] or _read_marker(folder) is None)}


def _plan_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"job": np.asarray([json.dumps(plan_job(json.loads(str(j)))) for j in batch["job"]])}


def _npy_writer(array: np.ndarray) -> Callable[[Any], None]:
    return lambda f: np.save(f, array, allow_pickle=False)


def _parquet_writer(clip: str, feats: np.ndarray) -> Callable[[Any], None]:
    n, d = feats.shape
    table = pa.table({
        "clip": pa.array([clip] * n, pa.string()),
        "frame": pa.array(np.arange(n, dtype=np.int32)),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d),
    })
    return lambda f: pq.write_table(table, f)


def count_frames(info: Any, fps: int) -> int:
    """N for an input: video frames at ``fps``, or ``floor(duration * fps)`` for audio only."""
    if info.has_video:
        return count_output_frames(info, fps)
    return int(np.floor(info.duration_s * fps + 1e-6))


def extract_features(encoder: Any, cfg: Any, path: str, fps: int,
                     batch_size: int, audio_offset: int = 0) -> tuple[np.ndarray, float]:
    """One embedding per video frame of ``path``.

    Args:
        encoder: a speech encoder (``[B, S] -> [B, D]``) in eval mode, on its device.
        cfg: its :class:`~se4lip_dist.config.Config` (``train.window_frames``, sample rate).
        path: video or audio file.
        fps: video frame rate of the output rows.
        batch_size: windows per forward pass.
        audio_offset: the input's measured AV offset in frames (``audit``; > 0: audio late):
            the audio is advanced by it first (zeros shifted in), so frame ``c`` gets the
            sound of its own mouth movement.

    Returns:
        ``(features float32 [N, D], audio seconds)``.

    Raises:
        MediaError: undecodable input, no audio stream, or shorter than one frame.
    """
    sr = cfg.data.sample_rate
    if sr % fps:
        raise media.MediaError(f"{path}: sample rate {sr} is not a multiple of fps {fps}")
    spf = sr // fps
    info = media.probe(path)
    if not info.has_audio:
        raise media.MediaError(f"{path}: no audio stream")
    n = count_frames(info, fps)
    if n < 1:
        raise media.MediaError(f"{path}: shorter than one frame at {fps} fps")
    audio = media.decode_audio(path, sr, n_samples=n * spf, info=info)
    if audio_offset:
        audio = shift_audio(audio, -audio_offset, spf)
    windows = centred_audio_windows(audio, n, cfg.train.window_frames, spf)
    chunks = [embed_waveforms(encoder, np.ascontiguousarray(windows[i:i + batch_size]), cfg)
              for i in range(0, n, batch_size)]
    return np.ascontiguousarray(np.concatenate(chunks).astype(np.float32)), n / fps


def process_input(encoder: Any, cfg: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Extract one input and write its missing outputs and marker. Never raises for bad input.

    Args:
        encoder: loaded speech encoder.
        cfg: its config.
        job: ``path``, ``name``, ``out_dir``, ``todo`` (file names), ``identity``,
            ``settings``, ``model`` (resolved info), ``batch_size``.

    Returns:
        ``name``, ``path``, ``status`` (``done``/``failed``, or ``skipped`` for a job planned
        ``complete``), ``error``, ``traceback`` (of a failure), ``frames``, ``dim``,
        ``audio_seconds``, ``seconds``.
    """
    t0 = time.perf_counter()
    path, name = job["path"], job["name"]
    folder = storage.join(storage.absolute(job["out_dir"]), name)
    out: dict[str, Any] = {"name": name, "path": path, "status": "done", "error": "",
                           "traceback": "", "frames": 0, "dim": 0, "audio_seconds": 0.0}
    if job.get("complete"):
        out.update(status="skipped", seconds=time.perf_counter() - t0)
        return out
    local = path
    try:
        st = storage.stat(path)
        with storage.local_copy(path) as local:
            digest = storage.sha256(local)
            feats, seconds = extract_features(encoder, cfg, local, job["settings"]["fps"],
                                              job["batch_size"],
                                              job["settings"].get("audio_offset", 0))
        storage.remove_temp_files(folder)  # left by a killed run (local folders only)
        marker = _read_marker(folder)
        keep = marker.get("outputs", {}) if marker and not job.get("fresh") else {}
        # The old marker goes first: from here until the new one lands the folder is incomplete.
        storage.delete(storage.join(folder, SUCCESS_FILE))
        written: dict[str, Any] = {k: v for k, v in keep.items() if k not in job["todo"]
                                   and storage.is_file(storage.join(folder, k))}
        for fname in (FRAME_FILE, WINDOW_FILE, PARQUET_FILE):
            if fname not in written and fname not in job["todo"]:
                # From another model or input version: never leave it beside the new marker.
                storage.delete(storage.join(folder, fname))
        for fname in job["todo"]:
            if fname == FRAME_FILE:
                writer, shape = _npy_writer(feats), list(feats.shape)
            elif fname == WINDOW_FILE:
                win = frame_windows(feats)
                writer, shape = _npy_writer(win), list(win.shape)
            else:
                writer, shape = _parquet_writer(name, feats), list(feats.shape)
            w = storage.write_atomic_with(storage.join(folder, fname), writer)
            written[fname] = {"bytes": w.size, "sha256": w.sha256, "shape": shape}
        record = {
            "version": MARKER_VERSION,
            "model_uri": job["model"]["uri"],
            "model": job["model"],
            "model_identity": job["identity"],
            "settings": job["settings"],
            "input": {"path": path, "sha256": digest, "bytes": st.size,
                      "mtime_ns": st.mtime_ns},
            "frames": int(feats.shape[0]),
            "dim": int(feats.shape[1]),
            "audio_seconds": seconds,
            "outputs": written,
        }
        storage.write_atomic(storage.join(folder, SUCCESS_FILE), json.dumps(record, indent=1))
        out.update(frames=int(feats.shape[0]), dim=int(feats.shape[1]), audio_seconds=seconds)
    except Exception as e:  # one bad input must not stop the others
        msg = (str(e) or type(e).__name__).replace(local, path)
        out.update(status="failed", error=msg if path in msg else f"{path}: {msg}",
                   traceback=traceback.format_exc().replace(local, path))
    out["seconds"] = time.perf_counter() - t0
    return out


class EncoderActor:
    """Ray Data actor: loads the encoder once, then extracts one input per batch row."""

    def __init__(self, model_uri: str, tracking_uri: str, use_gpu: bool,
                 precision: str = "fp32") -> None:


        # One thread: deterministic reductions, and actors, not threads, are the parallelism.
        torch.set_num_threads(1)
        self.encoder, self.cfg = load_encoder(model_uri, tracking_uri)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if precision == "int8":
            self.encoder = quantize_int8(self.encoder)  # CPU only (checked by run_extract)
        self.encoder.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [process_input(self.encoder, self.cfg, json.loads(str(j)))
                for j in batch["job"]]
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def check_int8(encoder: Any, cfg: Any, model_uri: str) -> float:
    """Cosine between float32 and int8 embeddings of a fixed probe signal, or ExtractError.

    The probe is 64 windows of a seeded mix of tones and noise at speech-like levels, cut as
    ``extract`` cuts them; the encoder passes when every window stays above
    :data:`INT8_MIN_COSINE`.
    """
    spf = cfg.data.samples_per_frame
    n = cfg.train.window_frames * spf
    rng = np.random.default_rng(0)
    t = np.arange(64 * n) / cfg.data.sample_rate
    sig = 0.1 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    sig = sig + 0.03 * rng.standard_normal(len(t))
    wav = torch.from_numpy(sig.astype(np.float32).reshape(64, n))
    cos = int8_fidelity(encoder, quantize_int8(encoder), wav)
    if cos < INT8_MIN_COSINE:
        raise ExtractError(f"{model_uri}: int8 embeddings drift from float32 (min cosine "
                           f"{cos:.4f} < {INT8_MIN_COSINE}); use --precision fp32")
    return cos


# ---------------------------------------------------------------- the run


def _check_arguments(fps: int, batch_size: int, concurrency: int, min_concurrency: int,
                     precision: str, use_gpu: bool) -> None:
    """``ExtractError`` for arguments no job could run with."""
    if fps <= 0 or batch_size < 1 or concurrency < 1 or min_concurrency < 1:
        raise ExtractError("fps, batch_size and concurrency must be positive")
    if precision not in PRECISIONS:
        raise ExtractError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and use_gpu:
        raise ExtractError("--precision int8 runs on CPU (dynamic quantization); drop --use-gpu")


def _output_settings(cfg: Config, fps: int, precision: str, audio_offset: int
                     ) -> dict[str, Any]:
    """What, besides the model, decides an input's outputs (recorded in their markers)."""
    settings: dict[str, Any] = {"fps": fps, "sample_rate": cfg.data.sample_rate,
                                "window_frames": cfg.train.window_frames, "window": WINDOW}
    if precision != "fp32":  # fp32 markers from before --precision existed stay valid
        settings["precision"] = precision
    if audio_offset:
        settings["audio_offset"] = int(audio_offset)
    if cfg.train.window_frames % 2 == 0:
        # Even windows used to sit half a frame early; outputs written that way are redone.
        settings["centring"] = "window c - (T - 1) // 2"
    return settings


def _count(row: dict[str, Any], summary: ExtractSummary, failures: list[Failure]) -> None:
    """Add one input's result row to the run's counts."""
    if row["status"] == "skipped":
        summary.skipped += 1
    elif row["status"] == "failed":
        failures.append(Failure(row["path"], row["error"], "extract",
                                row.get("traceback") or None))
    else:
        summary.extracted += 1
        summary.frames += int(row["frames"])
        summary.audio_seconds += float(row["audio_seconds"])
    summary.compute_seconds += float(row["seconds"])


def run_extract(
    inputs: list[str],
    model_uri: str,
    out_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    fps: int = 25,
    fmt: str = "both",
    parquet: bool = False,
    batch_size: int = 256,
    concurrency: int = 1,
    min_concurrency: int = 1,
    use_gpu: bool = False,
    precision: str = "fp32",
    audio_offset: int = 0,
    address: str | None = None,
    experiment: str = "se4lip-extract",
    placement_timeout_s: float = DEFAULT_TIMEOUT_S,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> ExtractSummary:
    """Extract per-frame speech features for audio/video inputs with a registered encoder.

    Args:
        inputs: audio or video files, folders (searched recursively) or CSV/JSONL manifests,
            local or URLs (``s3://bucket/prefix``).
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a folder.
        out_dir: output root, local or a URL; each input gets ``out_dir/<name>/``.
        tracking_uri: MLflow tracking URI; None: ``MLFLOW_TRACKING_URI`` or the local store.
        fps: video frame rate of the output rows.
        fmt: ``frame`` ([N, D]), ``window`` ([N, 16, D]) or ``both``.
        parquet: also write ``aud_se4lip.parquet`` (``clip, frame, feature``).
        batch_size: windows per encoder forward pass.
        concurrency: most encoder actors at once (each takes 0.5 CPU, and 1 GPU with
            ``use_gpu``); the pool grows to it while inputs wait and the cluster has room.
        min_concurrency: encoder actors the cluster must hold before the job starts.
        use_gpu: run the encoder on a GPU per actor.
        precision: ``fp32``, or ``int8`` (CPU only): GRU and linear weights quantized
            dynamically, faster for the paper's GRU (see ``benchmarks/``); refused when the
            embeddings of a probe signal drift below cosine :data:`INT8_MIN_COSINE` from
            float32.
        audio_offset: the inputs' measured AV offset in frames (``audit``): the audio is
            advanced by it before embedding (see :func:`extract_features`).
        address: Ray cluster address; None starts a local Ray (stopped again at the end).
        experiment: MLflow experiment of the run that records this job.
        placement_timeout_s: how long the first ``min_concurrency`` encoder actors may wait
            for the cluster to hold them; a request no node can ever hold (``use_gpu`` without
            GPUs or an autoscaler that adds them) fails at once.
        on_start: called with the number of inputs.
        on_result: called with each input's result row (``status`` ``done``, ``skipped``: its
            outputs were complete, or ``failed``).

    Returns:
        The summary; ``exit_code`` is 1 when any input failed.

    Raises:
        ExtractError: bad arguments, a model that cannot be resolved or loaded, an unreachable
            output location, a cluster that cannot hold the actors, or a Ray failure.
    """
    t0 = time.perf_counter()
    wanted = wanted_outputs(fmt, parquet)
    _check_arguments(fps, batch_size, concurrency, min_concurrency, precision, use_gpu)
    out = storage.absolute(str(out_dir))
    try:
        storage.check_bucket(out)
    except storage.StorageError as e:
        raise ExtractError(str(e)) from e
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    model = resolve_model(model_uri, uri)
    try:
        # Loading once here fails fast on a bad model, before any actor starts.
        encoder, cfg = load_encoder(model["pinned_uri"], uri)
    except RegistryError as e:
        raise ExtractError(str(e)) from e
    if precision == "int8":
        check_int8(encoder, cfg, model_uri)
    if cfg.data.sample_rate % fps:
        raise ExtractError(f"fps {fps} does not divide the model's sample rate "
                           f"{cfg.data.sample_rate}")
    identity = _model_identity(model)
    settings = _output_settings(cfg, fps, precision, audio_offset)
    paths, failures = expand_inputs(inputs)
    summary = ExtractSummary(out_dir=out, model_uri=model_uri, model=model,
                             inputs=len(paths) + len(failures), dim=cfg.model.embed_dim,
                             outputs=wanted)
    names = output_names(paths)
    # Which outputs each input still needs is found out in the pipeline (plan_job), in parallel.
    jobs = [{"path": p, "name": names[p], "out_dir": out, "wanted": wanted,
             "identity": identity, "settings": settings, "model": model,
             "batch_size": batch_size} for p in paths]
    try:
        if on_start:
            on_start(len(jobs))
        pool = ActorJobPool(
            EncoderActor, {"model_uri": model["pinned_uri"], "tracking_uri": uri,
                           "use_gpu": use_gpu, "precision": precision},
            min(min_concurrency, concurrency), min(concurrency, max(1, len(jobs))), use_gpu,
            address, placement_timeout_s, plan=_plan_batch)
        with pool if jobs else nullcontext():
            # Only now, with the actors placeable: a bad model, server or cluster leaves nothing.
            storage.makedirs(out)
            run_id = _start_run(uri, experiment, model, summary, fps, fmt, parquet, batch_size,
                                concurrency, use_gpu, cfg, precision)
            summary.run_id = run_id
            status = "FAILED"
            try:
                for row in pool.run(jobs):
                    _count(row, summary, failures)
                    if on_result:
                        on_result(row)
                status = "FINISHED"
            finally:
                summary.failures = failures
                summary.wall_seconds = time.perf_counter() - t0
                _end_run(uri, run_id, summary, status)
    except storage.StorageError as e:  # the output location cannot be read or written
        raise ExtractError(str(e)) from e
    return summary


class ActorJobPool:
    """A Ray Data job over JSON job rows: optional planning tasks, then an autoscaling pool of
    ``min_size`` to ``max_size`` actors of ``actor``, with bounded waits.

    ``extract`` runs :class:`EncoderActor` in it, ``audit`` its own actor: ``actor(**kwargs)``
    is built once per actor (a model load), then called with ``{"job": [json, ...]}`` batches
    of one job and returns one result row per job.

    Entering it joins or starts Ray and checks, before anything is written, that the cluster
    can hold the first ``min_size`` actors (:func:`se4lip_dist.placement.wait_placeable`); Ray
    Data's own wait for them to start and load the model (``DataContext.wait_for_min_actors_s``,
    unbounded by default) is then bounded by ``timeout_s`` as well. More actors are added while
    jobs wait and the cluster (or its autoscaler) has room.
    """

    def __init__(self, actor: type, actor_kwargs: dict[str, Any], min_size: int, max_size: int,
                 use_gpu: bool, address: str | None, timeout_s: float, *,
                 plan: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                 label: str = "encoder actor", error: type[Exception] = ExtractError,
                 job_name: str = "extraction job") -> None:
        self.actor, self.actor_kwargs, self.plan = actor, actor_kwargs, plan
        self.max_size = max(1, max_size)
        self.min_size = max(1, min(min_size, self.max_size))
        self.use_gpu = use_gpu
        self.address, self.timeout_s = address, timeout_s
        self.error, self.job_name = error, job_name
        self.request = {"CPU": ACTOR_CPUS, **({"GPU": 1.0} if use_gpu else {})}
        self.what = f"{self.min_size} {label}{'s' if self.min_size > 1 else ''}"
        self._started = False

    def __enter__(self) -> ActorJobPool:
        """Join or start Ray, then wait until the cluster can hold the first actors (or raise)."""
        self._started = not ray.is_initialized()
        init_ray(self.address)
        try:
            wait_placeable(self.request, self.min_size, self.what, self.timeout_s)
        except PlacementError as e:
            self.__exit__()
            raise self.error(str(e)) from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:  # a local Ray started for this run stops with it
            ray.shutdown()
            self._started = False

    def run(self, jobs: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        """The actors' result rows, one per job, in completion order."""
        if not jobs:
            return

        ctx = ray.data.DataContext.get_current()
        wait_before = ctx.wait_for_min_actors_s
        ctx.wait_for_min_actors_s = max(1, math.ceil(self.timeout_s))
        # Blocks are the unit an actor takes: a few per actor spread the work; many small ones
        # for a large job keep a lost actor's share small.
        blocks = min(len(jobs), max(4 * self.max_size, len(jobs) // JOBS_PER_BLOCK))
        try:
            ds = ray.data.from_items([{"job": json.dumps(j)} for j in jobs],
                                     override_num_blocks=blocks)
            if self.plan is not None:
                # Planning reads are I/O: light tasks, in parallel, ahead of the actors.
                ds = ds.map_batches(self.plan, batch_size=None, batch_format="numpy",
                                    num_cpus=PLAN_CPUS)
            ds = ds.map_batches(
                self.actor,
                fn_constructor_kwargs=self.actor_kwargs,
                compute=ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size),
                batch_size=1,
                batch_format="numpy",
                num_cpus=self.request["CPU"],
                num_gpus=self.request.get("GPU", 0),
            )
            for row in ds.iter_rows():
                yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        except ray.exceptions.GetTimeoutError as e:
            raise self.error(f"{self.what} ({describe(self.request)} each) did not start "
                             f"within {self.timeout_s:g} s: {e}") from e
        except ray.exceptions.RayError as e:
            raise self.error(f"{self.job_name} failed: {e}") from e
        finally:
            ctx.wait_for_min_actors_s = wait_before


def _start_run(uri: str, experiment: str, model: dict[str, Any], summary: ExtractSummary,
               fps: int, fmt: str, parquet: bool, batch_size: int, concurrency: int,
               use_gpu: bool, cfg: Any, precision: str) -> str:
    params = {
        "model_uri": model["uri"], "model.pinned_uri": model["pinned_uri"],
        "model.name": model.get("name"), "model.version": model.get("version"),
        "model.run_id": model.get("run_id"), "out_dir": summary.out_dir,
        "inputs": summary.inputs, "fps": fps, "format": fmt, "parquet": parquet,
        "batch_size": batch_size, "concurrency": concurrency, "use_gpu": use_gpu,
        "precision": precision, "window_frames": cfg.train.window_frames,
        "embed_dim": cfg.model.embed_dim,
    }
    tags = {"se4lip.model_uri": model["uri"], "se4lip.kind": "extract"}
    if model.get("version") is not None:
        tags["se4lip.model_version"] = str(model["version"])
    rev = git_revision()
    if rev:
        tags["mlflow.source.git.commit"] = rev
    return start_run(uri, experiment, run_name(model, summary.out_dir), params=params, tags=tags,
                     config_yaml=cfg.to_yaml())


def run_name(model: dict[str, Any], out_dir: str) -> str:
    """What an extract run is, as its MLflow run name: ``extract se4lip v3 -> features``."""
    label = (f"{model['name']} v{model['version']}"
             if model.get("name") and model.get("version") is not None else model["uri"])
    return f"extract {label} -> {str(out_dir).rstrip('/').rsplit('/', 1)[-1]}"


def _end_run(uri: str, run_id: str, summary: ExtractSummary, status: str) -> None:
    logger = RunLogger(uri, run_id)
    logger.metrics({
        "inputs": summary.inputs, "extracted": summary.extracted,
        "skipped": summary.skipped, "failed": len(summary.failures),
        "frames": summary.frames, "audio_seconds": summary.audio_seconds,
        "wall_seconds": summary.wall_seconds, "compute_seconds": summary.compute_seconds,
        "real_time_factor": summary.real_time_factor,
        "frames_per_s": summary.frames / summary.wall_seconds if summary.wall_seconds else 0.0,
    }, step=0)
    logger.text(json.dumps(summary.to_json(), indent=1), "extract_summary.json")
    end_run(uri, run_id, status=status)


__all__ = [
    "ACTOR_CPUS",
    "AUDIO_EXTS",
    "FRAME_FILE",
    "PARQUET_FILE",
    "SUCCESS_FILE",
    "WINDOW",
    "WINDOW_FILE",
    "ActorJobPool",
    "EncoderActor",
    "ExtractError",
    "ExtractSummary",
    "expand_inputs",
    "extract_features",
    "frame_windows",
    "output_names",
    "plan_input",
    "plan_job",
    "process_input",
    "resolve_model",
    "run_extract",
]
