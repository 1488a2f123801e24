"""Memory: peak RSS/PSS per training worker and per extraction actor; shard bytes per minute.

- Training worker: a short real ``train.run_train`` (cpu-small, 2 workers x 0.5 CPU, Ray Data
  stream from ``harness.grid_shards(N_CLIPS)``, MLflow on sqlite in a temp folder); its
  ``data_wait_fraction`` is the data-wait fraction of real training steps.
- Extraction actor: ``extract.run_extract`` with a cpu-small encoder (random weights, saved as a
  local model folder) over GRID clips.
- Worker processes are found by the titles Ray gives them (``ray::RayTrainWorker``,
  ``...EncoderActor...``) among this process's descendants only, and sampled from
  ``/proc/PID/smaps_rollup`` every 0.25 s (PSS splits shared pages between processes; RSS
  counts the torch/CUDA libraries in full in every process).
- Shard bytes per minute of video come from the manifest of that same prepared subset (the
  product's own ``prepare`` on the shared GRID clips). Without the shared data every row runs on
  synthetic shards and says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import harness

N_CLIPS = 96
"""GRID clips (= shard rows) of the prepared subset the training run reads."""


def shard_bytes_per_minute(data_dir: str | Path) -> dict[str, Any]:
    """Bytes of shards per minute of 25 fps video, from a prepared folder's manifest."""
    from se4lip_dist.manifest import Manifest

    m = Manifest.load(data_dir)
    frames, total = m.total_frames, m.total_bytes
    minutes = frames / m.config["data"]["fps"] / 60
    return {"clips": m.total_clips, "frames": frames, "bytes": total,
            "video_minutes": round(minutes, 2), "mib_per_video_minute":
            round(total / minutes / 2**20, 2)}


def _model_folder(cfg: Any, out: Path) -> str:
    import torch

    from se4lip_dist.models import build_model
    from se4lip_dist.registry import CONFIG_FILE, WEIGHTS_FILE

    out.mkdir(parents=True, exist_ok=True)
    enc = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                      window_frames=cfg.train.window_frames).speech
    torch.save(enc.state_dict(), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(cfg.to_yaml())
    return str(out)


def run(quick: bool) -> dict[str, Any]:
    """Peak memory per training worker and per extraction actor, and shard density."""
    import ray

    from se4lip_dist.config import load_config
    from se4lip_dist.extract import run_extract
    from se4lip_dist.runtime import set_log_to_driver
    from se4lip_dist.synthetic import make_synthetic_clip
    from se4lip_dist.train import run_train

    tmp = Path(tempfile.mkdtemp(prefix="se4lip-bench-mem-"))
    why = "--quick" if quick else harness.missing_reason()
    data = (harness.grid_shards(N_CLIPS) if not why
            else harness.synthetic_shards(tmp / "shards", n_clips=8, n_frames=60))
    label = "" if not why else f" [synthetic inputs: {why}]"
    steps = 4 if quick else 40
    cfg = load_config("cpu-small", overrides=[f"train.max_steps={steps}", "train.epochs=1"])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    videos = harness.grid_videos(2 if quick else 8)
    if not videos:
        make_synthetic_clip(tmp / "clip.mp4", seconds=2.0)
        videos = [str(tmp / "clip.mp4")]
    set_log_to_driver(False)
    sampler = harness.ProcSampler({"train_worker": "RayTrainWorker",
                                   "extract_actor": "EncoderActor"})
    with harness.Timer() as t_init:
        harness.start_ray()
    sampler.start()
    try:
        with harness.Timer() as t_train:
            tr = run_train(cfg, str(data), tracking_uri=uri, experiment="bench",
                           storage_path=str(tmp / "ray"), max_failures=0)
        with harness.Timer() as t_ext:
            ex = run_extract(videos, _model_folder(cfg, tmp / "model"), tmp / "feats",
                             tracking_uri=uri, fmt="frame")
    finally:
        mem = sampler.stop()
        ray.shutdown()
    density = shard_bytes_per_minute(data)
    metrics = {
        "train_worker": mem["train_worker"], "extract_actor": mem["extract_actor"],
        "driver_peak_rss_mib": round(harness.peak_rss_self() / 2**20, 1),
        "train": {"steps": tr["steps"], "samples_per_s": tr["last"]["perf/samples_per_s"],
                  "data_wait_fraction": tr["last"]["perf/data_wait_fraction"],
                  "wall_s": round(t_train.s, 1)},
        "extract": {"inputs": ex.extracted, "failed": len(ex.failures),
                    "real_time_factor": round(ex.real_time_factor, 2),
                    "wall_s": round(t_ext.s, 1)},
        "shards": density, "ray_init_s": round(t_init.s, 2),
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    tw, ea = mem["train_worker"], mem["extract_actor"]
    ratios = [
        harness.ratio("memory: peak PSS per training worker", tw["peak_pss_mib"], None,
                      f"RSS {tw['peak_rss_mib']:.0f} MiB; {tw['processes']} workers{label}",
                      unit=" MiB", bound="absolute (machine memory / workers per node)"),
        harness.ratio("memory: peak PSS per extraction actor", ea["peak_pss_mib"], None,
                      f"RSS {ea['peak_rss_mib']:.0f} MiB; {ea['processes']} actors{label}",
                      unit=" MiB", bound="absolute (machine memory / actors per node)"),
        harness.ratio("memory: shard MiB per minute of video", density["mib_per_video_minute"],
                      None, f"{density['clips']} clips, {density['frames']} frames{label}",
                      unit=" MiB", bound="absolute (JPEG crops + int16 audio)"),
        harness.ratio("train: data-wait fraction in run_train (2 workers)",
                      float(tr["last"]["perf/data_wait_fraction"] or 0.0), None,
                      f"{tr['last']['perf/samples_per_s']:.0f} samples/s over {tr['steps']} "
                      f"steps{label}", unit="", bound="0 (the step never waits for data)"),
    ]
    sizes = harness.shard_sizes(data)
    inputs = {"data": "synthetic" if why else "grid", "why_synthetic": why or None,
              "clips": sizes["clips"], "rows": sizes["rows"], "frames": sizes["frames"],
              "shards": sizes["shards"], "train_steps": steps, "extract_videos": len(videos)}
    return harness.result("memory", metrics, ratios, inputs=inputs)


if __name__ == "__main__":
    harness.main(run)
