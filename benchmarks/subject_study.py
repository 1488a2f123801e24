"""The per-subject study: general vs per-subject encoders, unseen speakers, augmentation.

    .venv/bin/python benchmarks/subject_study.py --out benchmarks/subject_study.json
    .venv/bin/python benchmarks/subject_study.py --quick     # smoke sizes, numbers meaningless
    .venv/bin/python benchmarks/subject_study.py --no-subject \
        --arms plain,augmented,audio,lips,only-noise,only-reverb,only-speed   # the ablation

Data (``$SE4LIP_SHARED_DATA``, default ../shared/data), prepared into ``--work`` (cached):

- **general set**: GRID speaker s1 clips 0..``general_clips``-1 (prepared with SCRFD), a clip
  split for validation;
- **subject videos**: GRID clips after those, concatenated into one video of 0.5, 1, 2 and 4
  minutes (one person, one long video, as a renderer dataset has);
- **unseen speakers**: the clips of ``wild/`` and ``unseen/`` (other people), never trained
  on. Each clip is one unit evaluated whole, whatever its length (two of ``unseen/`` are
  20-60 s single-person videos).

Measured, all under the validation protocol: the audio shifted by each of -3, 0 and +3 frames,
a unit (clip or held-out piece) counts when its offset is found at *every* shift (a
content-blind constant answer scores 0), and every interval counts units, never (unit, shift)
trials:

1. general encoders trained on the general set with augmentation off and on (one config each,
   same seed and steps): ``val/shift_acc`` on held-out GRID clips with its interval and
   ``val/units``, and on the unseen speakers the shift-consistent clips (one multi-shift
   ``evaluate`` search per clip) with a Wilson interval over clips;
2. per-subject encoders on each subject video in ``se4lip-dist subject``'s regime
   (:data:`se4lip_dist.subject.SUBJECT_TRAIN`: time split, the held-out tail searched in
   pieces; ``--subject-steps``/``--subject-epochs`` override its steps), from scratch and
   warm-started from each general encoder: the tail's ``val/shift_acc`` [CI] (``val/units``).

Writes the results JSON and prints a markdown table (for the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHIFTS = (-3, 0, 3)
"""Audio shifts of the protocol (``train.val_shifts``'s default), for the unseen speakers too."""
SCORE_KEYS = ("val/shift_acc", "val/shift_acc_ci_low", "val/shift_acc_ci_high", "val/units",
              "val/constant_shift_acc", "val/sync_acc")
"""Validation scores kept per encoder (best epoch)."""
AUGMENT = ["augment.noise_p=0.5", "augment.reverb_p=0.3", "augment.speed_p=0.3",
           "augment.color_p=0.5", "augment.affine_p=0.5", "augment.blur_p=0.2"]
AUDIO = AUGMENT[:3]
LIPS = AUGMENT[3:]


def arm_overrides(arm: str) -> list[str]:
    """Augmentation overrides of a general-encoder arm.

    ``plain`` (none), ``augmented`` (all), ``audio`` / ``lips`` (one modality's),
    ``only-NAME`` (one augmentation, e.g. ``only-noise``) and ``without-NAME`` (all but one).
    """
    names = {a.split(".")[1].split("_p=")[0]: a for a in AUGMENT}
    fixed = {"plain": [], "augmented": AUGMENT, "audio": AUDIO, "lips": LIPS}
    if arm in fixed:
        return list(fixed[arm])
    kind, _, name = arm.partition("-")
    if kind in ("only", "without") and name in names:
        return [names[name]] if kind == "only" else [a for a in AUGMENT if a != names[name]]
    raise SystemExit(f"unknown arm {arm!r}: plain, augmented, audio, lips, only-NAME or "
                     f"without-NAME with NAME in {sorted(names)}")


def _shared() -> Path:
    return Path(os.environ.get("SE4LIP_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def unseen_clips(shared: Path) -> list[Path]:
    """Clips of speakers never trained on: ``wild/`` then ``unseen/``."""
    return [p for d in ("wild", "unseen") for p in sorted((shared / d).glob("*.mp4"))]


def unseen_scores(res: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of a multi-shift ``evaluate`` result: scores over clips, and per
    clip its offset at each shift (or why it could not be evaluated)."""
    keep = ("shift_acc", "shift_acc_ci_low", "shift_acc_ci_high", "consistent", "evaluated",
            "failed", "per_shift", "constant_floor", "shifts")
    clips = [{"name": c["name"], "frames": c.get("frames"), "offsets": c.get("offsets"),
              "shift_consistent": c.get("shift_consistent"),
              **({"error": c["error"]} if "error" in c else {})} for c in res["clips"]]
    return {**{k: res[k] for k in keep}, "clips": clips}


def _concat(clips: list[Path], out: Path) -> None:
    """One video of ``clips`` back to back (frames and audio on one clock)."""
    import numpy as np

    from se4lip_dist.media import decode_clip
    from se4lip_dist.synthetic import write_clip

    if out.exists():
        return
    frames, audio = [], []
    for c in clips:
        clip = decode_clip(c)
        frames.append(clip.frames)
        audio.append(clip.audio)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.mp4")
    write_clip(tmp, np.concatenate(frames), np.concatenate(audio), 25, 16000)
    tmp.replace(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/se4lip-subject-study"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--general-clips", type=int, default=500)
    ap.add_argument("--general-epochs", type=int, default=2)
    ap.add_argument("--subject-steps", type=int, default=None,
                    help="steps per epoch (default: the subject regime's, SUBJECT_TRAIN)")
    ap.add_argument("--subject-epochs", type=int, default=None,
                    help="epochs (default: the subject regime's, SUBJECT_TRAIN)")
    ap.add_argument("--arms", default="plain,augmented",
                    help="general encoders to train, comma-separated (see arm_overrides); "
                         "the ablation of issue 14: plain,augmented,audio,lips,only-noise,...")
    ap.add_argument("--no-subject", action="store_true",
                    help="general encoders only (the augmentation ablation)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from se4lip_dist.config import load_config
    from se4lip_dist.evaluate import run_evaluate
    from se4lip_dist.prepare import run_prepare
    from se4lip_dist.subject import SUBJECT_TRAIN, subject_config
    from se4lip_dist.train import run_train

    shared = _shared()
    grid = sorted((shared / "grid_s1" / "video").glob("*.mp4"))
    unseen = unseen_clips(shared)
    face_root = shared.parent / "models" / "insightface"
    if not grid or not unseen or not face_root.is_dir():
        print(f"needs GRID, wild/ or unseen/ clips and the InsightFace root under {shared}",
              file=sys.stderr)
        return 2
    n_general = 40 if args.quick else args.general_clips
    minutes = (0.5, 1.0) if args.quick else (0.5, 1.0, 2.0, 4.0)
    work = args.work
    uri = f"sqlite:///{work / 'mlflow.db'}"
    face = [f"face.insightface_root={face_root}"]
    t0 = time.perf_counter()
    subject_epochs = 2 if args.quick else args.subject_epochs
    steps = 10 if args.quick else args.subject_steps
    flags = {k: v for k, v in (("train.steps_per_epoch", steps),
                               ("train.epochs", subject_epochs)) if v is not None}
    # What decides the numbers: a rerun continues a stopped run only when all of it matches.
    key: dict[str, Any] = {"general_clips": n_general, "minutes": list(minutes),
                           "shifts": list(SHIFTS), "subject_train": {**SUBJECT_TRAIN, **flags},
                           "unseen_clips": [f"{p.parent.name}/{p.name}" for p in unseen]}
    rec: dict[str, Any] = {**key, "general": {}, "subject": []}
    partial = work / "partial.json"
    if partial.is_file():
        saved = json.loads(partial.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            rec = saved

    general_dir = work / f"general-{n_general}"
    listing = work / f"general-{n_general}.csv"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("path,speaker\n" + "".join(f"{p},s1\n" for p in grid[:n_general]))
    base = load_config("cpu-small", overrides=face)
    run_prepare([str(listing)], general_dir, base)
    subject_clips = grid[n_general:]
    videos = {}
    for m in minutes:
        k = int(m * 60 / 3)  # GRID clips are 3 s
        videos[m] = work / "subjects" / f"grid_s1_{m:g}min.mp4"
        _concat(subject_clips[:k], videos[m])
        run_prepare([str(videos[m])], work / "subjects" / f"shards-{m:g}min", base)

    common = dict(tracking_uri=uri, storage_path=str(work / "ray"))
    general_epochs = 1 if args.quick else args.general_epochs
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for name, aug in ((a, arm_overrides(a)) for a in arms):
        if name in rec["general"]:
            continue
        cfg = load_config("cpu-small", overrides=[*face, *aug, f"train.epochs={general_epochs}",
                                                   "train.pairs_per_segment=8"])
        r = run_train(cfg, str(general_dir), experiment="study-general", run_name=name,
                      register=f"study-{name}", **common)
        # One search per clip at every shift: a clip is one unit, however many shifts.
        res = run_evaluate([str(p) for p in unseen], r["registered"]["registered_uri"],
                           tracking_uri=uri, shift=SHIFTS, max_offset=cfg.train.max_offset,
                           insightface_root=str(face_root))
        rec["general"][name] = {
            "model": r["registered"]["registered_uri"], "best_epoch": r["best_epoch"],
            "grid_val": {k: r["metrics"][k] for k in SCORE_KEYS},
            "unseen": unseen_scores(res)}
        print(json.dumps({name: rec["general"][name]}), flush=True)
        partial.write_text(json.dumps(rec))

    inits = ["scratch", *(a for a in ("plain", "augmented") if a in rec["general"])]
    for m in [] if args.no_subject else minutes:
        for init in inits:
            if any(x["minutes"] == m and x["init"] == init for x in rec["subject"]):
                continue
            over = [*face, *(f"{k}={v}" for k, v in flags.items())]
            if init != "scratch":
                over.append(f"train.init={rec['general'][init]['model']}")
            # The general encoders are cpu-small's architecture: no init config to take over.
            cfg = subject_config("cpu-small", over, None)
            r = run_train(cfg, str(work / "subjects" / f"shards-{m:g}min"),
                          experiment="study-subject", run_name=f"{m:g}min-{init}", **common)
            row = {"minutes": m, "init": init, "best_epoch": r["best_epoch"],
                   **{k: r["metrics"][k] for k in (*SCORE_KEYS, "val/windows")}}
            rec["subject"].append(row)
            print(json.dumps(row), flush=True)
            partial.write_text(json.dumps(rec))
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1))
    print(_table(rec))
    return 0


def _ci(m: dict[str, Any], key: str) -> str:
    """``0.50 [0.24, 0.76]`` from a score and its ``_ci_low``/``_ci_high`` companions."""
    if m.get(key) is None:
        return "-"
    return f"{m[key]:.2f} [{m[key + '_ci_low']:.2f}, {m[key + '_ci_high']:.2f}]"


def _table(rec: dict[str, Any]) -> str:
    shifts = ", ".join(f"{s:+d}" if s else "0" for s in rec["shifts"])
    lines = [f"Share of units whose offset is found within 1 frame at every audio shift "
             f"({shifts}) [Wilson 95% CI over units] (units).", "",
             "| general encoder | GRID held-out val/shift_acc (val/units) | "
             "unseen speakers: consistent clips | constant answer |",
             "| --- | --- | --- | --- |"]
    for name, g in rec["general"].items():
        v, u = g["grid_val"], g["unseen"]
        failed = f", {u['failed']} not evaluated" if u["failed"] else ""
        lines.append(f"| {name} | {_ci(v, 'val/shift_acc')} ({int(v['val/units'])}) | "
                     f"{u['consistent']}/{u['evaluated']}: {_ci(u, 'shift_acc')}{failed} | "
                     f"{u['constant_floor']['consistent']:.2f} |")
    lines += ["", "| subject video | from scratch | warm (plain) | warm (augmented) |",
              "| --- | --- | --- | --- |"]
    for m in rec["minutes"]:
        cells = []
        for init in ("scratch", "plain", "augmented"):
            r = next((x for x in rec["subject"] if x["minutes"] == m and x["init"] == init), None)
            cells.append("not run" if r is None else
                         f"{_ci(r, 'val/shift_acc')} ({int(r['val/units'])})")
        lines.append(f"| {m:g} min | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
