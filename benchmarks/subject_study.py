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
- **unseen speakers**: the four clips of ``wild/`` (four other people), never trained on.

Measured:

1. general encoders trained on the general set with augmentation off and on (one config each,
   same seed and steps): their validation scores on held-out GRID clips, and on the wild clips
   the offset accuracy over audio shifted by -3, 0 and +3 frames (12 searches);
2. per-subject encoders on each subject video with the time split (the last 1/11 held out):
   from scratch and warm-started from each general encoder; the held-out tail's offset
   accuracy (with its interval and number of searches).

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
    ap.add_argument("--subject-steps", type=int, default=60, help="steps per epoch")
    ap.add_argument("--subject-epochs", type=int, default=4)
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
    from se4lip_dist.train import run_train

    shared = _shared()
    grid = sorted((shared / "grid_s1" / "video").glob("*.mp4"))
    wild = sorted((shared / "wild").glob("*.mp4"))
    face_root = shared.parent / "models" / "insightface"
    if not grid or not wild or not face_root.is_dir():
        print(f"needs GRID, wild clips and the InsightFace root under {shared}", file=sys.stderr)
        return 2
    n_general = 40 if args.quick else args.general_clips
    minutes = (0.5, 1.0) if args.quick else (0.5, 1.0, 2.0, 4.0)
    work = args.work
    uri = f"sqlite:///{work / 'mlflow.db'}"
    face = [f"face.insightface_root={face_root}"]
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"general_clips": n_general, "minutes": list(minutes),
                           "shifts": list(SHIFTS), "general": {}, "subject": []}
    partial = work / "partial.json"  # a rerun continues where a stopped one ended
    if partial.is_file():
        saved = json.loads(partial.read_text())
        if (saved["general_clips"], saved["minutes"]) == (n_general, list(minutes)):
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
        wild_eval = {}
        for k in SHIFTS:
            res = run_evaluate([str(p) for p in wild], r["registered"]["registered_uri"],
                               tracking_uri=uri, shift=k, insightface_root=str(face_root))
            wild_eval[str(k)] = {"hits": res["hits"], "evaluated": res["evaluated"],
                                 "offsets": [c.get("offset") for c in res["clips"]]}
        hits = sum(v["hits"] for v in wild_eval.values())
        total = sum(v["evaluated"] for v in wild_eval.values())
        rec["general"][name] = {
            "model": r["registered"]["registered_uri"], "best_epoch": r["best_epoch"],
            "grid_val": {k: r["metrics"][k] for k in ("val/offset_acc", "val/offset_acc_ci_low",
                                                      "val/offset_acc_ci_high",
                                                      "val/offset_trials", "val/sync_acc")},
            "wild": wild_eval, "wild_offset_acc": hits / total if total else None,
            "wild_searches": total}
        print(json.dumps({name: rec["general"][name]}), flush=True)
        partial.write_text(json.dumps(rec))

    subject_epochs = 2 if args.quick else args.subject_epochs
    steps = 10 if args.quick else args.subject_steps
    inits = ["scratch", *(a for a in ("plain", "augmented") if a in rec["general"])]
    for m in [] if args.no_subject else minutes:
        for init in inits:
            if any(x["minutes"] == m and x["init"] == init for x in rec["subject"]):
                continue
            over = [*face, "train.split=time", f"train.val_fraction={1 / 11}",
                    "train.val_chunk_frames=75", "train.pairs_per_segment=64",
                    f"train.steps_per_epoch={steps}", f"train.epochs={subject_epochs}"]
            if init != "scratch":
                over.append(f"train.init={rec['general'][init]['model']}")
            cfg = load_config("cpu-small", overrides=over)
            r = run_train(cfg, str(work / "subjects" / f"shards-{m:g}min"),
                          experiment="study-subject", run_name=f"{m:g}min-{init}", **common)
            row = {"minutes": m, "init": init, "best_epoch": r["best_epoch"],
                   **{k: r["metrics"][k] for k in ("val/offset_acc", "val/offset_acc_ci_low",
                                                   "val/offset_acc_ci_high",
                                                   "val/offset_trials", "val/windows",
                                                   "val/sync_acc")}}
            rec["subject"].append(row)
            print(json.dumps(row), flush=True)
            partial.write_text(json.dumps(rec))
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1))
    print(_table(rec))
    return 0


def _table(rec: dict[str, Any]) -> str:
    lines = ["| general encoder | GRID held-out offset acc [95% CI] (searches) | "
             "wild clips, unseen speakers: offset acc (searches) |", "| --- | --- | --- |"]
    for name, g in rec["general"].items():
        v = g["grid_val"]
        lines.append(f"| {name} | {v['val/offset_acc']:.2f} [{v['val/offset_acc_ci_low']:.2f}, "
                     f"{v['val/offset_acc_ci_high']:.2f}] ({int(v['val/offset_trials'])}) | "
                     f"{g['wild_offset_acc']:.2f} ({g['wild_searches']}) |")
    lines += ["", "| subject video | from scratch | warm (plain) | warm (augmented) |",
              "| --- | --- | --- | --- |"]
    for m in rec["minutes"]:
        cells = []
        for init in ("scratch", "plain", "augmented"):
            r = next((x for x in rec["subject"] if x["minutes"] == m and x["init"] == init), None)
            if r is None:
                cells.append("not run")
                continue
            cells.append(f"{r['val/offset_acc']:.2f} [{r['val/offset_acc_ci_low']:.2f}, "
                         f"{r['val/offset_acc_ci_high']:.2f}] ({int(r['val/offset_trials'])})")
        lines.append(f"| {m:g} min | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
