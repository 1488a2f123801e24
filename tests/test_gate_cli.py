"""The registry gate from the command line, on real GRID video and a fresh store.

Four ``se4lip-dist train --register`` runs on one name: a model that answers one offset
whatever its input (all-zero weights), a random-init model, a trained encoder and the same
training run again (one worker and one seed repeat a run exactly). The first two are refused
with reasons naming the content-blind floor; the trained one is promoted; the rerun, no better
on the same clips, stays challenger. (Encoders of this size trained with different seeds, or
even the same weights with re-estimated BatchNorm statistics, are no stable "equal" pair: such
pairs here scored 13 vs 29 and 16 vs 30 of 35 clips, and the gate rightly promoted the second.
The significance rule itself is tested in test_lifecycle.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shard_fixtures import TINY_MODEL

from se4lip_dist.config import load_config
from se4lip_dist.models import build_model

pytestmark = [pytest.mark.slow, pytest.mark.shared_data, pytest.mark.timeout(2400)]

GRID_CLIPS = 200
"""GRID clips prepared (the clip split holds out about 30 of them: 30 independent units)."""
SETTINGS = [*TINY_MODEL, "train.lr=0.002", "train.pairs_per_segment=32",
            "train.val_fraction=0.15", "train.cpus_per_worker=0.4"]
NAME = "grid-gate"


def _cli(args: list[str], cwd: Path, timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "se4lip_dist", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train(shards: Path, uri: str, cwd: Path, *extra: str) -> dict:
    sets = [a for s in [*SETTINGS, *extra] for a in ("--set", s)]
    out = _cli(["train", "--data", str(shards), "--preset", "cpu-small", *sets,
                "--tracking-uri", uri, "--register", NAME, "--json"], cwd)
    return out["registered"]


def _zero_checkpoint(folder: Path) -> Path:
    """A training checkpoint whose weights are all zero: identical embeddings for every input,
    so its offset search gives the same answer whatever the audio."""
    cfg = load_config("cpu-small", overrides=SETTINGS)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    folder.mkdir()
    torch.save(zero, folder / "model.pt")
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), folder / "optim.pt")
    (folder / "state.json").write_text(json.dumps({"epoch": 0, "config": cfg.to_dict()}))
    return folder


def test_content_blind_models_are_refused_trained_promoted_equal_stays_challenger(
        shared_data: Path, insightface_root: Path, tmp_path: Path) -> None:
    videos = sorted((shared_data / "grid_s1" / "video").glob("*.mp4"))[:GRID_CLIPS]
    shards = tmp_path / "shards"
    prepared = _cli(["prepare", *map(str, videos), "--out", str(shards), "--preset", "cpu-small",
                     "--insightface-root", str(insightface_root), "--workers", "0", "--json"],
                    tmp_path)
    assert prepared["total_clips"] == GRID_CLIPS, prepared
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blind = "train.lr=1e-12"  # one epoch that moves no weight: what it starts from is scored

    constant = _train(shards, uri, tmp_path, blind, "train.epochs=1",
                      f"train.init={_zero_checkpoint(tmp_path / 'zero')}")
    random_init = _train(shards, uri, tmp_path, blind, "train.epochs=1")
    for reg in (constant, random_init):
        assert reg["alias"] == "challenger", reg
        floor = reg["floor"]["floor"]
        assert reg["reason"].startswith("not above the content-blind floor"), reg["reason"]
        assert f"does not exceed {floor:.4f}" in reg["reason"], reg["reason"]
    assert constant["scores"]["val/shift_acc"] == 0.0

    recipe = ("train.epochs=8", "train.num_workers=1", "train.cpus_per_worker=0.5")
    trained = _train(shards, uri, tmp_path, *recipe)
    assert trained["alias"] == "champion", trained
    assert trained["reason"].startswith("no champion yet; above the content-blind floor")
    units = trained["scores"]["val/units"]
    assert units >= 20 and trained["scores"]["val/shift_acc_ci_low"] > trained["floor"]["floor"]

    second = _train(shards, uri, tmp_path, *recipe)
    assert second["alias"] == "challenger", second
    assert second["reason"].startswith(
        f"not significantly better than champion v{trained['version']}"), second["reason"]
    assert "0 won and 0 lost" in second["reason"] and second["champion"]["units"] == units
    assert second["champion"]["p_value"] == 1.0

    shown = _cli(["models", "show", NAME, "--tracking-uri", uri, "--json"], tmp_path)
    aliases = {v["version"]: v["aliases"] for v in shown["versions"]}
    assert aliases[trained["version"]] == ["champion"]
    assert aliases[second["version"]] == ["challenger"]
    assert not aliases[constant["version"]] and not aliases[random_init["version"]]
