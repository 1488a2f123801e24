"""``se4lip-dist tune``: Ray Tune over a search space, each trial a distributed TorchTrainer run.

Ray 2.60 pattern (Train V2 + Tune): every trial runs :func:`tune_trial`, a *driver function*
that builds a ``TorchTrainer`` over :func:`se4lip_dist.train.train_loop` and forwards rank 0's
per-epoch metrics to Tune through ``TuneReportCallback``. ASHA (or FIFO) schedules the trials on
``time_attr="epoch"``.

MLflow: one parent run for the tune job, one child run per trial (found again by its trial name
on ``--resume``), the ranked trial table as an artifact, and the best trial's encoder logged and
registered. The quality gate moves alias ``champion`` to the new version only if it beats the
current champion evaluated on the *same* validation data; otherwise it gets ``challenger``.

Resources: a trial's driver holds a small CPU slice and its workers share the rest of
``cpus_per_trial``; concurrent trials are capped so at least one CPU stays free for Ray Data
(on 2 cores, reserving every CPU hangs Ray Data forever).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from se4lip_dist.config import Config

TUNE_STATE_FILE = "se4lip_tune.json"
DRIVER_CPUS = 0.25
"""CPU slice of a trial's driver function (it only waits on its TorchTrainer)."""
DATA_CPUS = 1.0
"""CPUs kept free for Ray Data on a local machine."""
CHAMPION = "champion"
CHALLENGER = "challenger"


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
    num_workers_per_trial: int = 2
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
    overrides: tuple[str, ...] = ()
    """``--set`` overrides applied to the space's preset before the search values."""


@dataclass
class TrialRow:
    """One line of the live and final trial tables."""

    name: str
    params: dict[str, Any]
    status: str = "PENDING"
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    """Per-trial resources resolved against the cluster."""

    driver_cpus: float
    worker_cpus: float
    worker_gpus: float
    num_workers: int
    max_concurrent: int


def plan_resources(
    cluster_cpus: float,
    *,
    num_workers: int,
    cpus_per_trial: float | None,
    gpus_per_trial: float,
    max_concurrent: int | None,
    local: bool,
    cluster_gpus: float = 0.0,
) -> Resources:
    """Split CPUs between trial drivers, train workers and Ray Data.

    Raises:
        TuneError: the request cannot fit, or would leave Ray Data without a CPU.
    """
    if num_workers < 1:
        raise TuneError("--num-workers-per-trial must be >= 1")
    spare = DATA_CPUS if local else 0.0
    usable = cluster_cpus - spare
    if usable < DRIVER_CPUS + 0.1 * num_workers:
        raise TuneError(f"{cluster_cpus:g} CPUs cannot run a trial and keep {spare:g} for Ray Data")
    if cpus_per_trial is None:
        per = usable / (max_concurrent or 1)
        cpus_per_trial = max(DRIVER_CPUS + 0.1 * num_workers, min(per, 1.0 + 0.5 * num_workers))
    worker_cpus = round((cpus_per_trial - DRIVER_CPUS) / num_workers, 3)
    if worker_cpus <= 0:
        raise TuneError(f"--cpus-per-trial {cpus_per_trial:g} leaves no CPU for the "
                        f"{num_workers} workers after the trial driver's {DRIVER_CPUS:g}")
    fit = max(1, math.floor(usable / cpus_per_trial + 1e-9))
    if gpus_per_trial > 0:
        fit = min(fit, max(1, math.floor(cluster_gpus / gpus_per_trial + 1e-9)))
    concurrent = max_concurrent or fit
    if concurrent * cpus_per_trial > usable + 1e-9:
        raise TuneError(
            f"{concurrent} concurrent trials x {cpus_per_trial:g} CPUs exceed the "
            f"{usable:g} CPUs left after keeping {spare:g} for Ray Data; lower "
            "--max-concurrent-trials or --cpus-per-trial")
    return Resources(DRIVER_CPUS, worker_cpus, gpus_per_trial / num_workers, num_workers,
                     concurrent)


# --------------------------------------------------------------------------------------------
# Trial side
# --------------------------------------------------------------------------------------------


def tune_trial(config: dict[str, Any]) -> None:
    """Tune trainable: one trial = one TorchTrainer run with its own MLflow child run."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from se4lip_dist.train import _worker_env, train_loop, training_datasets

    job = config["se4lip"]
    params = {k: v for k, v in config.items() if k != "se4lip"}
    cfg = Config.from_dict(job["base"]).override(params)
    trial = ray.tune.get_context().get_trial_name()
    run_id = _child_run(job, trial, cfg, params)
    data_dir = job["data_dir"]
    resources = {"CPU": job["worker_cpus"]}
    if job["worker_gpus"]:
        resources["GPU"] = job["worker_gpus"]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "tracking_uri": job["tracking_uri"],
                           "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job["num_workers"], use_gpu=bool(job["worker_gpus"]),
            resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # Stable per trial: a resumed tune resumes each unfinished trial's Train run.
            name=f"{job['name']}-{trial}",
            storage_path=job["storage"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
        datasets=training_datasets(data_dir, cfg),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    from se4lip_dist.tracking import end_run

    end_run(job["tracking_uri"], run_id, "FINISHED")


def _child_run(job: dict[str, Any], trial: str, cfg: Config, params: dict[str, Any]) -> str:
    """The trial's MLflow child run: reused when the trial restarts after a resume."""
    from mlflow import MlflowClient

    from se4lip_dist.tracking import ensure_experiment, flatten, reopen_run, start_run

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
    return start_run(
        uri, job["experiment"], trial, params=logged,
        tags={"mlflow.parentRunId": job["parent_run_id"], "se4lip.trial": trial,
              "se4lip.tune": job["name"], "se4lip.preset": cfg.preset},
        config_yaml=cfg.to_yaml(),
    )


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def default_storage_path() -> str:
    """``<cwd>/se4lip-runs/tune``."""
    from se4lip_dist.tracking import RUNS_DIR

    return str(Path.cwd().resolve() / RUNS_DIR / "tune")


def run_tune(
    space_path: str,
    data_dir: str,
    opts: TuneOptions,
    *,
    on_update: Callable[[list[TrialRow]], None] | None = None,
) -> dict[str, Any]:
    """Search, then log, register and gate the best encoder.

    Args:
        space_path: search-space YAML (see ``tune/``).
        data_dir: prepared shards.
        opts: resources, tracking and naming options.
        on_update: called with all trial rows whenever a trial reports or ends (live table).

    Returns:
        ``name``, ``parent_run_id``, ``best`` (trial, params, metrics), ``trials`` (ranked rows),
        ``stopped_early``, ``registered`` (name, version, alias, reason), ``wall_s``.

    Raises:
        TuneError, ConfigError, ManifestError, TrackingError.
    """
    from se4lip_dist.manifest import Manifest
    from se4lip_dist.spaces import load_space
    from se4lip_dist.tracking import check_reachable, redact_uri, resolve_tracking_uri

    t0 = time.perf_counter()
    space = load_space(space_path, preset=opts.preset)
    metric = opts.metric or space.metric
    mode = opts.mode or (space.mode if metric == space.metric else _default_mode(metric))
    base = space.base_config(list(opts.overrides))
    if opts.epochs is not None:
        base = base.override({"train.epochs": opts.epochs})
    base = base.override({"train.num_workers": opts.num_workers_per_trial})
    manifest = Manifest.load(data_dir)
    manifest.check_shards(data_dir)  # old-schema shards fail here, not inside every trial
    data_hash = manifest.content_hash()
    uri = resolve_tracking_uri(opts.tracking_uri)
    check_reachable(uri)
    # Ray is imported only now: a bad space, data folder or server fails in a second.
    import ray
    from ray import tune

    from se4lip_dist.runtime import cluster_cpus, init_ray
    storage = opts.storage_path or default_storage_path()
    exp_dir = _local_dir(storage, opts.name)
    state = _read_state(exp_dir)
    if opts.resume and state is None:
        raise TuneError(f"--resume: no tune named {opts.name!r} under {storage}")
    if not opts.resume and state is not None:
        raise TuneError(f"a tune named {opts.name!r} already exists under {storage}: pass "
                        "--resume to continue it or --name to start another")
    if state and state.get("registered"):
        return state["result"]  # finished earlier: nothing left to do, never register twice

    started = not ray.is_initialized()
    init_ray(opts.address, dashboard=True)  # Train V2's placement-group cleaner needs it
    try:
        res = plan_resources(
            cluster_cpus(), num_workers=opts.num_workers_per_trial,
            cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial,
            max_concurrent=opts.max_concurrent_trials,
            local=not (opts.address or os.environ.get("RAY_ADDRESS")),
            cluster_gpus=float(ray.cluster_resources().get("GPU", 0.0)),
        )
        if state is None:
            parent = _start_parent(uri, opts, space, base, data_hash, data_dir, res)
            state = {"parent_run_id": parent, "space": space.path, "data_dir": str(data_dir),
                     "data_hash": data_hash, "metric": metric, "mode": mode,
                     "base": base.to_dict()}
            _write_state(exp_dir, state)
        else:
            from se4lip_dist.tracking import reopen_run

            reopen_run(uri, state["parent_run_id"])
        job = {
            "base": state["base"], "data_dir": str(Path(data_dir).resolve()),
            "data_hash": data_hash, "tracking_uri": uri, "experiment": opts.experiment,
            "parent_run_id": state["parent_run_id"], "name": opts.name, "storage": storage,
            "num_workers": res.num_workers, "worker_cpus": res.worker_cpus,
            "worker_gpus": res.worker_gpus,
        }
        # The new Tune console output ignores verbose=0; we draw our own live table instead.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        trainable = tune.with_resources(tune_trial, {"cpu": res.driver_cpus})
        live = _LiveTable(metric, on_update)
        run_config = tune.RunConfig(
            name=opts.name, storage_path=storage, callbacks=[live], verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
        )
        tuner_path = str(Path(storage) / opts.name) if "://" not in storage else \
            f"{storage.rstrip('/')}/{opts.name}"
        if opts.resume and tune.Tuner.can_restore(tuner_path):
            tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={**space.param_space(), "se4lip": job},
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode,
                    num_samples=opts.num_samples or space.num_samples,
                    max_concurrent_trials=res.max_concurrent,
                    scheduler=_scheduler(space.scheduler, base.train.epochs),
                    trial_name_creator=lambda t: f"trial-{t.trial_id}",
                    trial_dirname_creator=lambda t: f"trial-{t.trial_id}",
                ),
                run_config=run_config,
            )
        grid = tuner.fit()
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
        best_row = rows[0]
        best = grid.get_best_result(metric=metric, mode=mode, scope="last")
        stopped = sum(1 for r in rows if r.status == "STOPPED EARLY")
        _finish_children(uri, grid)
        registered = _register_best(uri, opts, state, best, metric, mode, data_dir, space)
        result = {
            "name": opts.name,
            "parent_run_id": state["parent_run_id"],
            "metric": metric,
            "mode": mode,
            "best": {"trial": best_row.name, "params": best_row.params,
                     "metrics": best_row.metrics, "config": registered.pop("config")},
            "trials": [_row_json(r) for r in rows],
            "stopped_early": stopped,
            "registered": registered,
            "tracking_uri": redact_uri(uri),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        _log_parent(uri, state["parent_run_id"], rows, result, metric)
        state.update({"registered": True, "result": result})
        _write_state(exp_dir, state)
        return result
    finally:
        if started:
            ray.shutdown()


def _default_mode(metric: str) -> str:
    from se4lip_dist.spaces import METRICS

    return METRICS.get(metric, "max")


def _scheduler(kind: str, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if kind == "fifo" or epochs < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)


def _local_dir(storage: str, name: str) -> Path | None:
    if "://" in storage and not storage.startswith("file://"):
        return None
    root = Path(storage[len("file://"):] if storage.startswith("file://") else storage)
    return root.resolve() / name


def _read_state(exp_dir: Path | None) -> dict[str, Any] | None:
    if exp_dir is None or not (exp_dir / TUNE_STATE_FILE).is_file():
        return None
    return json.loads((exp_dir / TUNE_STATE_FILE).read_text())


def _write_state(exp_dir: Path | None, state: dict[str, Any]) -> None:
    if exp_dir is None:
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    tmp = exp_dir / f".{TUNE_STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(exp_dir / TUNE_STATE_FILE)


def _start_parent(uri: str, opts: TuneOptions, space: Any, base: Config, data_hash: str,
                  data_dir: str, res: Resources) -> str:
    from se4lip_dist.tracking import git_revision, redact_uri, start_run

    params = {
        "tune.space": space.path, "tune.preset": space.preset, "tune.metric": opts.metric
        or space.metric, "tune.num_samples": opts.num_samples or space.num_samples,
        "tune.scheduler": space.scheduler, "tune.max_concurrent_trials": res.max_concurrent,
        "tune.num_workers_per_trial": res.num_workers, "tune.worker_cpus": res.worker_cpus,
        "tune.epochs": base.train.epochs, "data.dir": str(Path(data_dir).resolve()),
        "data.manifest_hash": data_hash, "ray.storage_path": redact_uri(
            opts.storage_path or default_storage_path()),
    }
    params.update({f"search.{k}": json.dumps(v) for k, v in space.params.items()})
    tags = {"se4lip.kind": "tune", "se4lip.tune": opts.name, "se4lip.preset": space.preset,
            "se4lip.data_manifest_hash": data_hash}
    rev = git_revision()
    if rev:
        tags["mlflow.source.git.commit"] = rev
    return start_run(uri, opts.experiment, opts.name, params=params, tags=tags,
                     config_yaml=Path(space.path).read_text())


def _rank(grid: Any, metric: str, mode: str, space: Any) -> list[TrialRow]:
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
        keep = {k: float(v) for k, v in m.items()
                if k.startswith(("val_", "train_")) and isinstance(v, int | float)}
        row = TrialRow(name=_trial_name(r), params=params, status=status, epoch=epochs,
                       metrics=keep)
        rows.append(row)

    def key(row: TrialRow) -> float:
        v = row.metrics.get(metric)
        if v is None or not math.isfinite(v):
            return math.inf
        return -v if mode == "max" else v

    return sorted(rows, key=key)


def _trial_name(result: Any) -> str:
    return Path(result.path).name if getattr(result, "path", None) else "?"


def _row_json(r: TrialRow) -> dict[str, Any]:
    return {"trial": r.name, "status": r.status, "epoch": r.epoch, "params": r.params,
            **{k: round(v, 4) for k, v in r.metrics.items()}}


def _finish_children(uri: str, grid: Any) -> None:
    """Trials ASHA stopped never reach their own end_run: close their MLflow runs here."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for r in grid:
        run_id = _run_id_of(client, r)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED" if r.error is not None else "KILLED")


def _run_id_of(client: Any, result: Any) -> str | None:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`se4lip.trial` = '{_trial_name(result)}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _register_best(uri: str, opts: TuneOptions, state: dict[str, Any], best: Any, metric: str,
                   mode: str, data_dir: str, space: Any) -> dict[str, Any]:
    """Log the best trial's encoder, register it, and apply the champion quality gate."""
    import ray.train
    from mlflow import MlflowClient

    from se4lip_dist.registry import log_model, register_model
    from se4lip_dist.train import load_checkpoint_dir, validate

    path = (best.metrics or {}).get("checkpoint_path")
    if not path:
        raise TuneError("the best trial reported no checkpoint")
    with ray.train.Checkpoint(path).as_directory() as d:
        model_state, _, ck_state = load_checkpoint_dir(d)
    cfg = Config.from_dict(ck_state["config"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = _run_id_of(client, best) or state["parent_run_id"]
    model_uri = log_model(uri, run_id, cfg, model_state)

    new_score = validate(model_state, cfg, data_dir)[metric]
    tags = {metric: round(new_score, 4), "tune": opts.name, "search_space": space.path,
            "data_manifest_hash": state["data_hash"], "preset": cfg.preset, "run_id": run_id,
            **{k: round(v, 4) for k, v in (best.metrics or {}).items()
               if k.startswith("val_") and isinstance(v, int | float)}}
    version = register_model(uri, model_uri, opts.register, tags=tags, alias=None)
    alias, reason = _gate(uri, opts.register, version, new_score, metric, mode, data_dir)
    client.set_registered_model_alias(opts.register, alias, str(version))
    client.set_model_version_tag(opts.register, str(version), "gate", reason)
    return {"name": opts.register, "version": version, "alias": alias,
            "reason": reason, "model_uri": f"models:/{opts.register}/{version}",
            "score": round(new_score, 4), "config": cfg.to_dict()}


def _gate(uri: str, name: str, version: int, new_score: float, metric: str, mode: str,
          data_dir: str) -> tuple[str, str]:
    """``champion`` only when the new version beats the current champion on this data."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from se4lip_dist.registry import load_model_state
    from se4lip_dist.train import validate

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return CHAMPION, f"no {CHAMPION} yet: version {version} becomes {CHAMPION}"
    state, cfg = load_model_state(f"models:/{name}/{champ.version}", uri)
    old_score = validate(state, cfg, data_dir)[metric]
    better = new_score > old_score if mode == "max" else new_score < old_score
    verdict = (f"version {version} {metric}={new_score:.4f} vs {CHAMPION} v{champ.version} "
               f"{metric}={old_score:.4f} on the same validation shards")
    if better:
        return CHAMPION, f"{verdict}: promoted"
    return CHALLENGER, f"{verdict}: not better, {CHAMPION} stays at v{champ.version}"


def _log_parent(uri: str, parent: str, rows: list[TrialRow], result: dict[str, Any],
                metric: str) -> None:
    from mlflow import MlflowClient

    from se4lip_dist.tracking import RunLogger, end_run

    header = ["rank", "trial", "status", "epoch", *sorted({k for r in rows for k in r.params}),
              metric]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        vals = [str(i), r.name, r.status, str(r.epoch),
                *[str(r.params.get(k, "")) for k in header[4:-1]],
                f"{r.metrics.get(metric, float('nan')):.4f}"]
        lines.append("| " + " | ".join(vals) + " |")
    logger = RunLogger(uri, parent)
    logger.text("\n".join(lines) + "\n", "trials.md")
    logger.text(json.dumps(result["trials"], indent=1), "trials.json")
    best = result["best"]["metrics"]
    logger.metrics({f"best_{k}": v for k, v in best.items()}, step=0)
    client = MlflowClient(tracking_uri=uri)
    reg = result["registered"]
    client.set_tag(parent, "se4lip.registered", f"{reg['name']} v{reg['version']} ({reg['alias']})")
    end_run(uri, parent, "FINISHED")


class _LiveTable:
    """Tune callback that keeps one :class:`TrialRow` per trial and reports changes."""

    def __new__(cls, metric: str, on_update: Callable[[list[TrialRow]], None] | None) -> Any:
        from ray.tune import Callback

        class Live(Callback):
            def __init__(self) -> None:
                self.rows: dict[str, TrialRow] = {}

            def _row(self, trial: Any) -> TrialRow:
                name = str(trial)
                if name not in self.rows:
                    params = {k: v for k, v in (trial.config or {}).items() if k != "se4lip"}
                    self.rows[name] = TrialRow(name=name, params=params)
                return self.rows[name]

            def _emit(self) -> None:
                if on_update:
                    on_update(list(self.rows.values()))

            def on_trial_start(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
                self._row(trial).status = "RUNNING"
                self._emit()

            def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
                row = self._row(trial)
                row.status = "RUNNING"
                row.epoch = int(result.get("epoch", row.epoch) or 0)
                row.metrics = {k: float(v) for k, v in result.items()
                               if k.startswith("val_") and isinstance(v, int | float)}
                self._emit()

            def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
                self._row(trial).status = "TERMINATED"
                self._emit()

            def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
                self._row(trial).status = "ERROR"
                self._emit()

        return Live()
