"""``se4lip-dist quickstart``: the whole flow on one machine in a few minutes.

prepare -> a 2-trial tune -> registered champion -> extract -> evaluate, on a local Ray and the
embedded sqlite MLflow store. With no video folder it writes synthetic talking-mouth clips
(known sync) so nothing has to be downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

N_SYNTHETIC = 24
SYNTHETIC_SECONDS = 4.0
# Small enough for 2 CPU cores: two trials of a few hundred steps each.
TINY = [
    "model.embed_dim=64",
    "model.lip_channels=[16,24,32,48,64]",
    "model.cnn_channels=[16,24,32,64]",
    "train.epochs=4",
    "train.pairs_per_segment=64",
    "train.batch_size=16",
    "train.val_fraction=0.25",
]
SPACE = {
    "description": "quickstart: 2 trials over the GRU depth",
    "preset": "cpu-small",
    "metric": "val/offset_acc",
    "mode": "max",
    "num_samples": 1,
    "scheduler": "fifo",
    "params": {"model.gru_layers": {"grid": [1, 2]}, "train.lr": 2.0e-3},
}


class QuickstartError(RuntimeError):
    """A quickstart step failed; the message names the step."""


def run_quickstart(
    video_dir: str | Path | None,
    workdir: str | Path,
    *,
    insightface_root: str | None = None,
    tracking_uri: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole flow; returns where everything went and the headline numbers.

    Args:
        video_dir: folder of talking-head videos; None writes synthetic clips.
        workdir: output folder (shards, Ray results, features, plots); reruns resume.
        insightface_root: model root for real videos (synthetic clips use a fixed mouth box).
        tracking_uri: MLflow URI; default: ``<workdir>/se4lip-runs/mlflow.db``.
        on_step: called with a title before each step.
    """
    from se4lip_dist.config import load_config
    from se4lip_dist.evaluate import run_evaluate
    from se4lip_dist.extract import run_extract
    from se4lip_dist.prepare import run_prepare
    from se4lip_dist.synthetic import make_synthetic_dataset
    from se4lip_dist.tracking import default_tracking_uri, redact_uri
    from se4lip_dist.tuning import TuneOptions, run_tune

    step = on_step or (lambda _title: None)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(work)
    synthetic = video_dir is None
    if synthetic:
        step(f"1/5 writing {N_SYNTHETIC} synthetic talking-mouth clips")
        videos_dir = work / "videos"
        videos = sorted(videos_dir.glob("syn_*.mp4"))
        if len(videos) < N_SYNTHETIC:
            videos = make_synthetic_dataset(videos_dir, N_SYNTHETIC, SYNTHETIC_SECONDS)
    else:
        videos_dir = Path(video_dir)
        if not videos_dir.is_dir():
            raise QuickstartError(f"{videos_dir}: not a folder of videos")
        videos = []
    face = ["face.backend=none"] if synthetic else (
        [f"face.insightface_root={insightface_root}"] if insightface_root else [])
    cfg = load_config("cpu-small", overrides=[*face, *TINY])

    step("2/5 prepare: videos -> lip crops + audio -> Parquet shards")
    shards = work / "shards"
    summary = run_prepare([str(videos_dir)], shards, cfg, workers=0 if synthetic else None)
    if summary.total_clips < 4:
        raise QuickstartError(f"prepare: only {summary.total_clips} usable clips in {videos_dir} "
                              f"({len(summary.failures)} failed; see {shards}/failures.jsonl)")

    step("3/5 tune: 2 trials on Ray Train workers, best encoder registered in MLflow")
    space = work / "quickstart-space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    overrides = [o for o in [*face, *TINY] if not o.startswith("face.")]
    tuned = run_tune(str(space), str(shards), TuneOptions(
        register="se4lip-quickstart", tracking_uri=uri, experiment="se4lip-quickstart",
        name="quickstart", storage_path=str(work / "ray"), overrides=tuple(overrides),
        resume=(work / "ray" / "quickstart").exists(),
    ))
    reg = tuned["registered"]
    model_uri = reg["model_uri"]

    step("4/5 extract: per-frame speech features for renderers (Ray Data batch job)")
    if synthetic:
        # Clips the encoder never saw, with seeds after the training clips'.
        held = sorted((work / "heldout").glob("syn_*.mp4")) or make_synthetic_dataset(
            work / "heldout", 4, SYNTHETIC_SECONDS, seed=10_000)
        clips = [str(v) for v in held]
    else:
        clips = [str(videos_dir)]
    features = work / "features"
    ext = run_extract(clips, model_uri, features, tracking_uri=uri, concurrency=1)
    if ext.exit_code:
        raise QuickstartError(f"extract failed for {len(ext.failures)} input(s): {ext.failures}")

    step("5/5 evaluate: recover a known 3-frame audio delay with the registered encoder")
    evaluated = run_evaluate(
        clips, model_uri, tracking_uri=uri, shift=3, plot_dir=work / "plots",
        face_backend="none" if synthetic else None, insightface_root=insightface_root,
    )
    return {
        "shards": str(shards),
        "model_uri": model_uri,
        "alias": reg["alias"],
        "reason": reg["reason"],
        "best": tuned["best"],
        "features": str(features),
        "offset_accuracy": evaluated["offset_accuracy"],
        "hits": evaluated["hits"],
        "evaluated": evaluated["evaluated"],
        "model_name": reg["name"],
        "heldout": " ".join(clips),
        "evaluate_flags": "--face-backend none" if synthetic else (
            f"--insightface-root {insightface_root}" if insightface_root else ""),
        "tracking_uri": redact_uri(uri if "://" in uri else default_tracking_uri(work)),
    }
