"""Does the sync audit recover injected audio offsets, and say "undecidable" rather than guess?

    .venv/bin/python benchmarks/audit_injected.py \\
        --model models:/grid-gate@champion \\
        --grid 40 --out benchmarks/audit_injected.json

Clips (``$SE4LIP_SHARED_DATA``, default ../shared/data): ``--grid`` GRID s1 clips spread
evenly over the sorted corpus after its first ``--grid-skip`` (200: what the GRID encoders
here were trained on), whose sync is known (offset 0), and every clip of ``wild/`` and
``unseen/`` (thirteen people never trained on), whose base offset is unknown. Each clip is
decoded and its mouth tracked once with the model's own ``prepare`` settings (cached in
``--work``), then for every injected offset ``j`` (``--injections``, default -8..+8) its audio
is delayed by ``j`` frames (:func:`se4lip_dist.sync.shift_audio`) and the audit's per-clip
estimate runs on it (:func:`se4lip_dist.audit.measure`: the shift protocol, consistency,
confidence). Clips longer than ``--max-frames`` (300: 12 s) are audited on their first
``--max-frames`` frames, so the three long ``unseen`` videos do not dominate the run time.

A trial is *correct* when the audit decides and its offset is within one frame of
``base + j``: ``base`` is 0 for GRID and, for the other clips, the audit's own measurement at
``j = 0`` (when that is undecidable, the median of ``offset - j`` over the clip's decided
trials, and the clip is marked); there the ``j = 0`` trial defines the base and is not
scored. GRID is also scored that way (``grid, own base``): the gap between its two rows is
what the shift protocol cannot see, a per-clip bias that moves with the audio. Every
interval counts clips, never (clip, injection) trials:
the per-clip accuracy among decided trials is averaged over clips with a bootstrap interval,
and the share of clips with every decided trial correct gets a Wilson interval. Several
``--model``/``--tracking-uri`` pairs are measured side by side on the same crops.

Confidence thresholds are swept after the fact (a decided trial under the threshold becomes
``low_confidence``, the audit's last check), so one run shows what ``--min-confidence`` trades;
``--from-json RESULTS --min-confidence X`` re-summarises saved trials at another threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from se4lip_dist.audit import IN_SYNC, OFFSET, UNDECIDABLE, AuditSettings, measure
from se4lip_dist.config import Config
from se4lip_dist.faces import build_detector
from se4lip_dist.manifest import Manifest
from se4lip_dist.prepare import PrepareInput, process_clip
from se4lip_dist.registry import load_sync_model, pin_model
from se4lip_dist.shards import decode_lips
from se4lip_dist.splits import SplitRule
from se4lip_dist.sync import bootstrap_interval, shift_audio, wilson_interval

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("SE4LIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
INSIGHTFACE = Path(os.environ.get("SE4LIP_INSIGHTFACE_ROOT",
                                  SHARED.parent / "models" / "insightface"))
THRESHOLDS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)


def heldout_grid(shards: Path, cfg: Config) -> list[Path]:
    """The GRID clips of ``shards`` that a model with config ``cfg`` validated on (its own
    split rule), i.e. never trained on."""
    manifest = Manifest.load(shards)
    rule = SplitRule.for_manifest(manifest, cfg)
    table = manifest.clips_table(["clip_id", "source", "split", "speaker"]).to_pylist()
    names = sorted(Path(r["source"]).name for r in table
                   if rule.role(r["clip_id"], r["split"], r["speaker"]) == "val")
    return [SHARED / "grid_s1" / "video" / n for n in names]


def pick_clips(n_grid: int, skip: int, pool: list[Path] | None = None) -> list[tuple[str, Path]]:
    """``(group, path)``: GRID clips spread over ``pool`` (default: the sorted corpus after its
    first ``skip``), then the wild and unseen clips."""
    grid = pool if pool is not None else sorted(
        (SHARED / "grid_s1" / "video").glob("*.mp4"))[skip:]
    if not grid and n_grid:
        sys.exit(f"no GRID clips under {SHARED / 'grid_s1' / 'video'} (set SE4LIP_SHARED_DATA)")
    idx = np.linspace(0, len(grid) - 1, n_grid).round().astype(int) if n_grid else []
    out = [("grid", grid[i]) for i in dict.fromkeys(int(i) for i in idx)]
    for group in ("wild", "unseen"):
        out += [(group, p) for p in sorted((SHARED / group).glob("*.mp4"))]
    return out


def crops(path: Path, cfg: Config, detector: Any, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Lips and audio of one clip as ``prepare`` makes them (cached by content and config)."""
    key = hashlib.sha256(path.read_bytes()).hexdigest()[:16] + hashlib.sha256(json.dumps(
        [cfg.to_dict()["data"], {k: v for k, v in cfg.to_dict()["face"].items()
                                 if k != "insightface_root"}], sort_keys=True,
        default=str).encode()).hexdigest()[:8]
    cache = work / f"{path.stem}-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["lips"], z["audio"]
    res = process_clip(PrepareInput(str(path)), path.stem, cfg, detector)
    if res.failure is not None:
        raise RuntimeError(res.failure.error)
    lips = np.concatenate([decode_lips(s.lips_jpeg) for s in res.segments])
    audio = np.concatenate([np.asarray(s.audio, np.float32) for s in res.segments])
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, lips=lips, audio=audio)
    return lips, audio


class LipMemo(torch.nn.Module):
    """The lip encoder with its answers kept per input: a clip's lip windows are the same at
    every injection (only the audio moves), so they are embedded once per clip."""

    def __init__(self, lips: torch.nn.Module) -> None:
        super().__init__()
        self.inner = lips
        self.memo: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(x.detach().cpu().numpy().tobytes()).hexdigest()
        if key not in self.memo:
            self.memo[key] = self.inner(x)
        return self.memo[key]


def run_model(model: Any, cfg: Config, clips: list[dict[str, Any]], injections: list[int],
              settings: AuditSettings) -> list[dict[str, Any]]:
    """One record per (clip, injection): status, reason, offset, confidence."""
    spf = cfg.data.samples_per_frame
    memo = LipMemo(model.lips)
    model.lips = memo
    trials = []
    for c in clips:
        memo.memo.clear()
        t0 = time.perf_counter()
        for j in injections:
            a = measure(model, cfg, c["lips"], shift_audio(c["audio"], j, spf), settings,
                        clip_id=c["name"])
            trials.append({"clip": c["name"], "group": c["group"], "injected": j,
                           "status": a.status, "reason": a.reason, "offset": a.offset,
                           "confidence": a.confidence})
        print(f"  {c['name']}: {len(c['lips'])} frames, {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return trials


def shuffle_audio(clips: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each clip with the audio of the next clip of its group (a content-blind pairing: the
    audit should call it undecidable), both cut to the shorter one."""
    out = []
    for group in dict.fromkeys(c["group"] for c in clips):
        mine = [c for c in clips if c["group"] == group and len(c["lips"])]
        for c, other in zip(mine, mine[1:] + mine[:1], strict=True):
            if other is c:
                continue  # a group of one has no other audio
            spf = len(other["audio"]) // max(1, len(other["lips"]))
            n = min(len(c["lips"]), len(other["audio"]) // spf)
            out.append({**c, "lips": c["lips"][:n], "audio": other["audio"][:n * spf],
                        "audio_of": other["name"]})
    return out


def decide(t: dict[str, Any], threshold: float) -> str:
    """The trial's status once decisions under ``threshold`` LSE-C are withdrawn."""
    if t["status"] != UNDECIDABLE and (t["confidence"] or 0.0) < threshold:
        return UNDECIDABLE
    return t["status"]


def bases(trials: list[dict[str, Any]], threshold: float,
          grid_known: bool = True) -> dict[str, tuple[int | None, str]]:
    """Each clip's reference offset and where it came from (GRID: 0, known, unless
    ``grid_known`` is False: then measured like the others)."""
    out: dict[str, tuple[int | None, str]] = {}
    for clip in dict.fromkeys(t["clip"] for t in trials):
        mine = [t for t in trials if t["clip"] == clip]
        if mine[0]["group"] == "grid" and grid_known:
            out[clip] = (0, "known")
            continue
        zero = next((t for t in mine if t["injected"] == 0), None)
        if zero is not None and decide(zero, threshold) != UNDECIDABLE:
            out[clip] = (zero["offset"], "measured at j=0")
            continue
        rel = [t["offset"] - t["injected"] for t in mine if decide(t, threshold) != UNDECIDABLE]
        out[clip] = ((int(np.median(rel)), "median over injections") if rel
                     else (None, "never decided"))
    return out


def summarise(trials: list[dict[str, Any]], threshold: float, tol: int,
              grid_known: bool = True) -> dict[str, Any]:
    """Confusion counts and intervals over clips for one model, one group of clips."""
    base = bases(trials, threshold, grid_known)
    per_clip: dict[str, list[bool]] = {}
    confusion = {true: {IN_SYNC: 0, OFFSET: 0, UNDECIDABLE: 0} for true in (IN_SYNC, OFFSET)}
    by_j: dict[int, dict[str, int]] = {}
    counts = {"trials": 0, "decided": 0, "correct": 0, "wrong": 0, UNDECIDABLE: 0}
    for t in trials:
        b, source = base[t["clip"]]
        if source == "measured at j=0" and t["injected"] == 0:
            continue  # it defines the clip's base: scoring it would count itself
        status = decide(t, threshold)
        counts["trials"] += 1
        row = by_j.setdefault(t["injected"], {"correct": 0, "wrong": 0, UNDECIDABLE: 0})
        if b is None:  # a clip never decided has no reference: all its trials undecidable
            counts[UNDECIDABLE] += 1
            row[UNDECIDABLE] += 1
            continue
        expected = b + t["injected"]
        confusion[IN_SYNC if abs(expected) <= tol else OFFSET][status] += 1
        if status == UNDECIDABLE:
            counts[UNDECIDABLE] += 1
            row[UNDECIDABLE] += 1
            continue
        ok = abs(t["offset"] - expected) <= 1
        counts["decided"] += 1
        counts["correct" if ok else "wrong"] += 1
        row["correct" if ok else "wrong"] += 1
        per_clip.setdefault(t["clip"], []).append(ok)
    acc = [float(np.mean(v)) for v in per_clip.values()]
    all_ok = sum(all(v) for v in per_clip.values())
    lo, hi = bootstrap_interval(acc)
    wlo, whi = wilson_interval(all_ok, len(per_clip))
    return {
        **counts,
        "clips": len(base), "clips_decided": len(per_clip),
        "accuracy_decided": counts["correct"] / counts["decided"] if counts["decided"] else None,
        "mean_clip_accuracy": float(np.mean(acc)) if acc else None,
        "mean_clip_accuracy_ci": [lo, hi],
        "clips_all_correct": all_ok, "clips_all_correct_ci": [wlo, whi],
        "confusion": confusion, "by_injection": {str(k): v for k, v in sorted(by_j.items())},
        "bases": {k: {"offset": v[0], "from": v[1]} for k, v in base.items()},
    }


def fmt_ci(ci: list[float]) -> str:
    return "-" if ci[0] != ci[0] else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def base_text(base: dict[str, Any]) -> str:
    """``+3`` when the audit decided the clip as recorded, else ``undecidable``."""
    if base["offset"] is None or base["from"] != "measured at j=0":
        return "undecidable"
    return f"{base['offset']:+d}"


def markdown(results: dict[str, Any]) -> str:
    """The README tables."""
    lines = []
    for label, r in results["models"].items():
        thr = results["min_confidence"]
        if results.get("pairing") == "shuffled":
            lines += [f"### {label}, shuffled audio (min LSE-C {thr:g})", "",
                      "Every clip has another clip's audio: a decided trial is a false "
                      "decision, and the right answer is undecidable.", ""]
            for group, s in r["summary"].items():
                lo, hi = wilson_interval(s["clips_decided"], s["clips"])
                lines.append(f"- {group}: {s['decided']} of {s['trials']} trials decided; "
                             f"{s['clips_decided']} of {s['clips']} clips decided at least "
                             f"once [{lo:.2f}, {hi:.2f}]")
            lines.append("")
            continue
        lines += [f"### {label} (min LSE-C {thr:g})", "",
                  "| clips | trials | decided | correct within 1 frame | wrong | undecidable "
                  "| mean clip accuracy [95% CI over clips] | clips with every decided trial "
                  "correct [95% CI] |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for group, s in r["summary"].items():
            acc = "-" if s["accuracy_decided"] is None else f"{s['accuracy_decided']:.3f}"
            mca = "-" if s["mean_clip_accuracy"] is None else f"{s['mean_clip_accuracy']:.3f}"
            lines.append(f"| {group}: {s['clips']} | {s['trials']} | {s['decided']} | "
                         f"{s['correct']} ({acc}) | {s['wrong']} | {s[UNDECIDABLE]} | "
                         f"{mca} {fmt_ci(s['mean_clip_accuracy_ci'])} | "
                         f"{s['clips_all_correct']}/{s['clips_decided']} "
                         f"{fmt_ci(s['clips_all_correct_ci'])} |")
        lines += ["", "Confusion (trials; true class from base + injection, |offset| <= 1 is in "
                  "sync):", "", "| group | true | -> in_sync | -> offset | -> undecidable |",
                  "| --- | --- | --- | --- | --- |"]
        for group, s in r["summary"].items():
            for true, row in s["confusion"].items():
                lines.append(f"| {group} | {true} | {row[IN_SYNC]} | {row[OFFSET]} | "
                             f"{row[UNDECIDABLE]} |")
        lines += ["", "Confidence sweep (decided trials / trials, accuracy among decided):", "",
                  "| min LSE-C | " + " | ".join(r["sweep"]) + " |",
                  "| --- |" + " --- |" * len(r["sweep"])]
        for group in next(iter(r["sweep"].values())):
            cells = []
            for sw in r["sweep"].values():
                s = sw[group]
                acc = "-" if s["accuracy_decided"] is None else f"{s['accuracy_decided']:.2f}"
                cells.append(f"{s['decided']}/{s['trials']}, {acc}")
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        wild = r["summary"].get("wild+unseen")
        if wild:
            lines += ["", "Base offsets (j = 0) of the wild and unseen clips: " + ", ".join(
                f"{k} {base_text(v)}" for k, v in wild["bases"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append")
    ap.add_argument("--tracking-uri", action="append",
                    help="MLflow URI of each --model (default: ./se4lip-runs/mlflow.db)")
    ap.add_argument("--from-json", type=Path, nargs="+",
                    help="re-summarise the trials of saved runs (several: merged)")
    ap.add_argument("--groups", default="grid,wild,unseen",
                    help="which clips to run (split a long run over processes, then merge "
                         "with --from-json)")
    ap.add_argument("--grid", type=int, default=40)
    ap.add_argument("--grid-skip", type=int, default=200)
    ap.add_argument("--heldout", type=Path, default=None,
                    help="shard folder the (first) model trained on: its GRID clips come from "
                         "that folder's validation clips under the model's own split rule")
    ap.add_argument("--pairing", choices=("matched", "shuffled"), default="matched",
                    help="shuffled: each clip gets another clip's audio (content-blind baseline)")
    ap.add_argument("--injections", default="-8..8", help="a..b or a comma list")
    ap.add_argument("--max-offset", type=int, default=15)
    ap.add_argument("--max-frames", type=int, default=300,
                    help="audit the first N frames of longer clips (0: whole clips)")
    ap.add_argument("--min-confidence", type=float, default=None,
                    help="threshold of the headline tables (default: the audit's)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get(
        "XDG_CACHE_HOME", Path.home() / ".cache")) / "se4lip-bench" / "audit-injected")
    ap.add_argument("--out", type=Path, default=HERE / "audit_injected.json")
    args = ap.parse_args()
    if args.from_json:  # re-summarise saved trials (another threshold), no model runs
        results = json.loads(args.from_json[0].read_text())
        for more in args.from_json[1:]:  # runs over other --groups: their trials join in
            other = json.loads(more.read_text())
            for label, r in other["models"].items():
                results["models"].setdefault(label, {"trials": []})["trials"] += r["trials"]
        if args.min_confidence is not None:
            results["min_confidence"] = args.min_confidence
        summarise_all(results, results["settings"]["sync_tolerance"])
        print(markdown(results))
        return
    if not args.model:
        ap.error("give --model (with its --tracking-uri, or the working folder's store)")
    if args.tracking_uri is None:
        from se4lip_dist.tracking import default_tracking_uri

        args.tracking_uri = [default_tracking_uri()] * len(args.model)
    if len(args.model) != len(args.tracking_uri):
        ap.error("give one --tracking-uri per --model, or none for the working folder's store")
    if ".." in args.injections:
        a, b = (int(x) for x in args.injections.split(".."))
        injections = list(range(a, b + 1))
    else:
        injections = [int(x) for x in args.injections.split(",")]
    settings = AuditSettings(max_offset=args.max_offset, min_confidence=0.0)
    threshold = (AuditSettings().min_confidence if args.min_confidence is None
                 else args.min_confidence)
    models = []
    for uri, tracking in zip(args.model, args.tracking_uri, strict=True):
        model, cfg = load_sync_model(uri, tracking)
        cfg = cfg.override({"face.insightface_root": str(INSIGHTFACE)})
        models.append((f"{pin_model(uri, tracking)['pinned_uri']}", model, cfg))
    cfg0 = models[0][2]
    for _, _, c in models[1:]:
        if c.to_dict()["data"] != cfg0.to_dict()["data"]:
            sys.exit("the models were prepared with different data settings; run them apart")
    detector = build_detector(cfg0.face)
    clips = []
    groups = set(args.groups.split(","))
    pool = heldout_grid(args.heldout, cfg0) if args.heldout else None
    for group, path in pick_clips(args.grid if "grid" in groups else 0, args.grid_skip, pool):
        if group not in groups:
            continue
        try:
            lips, audio = crops(path, cfg0, detector, args.work)
        except RuntimeError as e:  # no face at all: the audit's no_face; counted as such
            print(f"  {path.name}: {e}", file=sys.stderr)
            lips, audio = np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.float32)
        if args.max_frames and len(lips) > args.max_frames:
            spf = cfg0.data.samples_per_frame
            lips, audio = lips[:args.max_frames], audio[:args.max_frames * spf]
        clips.append({"name": path.stem, "group": group, "lips": lips, "audio": audio})
    if args.pairing == "shuffled":
        clips = shuffle_audio(clips)
    results: dict[str, Any] = {"injections": injections, "settings": settings.to_dict(),
                               "pairing": args.pairing, "heldout": str(args.heldout or ""),
                               "max_frames": args.max_frames, "grid": args.grid,
                               "min_confidence": threshold, "grid_skip": args.grid_skip,
                               "models": {}}
    for label, model, cfg in models:
        print(f"{label}: {len(clips)} clips x {len(injections)} injections", file=sys.stderr)
        t0 = time.perf_counter()
        usable = [c for c in clips if len(c["lips"])]
        trials = run_model(model, cfg, usable, injections, settings)
        trials += [{"clip": c["name"], "group": c["group"], "injected": j,
                    "status": UNDECIDABLE, "reason": "no_face", "offset": None,
                    "confidence": None} for c in clips if not len(c["lips"]) for j in injections]
        results["models"][label] = {"seconds": time.perf_counter() - t0, "trials": trials}
    summarise_all(results, settings.sync_tolerance)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))


def summarise_all(results: dict[str, Any], tol: int) -> None:
    """Fill every model's ``summary`` (at ``min_confidence``) and ``sweep`` from its trials."""
    for r in results["models"].values():
        trials = r["trials"]
        groups = {"grid": [t for t in trials if t["group"] == "grid"],
                  "wild+unseen": [t for t in trials if t["group"] != "grid"]}
        groups = {g: ts for g, ts in groups.items() if ts}
        thr0 = results["min_confidence"]
        r["summary"] = {g: summarise(ts, thr0, tol) for g, ts in groups.items()}
        if "grid" in groups:  # the same GRID trials against each clip's own measured base
            r["summary"]["grid, own base"] = summarise(groups["grid"], thr0, tol, False)
        r["sweep"] = {f"{thr:g}": {g: summarise(ts, thr, tol) for g, ts in groups.items()}
                      for thr in THRESHOLDS}


if __name__ == "__main__":
    main()
