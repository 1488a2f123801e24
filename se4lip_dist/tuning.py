"""``se4lip-dist tune``: Ray Tune over a search space, each trial a distributed TorchTrainer run.

Ray 2.60 pattern (Train V2 + Tune): every trial runs :func:`tune_trial`, a *driver function*
that builds a ``TorchTrainer`` over :func:`se4lip_dist.train.train_loop` and forwards rank 0's
per-epoch metrics to Tune through ``TuneReportCallback`` (under PBT, with each checkpoint: see
:func:`_fit_with_tune_checkpoints`). The searcher (random, grid or Optuna TPE), the scheduler
(ASHA, FIFO or PBT on ``time_attr="epoch"``) and the objective (the metric, or the metric
against extraction cost under a budget) come from :mod:`se4lip_dist.search`.

MLflow: one parent run for the tune job, one child run per trial (found again by its trial name
on ``--resume``), the ranked trial table as an artifact. Each trial keeps its best validated
epoch; the trial whose best epoch is best goes through :mod:`se4lip_dist.lifecycle` (log,
register, gate, alias), the same path ``train --register`` takes.

Resources: a trial's driver holds a small CPU slice and its workers share the rest of
``cpus_per_trial`` (GPU ranks, without it, get ``train.cpus_per_gpu_worker`` each, as in
``train``: :mod:`se4lip_dist.resources`); locally, concurrent trials are capped so at least one
CPU stays free for Ray Data (on 2 cores, reserving every CPU hangs Ray Data forever).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from mlflow import MlflowClient
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.util.queue import Empty, Queue

from se4lip_dist import storage
from se4lip_dist.config import Config, TrainConfig, flatten
from se4lip_dist.cost import COSTS, pareto_front
from se4lip_dist.credentials import keep_secrets_out_of_tune
from se4lip_dist.lifecycle import Candidate, GateError, champion_version, publish
from se4lip_dist.manifest import Manifest
from se4lip_dist.placement import DEFAULT_TIMEOUT_S, PlacementError, check_feasible, wait_placeable
from se4lip_dist.plots import pareto_figure
from se4lip_dist.registry import load_model_state
from se4lip_dist.resources import Resources
from se4lip_dist.runtime import cluster_cpus, init_ray, own_sigint
from se4lip_dist.search import (
    SearchPlan,
    check_plan,
    check_population,
    make_tuner,
    trial_index,
    warm_points,
)
from se4lip_dist.spaces import load_space
from se4lip_dist.splits import SplitRule, clip_frames
from se4lip_dist.storage import redact_uri
from se4lip_dist.tracking import (
    RUNS_DIR,
    RunLogger,
    end_run,
    ensure_experiment,
    job_tracking_uri,
    log_datasets,
    log_parent_model,
    reopen_run,
    set_description,
    start_run,
)
from se4lip_dist.train import (
    BEST_PREFIX,
    build_trainer,
    load_checkpoint_dir,
    load_init,
    training_datasets,
)
from se4lip_dist.validation import METRICS, TIE_BREAK, metric_name

TUNE_STATE_FILE = "se4lip_tune.json"
DRIVER_CPUS = 0.25
"""CPU slice of a trial's driver function (it only waits on its TorchTrainer)."""
DATA_CPUS = 1.0
"""CPUs kept free for Ray Data on a local machine."""


class TuneError(RuntimeError):
    """A tune job that cannot start, resume or register (message says what to change)."""


@dataclass(frozen=True)
class TuneOptions:
    """Everything ``tune`` needs beyond the search space and the data."""

    preset: str | None = None
    """Replace the space's base preset (its values are validated against the new one)."""
    num_samples: int | None = None
    max_concurrent_trials: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    num_workers_per_trial: int | None = None
    """DDP ranks per trial (default: ``gpus_per_trial``, or 2 on CPUs)."""
    epochs: int | None = None
    metric: str | None = None
    mode: str | None = None
    register: str = "se4lip"
    tracking_uri: str | None = None
    experiment: str = "se4lip-tune"
    name: str = "se4lip-tune"
    resume: bool = False
    storage_path: str | None = None
    address: str | None = None
    placement_timeout_s: float = DEFAULT_TIMEOUT_S
    """Longest wait for a trial's workers to be placed (autoscalers may need minutes)."""
    overrides: tuple[str, ...] = ()
    """``--set`` overrides applied to the space's preset before the search values."""
    plan: SearchPlan = field(default_factory=SearchPlan)
    """Searcher, scheduler, objective and cost budget (``--search``, ``--scheduler``...)."""
    warm_start: bool = True
    """Try the ``--register`` champion's values of the searched keys first."""


@dataclass
class TrialRow:
    """One line of the live and final trial tables."""

    name: str
    params: dict[str, Any]
    status: str = "PENDING"
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    run_id: str | None = None


CLUSTER_WORKER_CPUS = 1.0
"""CPUs of a CPU-only rank on a cluster when not given: the rest of a node's CPUs feed Ray
Data. A GPU rank gets ``train.cpus_per_gpu_worker`` (see :mod:`se4lip_dist.resources`)."""


def plan_resources(
    *,
    num_workers: int | None,
    cpus_per_trial: float | None,
    gpus_per_trial: float,
    max_concurrent: int | None,
    local_cpus: float | None = None,
    local_gpus: float = 0.0,
    gpu_worker_cpus: float = TrainConfig.cpus_per_gpu_worker,
) -> Resources:
    """Per-trial resources from the flags (and, on a local machine only, its size).

    On a cluster nothing depends on how big the cluster is at start: an autoscaling cluster may
    have no worker yet, and Tune's pending trials are the demand its autoscaler scales for.

    Args:
        num_workers: DDP ranks per trial (default: ``gpus_per_trial``, or 2 on CPUs).
        cpus_per_trial: CPUs a trial reserves, driver included (default: ``gpu_worker_cpus``
            per rank on GPUs; on CPUs a local share, or ``CLUSTER_WORKER_CPUS`` per rank on a
            cluster).
        gpus_per_trial: whole GPUs per trial: that many ranks with one GPU each.
        max_concurrent: trials at once (default: what fits locally; unbounded on a cluster).
        local_cpus: CPUs of the local Ray (None: a cluster); one is kept free for Ray Data.
        local_gpus: GPUs of the local Ray.
        gpu_worker_cpus: CPUs of a GPU rank when ``cpus_per_trial`` is not given
            (``train.cpus_per_gpu_worker``).

    Raises:
        TuneError: a request that cannot work, with the reason.
    """
    gpus, n = _trial_ranks(num_workers, gpus_per_trial)
    # Where the trial's CPUs came from, for the messages that ask to lower them.
    source = "--cpus-per-trial"
    if gpus and cpus_per_trial is None:
        cpus_per_trial = DRIVER_CPUS + gpu_worker_cpus * n
        source = (f"train.cpus_per_gpu_worker ({n} rank(s) x {gpu_worker_cpus:g} + the trial "
                  f"driver's {DRIVER_CPUS:g}; --set train.cpus_per_gpu_worker=... or pass "
                  "--cpus-per-trial)")
    if local_cpus is None:
        return _cluster_plan(n, gpus, cpus_per_trial, max_concurrent)

    usable = local_cpus - DATA_CPUS
    if usable < DRIVER_CPUS + 0.1 * n:
        raise TuneError(f"{local_cpus:g} CPUs cannot run a trial and keep {DATA_CPUS:g} for "
                        "Ray Data")
    if cpus_per_trial is None:
        share = usable / (max_concurrent or 1)
        cpus_per_trial = max(DRIVER_CPUS + 0.1 * n, min(share, 1.0 + 0.5 * n))
    worker_cpus = round((cpus_per_trial - DRIVER_CPUS) / n, 3)
    if worker_cpus <= 0:
        raise TuneError(f"--cpus-per-trial {cpus_per_trial:g} leaves no CPU for the {n} workers "
                        f"after the trial driver's {DRIVER_CPUS:g}")
    fit = max(1, math.floor(usable / cpus_per_trial + 1e-9))
    if gpus:
        if local_gpus < gpus:
            raise TuneError(f"--gpus-per-trial {gpus}: this machine's Ray has {local_gpus:g} "
                            "GPU(s)")
        fit = min(fit, math.floor(local_gpus / gpus + 1e-9))
    concurrent = max_concurrent or fit
    if concurrent * cpus_per_trial > usable + 1e-9:
        raise TuneError(
            f"{concurrent} concurrent trials x {cpus_per_trial:g} CPUs exceed the "
            f"{usable:g} CPUs left after keeping {DATA_CPUS:g} for Ray Data; lower "
            f"--max-concurrent-trials or {source}")
    return Resources(DRIVER_CPUS, worker_cpus, 1 if gpus else 0, n, concurrent)


def _trial_ranks(num_workers: int | None, gpus_per_trial: float) -> tuple[int, int]:
    """``(GPUs, DDP ranks)`` of a trial: on GPUs one rank per whole GPU, else 2 by default."""
    gpus = 0
    if gpus_per_trial:
        if gpus_per_trial < 0 or gpus_per_trial != int(gpus_per_trial):
            raise TuneError(f"--gpus-per-trial {gpus_per_trial:g}: use a whole number; each DDP "
                            "rank needs a GPU of its own (NCCL refuses two ranks on one GPU)")
        gpus = int(gpus_per_trial)
        if num_workers not in (None, gpus):
            raise TuneError(f"--num-workers-per-trial {num_workers} with --gpus-per-trial "
                            f"{gpus}: every rank gets one whole GPU, so a trial runs {gpus} "
                            f"rank(s); pass --num-workers-per-trial {gpus} or --gpus-per-trial "
                            f"{num_workers}")
        num_workers = gpus
    n = num_workers or 2
    if n < 1:
        raise TuneError("--num-workers-per-trial must be >= 1")
    return gpus, n


def _cluster_plan(n: int, gpus: int, cpus_per_trial: float | None,
                  max_concurrent: int | None) -> Resources:
    """A trial's resources on a cluster, whose size at start says nothing (it may autoscale)."""
    per = cpus_per_trial if cpus_per_trial is not None else DRIVER_CPUS + CLUSTER_WORKER_CPUS * n
    worker_cpus = round((per - DRIVER_CPUS) / n, 3)
    if worker_cpus <= 0:
        raise TuneError(f"--cpus-per-trial {per:g} leaves no CPU for the {n} workers after "
                        f"the trial driver's {DRIVER_CPUS:g}")
    if max_concurrent is not None and max_concurrent < 1:
        raise TuneError("--max-concurrent-trials must be >= 1")
    return Resources(DRIVER_CPUS, worker_cpus, 1 if gpus else 0, n, max_concurrent)


# --------------------------------------------------------------------------------------------
# Trial side
# --------------------------------------------------------------------------------------------


def tune_trial(config: dict[str, Any]) -> None:
    """Tune trainable: one trial = one TorchTrainer run with its own MLflow child run."""
    job = config["se4lip"]
    params = {k: v for k, v in config.items() if k != "se4lip"}
    cfg = Config.from_dict(job["base"]).override(params)
    trial = ray.tune.get_context().get_trial_name()
    run_id = _child_run(job, trial, cfg, params)
    data_dir = job["data_dir"]
    resources = trial_plan(job).worker_bundle()
    # Before the trial queues: Ray Data samples the shards with 1-CPU tasks as it builds them,
    # which could wait behind the ranks and queued drivers that hold the cluster later on.
    datasets = training_datasets(data_dir, cfg)
    # A trial behind other trials waits (and says so); one whose ranks no node can hold fails
    # at once, and one waiting for nodes that never come fails after the placement timeout.
    # The autoscaler sees the reservation as demand meanwhile.
    key = _waiting_key(job["name"], trial)

    def waiting(line: str) -> None:
        print(line, flush=True)
        _kv(lambda kv: kv._internal_kv_put(key, line, overwrite=True, namespace=_KV_NS))

    try:
        wait_placeable(resources, job["num_workers"],
                       f"trial {trial}'s {job['num_workers']} ranks",
                       timeout_s=job["placement_timeout_s"], queue=True, on_wait=waiting)
    finally:
        _kv(lambda kv: kv._internal_kv_del(key, namespace=_KV_NS))
    # Another queued trial may take the freed ranks in the moment before Train asks for them:
    # Train then waits for capacity as long as this trial may, instead of failing and
    # retrying every 60 s (its default).
    os.environ.setdefault(TRAIN_START_TIMEOUT_ENV, str(max(60.0, job["placement_timeout_s"])))
    if job.get("pbt"):
        _fit_with_tune_checkpoints(job, trial, cfg, run_id, params, datasets)
    else:
        result = trial_trainer(job, trial, cfg, run_id, datasets).fit()
        if result.error is not None:
            raise result.error

    end_run(job["tracking_uri"], run_id, "FINISHED")


class _ReportToQueue(ray.train.UserCallback):
    """Train callback: each report (rank 0's metrics, the checkpoint) into a Ray queue, which
    the trial's driver function hands to Tune (``TuneReportCallback`` passes metrics only)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        m = dict(metrics[0])
        if checkpoint is not None:
            m[CHECKPOINT_PATH_KEY] = checkpoint.path  # what registration reads, as with Tune's
        self.queue.put((m, checkpoint))


def _fit_with_tune_checkpoints(job: dict[str, Any], trial: str, cfg: Config,
                               run_id: str | None, params: dict[str, Any],
                               datasets: dict[str, Any]) -> None:
    """A PBT trial: every epoch's checkpoint goes to Tune (PBT clones them), and the trial
    continues from the one Tune gives it: its own after a pause, a better trial's after an
    exploit (the config Tune passes is then that trial's, perturbed).

    The Train run is named after that checkpoint: a fresh name per continuation, so Train's
    own resume (after a worker-group failure) never reaches back before the exploit."""
    resume = ray.tune.get_checkpoint()
    suffix = ""
    if resume is not None:
        suffix = "-" + hashlib.sha1(resume.path.encode()).hexdigest()[:8]
        if run_id:
            _record_exploit(job["tracking_uri"], run_id, trial, resume.path, params)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    try:
        trainer = trial_trainer(job, trial, cfg, run_id, datasets, resume_from=resume,
                                report=_ReportToQueue(queue), name_suffix=suffix)
        with ThreadPoolExecutor(1) as pool:
            fit = pool.submit(trainer.fit)
            while True:
                try:
                    metrics, checkpoint = queue.get(timeout=1.0)
                except Empty:
                    if fit.done():  # checked after a get: the last report is never left behind
                        break
                    continue
                ray.tune.report(metrics, checkpoint=checkpoint)
            result = fit.result()
    finally:
        queue.shutdown()
    if result.error is not None:
        raise result.error


def _record_exploit(uri: str, run_id: str, trial: str, checkpoint: str,
                    params: dict[str, Any]) -> None:
    """On the trial's MLflow run: which checkpoint it continues and its values from now on
    (``se4lip.pbt.<n>`` tags; a trial resuming its own checkpoint after a pause is not one)."""
    source = Path(checkpoint).parent.name
    if source == trial:
        return
    client = MlflowClient(tracking_uri=uri)
    n = sum(k.startswith("se4lip.pbt.") for k in client.get_run(run_id).data.tags) + 1
    values = ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items()))
    client.set_tag(run_id, f"se4lip.pbt.{n}",
                   f"continues {source}/{Path(checkpoint).name} with {values}")


def trial_plan(job: dict[str, Any]) -> Resources:
    """One trial's reservation, as planned by :func:`plan_resources` for the whole job."""
    return Resources(DRIVER_CPUS, job["worker_cpus"], job["worker_gpus"], job["num_workers"],
                     None)


def trial_trainer(job: dict[str, Any], trial: str, cfg: Config, run_id: str | None,
                  datasets: dict[str, Any] | None = None, *, resume_from: Any = None,
                  report: Any = None, name_suffix: str = "") -> Any:
    """The trial's ``TorchTrainer``: :func:`se4lip_dist.train.build_trainer` with the trial's
    ranks and names, reporting each epoch to Tune, warm-started from ``train.init`` if set
    (recorded on the trial's run as ``train`` records it).

    Args:
        job: the tune job's settings (``base`` config, data, store, ranks per trial).
        trial: the Tune trial name (its Train run is ``<tune name>-<trial>``).
        cfg: the trial's config (the base with the trial's parameters).
        run_id: the trial's MLflow child run.
        datasets: built already (default: built here).
        resume_from: a Tune checkpoint to continue from (PBT), when the Train run has none.
        report: the Train callback reporting to Tune (default ``TuneReportCallback``).
        name_suffix: appended to the Train run's name (a PBT continuation's own run).
    """
    init_state = None
    if cfg.train.init and resume_from is None:
        init_state, info = load_init(cfg, job["tracking_uri"])
        if run_id:
            log_parent_model(job["tracking_uri"], run_id, info)
    return build_trainer(
        cfg, job["data_dir"], trial_plan(job),
        # Stable per trial: a resumed tune resumes each unfinished trial's Train run.
        name=f"{job['name']}-{trial}{name_suffix}", storage_path=job["storage"],
        tracking_uri=job["tracking_uri"], run_id=run_id, datasets=datasets,
        callbacks=[report or TuneReportCallback()], init_state=init_state,
        extra_config={"resume_from": resume_from} if resume_from is not None else None)


TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's bound on waiting for a worker group's resources (the trial's env reaches its
controller)."""
_KV_NS = "se4lip"
"""Ray internal-KV namespace of the lines trials leave while they wait for capacity."""


def _waiting_key(tune_name: str, trial: str = "") -> str:
    return f"waiting:{tune_name}:{trial}"


def _kv(call: Callable[[Any], Any]) -> Any:
    """``call(ray.experimental.internal_kv)``; None when the KV cannot be reached (the lines
    it carries are for people, never for decisions)."""
    try:
        from ray.experimental import internal_kv

        return call(internal_kv)
    except Exception:
        return None


def waiting_trials(tune_name: str) -> dict[str, str]:
    """Trial name -> the line it left while waiting for capacity, for one tune."""
    prefix = _waiting_key(tune_name)
    keys = _kv(lambda kv: kv._internal_kv_list(prefix, namespace=_KV_NS)) or []
    out: dict[str, str] = {}
    for key in keys:
        key = key.decode() if isinstance(key, bytes) else str(key)
        line = _kv(lambda kv, k=key: kv._internal_kv_get(k, namespace=_KV_NS))
        if line:
            out[key.removeprefix(prefix)] = line.decode() if isinstance(line, bytes) else line
    return out


def _child_run(job: dict[str, Any], trial: str, cfg: Config, params: dict[str, Any]) -> str:
    """The trial's MLflow child run: reused when the trial restarts after a resume."""
    uri = job["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(uri, job["experiment"])
    found = client.search_runs(
        [exp_id],
        filter_string=(f"tags.`mlflow.parentRunId` = '{job['parent_run_id']}' and "
                       f"tags.`se4lip.trial` = '{trial}'"),
        max_results=1,
    )
    if found:
        reopen_run(uri, found[0].info.run_id)
        return found[0].info.run_id
    logged = flatten(cfg.to_dict())
    logged.update({f"search.{k}": v for k, v in params.items()})
    logged["data.manifest_hash"] = job["data_hash"]
    searched = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in sorted(params.items()))
    return start_run(
        uri, job["experiment"], f"{job['name']} #{trial_index(trial)}: {searched}",
        params=logged,
        tags={"mlflow.parentRunId": job["parent_run_id"], "se4lip.trial": trial,
              "se4lip.tune": job["name"], "se4lip.preset": cfg.preset,
              "se4lip.kind": "tune-trial", "se4lip.data_manifest_hash": job["data_hash"]},
        config_yaml=cfg.to_yaml(), command="tune",
        description=(f"Trial {trial} of tune `{job['name']}`: {searched}. Trains "
                     f"{cfg.train.epochs} epochs unless the scheduler stops it; its best epoch "
                     f"by `{cfg.train.select_metric}` is what the search compares."),
    )


def _short(v: Any) -> str:
    return f"{v:.2g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def default_storage_path() -> str:
    """``<cwd>/se4lip-runs/tune``."""
    return str(Path.cwd().resolve() / RUNS_DIR / "tune")


def run_tune(
    space_path: str,
    data_dir: str,
    opts: TuneOptions,
    *,
    on_update: Callable[[list[TrialRow]], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Search, then log, register and gate the best encoder.

    Args:
        space_path: search-space YAML (see ``tune/``).
        data_dir: prepared shards.
        opts: resources, tracking and naming options.
        on_update: called with all trial rows whenever a trial reports or ends (live table).
        on_wait: called with a line whenever a trial waits for capacity (say, more trials
            than the cluster holds at once), then every half minute while it waits.

    Returns:
        ``name``, ``parent_run_id``, ``best`` (trial, params, metrics), ``trials`` (ranked rows),
        ``stopped_early``, ``registered`` (name, version, alias, reason), ``wall_s``.

    Raises:
        TuneError, ConfigError, ManifestError, TrackingError.
    """
    t0 = time.perf_counter()
    space = load_space(space_path, preset=opts.preset)
    base, metric, mode = _base_config(space, opts)
    sched = check_plan(space, opts.plan, base.train.epochs)
    data_dir = storage.absolute(data_dir)  # trials run on other nodes: absolute path or URL
    manifest = Manifest.load(data_dir)
    manifest.check_shards(data_dir)  # old-schema shards fail here, not inside every trial
    data_hash = manifest.content_hash()
    uri = job_tracking_uri(opts.tracking_uri, opts.address, "tune")
    # Checked before Ray starts: a bad space, data folder or server fails in a second.
    store = storage.absolute(opts.storage_path or default_storage_path())
    exp_dir = storage.join(store, opts.name)
    state = _saved_state(exp_dir, store, opts)
    if state and state.get("registered"):
        return state["result"]  # finished earlier: nothing left to do, never register twice
    if state is not None and "plan" in state:  # absent from tunes started before --search
        # Tune restores the searcher and scheduler it started with; rank and gate alike.
        opts = replace(opts, plan=SearchPlan(**state["plan"]))
        sched = state["plan"]["scheduler"]
    opts = replace(opts, plan=replace(opts.plan, scheduler=sched))

    started = not ray.is_initialized()
    init_ray(opts.address, dashboard=True)  # Train V2's placement-group cleaner needs it
    try:
        res = _plan(opts, base)
        check_population(space, opts.plan, opts.num_samples or space.num_samples,
                         res.max_concurrent)
        base = base.override({"train.num_workers": res.num_workers})
        if state is None:
            parent = _start_parent(uri, opts, space, base, data_hash, data_dir, res)
            state = {"parent_run_id": parent, "space": space.path, "data_dir": str(data_dir),
                     "data_hash": data_hash, "metric": metric, "mode": mode,
                     "base": base.to_dict(), "plan": asdict(opts.plan)}
            _write_state(exp_dir, state)
        else:
            reopen_run(uri, state["parent_run_id"])
        job = _job(opts, state, data_dir, data_hash, uri, store, res)
        keep_secrets_out_of_tune()
        # The new Tune console output ignores verbose=0; we draw our own live table instead.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        live = _LiveTable(metric, on_update, opts.name, on_wait)
        points = _champion_points(uri, opts, space) if not opts.resume else []
        tuner = _tuner(opts, space, job, base, res, live, (metric, mode), exp_dir, points)
        with own_sigint():
            grid = tuner.fit()
        rows, result = _conclude(grid, uri, opts, state, space, data_dir, (metric, mode))
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        _log_parent(uri, state["parent_run_id"], rows, result, metric)
        state.update({"registered": True, "result": result})
        _write_state(exp_dir, state)
        return result
    finally:
        if started:
            ray.shutdown()


def _base_config(space: Any, opts: TuneOptions) -> tuple[Config, str, str]:
    """The trials' base config, the metric that ranks them and its mode (``min``/``max``)."""
    metric = metric_name(opts.metric) if opts.metric else space.metric
    mode = opts.mode or (space.mode if metric == space.metric else METRICS[metric])
    base = space.base_config(list(opts.overrides)).override({"train.select_metric": metric})
    if opts.epochs is not None:
        base = base.override({"train.epochs": opts.epochs})
    # A warm start fixes the architecture and the window (train.load_init refuses others):
    # say so before any trial starts rather than fail the trials that differ.
    varied = sorted(k for k in space.params if k.startswith("model.")
                    or k == "train.window_frames")
    if base.train.init and varied:
        raise TuneError(f"train.init {base.train.init} warm-starts every trial from one "
                        f"architecture, but the space varies {', '.join(varied)}: drop "
                        "train.init, or search a space that keeps those fixed")
    return base, metric, mode


def _saved_state(exp_dir: str, store: str, opts: TuneOptions) -> dict[str, Any] | None:
    """The tune's saved state; there must be one with ``--resume`` and none without."""
    state = _read_state(exp_dir)
    if opts.resume and state is None:
        raise TuneError(f"--resume: no tune named {opts.name!r} under {store}")
    if not opts.resume and state is not None:
        raise TuneError(f"a tune named {opts.name!r} already exists under {store}: pass "
                        "--resume to continue it or --name to start another")
    return state


def _job(opts: TuneOptions, state: dict[str, Any], data_dir: str, data_hash: str, uri: str,
         store: str, res: Resources) -> dict[str, Any]:
    """What every trial gets beside its parameters (``config["se4lip"]`` of :func:`tune_trial`)."""
    return {
        "base": state["base"], "data_dir": data_dir,
        "data_hash": data_hash, "tracking_uri": uri, "experiment": opts.experiment,
        "parent_run_id": state["parent_run_id"], "name": opts.name, "storage": store,
        "num_workers": res.num_workers, "worker_cpus": res.worker_cpus,
        "worker_gpus": res.worker_gpus, "placement_timeout_s": opts.placement_timeout_s,
        "pbt": opts.plan.scheduler == "pbt",
    }


def _plan(opts: TuneOptions, base: Config) -> Resources:
    """Per-trial resources from the options (and the local Ray's size when it is local); a
    rank no node (or node type the autoscaler can launch) can hold fails now."""
    local = not (opts.address or os.environ.get("RAY_ADDRESS"))
    res = plan_resources(
        num_workers=opts.num_workers_per_trial, cpus_per_trial=opts.cpus_per_trial,
        gpus_per_trial=opts.gpus_per_trial, max_concurrent=opts.max_concurrent_trials,
        local_cpus=cluster_cpus() if local else None,
        local_gpus=float(ray.cluster_resources().get("GPU", 0.0)),
        gpu_worker_cpus=base.train.cpus_per_gpu_worker,
    )
    try:
        check_feasible(res.worker_bundle(), f"tune trials' {res.num_workers} DDP ranks",
                       count=res.num_workers)
    except PlacementError as e:
        raise TuneError(str(e)) from e
    return res


def _champion_points(uri: str, opts: TuneOptions, space: Any) -> list[dict[str, Any]]:
    """The ``--register`` champion's values of the searched keys, TPE's first trial (none
    without a champion, when its values lie outside the space, or with random and grid
    search, whose trial count and enumeration it would change)."""
    if not opts.warm_start or opts.plan.search != "tpe" or not opts.register:
        return []
    version = champion_version(uri, opts.register)
    if version is None:
        return []
    _, cfg = load_model_state(f"models:/{opts.register}/{version}", uri)
    return warm_points(space, flatten(cfg.to_dict()))


def _tuner(opts: TuneOptions, space: Any, job: dict[str, Any], base: Config, res: Resources,
           live: Any, objective: tuple[str, str], exp_dir: str,
           points: list[dict[str, Any]]) -> Any:
    """The ``Tuner`` (:func:`se4lip_dist.search.make_tuner`) whose trials each run
    :func:`tune_trial` with ``job``; restored from ``exp_dir`` on ``--resume``."""
    return make_tuner(
        tune.with_resources(tune_trial, {"cpu": res.driver_cpus}), space, opts.plan,
        objective, name=opts.name, storage=job["storage"], constants={"se4lip": job},
        num_samples=opts.num_samples or space.num_samples, max_concurrent=res.max_concurrent,
        epochs=base.train.epochs, callbacks=[live], points=points,
        restore=exp_dir if opts.resume else None)


def _conclude(grid: Any, uri: str, opts: TuneOptions, state: dict[str, Any], space: Any,
              data_dir: str, objective: tuple[str, str]) -> tuple[list[TrialRow], dict[str, Any]]:
    """Rank the finished trials, close their child runs and register the best; the ranked
    rows and the tune's result (``wall_s`` not yet set).

    Raises:
        TuneError: trials left unfinished (interrupted), or none reported the metric.
    """
    metric, mode = objective
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished > 0:
        # Ctrl-C / SIGTERM: Tune saved its state and returned early. Registering now would
        # pick a winner among unfinished trials and make --resume a no-op.
        raise TuneError(f"tune {opts.name!r} interrupted with {unfinished} of {len(grid)} "
                        "trials unfinished; nothing registered. Continue it with --resume "
                        f"--name {opts.name}")
    rows = _rank(grid, metric, mode, space)
    if not any(r.metrics.get(metric) is not None for r in rows):
        errors = [str(r.error) for r in grid if r.error is not None][:3]
        raise TuneError(f"no trial reported {metric}; errors: {errors}")
    best_row = _winner(rows, metric, opts.plan)
    best = next(r for r in grid if _trial_name(r) == best_row.name)
    stopped = sum(1 for r in rows if r.status == "STOPPED EARLY")
    _finish_children(uri, grid, rows)
    registered = _register_best(uri, opts, state, best, best_row, metric, mode, data_dir,
                                space)
    result = {
        "name": opts.name,
        "parent_run_id": state["parent_run_id"],
        "metric": metric,
        "mode": mode,
        "best": {"trial": best_row.name, "run_id": best_row.run_id,
                 "params": best_row.params, "epoch": best_row.best_epoch,
                 "metrics": best_row.metrics, "config": registered.pop("config")},
        "trials": [_row_json(r) for r in rows],
        "search": asdict(opts.plan),
        "front": [_row_json(r) for r in _front(rows, metric, mode, opts.plan)],
        "stopped_early": stopped,
        "registered": registered,
        "tracking_uri": redact_uri(uri),
    }
    return rows, result


def _winner(rows: list[TrialRow], metric: str, plan: SearchPlan) -> TrialRow:
    """The best ranked row within the cost budget (the first row without one).

    Raises:
        TuneError: no trial that reported ``metric`` is within the budget.
    """
    scored = [r for r in rows if r.metrics.get(metric) is not None]
    budget = plan.budget()
    if budget is None:
        return scored[0]
    cost, limit = budget
    within = [r for r in scored if r.metrics.get(cost, math.inf) <= limit]
    if not within:
        cheapest = min((r.metrics.get(cost, math.inf) for r in scored), default=math.inf)
        raise TuneError(f"no trial is within the cost budget {cost} <= {limit:g} (the cheapest "
                        f"costs {cheapest:.4g}); nothing registered. Raise --max-cost or search "
                        "cheaper encoders")
    return within[0]


def _front(rows: list[TrialRow], metric: str, mode: str, plan: SearchPlan) -> list[TrialRow]:
    """The trials on the ``metric`` versus cost Pareto front, cheapest first."""
    flat = [{"row": r, **r.metrics} for r in rows]
    return [d["row"] for d in pareto_front(flat, metric, plan.cost_metric, mode)]


def _read_state(exp_dir: str) -> dict[str, Any] | None:
    path = storage.join(exp_dir, TUNE_STATE_FILE)
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def _write_state(exp_dir: str, state: dict[str, Any]) -> None:
    storage.write_atomic(storage.join(exp_dir, TUNE_STATE_FILE),
                         json.dumps(state, indent=1, default=str))


def _start_parent(uri: str, opts: TuneOptions, space: Any, base: Config, data_hash: str,
                  data_dir: str, res: Resources) -> str:
    params = {
        "tune.space": space.path, "tune.preset": space.preset, "tune.metric": base.train
        .select_metric, "tune.num_samples": opts.num_samples or space.num_samples,
        "tune.scheduler": opts.plan.scheduler, "tune.search": opts.plan.search,
        "tune.objective": opts.plan.objective, "tune.cost": opts.plan.cost_metric,
        "tune.max_cost": opts.plan.max_cost, "tune.search_seed": opts.plan.seed,
        "tune.max_concurrent_trials": res.max_concurrent,
        "tune.num_workers_per_trial": res.num_workers, "tune.worker_cpus": res.worker_cpus,
        "tune.epochs": base.train.epochs, "data.dir": redact_uri(data_dir),
        "data.manifest_hash": data_hash, "ray.storage_path": redact_uri(
            opts.storage_path or default_storage_path()),
    }
    params.update({f"search.{k}": json.dumps(v) for k, v in space.params.items()})
    tags = {"se4lip.kind": "tune", "se4lip.tune": opts.name, "se4lip.preset": space.preset,
            "se4lip.data_manifest_hash": data_hash, "se4lip.search": opts.plan.search,
            "se4lip.scheduler": str(opts.plan.scheduler),
            "se4lip.objective": opts.plan.objective,
            "se4lip.budget": _budget_text(opts.plan)}
    run_id = start_run(
        uri, opts.experiment, opts.name, params=params, tags=tags,
        config_yaml=Path(space.path).read_text(), command="tune",
        description=(f"Tune `{opts.name}` over `{space.path}` ({space.description or 'search'})"
                     f", {_plan_text(opts.plan)}: running. Trials are the child runs below."))

    manifest = Manifest.load(data_dir)
    frames = clip_frames(manifest, SplitRule.for_manifest(manifest, base))
    log_datasets(uri, run_id, data_hash=data_hash, source=str(data_dir),
                 splits={"training": sorted(frames["train"]),
                         "validation": sorted(frames["val"])})
    return run_id


def _budget_text(plan: SearchPlan) -> str:
    budget = plan.budget()
    return "none" if budget is None else f"{budget[0]} <= {budget[1]:g}"


def _plan_text(plan: SearchPlan) -> str:
    """``search tpe, scheduler asha, objective pareto, budget cost/... <= 0.1``."""
    return (f"search {plan.search}, scheduler {plan.scheduler}, objective {plan.objective}, "
            f"cost budget {_budget_text(plan)}")


def _rank(grid: Any, metric: str, mode: str, space: Any) -> list[TrialRow]:
    """Trials ranked by their best epoch's ``metric`` (what each trial would register)."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        cfg = r.config or {}
        params = {k: cfg[k] for k in space.params if k in cfg}
        epochs = int(m.get("epoch", 0) or 0)
        max_epochs = Config.from_dict(cfg["se4lip"]["base"]).override(params).train.epochs \
            if "se4lip" in cfg else epochs
        if r.error is not None:
            status = "ERROR"
        elif epochs < max_epochs:
            status = "STOPPED EARLY"
        else:
            status = "DONE"
        best_epoch = int(m.get(f"{BEST_PREFIX}epoch", epochs) or 0)
        best_metrics = _best_epoch_metrics(_history(r), m, best_epoch, metric)
        keep = {k: float(v) for k, v in best_metrics.items()
                if k.startswith(("val/", "train/", "cost/")) and isinstance(v, int | float)}
        rows.append(TrialRow(name=_trial_name(r), params=params, status=status, epoch=epochs,
                             metrics=keep, best_epoch=best_epoch))

    def key(row: TrialRow) -> tuple[float, float]:
        v = row.metrics.get(metric)
        if v is None or not math.isfinite(v):
            return math.inf, math.inf
        loss = row.metrics.get(TIE_BREAK, math.inf)
        return (-v if mode == "max" else v), loss

    return sorted(rows, key=key)


def _best_epoch_metrics(history: list[dict[str, Any]], last: dict[str, Any], best_epoch: int,
                        metric: str) -> dict[str, Any]:
    """The metrics of a trial's best epoch (every report carries the best so far).

    Under PBT a trial's history has its own epochs before an exploit and the cloned lineage's
    after, so an epoch number can appear twice, or the best epoch can be the other trial's:
    the latest entry holding the best value is taken, else the last report with that value."""
    best = last.get(BEST_PREFIX + metric)
    for h in reversed(history):
        if h.get("epoch") == best_epoch and (best is None or h.get(metric) == best):
            return h
    return last if best is None else {**last, metric: best}


def _history(result: Any) -> list[dict[str, Any]]:
    """Every epoch a trial reported (Tune keeps them in ``metrics_dataframe``)."""
    df = getattr(result, "metrics_dataframe", None)
    if df is None or df.empty:
        return []
    return df.to_dict("records")


def _trial_name(result: Any) -> str:
    return storage.basename(result.path) if getattr(result, "path", None) else "?"


def _row_json(r: TrialRow) -> dict[str, Any]:
    return {"trial": r.name, "status": r.status, "epoch": r.epoch, "best_epoch": r.best_epoch,
            "run_id": r.run_id, "params": r.params,
            **{k: float(f"{v:.4g}") if k in COSTS else round(v, 4)
               for k, v in r.metrics.items()}}


def _finish_children(uri: str, grid: Any, rows: list[TrialRow]) -> None:
    """Close every trial's MLflow run with the status Tune gave it (a trial the scheduler stopped
    early finished normally), and note each run id on its row."""
    client = MlflowClient(tracking_uri=uri)
    by_name = {r.name: r for r in rows}
    for result in grid:
        run_id = _run_id_of(client, result)
        row = by_name.get(_trial_name(result))
        if run_id is None or row is None:
            continue
        row.run_id = run_id
        client.set_tag(run_id, "se4lip.trial_status", row.status)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED" if result.error is not None else "FINISHED")


def _run_id_of(client: Any, result: Any) -> str | None:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`se4lip.trial` = '{_trial_name(result)}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _register_best(uri: str, opts: TuneOptions, state: dict[str, Any], best: Any,
                   row: TrialRow, metric: str, mode: str, data_dir: str,
                   space: Any) -> dict[str, Any]:
    """Hand the best trial's best epoch to the lifecycle (log, register, gate, alias)."""
    path = (best.metrics or {}).get("checkpoint_path")
    if not path:
        raise TuneError("the best trial reported no checkpoint")
    # Tune reports the path inside the storage's filesystem (``bucket/key`` on S3).
    store = storage.absolute(opts.storage_path or default_storage_path())
    fs = None if storage.is_local(store) else storage.resolve(store)[0]
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        restored = load_checkpoint_dir(d)
    cfg = Config.from_dict(restored.state["config"])
    run_id = row.run_id or state["parent_run_id"]
    best_epoch = int(restored.state.get("best_epoch", restored.state["epoch"]))
    cand = Candidate(
        model_state=restored.best, cfg=cfg, run_id=run_id,
        source=f"run:{run_id}:epoch{best_epoch}", epoch=best_epoch,
        epochs=int(restored.state["epoch"]), selected_by=f"{metric} ({mode})",
        tags={"se4lip.data_manifest_hash": state["data_hash"], "se4lip.tune": opts.name,
              "se4lip.trial": row.name, "se4lip.search_space": space.path},
        costs={k: v for k, v in row.metrics.items() if k in COSTS}, budget=opts.plan.budget())
    try:
        published = publish(uri, cand, register=opts.register, data_dir=data_dir)
    except GateError as e:
        raise TuneError(str(e)) from e
    return {"name": opts.register, "version": published["version"],
            "alias": published["alias"], "reason": published["reason"],
            "model_uri": published["registered_uri"], "scores": published.get("scores", {}),
            "champion": published.get("champion"), "floor": published.get("floor"),
            "config": cfg.to_dict()}


def _log_parent(uri: str, parent: str, rows: list[TrialRow], result: dict[str, Any],
                metric: str) -> None:
    header = ["rank", "trial", "status", "epochs", "best epoch",
              *sorted({k for r in rows for k in r.params}), metric]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        vals = [str(i), r.name, r.status, str(r.epoch), str(r.best_epoch),
                *[_short(r.params.get(k, "")) for k in header[5:-1]],
                f"{r.metrics.get(metric, float('nan')):.4f}"]
        lines.append("| " + " | ".join(vals) + " |")
    table = "\n".join(lines) + "\n"
    logger = RunLogger(uri, parent)
    logger.text(table, "trials.md")
    logger.text(json.dumps(result["trials"], indent=1), "trials.json")
    plan = SearchPlan(**result["search"])
    front = _log_front(logger, rows, result, metric, plan)
    best = result["best"]
    logger.metrics({f"best/{k}": v for k, v in best["metrics"].items()}, step=0)
    client = MlflowClient(tracking_uri=uri)
    reg = result["registered"]
    client.set_tag(parent, "se4lip.registered", f"{reg['name']} v{reg['version']} ({reg['alias']})")
    client.set_tag(parent, "se4lip.best_trial", best["trial"])
    if best.get("run_id"):
        client.set_tag(parent, "se4lip.best_run_id", best["run_id"])
    set_description(uri, parent, (
        f"Tune `{result['name']}` ({_plan_text(plan)}): {len(rows)} trials ranked by their best "
        f"epoch's `{metric}` ({result['mode']}). Best"
        f"{' within the budget' if plan.budget() else ''}: trial {best['trial']} (run "
        f"`{best.get('run_id')}`, epoch {best['epoch']}), `{metric}` = "
        f"{best['metrics'].get(metric, float('nan')):.4f}. Registered `{reg['name']}` "
        f"v{reg['version']} as **{reg['alias']}**: {reg['reason']}.\n\n{table}\n"
        f"Pareto front ({metric} vs {plan.cost_metric}, cheapest first):\n\n{front}"))
    end_run(uri, parent, "FINISHED")


def _log_front(logger: RunLogger, rows: list[TrialRow], result: dict[str, Any], metric: str,
               plan: SearchPlan) -> str:
    """The accuracy-versus-cost front as ``pareto.md`` and ``plots/pareto.png``; its table."""
    cost = plan.cost_metric
    on_front = {r["trial"] for r in result["front"]}
    header = ["trial", *sorted({k for r in rows for k in r.params}), metric, *COSTS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["front"]:
        lines.append("| " + " | ".join([r["trial"], *[_short(r["params"].get(k, ""))
                                                      for k in header[1:-3]],
                                        *[f"{r.get(k, float('nan')):.4g}"
                                          for k in header[-3:]]]) + " |")
    table = "\n".join(lines) + "\n"
    logger.text(table, "pareto.md")
    points = [(r.metrics[cost], r.metrics[metric], r.name in on_front) for r in rows
              if r.metrics.get(cost) is not None and r.metrics.get(metric) is not None]
    if points:
        logger.figure(pareto_figure(points, metric, cost, f"tune {result['name']}"),
                      "pareto.png")
    return table


_WAIT_POLL_S = 2.0
"""How often the driver reads the lines of trials waiting for capacity."""


class _LiveTable(Callback):
    """Tune callback that keeps one :class:`TrialRow` per trial and reports changes.

    Tune pickles its callbacks with the experiment state; the ``on_update`` and ``on_wait``
    hooks (a display, with locks) are left out of that state, so a restored experiment simply
    has none.
    """

    def __init__(self, metric: str, on_update: Callable[[list[TrialRow]], None] | None,
                 tune_name: str = "", on_wait: Callable[[str], None] | None = None) -> None:
        self.metric = metric
        self.rows: dict[str, TrialRow] = {}
        self.on_update = on_update
        self.on_wait = on_wait
        self.tune_name = tune_name
        self.waiting: dict[str, str] = {}
        self.polled = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_update": None, "on_wait": None}

    def on_step_end(self, iteration, trials, **info):  # type: ignore[no-untyped-def]
        if time.monotonic() - self.polled < _WAIT_POLL_S:
            return
        self.polled = time.monotonic()
        now = waiting_trials(self.tune_name)
        for name, line in now.items():
            if self.waiting.get(name) != line and self.on_wait:
                self.on_wait(line)
        changed = set(now) != set(self.waiting)
        for name, row in self.rows.items():
            if row.status in ("RUNNING", "WAITING"):
                row.status = "WAITING" if name in now else "RUNNING"
        self.waiting = now
        if changed:
            self._emit()

    def _row(self, trial: Any) -> TrialRow:
        name = str(trial)
        if name not in self.rows:
            params = {k: v for k, v in (trial.config or {}).items() if k != "se4lip"}
            self.rows[name] = TrialRow(name=name, params=params)
        return self.rows[name]

    def _emit(self) -> None:
        if self.on_update:
            self.on_update(list(self.rows.values()))

    def on_trial_start(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
        self._row(trial).status = "RUNNING"
        self._emit()

    def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
        row = self._row(trial)
        row.status = "RUNNING"
        row.epoch = int(result.get("epoch", row.epoch) or 0)
        row.metrics = {k: float(v) for k, v in result.items()
                       if k.startswith(("val/", BEST_PREFIX))
                       and isinstance(v, int | float)}
        row.best_epoch = int(result.get(f"{BEST_PREFIX}epoch", row.best_epoch) or 0)
        self._emit()

    def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
        self._row(trial).status = "TERMINATED"
        self._emit()

    def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
        self._row(trial).status = "ERROR"
        self._emit()
