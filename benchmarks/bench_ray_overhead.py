"""Ray overhead: a 1-worker TorchTrainer vs a plain single-process PyTorch loop.

Both run :func:`train_steps`: the cpu-small model, the same fixed batches (seeded random waveforms
and lip crops, so no data pipeline is measured), the product's own optimizer step
(``train.TrainRecipe.train_step``), with the same torch thread count; the trainer is the one
``train`` and ``tune`` build (``train.build_trainer``). The plain loop runs before and after the
trainer; the trainer's samples/s is timed inside its worker, so Ray start-up (cluster,
controller, worker group) is left out of the ratio and reported separately.
"""

from __future__ import annotations

import time
from typing import Any

import harness


def train_steps(config: dict[str, Any]) -> dict[str, Any]:
    """``rounds`` timed rounds of ``steps`` training steps; samples/s per round.

    Runs inside a Ray Train worker (``ray.train.get_context`` available) or plainly.
    """
    import torch

    from se4lip_dist.config import Config
    from se4lip_dist.train import TrainRecipe

    t_enter = time.time()
    cfg = Config.from_dict(config["cfg"])
    torch.set_num_threads(config["threads"])
    recipe = TrainRecipe(cfg)
    in_ray = config.get("ray", False)
    if in_ray:
        import ray.train.torch

        recipe.setup(place=ray.train.torch.prepare_model)
    else:
        recipe.setup()
    g = torch.Generator().manual_seed(1)
    b, t, spf = cfg.train.batch_size, cfg.train.window_frames, cfg.data.samples_per_frame
    c = cfg.data.crop_size
    batches = [
        {"wav": torch.rand(b, t * spf, generator=g) * 2 - 1,
         "lips": torch.randint(0, 256, (b, t, c, c, 3), dtype=torch.uint8, generator=g),
         "label": (torch.rand(b, generator=g) > 0.5).float()}
        for _ in range(4)
    ]
    step = recipe.train_step  # the product's optimizer step

    for i in range(3):  # warm-up
        step(batches[i % len(batches)])
    rates, cpu_rates = [], []
    for _ in range(config["rounds"]):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(config["steps"]):
            step(batches[i % len(batches)])
        rates.append(config["steps"] * b / (time.perf_counter() - t0))
        # Per process CPU second: includes Ray's own threads in the worker process.
        cpu_rates.append(config["steps"] * b / (time.process_time() - c0))
    out = {"rates": rates, "cpu_rates": cpu_rates, "threads": torch.get_num_threads(),
           "t_enter": t_enter, "peak_rss_mib": round(harness_peak_rss() / 2**20, 1)}
    if in_ray:
        import ray.train

        ray.train.report({"done": 1})
    return out


def harness_peak_rss() -> int:
    """Peak RSS of this process (inlined so Ray workers need not import ``harness``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(quick: bool) -> dict[str, Any]:
    """Median samples/s of the plain loop and of the TorchTrainer worker, and their ratio."""
    import tempfile

    import ray

    from se4lip_dist.config import load_config
    from se4lip_dist.resources import Resources
    from se4lip_dist.train import build_trainer

    cfg = load_config("cpu-small")
    steps, rounds = (3, 1) if quick else (15, 3)
    # A 0.5-CPU Ray worker gets OMP_NUM_THREADS=1, so the plain loop uses 1 thread as well.
    base = {"cfg": cfg.to_dict(), "threads": 1, "steps": steps, "rounds": rounds}
    before = train_steps(base)
    with harness.Timer() as t_init:
        harness.start_ray()
    try:
        t_fit0 = time.time()
        trainer = build_trainer(
            cfg, "", Resources(0.0, 0.5, 0, 1, 1), name="bench-ray-overhead",
            storage_path=tempfile.mkdtemp(prefix="se4lip-bench-ray-"), datasets={},
            loop=train_steps, extra_config={**base, "ray": True})
        with harness.Timer() as t_fit:
            res = trainer.fit()
        if res.error is not None:
            raise res.error
        worker = res.return_value
    finally:
        ray.shutdown()
    after = train_steps(base)
    plain = harness.median(before["rates"] + after["rates"])
    in_ray = harness.median(worker["rates"])
    plain_cpu = harness.median(before["cpu_rates"] + after["cpu_rates"])
    ray_cpu = harness.median(worker["cpu_rates"])
    metrics = {
        "steps_per_round": steps, "rounds": rounds, "batch": cfg.train.batch_size,
        "plain_samples_per_s": [round(x, 1) for x in before["rates"] + after["rates"]],
        "ray_samples_per_s": [round(x, 1) for x in worker["rates"]],
        "plain_samples_per_cpu_s": [round(x, 1) for x in before["cpu_rates"] + after["cpu_rates"]],
        "ray_samples_per_cpu_s": [round(x, 1) for x in worker["cpu_rates"]],
        "threads": {"plain": 1, "ray_worker": worker["threads"]},
        "ray_init_s": round(t_init.s, 2),
        "trainer_startup_s": round(worker["t_enter"] - t_fit0, 2),
        "trainer_fit_s": round(t_fit.s, 2),
        "train_worker_peak_rss_mib": worker["peak_rss_mib"],
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    ratios = [
        harness.ratio(
            "ray overhead: TorchTrainer(1 worker) / plain loop samples/s", in_ray / plain, 0.9,
            f"{in_ray:.0f} vs {plain:.0f} samples/s; start-up {metrics['ray_init_s']:.0f} s "
            f"init + {metrics['trainer_startup_s']:.0f} s to first step (excluded)",
            bound="plain single-process PyTorch loop, same model, batches and threads"),
        harness.ratio(
            "ray overhead: same, per process CPU second", ray_cpu / plain_cpu, 0.9,
            f"{ray_cpu:.0f} vs {plain_cpu:.0f} samples per CPU s (load-independent)",
            bound="plain loop samples per CPU s"),
    ]
    inputs = {"data": "fixed seeded batches (no data pipeline, by design)",
              "batch": cfg.train.batch_size, "steps_per_round": steps, "rounds": rounds}
    return harness.result("ray_overhead", metrics, ratios, inputs=inputs)


if __name__ == "__main__":
    harness.main(run)
