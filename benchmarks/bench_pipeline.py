"""Input pipeline: training windows/s from the Ray Data stream vs a plain torch DataLoader.

Both sides read the same shards and run the same per-batch work, ``stream.make_pair_batch``
(split filter, pair sampling, JPEG decode of the frames the pairs use), 16 shard rows per call:

- Ray: ``stream.pair_dataset(...).iter_torch_batches(...)`` exactly as ``train.py`` iterates it
  (batch 32, local shuffle buffer 256, prefetch 2).
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


class ShardPairs:
    """``torch.utils.data.IterableDataset`` body: pair blocks from this worker's Parquet files."""

    def __init__(self, paths: list[str], spec: Any, val_fraction: float) -> None:
        self.paths = paths
        self.spec = spec
        self.val_fraction = val_fraction

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
                out = make_pair_batch(batch, spec=self.spec, split="train",
                                      val_fraction=self.val_fraction)
                if len(out["label"]):
                    yield out


def _torch_dataset(paths: list[str], spec: Any, val_fraction: float) -> Any:
    import torch.utils.data

    class _DS(ShardPairs, torch.utils.data.IterableDataset):
        pass

    return _DS(paths, spec, val_fraction)


def dataloader_batches(paths: list[str], cfg: Any) -> Iterator[dict[str, Any]]:
    """Batches of ``BATCH`` pairs from a 2-worker DataLoader (drop_last, block-shuffled)."""
    import torch
    import torch.utils.data

    from se4lip_dist.stream import PairSpec

    loader = torch.utils.data.DataLoader(
        _torch_dataset(paths, PairSpec.from_config(cfg), cfg.train.val_fraction),
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


def ray_batches(data_dir: str, cfg: Any) -> Iterator[dict[str, Any]]:
    """Batches of ``BATCH`` pairs from the Ray Data stream, iterated as ``train.py`` does."""
    from se4lip_dist.stream import pair_dataset

    ds = pair_dataset(data_dir, cfg, "train", rows_per_task=ROWS_PER_TASK)
    yield from ds.iter_torch_batches(batch_size=BATCH, drop_last=True,
                                     local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                                     prefetch_batches=2)


def ray_batches_v2(data_dir: str, cfg: Any) -> Iterator[dict[str, Any]]:
    """The stream as it was before ``read_shards`` pinned Ray's Parquet V1 reader (baseline)."""
    import ray.data

    from se4lip_dist.manifest import Manifest
    from se4lip_dist.stream import READ_COLUMNS, PairSpec, make_pair_batch

    paths = Manifest.load(data_dir).shard_paths(data_dir)
    ds = ray.data.read_parquet(paths, columns=READ_COLUMNS, shuffle="files", num_cpus=0.25)
    ds = ds.map_batches(make_pair_batch, fn_kwargs={
        "spec": PairSpec.from_config(cfg), "split": "train",
        "val_fraction": cfg.train.val_fraction}, batch_size=ROWS_PER_TASK,
        batch_format="numpy", num_cpus=0.5)
    yield from ds.iter_torch_batches(batch_size=BATCH, drop_last=True,
                                     local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                                     prefetch_batches=2)


def _drain(batches: Iterator[dict[str, Any]]) -> tuple[int, float, float]:
    """Windows delivered, seconds for the epoch, seconds to the first batch."""
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
    """Windows/s of both pipelines (median of interleaved repeats) and train-step data wait."""
    import torch

    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import Manifest

    cfg = load_config("cpu-small")
    tmp = tempfile.mkdtemp(prefix="se4lip-bench-pipe-")
    real = harness.grid_available() and not quick
    data = (harness.grid_subset(tmp, 160) if real
            else harness.synthetic_shards(tmp, n_clips=8, n_frames=60))
    paths = Manifest.load(data).shard_paths(data)
    reps, steps = (1, 3) if quick else (3, 20)
    torch.set_num_threads(1)
    import ray

    with harness.Timer() as t_init:
        harness.start_ray()
    try:
        ray_rates, dl_rates, v2_rates, windows = [], [], [], 0
        firsts: dict[str, list[float]] = {"ray": [], "dataloader": [], "ray_v2": []}
        # Warm-up: Ray worker processes and imports, DataLoader fork path, page cache.
        _drain(ray_batches(str(data), cfg))
        _drain(dataloader_batches(paths, cfg))
        _drain(ray_batches_v2(str(data), cfg))
        for _ in range(reps):
            n, s, f = _drain(ray_batches(str(data), cfg))
            ray_rates.append(n / s)
            firsts["ray"].append(round(f, 2))
            n2, s2, f2 = _drain(dataloader_batches(paths, cfg))
            dl_rates.append(n2 / s2)
            firsts["dataloader"].append(round(f2, 2))
            n3, s3, f3 = _drain(ray_batches_v2(str(data), cfg))
            v2_rates.append(n3 / s3)
            firsts["ray_v2"].append(round(f3, 2))
            windows = max(windows, n, n2)
        train_ray = _train(ray_batches(str(data), cfg), cfg, steps)
        train_dl = _train(dataloader_batches(paths, cfg), cfg, steps)
    finally:
        ray.shutdown()
    r, d, r2 = (harness.median(x) for x in (ray_rates, dl_rates, v2_rates))
    metrics = {
        "data": "grid" if real else "synthetic", "shards": len(paths),
        "windows_per_epoch": windows, "ray_init_s": round(t_init.s, 2),
        "ray_windows_per_s": [round(x, 1) for x in ray_rates],
        "dataloader_windows_per_s": [round(x, 1) for x in dl_rates],
        "ray_parquet_v2_windows_per_s": [round(x, 1) for x in v2_rates],
        "seconds_to_first_batch": firsts,
        "train_ray": {k: round(v, 3) for k, v in train_ray.items()},
        "train_dataloader": {k: round(v, 3) for k, v in train_dl.items()},
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    ratios = [
        harness.ratio("pipeline: Ray Data / DataLoader(2 workers) windows/s", r / d, 1.5,
                      f"{r:.0f} vs {d:.0f} windows/s, median of {reps}; first batch after "
                      f"{harness.median(firsts['ray']):.1f} vs "
                      f"{harness.median(firsts['dataloader']):.1f} s"),
        harness.ratio("pipeline, before (Parquet V2 reader): Ray Data / DataLoader windows/s",
                      r2 / d, 1.5, f"{r2:.0f} vs {d:.0f} windows/s; first batch after "
                      f"{harness.median(firsts['ray_v2']):.1f} s"),
        harness.ratio("pipeline: data-wait fraction of a cpu-small step (Ray)",
                      train_ray["data_wait_fraction"], None,
                      f"DataLoader {train_dl['data_wait_fraction']:.2f}; samples/s with "
                      f"training {train_ray['samples_per_s']:.0f} vs "
                      f"{train_dl['samples_per_s']:.0f}", unit=""),
    ]
    return harness.result("pipeline", metrics, ratios)


if __name__ == "__main__":
    harness.main(run)
