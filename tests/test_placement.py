"""placement: a worker group the cluster can never hold fails at once, judged as a whole group."""

from __future__ import annotations

import time

import pytest
from shard_fixtures import TINY_TRAIN, write_synthetic_shards

from se4lip_dist.config import load_config
from se4lip_dist.placement import PlacementError, missing_everywhere, wait_placeable


def test_missing_everywhere_judges_the_whole_group() -> None:
    rank = {"CPU": 2.0, "GPU": 1.0}
    one_gpu = [{"CPU": 16.0, "GPU": 1.0}]
    assert missing_everywhere(rank, one_gpu) == []
    assert missing_everywhere(rank, one_gpu, 2) == ["GPU"]
    assert missing_everywhere(rank, [*one_gpu, {"CPU": 4.0, "GPU": 1.0}], 2) == []
    assert missing_everywhere(rank, [{"CPU": 8.0}], 2) == ["GPU"]  # no node has one
    # 4.8 of the 6 CPUs, but no 3-CPU node holds two ranks of 1.6.
    two = [{"CPU": 3.0}, {"CPU": 3.0}]
    assert missing_everywhere({"CPU": 1.6}, two, 2) == []
    assert missing_everywhere({"CPU": 1.6}, two, 3) == ["CPU"]
    assert missing_everywhere({"CPU": 0.4}, [{"CPU": 2.0}], 5) == []  # 2 / 0.4 is 4.999...
    assert missing_everywhere({"CPU": 0.5}, [{"CPU": 2.0}], 5) == ["CPU"]
    # The totals would do, but the GPUs sit on a node with too few CPUs.
    split = [{"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0}]
    assert missing_everywhere(rank, split) == ["CPU", "GPU"]


@pytest.fixture(scope="module")
def one_gpu_ray():  # type: ignore[no-untyped-def]
    """A local Ray that says it has one GPU (nothing here runs on it: placement only)."""
    import ray

    from se4lip_dist.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=4, num_gpus=1)
    yield
    ray.shutdown()


@pytest.mark.timeout(150)
def test_two_gpu_workers_on_a_one_gpu_ray_fail_at_once(one_gpu_ray) -> None:
    wait_placeable({"CPU": 0.5, "GPU": 1}, 1, "1 worker", timeout_s=30)  # one rank fits
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"2 workers: each needs CPU 0.5, GPU 1, so the 2 "
                                             r"need GPU 2 together, but this Ray cluster has "
                                             r"GPU 1 in all and its nodes hold 1 of them"):
        wait_placeable({"CPU": 0.5, "GPU": 1}, 2, "2 workers", timeout_s=60)
    assert time.monotonic() - t0 < 20


@pytest.mark.timeout(240)
def test_train_with_more_gpu_ranks_than_gpus_fails_at_once(tmp_path, one_gpu_ray) -> None:
    """train --use-gpu with 2 workers on a one-GPU Ray without an autoscaler: refused at once,
    naming the GPUs needed and had, each rank with train.cpus_per_gpu_worker CPUs."""
    from se4lip_dist.train import TrainError, run_train

    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=6, n_frames=20, val_clips=2, clips_per_shard=3)
    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
    assert cfg.train.num_workers == 2
    t0 = time.monotonic()
    with pytest.raises(TrainError, match=r"2 training workers: each needs CPU 2, GPU 1, so the "
                                         r"2 need GPU 2 together, but this Ray cluster has GPU "
                                         r"1 in all .* no autoscaler can add nodes"):
        run_train(cfg, str(data), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", use_gpu=True,
                  storage_path=str(tmp_path / "ray"), placement_timeout_s=120)
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(150)
def test_a_group_behind_other_work_waits_and_says_so(one_gpu_ray) -> None:
    """queue=True (a tune trial): while the nodes could hold the group once other work frees
    them, it waits past timeout_s, saying what it waits for; without queue it fails then."""
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group

    other = placement_group([{"GPU": 1.0}])  # another trial's rank holds the only GPU
    assert other.wait(30)
    try:
        with pytest.raises(PlacementError, match="could not be placed within 2 s"):
            wait_placeable({"CPU": 0.5, "GPU": 1}, 1, "trial b's 1 ranks", timeout_s=2)
        lines: list[str] = []
        freed = threading.Timer(8.0, remove_placement_group, args=(other,))
        freed.start()
        t0 = time.monotonic()
        wait_placeable({"CPU": 0.5, "GPU": 1}, 1, "trial b's 1 ranks", timeout_s=2,
                       queue=True, on_wait=lines.append, wait_every_s=2)
        assert time.monotonic() - t0 >= 7  # placed once the other work ended, not before
        freed.join()
    finally:
        remove_placement_group(other)
    assert lines and all("trial b's 1 ranks waiting for capacity" in line for line in lines)
    assert "GPU 0 of 1 free" in lines[0] and "held by other work" in lines[0]
    assert 2 <= len(lines) <= 5  # every wait_every_s, not every poll
