"""Extraction cost: the GFLOP formula against the real modules, RTF, and the Pareto front."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from se4lip_dist.config import load_config
from se4lip_dist.cost import (
    GFLOP,
    RTF,
    encoder_costs,
    fft_flops,
    gflop_per_audio_s,
    learned_flops,
    pareto_front,
)
from se4lip_dist.models.speech import SpeechEncoder


@pytest.mark.parametrize("overrides", [
    [], ["model.gru_layers=1"], ["model.gru_layers=3", "model.embed_dim=48"],
    ["model.frontend=mel"], ["model.backbone=cnn"],
    ["model.backbone=cnn", "model.cnn_channels=[8,16,16,32,32]", "model.frontend=mel"],
])
def test_flop_formula_matches_the_modules(overrides: list[str]) -> None:
    """The formula is what FlopCounterMode counts on 1 s of audio (FFTs aside: it counts no
    FFT), so a change to the encoder that the formula misses fails here."""
    cfg = load_config("cpu-small", overrides=overrides)
    sr = cfg.data.sample_rate
    enc = SpeechEncoder(cfg.model, sr).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc(torch.zeros(1, sr))
    assert learned_flops(cfg.model, sr) == fc.get_total_flops()
    total = (fc.get_total_flops() + fft_flops(cfg.model, sr)) / 1e9
    assert gflop_per_audio_s(cfg) == pytest.approx(total)


def test_deeper_gru_costs_more_and_rtf_is_measured() -> None:
    one = load_config("cpu-small", overrides=["model.gru_layers=1"])
    eight = load_config("cpu-small", overrides=["model.gru_layers=8"])
    assert gflop_per_audio_s(eight) > 3 * gflop_per_audio_s(one)
    enc = SpeechEncoder(one.model, one.data.sample_rate).train()
    costs = encoder_costs(one, enc, torch.device("cpu"))
    assert set(costs) == {GFLOP, RTF}
    assert 0 < costs[RTF] < 1 and enc.training  # put back in training mode


def test_pareto_front_on_hand_made_rows() -> None:
    rows = [
        {"n": "a", "acc": 0.50, "c": 1.0},
        {"n": "b", "acc": 0.70, "c": 2.0},
        {"n": "c", "acc": 0.60, "c": 3.0},   # dominated by b
        {"n": "d", "acc": 0.70, "c": 2.5},   # dominated by b (equal acc, dearer)
        {"n": "e", "acc": 0.90, "c": 8.0},
        {"n": "f", "acc": 0.40, "c": 1.0},   # dominated by a (equal cost)
        {"n": "g", "acc": math.nan, "c": 0.1},  # no score: left out
        {"n": "h", "acc": 0.95},             # no cost: left out
    ]
    assert [r["n"] for r in pareto_front(rows, "acc", "c")] == ["a", "b", "e"]
    # min mode (a loss): lower is better
    assert [r["n"] for r in pareto_front(rows, "acc", "c", mode="min")] == ["f"]
    twins = [{"acc": 0.5, "c": 1.0}, {"acc": 0.5, "c": 1.0}]
    assert len(pareto_front(twins, "acc", "c")) == 2  # neither dominates the other
