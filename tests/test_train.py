"""End to end: synthetic shards -> 2 CPU Ray Train workers -> MLflow run, resume, registry."""

from __future__ import annotations

import numpy as np
import pytest
from shard_fixtures import TINY_TRAIN, write_synthetic_shards

from se4lip_dist.config import load_config


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from se4lip_dist.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _reports_of_restored_run(cfg, data, storage, uri, run_id, tmp_path) -> list[dict]:  # type: ignore[no-untyped-def]
    """Fit ``train_loop`` again on the finished run ``tiny``; what it reported to callbacks."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.callback import UserCallback

    from se4lip_dist.train import train_loop, training_datasets

    log = tmp_path / "reports.jsonl"

    class Record(UserCallback):  # runs in the Train controller actor: write to a file
        def after_report(self, run_context, metrics, checkpoint):  # type: ignore[no-untyped-def]
            with open(log, "a") as f:
                f.write(json.dumps({"epoch": metrics[0]["epoch"],
                                    "checkpoint": checkpoint is not None}) + "\n")

    TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=2,
                                               resources_per_worker={"CPU": 0.4}),
        run_config=ray.train.RunConfig(name="tiny", storage_path=storage, callbacks=[Record()]),
        datasets=training_datasets(str(data), cfg),
    ).fit()
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.timeout(420)
def test_train_resume_track_register(tmp_path, ray_session) -> None:
    from mlflow import MlflowClient

    from se4lip_dist.registry import embed_waveforms, load_encoder
    from se4lip_dist.train import run_train

    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=24, n_frames=40, val_clips=4, clips_per_shard=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "ray")
    common = dict(tracking_uri=uri, experiment="it", use_gpu=False, address=None,
                  storage_path=storage)

    cfg = load_config("cpu-small", overrides=[*TINY_TRAIN, "train.epochs=2"])
    first = run_train(cfg, str(data), run_name="tiny", register=None, resume=False, **common)
    assert first["epochs"] == 2 and len(first["history"]) == 2
    assert first["run_name"] == "tiny"
    assert first["samples_per_s"] > 0 and 0 <= first["data_wait_fraction"] <= 1
    assert len(first["worker_node_ids"]) == 2 and len(set(first["worker_node_ids"])) == 1
    for h in first["history"]:  # collapse watch: norms of ReLU embeddings, dead dimensions
        assert h["val_speech_norm"] >= 0 and h["val_lip_norm"] >= 0
        assert 0 <= h["val_speech_dead_frac"] <= 1 and 0 <= h["val_lip_dead_frac"] <= 1

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first["run_id"])
    assert run.data.params["train.batch_size"] == "16"
    assert "data.manifest_hash" in run.data.params
    assert {"train_loss", "val_loss", "val_sync_acc", "val_offset_acc",
            "val_speech_dead_frac"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(first["run_id"])}
    assert "config.yaml" in names and "plots" in names
    plots = {a.path for a in client.list_artifacts(first["run_id"], "plots")}
    assert plots == {"plots/curves.png", "plots/offset_curve.png"}

    # Resume the same run for two more epochs and register the result.
    cfg4 = load_config("cpu-small", overrides=[*TINY_TRAIN, "train.epochs=4"])
    second = run_train(cfg4, str(data), run_name="tiny", register="se4lip-it", resume=True,
                       **common)
    assert second["run_id"] == first["run_id"]
    assert second["epochs"] == 4
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    assert second["history"][:2] == first["history"]
    # Learning, judged so that one noisy epoch on 24 tiny clips cannot fail it: the loss went
    # down at some point, and the first epoch after the resume still finds the AV offset.
    losses = [h["train_loss"] for h in second["history"]]
    assert min(losses[1:]) < losses[0] - 0.05, losses
    assert second["history"][2]["val_offset_acc"] >= 0.75, second["history"]
    assert all(np.isfinite(h["val_loss"]) for h in second["history"])
    assert second["registered_version"] == 1
    history = client.get_metric_history(first["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]

    # Restoring a finished run trains nothing but reports its final result and checkpoint once
    # more: a tune driver killed after a trial's last epoch gets the trial's result this way.
    assert _reports_of_restored_run(cfg4, data, storage, uri, first["run_id"], tmp_path) == [
        {"epoch": 4, "checkpoint": True}]
    assert [m.step for m in client.get_metric_history(first["run_id"], "train_loss")] == [
        1, 2, 3, 4]

    enc, cfg_back = load_encoder("models:/se4lip-it@candidate", tracking_uri=uri)
    assert cfg_back.model == cfg4.model
    emb = embed_waveforms(enc, np.zeros((3, 16000 * 2 + 5), np.float32), cfg_back)
    assert emb.shape == (3, 32) and np.isfinite(emb).all()


def test_run_names_fresh_unique_and_resume(tmp_path) -> None:
    from se4lip_dist.train import RUN_STATE_FILE, TrainError, _resolve_name

    storage = str(tmp_path)
    assert _resolve_name(storage, "a", resume=False) == ("a", None)
    (tmp_path / "a").mkdir()
    name, _ = _resolve_name(storage, "a", resume=False)
    assert name.startswith("a-") and name != "a"
    with pytest.raises(TrainError, match="no run 'a'"):
        _resolve_name(storage, "a", resume=True)
    (tmp_path / "a" / RUN_STATE_FILE).write_text('{"run_id": "r1"}')
    assert _resolve_name(storage, "a", resume=True) == ("a", {"run_id": "r1"})
    assert _resolve_name(storage, None, resume=True) == ("a", {"run_id": "r1"})


def test_unreachable_tracking_server_fails_fast() -> None:
    import time

    from se4lip_dist.tracking import TrackingError, check_reachable

    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="cannot reach") as err:
        check_reachable("http://user:pw@127.0.0.1:9", timeout_s=2)
    assert "pw" not in str(err.value)
    assert time.perf_counter() - t0 < 5
