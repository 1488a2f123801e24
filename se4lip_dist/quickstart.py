"""``se4lip-dist quickstart``: the whole flow on one machine in a few minutes.

prepare -> a 2-trial tune -> registered champion -> extract -> evaluate, on a local Ray and the
embedded sqlite MLflow store. With no video folder it writes synthetic talking-mouth clips
(known sync) so nothing has to be downloaded. It ends with the exact commands that find what it
made (the store and the model are its own, under its work folder).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from se4lip_dist.config import Config, load_config
from se4lip_dist.evaluate import run_evaluate
from se4lip_dist.extract import run_extract
from se4lip_dist.prepare import run_prepare
from se4lip_dist.storage import redact_uri
from se4lip_dist.synthetic import make_synthetic_clip
from se4lip_dist.tracking import default_tracking_uri
from se4lip_dist.tuning import TuneOptions, run_tune

if TYPE_CHECKING:
    from se4lip_dist.tuning import TrialRow

N_SYNTHETIC = 32
N_HELDOUT = 4
SYNTHETIC_SECONDS = 4.0
SHIFTS = (-3, 0, 3)
"""Audio shifts the final evaluate applies: only an encoder that follows the audio finds all
three (a constant answer finds at most one)."""
"""Audio delay (frames) that the last step asks the registered encoder to recover."""
EPOCHS = 4
MODEL_NAME = "se4lip-quickstart"
# Small enough for 2 CPU cores: two trials of a few hundred steps each.
TINY = [
    "model.embed_dim=64",
    "model.lip_channels=[16,24,32,48,64]",
    "model.cnn_channels=[16,24,32,64]",
    f"train.epochs={EPOCHS}",
    "train.pairs_per_segment=64",
    "train.batch_size=16",
    # About 11 held-out clips: enough units for the gate (train.val_min_units) to decide.
    "train.val_fraction=0.35",
]
SPACE = {
    "description": "quickstart: 2 trials over the GRU depth",
    "preset": "cpu-small",
    "metric": "val/shift_acc",
    "mode": "max",
    "num_samples": 1,
    "scheduler": "fifo",
    "params": {"model.gru_layers": {"grid": [1, 2]}, "train.lr": 2.0e-3},
}


class QuickstartError(RuntimeError):
    """A quickstart step failed; the message names the step."""


class Reporter(Protocol):
    """What the quickstart tells its caller while it runs (the CLI draws it with rich)."""

    def step(self, title: str) -> None:
        """A step starts."""

    def items(self, total: int) -> None:
        """The current step works through ``total`` items (clips or inputs)."""

    def advance(self) -> None:
        """One item of the current step is done."""

    def trials(self, rows: list[TrialRow]) -> None:
        """The tune's trials changed (status, epoch, metrics)."""

    def note(self, text: str) -> None:
        """One line of outcome of the step that just ended."""


class _Silent:
    """A :class:`Reporter` that says nothing."""

    def step(self, title: str) -> None:
        """Ignored."""

    def items(self, total: int) -> None:
        """Ignored."""

    def advance(self) -> None:
        """Ignored."""

    def trials(self, rows: list[TrialRow]) -> None:
        """Ignored."""

    def note(self, text: str) -> None:
        """Ignored."""


def run_quickstart(
    video_dir: str | Path | None,
    workdir: str | Path,
    *,
    insightface_root: str | None = None,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the whole flow; returns where everything went and the headline numbers.

    Args:
        video_dir: folder of talking-head videos; None writes synthetic clips.
        workdir: output folder (shards, Ray results, features, plots); reruns resume.
        insightface_root: model root for real videos (synthetic clips use a fixed mouth box).
        tracking_uri: MLflow URI; default: ``<workdir>/se4lip-runs/mlflow.db``.
        reporter: told about steps, progress and trials as they happen.
    """
    report: Reporter = reporter or _Silent()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(work)
    synthetic = video_dir is None
    videos_dir = _videos(video_dir, work, report)
    face = ["face.backend=none"] if synthetic else (
        [f"face.insightface_root={insightface_root}"] if insightface_root else [])
    cfg = load_config("cpu-small", overrides=[*face, *TINY])
    shards = _prepare(videos_dir, work, cfg, synthetic, report)
    overrides = [o for o in [*face, *TINY] if not o.startswith("face.")]
    tuned = _tune(shards, work, uri, overrides, report)
    reg = tuned["registered"]
    model_uri = reg["model_uri"]
    clips, features = _extract(videos_dir, work, uri, model_uri, synthetic, report)

    shown = ", ".join(f"{k:+d}" if k else "0" for k in SHIFTS)
    report.step(f"5/5 evaluate: does the encoder follow audio shifts of {shown} frames?")
    evaluated = run_evaluate(
        clips, model_uri, tracking_uri=uri, shift=SHIFTS, plot_dir=work / "plots",
        face_backend="none" if synthetic else None, insightface_root=insightface_root,
    )
    report.note(f"found the applied shift at all of {shown} on {evaluated['consistent']}/"
                f"{evaluated['evaluated']} held-out clips (a constant answer: 0)")
    return {
        "shards": str(shards),
        "model_uri": model_uri,
        "alias": reg["alias"],
        "reason": reg["reason"],
        "best": tuned["best"],
        "features": str(features),
        "shift_acc": evaluated["shift_acc"],
        "consistent": evaluated["consistent"],
        "evaluated": evaluated["evaluated"],
        "model_name": reg["name"],
        "heldout": clips,
        "evaluate_flags": ["--face-backend", "none"] if synthetic else (
            ["--insightface-root", insightface_root] if insightface_root else []),
        "tracking_uri": redact_uri(uri if "://" in uri else default_tracking_uri(work)),
    }


def _videos(video_dir: str | Path | None, work: Path, report: Reporter) -> Path:
    """Step 1: the folder of videos, synthetic clips written into ``work`` when none is given."""
    if video_dir is None:
        report.step(f"1/5 writing {N_SYNTHETIC} synthetic talking-mouth clips")
        videos_dir = work / "videos"
        _synthetic_clips(videos_dir, N_SYNTHETIC, 0, report)
        report.note(f"{N_SYNTHETIC} clips of {SYNTHETIC_SECONDS:g} s in {videos_dir}")
        return videos_dir
    videos_dir = Path(video_dir)
    if not videos_dir.is_dir():
        raise QuickstartError(f"{videos_dir}: not a folder of videos")
    return videos_dir


def _prepare(videos_dir: Path, work: Path, cfg: Config, synthetic: bool,
             report: Reporter) -> Path:
    """Step 2: the videos prepared into ``work/shards``."""
    report.step("2/5 prepare: videos -> lip crops + audio -> Parquet shards")
    shards = work / "shards"
    summary = run_prepare([str(videos_dir)], shards, cfg, workers=0 if synthetic else None,
                          on_start=report.items, on_result=lambda _res: report.advance())
    if summary.total_clips < 4:
        raise QuickstartError(f"prepare: only {summary.total_clips} usable clips in {videos_dir} "
                              f"({len(summary.failures)} failed; see {shards}/failures.jsonl)")
    failed = f", {len(summary.failures)} failed" if summary.failures else ""
    report.note(f"{summary.total_clips} clips, {summary.total_frames:,} frames{failed} "
                f"-> {shards}")
    return shards


def _tune(shards: Path, work: Path, uri: str, overrides: list[str],
          report: Reporter) -> dict[str, Any]:
    """Step 3: a 2-trial tune whose best encoder is registered; the tune's result."""
    report.step("3/5 tune: 2 trials on Ray Train workers, best encoder registered in MLflow")
    space = work / "quickstart-space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    tuned = run_tune(str(space), str(shards), TuneOptions(
        register=MODEL_NAME, tracking_uri=uri, experiment=MODEL_NAME,
        name="quickstart", storage_path=str(work / "ray"), overrides=tuple(overrides),
        resume=(work / "ray" / "quickstart").exists(),
    ), on_update=report.trials)
    reg = tuned["registered"]
    metric = tuned["metric"]
    for row in tuned["trials"]:
        params = " ".join(f"{k.split('.')[-1]}={v}" for k, v in row["params"].items())
        report.note(f"{row['trial']} {params}: {metric} {_num(row.get(metric))} at its best "
                    f"epoch ({row.get('best_epoch')} of {row.get('epoch')})")
    report.note(f"registered {reg['name']} v{reg['version']} as {reg['alias']}")
    return tuned


def _extract(videos_dir: Path, work: Path, uri: str, model_uri: str, synthetic: bool,
             report: Reporter) -> tuple[list[str], Path]:
    """Step 4: features of the held-out clips (synthetic ones written now); the clips and the
    features folder."""
    report.step("4/5 extract: per-frame speech features for renderers (Ray Data batch job)")
    if synthetic:
        # Clips the encoder never saw, with seeds after the training clips'.
        _synthetic_clips(work / "heldout", N_HELDOUT, 10_000, report)
        clips = [str(work / "heldout")]
    else:
        clips = [str(videos_dir)]
    features = work / "features"
    ext = run_extract(clips, model_uri, features, tracking_uri=uri, concurrency=1,
                      on_start=report.items, on_result=lambda _row: report.advance())
    if ext.exit_code:
        raise QuickstartError(f"extract failed for {len(ext.failures)} input(s): {ext.failures}")
    report.note(f"{ext.extracted + ext.skipped} inputs, {ext.frames:,} frames -> {features}")
    return clips, features


def _synthetic_clips(out_dir: Path, n: int, seed: int, report: Reporter) -> list[Path]:
    """``syn_00000.mp4``... with seeds ``seed + i`` (as ``make_synthetic_dataset`` names them);
    clips already there are kept, so a rerun writes nothing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.items(n)
    paths = []
    for i in range(n):
        path = out_dir / f"syn_{i:05d}.mp4"
        if not path.is_file():
            make_synthetic_clip(path, SYNTHETIC_SECONDS, seed=seed + i)
        paths.append(path)
        report.advance()
    return paths


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def follow_up_commands(result: dict[str, Any], exe: str = "se4lip-dist") -> list[str]:
    """The commands that find what a quickstart made, each runnable as printed (paths quoted
    for a POSIX shell): list the store's models, show the quickstart's model, evaluate it."""
    uri = ["--tracking-uri", result["tracking_uri"]]

    def line(*args: str) -> str:
        return shlex.join([exe, *args])

    evaluate: Sequence[str] = ["evaluate", *result["heldout"], "--model", result["model_uri"],
                               *uri, *result["evaluate_flags"],
                               *[a for k in SHIFTS for a in ("--shift", str(k))]]
    return [
        line("models", "list", *uri),
        line("models", "show", result["model_name"], *uri),
        line(*evaluate),
    ]


__all__ = ["EPOCHS", "MODEL_NAME", "QuickstartError", "Reporter", "follow_up_commands",
           "run_quickstart"]
