"""ASHA stops a clearly bad trial early: a real 2-trial Tune + Train V2 search on tiny shards.

The good trial (lr 2e-3) runs first and reaches every rung; the bad one (lr 1e-9: its weights
stay at their initialisation) is then compared with it at the first rung (epoch 1) and stopped.
Ranked by ``val/offset_acc``: an epoch is long enough (``pairs_per_segment``) for the good
trial to find the offsets, while the early BCE of either trial is too noisy to rank them.
"""

from __future__ import annotations

import subprocess
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


def _wait_for_quiet_host(max_wait_s: float = 300.0) -> None:
    """Another Ray on the host breaks Train V2's placement-group cleaner (its State API call
    finds several clusters), so the PG of a trial Tune stops leaks and the next trial hangs."""
    deadline = time.monotonic() + max_wait_s
    while subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True,
                         check=False).stdout.strip():
        if time.monotonic() > deadline:
            pytest.skip("another Ray cluster is running on this host (pgrep -f raylet)")
        time.sleep(10)


@pytest.mark.slow  # a 2-trial Tune + Train V2 search: over 2 minutes on 2 busy cores
@pytest.mark.timeout(900)
def test_asha_stops_the_bad_trial_at_the_first_rung(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from se4lip_dist.tuning import TuneOptions, run_tune

    _wait_for_quiet_host()

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
    result = run_tune(str(space), str(shards), TuneOptions(
        name="asha", tracking_uri=uri, storage_path=str(tmp_path / "ray"), epochs=EPOCHS,
        overrides=(*TINY_MODEL, *LONG_EPOCH), register="se4lip-asha", experiment="asha",
        max_concurrent_trials=1))

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
