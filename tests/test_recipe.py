"""The training recipe's parts without a process group, and one trainer for train and tune."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from shard_fixtures import TINY_TRAIN, write_synthetic_shards

from se4lip_dist.config import Config, load_config
from se4lip_dist.manifest import Manifest
from se4lip_dist.splits import SplitRule
from se4lip_dist.stream import READ_COLUMNS, PairSpec, make_pair_batch
from se4lip_dist.tracking import start_run


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("recipe") / "shards"
    write_synthetic_shards(data, n_clips=8, n_frames=40, val_clips=2, clips_per_shard=4)
    return data


def _cfg(*extra: str) -> Config:
    return load_config("cpu-small", overrides=[*TINY_TRAIN, "train.num_workers=1", *extra])


def _batches(data: Path, cfg: Config, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Training batches of the shards in this process (what the Ray stream delivers)."""
    spec = PairSpec.from_config(cfg)
    rule = SplitRule.for_manifest(Manifest.load(str(data)), cfg)
    for path in Manifest.load(str(data)).shard_paths(str(data)):
        table = pq.read_table(path, columns=READ_COLUMNS)
        rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
        pairs = make_pair_batch(rows, spec=spec, rule=rule, role="train", seed=seed)
        n = cfg.train.batch_size
        for i in range(0, len(pairs["label"]) - n + 1, n):
            yield {k: torch.from_numpy(v[i:i + n]) for k, v in pairs.items()}


def test_train_epoch_stops_at_steps_per_epoch_and_max_steps(shards: Path) -> None:
    from se4lip_dist.train import TrainRecipe

    cfg = _cfg("train.steps_per_epoch=2", "train.max_steps=3", "train.epochs=5")
    recipe = TrainRecipe(cfg).setup()
    before = {k: t.clone() for k, t in recipe.core.state_dict().items()}
    first = recipe.train_epoch(_batches(shards, cfg))
    assert recipe.step == 2 and first.seen == 2 * cfg.train.batch_size
    assert first.loss_sum > 0 and 0 <= first.correct <= first.seen
    assert first.elapsed > 0 and first.wait >= 0
    assert any(not torch.equal(before[k], t) for k, t in recipe.core.state_dict().items())
    second = recipe.train_epoch(_batches(shards, cfg))
    assert recipe.step == 3 and second.seen == cfg.train.batch_size  # max_steps cuts it short
    assert recipe.steps_done() and not recipe.more_epochs()


def test_train_epoch_ends_with_its_batches_and_closes_them(shards: Path) -> None:
    from se4lip_dist.train import TrainRecipe

    cfg = _cfg()
    closed = []

    def stream() -> Iterator[dict[str, Any]]:
        try:
            yield from list(_batches(shards, cfg))[:3]
        finally:
            closed.append(True)

    recipe = TrainRecipe(cfg).setup()
    stats = recipe.train_epoch(stream())
    assert recipe.step == 3 and stats.seen == 3 * cfg.train.batch_size and closed == [True]


def test_the_first_epoch_is_best_then_only_a_better_one(shards: Path) -> None:
    from se4lip_dist.train import BEST_PREFIX, EpochStats, TrainRecipe
    from se4lip_dist.validation import ValidationResult

    cfg = _cfg("train.select_metric=val/shift_acc")
    recipe = TrainRecipe(cfg).setup()

    def epoch(acc: float) -> dict[str, Any]:
        val = ValidationResult(metrics={"val/shift_acc": acc, "val/loss": 1.0 - acc}, clips=[],
                               protocol=None)  # type: ignore[arg-type]
        return recipe.end_epoch(EpochStats(loss_sum=4.0, correct=2.0, seen=4.0, wait=0.5,
                                           started=0.0, elapsed=2.0), val)

    first = epoch(0.5)
    assert first["train/loss"] == 1.0 and first["train/sync_acc"] == 0.5
    assert first["perf/samples_per_s"] == 2.0 and first["perf/data_wait_fraction"] == 0.25
    assert (first[f"{BEST_PREFIX}epoch"], recipe.best_epoch) == (1, 1)
    best = {k: t.clone() for k, t in recipe.best_state.items()}
    with torch.no_grad():
        next(recipe.core.parameters()).add_(1.0)
    assert epoch(0.25)[f"{BEST_PREFIX}epoch"] == 1  # worse: the best weights stay epoch 1's
    assert all(torch.equal(best[k], t) for k, t in recipe.best_state.items())
    third = epoch(0.75)
    assert third[f"{BEST_PREFIX}epoch"] == 3 and third[f"{BEST_PREFIX}val/shift_acc"] == 0.75
    assert [h["epoch"] for h in recipe.history] == [1, 2, 3] and recipe.epoch == 3


def test_checkpoint_round_trip_continues_where_it_stopped(shards: Path, tmp_path: Path) -> None:
    from se4lip_dist.train import TrainRecipe, load_checkpoint_dir
    from se4lip_dist.validation import ValidationSet

    cfg = _cfg("train.steps_per_epoch=2", "train.epochs=2")
    recipe = TrainRecipe(cfg).setup()
    vset = ValidationSet.load(str(shards), cfg)
    stats = recipe.train_epoch(_batches(shards, cfg))
    val = recipe.validate(vset)
    assert {"val/loss", "val/shift_acc"} <= set(val.metrics)
    recipe.end_epoch(stats, val)
    recipe.save_checkpoint(tmp_path, cfg.to_dict())
    restored = load_checkpoint_dir(tmp_path)
    assert restored.state["epoch"] == 1 and restored.state["step"] == 2
    assert restored.state["config"] == cfg.to_dict() and restored.state["best_epoch"] == 1

    again = TrainRecipe(cfg, rank=1, world=1).setup(restored)
    assert (again.epoch, again.step, again.best_epoch) == (1, 2, 1)
    assert again.history == recipe.history and again.more_epochs() and not again.finished()
    assert all(torch.equal(t, recipe.core.state_dict()[k])
               for k, t in again.core.state_dict().items())
    assert again.opt.state_dict()["state"].keys() == recipe.opt.state_dict()["state"].keys()
    again.train_epoch(_batches(shards, cfg))
    again.end_epoch(stats, val)
    assert again.step == 4 and again.finished()


def test_train_and_tune_build_the_same_trainer(shards: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """For one config, a train run and a tune trial differ only in their names and Tune's
    report callback: workers, failures, checkpoints, datasets and the loop are the same."""
    from se4lip_dist import train, tuning
    from se4lip_dist.resources import train_plan

    # Datasets are read lazily by Ray Data; here only which ones a trainer gets matters.
    monkeypatch.setattr(train, "row_dataset", lambda data_dir, cfg: ("rows", data_dir))
    from ray.train import UserCallback

    class Stand(UserCallback):
        """Ray refuses to build Tune's report callback outside a Tune session."""

    monkeypatch.setattr(tuning, "TuneReportCallback", Stand)
    cfg = _cfg("train.num_workers=2", "train.cpus_per_worker=0.4")
    data = str(shards)
    job = {"base": cfg.to_dict(), "data_dir": data, "tracking_uri": "sqlite:///x.db",
           "name": "t", "storage": str(tmp_path), "num_workers": cfg.train.num_workers,
           "worker_cpus": cfg.train.cpus_per_worker, "worker_gpus": 0}
    ran = train.build_trainer(cfg, data, train_plan(cfg.train, use_gpu=False), name="r",
                              storage_path=str(tmp_path), tracking_uri="sqlite:///x.db",
                              run_id="run")
    trial = tuning.trial_trainer(job, "trial_0", cfg, "run",
                                 tuning.training_datasets(data, cfg))
    assert ran.scaling_config == trial.scaling_config
    assert ran.scaling_config.num_workers == 2
    assert ran.scaling_config.resources_per_worker == {"CPU": 0.4}
    for key in ("failure_config", "checkpoint_config", "worker_runtime_env"):
        assert getattr(ran.run_config, key) == getattr(trial.run_config, key), key
    assert ran.run_config.failure_config.max_failures == train.MAX_FAILURES
    assert ran.datasets == trial.datasets == {"train": ("rows", data)}
    ingest = [{k: vars(o) for k, o in t.data_config._user_execution_options.items()}
              for t in (ran, trial)]
    assert ingest[0] == ingest[1] and ingest[0]["train"]["preserve_order"]
    assert ran.train_loop_per_worker is trial.train_loop_per_worker is train.train_loop
    assert ran.train_loop_config == trial.train_loop_config
    assert not ran.run_config.callbacks and [type(c) for c in trial.run_config.callbacks] == [Stand]
    assert (ran.run_config.name, trial.run_config.name) == ("r", "t-trial_0")


def test_a_tune_trial_warm_starts_from_train_init_as_train_does(
        shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tune --set train.init=...`` sends every trial the warm-start weights ``train`` would
    (trials used to train from scratch without a word)."""
    import ray
    from ray.train import UserCallback

    from se4lip_dist import train, tuning
    from se4lip_dist.train import TrainRecipe, load_init
    from se4lip_dist.validation import ValidationSet

    monkeypatch.setattr(train, "row_dataset", lambda data_dir, cfg: ("rows", data_dir))

    class Stand(UserCallback):
        """Ray refuses to build Tune's report callback outside a Tune session."""

    monkeypatch.setattr(tuning, "TuneReportCallback", Stand)
    monkeypatch.setattr(ray, "put", lambda obj: obj)  # the weights, not the object store
    cfg = _cfg("train.steps_per_epoch=1")
    recipe = TrainRecipe(cfg).setup()
    stats = recipe.train_epoch(_batches(shards, cfg))
    recipe.end_epoch(stats, recipe.validate(ValidationSet.load(str(shards), cfg)))
    init = tmp_path / "init"
    init.mkdir()
    recipe.save_checkpoint(init, cfg.to_dict())
    warm = cfg.override({"train.init": str(init)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = {"base": warm.to_dict(), "data_dir": str(shards), "tracking_uri": uri,
           "name": "t", "storage": str(tmp_path), "num_workers": 1,
           "worker_cpus": warm.train.cpus_per_worker, "worker_gpus": 0}
    run_id = start_run(uri, "tune-init", "trial 0", params={}, tags={}, config_yaml="")
    trial = tuning.trial_trainer(job, "trial_0", warm, run_id,
                                 tuning.training_datasets(str(shards), warm))
    sent = trial.train_loop_config["init_state"]
    expected, _ = load_init(warm, uri)
    assert sent is not None and sent.keys() == expected.keys()
    assert all(torch.equal(sent[k], t) for k, t in expected.items())
    # The trial's run names its parent, as a train run does.
    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    assert tags.get("se4lip.init") == str(init.resolve())
    assert tuning.trial_trainer(job, "trial_1", cfg, "run", tuning.training_datasets(
        str(shards), cfg)).train_loop_config["init_state"] is None


def test_tune_refuses_train_init_when_the_space_varies_the_architecture(tmp_path: Path) -> None:
    from se4lip_dist.tuning import TuneError, TuneOptions, run_tune

    space = Path(__file__).resolve().parent.parent / "tune" / "default.yaml"
    with pytest.raises(TuneError, match=r"varies model\.gru_layers, train\.window_frames"):
        run_tune(str(space), str(tmp_path), TuneOptions(overrides=("train.init=/nowhere",)))
