"""``se4lip-dist train``: Ray Data pairs -> Ray Train ``TorchTrainer`` (DDP) -> MLflow run + model.

The driver (:func:`run_train`) validates the data, resolves tracking, opens (or reopens) the MLflow
run, starts or joins Ray, and fits a ``TorchTrainer`` whose workers run :func:`train_loop`. Every
epoch each worker trains on its streamed share of the pairs, all workers validate on their share
of the validation pairs and segments (results summed with ``all_reduce``), and rank 0 logs to
MLflow and reports a checkpoint. After the fit the driver logs the speech encoder as a pyfunc
model and optionally registers it.

Checkpoint folder layout: ``model.pt`` (whole-model ``state_dict``), ``optim.pt`` (optimizer
``state_dict``), ``state.json`` (epochs done, global step, config dict, metric history). Both
``.pt`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from se4lip_dist.config import Config

RUN_STATE_FILE = "se4lip_run.json"
"""Written into ``storage_path/<run name>/``: the MLflow run a Ray Train run logs into."""
MAX_OFFSET_EVAL_FRAMES = 250
"""Frames of a validation segment used by the AV-offset evaluation (bounds its cost)."""


class TrainError(RuntimeError):
    """A training run that cannot start or resume (bad data, resources, names)."""


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _all_reduce_sum(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather_node_ids() -> list[str]:
    """Ray node id of every worker, in rank order (where the worker group was placed)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    ids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ids, node)
    return [str(i) for i in ids]


def _save_checkpoint(path: Path, model: Any, opt: Any, state: dict[str, Any]) -> None:
    import torch

    torch.save(model.state_dict(), path / "model.pt")
    torch.save(opt.state_dict(), path / "optim.pt")
    (path / "state.json").write_text(json.dumps(state))


def load_checkpoint_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Read a training checkpoint folder without executing pickles.

    Returns:
        ``(model_state, optimizer_state, state)`` where ``state`` has ``epoch`` (epochs done),
        ``step``, ``config`` and ``history``.

    Raises:
        TrainError: a ``.pt`` file is not a plain tensor ``state_dict`` (e.g. pickled code).
    """
    from se4lip_dist.registry import RegistryError, load_weights

    p = Path(path)
    try:
        model_state = load_weights(p / "model.pt", f"checkpoint {p}")
        optim_state = load_weights(p / "optim.pt", f"checkpoint {p}")
    except RegistryError as e:
        raise TrainError(str(e)) from e
    state = json.loads((p / "state.json").read_text())
    return model_state, optim_state, state


def _evaluate(
    model: Any, cfg: Config, device: Any, val_pairs: Any, val_segments: Any, keep_curve: bool
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Validation loss, sync accuracy and AV-offset accuracy over this worker's val shards."""
    import numpy as np
    import torch

    from se4lip_dist.losses import offset_distances, predict_offset, sync_bce_loss, sync_cosine
    from se4lip_dist.models import lip_input
    from se4lip_dist.stream import HARD, sliding_windows

    t, spf = cfg.train.window_frames, cfg.data.samples_per_frame
    model.eval()
    loss_sum = correct = n = hard_ok = hard_n = 0.0
    dim = cfg.model.embed_dim
    # Collapse watch: mean embedding norms, and per-dimension counts of positive (alive) ReLU
    # outputs. A collapsed encoder gives flat distances, and the AV-offset search then reads 0.
    a_norm = v_norm = 0.0
    a_alive, v_alive = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    with torch.no_grad():
        for batch in val_pairs.iter_torch_batches(batch_size=cfg.train.batch_size * 2,
                                                  device=device):
            y = batch["label"]
            a, v = model(batch["wav"], lip_input(batch["lips"], cfg.model))
            a_norm += float(a.float().norm(dim=1).sum())
            v_norm += float(v.float().norm(dim=1).sum())
            a_alive += (a > 0).sum(0).double().cpu()
            v_alive += (v > 0).sum(0).double().cpu()
            loss_sum += float(sync_bce_loss(a, v, y)) * len(y)
            ok = (sync_cosine(a, v) > 0.5) == (y > 0.5)
            hard = batch["kind"] == HARD
            correct += float(ok.sum())
            hard_ok += float((ok & hard).sum())
            hard_n += float(hard.sum())
            n += len(y)
        off_ok = off_n = 0.0
        curve: dict[str, Any] | None = None
        chunk = max(cfg.train.batch_size * 2, 32)
        for seg in val_segments.iter_batches(batch_size=1, batch_format="numpy"):
            lips = np.asarray(seg["lips"][0])
            wav = np.asarray(seg["wav"][0], np.float32)
            lip_win = sliding_windows(lips, t)
            wav_win = sliding_windows(wav, t * spf, spf)
            w = min(len(lip_win), len(wav_win))
            if w <= cfg.train.max_offset:
                continue  # too short for the +-max_offset search
            a_seq, v_seq = [], []
            for i in range(0, w, chunk):
                wl = torch.from_numpy(np.ascontiguousarray(lip_win[i:i + chunk])).to(device)
                ww = torch.from_numpy(np.ascontiguousarray(wav_win[i:i + chunk])).to(device)
                v_seq.append(model.lips(lip_input(wl, cfg.model)).float())
                a_seq.append(model.speech(ww).float())
            dists = offset_distances(torch.cat(a_seq), torch.cat(v_seq), cfg.train.max_offset)
            offset, min_dist, conf = predict_offset(dists.cpu())
            off_ok += float(abs(offset) <= 1)
            off_n += 1
            if keep_curve and curve is None:
                curve = {"clip_id": str(seg["clip_id"][0]), "offset": offset,
                         "min_dist": min_dist, "confidence": conf,
                         "distances": [float(d) for d in dists.cpu()]}
    sums = _all_reduce_sum([loss_sum, correct, n, hard_ok, hard_n, off_ok, off_n, a_norm, v_norm,
                            *a_alive.tolist(), *v_alive.tolist()], device)
    loss_sum, correct, n, hard_ok, hard_n, off_ok, off_n, a_norm, v_norm = sums[:9]
    alive = sums[9:]
    a_dead = sum(c == 0 for c in alive[:dim]) / dim
    v_dead = sum(c == 0 for c in alive[dim:]) / dim
    metrics = {
        "val_loss": loss_sum / n if n else float("nan"),
        "val_sync_acc": correct / n if n else float("nan"),
        "val_offset_acc": off_ok / off_n if off_n else float("nan"),
        # Accuracy on hard negatives (audio 2..hard_offset_max frames off): the fine-sync signal.
        "val_hard_neg_acc": hard_ok / hard_n if hard_n else float("nan"),
        "val_speech_norm": a_norm / n if n else float("nan"),
        "val_lip_norm": v_norm / n if n else float("nan"),
        "val_speech_dead_frac": a_dead if n else float("nan"),
        "val_lip_dead_frac": v_dead if n else float("nan"),
        "val_pairs": n,
        "val_segments": off_n,
    }
    return metrics, curve


def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker training function (runs inside Ray Train workers).

    Args:
        config: ``{"cfg": Config.to_dict(), "tracking_uri": str | None, "run_id": str | None}``.

    Returns:
        On rank 0: ``{"history": [...], "offset_curve": {...} | None, "epochs": int,
        "steps": int}``; None elsewhere.
    """
    import ray.train
    import ray.train.torch
    import torch

    from se4lip_dist.losses import sync_bce_loss, sync_cosine
    from se4lip_dist.models import build_model, lip_input
    from se4lip_dist.tracking import RunLogger

    cfg = Config.from_dict(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=tc.window_frames)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    epoch0, step, history = 0, 0, []
    curve: dict[str, Any] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model_state, optim_state, state = load_checkpoint_dir(d)
        model.load_state_dict(model_state)
        opt.load_state_dict(optim_state)
        epoch0, step, history = state["epoch"], state["step"], state["history"]
        curve = state.get("offset_curve")
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)  # unwrapped: evaluation must not sync DDP buffers
    logger = (RunLogger(config["tracking_uri"], config["run_id"])
              if rank == 0 and config.get("run_id") else None)
    use_amp = tc.amp and device.type == "cuda"
    node_ids = _gather_node_ids()
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    seg_ds = ray.train.get_dataset_shard("val_segments")

    if history and (epoch0 >= tc.epochs or (tc.max_steps is not None and step >= tc.max_steps)):
        # Restored a run that had already finished (a tune driver killed after the trial's last
        # epoch but before Tune saw it end): report the final result again, or Tune gets none.
        ray.train.report(history[-1], checkpoint=ckpt if rank == 0 else None)

    for epoch in range(epoch0, tc.epochs):
        if tc.max_steps is not None and step >= tc.max_steps:
            break
        model.train()
        loss_sum = correct = seen = wait = 0.0
        epoch_start = time.perf_counter()
        batches = iter(train_ds.iter_torch_batches(
            batch_size=tc.batch_size, device=device, drop_last=True,
            local_shuffle_buffer_size=tc.shuffle_buffer or None,
            local_shuffle_seed=None, prefetch_batches=2,
        ))
        while tc.max_steps is None or step < tc.max_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t0
            if batch is None:
                break
            y = batch["label"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                a, v = model(batch["wav"], lip_input(batch["lips"], cfg.model))
                loss = sync_bce_loss(a, v, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip and tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            step += 1
            with torch.no_grad():
                loss_sum += float(loss) * len(y)
                correct += float(((sync_cosine(a, v) > 0.5) == (y > 0.5)).sum())
                seen += len(y)
        elapsed = time.perf_counter() - epoch_start
        loss_sum, correct, seen, wait_all, elapsed_all = _all_reduce_sum(
            [loss_sum, correct, seen, wait, elapsed], device)
        val, new_curve = _evaluate(core, cfg, device, val_ds, seg_ds, keep_curve=rank == 0)
        curve = new_curve or curve
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / seen if seen else float("nan"),
            "train_sync_acc": correct / seen if seen else float("nan"),
            "samples_per_s": seen / elapsed if elapsed else 0.0,
            "data_wait_fraction": wait_all / elapsed_all if elapsed_all else 0.0,
            "epoch_time_s": time.perf_counter() - epoch_start,
            **val,
        }
        history.append(metrics)
        if logger is not None:
            logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
            logger.plots(history, curve)
        state = {"epoch": epoch + 1, "step": step, "config": config["cfg"], "history": history,
                 "offset_curve": curve}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                _save_checkpoint(Path(tmp), core, opt, state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
    if rank != 0:
        return None
    return {"history": history, "offset_curve": curve,
            "epochs": history[-1]["epoch"] if history else epoch0, "steps": step,
            "worker_node_ids": node_ids}


def training_datasets(data_dir: str, cfg: Config) -> dict[str, Any]:
    """The Ray Datasets ``train_loop`` reads: train pairs, val pairs, val segments."""
    from se4lip_dist.stream import pair_dataset

    return {"train": pair_dataset(data_dir, cfg, "train"), **_validation_datasets(data_dir, cfg)}


def _validation_datasets(data_dir: str, cfg: Config) -> dict[str, Any]:
    from se4lip_dist.stream import pair_dataset, segment_dataset

    return {
        "val": pair_dataset(data_dir, cfg, "val"),
        "val_segments": segment_dataset(data_dir, cfg, "val", max_frames=MAX_OFFSET_EVAL_FRAMES),
    }


def validate(model_state: dict[str, Any], cfg: Config, data_dir: str) -> dict[str, float]:
    """Validation metrics of a whole-model ``state_dict`` on a prepared folder, in this process.

    The same protocol as the per-epoch validation (fixed-seed val pairs, AV-offset search on the
    val segments), so two models scored here are compared on the same validation shards. Starts
    a local Ray for the data stream when none is running.
    """
    import torch

    from se4lip_dist.models import build_model
    from se4lip_dist.runtime import init_ray

    init_ray(None)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    model.load_state_dict(model_state)
    val = _validation_datasets(data_dir, cfg)
    metrics, _ = _evaluate(model, cfg, torch.device("cpu"), val["val"], val["val_segments"],
                           keep_curve=False)
    return metrics


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def default_storage_path() -> str:
    """``<cwd>/se4lip-runs/ray``: Ray Train run folders (checkpoints) of the embedded setup."""
    from se4lip_dist.tracking import RUNS_DIR

    return str(Path.cwd().resolve() / RUNS_DIR / "ray")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path).resolve()


def _resolve_name(storage: str, run_name: str | None, resume: bool) -> tuple[str, dict | None]:
    """Ray Train run name and, when resuming, the saved :data:`RUN_STATE_FILE` contents."""
    if not _is_local(storage):
        if resume and not run_name:
            raise TrainError("--resume with a remote storage path needs the run name")
        return run_name or f"se4lip-{uuid.uuid4().hex[:8]}", None
    root = _local_path(storage)
    if resume:
        if run_name:
            state_file = root / run_name / RUN_STATE_FILE
        else:
            runs = sorted(root.glob(f"*/{RUN_STATE_FILE}"), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise TrainError(f"--resume: no se4lip training run under {root}")
            state_file = runs[-1]
        if not state_file.is_file():
            known = sorted(p.parent.name for p in root.glob(f"*/{RUN_STATE_FILE}"))
            raise TrainError(f"--resume: no run {run_name!r} under {root}; runs there: {known}")
        return state_file.parent.name, json.loads(state_file.read_text())
    base = run_name or "se4lip"
    # A fresh run never reuses a folder: Ray Train would silently resume it.
    name = base if run_name and not (root / base).exists() else f"{base}-{uuid.uuid4().hex[:6]}"
    return name, None


def _write_run_state(storage: str, name: str, state: dict[str, Any]) -> None:
    if _is_local(storage):
        d = _local_path(storage) / name
        d.mkdir(parents=True, exist_ok=True)
        (d / RUN_STATE_FILE).write_text(json.dumps(state, indent=1))


def run_train(
    cfg: Config,
    data_dir: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = "se4lip",
    run_name: str | None = None,
    register: str | None = None,
    resume: bool = False,
    use_gpu: bool = False,
    address: str | None = None,
    storage_path: str | None = None,
    max_failures: int = 2,
) -> dict[str, Any]:
    """Train SE4Lip encoders on prepared shards with Ray Train, tracked in MLflow.

    Args:
        cfg: resolved config (``train.num_workers``/``cpus_per_worker`` size the worker group).
        data_dir: prepared-shards folder (``manifest.json`` + shards), readable by every node.
        tracking_uri: MLflow tracking URI; None: ``MLFLOW_TRACKING_URI`` or the local store.
        experiment: MLflow experiment name (created if missing).
        run_name: Ray Train run name and MLflow run name. A fresh run gets a unique suffix when
            the name is taken or missing; with ``resume`` it names the run to continue.
        register: register the final model under this name (alias ``candidate``).
        resume: continue the named (else the most recent) run from its last checkpoint, in the
            same MLflow run. ``train.epochs`` may be raised to train longer.
        use_gpu: one GPU per worker (nccl, bf16 autocast when ``train.amp``).
        address: Ray cluster address; None starts a local Ray (stopped again at the end).
        storage_path: where Ray Train keeps run folders and checkpoints (default
            ``<cwd>/se4lip-runs/ray``); use shared storage (NFS, S3) on a multi-node cluster.
        max_failures: worker-group restarts (from the last checkpoint) before the run fails.

    Returns:
        ``run_id``, ``run_name``, ``experiment``, ``model_uri``, ``val_loss``, ``val_sync_acc``,
        ``val_offset_acc``, ``train_loss``, ``samples_per_s``, ``data_wait_fraction``,
        ``epochs``, ``steps``, ``checkpoint``, ``registered_name``, ``registered_version``,
        ``tracking_uri`` (credentials removed), ``worker_node_ids`` (Ray node of each rank),
        ``history``.

    Raises:
        TrainError, ManifestError, TrackingError: with a message that says what to fix.
    """
    from se4lip_dist.manifest import Manifest
    from se4lip_dist.stream import manifest_splits
    from se4lip_dist.tracking import (
        check_reachable,
        flatten,
        git_revision,
        redact_uri,
        reopen_run,
        resolve_tracking_uri,
        start_run,
    )

    manifest = Manifest.load(data_dir)
    manifest.check_shards(data_dir)  # another schema version fails here, before any run exists
    splits = manifest_splits(manifest, cfg.train.val_fraction)
    if not splits["train"] or not splits["val"]:
        raise TrainError(f"{data_dir}: need clips in both train and val splits, got "
                         f"{len(splits['train'])} train / {len(splits['val'])} val")
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)  # before Ray starts: a wrong URI fails in seconds, not after training
    storage = storage_path or default_storage_path()
    name, saved = _resolve_name(storage, run_name, resume)
    data_hash = manifest.content_hash()

    if saved is not None:
        saved_cfg = Config.from_dict(saved["config"])
        if saved_cfg.model != cfg.model or saved_cfg.train.window_frames != cfg.train.window_frames:
            raise TrainError(f"--resume {name}: the model config differs from the saved run's; "
                             "resume with the same preset/--config/--set model.*")
        run_id = saved["run_id"]
        reopen_run(uri, run_id)
    else:
        params = flatten(cfg.to_dict())
        params.update({"data.dir": str(Path(data_dir).resolve()), "data.manifest_hash": data_hash,
                       "data.train_clips": len(splits["train"]),
                       "data.val_clips": len(splits["val"]), "ray.run_name": name,
                       "ray.storage_path": redact_uri(storage)})
        tags = {"se4lip.preset": cfg.preset, "se4lip.data_manifest_hash": data_hash,
                "se4lip.ray_run_name": name}
        rev = git_revision()
        if rev:
            tags["mlflow.source.git.commit"] = rev
        run_id = start_run(uri, experiment, name, params=params, tags=tags,
                           config_yaml=cfg.to_yaml())
        _write_run_state(storage, name, {"run_id": run_id, "experiment": experiment,
                                         "config": cfg.to_dict(), "data_dir": str(data_dir)})

    try:
        out = _fit(cfg, data_dir, uri, run_id, name, storage, use_gpu, address, max_failures)
        result = _finish(cfg, out, uri, run_id, register, data_hash)
    except BaseException:
        from se4lip_dist.tracking import end_run

        end_run(uri, run_id, status="FAILED")
        raise
    result.update({"run_name": name, "experiment": experiment,
                   "tracking_uri": redact_uri(uri), "storage_path": redact_uri(storage)})
    return result


def _fit(cfg: Config, data_dir: str, uri: str, run_id: str, name: str, storage: str,
         use_gpu: bool, address: str | None, max_failures: int) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from se4lip_dist.runtime import cluster_cpus, init_ray

    tc = cfg.train
    started = not ray.is_initialized()
    init_ray(address)
    try:
        if address is None and not use_gpu:
            free = cluster_cpus() - tc.num_workers * tc.cpus_per_worker
            if free < 0.5:
                raise TrainError(
                    f"{tc.num_workers} workers x {tc.cpus_per_worker} CPU leave {free:g} of "
                    f"{cluster_cpus():g} CPUs for Ray Data, which then hangs; lower "
                    "train.cpus_per_worker or train.num_workers")
        datasets = training_datasets(data_dir, cfg)
        resources = {"CPU": tc.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id},
            scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
            datasets=datasets,
        )
        result = trainer.fit()
        if result.error is not None:
            raise TrainError(f"training failed: {result.error}") from result.error
        out = dict(result.return_value or {})
        if result.checkpoint is None:
            raise TrainError("training finished without a checkpoint (epochs=0 or max_steps=0?)")
        with result.checkpoint.as_directory() as d:
            model_state, _, state = load_checkpoint_dir(d)
        out["model_state"] = model_state
        out["checkpoint"] = result.checkpoint.path
        out.setdefault("history", state["history"])
        out.setdefault("epochs", state["epoch"])
        out.setdefault("steps", state["step"])
        return out
    finally:
        if started:
            ray.shutdown()


def _worker_env() -> dict[str, str]:
    """Env for workers: MLflow credentials (never logged) and quiet defaults."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    return env


def _finish(cfg: Config, out: dict[str, Any], uri: str, run_id: str, register: str | None,
            data_hash: str) -> dict[str, Any]:
    from se4lip_dist.registry import log_model, register_model
    from se4lip_dist.tracking import end_run

    history = out.get("history") or []
    last = history[-1] if history else {}
    model_uri = log_model(uri, run_id, cfg, out.pop("model_state"))
    version = None
    if register:
        tags = {k: last[k] for k in ("val_loss", "val_sync_acc", "val_offset_acc") if k in last}
        tags.update({"data_manifest_hash": data_hash, "preset": cfg.preset, "run_id": run_id})
        version = register_model(uri, model_uri, register, tags=tags)
    end_run(uri, run_id, status="FINISHED")
    return {
        "run_id": run_id,
        "model_uri": model_uri,
        "registered_name": register,
        "registered_version": version,
        "val_loss": last.get("val_loss"),
        "val_sync_acc": last.get("val_sync_acc"),
        "val_offset_acc": last.get("val_offset_acc"),
        "train_loss": last.get("train_loss"),
        "samples_per_s": last.get("samples_per_s"),
        "data_wait_fraction": last.get("data_wait_fraction"),
        "epochs": out.get("epochs"),
        "steps": out.get("steps"),
        "checkpoint": out.get("checkpoint"),
        "offset_curve": out.get("offset_curve"),
        "worker_node_ids": out.get("worker_node_ids", []),
        "history": history,
    }


__all__ = [
    "RUN_STATE_FILE",
    "TrainError",
    "load_checkpoint_dir",
    "run_train",
    "train_loop",
    "validate",
]
