"""ASHA stops a clearly bad trial early: a real 2-trial Tune + Train V2 search on tiny shards.

The good trial (lr 2e-3) runs first and reaches every rung; the bad one (lr 1e-9: its weights
stay at their initialisation) is then compared with it at the first rung (epoch 1) and stopped.
Ranked by ``val/offset_acc``: an epoch is long enough (``pairs_per_segment``) for the good
trial to find the offsets, while the early BCE of either trial is too noisy to rank them.
Every trial's placement group is freed afterwards, also beside other Ray clusters on the
machine (see tests/test_runtime.py for why that once failed).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from shard_fixtures import TINY_MODEL, write_synthetic_shards

EPOCHS = 2
"""ASHA (grace 1, reduction 2) then has one rung, at epoch 1."""
LONG_EPOCH = ("train.pairs_per_segment=96",)
"""Six times the tiny sampler's pairs per epoch: the good trial has found the offsets by the
first rung, well above what an untrained encoder (with adapted BatchNorm statistics) finds."""


@pytest.mark.slow  # a 2-trial Tune + Train V2 search: over 2 minutes on 2 busy cores
@pytest.mark.timeout(900)
def test_asha_stops_the_bad_trial_at_the_first_rung(tmp_path: Path) -> None:
    import ray
    from mlflow import MlflowClient

    from se4lip_dist.runtime import init_ray
    from se4lip_dist.tuning import TuneOptions, run_tune

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, n_clips=24, n_frames=40, val_clips=6, clips_per_shard=6)
    space = tmp_path / "asha.yaml"
    space.write_text(yaml.safe_dump({
        "preset": "cpu-small", "metric": "val/offset_acc", "mode": "max", "num_samples": 1,
        "scheduler": "asha",
        # Grid order is trial order (one trial at a time on 2 cores): the good one first.
        "params": {"train.lr": {"grid": [2.0e-3, 1.0e-9]}},
    }))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_ray(dashboard=True)  # what run_tune starts, kept up here to look at it afterwards
    try:
        result = run_tune(str(space), str(shards), TuneOptions(
            name="asha", tracking_uri=uri, storage_path=str(tmp_path / "ray"), epochs=EPOCHS,
            overrides=(*TINY_MODEL, *LONG_EPOCH), register="se4lip-asha", experiment="asha",
            max_concurrent_trials=1))
        # A trial's driver ends and takes its Train controller along: the workers' placement
        # group is freed by Train's cleaner actor, whose State API calls find this cluster
        # beside other Ray on the machine only through the address init_ray gives workers.
        deadline = time.monotonic() + 60
        while (kept := [pg for pg in ray.util.placement_group_table().values()
                        if pg["state"] != "REMOVED"]) and time.monotonic() < deadline:
            time.sleep(1)
        assert not kept, kept
    finally:
        ray.shutdown()

    by_lr = {t["params"]["train.lr"]: t for t in result["trials"]}
    good, bad = by_lr[2.0e-3], by_lr[1.0e-9]
    assert (good["status"], good["epoch"]) == ("DONE", EPOCHS), result["trials"]
    assert (bad["status"], bad["epoch"]) == ("STOPPED EARLY", 1), result["trials"]
    assert result["stopped_early"] == 1
    assert result["best"]["params"] == {"train.lr": 2.0e-3}
    assert good["val/offset_acc"] > bad["val/offset_acc"]

    # The stopped trial's MLflow run ends FINISHED with one epoch of history and says why.
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(bad["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["se4lip.trial_status"] == "STOPPED EARLY"
    assert [m.step for m in client.get_metric_history(bad["run_id"], "val/offset_acc")] == [1]
    assert len(client.get_metric_history(good["run_id"], "val/offset_acc")) == EPOCHS
