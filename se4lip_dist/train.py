"""``se4lip-dist train``: Ray Data pairs -> Ray Train ``TorchTrainer`` (DDP) -> MLflow run + model.

The driver (:func:`run_train`) validates the data, resolves tracking, opens (or reopens) the MLflow
run, starts or joins Ray, and fits a ``TorchTrainer`` whose workers run :func:`train_loop`. Every
epoch each worker trains on its streamed share of the pairs, all workers score their share of the
validation clips (:mod:`se4lip_dist.validation`, sums reduced across ranks), and rank 0 logs to
MLflow and reports a checkpoint. The best validated epoch (``train.select_metric``) is kept in
every checkpoint; after the fit the driver hands it to :mod:`se4lip_dist.lifecycle` (log,
register, gate, alias).

Checkpoint folder layout: ``model.pt`` (the last epoch's whole-model ``state_dict``),
``best.pt`` (the best epoch's), ``optim.pt`` (optimizer ``state_dict``), ``state.json`` (epochs
done, global step, config dict, metric history, best epoch, AMP scaler state). The ``.pt`` files
are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from ray.train.torch import TorchTrainer

from se4lip_dist import storage
from se4lip_dist.augment import augment_batch
from se4lip_dist.config import Config, flatten
from se4lip_dist.lifecycle import Candidate, GateError, publish
from se4lip_dist.losses import sync_bce_loss, sync_cosine
from se4lip_dist.manifest import Manifest
from se4lip_dist.models import build_model, lip_input
from se4lip_dist.placement import DEFAULT_TIMEOUT_S, PlacementError, wait_placeable
from se4lip_dist.registry import RegistryError, load_model_state, load_weights, pin_model
from se4lip_dist.resources import train_plan
from se4lip_dist.runtime import cluster_cpus, init_ray, own_sigint, worker_env
from se4lip_dist.splits import SplitRule, clip_frames
from se4lip_dist.stream import PairSpec, iter_pair_batches, pair_seed, row_dataset
from se4lip_dist.tracking import (
    RUNS_DIR,
    RunLogger,
    check_cluster_store,
    check_reachable,
    end_run,
    log_datasets,
    log_parent_model,
    redact_uri,
    reopen_run,
    resolve_tracking_uri,
    set_description,
    start_run,
)
from se4lip_dist.validation import METRICS, ValidationSet, is_better, metric_name, score

RUN_STATE_FILE = "se4lip_run.json"
"""Written into ``storage_path/<run name>/``: the MLflow run a Ray Train run logs into."""
BEST_PREFIX = "best/"
"""Reported beside each epoch's metrics: the best epoch so far and its value."""


class TrainError(RuntimeError):
    """A training run that cannot start or resume (bad data, resources, names)."""


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _all_reduce_sum(values: list[float], device: Any) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_have(has: bool, world: int, device: Any) -> bool:
    """True when every rank ``has`` (one MIN all-reduce; no collective on a single rank)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return has
    t = torch.tensor([1.0 if has else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _gather_node_ids() -> list[str]:
    """Ray node id of every worker, in rank order (where the worker group was placed)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    ids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ids, node)
    return [str(i) for i in ids]


@dataclass
class Restored:
    """What a checkpoint folder holds (see the module docstring)."""

    model: dict[str, Any]
    best: dict[str, Any]
    optim: dict[str, Any]
    state: dict[str, Any]


def load_checkpoint_dir(path: str | Path) -> Restored:
    """Read a training checkpoint folder without executing pickles.

    Raises:
        TrainError: a ``.pt`` file is not a plain tensor ``state_dict`` (e.g. pickled code).
    """
    p = Path(path)
    try:
        model_state = load_weights(p / "model.pt", f"checkpoint {p}")
        optim_state = load_weights(p / "optim.pt", f"checkpoint {p}")
        best_state = (load_weights(p / "best.pt", f"checkpoint {p}")
                      if (p / "best.pt").is_file() else model_state)
    except RegistryError as e:
        raise TrainError(str(e)) from e
    state = json.loads((p / "state.json").read_text())
    return Restored(model=model_state, best=best_state, optim=optim_state, state=state)


def _save_checkpoint(path: Path, model: Any, best: dict[str, Any], opt: Any,
                     state: dict[str, Any]) -> None:
    torch.save(model.state_dict(), path / "model.pt")
    torch.save(best, path / "best.pt")
    torch.save(opt.state_dict(), path / "optim.pt")
    (path / "state.json").write_text(json.dumps(state))


def place_model(model: Any, cfg: Config, restored: Restored | None, place: Any,
                init: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """Load weights, move the model to its device, then build the optimizer and scaler.

    The order matters: ``Optimizer.load_state_dict`` casts the saved state to the device and
    dtype of the parameters it is given, so it must see the placed parameters; state loaded
    before ``place`` stays on the CPU and the first step after a resume fails on a GPU. A frozen
    lip encoder is frozen before ``place`` too, so DDP leaves its parameters alone.

    Args:
        model: a freshly built SE4Lip.
        cfg: its config (``train.lr``, ``weight_decay``, ``amp_dtype``, ``freeze_lips``,
            ``lips_lr_scale``).
        restored: the checkpoint to continue from, or None.
        place: moves (and wraps) the model, e.g. ``ray.train.torch.prepare_model``.
        init: warm-start weights (a whole-model ``state_dict``), used when nothing is restored.

    Returns:
        ``(placed model, optimizer, GradScaler)``; the scaler is enabled for fp16 autocast only.
    """
    tc = cfg.train
    if restored is not None:
        model.load_state_dict(restored.model)
    elif init is not None:
        model.load_state_dict(init)
    if tc.freeze_lips:
        model.lips.requires_grad_(False)
    model = place(model)
    core = getattr(model, "module", model)
    groups = [{"params": list(core.speech.parameters()), "lr": tc.lr}]
    if not tc.freeze_lips:
        groups.append({"params": list(core.lips.parameters()), "lr": tc.lr * tc.lips_lr_scale})
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=_amp_dtype(cfg, device) == torch.float16)
    if restored is not None:
        opt.load_state_dict(restored.optim)
        if restored.state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(restored.state["scaler"])
    return model, opt, scaler


def _amp_dtype(cfg: Config, device: Any) -> Any:
    """Autocast dtype on CUDA (None: full precision)."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.float16 if cfg.train.amp_dtype == "fp16" else torch.bfloat16


def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker training function (runs inside Ray Train workers).

    Args:
        config: ``{"cfg": Config.to_dict(), "data_dir": str, "tracking_uri": str | None,
            "run_id": str | None}``.

    Returns:
        On rank 0: ``{"history", "epochs", "steps", "best_epoch", "worker_node_ids"}``; None
        elsewhere.
    """
    cfg = Config.from_dict(config["cfg"])
    tc = cfg.train
    metric = metric_name(tc.select_metric)
    mode = METRICS[metric]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=tc.window_frames)
    ckpt = ray.train.get_checkpoint()
    restored = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = load_checkpoint_dir(d)
    init = None
    if restored is None and config.get("init_state") is not None:
        init = ray.get(config["init_state"])  # warm start: the weights of train.init
    model, opt, scaler = place_model(model, cfg, restored, ray.train.torch.prepare_model, init)
    core = getattr(model, "module", model)  # unwrapped: evaluation must not sync DDP buffers
    epoch0, step, history = 0, 0, []
    best_epoch, best_metrics, best_state = 0, {}, None
    if restored is not None:
        st = restored.state
        epoch0, step, history = st["epoch"], st["step"], st["history"]
        best_epoch = st.get("best_epoch", epoch0)
        best_metrics = st.get("best_metrics", history[-1] if history else {})
        best_state = restored.best
    amp = _amp_dtype(cfg, device)
    # Augmentation draws: reproducible per seed, rank and the epoch the worker (re)started at.
    aug_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + rank * 7919 + epoch0)
    vset = ValidationSet.load(config["data_dir"], cfg, rank=rank, world=world)
    node_ids = _gather_node_ids()
    train_ds = ray.train.get_dataset_shard("train")
    rule = SplitRule.for_manifest(Manifest.load(config["data_dir"]), cfg)
    logger = None
    monitor = None
    if rank == 0 and config.get("run_id"):
        logger = RunLogger(config["tracking_uri"], config["run_id"])
        monitor = logger.system_metrics(resume=restored is not None)

    if history and (epoch0 >= tc.epochs or (tc.max_steps is not None and step >= tc.max_steps)):
        # Restored a run that had already finished (a tune driver killed after the trial's last
        # epoch but before Tune saw it end): report the final result again, or Tune gets none.
        ray.train.report(history[-1], checkpoint=ckpt if rank == 0 else None)

    try:
        for epoch in range(epoch0, tc.epochs):
            if tc.max_steps is not None and step >= tc.max_steps:
                break
            model.train()
            if tc.freeze_lips:
                core.lips.eval()  # frozen means its BatchNorm statistics too
            loss_sum = correct = seen = wait = 0.0
            epoch_start = time.perf_counter()
            epoch_steps = 0
            batches = _batches(train_ds, cfg, rule, epoch, device, world)
            while tc.max_steps is None or step < tc.max_steps:
                if tc.steps_per_epoch is not None and epoch_steps >= tc.steps_per_epoch:
                    break
                t0 = time.perf_counter()
                batch = next(batches, None)  # None on every rank at once (see _batches)
                wait += time.perf_counter() - t0
                if batch is None:
                    break
                y = batch["label"]
                wav, lips = batch["wav"], batch["lips"]
                if cfg.augment.enabled:
                    wav, lips = augment_batch(wav, lips, cfg.augment, cfg.data.sample_rate,
                                              aug_gen)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    a, v = model(wav, lip_input(lips, cfg.model))
                    loss = sync_bce_loss(a, v, y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tc.grad_clip and tc.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                scaler.step(opt)
                scaler.update()
                step += 1
                epoch_steps += 1
                with torch.no_grad():
                    loss_sum += float(loss) * len(y)
                    correct += float(((sync_cosine(a, v) > 0.5) == (y > 0.5)).sum())
                    seen += len(y)
            batches.close()  # the pass's split stops streaming; every rank stopped at this step
            elapsed = time.perf_counter() - epoch_start
            loss_sum, correct, seen, wait_all, elapsed_all = _all_reduce_sum(
                [loss_sum, correct, seen, wait, elapsed], device)
            _sync_buffers(core)
            val = score(core, cfg, vset, device, keep_curve=rank == 0)
            metrics = {
                "train/loss": loss_sum / seen if seen else float("nan"),
                "train/sync_acc": correct / seen if seen else float("nan"),
                "train/steps": step,
                "perf/samples_per_s": seen / elapsed if elapsed else 0.0,
                "perf/data_wait_fraction": wait_all / elapsed_all if elapsed_all else 0.0,
                "perf/epoch_time_s": time.perf_counter() - epoch_start,
                **val.metrics,
            }
            if best_state is None or is_better(val.metrics, best_metrics, metric, mode):
                best_epoch, best_metrics = epoch + 1, dict(val.metrics)
                best_state = {k: t.detach().cpu().clone() for k, t in core.state_dict().items()}
            metrics[f"{BEST_PREFIX}epoch"] = best_epoch
            metrics[f"{BEST_PREFIX}{metric}"] = best_metrics[metric]
            history.append({"epoch": epoch + 1, **metrics})
            if logger is not None:
                logger.metrics(metrics, step=epoch + 1)
                logger.table(val.table(), f"validation/clips_epoch{epoch + 1:03d}.json")
                logger.plots(history, _curve(val.clips))
            state = {"epoch": epoch + 1, "step": step, "config": config["cfg"],
                     "history": history, "best_epoch": best_epoch,
                     "best_metrics": best_metrics,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None}
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    _save_checkpoint(Path(tmp), core, best_state, opt, state)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"epoch": epoch + 1, **metrics}, checkpoint=checkpoint)
    finally:
        if monitor is not None:
            monitor.finish()
    if rank != 0:
        return None
    return {"history": history, "epochs": history[-1]["epoch"] if history else epoch0,
            "steps": step, "best_epoch": best_epoch, "worker_node_ids": node_ids}


def _batches(train_ds: Any, cfg: Config, rule: Any, epoch: int, device: Any,
             world: int) -> Iterator[dict[str, Any]]:
    """Training batches of one epoch: one pass over the rows, or, with
    ``train.steps_per_epoch``, as many fresh passes as the steps need. Pairs are drawn from
    ``(train.seed, epoch, pass)`` (and the rows), so a run with the same seed repeats them.

    Ranks get equal shares of the rows, not of the pairs (a row's pairs depend on its split and
    length), so one rank's pass can end first. Every batch is therefore agreed on (one MIN
    all-reduce): when any rank's pass has ended, every rank ends it, and all begin the next one
    together. A rank that began its next pass alone would wait in Ray Data's streaming split
    for the others to begin it too, while they wait for it in the step's all-reduce.

    Raises:
        TrainError: on every rank, when some rank's pass yields no batch at all.
    """
    tc = cfg.train
    spec = PairSpec.from_config(cfg)
    for pass_index in itertools.count():
        stream = iter_pair_batches(
            train_ds, spec=spec, rule=rule, seed=pair_seed(tc.seed, epoch, pass_index),
            batch_size=tc.batch_size, device=device, shuffle_buffer=tc.shuffle_buffer)
        produced = False
        try:
            while _all_have((batch := next(stream, None)) is not None, world, device):
                produced = True
                yield batch
        finally:
            stream.close()  # release this pass's split before any rank begins the next
        if not produced:
            raise _no_batch_error(batch is not None, world, tc.batch_size, device)
        if tc.steps_per_epoch is None:
            return


def _no_batch_error(has: bool, world: int, batch_size: int, device: Any) -> TrainError:
    """The error of a pass in which some rank got no batch; every rank raises the same one."""
    if world == 1:
        return TrainError(f"the training pairs give no batch of {batch_size}: raise "
                          "train.pairs_per_segment or lower train.batch_size")
    lacking = int(_all_reduce_sum([0.0 if has else 1.0], device)[0])
    return TrainError(
        f"{lacking} of {world} workers got no batch of {batch_size} training pairs: workers "
        "share the training rows, not the pairs, and a row can give none (e.g. a clip's "
        "validation tail under train.split=time); use fewer workers (train.num_workers), more "
        "pairs (more clips, train.pairs_per_segment) or a smaller train.batch_size")


def _sync_buffers(model: Any) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP's
    per-forward broadcasts): validation then scores exactly the weights the checkpoint holds."""
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _curve(clips: list[Any]) -> dict[str, Any] | None:
    """The distance-vs-offset curve kept for the plot (first clip of rank 0, as recorded)."""
    kept = next((c for c in clips if 0 in c.distances), None)
    if kept is None:
        return None
    return {"clip_id": kept.clip_id, "offset": kept.offsets[kept.shifts.index(0)],
            "distances": kept.distances[0]}


def training_datasets(data_dir: str, cfg: Config) -> dict[str, Any]:
    """The Ray Datasets ``train_loop`` reads (validation is read by each worker itself)."""
    return {"train": row_dataset(data_dir, cfg)}


def training_data_config() -> Any:
    """``TorchTrainer(dataset_config=...)`` for :func:`training_datasets`.

    Ray Train replaces each dataset's execution options with its ingest defaults; this keeps
    Ray Data's ingest defaults but preserves the read order of the training rows, which
    ``train.seed`` needs to repeat a run.
    """
    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(execution_options={"train": opts})


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def load_init(cfg: Config, tracking_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The warm-start weights of ``cfg.train.init`` and where they came from.

    Args:
        cfg: the run's config; ``train.init`` is a model URI or a checkpoint folder.
        tracking_uri: resolves ``models:/`` and ``runs:/`` URIs.

    Returns:
        ``(whole-model state_dict, info)``: ``info`` has ``uri``, ``pinned_uri`` and, when
        known, ``name``, ``version``, ``run_id``, ``model_id``.

    Raises:
        TrainError: the model cannot be loaded, or its architecture or window differs.
    """
    src = cfg.train.init
    assert src is not None
    try:
        if storage.is_local(src) and storage.is_file(storage.join(src, "state.json")):
            restored = load_checkpoint_dir(src)
            state, init_cfg = restored.best, Config.from_dict(restored.state["config"])
            info = {"uri": src, "pinned_uri": storage.absolute(src)}
        else:
            info = pin_model(src, tracking_uri)
            state, init_cfg = load_model_state(info["pinned_uri"], tracking_uri)
    except RegistryError as e:
        raise TrainError(f"train.init {src}: {e}") from e
    diff = {k: (v, getattr(cfg.model, k)) for k, v in vars(init_cfg.model).items()
            if getattr(cfg.model, k) != v}
    if init_cfg.train.window_frames != cfg.train.window_frames:
        diff["train.window_frames"] = (init_cfg.train.window_frames, cfg.train.window_frames)
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items()))
        raise TrainError(f"train.init {src} has another architecture ({shown}): train with its "
                         f"preset ({init_cfg.preset}) or the same --set model.* values")
    return state, info


def run_label(cfg: Config) -> str:
    """What a run is, for its name: preset, speech backbone, window and learning rate."""
    m, t = cfg.model, cfg.train
    backbone = f"gru{m.gru_layers}" if m.backbone == "gru" else "cnn"
    front = "" if m.frontend == "stft" else f"{m.frontend}-"
    return f"{cfg.preset}-{front}{backbone}-w{t.window_frames}-lr{t.lr:.0e}".replace("e-0", "e-")


def default_storage_path() -> str:
    """``<cwd>/se4lip-runs/ray``: Ray Train run folders (checkpoints) of the embedded setup."""
    return str(Path.cwd().resolve() / RUNS_DIR / "ray")


def _resolve_name(storage_path: str, run_name: str | None, resume: bool,
                  label: str) -> tuple[str, dict | None]:
    """Ray Train run name and, when resuming, the saved :data:`RUN_STATE_FILE` contents.

    Works the same on a local folder and on object storage (``s3://...``).
    """
    root = storage.absolute(storage_path)
    if resume:
        if run_name:
            state_file = storage.join(root, run_name, RUN_STATE_FILE)
        else:
            runs = [storage.join(root, d, RUN_STATE_FILE) for d in storage.listdir(root)]
            runs = [r for r in runs if storage.is_file(r)]
            if not runs:
                raise TrainError(f"--resume: no se4lip training run under {root}")
            state_file = max(runs, key=lambda r: storage.stat(r).mtime_ns)
        if not storage.is_file(state_file):
            known = sorted(d for d in storage.listdir(root)
                           if storage.is_file(storage.join(root, d, RUN_STATE_FILE)))
            raise TrainError(f"--resume: no run {run_name!r} under {root}; runs there: {known}")
        name = storage.basename(storage.parent(state_file))
        return name, json.loads(storage.read_text(state_file))
    base = run_name or label
    # A fresh run never reuses a folder: Ray Train would silently resume it.
    taken = run_name is None or base in storage.listdir(root)
    return (f"{base}-{uuid.uuid4().hex[:6]}" if taken else base), None


def _write_run_state(storage_path: str, name: str, state: dict[str, Any]) -> None:
    storage.write_atomic(storage.join(storage.absolute(storage_path), name, RUN_STATE_FILE),
                         json.dumps(state, indent=1))


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
    placement_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train SE4Lip encoders on prepared shards with Ray Train, tracked in MLflow.

    Args:
        cfg: resolved config (``train.num_workers`` and ``cpus_per_worker``, or
            ``cpus_per_gpu_worker`` with ``use_gpu``, size the worker group;
            ``train.select_metric`` picks the epoch that is logged and registered).
        data_dir: prepared-shards folder (``manifest.json`` + shards), readable by every node.
        tracking_uri: MLflow tracking URI; None: ``MLFLOW_TRACKING_URI`` or the local store.
        experiment: MLflow experiment name (created if missing).
        run_name: Ray Train run name and MLflow run name (default: preset, backbone, window
            and lr). A fresh run gets a unique suffix when the name is taken or missing; with
            ``resume`` it names the run to continue.
        register: register the best epoch's model under this name and gate it
            (:mod:`se4lip_dist.lifecycle`).
        resume: continue the named (else the most recent) run from its last checkpoint, in the
            same MLflow run. ``train.epochs`` may be raised to train longer.
        use_gpu: one GPU and ``train.cpus_per_gpu_worker`` CPUs per worker (nccl, autocast
            when ``train.amp``).
        address: Ray cluster address; None starts a local Ray (stopped again at the end).
        storage_path: where Ray Train keeps run folders and checkpoints (default
            ``<cwd>/se4lip-runs/ray``); use shared storage (NFS, S3) on a multi-node cluster.
        max_failures: worker-group restarts (from the last checkpoint) before the run fails.
        placement_timeout_s: longest wait for the workers to be placed (default
            ``placement.DEFAULT_TIMEOUT_S``); a request no node can hold fails at once.

    Returns:
        ``run_id``, ``run_name``, ``experiment``, ``model_uri``, ``best_epoch``, ``metrics``
        (the best epoch's), ``last`` (the last epoch's), ``epochs``, ``steps``, ``checkpoint``,
        ``registered`` (name, version, alias, reason, scores; None without ``register``),
        ``tracking_uri`` (credentials removed), ``worker_node_ids``, ``history``.

    Raises:
        TrainError, ManifestError, TrackingError, ValidationError: with a message that says
        what to fix. GateError: trained and logged, but registering or gating failed.
    """
    metric_name(cfg.train.select_metric)  # an unknown metric fails before anything starts
    data_dir = storage.absolute(data_dir)  # workers run elsewhere: an absolute path or URL
    manifest = Manifest.load(data_dir)
    manifest.check_shards(data_dir)  # another schema version fails here, before any run exists
    rule = SplitRule.for_manifest(manifest, cfg)
    frames = clip_frames(manifest, rule)
    if not frames["train"] or not frames["val"]:
        raise TrainError(f"{data_dir}: need frames to train on and to validate on; "
                         f"{rule.describe()} gives {len(frames['train'])} training and "
                         f"{len(frames['val'])} validation clips")
    splits = {role: sorted(frames[role]) for role in frames}
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)  # before Ray starts: a wrong URI fails in seconds, not after training
    if address or os.environ.get("RAY_ADDRESS"):
        check_cluster_store(uri, "train")
    init_state, init_info = (load_init(cfg, uri) if cfg.train.init and not resume
                             else (None, None))
    store = storage.absolute(storage_path or default_storage_path())
    name, saved = _resolve_name(store, run_name, resume, run_label(cfg))
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
        params.update({"data.dir": redact_uri(str(data_dir)), "data.manifest_hash": data_hash,
                       "data.train_clips": len(splits["train"]),
                       "data.val_clips": len(splits["val"]),
                       "data.train_frames": sum(frames["train"].values()),
                       "data.val_frames": sum(frames["val"].values()),
                       "data.split": rule.describe(), "ray.run_name": name,
                       "ray.storage_path": redact_uri(store)})
        tags = {"se4lip.preset": cfg.preset, "se4lip.data_manifest_hash": data_hash,
                "se4lip.ray_run_name": name, "se4lip.kind": "train"}
        run_id = start_run(
            uri, experiment, name, params=params, tags=tags, config_yaml=cfg.to_yaml(),
            command="train",
            description=(f"Training run: preset `{cfg.preset}`, {run_label(cfg)}, on "
                         f"{len(splits['train'])} train / {len(splits['val'])} validation clips "
                         f"of data `{data_hash}`. The best epoch by `{cfg.train.select_metric}` "
                         "is the logged model."))
        log_datasets(uri, run_id, data_hash=data_hash, source=str(data_dir),
                     splits={"training": splits["train"], "validation": splits["val"]})
        if init_info is not None:
            log_parent_model(uri, run_id, init_info)
        _write_run_state(store, name, {"run_id": run_id, "experiment": experiment,
                                       "config": cfg.to_dict(), "data_dir": data_dir})

    try:
        out = _fit(cfg, data_dir, uri, run_id, name, store, use_gpu, address, max_failures,
                   placement_timeout_s, init_state)
    except BaseException:
        from se4lip_dist.tracking import end_run

        end_run(uri, run_id, status="FAILED")
        raise
    result = _finish(cfg, out, uri, run_id, register, data_dir, data_hash)
    result.update({"run_name": name, "experiment": experiment,
                   "tracking_uri": redact_uri(uri), "storage_path": redact_uri(store)})
    return result


def _fit(cfg: Config, data_dir: str, uri: str, run_id: str, name: str, store: str,
         use_gpu: bool, address: str | None, max_failures: int,
         placement_timeout_s: float | None,
         init_state: dict[str, Any] | None = None) -> dict[str, Any]:
    tc = cfg.train
    started = not ray.is_initialized()
    init_ray(address)
    try:
        plan = train_plan(tc, use_gpu)
        resources = plan.worker_bundle()
        try:  # first: a group this cluster can never hold names the resource it lacks
            wait_placeable(resources, tc.num_workers, f"{tc.num_workers} training workers",
                           timeout_s=placement_timeout_s or DEFAULT_TIMEOUT_S)
        except PlacementError as e:
            raise TrainError(str(e)) from e
        if address is None:
            free = cluster_cpus() - tc.num_workers * plan.worker_cpus
            if free < 0.5:
                raise TrainError(
                    f"{tc.num_workers} workers x {plan.worker_cpus:g} CPU leave {free:g} of "
                    f"{cluster_cpus():g} CPUs for Ray Data, which then hangs; lower "
                    f"{plan.cpu_key} or train.num_workers")
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(data_dir),
                               "tracking_uri": uri, "run_id": run_id,
                               # Through the object store: a model is too big for the config.
                               "init_state": ray.put(init_state) if init_state else None},
            scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=store,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": worker_env()},
            ),
            datasets=training_datasets(data_dir, cfg),
            dataset_config=training_data_config(),
        )
        with own_sigint():
            result = trainer.fit()
        if result.error is not None:
            raise TrainError(f"training failed: {result.error}") from result.error
        out = dict(result.return_value or {})
        if result.checkpoint is None:
            raise TrainError("training finished without a checkpoint (epochs=0 or max_steps=0?)")
        with result.checkpoint.as_directory() as d:
            restored = load_checkpoint_dir(d)
        out["best_state"] = restored.best
        out["checkpoint"] = (result.checkpoint.path if storage.is_local(store)
                             else f"{storage.scheme(store)}://{result.checkpoint.path}")
        out.setdefault("history", restored.state["history"])
        out.setdefault("epochs", restored.state["epoch"])
        out.setdefault("steps", restored.state["step"])
        out.setdefault("best_epoch", restored.state.get("best_epoch", restored.state["epoch"]))
        return out
    finally:
        if started:
            ray.shutdown()


def _finish(cfg: Config, out: dict[str, Any], uri: str, run_id: str, register: str | None,
            data_dir: str, data_hash: str) -> dict[str, Any]:
    history = out.get("history") or []
    best_epoch = int(out["best_epoch"])
    best = next((h for h in history if h["epoch"] == best_epoch), history[-1] if history else {})
    metric = metric_name(cfg.train.select_metric)
    mode = METRICS[metric]
    cand = Candidate(
        model_state=out.pop("best_state"), cfg=cfg, run_id=run_id,
        source=f"run:{run_id}:epoch{best_epoch}", epoch=best_epoch, epochs=int(out["epochs"]),
        selected_by=f"{metric} ({mode})", tags={"se4lip.data_manifest_hash": data_hash})
    parent = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags.get("se4lip.init")
    if parent:
        cand.tags["se4lip.parent_model"] = parent
    try:
        published = publish(uri, cand, register=register, data_dir=data_dir)
    except GateError:
        end_run(uri, run_id, status="FINISHED")  # training itself completed
        raise
    summary = (f"Best epoch {best_epoch} of {out['epochs']} by `{metric}` = "
               f"{best.get(metric, float('nan')):.4f}.")
    if register:
        summary += (f" Registered `{register}` v{published['version']} as "
                    f"**{published['alias']}**: {published['reason']}.")
    set_description(uri, run_id, summary)
    end_run(uri, run_id, status="FINISHED")
    registered = None
    if register:
        registered = {k: published[k] for k in ("name", "version", "alias", "reason",
                                                 "registered_uri")}
        registered["scores"] = published.get("scores", {})
        registered["champion"] = published.get("champion")
        registered["floor"] = published.get("floor")
    return {
        "run_id": run_id,
        "model_uri": published["model_uri"],
        "best_epoch": best_epoch,
        "metrics": {k: v for k, v in best.items() if k != "epoch"},
        "last": {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"},
        "registered": registered,
        "epochs": out.get("epochs"),
        "steps": out.get("steps"),
        "checkpoint": out.get("checkpoint"),
        "worker_node_ids": out.get("worker_node_ids", []),
        "history": history,
    }


__all__ = [
    "BEST_PREFIX",
    "RUN_STATE_FILE",
    "Restored",
    "TrainError",
    "load_checkpoint_dir",
    "place_model",
    "run_label",
    "run_train",
    "train_loop",
    "training_data_config",
    "training_datasets",
]
