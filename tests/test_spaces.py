from pathlib import Path

import pytest

from se4lip_dist.config import ConfigError
from se4lip_dist.search import SearchPlan, check_plan
from se4lip_dist.spaces import load_space

TUNE_DIR = Path(__file__).resolve().parents[1] / "tune"


@pytest.mark.parametrize("path", sorted(TUNE_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_is_valid(path: Path) -> None:
    space = load_space(path)
    assert space.params
    ps = space.param_space()
    assert set(ps) == set(space.params) | set(space.fixed)
    base = space.base_config()
    # Its own scheduler with the default searcher (PBT: something to perturb, epochs to do it).
    assert check_plan(space, SearchPlan(), base.train.epochs) == space.scheduler


def test_shipped_spaces_cover_the_issue() -> None:
    names = {p.name for p in TUNE_DIR.glob("*.yaml")}
    assert {"default.yaml", "paper.yaml", "ablation.yaml"} <= names
    d = load_space(TUNE_DIR / "default.yaml")
    assert {"model.gru_layers", "train.window_frames", "train.lr"} <= set(d.params)
    a = load_space(TUNE_DIR / "ablation.yaml")
    assert a.params["model.frontend"] == {"grid": ["stft", "mel"]}
    assert a.params["model.backbone"] == {"grid": ["gru", "cnn"]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("params:\n  model.gru_layer: {choice: [1, 2]}\n", "unknown key"),
        ("params:\n  model.frontend: {choice: [stft, wav]}\n", "'wav' is invalid"),
        ("params:\n  train.lr: {loguniform: [0, 1]}\n", "low > 0"),
        ("params:\n  train.lr: {normal: [0, 1]}\n", "exactly one of"),
        ("metric: accuracy\nparams:\n  train.lr: 0.1\n", "unknown metric"),
        ("preset: huge\nparams:\n  train.lr: 0.1\n", "unknown preset"),
        ("params: {}\n", "'params'"),
        ("params:\n  model.gru_layers: {randint: [4, 2]}\n", "low < high"),
    ],
)
def test_bad_spaces_name_file_and_problem(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=message) as e:
        load_space(f)
    assert str(f) in str(e.value)
