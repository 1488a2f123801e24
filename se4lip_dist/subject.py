"""``se4lip-dist subject``: one person's video -> that person's encoder -> renderer features.

The SE4Lip paper's own regime (one subject, a few minutes of one video, then that subject's
renderer), as one command:

1. **prepare** the video into shards, then **audit** its audio-video offset with the general
   encoder (:mod:`se4lip_dist.audit`): in sync or undecidable, go on (the report says which);
   offset by ``k`` frames, stop with the measured offset (``on_offset="stop"``, the default),
   correct it (``"fix"``: train on the audit's corrected shards, extract with the audio
   advanced by ``k``) or train on it as recorded (``"ignore"``);
2. **fine-tune** from the general encoder (``models:/se4lip@champion`` by default, taking its
   architecture), holding out the end of the video (``train.split=time``: the last fifth, with
   a guard gap), a fixed number of steps per epoch;
3. **register** it as ``se4lip-<subject>`` through the usual gate (enough held-out pieces, above
   the content-blind floor, significantly better than that subject's champion);
4. **extract** features for the whole video in the renderers' layout (``aud_se4lip.npy``
   ``[N, D]`` and ``aud_se4lip_w16.npy`` ``[N, 16, D]``, see jobs/README.md);
5. write a **report**: the held-out tail's shift-consistent offset accuracy over its pieces
   (the independent units) with its interval, the accuracy at every audio shift, LSE-D/C, the
   gate's reason and the distance-vs-offset curve of the held-out tail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from se4lip_dist import storage
from se4lip_dist.audit import IN_SYNC, OFFSET, AuditError, ClipAudit, run_audit
from se4lip_dist.config import Config, load_config, parse_overrides
from se4lip_dist.extract import run_extract
from se4lip_dist.plots import offset_curve_figure, save_figure
from se4lip_dist.prepare import run_prepare
from se4lip_dist.registry import RegistryError, load_model_state, load_sync_model, pin_model
from se4lip_dist.tracking import TrackingError, resolve_tracking_uri
from se4lip_dist.train import run_train
from se4lip_dist.validation import ValidationSet, score

DEFAULT_INIT = "models:/se4lip@champion"
SUBJECT_TRAIN = {
    "train.split": "time",
    # The tail is cut into 30-frame pieces, each searched on its own: a 60-s video gives 10
    # units, enough for an interval (train.val_min_units); ER-NeRF's last 1/11 gives one.
    "train.val_fraction": 0.2,
    "train.steps_per_epoch": 100,
    "train.pairs_per_segment": 64,
    "train.val_chunk_frames": 30,
    "train.epochs": 8,
}
"""The per-subject training regime (each can be overridden with ``--set``)."""
OFFSET_MODES = ("stop", "fix", "ignore")
"""What the flow does when the audit finds the video's audio offset."""


class SubjectError(RuntimeError):
    """A step of the per-subject flow failed; the message names the step."""


def subject_name(video: str) -> str:
    """``/data/Obama 2.mp4`` -> ``obama-2``: a registered-model-safe subject name."""
    stem = Path(storage.basename(video)).stem.lower()
    return re.sub(r"[^a-z0-9]+", "-", stem).strip("-") or "subject"


def offset_decision(audit: ClipAudit, mode: str, video: str, model: str) -> str:
    """What the flow does about the video's audit: a note for the report, or stop.

    Raises:
        SubjectError: the video is offset and ``mode`` is ``stop`` (the message names the
            offset, the model that measured it and the flags that override).
    """
    if mode not in OFFSET_MODES:
        raise SubjectError(f"on_offset must be one of {OFFSET_MODES}, got {mode!r}")
    if audit.status == OFFSET:
        assert audit.offset is not None
        what = (f"the audio of {video} runs {abs(audit.offset)} frames "
                f"{'late' if audit.offset > 0 else 'early'} (offset {audit.offset:+d}, measured "
                f"by {model})")
        if mode == "stop":
            raise SubjectError(f"audit: {what}; rerun with --offset fix to correct it (audio "
                               "shifted back, both streams trimmed to their overlap) or "
                               "--offset ignore to train on it as recorded")
        return f"{what}: {'corrected' if mode == 'fix' else 'kept as recorded (--offset ignore)'}"
    if audit.status == IN_SYNC:
        return f"in sync (offset {audit.offset:+d}, measured by {model})"
    return f"sync undecidable ({audit.reason}, measured by {model}): trained as recorded"


def subject_config(preset: str, overrides: list[str], init_cfg: Config | None) -> Config:
    """The subject's config: the general encoder's architecture and data settings when warm
    starting (else the preset's), the per-subject training regime, then ``overrides``."""
    cfg = load_config(preset)
    if init_cfg is not None:
        cfg = Config.from_dict({**cfg.to_dict(), "data": init_cfg.to_dict()["data"],
                                "model": init_cfg.to_dict()["model"]}).override(
            {"train.window_frames": init_cfg.train.window_frames})
    return cfg.override(SUBJECT_TRAIN).override(parse_overrides(overrides))


def _starting_point(init: str | None, uri: str, preset: str, overrides: list[str]
                    ) -> tuple[Config, str | None, str]:
    """The subject's config, the pinned general encoder it warm-starts from (None: from
    scratch) and the report's line saying which."""
    init_note = "from scratch (no general encoder given)"
    init_cfg = None
    pinned = None
    if init:
        try:
            pinned = pin_model(init, uri)["pinned_uri"]
            _, init_cfg = load_model_state(pinned, uri)
            init_note = f"warm start from {pinned}"
        except (RegistryError, TrackingError) as e:
            init_note = f"from scratch ({init} is not available: {e})"
    cfg = subject_config(preset, overrides, init_cfg)
    if pinned is not None:
        cfg = cfg.override({"train.init": pinned})
    return cfg, pinned, init_note


def run_subject(
    video: str,
    out_dir: str,
    *,
    name: str | None = None,
    init: str | None = DEFAULT_INIT,
    preset: str = "cpu-small",
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    use_gpu: bool = False,
    on_offset: str = "stop",
    audit_model: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare, fine-tune, register, extract and report for one subject's video.

    Args:
        video: the subject's video (local or a URL).
        out_dir: where shards, features and the report go (local or a URL).
        name: subject name (default: from the file name); the model is ``se4lip-<name>``.
        init: the general encoder to start from; None (or one that does not exist) trains
            from scratch, and the report says so.
        preset: config preset when training from scratch.
        overrides: ``--set key=value`` items (``face.*`` for detection, ``train.*``...).
        tracking_uri: MLflow URI (default: ``MLFLOW_TRACKING_URI`` or the local store).
        address: Ray cluster address (default: a local Ray).
        use_gpu: train and extract on one GPU per worker; a training rank also takes
            ``train.cpus_per_gpu_worker`` CPUs (:func:`se4lip_dist.resources.train_plan`).
        on_offset: when the audit finds the video offset: ``stop`` (raise with the measured
            offset), ``fix`` (correct it) or ``ignore`` (train on it as recorded).
        audit_model: the model that audits the video (default: the general encoder; none
            available: the video is not audited and the report says so).
        on_step: called with a title before each step.

    Returns:
        ``subject``, ``model_uri``, ``registered`` (version, alias, reason), ``features``,
        ``report`` (paths), ``heldout`` (scores), ``init`` (what it started from), ``audit``
        (the video's offset, status, the measuring model and what was done).

    Raises:
        SubjectError: naming the step that failed.
    """
    step = on_step or (lambda _title: None)
    subject = name or subject_name(video)
    out = storage.absolute(out_dir)
    uri = resolve_tracking_uri(tracking_uri)
    cfg, pinned, init_note = _starting_point(init, uri, preset, list(overrides or []))

    step(f"1/5 prepare {video}, then audit its sync")
    shards = storage.join(out, "shards")
    summary = run_prepare([video], shards, cfg, address=address)
    if summary.failures or not summary.total_clips:
        raise SubjectError(f"prepare: {video} could not be prepared: "
                           f"{[f.error for f in summary.failures]}")
    audit = _audit(video, shards, out, audit_model or pinned, on_offset, uri, address, use_gpu)
    if audit.get("action") == "corrected":
        shards = audit["shards"]

    step(f"2/5 fine-tune on the head of the video ({init_note}), validate on its tail")
    model_name = f"se4lip-{subject}"
    try:
        trained = run_train(cfg, shards, tracking_uri=uri, experiment="se4lip-subject",
                            run_name=f"{subject}-{'warm' if pinned else 'scratch'}",
                            register=model_name, use_gpu=use_gpu, address=address,
                            storage_path=storage.join(out, "ray"))
    except Exception as e:
        raise SubjectError(f"train: {e}") from e
    reg = trained["registered"]
    _tag_version(uri, reg, audit)

    step(f"3/5 registered {model_name} v{reg['version']} as {reg['alias']}")
    step("4/5 extract renderer features for the whole video")
    features = storage.join(out, "features")
    ext = run_extract([video], reg["registered_uri"], features, tracking_uri=uri,
                      use_gpu=use_gpu, address=address,
                      audio_offset=audit["offset"] if audit.get("action") == "corrected" else 0)
    if ext.exit_code:
        raise SubjectError(f"extract: {[f.error for f in ext.failures]}")

    step("5/5 report on the held-out tail")
    report = _report(cfg, shards, reg, trained, init_note, out, audit)
    return {"subject": subject, "model_uri": reg["registered_uri"], "registered": reg,
            "audit": audit,
            "features": features, "outputs": ext.outputs, "report": report["paths"],
            "heldout": report["heldout"], "init": init_note, "run_id": trained["run_id"],
            "tracking_uri": trained["tracking_uri"]}


def _audit(video: str, shards: str, out: str, model: str | None, mode: str, uri: str,
           address: str | None, use_gpu: bool) -> dict[str, Any]:
    """Audit the prepared video; stop, or say what was done (``action``) and where the data to
    train on is (``shards``)."""
    if mode not in OFFSET_MODES:
        raise SubjectError(f"on_offset must be one of {OFFSET_MODES}, got {mode!r}")
    if model is None:
        return {"status": None, "offset": None, "model": None, "action": "not audited",
                "note": "not audited (no general encoder to measure with)"}
    report = storage.join(out, "audit")
    try:
        res = run_audit([shards], model, tracking_uri=uri, report_dir=report, address=address,
                        use_gpu=use_gpu, experiment="se4lip-subject")
        a = res.clips[0]
        note = offset_decision(a, mode, video, res.model["pinned_uri"])
        doc = {"status": a.status, "offset": a.offset, "reason": a.reason,
               "confidence": a.confidence, "model": res.model["pinned_uri"],
               "action": "none", "note": note, "report": res.report["markdown"],
               "run_id": res.run_id, "shards": shards}
        if a.status == OFFSET and mode == "fix":
            fixed = storage.join(out, "shards-audited")
            run_audit([shards], res.model["pinned_uri"], tracking_uri=uri, report_dir=report,
                      fix_out=fixed, undecidable="keep", address=address, use_gpu=use_gpu,
                      experiment="se4lip-subject")
            doc.update(action="corrected", shards=fixed)
        elif a.status == OFFSET:
            doc["action"] = "ignored"
    except AuditError as e:
        raise SubjectError(f"audit: {e}") from e
    return doc


def _tag_version(uri: str, reg: dict[str, Any], audit: dict[str, Any]) -> None:
    """Record the video's audit on the registered version (why its data was, or was not,
    corrected)."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = {"se4lip.audit": audit["note"], "se4lip.audit_status": audit.get("status"),
            "se4lip.audit_offset": audit.get("offset"), "se4lip.audit_model": audit.get("model"),
            "se4lip.audit_action": audit.get("action")}
    for k, v in tags.items():
        if v is not None:
            client.set_model_version_tag(reg["name"], str(reg["version"]), k, str(v))


def _report(cfg: Config, shards: str, reg: dict[str, Any], trained: dict[str, Any],
            init_note: str, out: str, audit: dict[str, Any]) -> dict[str, Any]:
    """report.json, report.md and the held-out distance-vs-offset curve."""
    model, model_cfg = load_sync_model(reg["registered_uri"], trained["tracking_uri"])
    vset = ValidationSet.load(shards, cfg)
    res = score(model, model_cfg, vset, keep_curve=True)
    m = res.metrics
    curve = next((c for c in res.clips if 0 in c.distances), None)
    plot = storage.join(out, "report", "heldout_offset_curve.png")
    if curve is not None:
        zero = curve.shifts.index(0)
        save_figure(offset_curve_figure(curve.distances[0], "held-out tail: distance vs offset",
                                        predicted=curve.offsets[zero], expected=0), plot)
    heldout = {k: m[k] for k in ("val/shift_acc", "val/shift_acc_ci_low",
                                 "val/shift_acc_ci_high", "val/units", "val/offset_acc",
                                 "val/offset_acc_ci_low", "val/offset_acc_ci_high",
                                 "val/offset_trials", "val/windows", "val/lse_d", "val/lse_c",
                                 "val/sync_acc")}
    heldout.update({k: v for k, v in m.items() if k.startswith("val/offset_acc_shift")})
    doc = {"model": reg["registered_uri"], "alias": reg["alias"], "reason": reg["reason"],
           "init": init_note, "split": vset.protocol.split, "best_epoch": trained["best_epoch"],
           "epochs": trained["epochs"], "heldout": heldout, "plot": plot, "audit": audit}
    lines = [f"# {reg['registered_uri']} ({reg['alias']})", "", f"- {init_note}",
             f"- sync audit: {audit['note']}",
             f"- validation: {vset.protocol.describe()}",
             f"- best epoch {trained['best_epoch']} of {trained['epochs']}", "",
             "| held-out score | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in heldout.items()]
    lines += ["", f"Registry: {reg['reason']}", "", f"![curve]({storage.basename(plot)})"]
    paths = {"json": storage.join(out, "report", "report.json"),
             "markdown": storage.join(out, "report", "report.md"), "plot": plot}
    storage.write_atomic(paths["json"], json.dumps(doc, indent=1))
    storage.write_atomic(paths["markdown"], "\n".join(lines) + "\n")
    return {"paths": paths, "heldout": heldout}


__all__ = ["DEFAULT_INIT", "OFFSET_MODES", "SUBJECT_TRAIN", "SubjectError", "offset_decision",
           "run_subject", "subject_config", "subject_name"]
