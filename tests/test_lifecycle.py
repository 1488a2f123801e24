"""The registry lifecycle on a real sqlite store: log, register once, gate, alias, compare.

A small SE4Lip is trained in-process (plain torch over the same pair sampler as training) so
the gate has a model that really finds sync; a random-init model of the same size is chance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shard_fixtures import TINY_TRAIN, write_synthetic_shards

from se4lip_dist.config import load_config
from se4lip_dist.lifecycle import (
    CHALLENGER,
    CHAMPION,
    Candidate,
    GateError,
    champion_version,
    content_blind_floor,
    format_score,
    promote,
    publish,
)
from se4lip_dist.manifest import Manifest
from se4lip_dist.stream import READ_COLUMNS, PairSpec, make_pair_batch
from se4lip_dist.sync import wilson_interval
from se4lip_dist.tracking import start_run
from se4lip_dist.validation import ValidationSet, model_from_state, score_shuffled, score_state

pytestmark = pytest.mark.timeout(600)


def _train_state(cfg, data: Path, epochs: int) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    """A seeded random-init state and the same model trained ``epochs`` passes in-process."""
    from se4lip_dist.losses import sync_bce_loss
    from se4lip_dist.models import build_model, lip_input

    rows = []
    for path in Manifest.load(data).shard_paths(data):
        t = pq.read_table(path, columns=READ_COLUMNS)
        rows += [r for r in t.to_pylist() if r["split"] == "train"]
    torch.manual_seed(0)
    model = build_model(cfg.model, window_frames=cfg.train.window_frames)
    random_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    spec = PairSpec.from_config(cfg)
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        order = rng.permutation(len(rows))
        for i in range(0, len(order), 8):
            group = [rows[j] for j in order[i:i + 8]]
            batch = {c: np.array([r[c] for r in group], dtype=object) for c in READ_COLUMNS}
            pairs = make_pair_batch(batch, spec=spec, seed=epoch * 1000 + i)
            for k in range(0, len(pairs["label"]), cfg.train.batch_size):
                sl = slice(k, k + cfg.train.batch_size)
                a, v = model(torch.from_numpy(pairs["wav"][sl]),
                             lip_input(torch.from_numpy(pairs["lips"][sl]), cfg.model))
                loss = sync_bce_loss(a, v, torch.from_numpy(pairs["label"][sl]))
                opt.zero_grad()
                loss.backward()
                opt.step()
    return random_state, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards with 12 validation clips, a config, a trained, a random-init and a constant
    (all-zero: the same answer whatever the input) state."""
    root = tmp_path_factory.mktemp("lifecycle")
    data = root / "shards"
    write_synthetic_shards(data, n_clips=30, n_frames=40, val_clips=VAL_CLIPS, clips_per_shard=6)
    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
    random_state, trained = _train_state(cfg, data, epochs=6)
    constant = {k: torch.zeros_like(v) for k, v in trained.items()}
    return {"data": str(data), "cfg": cfg, "trained": trained, "random": random_state,
            "constant": constant, "root": root}


VAL_CLIPS = 12
"""Validation clips of the fixture's shards: above the gate's ``train.val_min_units``."""


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(tracking URI, registered model name): the embedded sqlite store, or a real
    ``mlflow server`` over REST (a fresh model name per test on the shared server)."""
    import uuid

    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}", "enc"
    server = request.getfixturevalue("mlflow_sqlite_server")
    return server.url, f"enc-{uuid.uuid4().hex[:8]}"


def _candidate(setup: dict, uri: str, state: dict, source: str, cfg=None) -> Candidate:  # type: ignore[no-untyped-def]
    cfg = cfg or setup["cfg"]
    run_id = start_run(uri, "lc", source, params={}, tags={}, config_yaml=cfg.to_yaml())
    return Candidate(model_state=state, cfg=cfg, run_id=run_id, source=source, epoch=1,
                     epochs=1, selected_by="val/shift_acc (max)")


def _publish(setup: dict, uri: str, name: str, state: dict, source: str, cfg=None,  # type: ignore[no-untyped-def]
             data: str | None = None) -> dict:
    return publish(uri, _candidate(setup, uri, state, source, cfg), register=name,
                   data_dir=data or setup["data"])


def test_content_blind_baselines_sit_at_the_floor_a_trained_encoder_clears_it(
        setup: dict) -> None:
    """A constant answer, a random-init encoder and the trained encoder on shuffled audio all
    score at or below the floor; the trained encoder's lower bound is above it."""
    cfg = setup["cfg"]
    vset = ValidationSet.load(setup["data"], cfg)
    trained = score_state(setup["trained"], cfg, vset)
    cand = Candidate(model_state=setup["trained"], cfg=cfg, run_id="", source="", epoch=1,
                     epochs=1, selected_by="")
    floor = content_blind_floor(cand, vset, trained)
    assert floor["constant"] == 0.0  # shifts -3, 0, +3: no one offset is right at all three
    constant = score_state(setup["constant"], cfg, vset).metrics
    random_init = score_state(setup["random"], cfg, vset).metrics
    shuffled = score_shuffled(model_from_state(setup["trained"], cfg), cfg, vset)
    for blind in (constant, random_init, shuffled):
        assert blind["val/units"] == VAL_CLIPS
        assert blind["val/shift_acc"] <= floor["floor"], (blind, floor)
    # The zero model answers one offset whatever the audio: the old per-trial score could not
    # tell that from sync when the answer sits inside the shifts, the shift-consistent one can.
    assert constant["val/shift_acc"] == 0.0
    assert trained.metrics["val/shift_acc_ci_low"] > floor["floor"], (trained.metrics, floor)
    assert trained.metrics["val/units"] == VAL_CLIPS
    # Intervals count clips: 12 units, not 36 (clip, shift) trials.
    lo, hi = wilson_interval(trained.metrics["val/shift_acc"] * VAL_CLIPS, VAL_CLIPS)
    assert (trained.metrics["val/shift_acc_ci_low"], trained.metrics["val/shift_acc_ci_high"]) \
        == pytest.approx((lo, hi))


def test_champion_then_an_equal_version_stays_challenger(setup: dict, store: tuple) -> None:
    from mlflow import MlflowClient

    uri, name = store
    first = _publish(setup, uri, name, setup["trained"], "a")
    assert (first["version"], first["alias"]) == (1, CHAMPION), first
    assert "no champion yet" in first["reason"]
    assert first["scores"]["val/shift_acc_ci_low"] > first["floor"]["floor"]
    # The same weights again: equal evidence never flips the champion.
    second = _publish(setup, uri, name, setup["trained"], "b")
    assert (second["version"], second["alias"]) == (2, CHALLENGER), second
    assert "not significantly better than champion v1" in second["reason"]
    assert "0 won and 0 lost" in second["reason"]
    assert second["champion"]["version"] == 1 and second["champion"]["p_value"] == 1.0
    assert second["champion"]["scores"] == second["scores"]
    assert champion_version(uri, name) == 1

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version(name, "2")
    assert mv.tags["gate.decision"] == CHALLENGER and mv.tags["gate.champion_version"] == "1"
    assert mv.tags["gate.protocol"] and "clips" in mv.tags["gate.protocol_text"]
    assert "gate.pending" not in mv.tags
    assert mv.description.startswith(f"**{CHALLENGER}**")
    assert "promoted" not in mv.description.splitlines()[0]
    assert client.get_registered_model(name).description


def test_a_significantly_better_version_is_promoted(setup: dict, store: tuple) -> None:
    """The promoted branch: a champion put there by hand loses to a version that wins on
    enough of the same clips."""
    uri, name = store
    blind = _publish(setup, uri, name, setup["random"], "blind")
    assert blind["alias"] == CHALLENGER
    promote(name, blind["version"], tracking_uri=uri)
    better = _publish(setup, uri, name, setup["trained"], "better")
    assert better["alias"] == CHAMPION, better
    assert better["reason"].startswith(f"significantly better than champion v{blind['version']}")
    assert better["reason"].endswith("; promoted")
    assert better["champion"]["p_value"] < setup["cfg"].train.gate_alpha
    assert champion_version(uri, name) == better["version"]


def test_content_blind_models_are_never_promoted(setup: dict, store: tuple) -> None:
    uri, name = store
    for state in ("constant", "random"):
        res = _publish(setup, uri, name, setup[state], state)
        assert res["alias"] == CHALLENGER, res
        assert "not above the content-blind floor" in res["reason"], res["reason"]
        assert f"does not exceed {format_score(res['floor']['floor'])}" in res["reason"]
        assert "shuffled audio" in res["reason"] and "random-init encoder" in res["reason"]
        assert champion_version(uri, name) is None  # even with no champion at all
    good = _publish(setup, uri, name, setup["trained"], "g")
    assert good["alias"] == CHAMPION
    again = _publish(setup, uri, name, setup["random"], "r2")
    assert again["alias"] == CHALLENGER and "content-blind floor" in again["reason"]
    assert champion_version(uri, name) == good["version"]


def _scores(lo: float, units: int = 12) -> dict[str, float]:
    """Hand-made gate scores: ``lo`` the 95 % lower bound of the headline metric."""
    return {"val/shift_acc": lo + 0.1, "val/shift_acc_ci_low": lo, "val/shift_acc_ci_high": 1.0,
            "val/units": units, "val/clips": units, "val/offset_acc": 0.9, "val/sync_acc": 0.9,
            "val/loss": 0.3}


FLOOR = {"floor": 0.2, "constant": 0.1, "random_init": 0.2, "shuffled_audio": 0.15}


def test_the_cost_budget_keeps_the_champion_within_it() -> None:
    """A version over the budget is never promoted (even with no champion) and the reason
    names the budget; a champion over it gives way to one within it that clears the floor;
    without a budget, or with the champion within it, equal evidence changes nothing."""
    from se4lip_dist.cost import GFLOP, RTF
    from se4lip_dist.lifecycle import Versus, decide

    good = _scores(0.6)
    alias, reason = decide(good, FLOOR, 8, 0.05, None, (GFLOP, 0.5), {GFLOP: 0.8})
    assert alias == CHALLENGER
    assert reason == f"over the cost budget: {GFLOP} 0.8000 exceeds the budget 0.5"
    alias, reason = decide(good, FLOOR, 8, 0.05, None, (RTF, 0.01), {GFLOP: 0.1})
    assert alias == CHALLENGER and f"{RTF} was not measured" in reason

    equal = Versus(version=3, units=12, new_hits=8, old_hits=8, p_value=1.0,
                   costs={GFLOP: 0.9, RTF: 0.2})
    alias, reason = decide(good, FLOOR, 8, 0.05, equal, (GFLOP, 0.5), {GFLOP: 0.3})
    assert alias == CHAMPION
    assert reason.startswith(f"champion v3 is over the cost budget ({GFLOP} 0.9000 exceeds")
    # ... but never a candidate below the floor, budget or not.
    alias, _ = decide(_scores(0.1), FLOOR, 8, 0.05, equal, (GFLOP, 0.5), {GFLOP: 0.3})
    assert alias == CHALLENGER
    assert decide(good, FLOOR, 8, 0.05, equal)[0] == CHALLENGER  # no budget
    cheap = Versus(version=3, units=12, new_hits=8, old_hits=8, p_value=1.0,
                   costs={GFLOP: 0.4})
    alias, reason = decide(good, FLOOR, 8, 0.05, cheap, (GFLOP, 0.5), {GFLOP: 0.3})
    assert alias == CHALLENGER and "not significantly better than champion v3" in reason


def test_thin_evidence_is_not_promoted(setup: dict, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    few = setup["cfg"].override({"train.val_max_clips": 3})
    res = _publish(setup, uri, "enc", setup["trained"], "thin", cfg=few)
    assert res["alias"] == CHALLENGER
    assert res["reason"].startswith("evidence too thin: 3 held-out units (the gate needs 8")
    assert champion_version(uri, "enc") is None


def test_the_champion_is_scored_only_on_frames_it_never_trained_on(setup: dict,
                                                                   tmp_path: Path) -> None:
    """Same shards, another split: a champion trained with a time split saw the heads of this
    version's validation clips, so both are scored on the tails it held out."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    timed = setup["cfg"].override({"train.split": "time", "train.val_fraction": 0.5})
    first = _publish(setup, uri, "enc", setup["trained"], "timed", cfg=timed)
    assert first["alias"] == CHAMPION, first
    second = _publish(setup, uri, "enc", setup["trained"], "by-clip")
    assert second["alias"] == CHALLENGER, second
    assert "units held out for both (champion v1 trained on the rest" in second["reason"]
    assert second["champion"]["units"] == VAL_CLIPS  # every clip keeps its tail
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("enc", "2").tags
    # Its own score (the floor check) is on all of its held-out frames.
    assert "only frames" not in tags["gate.protocol_text"]


def test_a_champion_whose_data_cannot_be_read_is_not_compared_blindly(setup: dict,
                                                                       tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = tmp_path / "other-shards"
    write_synthetic_shards(other, n_clips=30, n_frames=40, val_clips=VAL_CLIPS,
                           clips_per_shard=6, seed=7)
    first = _publish(setup, uri, "enc", setup["trained"], "other", data=str(other))
    assert first["alias"] == CHAMPION, first
    shutil.rmtree(other)
    second = _publish(setup, uri, "enc", setup["trained"], "here")
    assert second["alias"] == CHALLENGER
    assert "no like-for-like comparison with champion v1" in second["reason"]
    assert f"{other}" in second["reason"] and "cannot be read" in second["reason"]
    assert champion_version(uri, "enc") == 1


def test_publish_once_per_source_and_regate_after_a_failure(setup: dict, tmp_path: Path) -> None:
    """Resume never registers twice; a gate that fails promotes nothing and is redone."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cand = _candidate(setup, uri, setup["trained"], "once")
    a = publish(uri, cand, register="enc", data_dir=setup["data"])
    b = publish(uri, cand, register="enc", data_dir=setup["data"])
    assert a["version"] == b["version"] == 1 and a["model_uri"] == b["model_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'enc'")) == 1

    # The champion's weights become unreadable: scoring it fails, so nothing is promoted.
    champ_dir = Path(client.get_model_version_download_uri("enc", "1").replace("file://", ""))
    hidden = tmp_path / "hidden"
    shutil.move(str(champ_dir), hidden)
    cand2 = _candidate(setup, uri, setup["random"], "second")
    cand2.model_state = setup["trained"]
    with pytest.raises(GateError, match="quality gate failed") as err:
        publish(uri, cand2, register="enc", data_dir=setup["data"])
    assert "--resume" in str(err.value)
    mv = client.get_model_version("enc", "2")
    assert mv.tags["gate.decision"] == "error" and not mv.aliases
    assert champion_version(uri, "enc") == 1
    shutil.move(str(hidden), champ_dir)
    redone = publish(uri, cand2, register="enc", data_dir=setup["data"])
    assert redone["version"] == 2 and redone["alias"] == CHALLENGER
    assert len(client.search_model_versions("name = 'enc'")) == 2


def test_champion_lookup_error_is_not_no_champion(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that cannot be read must not look like an empty one (which would promote)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="failed with exception"):
        champion_version("http://127.0.0.1:9", "enc")


def test_models_compare_prints_the_numbers_the_tags_hold(setup: dict, store: tuple) -> None:
    from typer.testing import CliRunner

    from se4lip_dist.cli import app
    from se4lip_dist.lifecycle import SCORE_KEYS

    uri, name = store
    _publish(setup, uri, name, setup["trained"], "a")
    noisy = {k: v + 0.05 * torch.randn_like(v) if k.endswith("weight") else v
             for k, v in setup["trained"].items()}
    _publish(setup, uri, name, noisy, "b")
    res = CliRunner().invoke(app, ["models", "compare", name, "1", "2", "--tracking-uri", uri,
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    tags = out["tags"]
    for row in out["rows"]:
        k = row["metric"]
        assert k in SCORE_KEYS
        assert format_score(row["v2"]) == tags["2"][f"gate.{k}"], k
        assert format_score(row["v1"]) == tags["2"][f"gate.champion.{k}"], k
    paired = out["paired"]
    assert paired["units"] == VAL_CLIPS
    hits = {v: round(float(tags[v]["gate.val/shift_acc"]) * VAL_CLIPS) for v in ("1", "2")}
    assert hits["2"] - hits["1"] == paired["only"]["v2"] - paired["only"]["v1"]
    assert 0 < paired["p_value"]["v2 better"] <= 1
    shown = CliRunner().invoke(app, ["models", "show", name, "--tracking-uri", uri])
    assert shown.exit_code == 0 and "champion" in shown.output


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from se4lip_dist.cli import app

    uri = f"sqlite:///{tmp_path / 'nothing' / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["models", "list", "--tracking-uri", uri])
    assert res.exit_code == 2 and "no MLflow store" in res.output
    assert not (tmp_path / "nothing").exists()


def test_loading_from_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    from se4lip_dist.registry import RegistryError, load_encoder

    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    with pytest.raises(RegistryError, match="no MLflow store"):
        load_encoder("models:/se4lip@champion", tracking_uri=uri)
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- concurrency, interruption

_GATE_SCRIPT = r"""
import os, sys, time
from pathlib import Path

import mlflow
import torch
import yaml

from se4lip_dist import lifecycle
from se4lip_dist.config import Config
from se4lip_dist.tracking import start_run

uri, name, data, state_path, cfg_path, source, fault = sys.argv[1:8]
cfg = Config.from_dict(yaml.safe_load(Path(cfg_path).read_text()))
state = torch.load(state_path, weights_only=True)

if fault.startswith("barrier:"):
    # Both gates read the champion only once both have scored: the race a gate must survive.
    folder = Path(fault.split(":", 1)[1])
    read_champion = lifecycle.champion_version
    calls = []

    def champion_version(*args, **kwargs):
        if not calls:
            (folder / source).touch()
            deadline = time.monotonic() + 300
            while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        calls.append(1)
        return read_champion(*args, **kwargs)

    lifecycle.champion_version = champion_version
elif fault in ("exit-before-alias", "exit-after-alias"):
    set_alias = mlflow.MlflowClient.set_registered_model_alias

    def killed(self, *args, **kwargs):
        if fault == "exit-after-alias":
            set_alias(self, *args, **kwargs)
        os._exit(3)

    mlflow.MlflowClient.set_registered_model_alias = killed

run_id = start_run(uri, "lc", source, params={}, tags={}, config_yaml=cfg.to_yaml())
cand = lifecycle.Candidate(model_state=state, cfg=cfg, run_id=run_id, source=source, epoch=1,
                           epochs=1, selected_by="val/shift_acc (max)")
print(lifecycle.publish(uri, cand, register=name, data_dir=data)["alias"])
"""


def _gate_process(setup: dict, tmp_path: Path, uri: str, name: str, source: str,
                  fault: str) -> subprocess.Popen:
    state_path, cfg_path = tmp_path / "state.pt", tmp_path / "cfg.yaml"
    if not state_path.exists():
        torch.save(setup["trained"], state_path)
        cfg_path.write_text(setup["cfg"].to_yaml())
    return subprocess.Popen(
        [sys.executable, "-c", _GATE_SCRIPT, uri, name, setup["data"], str(state_path),
         str(cfg_path), source, fault], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_two_gates_at_once_leave_one_champion_and_honest_tags(setup: dict, tmp_path: Path,
                                                              mlflow_sqlite_server) -> None:  # type: ignore[no-untyped-def]
    """Two equally good versions gated at once: both read "no champion" after scoring. One is
    promoted; the other sees the champion moved, scores against it and stays challenger."""
    import uuid

    from mlflow import MlflowClient

    uri, name = mlflow_sqlite_server.url, f"race-{uuid.uuid4().hex[:8]}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_gate_process(setup, tmp_path, uri, name, src, f"barrier:{barrier}")
             for src in ("p1", "p2")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].splitlines()[-3:] for o in outs]
    assert sorted(o[0].split()[-1] for o in outs) == [CHALLENGER, CHAMPION]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    winner = champion_version(uri, name)
    loser = 3 - winner
    tags = {v: client.get_model_version(name, str(v)).tags for v in (1, 2)}
    assert tags[winner]["gate.decision"] == CHAMPION
    assert tags[loser]["gate.decision"] == CHALLENGER
    assert tags[loser]["gate.champion_version"] == str(winner)
    assert tags[loser]["gate.reason"].startswith(
        f"not significantly better than champion v{winner}")
    assert "promoted" not in client.get_model_version(name, str(loser)).description
    assert not [m.name for m in client.search_registered_models() if "gate-lock" in m.name]


@pytest.mark.parametrize("fault", ["exit-before-alias", "exit-after-alias"])
def test_a_gate_killed_around_the_alias_write_is_completed_on_resume(
        setup: dict, tmp_path: Path, fault: str) -> None:
    """The process dies just before or just after it points the alias: the tags never claim
    an alias the version lacks, and the same command again completes the decision."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _gate_process(setup, tmp_path, uri, "enc", "killed", fault)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-2000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version("enc", "1").tags
    assert tags.get("gate.decision") != CHAMPION or champion_version(uri, "enc") == 1

    run_id = client.get_model_version("enc", "1").run_id
    cand = Candidate(model_state=setup["trained"], cfg=setup["cfg"], run_id=run_id,
                     source="killed", epoch=1, epochs=1, selected_by="val/shift_acc (max)")
    resumed = publish(uri, cand, register="enc", data_dir=setup["data"])
    assert (resumed["version"], resumed["alias"]) == (1, CHAMPION), resumed
    assert champion_version(uri, "enc") == 1
    tags = client.get_model_version("enc", "1").tags
    assert tags["gate.decision"] == CHAMPION and "gate.pending" not in tags
    assert len(client.search_model_versions("name = 'enc'")) == 1


def test_an_experiment_created_meanwhile_by_another_process_is_used(
        mlflow_sqlite_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Two commands starting on a fresh server: the other one creates the experiment between
    this one's lookup and its create, which the server refuses; the existing one is used."""
    import uuid

    from mlflow import MlflowClient

    from se4lip_dist.tracking import ensure_experiment

    uri, name = mlflow_sqlite_server.url, f"exp-{uuid.uuid4().hex[:8]}"
    lookup = MlflowClient.get_experiment_by_name
    calls: list[str] = []

    def racing_lookup(self, experiment_name):  # type: ignore[no-untyped-def]
        if not calls:
            calls.append("other process")
            MlflowClient(tracking_uri=uri).create_experiment(experiment_name)
            return None
        return lookup(self, experiment_name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", racing_lookup)
    got = ensure_experiment(uri, name)
    assert got == lookup(MlflowClient(tracking_uri=uri), name).experiment_id
