"""How a tune searches: the searcher, the scheduler and the objective, from ``tune``'s flags.

- ``random``: Tune's variant generator over the space as written (``grid`` keys enumerated,
  the others sampled); ``grid``: every ``choice`` enumerated too (ranges are refused);
  ``tpe``: Optuna's TPE through Ray Tune's ``OptunaSearch``, which learns from the finished
  trials. ``choice`` maps to a categorical, ``uniform``/``loguniform``/``randint`` to float,
  log-float and int distributions one to one; a ``grid`` key is refused (TPE samples, it does
  not enumerate: write it as ``choice``).
- ``accuracy`` ranks trials by the space's metric; ``pareto`` searches metric (max) and
  extraction cost (min) together (multi-objective TPE with ``tpe``) and the parent run logs the
  front. ``max_cost`` bounds the cost of the encoder that may win and be promoted.
- ``asha`` stops weak trials on ``epoch`` on top of any searcher; ``fifo`` runs all to the end;
  ``pbt`` (population-based training) runs the population side by side and, after every
  epoch, has a trial in the bottom quarter continue from a top-quarter trial's checkpoint with
  that trial's config, its training keys perturbed (:func:`pbt_mutations`). Keys the weights
  depend on (``model.*``, the window) are drawn once per trial and travel with the checkpoint.

The searcher's state lives in the Tune experiment: ``Tuner.restore`` (``--resume``) brings the
Optuna study back with every trial it was told, so a resumed search neither repeats nor
restarts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from se4lip_dist.config import ConfigError, shapes_weights
from se4lip_dist.cost import COSTS, GFLOP, RTF
from se4lip_dist.spaces import SCHEDULERS, SearchSpace

SEARCHES = ("random", "grid", "tpe")
OBJECTIVES = ("accuracy", "pareto")
COST_METRICS = {"gflop": GFLOP, "rtf": RTF}
"""``--cost`` names of the ``cost/*`` metrics a budget or a front is over."""
SEARCH_METRIC_PREFIX = "best/"
"""What the searcher is told: the trial's best epoch so far (what the trial would register),
not its last one (``train.BEST_PREFIX``)."""


@dataclass(frozen=True)
class SearchPlan:
    """How to search (the ``tune`` flags); checked against a space by :func:`check_plan`."""

    search: str = "random"
    scheduler: str | None = None
    """None: the space's own (``scheduler:`` in its YAML, ASHA by default)."""
    objective: str = "accuracy"
    cost: str = "gflop"
    """``gflop`` (per audio second, from the architecture) or ``rtf`` (measured)."""
    max_cost: float | None = None
    seed: int | None = None
    """Seed of the searcher's sampling (random or TPE); trials' training seeds are apart."""

    @property
    def cost_metric(self) -> str:
        return COST_METRICS[self.cost]

    def budget(self) -> tuple[str, float] | None:
        """``(cost metric, limit)`` the winner and the gate must respect, or None."""
        return None if self.max_cost is None else (self.cost_metric, self.max_cost)


def check_plan(space: SearchSpace, plan: SearchPlan, epochs: int | None = None) -> str:
    """The scheduler the plan runs with, after refusing combinations that cannot work.

    ``epochs``: a trial's epochs, when known (PBT needs two or more to exploit between).

    Raises:
        ConfigError: one line naming the flag (and the space key) to change.
    """
    if plan.search not in SEARCHES:
        raise ConfigError(f"--search must be one of {SEARCHES}, got {plan.search!r}")
    if plan.objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {OBJECTIVES}, got {plan.objective!r}")
    if plan.cost not in COST_METRICS:
        raise ConfigError(f"--cost must be one of {sorted(COST_METRICS)}, got {plan.cost!r}")
    scheduler = plan.scheduler or space.scheduler
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if plan.max_cost is not None and not plan.max_cost > 0:
        raise ConfigError(f"--max-cost must be > 0, got {plan.max_cost:g}")
    kinds = {k: next(iter(spec)) for k, spec in space.params.items()}
    if plan.search == "tpe":
        grid = sorted(k for k, kind in kinds.items() if kind == "grid")
        if grid:
            raise ConfigError(f"--search tpe samples and cannot enumerate a grid: {space.path} "
                              f"has grid key(s) {', '.join(grid)}; write them as choice, or "
                              "use --search grid|random")
    if plan.search == "grid":
        ranges = sorted(k for k, kind in kinds.items() if kind not in ("grid", "choice"))
        if ranges:
            raise ConfigError(f"--search grid enumerates lists only: {space.path} samples "
                              f"{', '.join(ranges)} from a range; use --search random|tpe")
    if scheduler == "pbt":
        _check_pbt(space, plan, epochs)
    return scheduler


def _check_pbt(space: SearchSpace, plan: SearchPlan, epochs: int | None) -> None:
    if plan.search == "tpe":
        raise ConfigError("--scheduler pbt draws and perturbs its own population: use "
                          "--search random or grid with it, not tpe")
    if plan.objective == "pareto":
        raise ConfigError("--scheduler pbt exploits on the metric alone: use --objective "
                          "accuracy (a --max-cost budget still bounds what is registered)")
    if not pbt_mutations(space):
        fixed = ", ".join(sorted(space.params)) or "nothing"
        raise ConfigError(f"--scheduler pbt perturbs training keys (train.lr, augment.*), and "
                          f"{space.path} searches only {fixed}, which the weights depend on: "
                          "add a train.* or augment.* range, or use --scheduler asha|fifo")
    if epochs is not None and epochs < 2:
        raise ConfigError(f"--scheduler pbt exploits between epochs and a trial trains "
                          f"{epochs}: give --epochs 2 or more")


def trial_count(space: SearchSpace, plan: SearchPlan, num_samples: int) -> int:
    """Trials a search creates: ``num_samples`` times every enumerated list (``grid`` keys, and
    ``choice`` keys too with ``--search grid``)."""
    lists = ("grid", "choice") if plan.search == "grid" else ("grid",)
    return num_samples * math.prod(len(arg) for spec in space.params.values()
                                   for kind, arg in spec.items() if kind in lists)


def check_population(space: SearchSpace, plan: SearchPlan, num_samples: int,
                     max_concurrent: int | None) -> None:
    """PBT trains its population side by side (a trial waiting for its turn has no score to
    compare and none to clone): refuse a population the cluster cannot run at once.

    Raises:
        ConfigError: naming the flags to change.
    """
    if plan.scheduler != "pbt":
        return
    n = trial_count(space, plan, num_samples)
    if n < 2:
        raise ConfigError(f"--scheduler pbt needs a population of 2 or more trials, got {n}: "
                          "raise --num-samples")
    if max_concurrent is not None and n > max_concurrent:
        fewer = (f"pass --num-samples {max_concurrent}, or " if max_concurrent >= 2 else
                 "pass --num-samples and ")
        raise ConfigError(f"--scheduler pbt trains its {n} trials side by side, and "
                          f"{max_concurrent} fit at once here: {fewer}--max-concurrent-trials "
                          "with the population size (each trial then gets a smaller share: "
                          "--cpus-per-trial, --num-workers-per-trial)")


def pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """What PBT may perturb: the searched keys the weights do not depend on (a ``choice`` or
    ``grid`` as its list, which PBT steps through; a range as its Tune domain, which PBT
    rescales by 0.8 or 1.2 or draws again)."""
    domains = space.param_space()
    out: dict[str, Any] = {}
    for key, spec in space.params.items():
        (kind, arg), = spec.items()
        if shapes_weights(key):
            continue
        out[key] = list(arg) if kind in ("choice", "grid") else domains[key]
    return out


class SideBySidePBT(PopulationBasedTraining):
    """Tune's PBT for a population that runs all at once (:func:`check_population`).

    Tune's PBT pauses a trial at its perturbation point whenever another is paused or pending,
    to take turns when the population exceeds the cluster. Here a trial is paused only while
    it restarts from an exploit, and pausing the others then would only restart them from
    their own checkpoints (a Train V2 trial restarts its whole worker group). Nor does a
    trial's last epoch exploit or get cloned: the clone would have nothing left to train."""

    def __init__(self, *, max_t: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_t = max_t

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE else decision


def _clip(bounds: dict[str, tuple[float, float]], config: dict[str, Any]) -> dict[str, Any]:
    """PBT's explore step multiplies a value by 0.8 or 1.2 whatever its range: keep it inside."""
    for key, (lo, hi) in bounds.items():
        if key in config:
            v = min(max(config[key], lo), hi)
            config[key] = type(config[key])(v)
    return config


def searcher(space: SearchSpace, plan: SearchPlan, metric: str, mode: str,
             points: list[dict[str, Any]] | None = None,
             max_concurrent: int | None = None,
             num_samples: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Tune's ``search_alg`` and the ``param_space`` it goes with.

    Args:
        space: the validated space.
        plan: the flags (checked by :func:`check_plan`).
        metric: the metric ranking trials; the searcher is told its best-so-far value.
        mode: ``max`` or ``min``.
        points: configurations to try first (the champion's, say), as dotted key -> value.
        max_concurrent: trials at once (Tune ignores ``max_concurrent_trials`` with a
            variant generator: the generator must bound it).
        num_samples: the trial budget TPE's random start is sized to.

    Returns:
        ``(search_alg, param_space)``: with ``tpe`` the Optuna searcher owns the space and
        ``param_space`` keeps only the fixed values (Tune refuses both holding the domains).
    """
    domains = space.param_space()
    if plan.search == "grid":
        domains = {**domains, **{k: tune.grid_search(list(spec["choice"]))
                                 for k, spec in space.params.items() if "choice" in spec}}
    if plan.search != "tpe":
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=plan.seed,
                                     max_concurrent=max_concurrent or 0), domains
    searched = {k: domains[k] for k in space.params}
    target = SEARCH_METRIC_PREFIX + metric
    if plan.objective == "pareto":
        metrics: str | list[str] = [target, plan.cost_metric]
        modes: str | list[str] = [mode, "min"]
    else:
        metrics, modes = target, mode
    alg = OptunaSearch(space=OptunaSearch.convert_search_space(searched), metric=metrics,
                       mode=modes, points_to_evaluate=points or None,
                       sampler=tpe_sampler(plan.seed, num_samples, max_concurrent))
    return alg, dict(space.fixed)


def startup_trials(num_samples: int | None) -> int:
    """Random trials before TPE models the results: half the budget, 2 to 10.

    Optuna's default (10 whatever the budget) made every search of 10 trials or fewer a
    random one."""
    if num_samples is None:
        return 10
    return max(2, min(10, num_samples // 2))


def tpe_sampler(seed: int | None, num_samples: int | None,
                max_concurrent: int | None) -> Any:
    """Optuna's TPE (multi-objective when given two metrics), sized to the trial budget.

    With trials running side by side, ``constant_liar`` counts the running ones as bad so
    that concurrent suggestions spread out instead of repeating one point."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # both options are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup_trials(num_samples), multivariate=True,
            constant_liar=(max_concurrent or 2) > 1)


def scheduler(kind: str, epochs: int, space: SearchSpace | None = None) -> Any:
    """ASHA on ``epoch`` (FIFO when asked, or when one epoch leaves nothing to stop early), or
    PBT exploiting after every epoch (``space`` gives what it perturbs)."""
    if kind == "pbt":
        assert space is not None
        bounds = {k: (float(v[0]), float(v[1])) for k, spec in space.params.items()
                  for kind_, v in spec.items() if kind_ in ("uniform", "loguniform", "randint")}
        return SideBySidePBT(
            max_t=epochs, time_attr="epoch", perturbation_interval=1, quantile_fraction=0.25,
            resample_probability=0.25, hyperparam_mutations=pbt_mutations(space),
            custom_explore_fn=functools.partial(_clip, bounds))
    if kind == "fifo" or epochs < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)


def make_tuner(trainable: Any, space: SearchSpace, plan: SearchPlan, objective: tuple[str, str],
               *, name: str, storage: str, constants: dict[str, Any], num_samples: int,
               max_concurrent: int | None, epochs: int, callbacks: list[Any],
               points: list[dict[str, Any]] | None = None, restore: str | None = None) -> Any:
    """A ``tune.Tuner`` searching ``space`` as ``plan`` says, or the one saved at ``restore``.

    Args:
        trainable: Tune trainable (``tuning.tune_trial`` with its resources).
        space: the validated space.
        plan: checked by :func:`check_plan` (``plan.scheduler`` set).
        objective: ``(metric, mode)`` ranking the trials and driving the scheduler.
        name: experiment name under ``storage``.
        storage: Tune's storage path.
        constants: fixed config entries every trial gets besides its parameters.
        num_samples: trials (with ``grid`` keys: repetitions of the grid).
        max_concurrent: trials at once (None: unbounded).
        epochs: a trial's epochs (the scheduler's ``max_t``).
        callbacks: Tune callbacks.
        points: configurations to evaluate first (see :func:`warm_points`).
        restore: the experiment folder of a ``--resume``: the Tuner restored from it, with
            its searcher's and scheduler's state, when it has one.
    """
    run_config = tune.RunConfig(
        name=name, storage_path=storage, callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=1),
    )
    if restore is not None and tune.Tuner.can_restore(restore):
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    metric, mode = objective
    alg, param_space = searcher(space, plan, metric, mode, points, max_concurrent,
                                num_samples)
    return tune.Tuner(
        trainable,
        param_space={**param_space, **constants},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=alg, num_samples=num_samples,
            # A Searcher (TPE) is bounded here; the variant generator bounds itself above.
            max_concurrent_trials=max_concurrent if plan.search == "tpe" else None,
            scheduler=scheduler(str(plan.scheduler), epochs, space),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=run_config,
    )


def trial_name(trial: Any) -> str:
    """``trial-<id>_<creation index>`` for every searcher: the variant generator's ids end in
    the index already; a searcher's (TPE's) are random hex, so the index comes from the
    trial's tag, which Tune starts with its 1-based creation counter."""
    tid = trial.trial_id
    if "_" not in tid:
        tid = f"{tid}_{int(trial.experiment_tag.split('_', 1)[0]) - 1:05d}"
    return f"trial-{tid}"


def trial_index(name: str) -> int:
    """``trial-fe0e0_00003`` -> 3: the order a search created its trials in."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def warm_points(space: SearchSpace, flat: dict[str, Any]) -> list[dict[str, Any]]:
    """The space's keys of a flat config (a champion's) as one point to evaluate first, or
    none when a value lies outside the space (the searcher would refuse it)."""
    point: dict[str, Any] = {}
    for key, spec in space.params.items():
        (kind, arg), = spec.items()
        if key not in flat:
            return []
        v = flat[key]
        if kind in ("choice", "grid"):
            if v not in arg:
                return []
        elif not (isinstance(v, int | float) and arg[0] <= v <= arg[1]):
            return []
        point[key] = v
    return [point]


__all__ = [
    "COSTS",
    "COST_METRICS",
    "OBJECTIVES",
    "SCHEDULERS",
    "SEARCHES",
    "SearchPlan",
    "check_plan",
    "check_population",
    "make_tuner",
    "pbt_mutations",
    "scheduler",
    "searcher",
    "startup_trials",
    "tpe_sampler",
    "trial_count",
    "trial_index",
    "trial_name",
    "warm_points",
]
