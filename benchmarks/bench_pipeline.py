"""Input pipeline: training windows/s from the Ray Data stream vs a plain torch DataLoader.

Both sides read the same shards and run the same per-batch work, ``stream.make_pair_batch``
(split filter, pair sampling, JPEG decode of the frames the pairs use), 16 shard rows per call:

- Ray: ``stream.pair_dataset(...).iter_torch_batches(...)`` exactly as ``train.py`` iterates it
  (batch 32, prefetch 2, no local shuffle buffer); and the same with the 256-row local shuffle
  buffer that was the default before this benchmark measured its cost.
- DataLoader: ``num_workers=2``; each worker reads its share of the Parquet files with pyarrow
  and yields ``make_pair_batch`` blocks; the loop re-batches them to 32 (shuffling each block).

Then both feed a cpu-small training step (1 torch thread, like a 0.5-CPU Ray Train worker) and we
report the fraction of step time spent waiting for data.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

import harness
import numpy as np

BATCH = 32
ROWS_PER_TASK = 16
N_ROWS = 320
"""GRID rows (clips) per epoch: ~4.6k windows, a few seconds per side on 2 cores."""


class ShardPairs:
    """``torch.utils.data.IterableDataset`` body: pair blocks from this worker's Parquet files."""

    def __init__(self, paths: list[str], spec: Any, rule: Any) -> None:
        self.paths = paths
        self.spec = spec
        self.rule = rule

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq
        import torch.utils.data

        from se4lip_dist.stream import READ_COLUMNS, make_pair_batch

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng()
        paths = list(self.paths)
        rng.shuffle(paths)  # same as Ray's shuffle="files" for training
        for path in paths[wid::nw]:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_TASK,
                                                        columns=READ_COLUMNS):
                batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
                out = make_pair_batch(batch, spec=self.spec, rule=self.rule, role="train")
                if len(out["label"]):
                    yield out


def _torch_dataset(paths: list[str], spec: Any, rule: Any) -> Any:
    import torch.utils.data

    class _DS(ShardPairs, torch.utils.data.IterableDataset):
        pass

    return _DS(paths, spec, rule)


def dataloader_batches(paths: list[str], cfg: Any) -> Iterator[dict[str, Any]]:
    """Batches of ``BATCH`` pairs from a 2-worker DataLoader (drop_last, block-shuffled)."""
    import torch
    import torch.utils.data

    from se4lip_dist.splits import SplitRule
    from se4lip_dist.stream import PairSpec

    rule = SplitRule(cfg.train.split, cfg.train.val_fraction)  # the benchmark data: clip split
    loader = torch.utils.data.DataLoader(
        _torch_dataset(paths, PairSpec.from_config(cfg), rule),
        batch_size=None, num_workers=2, prefetch_factor=2)
    carry: dict[str, torch.Tensor] | None = None
    for block in loader:
        if carry is not None:
            block = {k: torch.cat([carry[k], block[k]]) for k in block}
        perm = torch.randperm(len(block["label"]))
        block = {k: v[perm] for k, v in block.items()}
        n = len(block["label"]) // BATCH * BATCH
        for i in range(0, n, BATCH):
            yield {k: v[i:i + BATCH] for k, v in block.items()}
        carry = {k: v[n:] for k, v in block.items()}


def ray_batches(data_dir: str, cfg: Any, shuffle_buffer: int | None = None
                ) -> Iterator[dict[str, Any]]:
    """Batches of ``BATCH`` pairs from the Ray Data stream, iterated as ``train.py`` does.

    ``shuffle_buffer`` overrides ``train.shuffle_buffer`` (256 was the default before the
    measurements below turned it off).
    """
    from se4lip_dist.stream import pair_dataset

    buf = cfg.train.shuffle_buffer if shuffle_buffer is None else shuffle_buffer
    ds = pair_dataset(data_dir, cfg, rows_per_task=ROWS_PER_TASK)
    yield from ds.iter_torch_batches(batch_size=BATCH, drop_last=True,
                                     local_shuffle_buffer_size=buf or None, prefetch_batches=2)


def _drain(batches: Iterator[dict[str, Any]]) -> tuple[int, float, float]:
    """Windows delivered, seconds for the epoch (first batch included), seconds to the first
    batch. ``n / (s - first)`` is the steady-state rate once the stream is running."""
    t0 = time.perf_counter()
    n = 0
    first = 0.0
    for b in batches:
        n += len(b["label"])
        first = first or time.perf_counter() - t0
    return n, time.perf_counter() - t0, first


def _train(batches: Iterator[dict[str, Any]], cfg: Any, steps: int) -> dict[str, float]:
    """``steps`` cpu-small training steps; wall time and time spent waiting for the next batch."""
    import torch

    from se4lip_dist.losses import sync_bce_loss
    from se4lip_dist.models import build_model, lip_input

    torch.manual_seed(0)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    wait = 0.0
    done = seen = 0
    t_start = time.perf_counter()
    it = iter(batches)
    while done < steps:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        a, v = model(batch["wav"], lip_input(batch["lips"], cfg.model))
        loss = sync_bce_loss(a, v, batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        seen += len(batch["label"])
    total = time.perf_counter() - t_start
    return {"steps": done, "samples_per_s": seen / total, "data_wait_fraction": wait / total}


def run(quick: bool) -> dict[str, Any]:
    """Windows/s of both pipelines (paired, interleaved repeats) and train-step data wait."""
    import torch

    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import Manifest

    cfg = load_config("cpu-small")
    tmp = tempfile.mkdtemp(prefix="se4lip-bench-pipe-")
    real = harness.grid_available() and not quick
    data = (harness.grid_subset(tmp, N_ROWS) if real
            else harness.synthetic_shards(tmp, n_clips=8, n_frames=60))
    paths = Manifest.load(data).shard_paths(data)
    reps, steps = (1, 3) if quick else (4, 20)
    torch.set_num_threads(1)
    import ray

    sides = {
        "ray": lambda: ray_batches(str(data), cfg),
        "ray_shuffle256": lambda: ray_batches(str(data), cfg, shuffle_buffer=256),
        "dataloader": lambda: dataloader_batches(paths, cfg),
    }
    with harness.Timer() as t_init:
        harness.start_ray()
    try:
        rates: dict[str, list[float]] = {k: [] for k in sides}
        steady: dict[str, list[float]] = {k: [] for k in sides}
        firsts: dict[str, list[float]] = {k: [] for k in sides}
        windows = 0
        for make in sides.values():  # warm-up: worker processes, imports, fork, page cache
            _drain(make())
        for _ in range(reps):
            for k, make in sides.items():
                n, s, f = _drain(make())
                rates[k].append(n / s)
                steady[k].append(n / max(s - f, 1e-9))
                firsts[k].append(round(f, 2))
                windows = max(windows, n)
        train_ray = _train(ray_batches(str(data), cfg), cfg, steps)
        train_dl = _train(dataloader_batches(paths, cfg), cfg, steps)
    finally:
        ray.shutdown()
    # Paired ratios: each repeat's sides ran back to back, so they saw the same machine load.
    paired = {k: [r / d for r, d in zip(rates[k], rates["dataloader"], strict=True)]
              for k in ("ray", "ray_shuffle256")}
    paired_steady = [r / d for r, d in zip(steady["ray"], steady["dataloader"], strict=True)]
    med = {k: harness.median(v) for k, v in rates.items()}
    metrics = {
        "data": "grid" if real else "synthetic", "shards": len(paths), "rows": N_ROWS,
        "windows_per_epoch": windows, "ray_init_s": round(t_init.s, 2),
        "windows_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "steady_windows_per_s": {k: [round(x, 1) for x in v] for k, v in steady.items()},
        "paired_ratios": {k: [round(x, 3) for x in v] for k, v in paired.items()},
        "paired_steady_ratio_ray": [round(x, 3) for x in paired_steady],
        "seconds_to_first_batch": firsts,
        "train_ray": {k: round(v, 3) for k, v in train_ray.items()},
        "train_dataloader": {k: round(v, 3) for k, v in train_dl.items()},
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    ratios = [
        harness.ratio("pipeline: Ray Data / DataLoader(2 workers) windows/s",
                      harness.median(paired["ray"]), 1.5,
                      f"median of {reps} paired repeats {_fmt(paired['ray'])}; "
                      f"{med['ray']:.0f} vs {med['dataloader']:.0f} windows/s; first batch after "
                      f"{harness.median(firsts['ray']):.1f} vs "
                      f"{harness.median(firsts['dataloader']):.1f} s"),
        harness.ratio("pipeline, before (local shuffle buffer 256): Ray Data / DataLoader",
                      harness.median(paired["ray_shuffle256"]), 1.5,
                      f"paired repeats {_fmt(paired['ray_shuffle256'])}; "
                      f"{med['ray_shuffle256']:.0f} windows/s"),
        harness.ratio("pipeline, steady state (after the first batch): Ray Data / DataLoader",
                      harness.median(paired_steady), 1.5,
                      f"paired repeats {_fmt(paired_steady)}"),
        harness.ratio("pipeline: data-wait fraction of a cpu-small step (Ray)",
                      train_ray["data_wait_fraction"], None,
                      f"DataLoader {train_dl['data_wait_fraction']:.2f}; samples/s with "
                      f"training {train_ray['samples_per_s']:.0f} vs "
                      f"{train_dl['samples_per_s']:.0f}", unit=""),
    ]
    return harness.result("pipeline", metrics, ratios)


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    harness.main(run)
