"""Random search against TPE at a fixed budget: the best score reached after k trials.

    # real trials (the README's table): one tune per (searcher, seed), trials one at a time
    .venv/bin/python benchmarks/search_compare.py --data se4lip-runs/shards-grid \\
        --space tune/default.yaml --trials 16 --epochs 3 --seeds 0 1 2 3 4 --at 4 8 16 \\
        --out benchmarks/search_compare.json

    # the searchers' mechanics on a synthetic objective (seconds per tune, no data)
    .venv/bin/python benchmarks/search_compare.py --synthetic --trials 12 --seeds 0 1 2

    # the table again from the MLflow runs of earlier real tunes (no trials run)
    .venv/bin/python benchmarks/search_compare.py --from-mlflow --tracking-uri URI \\
        --trials 16 --seeds 0 1 2 3 4 --at 4 8 16

Every (searcher, seed) pair runs the same number of trials with the same epochs, one trial at
a time (so "after k trials" is the order the searcher chose them in) and ASHA off (FIFO: an
early-stopped trial's score would not be comparable). ``--seeds`` seed the searcher's
sampling; the trials' training seed is the preset's, for both searchers. The table gives, for
each k in ``--at``, the mean over seeds of the best validation score among the first k trials
with a 95 % bootstrap interval over seeds (few seeds: wide intervals, and they say so).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SEARCHERS = ("random", "tpe")


def synthetic_score(config: dict[str, Any]) -> float:
    """A smooth stand-in for validation accuracy over the default space's keys: best at
    lr 1e-3, 2 GRU layers and a 5-frame window."""
    lr = config.get("train.lr", 1e-3)
    layers = config.get("model.gru_layers", 2)
    window = config.get("train.window_frames", 5)
    return float(1.0 - 0.5 * (math.log10(lr) + 3.0) ** 2 - 0.03 * (layers - 2) ** 2
                 - 0.01 * (window - 5) ** 2)


def _synthetic_trial(config: dict[str, Any]) -> None:
    from ray import tune

    score = synthetic_score(config)
    tune.report({"epoch": 1, config["__metric"]: score, "best/" + config["__metric"]: score})


def run_synthetic(space_path: str, search: str, seed: int, trials: int,
                  storage: str) -> list[float]:
    """Scores of one synthetic tune, in the order its trials were created."""
    from ray import cloudpickle, tune

    from se4lip_dist.search import SearchPlan, check_plan, make_tuner, trial_index
    from se4lip_dist.spaces import load_space

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import us
    space = load_space(space_path)
    plan = SearchPlan(search=search, scheduler="fifo", seed=seed)
    check_plan(space, plan)
    grid = make_tuner(tune.with_resources(_synthetic_trial, {"cpu": 0.25}), space, plan,
                      (space.metric, "max"), name=f"{search}-{seed}", storage=storage,
                      constants={"__metric": space.metric}, num_samples=trials,
                      max_concurrent=1, epochs=1, callbacks=[]).fit()
    done = sorted(grid, key=lambda r: trial_index(Path(r.path).name))
    return [float(r.metrics.get(space.metric, math.nan)) for r in done]


def run_real(space_path: str, data: str, search: str, seed: int, trials: int, epochs: int,
             storage: str, tracking_uri: str | None,
             overrides: tuple[str, ...] = ()) -> list[float]:
    """Best-epoch scores of one real tune (``run_tune``), in trial creation order."""
    from se4lip_dist.search import SearchPlan, trial_index
    from se4lip_dist.tuning import TuneOptions, run_tune

    result = run_tune(space_path, data, TuneOptions(
        num_samples=trials, max_concurrent_trials=1, epochs=epochs,
        name=f"search-compare-{search}-{seed}", storage_path=storage,
        tracking_uri=tracking_uri, experiment="search-compare",
        register=f"search-compare-{search}", warm_start=False, overrides=overrides,
        plan=SearchPlan(search=search, scheduler="fifo", seed=seed)))
    metric = result["metric"]
    rows = sorted(result["trials"], key=lambda t: trial_index(t["trial"]))
    return [float(t.get(metric, math.nan)) for t in rows]


def scores_from_mlflow(uri: str, metric: str, searchers: list[str],
                       seeds: list[int]) -> dict[str, dict[int, list[float]]]:
    """The scores of finished tunes this script ran, from their MLflow runs: each tune's trial
    runs in the order they started (trials run one at a time), best epoch's ``metric``.

    Rebuilds the table after a crash, or for tunes whose trial names carry no creation order
    (TPE trials before ``search.trial_name``)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("search-compare")
    runs: dict[str, dict[int, list[float]]] = {s: {} for s in searchers}
    if exp is None:
        return runs
    for s in searchers:
        for seed in seeds:
            parents = client.search_runs([exp.experiment_id],
                                         f"tags.`se4lip.kind` = 'tune' and "
                                         f"attributes.run_name = 'search-compare-{s}-{seed}'")
            if not parents or parents[0].info.status != "FINISHED":
                continue  # not run, or still running
            children = client.search_runs(
                [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
                order_by=["attributes.start_time ASC"])
            runs[s][seed] = [float(c.data.metrics.get("best/" + metric, math.nan))
                             for c in children]
    return {s: r for s, r in runs.items()}


def best_after(scores: list[float], k: int) -> float:
    """The best score among the first ``k`` trials (NaN-safe)."""
    first = [s for s in scores[:k] if math.isfinite(s)]
    return max(first) if first else math.nan


def mean_interval(values: list[float], reps: int = 2000) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval of the mean over seeds (one seed: no interval)."""
    v = np.array([x for x in values if math.isfinite(x)])
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan, math.nan
    rng = np.random.default_rng(0)
    means = rng.choice(v, size=(reps, len(v)), replace=True).mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table(runs: dict[str, dict[int, list[float]]], at: list[int], metric: str) -> str:
    """Markdown: one row per k, one column per searcher (mean [95 % interval], n seeds)."""
    searchers = list(runs)
    lines = [f"| best {metric} after k trials | " + " | ".join(searchers) + " |",
             "|---|" + "---|" * len(searchers)]
    for k in at:
        cells = []
        for s in searchers:
            m, lo, hi = mean_interval([best_after(sc, k) for sc in runs[s].values()])
            ci = f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else ""
            cells.append(f"{m:.3f}{ci} (n={len(runs[s])})")
        lines.append(f"| k = {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default="tune/default.yaml")
    ap.add_argument("--data", help="prepared shards: real trials (else --synthetic)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--at", type=int, nargs="+", default=None)
    ap.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=SEARCHERS)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="preset override for every trial (as tune --set)")
    ap.add_argument("--storage-path", default=None)
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--out", default=None, help="JSON of every run's scores and the table")
    ap.add_argument("--from-mlflow", action="store_true",
                    help="no trials: rebuild the table from the MLflow runs at --tracking-uri")
    a = ap.parse_args(argv)
    if a.from_mlflow:
        if not a.tracking_uri:
            ap.error("--from-mlflow reads the runs at --tracking-uri")
        from se4lip_dist.spaces import load_space

        metric = load_space(a.space).metric
        at = a.at or sorted({max(1, a.trials // 4), max(1, a.trials // 2), a.trials})
        out = _report(a, scores_from_mlflow(a.tracking_uri, metric, a.searchers, a.seeds),
                      at, metric)
        print(out["table"])
        return out
    if not a.synthetic and not a.data:
        ap.error("pass --data SHARDS (real trials) or --synthetic")
    import ray

    from se4lip_dist.runtime import init_ray
    from se4lip_dist.spaces import load_space

    metric = load_space(a.space).metric
    at = a.at or sorted({max(1, a.trials // 4), max(1, a.trials // 2), a.trials})
    storage = a.storage_path or tempfile.mkdtemp(prefix="search-compare-")
    runs: dict[str, dict[int, list[float]]] = {s: {} for s in a.searchers}
    init_ray(dashboard=not a.synthetic)
    out: dict[str, Any] = {}
    try:
        for seed in a.seeds:
            for s in a.searchers:
                runs[s][seed] = (run_synthetic(a.space, s, seed, a.trials, storage)
                                 if a.synthetic else
                                 run_real(a.space, a.data, s, seed, a.trials, a.epochs,
                                          storage, a.tracking_uri, tuple(a.overrides)))
                out = _report(a, runs, at, metric)  # kept after every tune: hours of trials
    finally:
        ray.shutdown()
    print(out["table"])
    return out


def _report(a: argparse.Namespace, runs: dict[str, dict[int, list[float]]], at: list[int],
            metric: str) -> dict[str, Any]:
    out = {"space": a.space, "data": a.data, "synthetic": a.synthetic, "trials": a.trials,
           "epochs": a.epochs, "seeds": a.seeds, "overrides": a.overrides, "metric": metric,
           "at": at, "scores": {s: {str(k): v for k, v in r.items()} for s, r in runs.items()},
           "table": table(runs, at, metric)}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
