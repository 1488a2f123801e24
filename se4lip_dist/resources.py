"""What a training run reserves on Ray: one resource plan for ``train``, ``tune``, ``subject``.

A DDP rank decodes its JPEG frames and samples its pairs in its own collate threads, so a rank
that trains on a GPU gets ``train.cpus_per_gpu_worker`` CPUs (benchmarks/README.md, "What a
GPU node needs") and one whole GPU (NCCL refuses two ranks on one device); a rank that trains
on CPUs gets the fractional ``train.cpus_per_worker``, which leaves room for Ray Data on small
machines. ``tune`` plans its trials from its flags (:func:`se4lip_dist.tuning.plan_resources`)
into the same :class:`Resources`.
"""

from __future__ import annotations

from dataclasses import dataclass

from se4lip_dist.config import TrainConfig


@dataclass(frozen=True)
class Resources:
    """What one run (or tune trial) reserves: a driver slice plus ``num_workers`` DDP ranks."""

    driver_cpus: float
    worker_cpus: float
    worker_gpus: int
    """0, or 1: a DDP rank never shares a GPU (NCCL refuses two ranks on one device)."""
    num_workers: int
    max_concurrent: int | None
    """None: no cap; Tune starts trials as the cluster (and its autoscaler) makes room."""

    def worker_bundle(self) -> dict[str, float]:
        """One rank's Ray resources."""
        bundle = {"CPU": self.worker_cpus}
        if self.worker_gpus:
            bundle["GPU"] = float(self.worker_gpus)
        return bundle

    @property
    def cpu_key(self) -> str:
        """The config key that sets a rank's CPUs (for messages)."""
        return "train.cpus_per_gpu_worker" if self.worker_gpus else "train.cpus_per_worker"


def train_plan(train: TrainConfig, use_gpu: bool) -> Resources:
    """The worker group of one ``train`` run (``subject`` trains through it as well).

    Its driver is the calling process, which reserves nothing.
    """
    cpus = train.cpus_per_gpu_worker if use_gpu else train.cpus_per_worker
    return Resources(driver_cpus=0.0, worker_cpus=float(cpus), worker_gpus=1 if use_gpu else 0,
                     num_workers=train.num_workers, max_concurrent=1)


__all__ = ["Resources", "train_plan"]
