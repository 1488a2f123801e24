"""The viseme probe: GRID align parsing, and a run on a few real clips with a random encoder."""

from __future__ import annotations

import pytest

from se4lip_dist.probe import ProbeError, parse_align, probe_accuracy, span_frames, spoken_letter


def test_parse_align_and_letter(tmp_path) -> None:
    a = tmp_path / "bbaf2n.align"
    a.write_text("0 23750 sil\n23750 29500 bin\n29500 34000 blue\n34000 35500 at\n"
                 "35500 41000 f\n41000 47250 two\n47250 53000 now\n53000 74500 sil\n")
    words = parse_align(a)
    assert words[0] == (0.0, 23.75, "sil") and words[4] == (35.5, 41.0, "f")
    assert spoken_letter(words) == (35.5, 41.0, "f")
    # Short pauses (sp) between words do not count as words.
    words.insert(3, (33.0, 34.0, "sp"))
    assert spoken_letter(words)[2] == "f"
    a.write_text("0 10 sil\nbroken line\n")
    with pytest.raises(ProbeError, match=r"bbaf2n\.align:2"):
        parse_align(a)


def test_span_frames_whole_frames_inside_the_clip() -> None:
    # (the windows of those frames are sync's centred windows: tests/test_window_agreement.py)
    assert span_frames(35.5, 41.0, 75) == (35, 41)
    assert span_frames(10.0, 10.0, 75) == (10, 11)  # at least one frame
    assert span_frames(74.2, 76.0, 75) == (74, 75)  # never past the clip
    assert span_frames(80.0, 90.0, 75) == (74, 75)


def test_probe_accuracy_separable_and_too_few() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (10, 3)), rng.normal(5, 1, (10, 3))])
    y = np.array([0] * 10 + [1] * 10)
    assert probe_accuracy(x, y) == 1.0
    assert probe_accuracy(x[:11], y[:11]) is None  # one example of class 1


@pytest.mark.shared_data
@pytest.mark.timeout(180)
def test_probe_on_grid_random_encoder(shared_data, tmp_path) -> None:
    from se4lip_dist.probe import run_probe

    out = run_probe(None, shared_data / "grid_s1", max_per_letter=3, plot=tmp_path)
    assert [r["pair"] for r in out["pairs"]] == ["d/t", "b/p", "g/k"]
    for r in out["pairs"]:
        assert sum(r["n"].values()) == 6
        for k in ("encoder_acc", "log_mel_acc", "mfcc_acc"):
            assert 0.0 <= r[k] <= 1.0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "visemes_b-p.png", "visemes_d-t.png", "visemes_g-k.png"]
