"""``se4lip-dist train``: Ray Data pairs -> Ray Train ``TorchTrainer`` (DDP) -> MLflow run + model.

The driver (:func:`run_train`) validates the data, resolves tracking, opens (or reopens) the MLflow
run, starts or joins Ray, and fits the ``TorchTrainer`` of :func:`build_trainer` (the one ``tune``
trials and the benchmarks use too), whose workers run :func:`train_loop`. A worker's state and
the parts of an epoch are a :class:`TrainRecipe`: every epoch each worker trains on its streamed
share of the pairs, all workers score their share of the validation clips
(:mod:`se4lip_dist.validation`, sums reduced across ranks), and rank 0 logs to MLflow and
reports a checkpoint. The best validated epoch (``train.select_metric``) is kept in
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
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from mlflow import MlflowClient
from ray.train.torch import TorchTrainer

from se4lip_dist import storage
from se4lip_dist.augment import augment_batch
from se4lip_dist.collectives import all_gather, all_have, all_reduce_sum, broadcast_buffers
from se4lip_dist.config import Config, architecture_diff, flatten
from se4lip_dist.cost import encoder_costs
from se4lip_dist.lifecycle import Candidate, GateError, publish
from se4lip_dist.losses import sync_bce_loss, sync_cosine
from se4lip_dist.manifest import Manifest
from se4lip_dist.models import build_model, lip_input
from se4lip_dist.placement import DEFAULT_TIMEOUT_S, PlacementError, wait_placeable
from se4lip_dist.registry import RegistryError, load_model_state, load_weights, pin_model
from se4lip_dist.resources import Resources, train_plan
from se4lip_dist.runtime import cluster_cpus, init_ray, own_sigint, worker_env
from se4lip_dist.splits import SplitRule, clip_frames
from se4lip_dist.stream import PairSpec, iter_pair_batches, pair_seed, row_dataset
from se4lip_dist.tracking import (
    RUNS_DIR,
    RunLogger,
    end_run,
    job_tracking_uri,
    log_datasets,
    log_parent_model,
    redact_uri,
    reopen_run,
    set_description,
    start_run,
)
from se4lip_dist.validation import (
    METRICS,
    ValidationResult,
    ValidationSet,
    is_better,
    metric_name,
    score,
)

RUN_STATE_FILE = "se4lip_run.json"
"""Written into ``storage_path/<run name>/``: the MLflow run a Ray Train run logs into."""
BEST_PREFIX = "best/"
"""Reported beside each epoch's metrics: the best epoch so far and its value."""


class TrainError(RuntimeError):
    """A training run that cannot start or resume (bad data, resources, names)."""


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


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
        # The config, not the checkpoint, sets the step size: a PBT exploit (or a resume with
        # another --set train.lr) continues the weights and moments under the new values.
        for group, want in zip(opt.param_groups, groups, strict=True):
            group["lr"], group["weight_decay"] = want["lr"], tc.weight_decay
        if restored.state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(restored.state["scaler"])
    return model, opt, scaler


def _amp_dtype(cfg: Config, device: Any) -> Any:
    """Autocast dtype on CUDA (None: full precision)."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.float16 if cfg.train.amp_dtype == "fp16" else torch.bfloat16


@dataclass
class EpochStats:
    """One rank's sums over one epoch's training steps (before they are reduced across ranks)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    wait: float = 0.0
    """Seconds spent waiting for the next batch."""
    started: float = 0.0
    """``time.perf_counter()`` when the epoch began."""
    elapsed: float = 0.0
    """Seconds from the epoch's start to the end of its last step."""


class TrainRecipe:
    """One worker's training state and the parts of an epoch, each callable on its own.

    State lives here and only here: the model (placed, and its unwrapped ``core``), optimizer,
    AMP scaler, augmentation generator, epochs done, global step, metric history and the best
    epoch. :func:`train_loop` wires the parts to Ray Train (data shard, reports, checkpoints);
    without a process group every collective is a no-op, so a test drives the parts directly.

    Args:
        cfg: the run's config.
        rank: this worker's rank (seeds its augmentation draws; rank 0 keeps the offset curve).
        world: the number of workers (agreeing on batches is skipped on one).
        device: where batches arrive and the placed model lives.
    """

    def __init__(self, cfg: Config, *, rank: int = 0, world: int = 1,
                 device: Any = "cpu") -> None:
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.amp = _amp_dtype(cfg, self.device)
        """Autocast dtype (None: full precision)."""
        self.metric = metric_name(cfg.train.select_metric)
        self.mode = METRICS[self.metric]
        self.model: Any = None
        self.core: Any = None
        self.opt: Any = None
        self.scaler: Any = None
        self.aug_gen: torch.Generator | None = None
        self.epoch = 0
        """Epochs done (the next epoch's index)."""
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, Any] | None = None

    def setup(self, restored: Restored | None = None, init: dict[str, Any] | None = None,
              place: Callable[[Any], Any] = lambda m: m) -> TrainRecipe:
        """Build the model (seeded: the same initial weights on every rank), restore or warm
        start it, place it (see :func:`place_model`) and continue the restored counters."""
        tc = self.cfg.train
        torch.manual_seed(tc.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
        model = build_model(self.cfg.model, sample_rate=self.cfg.data.sample_rate,
                            window_frames=tc.window_frames)
        self.model, self.opt, self.scaler = place_model(model, self.cfg, restored, place, init)
        self.core = getattr(self.model, "module", self.model)  # evaluation must not sync DDP
        if restored is not None:
            st = restored.state
            self.epoch, self.step, self.history = st["epoch"], st["step"], st["history"]
            self.best_epoch = st.get("best_epoch", self.epoch)
            self.best_metrics = st.get("best_metrics",
                                       self.history[-1] if self.history else {})
            self.best_state = restored.best
        # Augmentation draws: reproducible per seed, rank and the epoch the worker (re)started at.
        self.aug_gen = torch.Generator().manual_seed(
            tc.seed * 1_000_003 + self.rank * 7919 + self.epoch)
        return self

    def steps_done(self) -> bool:
        """True once ``train.max_steps`` optimizer steps have been taken."""
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and self.step >= max_steps

    def more_epochs(self) -> bool:
        """True while ``train.epochs`` and ``train.max_steps`` leave training to do."""
        return self.epoch < self.cfg.train.epochs and not self.steps_done()

    def finished(self) -> bool:
        """True when a restored run had already trained all it was asked to."""
        return bool(self.history) and not self.more_epochs()

    def train_step(self, batch: dict[str, Any]) -> EpochStats:
        """One optimizer step (augmentation, autocast, gradient clipping) on ``batch``; its loss
        and sync accuracy as sums over the batch."""
        cfg, tc = self.cfg, self.cfg.train
        y, wav, lips = batch["label"], batch["wav"], batch["lips"]
        if cfg.augment.enabled:
            wav, lips = augment_batch(wav, lips, cfg.augment, cfg.data.sample_rate, self.aug_gen)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            a, v = self.model(wav, lip_input(lips, cfg.model))
            loss = sync_bce_loss(a, v, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc.grad_clip and tc.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        with torch.no_grad():
            return EpochStats(loss_sum=float(loss) * len(y), seen=len(y),
                              correct=float(((sync_cosine(a, v) > 0.5) == (y > 0.5)).sum()))

    def train_epoch(self, batches: Iterator[dict[str, Any]]) -> EpochStats:
        """Train on ``batches`` until they end, ``train.steps_per_epoch`` or ``train.max_steps``;
        then close them (every rank stops at the same step, see :func:`epoch_batches`)."""
        tc = self.cfg.train
        self.model.train()
        if tc.freeze_lips:
            self.core.lips.eval()  # frozen means its BatchNorm statistics too
        stats = EpochStats(started=time.perf_counter())
        epoch_steps = 0
        while not self.steps_done():
            if tc.steps_per_epoch is not None and epoch_steps >= tc.steps_per_epoch:
                break
            t0 = time.perf_counter()
            batch = next(batches, None)  # None on every rank at once (see epoch_batches)
            stats.wait += time.perf_counter() - t0
            if batch is None:
                break
            done = self.train_step(batch)
            epoch_steps += 1
            stats.loss_sum += done.loss_sum
            stats.correct += done.correct
            stats.seen += done.seen
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # the pass's split stops streaming
        stats.elapsed = time.perf_counter() - stats.started
        return stats

    def validate(self, vset: ValidationSet) -> ValidationResult:
        """Score the unwrapped model on this rank's share of ``vset`` (rank 0's buffers first)."""
        broadcast_buffers(self.core)
        return score(self.core, self.cfg, vset, self.device, keep_curve=self.rank == 0)

    def end_epoch(self, stats: EpochStats, val: ValidationResult) -> dict[str, Any]:
        """Reduce ``stats`` across ranks, keep the best epoch and append to the history.

        Returns:
            The epoch's metrics: ``train/...``, ``perf/...``, ``val/...`` and ``best/...``.
        """
        loss_sum, correct, seen, wait_all, elapsed_all = all_reduce_sum(
            [stats.loss_sum, stats.correct, stats.seen, stats.wait, stats.elapsed], self.device)
        metrics = {
            "train/loss": loss_sum / seen if seen else float("nan"),
            "train/sync_acc": correct / seen if seen else float("nan"),
            "train/steps": self.step,
            "train/lr": self.opt.param_groups[0]["lr"],
            "perf/samples_per_s": seen / stats.elapsed if stats.elapsed else 0.0,
            "perf/data_wait_fraction": wait_all / elapsed_all if elapsed_all else 0.0,
            "perf/epoch_time_s": time.perf_counter() - stats.started,
            **val.metrics,
        }
        self.epoch += 1
        self.keep_best(val.metrics)
        metrics[f"{BEST_PREFIX}epoch"] = self.best_epoch
        metrics[f"{BEST_PREFIX}{self.metric}"] = self.best_metrics[self.metric]
        self.history.append({"epoch": self.epoch, **metrics})
        return metrics

    def keep_best(self, val_metrics: dict[str, float]) -> bool:
        """Make the epoch just done the best one if ``train.select_metric`` says it is better
        (the first epoch always is); True when it became the best."""
        if self.best_state is not None and not is_better(val_metrics, self.best_metrics,
                                                         self.metric, self.mode):
            return False
        self.best_epoch, self.best_metrics = self.epoch, dict(val_metrics)
        self.best_state = {k: t.detach().cpu().clone() for k, t in self.core.state_dict().items()}
        return True

    def state(self, config: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's ``state.json`` (``config``: the run's config dict, as given)."""
        return {"epoch": self.epoch, "step": self.step, "config": config,
                "history": self.history, "best_epoch": self.best_epoch,
                "best_metrics": self.best_metrics,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def save_checkpoint(self, path: str | Path, config: dict[str, Any]) -> None:
        """Write a checkpoint folder (layout in the module docstring) into ``path``."""
        p = Path(path)
        torch.save(self.core.state_dict(), p / "model.pt")
        torch.save(self.best_state, p / "best.pt")
        torch.save(self.opt.state_dict(), p / "optim.pt")
        (p / "state.json").write_text(json.dumps(self.state(config)))

    def result(self, node_ids: list[str]) -> dict[str, Any]:
        """What rank 0 returns from the fit."""
        return {"history": self.history,
                "epochs": self.history[-1]["epoch"] if self.history else self.epoch,
                "steps": self.step, "best_epoch": self.best_epoch, "worker_node_ids": node_ids}


def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker training function (runs inside Ray Train workers).

    Args:
        config: ``{"cfg": Config.to_dict(), "data_dir": str, "tracking_uri": str | None,
            "run_id": str | None, "init_state": ObjectRef | None}``, and optionally
            ``"resume_from"``: a ``Checkpoint`` to continue from when the run has none yet.

    Returns:
        On rank 0: ``{"history", "epochs", "steps", "best_epoch", "worker_node_ids"}``; None
        elsewhere.
    """
    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The run's own last checkpoint (a worker-group restart), else the one the trial resumes
    # from (a PBT exploit or a paused trial: Tune's checkpoint of this or another trial).
    ckpt = ray.train.get_checkpoint() or config.get("resume_from")
    restored = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = load_checkpoint_dir(d)
    init = None
    if restored is None and config.get("init_state") is not None:
        init = ray.get(config["init_state"])  # warm start: the weights of train.init
    recipe = TrainRecipe(cfg, rank=rank, world=world, device=ray.train.torch.get_device())
    recipe.setup(restored, init, ray.train.torch.prepare_model)
    vset = ValidationSet.load(config["data_dir"], cfg, rank=rank, world=world)
    node_ids = [str(i) for i in all_gather(ray.get_runtime_context().get_node_id())]
    train_ds = ray.train.get_dataset_shard("train")
    rule = SplitRule.for_manifest(Manifest.load(config["data_dir"]), cfg)
    logger = None
    if rank == 0 and config.get("run_id"):
        logger = RunLogger(config["tracking_uri"], config["run_id"])
    monitor = logger.system_metrics(resume=restored is not None) if logger else None
    # The encoder's extraction cost, beside every epoch's scores (tune ranks and fronts on it).
    costs = encoder_costs(cfg, recipe.core.speech, recipe.device) if rank == 0 else {}

    if recipe.finished():
        # Restored a run that had already finished (a tune driver killed after the trial's last
        # epoch but before Tune saw it end): report the final result again, or Tune gets none.
        ray.train.report({**recipe.history[-1], **costs},
                         checkpoint=ckpt if rank == 0 else None)
    try:
        while recipe.more_epochs():
            batches = epoch_batches(train_ds, cfg, rule, recipe.epoch, recipe.device, world)
            stats = recipe.train_epoch(batches)
            val = recipe.validate(vset)
            metrics = {**recipe.end_epoch(stats, val), **costs}
            if logger is not None:
                _log_epoch(logger, recipe, metrics, val)
            _report(recipe, metrics, config["cfg"])
    finally:
        if monitor is not None:
            monitor.finish()
    return recipe.result(node_ids) if rank == 0 else None


def _log_epoch(logger: RunLogger, recipe: TrainRecipe, metrics: dict[str, Any],
               val: ValidationResult) -> None:
    """Rank 0's MLflow record of the epoch just done: metrics, per-clip table, plots."""
    epoch = recipe.epoch
    logger.metrics(metrics, step=epoch)
    logger.table(val.table(), f"validation/clips_epoch{epoch:03d}.json")
    logger.plots(recipe.history, _curve(val.clips))


def _report(recipe: TrainRecipe, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    """Report the epoch to Ray Train on every rank, with rank 0's checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if recipe.rank == 0:
            recipe.save_checkpoint(tmp, config)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": recipe.epoch, **metrics}, checkpoint=checkpoint)


def epoch_batches(train_ds: Any, cfg: Config, rule: Any, epoch: int, device: Any,
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
            while all_have((batch := next(stream, None)) is not None, world, device):
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
    lacking = int(all_reduce_sum([0.0 if has else 1.0], device)[0])
    return TrainError(
        f"{lacking} of {world} workers got no batch of {batch_size} training pairs: workers "
        "share the training rows, not the pairs, and a row can give none (e.g. a clip's "
        "validation tail under train.split=time); use fewer workers (train.num_workers), more "
        "pairs (more clips, train.pairs_per_segment) or a smaller train.batch_size")


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


MAX_FAILURES = 2
"""Worker-group restarts (each from the last checkpoint) before a run or a trial fails."""
CHECKPOINTS_KEPT = 2
"""Checkpoints Ray Train keeps per run (the last epoch's and the one before)."""


def build_trainer(
    cfg: Config,
    data_dir: str,
    plan: Resources,
    *,
    name: str,
    storage_path: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    init_state: dict[str, Any] | None = None,
    datasets: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    max_failures: int = MAX_FAILURES,
    loop: Callable[[dict[str, Any]], Any] = train_loop,
    extra_config: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of a training run: the one construction ``train``, each ``tune``
    trial and the benchmarks share (failure, checkpoint and dataset settings included).

    Args:
        cfg: the run's config (sent to the workers as a dict).
        data_dir: prepared shards, as every node reads them.
        plan: the worker group (:mod:`se4lip_dist.resources`).
        name: Ray Train run name (a stable name resumes that run).
        storage_path: where Ray Train keeps the run's folder and checkpoints.
        tracking_uri: MLflow tracking URI rank 0 logs to.
        run_id: MLflow run rank 0 logs to (None: no logging).
        init_state: warm-start weights, sent through the object store (too big for a config).
        datasets: the Ray Datasets (default :func:`training_datasets`; a tune trial builds them
            before it waits for its ranks).
        callbacks: Ray Train callbacks (a tune trial forwards reports to Tune).
        max_failures: worker-group restarts before the run fails.
        loop: the per-worker function (default :func:`train_loop`; a benchmark passes one that
            times :meth:`TrainRecipe.train_epoch`).
        extra_config: merged into the workers' ``train_loop_config``.
    """
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": str(data_dir),
                           "tracking_uri": tracking_uri, "run_id": run_id,
                           "init_state": ray.put(init_state) if init_state else None,
                           **(extra_config or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers,
                                               use_gpu=bool(plan.worker_gpus),
                                               resources_per_worker=plan.worker_bundle()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            worker_runtime_env={"env_vars": worker_env()},
        ),
        datasets=training_datasets(data_dir, cfg) if datasets is None else datasets,
        dataset_config=training_data_config(),
    )


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
    diff = architecture_diff(init_cfg, cfg)
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
    max_failures: int = MAX_FAILURES,
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
    manifest, rule, frames = _training_frames(data_dir, cfg)
    uri = job_tracking_uri(tracking_uri, address, "train")  # fails before Ray starts
    init_state, init_info = (load_init(cfg, uri) if cfg.train.init and not resume
                             else (None, None))
    store = storage.absolute(storage_path or default_storage_path())
    name, saved = _resolve_name(store, run_name, resume, run_label(cfg))
    data_hash = manifest.content_hash()

    if saved is not None:
        run_id = _reopen(cfg, saved, name, uri)
    else:
        run_id = _start(cfg, data_dir, uri, experiment, name, store, rule, frames, data_hash)
        if init_info is not None:
            log_parent_model(uri, run_id, init_info)
        _write_run_state(store, name, {"run_id": run_id, "experiment": experiment,
                                       "config": cfg.to_dict(), "data_dir": data_dir})

    try:
        out = _fit(cfg, data_dir, uri, run_id, name, store, use_gpu, address, max_failures,
                   placement_timeout_s, init_state)
    except BaseException:
        end_run(uri, run_id, status="FAILED")
        raise
    result = _finish(cfg, out, uri, run_id, register, data_dir, data_hash)
    result.update({"run_name": name, "experiment": experiment,
                   "tracking_uri": redact_uri(uri), "storage_path": redact_uri(store)})
    return result


def _training_frames(data_dir: str, cfg: Config) -> tuple[Manifest, SplitRule,
                                                           dict[str, dict[str, int]]]:
    """The manifest, split rule and frames per clip of each split; fails (before any run
    exists) on another schema version or a split without frames."""
    manifest = Manifest.load(data_dir)
    manifest.check_shards(data_dir)  # another schema version fails here, before any run exists
    rule = SplitRule.for_manifest(manifest, cfg)
    frames = clip_frames(manifest, rule)
    if not frames["train"] or not frames["val"]:
        raise TrainError(f"{data_dir}: need frames to train on and to validate on; "
                         f"{rule.describe()} gives {len(frames['train'])} training and "
                         f"{len(frames['val'])} validation clips")
    return manifest, rule, frames


def _reopen(cfg: Config, saved: dict[str, Any], name: str, uri: str) -> str:
    """The MLflow run of a resumed Ray Train run, reopened; the model must not have changed."""
    saved_cfg = Config.from_dict(saved["config"])
    if saved_cfg.model != cfg.model or saved_cfg.train.window_frames != cfg.train.window_frames:
        raise TrainError(f"--resume {name}: the model config differs from the saved run's; "
                         "resume with the same preset/--config/--set model.*")
    reopen_run(uri, saved["run_id"])
    return saved["run_id"]


def _start(cfg: Config, data_dir: str, uri: str, experiment: str, name: str, store: str,
           rule: SplitRule, frames: dict[str, dict[str, int]], data_hash: str) -> str:
    """A fresh MLflow run with its config, data and datasets logged; its id."""
    splits = {role: sorted(frames[role]) for role in frames}
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
    return run_id


def _fit(cfg: Config, data_dir: str, uri: str, run_id: str, name: str, store: str,
         use_gpu: bool, address: str | None, max_failures: int,
         placement_timeout_s: float | None,
         init_state: dict[str, Any] | None = None) -> dict[str, Any]:
    started = not ray.is_initialized()
    init_ray(address)
    try:
        plan = train_plan(cfg.train, use_gpu)
        _check_capacity(plan, address, placement_timeout_s)
        trainer = build_trainer(cfg, data_dir, plan, name=name, storage_path=store,
                                tracking_uri=uri, run_id=run_id, init_state=init_state,
                                max_failures=max_failures)
        with own_sigint():
            result = trainer.fit()
        return _fit_output(result, store)
    finally:
        if started:
            ray.shutdown()


def _check_capacity(plan: Resources, address: str | None,
                    placement_timeout_s: float | None) -> None:
    """Fail with a reason before fitting when the worker group cannot run here."""
    n = plan.num_workers
    try:  # first: a group this cluster can never hold names the resource it lacks
        wait_placeable(plan.worker_bundle(), n, f"{n} training workers",
                       timeout_s=placement_timeout_s or DEFAULT_TIMEOUT_S)
    except PlacementError as e:
        raise TrainError(str(e)) from e
    if address is None:
        free = cluster_cpus() - n * plan.worker_cpus
        if free < 0.5:
            raise TrainError(
                f"{n} workers x {plan.worker_cpus:g} CPU leave {free:g} of "
                f"{cluster_cpus():g} CPUs for Ray Data, which then hangs; lower "
                f"{plan.cpu_key} or train.num_workers")


def _fit_output(result: Any, store: str) -> dict[str, Any]:
    """Rank 0's return value completed from the last checkpoint (best weights included)."""
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
    "CHECKPOINTS_KEPT",
    "MAX_FAILURES",
    "RUN_STATE_FILE",
    "EpochStats",
    "Restored",
    "TrainError",
    "TrainRecipe",
    "build_trainer",
    "epoch_batches",
    "load_checkpoint_dir",
    "place_model",
    "run_label",
    "run_train",
    "train_loop",
    "training_data_config",
    "training_datasets",
]
