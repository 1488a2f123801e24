"""End to end: synthetic shards -> 2 CPU Ray Train workers -> MLflow run, resume, registry."""

from __future__ import annotations

import signal

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
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(data), "tracking_uri": uri,
                           "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=2,
                                               resources_per_worker={"CPU": 0.4}),
        run_config=ray.train.RunConfig(name="tiny", storage_path=storage, callbacks=[Record()]),
        datasets=training_datasets(str(data), cfg),
    ).fit()
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.timeout(600)
def test_train_resume_track_register_best_epoch(tmp_path, ray_session) -> None:
    """Train, resume with a learning rate that wrecks the model, and register: the registered
    weights are the best validated epoch's (scored again by the gate: the same numbers)."""
    from mlflow import MlflowClient

    from se4lip_dist.registry import embed_waveforms, load_encoder
    from se4lip_dist.train import run_train

    data = tmp_path / "shards"
    # 8 validation clips: as many units as the gate needs to decide (train.val_min_units).
    write_synthetic_shards(data, n_clips=28, n_frames=40, val_clips=8, clips_per_shard=7)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "ray")
    common = dict(tracking_uri=uri, experiment="it", use_gpu=False, address=None,
                  storage_path=storage)

    cfg = load_config("cpu-small", overrides=[*TINY_TRAIN, "train.epochs=3"])
    ctrl_c = signal.getsignal(signal.SIGINT)
    first = run_train(cfg, str(data), run_name="tiny", register=None, resume=False, **common)
    # Ray Train's fit installs its own SIGINT handler; a later Ctrl-C must interrupt us again.
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    assert first["epochs"] == 3 and len(first["history"]) == 3
    assert first["run_name"] == "tiny" and first["registered"] is None
    last = first["last"]
    assert last["perf/samples_per_s"] > 0 and 0 <= last["perf/data_wait_fraction"] <= 1
    assert len(first["worker_node_ids"]) == 2 and len(set(first["worker_node_ids"])) == 1
    for h in first["history"]:  # counts behind every score, and the collapse watch
        assert h["val/clips"] == h["val/units"] == 8 and h["val/offset_trials"] == 24
        assert h["val/pairs"] == 128
        assert h["val/shift_acc_ci_low"] <= h["val/shift_acc"] <= h["val/shift_acc_ci_high"]
        assert h["val/offset_acc_ci_low"] <= h["val/offset_acc"] <= h["val/offset_acc_ci_high"]
        assert h["val/speech_norm"] >= 0 and 0 <= h["val/lip_dead_frac"] <= 1
    # Learning: the synthetic sync is found at every shift within 3 epochs.
    assert max(h["val/shift_acc"] for h in first["history"]) >= 0.875, first["history"]

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first["run_id"])
    assert run.data.params["train.batch_size"] == "16"
    assert run.data.tags["mlflow.source.name"] == "se4lip-dist train"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.note.content"]
    assert {"train/loss", "val/loss", "val/sync_acc", "val/shift_acc", "val/offset_acc",
            "val/offset_acc_shift3",
            "perf/samples_per_s", "best/epoch"} <= set(run.data.metrics)
    assert not {"step", "epoch", "train_loss"} & set(run.data.metrics)
    data_hash = run.data.params["data.manifest_hash"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        f"shards-{data_hash}-training", f"shards-{data_hash}-validation"}
    contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags}
    assert contexts == {"training", "validation"}
    names = {a.path for a in client.list_artifacts(first["run_id"])}
    assert {"config.yaml", "plots", "validation"} <= names
    tables = {a.path for a in client.list_artifacts(first["run_id"], "validation")}
    assert "validation/clips_epoch003.json" in tables
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # Resume for 4 more epochs on clips whose training audio is 6 frames late (the validation
    # clips are the same, in sync): the model unlearns sync. Then register.
    shifted = tmp_path / "shifted"
    write_synthetic_shards(shifted, n_clips=28, n_frames=40, val_clips=8, clips_per_shard=7,
                           train_audio_shift=6)
    wreck = load_config("cpu-small", overrides=[*TINY_TRAIN, "train.epochs=7"])
    second = run_train(wreck, str(shifted), run_name="tiny", register="se4lip-it", resume=True,
                       **common)
    assert second["run_id"] == first["run_id"]
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4, 5, 6, 7]
    assert second["history"][:3] == first["history"]
    hist = second["history"]
    best = max(hist, key=lambda h: (h["val/shift_acc"], -h["val/loss"]))
    assert second["best_epoch"] == best["epoch"] <= 3, [
        (h["epoch"], h["val/shift_acc"], h["val/loss"]) for h in hist]
    assert hist[-1]["val/shift_acc"] < best["val/shift_acc"]
    assert [m.step for m in client.get_metric_history(first["run_id"], "train/loss")] == [
        1, 2, 3, 4, 5, 6, 7]
    reg = second["registered"]
    assert (reg["name"], reg["version"], reg["alias"]) == ("se4lip-it", 1, "champion"), reg
    # The gate scored the registered weights in-process: exactly the best epoch's validation.
    for k in ("val/shift_acc", "val/offset_acc", "val/offset_trials", "val/clips"):
        assert reg["scores"][k] == best[k], (k, reg["scores"], best)
    assert reg["scores"]["val/loss"] == pytest.approx(best["val/loss"], abs=1e-4)
    mv = client.get_model_version("se4lip-it", "1")
    assert mv.tags["se4lip.epoch"] == str(best["epoch"]) and "champion" in mv.description

    # Restoring a finished run trains nothing but reports its final result and checkpoint once
    # more: a tune driver killed after a trial's last epoch gets the trial's result this way.
    assert _reports_of_restored_run(wreck, data, storage, uri, first["run_id"], tmp_path) == [
        {"epoch": 7, "checkpoint": True}]
    assert [m.step for m in client.get_metric_history(first["run_id"], "train/loss")] == [
        1, 2, 3, 4, 5, 6, 7]

    enc, cfg_back = load_encoder("models:/se4lip-it@champion", tracking_uri=uri)
    assert cfg_back.model == wreck.model
    emb = embed_waveforms(enc, np.zeros((3, 16000 * 2 + 5), np.float32), cfg_back)
    assert emb.shape == (3, 32) and np.isfinite(emb).all()


def test_optimizer_state_follows_the_placed_parameters(tmp_path) -> None:
    """A restored AdamW state must live where the parameters were placed (on a GPU: the device;
    here a dtype change stands in for the move), or the first step after a resume fails."""
    import torch

    from se4lip_dist.models import build_model
    from se4lip_dist.train import Restored, place_model

    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
    model = build_model(cfg.model, window_frames=cfg.train.window_frames)
    model, opt, _ = place_model(model, cfg, None, lambda m: m)
    wav = torch.randn(4, 5 * 640)
    lips = torch.rand(4, 15, 32, 32)
    a, v = model(wav, lips)
    (a.sum() + v.sum()).backward()
    opt.step()
    saved = Restored(model=model.state_dict(), best=model.state_dict(), optim=opt.state_dict(),
                     state={"scaler": None})

    fresh = build_model(cfg.model, window_frames=cfg.train.window_frames)
    placed, opt2, scaler = place_model(fresh, cfg, saved, lambda m: m.to(torch.float64))
    assert not scaler.is_enabled()  # no fp16 autocast on CPU
    states = [s for s in opt2.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float64 for s in states)
    a, v = placed(wav.double(), lips.double())
    (a.sum() + v.sum()).backward()
    opt2.step()  # mixed float32 state and float64 parameters would raise here


def test_a_restored_optimizer_takes_the_configs_step_size(tmp_path) -> None:
    """A PBT exploit continues another trial's checkpoint under a perturbed learning rate:
    the loaded optimizer state must not bring the old rate back (nor the old weight decay)."""

    from se4lip_dist.models import build_model
    from se4lip_dist.train import Restored, place_model

    cfg = load_config("cpu-small", overrides=[*TINY_TRAIN, "train.lr=1e-3",
                                              "train.weight_decay=0.0"])
    model, opt, _ = place_model(build_model(cfg.model, window_frames=cfg.train.window_frames),
                                cfg, None, lambda m: m)
    saved = Restored(model=model.state_dict(), best=model.state_dict(), optim=opt.state_dict(),
                     state={"scaler": None})
    new = cfg.override({"train.lr": 2.5e-4, "train.weight_decay": 0.01})
    _, opt2, _ = place_model(build_model(new.model, window_frames=new.train.window_frames),
                             new, saved, lambda m: m)
    speech, lips = opt2.param_groups
    assert speech["lr"] == 2.5e-4 and lips["lr"] == 2.5e-4 * new.train.lips_lr_scale
    assert speech["weight_decay"] == lips["weight_decay"] == 0.01


def test_run_names_fresh_unique_and_resume(tmp_path) -> None:
    from se4lip_dist.train import RUN_STATE_FILE, TrainError, _resolve_name

    storage = str(tmp_path)
    assert _resolve_name(storage, "a", False, "lbl") == ("a", None)
    (tmp_path / "a").mkdir()
    name, _ = _resolve_name(storage, "a", False, "lbl")
    assert name.startswith("a-") and name != "a"
    fresh, _ = _resolve_name(storage, None, False, "cpu-small-gru2-w5-lr3e-4")
    assert fresh.startswith("cpu-small-gru2-w5-lr3e-4-")
    with pytest.raises(TrainError, match="no run 'a'"):
        _resolve_name(storage, "a", True, "lbl")
    (tmp_path / "a" / RUN_STATE_FILE).write_text('{"run_id": "r1"}')
    assert _resolve_name(storage, "a", True, "lbl") == ("a", {"run_id": "r1"})
    assert _resolve_name(storage, None, True, "lbl") == ("a", {"run_id": "r1"})


def test_run_label_says_what_the_run_is() -> None:
    from se4lip_dist.train import run_label

    assert run_label(load_config("cpu-small")) == "cpu-small-gru2-w5-lr3e-4"
    assert run_label(load_config("paper", overrides=["model.frontend=mel",
                                                     "model.backbone=cnn"])) == \
        "paper-mel-cnn-w5-lr5e-5"


def test_train_plan_gives_gpu_ranks_cpus_per_gpu_worker() -> None:
    """--use-gpu ranks reserve train.cpus_per_gpu_worker CPUs and one GPU each; CPU ranks keep
    the fractional train.cpus_per_worker."""
    from se4lip_dist.resources import train_plan

    cfg = load_config("cpu-small")
    gpu = train_plan(cfg.train, use_gpu=True)
    assert gpu.worker_bundle() == {"CPU": 2.0, "GPU": 1.0}
    assert (gpu.num_workers, gpu.driver_cpus, gpu.cpu_key) == (2, 0.0, "train.cpus_per_gpu_worker")
    cpu = train_plan(cfg.train, use_gpu=False)
    assert cpu.worker_bundle() == {"CPU": 0.5} and cpu.cpu_key == "train.cpus_per_worker"
    tuned = load_config("cpu-small", overrides=["train.cpus_per_gpu_worker=3",
                                                "train.cpus_per_worker=0.25",
                                                "train.num_workers=4"]).train
    assert train_plan(tuned, use_gpu=True).worker_bundle() == {"CPU": 3.0, "GPU": 1.0}
    assert train_plan(tuned, use_gpu=False).worker_bundle() == {"CPU": 0.25}
    assert train_plan(tuned, use_gpu=True).num_workers == 4


def test_unreachable_tracking_server_fails_fast() -> None:
    import time

    from se4lip_dist.tracking import TrackingError, check_reachable

    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="cannot reach") as err:
        check_reachable("http://user:pw@127.0.0.1:9", timeout_s=2)
    assert "pw" not in str(err.value)
    assert time.perf_counter() - t0 < 5


def test_cluster_run_refuses_a_node_local_store(tmp_path) -> None:
    """On a cluster the workers log from their own nodes: a sqlite file there would be a
    separate store per node, so it is refused before anything starts."""
    from se4lip_dist.tracking import TrackingError
    from se4lip_dist.train import run_train

    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=6, n_frames=20, val_clips=2, clips_per_shard=3)
    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
    with pytest.raises(TrackingError, match="--tracking-uri http://"):
        run_train(cfg, str(data), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                  address="127.0.0.1:1", storage_path=str(tmp_path / "ray"))
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists()


@pytest.mark.timeout(120)
def test_gpu_workers_on_a_cpu_only_ray_fail_fast(tmp_path, ray_session) -> None:
    import time

    from se4lip_dist.train import TrainError, run_train

    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=6, n_frames=20, val_clips=2, clips_per_shard=3)
    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
    t0 = time.perf_counter()
    with pytest.raises(TrainError, match="GPU") as err:
        run_train(cfg, str(data), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", use_gpu=True,
                  storage_path=str(tmp_path / "ray"), placement_timeout_s=600)
    assert "no autoscaler" in str(err.value)
    assert time.perf_counter() - t0 < 60


@pytest.mark.timeout(900)
def test_subject_regime_time_split_steps_and_warm_start(tmp_path, ray_session) -> None:
    """One subject's long clips: train on the head of every clip and validate on its tail,
    a fixed number of steps per epoch, then warm-start (a frozen lip encoder) from the
    registered model."""
    import torch
    from mlflow import MlflowClient

    from se4lip_dist.registry import load_model_state
    from se4lip_dist.train import TrainError, run_train

    data = tmp_path / "subject"
    write_synthetic_shards(data, n_clips=2, n_frames=300, val_clips=0, segment_frames=120)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = dict(tracking_uri=uri, experiment="subject", storage_path=str(tmp_path / "ray"))
    subject = [*TINY_TRAIN, "train.split=time", "train.val_fraction=0.1",
               "train.steps_per_epoch=12", "train.pairs_per_segment=8"]
    base = run_train(load_config("cpu-small", overrides=[*subject, "train.epochs=2"]),
                     str(data), run_name="base", register="subj", **common)
    # 2 clips x 3 rows x 8 pairs = 48 pairs per pass, one batch of 16 per worker: the 12 steps
    # of an epoch take 12 passes over freshly drawn pairs.
    assert [h["train/steps"] for h in base["history"]] == [12, 24]
    for h in base["history"]:  # the tails of both clips: 30 frames, 26 windows each
        assert (h["val/clips"], h["val/windows"]) == (2, 52)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(base["run_id"])
    assert run.data.params["data.split"].startswith("time: the last 10%")
    assert run.data.params["data.val_frames"] == "60"
    assert run.data.params["data.train_frames"] == str(2 * (270 - 13))  # 13-frame guard gap

    with pytest.raises(TrainError, match="another architecture"):
        run_train(load_config("cpu-small", overrides=[
            *subject, "model.gru_layers=2", "train.init=models:/subj/1"]), str(data), **common)

    # A warm start at a learning rate too small to move the weights ends where it started
    # (BatchNorm statistics aside); with a frozen lip encoder and a real learning rate, the
    # lip weights stay exactly.
    still = run_train(load_config("cpu-small", overrides=[
        *subject, "train.epochs=1", "train.lr=1e-12", "train.init=models:/subj/1"]),
        str(data), run_name="warm", **common)
    parent, _ = load_model_state("models:/subj/1", uri)
    after, _ = load_model_state(still["model_uri"], uri)
    weights = [k for k in parent if not k.endswith(("running_mean", "running_var",
                                                    "num_batches_tracked"))]
    assert all(torch.allclose(parent[k], after[k], atol=1e-6) for k in weights)
    warm = client.get_run(still["run_id"])
    assert warm.data.tags["se4lip.init"] == "models:/subj/1"
    assert warm.inputs.model_inputs, "the parent model is recorded as the run's model input"
    frozen = run_train(load_config("cpu-small", overrides=[
        *subject, "train.epochs=1", "train.freeze_lips=true", "train.init=models:/subj/1"]),
        str(data), run_name="frozen", **common)
    child, _ = load_model_state(frozen["model_uri"], uri)
    lips = [k for k in parent if k.startswith("lips.")]
    assert lips and all(torch.equal(parent[k], child[k]) for k in lips)
    assert any(not torch.equal(parent[k], child[k]) for k in parent if k.startswith("speech."))


def _first_epoch_loss(data, cfg, tmp_path, name: str) -> float:  # type: ignore[no-untyped-def]
    import ray.train
    from ray.train.torch import TorchTrainer

    from se4lip_dist.train import train_loop, training_data_config, training_datasets

    result = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(data), "tracking_uri": None,
                           "run_id": None},
        scaling_config=ray.train.ScalingConfig(num_workers=1,
                                               resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "ray")),
        datasets=training_datasets(str(data), cfg),
        dataset_config=training_data_config(),
    ).fit()
    assert result.error is None, result.error
    return result.return_value["history"][0]["train/loss"]


@pytest.mark.timeout(600)
def test_train_seed_repeats_the_first_epoch(tmp_path, ray_session) -> None:
    """`train.seed` fixes pair sampling and file order too: on one worker, two runs with the same
    seed train on the same batches (same first-epoch loss); another seed trains differently."""
    data = tmp_path / "shards"
    write_synthetic_shards(data, n_clips=24, n_frames=40, val_clips=4, clips_per_shard=2)
    over = [*TINY_TRAIN, "train.num_workers=1", "train.epochs=1"]
    cfg = load_config("cpu-small", overrides=[*over, "train.seed=3"])
    a = _first_epoch_loss(data, cfg, tmp_path, "seed3a")
    b = _first_epoch_loss(data, cfg, tmp_path, "seed3b")
    other = load_config("cpu-small", overrides=[*over, "train.seed=4"])
    c = _first_epoch_loss(data, other, tmp_path, "seed4")
    assert a == b, (a, b)
    assert c != a, (a, c)


def _fit_two_workers(data, cfg, tmp_path, name: str):  # type: ignore[no-untyped-def]
    """Fit ``train_loop`` on 2 fractional-CPU workers; a collective that waits more than 60 s
    fails the run (a deadlock becomes an error, not a hang until Ray's 30-minute default)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from se4lip_dist.train import train_loop, training_data_config, training_datasets

    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(data), "tracking_uri": None,
                           "run_id": None},
        torch_config=TorchConfig(timeout_s=60),
        scaling_config=ray.train.ScalingConfig(num_workers=2,
                                               resources_per_worker={"CPU": 0.4}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        datasets=training_datasets(str(data), cfg),
        dataset_config=training_data_config(),
    ).fit()


@pytest.mark.timeout(300)
def test_uneven_ranks_start_every_pass_together(tmp_path, ray_session) -> None:
    """Workers share the training rows equally, not the pairs. One clip of 4 rows under a time
    split: its last row is all validation tail, so one worker's pass holds 2 batches and the
    other's 1. The 3 steps of an epoch take passes the workers must end and begin together: a
    worker that began its next pass alone waited in Ray Data's streaming split for the other,
    which waited for it in the step's all-reduce (a deadlock)."""
    data = tmp_path / "uneven"
    write_synthetic_shards(data, n_clips=1, n_frames=400, val_clips=0, segment_frames=100)
    # Frames [0, 287) train (the tail from 300 validates, after a 13-frame gap): rows 0-2 give
    # 16 pairs (one batch) each, row 3 none.
    cfg = load_config("cpu-small", overrides=[
        *TINY_TRAIN, "train.split=time", "train.val_fraction=0.25", "train.steps_per_epoch=3",
        "train.epochs=2"])
    result = _fit_two_workers(data, cfg, tmp_path, "uneven")
    assert result.error is None, result.error
    assert [h["train/steps"] for h in result.return_value["history"]] == [3, 6]


@pytest.mark.timeout(300)
def test_a_worker_without_training_pairs_fails_every_rank(tmp_path, ray_session) -> None:
    """One clip of 2 rows, half of it held out: one worker's row is all validation tail and
    gives no pair. Every rank raises the same error, which says what to change."""
    from ray.train import WorkerGroupError

    data = tmp_path / "one-row-each"
    write_synthetic_shards(data, n_clips=1, n_frames=200, val_clips=0, segment_frames=100)
    cfg = load_config("cpu-small", overrides=[
        *TINY_TRAIN, "train.split=time", "train.val_fraction=0.5", "train.epochs=1"])
    with pytest.raises(WorkerGroupError) as err:
        _fit_two_workers(data, cfg, tmp_path, "no-pairs")
    message = str(err.value)  # Ray Train shows one snippet for ranks with the same error
    assert "[Rank 0,1 Error Snippet]" in message, message
    assert "1 of 2 workers got no batch of 16 training pairs" in message, message
    assert "train.num_workers" in message and "train.pairs_per_segment" in message
