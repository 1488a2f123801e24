"""The registry lifecycle on a real sqlite store: log, register once, gate, alias, compare.

A small SE4Lip is trained in-process (plain torch over the same pair sampler as training) so
the gate has a model that really finds sync; a random-init model of the same size is chance.
"""

from __future__ import annotations

import json
import shutil
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
    publish,
)
from se4lip_dist.manifest import Manifest
from se4lip_dist.stream import READ_COLUMNS, PairSpec, make_pair_batch
from se4lip_dist.tracking import start_run

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards, a config, a trained state and a random-init state."""
    from se4lip_dist.losses import sync_bce_loss
    from se4lip_dist.models import build_model, lip_input

    root = tmp_path_factory.mktemp("lifecycle")
    data = root / "shards"
    write_synthetic_shards(data, n_clips=24, n_frames=40, val_clips=6, clips_per_shard=6)
    cfg = load_config("cpu-small", overrides=TINY_TRAIN)
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
    for epoch in range(6):
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
    return {"data": str(data), "cfg": cfg, "trained": model.state_dict(),
            "random": random_state, "root": root}


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(tracking URI, registered model name): the embedded sqlite store, or a real
    ``mlflow server`` over REST (a fresh model name per test on the shared server)."""
    import uuid

    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}", "enc"
    server = request.getfixturevalue("mlflow_sqlite_server")
    return server.url, f"enc-{uuid.uuid4().hex[:8]}"


def _candidate(setup: dict, uri: str, state: dict, source: str) -> Candidate:
    run_id = start_run(uri, "lc", source, params={}, tags={}, config_yaml=setup["cfg"].to_yaml())
    return Candidate(model_state=state, cfg=setup["cfg"], run_id=run_id, source=source, epoch=1,
                     epochs=1, selected_by="val/offset_acc (max)")


def _publish(setup: dict, uri: str, name: str, state: dict, source: str) -> dict:
    return publish(uri, _candidate(setup, uri, state, source), register=name,
                   data_dir=setup["data"], metric="val/offset_acc", mode="max")


def test_champion_then_an_equal_version_stays_challenger(setup: dict, store: tuple) -> None:
    from mlflow import MlflowClient

    uri, name = store
    first = _publish(setup, uri, name, setup["trained"], "a")
    assert (first["version"], first["alias"]) == (1, CHAMPION), first
    assert "no champion yet" in first["reason"]
    assert first["scores"]["val/offset_acc_ci_low"] > first["chance"]
    # The same weights again: a tie on every score is not "better".
    second = _publish(setup, uri, name, setup["trained"], "b")
    assert (second["version"], second["alias"]) == (2, CHALLENGER), second
    assert "not better than champion v1" in second["reason"]
    assert second["champion"]["version"] == 1
    assert second["champion"]["scores"] == second["scores"]
    assert champion_version(uri, name) == 1

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version(name, "2")
    assert mv.tags["gate.decision"] == CHALLENGER and mv.tags["gate.champion_version"] == "1"
    assert mv.tags["gate.protocol"] and "clips" in mv.tags["gate.protocol_text"]
    assert mv.description.startswith(f"**{CHALLENGER}**")
    assert client.get_registered_model(name).description


def test_chance_level_model_is_never_promoted(setup: dict, store: tuple) -> None:
    uri, name = store
    alone = _publish(setup, uri, name, setup["random"], "r1")
    assert alone["alias"] == CHALLENGER and "at chance level" in alone["reason"], alone
    assert champion_version(uri, name) is None  # even with no champion at all
    good = _publish(setup, uri, name, setup["trained"], "g")
    assert good["alias"] == CHAMPION
    again = _publish(setup, uri, name, setup["random"], "r2")
    assert again["alias"] == CHALLENGER and "at chance level" in again["reason"]
    assert champion_version(uri, name) == good["version"]


def test_publish_once_per_source_and_regate_after_a_failure(setup: dict, tmp_path: Path) -> None:
    """Resume never registers twice; a gate that fails promotes nothing and is redone."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cand = _candidate(setup, uri, setup["trained"], "once")
    a = publish(uri, cand, register="enc", data_dir=setup["data"], metric="val/offset_acc",
                mode="max")
    b = publish(uri, cand, register="enc", data_dir=setup["data"], metric="val/offset_acc",
                mode="max")
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
        publish(uri, cand2, register="enc", data_dir=setup["data"], metric="val/offset_acc",
                mode="max")
    assert "--resume" in str(err.value)
    mv = client.get_model_version("enc", "2")
    assert mv.tags["gate.decision"] == "error" and not mv.aliases
    assert champion_version(uri, "enc") == 1
    shutil.move(str(hidden), champ_dir)
    redone = publish(uri, cand2, register="enc", data_dir=setup["data"],
                     metric="val/offset_acc", mode="max")
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
    from se4lip_dist.lifecycle import SCORE_KEYS, format_score

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
