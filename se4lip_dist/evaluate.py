"""``evaluate``: audio-visual offset, LSE-D and LSE-C of videos with an SE4Lip model.

The protocol follows syncnet_python's ``evaluate`` (±15 frame search, mean distance per shift,
LSE-D = the minimum, LSE-C = median minus minimum) with our encoders in place of SyncNet. Lip
crops come from ``prepare``'s :func:`~se4lip_dist.prepare.process_clip` (face detection per the
config); windows, shifts, signs and distances are :mod:`se4lip_dist.sync`'s, the same as in
training validation and the registry gate. ``shift=K`` delays the audio by K frames before
scoring, so an in-sync clip should give offset K.

Several shifts (``shift=(-3, 0, 3)``) follow the validation protocol: each clip is searched at
every shift in one :func:`~se4lip_dist.sync.clip_sync` call and is *shift-consistent* when every
shift is recovered (:attr:`~se4lip_dist.sync.ClipSync.consistent`). The headline ``shift_acc``
is the share of consistent clips, its Wilson interval counts clips (never (clip, shift) trials),
and ``constant_floor`` says what a content-blind constant answer would score.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from se4lip_dist import registry
from se4lip_dist.config import Config
from se4lip_dist.extract import output_names
from se4lip_dist.faces import INSIGHTFACE_ROOT_ENV, FaceModelError, build_detector
from se4lip_dist.plots import offset_curve_figure, save_figure
from se4lip_dist.prepare import PrepareInput, collect_inputs, input_problem, process_clip
from se4lip_dist.shards import decode_lips
from se4lip_dist.sync import clip_sync, constant_floor, wilson_interval

SCALE_NOTE = "distances are on this encoder's scale (L2 of normalised embeddings), not SyncNet's"


class EvaluateError(RuntimeError):
    """A clip that cannot be evaluated, or a model that cannot be loaded."""

    def __init__(self, message: str, cause_traceback: str | None = None) -> None:
        super().__init__(message)
        self.cause_traceback = cause_traceback
        """Traceback of the error behind this one when it was raised elsewhere (a clip's
        processing), so ``--debug`` shows where it came from."""


def shift_list(shift: int | Sequence[int]) -> list[int]:
    """The shifts to search: one ``int`` or several (duplicates dropped, order kept).

    Raises:
        ValueError: an empty sequence.
    """
    if isinstance(shift, int | np.integer):
        return [int(shift)]
    shifts = list(dict.fromkeys(int(s) for s in shift))
    if not shifts:
        raise ValueError("give at least one shift")
    return shifts


def reference_shift(shifts: Sequence[int]) -> int:
    """The shift whose curve a clip reports as its ``offset``, LSE-D/C and plot: 0 (the clip
    as recorded) when searched, else the first."""
    return 0 if 0 in shifts else shifts[0]


def evaluate_clip(model: Any, cfg: Config, video: str | Path, *, max_offset: int = 15,
                  shift: int | Sequence[int] = 0, detector: Any = None) -> dict[str, Any]:
    """AV offset, LSE-D and LSE-C of one video, at one or several audio shifts.

    Args:
        model: an :class:`~se4lip_dist.models.SE4Lip` (eval mode is set here).
        cfg: its config; ``face`` picks the detector when ``detector`` is None.
        video: video file with audio.
        max_offset: search ±this many frames.
        shift: delay the audio by this many frames first (the expected offset becomes K); a
            sequence searches every shift in one pass (lips and audio embedded once).
        detector: a face detector (see :func:`se4lip_dist.faces.build_detector`).

    Returns:
        ``name``, ``path``, ``frames``; ``shift`` (:func:`reference_shift`), and at it
        ``offset``, ``lse_d``, ``lse_c``, ``distances`` (per searched offset,
        ``-max_offset..max_offset``); ``shifts``, ``offsets`` and ``correct`` (one per shift)
        and ``shift_consistent`` (every shift recovered).

    Raises:
        EvaluateError: the video cannot be decoded, has no usable face, or is too short.
    """
    path = str(video)
    shifts = shift_list(shift)
    if detector is None:
        detector = build_detector(cfg.face)
    res = process_clip(PrepareInput(path), Path(path).stem, cfg, detector)
    if res.failure is not None:
        raise EvaluateError(res.failure.error, res.failure.traceback)
    lips = np.concatenate([decode_lips(s.lips_jpeg) for s in res.segments])
    audio = np.concatenate([np.asarray(s.audio, np.float32) for s in res.segments])
    model.eval()
    try:
        res = clip_sync(model, cfg, lips, audio, shifts=shifts, max_offset=max_offset,
                        clip_id=Path(path).stem, keep_distances=True)
    except ValueError as e:
        raise EvaluateError(f"{path}: {e} (lower --max-offset)") from e
    ref = reference_shift(shifts)
    j = shifts.index(ref)
    return {"name": Path(path).stem, "path": path, "offset": res.offsets[j],
            "lse_d": res.lse_d[j], "lse_c": res.lse_c[j], "frames": len(lips), "shift": ref,
            "distances": res.distances[ref], "shifts": shifts, "offsets": res.offsets,
            "correct": res.hits, "shift_consistent": res.consistent}


def load_sync_model(model_uri: str, tracking_uri: str | None = None) -> tuple[Any, Config]:
    """The whole SE4Lip model (speech and lip encoders) behind ``model_uri``, in eval mode.

    Raises:
        EvaluateError: the registry cannot give a whole model for this URI.
    """
    loader = getattr(registry, "load_sync_model", None)
    if loader is None:
        raise EvaluateError("this se4lip_dist.registry cannot load whole sync models yet "
                            "(registry.load_sync_model is missing)")
    try:
        model, cfg = loader(model_uri, tracking_uri)
    except registry.RegistryError as e:
        raise EvaluateError(str(e)) from e
    return model.eval(), cfg


def local_face_overrides(face_backend: str | None,
                         insightface_root: str | Path | None) -> dict[str, Any]:
    """Config overrides for this machine's face detection: ``face_backend`` if given, and the
    detector root from ``insightface_root`` or ``$SE4LIP_INSIGHTFACE_ROOT`` (a model's config
    names the root of the machine it was trained on)."""
    overrides: dict[str, Any] = {}
    if face_backend is not None:
        overrides["face.backend"] = face_backend
    root = insightface_root or os.environ.get(INSIGHTFACE_ROOT_ENV) or None
    if root is not None:
        overrides["face.insightface_root"] = str(Path(root).expanduser().resolve())
    return overrides


def evaluate_videos(model: Any, cfg: Config, videos: list[str], *, max_offset: int = 15,
                    shift: int | Sequence[int] = 0,
                    plot_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate several videos with an already-loaded model (see :func:`run_evaluate`)."""
    shifts = shift_list(shift)
    inputs, bad = collect_inputs(videos)
    detector = None
    if inputs:
        try:
            detector = build_detector(cfg.face)
        except FaceModelError as e:
            # Only the detector stands in the way unless no input is a usable video anyway.
            unusable = [f for i in inputs if (f := input_problem(i)) is not None]
            if len(unusable) < len(inputs):
                raise EvaluateError(str(e)) from e
            bad, inputs = bad + unusable, []
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
            r = evaluate_clip(model, cfg, p, max_offset=max_offset, shift=shifts,
                              detector=detector)
            r["name"] = names[p]
            if plots:
                r["plot"] = str(plot_curve(r, plots / f"{names[p]}.png"))
        except Exception as e:  # a bad clip is reported; the others are still evaluated
            msg = str(e) or type(e).__name__
            r = {"name": names[p], "path": p, "offset": None, "lse_d": None, "lse_c": None,
                 "frames": 0, "error": msg if p in msg else f"{p}: {msg}",
                 "traceback": getattr(e, "cause_traceback", None) or traceback.format_exc()}
        clips.append(r)
    ok = [c for c in clips if "error" not in c]
    return {**shift_scores(ok, shifts, max_offset),
            "failed": len(clips) - len(ok),
            "mean_lse_d": float(np.mean([c["lse_d"] for c in ok])) if ok else None,
            "mean_lse_c": float(np.mean([c["lse_c"] for c in ok])) if ok else None,
            "clips": clips,
            "note": SCALE_NOTE}


def shift_scores(clips: list[dict[str, Any]], shifts: list[int],
                 max_offset: int) -> dict[str, Any]:
    """Offset scores of evaluated clips (:func:`evaluate_clip` results), every interval over
    clips.

    Returns:
        ``shift_acc`` (share of shift-consistent clips, the headline) with its Wilson 95 %
        interval (``shift_acc_ci_low``/``_high``), ``consistent``, ``evaluated`` (clips),
        ``per_shift`` (``shift``, ``hits``, ``accuracy`` and its interval, per shift),
        ``constant_floor`` (:func:`~se4lip_dist.sync.constant_floor`), and the (clip, shift)
        trial view: ``hits``, ``trials``, ``offset_accuracy``; ``shift`` is the shift when
        there is one, else None. With one shift ``offset_accuracy`` equals ``shift_acc``.
        Scores are None, not 0.0, when no clip was scored ("no result" is not "all wrong").
    """
    n = len(clips)

    def share(k: int) -> float | None:
        return k / n if n else None

    def interval(k: int) -> tuple[float | None, float | None]:
        return wilson_interval(k, n) if n else (None, None)

    consistent = sum(bool(c["shift_consistent"]) for c in clips)
    lo, hi = interval(consistent)
    per_shift = []
    for j, s in enumerate(shifts):
        k = sum(bool(c["correct"][j]) for c in clips)
        slo, shi = interval(k)
        per_shift.append({"shift": s, "hits": k, "accuracy": share(k), "ci_low": slo,
                          "ci_high": shi})
    hits = sum(p["hits"] for p in per_shift)
    trials = n * len(shifts)
    return {
        "shift_acc": share(consistent),
        "shift_acc_ci_low": lo,
        "shift_acc_ci_high": hi,
        "consistent": consistent,
        "evaluated": n,
        "per_shift": per_shift,
        "constant_floor": constant_floor(shifts, max_offset),
        "offset_accuracy": hits / trials if trials else None,
        "hits": hits,
        "trials": trials,
        "shift": shifts[0] if len(shifts) == 1 else None,
        "shifts": shifts,
        "max_offset": max_offset,
    }


def run_evaluate(
    videos: list[str],
    model_uri: str,
    *,
    tracking_uri: str | None = None,
    max_offset: int = 15,
    shift: int | Sequence[int] = 0,
    plot_dir: str | Path | None = None,
    insightface_root: str | Path | None = None,
    face_backend: str | None = None,
) -> dict[str, Any]:
    """AV offset, LSE-D and LSE-C of each video, and the offset accuracy over all of them.

    With several shifts every clip is searched at each (one pass per clip) and the headline is
    ``shift_acc``, the share of clips whose offset is recovered at every shift.

    Args:
        videos: video files, folders or CSV/JSONL manifests.
        model_uri: a logged or registered SE4Lip model (``models:/NAME@ALIAS``, ...).
        tracking_uri: MLflow tracking URI that resolves ``models:/`` URIs.
        max_offset: search ±this many frames (syncnet_python: 15).
        shift: delay the audio by K frames first; offset accuracy counts ``|offset - K| <= 1``.
            Several shifts (e.g. ``(-3, 0, 3)``): each clip at each of them.
        plot_dir: write a distance-vs-offset PNG per clip here.
        insightface_root: InsightFace model root; None: ``SE4LIP_INSIGHTFACE_ROOT`` when set,
            else the model's config.
        face_backend: ``insightface`` or ``none`` (fixed mouth box for face-centred video).

    Returns:
        :func:`shift_scores` (``shift_acc``, its interval, ``per_shift``, ``constant_floor``,
        ``offset_accuracy``, ``hits``, ``evaluated``, ...) and ``clips`` (:func:`evaluate_clip`
        results, or ``{"name", "error", ...}``), ``failed``, ``mean_lse_d``, ``mean_lse_c``,
        ``note``, ``model_uri``.

    Raises:
        EvaluateError: the model cannot be loaded, or the face detector cannot while some input
            is a usable video (when none is, the clips report why instead).
    """
    model, cfg = load_sync_model(model_uri, tracking_uri)
    overrides = local_face_overrides(face_backend, insightface_root)
    if overrides:
        cfg = cfg.override(overrides)
    result = evaluate_videos(model, cfg, list(videos), max_offset=max_offset, shift=shift,
                             plot_dir=plot_dir)
    result["model_uri"] = model_uri
    return result


def plot_curve(result: dict[str, Any], path: Path) -> Path:
    """Distance-vs-offset PNG of one clip (matplotlib Agg)."""
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
    "reference_shift",
    "run_evaluate",
    "shift_list",
    "shift_scores",
]
