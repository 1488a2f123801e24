"""How tune searches: flag checks, TPE's mapping of the YAML space, and the searcher's mechanics
(resume keeps its state, warm start, multi-objective) on real Ray Tune with a synthetic
objective, through the same ``make_tuner`` that ``tune`` uses."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from se4lip_dist.config import ConfigError
from se4lip_dist.search import (
    SearchPlan,
    _clip,
    check_plan,
    check_population,
    make_tuner,
    pbt_mutations,
    scheduler,
    searcher,
    trial_count,
    trial_index,
    warm_points,
)
from se4lip_dist.spaces import load_space

METRIC = "val/shift_acc"


def _space(tmp_path: Path, params: dict[str, Any], **top: Any) -> Any:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"preset": "cpu-small", "metric": METRIC, "mode": "max",
                                 "num_samples": 4, "params": params, **top}))
    return load_space(p)


MIXED = {"model.gru_layers": {"randint": [1, 8]}, "train.lr": {"loguniform": [1e-4, 2e-3]},
         "train.window_frames": {"choice": [3, 5, 7]},
         "train.weight_decay": {"uniform": [0.0, 0.1]}, "train.batch_size": 16}


def test_plan_refuses_what_cannot_work(tmp_path: Path) -> None:
    grid = _space(tmp_path, {"model.frontend": {"grid": ["stft", "mel"]},
                             "train.lr": {"loguniform": [1e-4, 1e-3]}})
    with pytest.raises(ConfigError, match=r"tpe.*model\.frontend"):
        check_plan(grid, SearchPlan(search="tpe"))
    with pytest.raises(ConfigError, match=r"grid enumerates lists only.*train\.lr"):
        check_plan(grid, SearchPlan(search="grid"))
    with pytest.raises(ConfigError, match="--search must be one of"):
        check_plan(grid, SearchPlan(search="bayes"))
    with pytest.raises(ConfigError, match="--scheduler must be one of"):
        check_plan(grid, SearchPlan(scheduler="hyperband"))
    with pytest.raises(ConfigError, match="--max-cost must be > 0"):
        check_plan(grid, SearchPlan(max_cost=0.0))
    assert check_plan(grid, SearchPlan()) == "asha"  # the space's default
    fifo = _space(tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-3]}}, scheduler="fifo")
    assert check_plan(fifo, SearchPlan(search="tpe")) == "fifo"
    assert check_plan(fifo, SearchPlan(search="tpe", scheduler="asha")) == "asha"


def test_pbt_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    arch = _space(tmp_path, {"model.gru_layers": {"choice": [1, 2]},
                             "train.window_frames": {"choice": [3, 5]}})
    with pytest.raises(ConfigError, match=r"pbt perturbs training keys.*model\.gru_layers"):
        check_plan(arch, SearchPlan(scheduler="pbt"))
    space = _space(tmp_path, {"model.gru_layers": {"choice": [1, 2]},
                              "train.lr": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match="use --search random or grid"):
        check_plan(space, SearchPlan(search="tpe", scheduler="pbt"))
    with pytest.raises(ConfigError, match="--objective accuracy"):
        check_plan(space, SearchPlan(scheduler="pbt", objective="pareto"))
    with pytest.raises(ConfigError, match="--epochs 2 or more"):
        check_plan(space, SearchPlan(scheduler="pbt"), epochs=1)
    assert check_plan(space, SearchPlan(scheduler="pbt"), epochs=3) == "pbt"


def test_pbt_trains_its_whole_population_at_once(tmp_path: Path) -> None:
    """A trial waiting for capacity has no score to compare and no checkpoint to clone, and
    Tune would create it only when another ends: the population must fit at once."""
    space = _space(tmp_path, {"model.gru_layers": {"grid": [1, 2]},
                              "train.lr": {"loguniform": [1e-4, 1e-2]}})
    plan = SearchPlan(scheduler="pbt")
    assert trial_count(space, plan, 3) == 6  # 3 samples of a 2-value grid
    check_population(space, plan, 3, 6)
    check_population(space, plan, 3, None)  # a cluster: Tune's pending trials are demand
    with pytest.raises(ConfigError, match=r"its 6 trials side by side, and 4 fit at once"):
        check_population(space, plan, 3, 4)
    one = _space(tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match="population of 2 or more"):
        check_population(one, plan, 1, 4)
    check_population(space, SearchPlan(scheduler="asha"), 3, 1)  # only PBT needs it


def test_pbt_perturbs_only_what_the_weights_do_not_depend_on(tmp_path: Path) -> None:
    from ray.tune.search.sample import Float

    space = _space(tmp_path, {"model.gru_layers": {"choice": [1, 2]},
                              "train.window_frames": {"choice": [3, 5]},
                              "train.lr": {"loguniform": [1e-4, 1e-2]},
                              "train.batch_size": {"choice": [16, 32]},
                              "augment.noise_p": {"uniform": [0.0, 0.5]}})
    muts = pbt_mutations(space)
    assert set(muts) == {"train.lr", "train.batch_size", "augment.noise_p"}
    assert muts["train.batch_size"] == [16, 32]  # PBT steps through a list
    assert isinstance(muts["train.lr"], Float)
    # PBT rescales by 0.8 or 1.2 whatever the range: the explore step keeps values inside.
    clipped = _clip({"train.lr": (1e-4, 1e-2)}, {"train.lr": 1.2e-2, "train.batch_size": 16})
    assert clipped == {"train.lr": 1e-2, "train.batch_size": 16}
    sched = scheduler("pbt", 3, space)
    assert sched._time_attr == "epoch" and sched._perturbation_interval == 1


def test_tpe_maps_the_yaml_space_one_to_one(tmp_path: Path) -> None:
    import optuna.distributions as od

    space = _space(tmp_path, MIXED)
    alg, param_space = searcher(space, SearchPlan(search="tpe", seed=0), METRIC, "max")
    assert alg._space == {
        "model.gru_layers": od.IntDistribution(1, 8),  # YAML's inclusive upper bound
        "train.lr": od.FloatDistribution(1e-4, 2e-3, log=True),
        "train.window_frames": od.CategoricalDistribution([3, 5, 7]),
        "train.weight_decay": od.FloatDistribution(0.0, 0.1),
    }
    assert param_space == {"train.batch_size": 16}  # Optuna owns the domains
    assert alg.metric == "best/" + METRIC  # told the trial's best epoch, not its last
    pareto, _ = searcher(space, SearchPlan(search="tpe", objective="pareto", cost="rtf"),
                         METRIC, "max")
    assert pareto.metric == ["best/" + METRIC, "cost/rtf"] and pareto.mode == ["max", "min"]


def test_grid_search_enumerates_choices(tmp_path: Path) -> None:
    from ray.tune.search.variant_generator import parse_spec_vars

    def count_variants(spec: dict[str, Any], _: list[Any]) -> int:
        return math.prod(len(list(v)) for _, v in parse_spec_vars(spec)[2])

    space = _space(tmp_path, {"model.gru_layers": {"choice": [1, 2, 4]},
                              "model.frontend": {"grid": ["stft", "mel"]}})
    _, grid = searcher(space, SearchPlan(search="grid"), METRIC, "max")
    _, rand = searcher(space, SearchPlan(search="random"), METRIC, "max")
    assert count_variants(grid, []) == 6 and count_variants(rand, []) == 2


def test_random_and_grid_search_bound_their_own_concurrency(tmp_path: Path) -> None:
    """Tune ignores ``max_concurrent_trials`` beside a variant generator (it ran every trial
    at once, and ASHA had no earlier trial to stop a bad one against): the generator must be
    given the bound."""
    space = _space(tmp_path, {"model.gru_layers": {"choice": [1, 2, 4]}})
    for search in ("random", "grid"):
        alg, _ = searcher(space, SearchPlan(search=search), METRIC, "max", max_concurrent=1)
        assert alg.max_concurrent == 1


def _tpe_distances(space: Any, num_samples: int, seed: int, optimum: float) -> list[float]:
    """|log10(lr) - optimum| of each trial a TPE search proposes, told each score in turn."""
    alg, _ = searcher(space, SearchPlan(search="tpe", seed=seed), METRIC, "max",
                      num_samples=num_samples)
    out = []
    for i in range(num_samples):
        config = alg.suggest(f"t{i}")
        d = abs(math.log10(config["train.lr"]) - optimum)
        alg.on_trial_complete(f"t{i}", {"best/" + METRIC: -d, "epoch": 1})
        out.append(d)
    return out


def test_tpe_learns_within_a_small_budget(tmp_path: Path) -> None:
    """Optuna's TPE draws its first 10 trials at random by default: a tune of 8 trials (the
    default space's) was a random search under another name. Within a budget of 8, the
    second half of the trials must land near the optimum more often than random draws."""
    space = _space(tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-1]}})
    late = [d for seed in range(24) for d in _tpe_distances(space, 8, seed, -4.5)[4:]]
    near = sum(d < 0.5 for d in late) / len(late)
    # A log-uniform draw lands within half a decade of 1e-4.5 with probability 1/4.
    assert near > 0.4, near


def test_warm_points_keep_only_a_champion_inside_the_space(tmp_path: Path) -> None:
    space = _space(tmp_path, MIXED)
    champ = {"model.gru_layers": 2, "train.lr": 3e-4, "train.window_frames": 5,
             "train.weight_decay": 0.0, "train.batch_size": 32}
    assert warm_points(space, champ) == [{k: champ[k] for k in space.params}]
    assert warm_points(space, {**champ, "train.window_frames": 9}) == []  # not a choice
    assert warm_points(space, {**champ, "train.lr": 1e-2}) == []  # outside the range


# -- real Ray Tune, synthetic objective --------------------------------------------------------


def _objective(config: dict[str, Any]) -> None:
    """Best at lr 1e-3 and 2 layers; cost grows with the layers. Pickled by value."""
    from ray import tune

    layers, lr = config["model.gru_layers"], config["train.lr"]
    score = 1.0 - (math.log10(lr) + 3.0) ** 2 - 0.05 * (layers - 2) ** 2
    tune.report({"epoch": 1, METRIC: score, "best/" + METRIC: score,
                 "cost/gflop_per_audio_s": 0.03 * layers, "cost/rtf": 0.001 * layers})


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    import ray
    from ray import cloudpickle

    from se4lip_dist.runtime import init_ray

    # The trainable is this module's: Ray's workers cannot import tests/ by name.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _tuner(space: Any, plan: SearchPlan, storage: Path, *, callbacks: list[Any] | None = None,
           points: list[dict[str, Any]] | None = None, restore: str | None = None,
           num_samples: int = 6) -> Any:
    from ray import tune

    return make_tuner(tune.with_resources(_objective, {"cpu": 0.25}), space, plan,
                      (METRIC, "max"), name="s", storage=str(storage), constants={},
                      num_samples=num_samples, max_concurrent=1, epochs=1,
                      callbacks=callbacks or [], points=points, restore=restore)


class _InterruptAfter:
    """Ctrl-C (the Tune driver's graceful stop) once ``n`` trials completed, once: Tune
    restores its callbacks with the experiment, so ``marker`` says it fired already."""

    def __new__(cls, n: int, marker: Path) -> Any:
        from ray.tune import Callback

        class Interrupt(Callback):
            def __init__(self) -> None:
                self.done = 0

            def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
                self.done += 1
                if self.done >= n and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGINT)

        return Interrupt()


@pytest.mark.timeout(300)
def test_tpe_resume_keeps_the_searchers_state(tmp_path: Path, local_ray: None) -> None:
    """Interrupted after 2 of 6 trials, the restored search runs the 4 left (not 6 more), and
    its Optuna study holds all 6 trials (it learnt from the first 2)."""
    from ray.tune.search.optuna import OptunaSearch

    space = _space(tmp_path, {"model.gru_layers": {"randint": [1, 4]},
                              "train.lr": {"loguniform": [1e-4, 1e-2]}})
    plan = SearchPlan(search="tpe", scheduler="fifo", seed=3)
    stop = _InterruptAfter(2, tmp_path / "fired")
    first = _tuner(space, plan, tmp_path / "ray", callbacks=[stop]).fit()
    done = [r for r in first if r.metrics and METRIC in r.metrics]
    assert 2 <= len(done) < 6, len(done)  # interrupted

    exp = str(tmp_path / "ray" / "s")
    rest = _tuner(space, plan, tmp_path / "ray", restore=exp).fit()
    assert len(rest) == 6, [r.config for r in rest]
    # Named in creation order like variant-generated trials (Optuna's ids are random hex, and
    # every TPE trial's MLflow run was "#0": the benchmark's "best after k" order was lost).
    assert sorted(trial_index(Path(r.path).name) for r in rest) == list(range(6))
    assert all(r.error is None and METRIC in r.metrics for r in rest)
    alg = OptunaSearch()
    alg.restore_from_dir(exp)
    assert len(alg._ot_study.trials) == 6
    assert len({(r.config["model.gru_layers"], r.config["train.lr"]) for r in rest}) == 6


@pytest.mark.timeout(300)
def test_warm_start_and_pareto_tpe(tmp_path: Path, local_ray: None) -> None:
    """The champion's point is the first trial; a multi-objective TPE search runs and tells
    Optuna both objectives."""
    from ray.tune.search.optuna import OptunaSearch

    space = _space(tmp_path, {"model.gru_layers": {"randint": [1, 4]},
                              "train.lr": {"loguniform": [1e-4, 1e-2]}})
    champ = {"model.gru_layers": 3, "train.lr": 5e-4}
    plan = SearchPlan(search="tpe", scheduler="fifo", objective="pareto", seed=1)
    grid = _tuner(space, plan, tmp_path / "ray", points=[champ], num_samples=4).fit()
    assert len(grid) == 4
    assert [r.path for r in grid if {k: r.config[k] for k in champ} == champ], \
        [(r.path, r.config) for r in grid]
    alg = OptunaSearch()
    alg.restore_from_dir(str(tmp_path / "ray" / "s"))
    study = alg._ot_study
    assert study.trials[0].params == champ  # asked first
    assert len(study.directions) == 2 and len(study.trials) == 4
    assert all(len(t.values) == 2 for t in study.trials)


def test_tune_warm_starts_tpe_from_the_registered_champion(tmp_path: Path) -> None:
    """``--search tpe`` with a champion under ``--register``: its values of the searched keys
    are the first point; random search, or no champion, gets none."""
    from shard_fixtures import TINY_MODEL, register_random_model

    from se4lip_dist.config import load_config
    from se4lip_dist.lifecycle import promote
    from se4lip_dist.tuning import TuneOptions, _champion_points

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = _space(tmp_path, {"model.gru_layers": {"choice": [1, 2, 3]},
                              "train.lr": {"loguniform": [1e-4, 1e-2]}})
    tpe = TuneOptions(register="enc", plan=SearchPlan(search="tpe"))
    assert _champion_points(uri, tpe, space) == []  # no model yet
    cfg = load_config("cpu-small", overrides=[*TINY_MODEL, "model.gru_layers=3",
                                              "train.lr=5e-4"])
    register_random_model(uri, cfg, "enc")
    assert _champion_points(uri, tpe, space) == []  # registered, not champion
    promote("enc", 1, tracking_uri=uri)
    assert _champion_points(uri, tpe, space) == [{"model.gru_layers": 3, "train.lr": 5e-4}]
    assert _champion_points(uri, TuneOptions(register="enc"), space) == []  # random search
