"""``evaluate``: audio-visual offset, LSE-D and LSE-C of videos with an SE4Lip model.

The protocol follows syncnet_python's ``evaluate`` (±15 frame search, mean distance per shift,
LSE-D = the minimum, LSE-C = median minus minimum) with our encoders in place of SyncNet:

- lip crops come from ``prepare``'s :func:`~se4lip_dist.prepare.process_clip` (face detection
  per the config), audio is 16 kHz mono on the video clock;
- window ``i`` is lip frames ``i .. i + T - 1`` with the audio of the same frames
  (``T = train.window_frames``), exactly like a training pair;
- :func:`~se4lip_dist.losses.offset_distances` gives the mean distance between L2-normalised
  embeddings at each audio shift ``s`` (lip window ``t`` against audio window ``t + s``), and
  :func:`~se4lip_dist.losses.predict_offset` the argmin.

Sign: a positive offset means the audio lags the video (the sound of a mouth movement comes
``offset`` frames later). ``shift=K`` delays the audio by K frames before scoring, so an in-sync
clip should give offset K. syncnet_python prints the opposite sign.

The distances are L2 distances of normalised embeddings (range [0, sqrt(2)]): they are on this
encoder's scale and cannot be compared with SyncNet's LSE-D/LSE-C numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from se4lip_dist.config import Config

SCALE_NOTE = "distances are on this encoder's scale (L2 of normalised embeddings), not SyncNet's"
EMBED_BATCH = 64


class EvaluateError(RuntimeError):
    """A clip that cannot be evaluated, or a model that cannot be loaded."""


def shift_audio(audio: np.ndarray, frames: int, spf: int) -> np.ndarray:
    """Delay the audio by ``frames`` video frames (negative: advance), keeping its length.

    ``out[s] = audio[s - frames * spf]``; samples shifted in from outside are zeros.
    """
    k = frames * spf
    out = np.zeros_like(audio)
    if k >= 0:
        out[k:] = audio[: max(0, len(audio) - k)]
    else:
        out[: len(audio) + k] = audio[-k:]
    return out


def sync_distances(model: Any, cfg: Config, lips: np.ndarray, audio: np.ndarray,
                   max_offset: int) -> np.ndarray:
    """Mean embedding distance per audio shift for aligned lip crops and audio.

    Args:
        model: an :class:`~se4lip_dist.models.SE4Lip` (``.speech``, ``.lips``) in eval mode.
        cfg: its config.
        lips: uint8 ``[N, h, w, 3]`` mouth crops, one per video frame.
        audio: float32 ``[N * spf]`` audio on the same clock.
        max_offset: largest shift in frames.

    Returns:
        float32 ``[2 * max_offset + 1]``; index ``i`` is shift ``i - max_offset``.

    Raises:
        EvaluateError: fewer windows than the offset search needs.
    """
    import torch

    from se4lip_dist.losses import offset_distances
    from se4lip_dist.models import lip_input
    from se4lip_dist.stream import sliding_windows

    t, spf = cfg.train.window_frames, cfg.data.samples_per_frame
    lip_win = sliding_windows(lips, t)
    wav_win = sliding_windows(audio, t * spf, spf)
    w = min(len(lip_win), len(wav_win))
    if w <= max_offset:
        raise EvaluateError(f"{w} windows of {t} frames: too short for a ±{max_offset} frame "
                            "search (lower --max-offset)")
    device = next(model.parameters()).device
    a_seq, v_seq = [], []
    with torch.no_grad():
        for i in range(0, w, EMBED_BATCH):
            wl = torch.from_numpy(np.ascontiguousarray(lip_win[i:min(w, i + EMBED_BATCH)]))
            ww = torch.from_numpy(np.ascontiguousarray(wav_win[i:min(w, i + EMBED_BATCH)]))
            v_seq.append(model.lips(lip_input(wl.to(device), cfg.model)).float().cpu())
            a_seq.append(model.speech(ww.to(device)).float().cpu())
        dists = offset_distances(torch.cat(a_seq), torch.cat(v_seq), max_offset)
    return dists.numpy().astype(np.float32)


def evaluate_clip(model: Any, cfg: Config, video: str | Path, *, max_offset: int = 15,
                  shift: int = 0, detector: Any = None) -> dict[str, Any]:
    """AV offset, LSE-D and LSE-C of one video.

    Args:
        model: an :class:`~se4lip_dist.models.SE4Lip` (eval mode is set here).
        cfg: its config; ``face`` picks the detector when ``detector`` is None.
        video: video file with audio.
        max_offset: search ±this many frames.
        shift: delay the audio by this many frames first (the expected offset becomes K).
        detector: a face detector (see :func:`se4lip_dist.faces.build_detector`).

    Returns:
        ``name``, ``path``, ``offset``, ``lse_d``, ``lse_c``, ``frames``, ``shift``,
        ``distances`` (per shift, ``-max_offset..max_offset``).

    Raises:
        EvaluateError: the video cannot be decoded, has no usable face, or is too short.
    """
    import torch

    from se4lip_dist.faces import build_detector
    from se4lip_dist.losses import predict_offset
    from se4lip_dist.prepare import PrepareInput, process_clip
    from se4lip_dist.shards import decode_lips

    path = str(video)
    if detector is None:
        detector = build_detector(cfg.face)
    res = process_clip(PrepareInput(path), Path(path).stem, cfg, detector)
    if res.failure is not None:
        raise EvaluateError(res.failure.error)
    lips = np.concatenate([decode_lips(s.lips_jpeg) for s in res.segments])
    audio = np.concatenate([np.asarray(s.audio, np.float32) for s in res.segments])
    spf = cfg.data.samples_per_frame
    if shift:
        audio = shift_audio(audio, shift, spf)
    model.eval()
    try:
        dists = sync_distances(model, cfg, lips, audio, max_offset)
    except EvaluateError as e:
        raise EvaluateError(f"{path}: {e}") from e
    offset, lse_d, lse_c = predict_offset(torch.from_numpy(dists))
    return {"name": Path(path).stem, "path": path, "offset": offset, "lse_d": lse_d,
            "lse_c": lse_c, "frames": len(lips), "shift": shift,
            "distances": [float(d) for d in dists]}


def load_sync_model(model_uri: str, tracking_uri: str | None = None) -> tuple[Any, Config]:
    """The whole SE4Lip model (speech and lip encoders) behind ``model_uri``, in eval mode.

    Raises:
        EvaluateError: the registry cannot give a whole model for this URI.
    """
    from se4lip_dist import registry

    loader = getattr(registry, "load_sync_model", None)
    if loader is None:
        raise EvaluateError("this se4lip_dist.registry cannot load whole sync models yet "
                            "(registry.load_sync_model is missing)")
    try:
        model, cfg = loader(model_uri, tracking_uri)
    except registry.RegistryError as e:
        raise EvaluateError(str(e)) from e
    return model.eval(), cfg


def evaluate_videos(model: Any, cfg: Config, videos: list[str], *, max_offset: int = 15,
                    shift: int = 0, plot_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate several videos with an already-loaded model (see :func:`run_evaluate`)."""
    from se4lip_dist.extract import output_names
    from se4lip_dist.faces import FaceModelError, build_detector
    from se4lip_dist.prepare import collect_inputs

    try:
        detector = build_detector(cfg.face)
    except FaceModelError as e:
        raise EvaluateError(str(e)) from e
    inputs, bad = collect_inputs(videos)
    paths = [i.path for i in inputs]
    names = output_names(paths)
    clips: list[dict[str, Any]] = [
        {"name": f.input, "offset": None, "lse_d": None, "lse_c": None, "frames": 0,
         "error": f.error if f.input in f.error else f"{f.input}: {f.error}"} for f in bad
    ]
    plots = Path(plot_dir) if plot_dir else None
    if plots:
        plots.mkdir(parents=True, exist_ok=True)
    for p in paths:
        try:
            r = evaluate_clip(model, cfg, p, max_offset=max_offset, shift=shift,
                              detector=detector)
            r["name"] = names[p]
            if plots:
                r["plot"] = str(plot_curve(r, plots / f"{names[p]}.png"))
        except Exception as e:  # a bad clip is reported; the others are still evaluated
            msg = str(e) or type(e).__name__
            r = {"name": names[p], "path": p, "offset": None, "lse_d": None, "lse_c": None,
                 "frames": 0, "error": msg if p in msg else f"{p}: {msg}"}
        clips.append(r)
    ok = [c for c in clips if "error" not in c]
    hits = [abs(c["offset"] - shift) <= 1 for c in ok]
    return {
        "offset_accuracy": float(np.mean(hits)) if hits else 0.0,
        "shift": shift,
        "max_offset": max_offset,
        "evaluated": len(ok),
        "failed": len(clips) - len(ok),
        "mean_lse_d": float(np.mean([c["lse_d"] for c in ok])) if ok else None,
        "mean_lse_c": float(np.mean([c["lse_c"] for c in ok])) if ok else None,
        "clips": clips,
        "note": SCALE_NOTE,
    }


def run_evaluate(
    videos: list[str],
    model_uri: str,
    *,
    tracking_uri: str | None = None,
    max_offset: int = 15,
    shift: int = 0,
    plot_dir: str | Path | None = None,
    insightface_root: str | Path | None = None,
    face_backend: str | None = None,
) -> dict[str, Any]:
    """AV offset, LSE-D and LSE-C of each video, and the offset accuracy over all of them.

    Args:
        videos: video files, folders or CSV/JSONL manifests.
        model_uri: a logged or registered SE4Lip model (``models:/NAME@ALIAS``, ...).
        tracking_uri: MLflow tracking URI that resolves ``models:/`` URIs.
        max_offset: search ±this many frames (syncnet_python: 15).
        shift: delay the audio by K frames first; offset accuracy counts ``|offset - K| <= 1``.
        plot_dir: write a distance-vs-offset PNG per clip here.
        insightface_root: InsightFace model root (overrides the model's config).
        face_backend: ``insightface`` or ``none`` (fixed mouth box for face-centred video).

    Returns:
        ``{"offset_accuracy", "clips": [{"name", "offset", "lse_d", "lse_c", "frames",
        "error"?, ...}], "note", "evaluated", "failed", "mean_lse_d", "mean_lse_c", "model_uri"}``.

    Raises:
        EvaluateError: the model or the face detector cannot be loaded.
    """
    model, cfg = load_sync_model(model_uri, tracking_uri)
    overrides: dict[str, Any] = {}
    if face_backend is not None:
        overrides["face.backend"] = face_backend
    if insightface_root is not None:
        overrides["face.insightface_root"] = str(Path(insightface_root).resolve())
    if overrides:
        cfg = cfg.override(overrides)
    result = evaluate_videos(model, cfg, list(videos), max_offset=max_offset, shift=shift,
                             plot_dir=plot_dir)
    result["model_uri"] = model_uri
    return result


def plot_curve(result: dict[str, Any], path: Path) -> Path:
    """Distance-vs-offset PNG of one clip (matplotlib Agg)."""
    from se4lip_dist.plots import offset_curve_figure, save_figure

    fig = offset_curve_figure(
        result["distances"],
        f"{result['name']}: LSE-D {result['lse_d']:.3f}, LSE-C {result['lse_c']:.3f}",
        predicted=result["offset"], expected=result["shift"])
    return save_figure(fig, path)


__all__ = [
    "SCALE_NOTE",
    "EvaluateError",
    "evaluate_clip",
    "evaluate_videos",
    "load_sync_model",
    "plot_curve",
    "run_evaluate",
    "shift_audio",
    "sync_distances",
]
