"""`tune --search tpe --objective pareto --max-cost` from the CLI on tiny shards: real Ray,
real Train V2 trials, the cost of every trial, the Pareto front and the budget at the gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from shard_fixtures import TINY_MODEL, write_synthetic_shards

from se4lip_dist.config import load_config
from se4lip_dist.cost import GFLOP, RTF, gflop_per_audio_s
from se4lip_dist.search import SearchPlan
from se4lip_dist.tuning import TrialRow, TuneError, _winner

SEED = 0
"""TPE's first two draws of gru_layers with this seed are 2 then 1 (both sides of BUDGET)."""


def _gflop(layers: int) -> float:
    return gflop_per_audio_s(load_config("cpu-small",
                                         overrides=[*TINY_MODEL, f"model.gru_layers={layers}"]))


def test_the_winner_is_the_best_within_the_budget() -> None:
    rows = [TrialRow("a", {}, metrics={"val/x": 0.9, GFLOP: 2.0}),
            TrialRow("b", {}, metrics={"val/x": 0.7, GFLOP: 1.0}),
            TrialRow("c", {}, metrics={GFLOP: 0.1})]  # never scored
    assert _winner(rows, "val/x", SearchPlan()).name == "a"
    assert _winner(rows, "val/x", SearchPlan(max_cost=1.5)).name == "b"
    with pytest.raises(TuneError, match=r"no trial is within the cost budget .* cheapest costs 1"):
        _winner(rows, "val/x", SearchPlan(max_cost=0.5))


def test_cli_refuses_tpe_on_a_grid_space_in_one_line(tmp_path: Path) -> None:
    space = tmp_path / "g.yaml"
    space.write_text(yaml.safe_dump({"params": {"model.frontend": {"grid": ["stft", "mel"]}}}))
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, n_clips=4, n_frames=20, val_clips=2, clips_per_shard=2)
    done = subprocess.run([sys.executable, "-m", "se4lip_dist", "tune", "--data", str(shards),
                           "--space", str(space), "--search", "tpe",
                           "--storage-path", str(tmp_path / "ray"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "grid key(s) model.frontend" in done.stdout + done.stderr


@pytest.mark.timeout(1200)
def test_tpe_pareto_with_a_budget_from_the_cli(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, n_clips=28, n_frames=40, val_clips=8, clips_per_shard=7)
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({
        "preset": "cpu-small", "metric": "val/offset_acc", "num_samples": 2,
        "params": {"model.gru_layers": {"choice": [1, 2]}, "train.lr": 2.0e-3}}))
    budget = (_gflop(1) + _gflop(2)) / 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "-m", "se4lip_dist", "tune", "--data", str(shards), "--space",
            str(space), "--epochs", "1", "--tracking-uri", uri, "--storage-path",
            str(tmp_path / "ray"), "--name", "pareto", "--register", "se4lip-p", "--json",
            "--search", "tpe", "--search-seed", str(SEED), "--objective", "pareto",
            "--max-cost", f"{budget:.6g}"]
    for o in TINY_MODEL:
        argv += ["--set", o]
    done = subprocess.run(argv, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    layers = sorted(t["params"]["model.gru_layers"] for t in result["trials"])
    assert layers == [1, 2], result["trials"]
    for t in result["trials"]:
        assert t[GFLOP] == pytest.approx(_gflop(t["params"]["model.gru_layers"]), rel=1e-3)
        assert 0 < t[RTF] < 1
    # The 2-layer encoder is over the budget: whatever it scored, the 1-layer one wins.
    assert result["best"]["params"]["model.gru_layers"] == 1
    assert result["front"] and result["search"]["search"] == "tpe"

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["tune.search"] == "tpe"
    assert parent.data.params["tune.objective"] == "pareto"
    assert parent.data.tags["se4lip.budget"] == f"{GFLOP} <= {budget:.6g}"
    assert "Pareto front" in parent.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(result["parent_run_id"])}
    plots = {a.path for a in client.list_artifacts(result["parent_run_id"], "plots")}
    assert "pareto.md" in artifacts and "plots/pareto.png" in plots
    child = client.get_run(result["best"]["run_id"])
    assert GFLOP in child.data.metrics and RTF in child.data.metrics
    reg = result["registered"]
    mv = client.get_model_version("se4lip-p", str(reg["version"]))
    assert mv.tags["gate.budget"] == f"{GFLOP} <= {budget:.6g}"


@pytest.mark.timeout(1200)
def test_pbt_exploits_the_better_trial_from_the_cli(tmp_path: Path) -> None:
    """Two trials side by side, one that cannot learn (lr 1e-7; on a tie it ranks lower, being
    first), over 4 epochs (3 perturbation points): PBT has a trial continue the
    other's checkpoint under a perturbed config, the trial's MLflow run says so and its
    learning rate changes, and no trial restarts unless it was exploited (Tune's PBT paused
    the other trials while one restarted from an exploit, and cloned last epochs)."""
    from mlflow import MlflowClient

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, n_clips=28, n_frames=40, val_clips=8, clips_per_shard=7)
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({
        "preset": "cpu-small", "metric": "val/offset_acc", "num_samples": 1,
        "params": {"train.lr": {"grid": [1.0e-7, 2.0e-3]}}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "ray"
    argv = [sys.executable, "-m", "se4lip_dist", "tune", "--data", str(shards), "--space",
            str(space), "--epochs", "4", "--tracking-uri", uri, "--storage-path", str(store),
            "--name", "pbt", "--register", "se4lip-pbt", "--json", "--scheduler", "pbt",
            "--max-concurrent-trials", "2"]
    for o in TINY_MODEL:
        argv += ["--set", o]
    done = subprocess.run(argv, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert len(result["trials"]) == 2 and result["search"]["scheduler"] == "pbt"
    assert result["registered"]["version"] == 1

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("se4lip-tune").experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = "
                                         f"'{result['parent_run_id']}'")
    exploits = {c.data.tags["se4lip.trial"]: sorted(v for k, v in c.data.tags.items()
                                                    if k.startswith("se4lip.pbt."))
                for c in children}
    assert any(exploits.values()), exploits
    for child in children:
        trial = child.data.tags["se4lip.trial"]
        lrs = [m.value for m in sorted(client.get_metric_history(child.info.run_id,
                                                                 "train/lr"),
                                       key=lambda m: (m.timestamp, m.step))]
        # One Train run per start: the first, then one per exploit (no needless restarts).
        runs = [p for p in store.iterdir() if p.name.startswith(f"pbt-{trial}")]
        assert len(runs) == 1 + len(exploits[trial]), (trial, runs, exploits)
        for line in exploits[trial]:
            (other,) = set(exploits) - {trial}
            assert line.startswith(f"continues {other}/checkpoint_"), line
            # Never a last epoch's checkpoint: the exploiting trial trains on with the new lr.
            lr = float(line.rsplit("train.lr=", 1)[1])
            assert any(abs(v - lr) <= 0.01 * lr for v in lrs), (line, lrs)
