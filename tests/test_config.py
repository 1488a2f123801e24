from pathlib import Path

import pytest
import yaml

from se4lip_dist.config import Config, ConfigError, list_presets, load_config


def test_every_preset_loads_and_roundtrips() -> None:
    assert {"paper", "cpu-small"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.preset == name
        assert Config.from_dict(cfg.to_dict()) == cfg
        assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_paper_preset_is_the_papers_setting() -> None:
    c = load_config("paper")
    assert (c.data.crop_size, c.model.lip_height, c.model.lip_width) == (96, 96, 96)
    assert (c.model.n_fft, c.model.win_length, c.model.hop_length) == (512, 512, 128)
    assert (c.model.frontend, c.model.backbone, c.model.gru_layers) == ("stft", "gru", 8)
    assert (c.train.window_frames, c.train.batch_size, c.train.lr) == (5, 16, 5e-5)
    assert c.data.samples_per_frame == 640


def test_overrides_and_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  gru_layers: 3\ntrain:\n  lr: 1e-3\n")
    c = load_config("cpu-small", f, ["model.gru_layers=4", "train.max_steps=7"])
    assert c.model.gru_layers == 4  # --set wins over the file
    assert c.train.lr == pytest.approx(1e-3)  # "1e-3" is a string to YAML 1.1
    assert c.train.max_steps == 7
    assert c.override({"train.window_frames": 7}).train.window_frames == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.gru_layers=2.5", "integer"),
        ("train.amp=3", "true/false"),
        ("nope.x=1", "unknown key"),
        ("model.frontend=foo", "stft|mel"),
        ("train.lr=abc", "number"),
        ("model.gru_layers", "key=value"),
        ("data.sample_rate=16001", "multiple"),
    ],
)
def test_bad_overrides_are_clear(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("paper", overrides=[override])


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")


def test_cpus_per_gpu_worker_defaults_to_two_cores_and_must_be_positive() -> None:
    """A GPU rank decodes and samples in its own collate threads (benchmarks/README.md, "What
    a GPU node needs"): it gets its own key, apart from the fractional CPU-rank share."""
    assert load_config("paper").train.cpus_per_gpu_worker == 2.0
    assert load_config("cpu-small").train.cpus_per_worker == 0.5
    cfg = load_config("cpu-small", overrides=["train.cpus_per_gpu_worker=3"])
    assert cfg.train.cpus_per_gpu_worker == 3.0
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match=r"train\.cpus_per_gpu_worker must be positive"):
            load_config("paper", overrides=[f"train.cpus_per_gpu_worker={bad}"])
