"""``se4lip-dist subject``: one video -> fine-tuned encoder (tail held out) -> features, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import TINY_MODEL, register_random_model

from se4lip_dist.config import load_config


def test_subject_name() -> None:
    from se4lip_dist.subject import subject_name

    assert subject_name("/data/Obama Speech 2.mp4") == "obama-speech-2"
    assert subject_name("s3://b/x/__.mkv") == "subject"


def test_subject_config_takes_the_general_encoders_architecture() -> None:
    from se4lip_dist.subject import subject_config

    general = load_config("cpu-small", overrides=[*TINY_MODEL, "train.window_frames=7"])
    cfg = subject_config("paper", ["train.epochs=3"], general)
    assert cfg.model == general.model and cfg.train.window_frames == 7
    assert cfg.train.split == "time" and cfg.train.val_fraction == pytest.approx(0.2)
    assert cfg.train.epochs == 3 and cfg.train.steps_per_epoch == 100


def test_subject_gpu_ranks_take_cpus_per_gpu_worker() -> None:
    """subject trains through train's plan: --use-gpu ranks get train.cpus_per_gpu_worker CPUs,
    which --set changes like any other key."""
    from se4lip_dist.resources import train_plan
    from se4lip_dist.subject import subject_config

    cfg = subject_config("cpu-small", [], None)
    assert train_plan(cfg.train, use_gpu=True).worker_bundle() == {"CPU": 2.0, "GPU": 1.0}
    cfg = subject_config("cpu-small", ["train.cpus_per_gpu_worker=2.5"], None)
    assert train_plan(cfg.train, use_gpu=True).worker_bundle() == {"CPU": 2.5, "GPU": 1.0}
    assert train_plan(cfg.train, use_gpu=False).worker_bundle() == {"CPU": 0.5}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_subject_flow_end_to_end(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from se4lip_dist.cli import app
    from se4lip_dist.lifecycle import promote
    from se4lip_dist.synthetic import make_synthetic_clip

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    general = register_random_model(uri, load_config("cpu-small", overrides=TINY_MODEL),
                                    "se4lip")
    promote("se4lip", int(general.rsplit("/", 1)[1]), tracking_uri=uri)
    video = tmp_path / "Test Person.mp4"
    make_synthetic_clip(video, 20.0, seed=5)  # 500 frames: the last 100 held out
    res = CliRunner().invoke(app, [
        "subject", str(video), "--out", str(tmp_path / "out"), "--tracking-uri", uri,
        "--face-backend", "none", "--json", "--offset", "ignore",
        "--set", "train.steps_per_epoch=6", "--set", "train.epochs=2",
        "--set", "train.num_workers=1", "--set", "train.cpus_per_worker=0.5",
        "--set", "train.lr=0.002", "--set", "train.max_offset=8"])
    assert res.exit_code == 0, res.output[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["subject"] == "test-person" and out["init"].startswith("warm start from")
    # The video was audited first, by the general encoder, and the version says so.
    assert out["audit"]["model"] == general and out["audit"]["status"] is not None
    tags = MlflowClient(tracking_uri=uri).get_model_version(
        "se4lip-test-person", out["registered"]["version"]).tags
    assert tags["se4lip.audit_model"] == general and tags["se4lip.audit"] == out["audit"]["note"]
    assert out["registered"]["name"] == "se4lip-test-person"
    # 100 held-out frames are three 30-frame pieces (the last one 40): too few units to promote.
    assert out["registered"]["alias"] == "challenger"
    assert out["registered"]["reason"].startswith("evidence too thin: 3 held-out units")
    feats = np.load(tmp_path / "out" / "features" / "Test_Person" / "aud_se4lip.npy")
    windows = np.load(tmp_path / "out" / "features" / "Test_Person" / "aud_se4lip_w16.npy")
    assert feats.shape == (500, 32) and windows.shape == (500, 16, 32)
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["heldout"]["val/units"] == 3
    assert report["heldout"]["val/windows"] == (30 - 5 + 1) * 2 + (40 - 5 + 1)
    assert report["split"].startswith("time")
    assert (tmp_path / "out" / "report" / "heldout_offset_curve.png").stat().st_size > 0
    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.data.tags["se4lip.init"] == general


def test_offset_decision_stops_fixes_or_ignores() -> None:
    """An offset video stops the flow with the measured offset and the flags that override;
    in sync and undecidable videos go on, and the note says which."""
    from se4lip_dist.audit import IN_SYNC, OFFSET, UNDECIDABLE, ClipAudit
    from se4lip_dist.subject import SubjectError, offset_decision

    late = ClipAudit("v", "v.mp4", OFFSET, offset=4)
    with pytest.raises(SubjectError, match=r"runs 4 frames late \(offset \+4, measured by "
                                           r"models:/se4lip/3\).*--offset fix.*--offset ignore"):
        offset_decision(late, "stop", "v.mp4", "models:/se4lip/3")
    assert offset_decision(late, "fix", "v.mp4", "m").endswith("corrected")
    assert "kept as recorded" in offset_decision(late, "ignore", "v.mp4", "m")
    early = ClipAudit("v", "v.mp4", OFFSET, offset=-2)
    assert "2 frames early" in offset_decision(early, "fix", "v.mp4", "m")
    assert offset_decision(ClipAudit("v", "v.mp4", IN_SYNC, offset=1), "stop", "v.mp4",
                           "m").startswith("in sync (offset +1")
    assert "undecidable (inconsistent" in offset_decision(
        ClipAudit("v", "v.mp4", UNDECIDABLE, "inconsistent"), "stop", "v.mp4", "m")
    with pytest.raises(SubjectError, match="on_offset must be one of"):
        offset_decision(late, "maybe", "v.mp4", "m")


def test_study_arms_are_valid_augmentation_configs() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import subject_study

    for arm in ("plain", "augmented", "audio", "lips", "only-noise", "without-blur"):
        cfg = load_config("cpu-small", overrides=subject_study.arm_overrides(arm))
        assert cfg.augment.enabled == (arm != "plain"), arm
    only = load_config("cpu-small", overrides=subject_study.arm_overrides("only-speed"))
    assert only.augment.speed_p > 0 and only.augment.noise_p == only.augment.color_p == 0
    without = load_config("cpu-small", overrides=subject_study.arm_overrides("without-noise"))
    assert without.augment.noise_p == 0 and without.augment.blur_p > 0
    with pytest.raises(SystemExit, match="unknown arm"):
        subject_study.arm_overrides("only-jpeg")


def test_subject_audit_step_fixes_stops_or_skips(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """The flow's audit step: an offset video is corrected into shards-audited (what training
    then reads) with --offset fix, stops the flow with --offset stop, and a flow without a
    general encoder is not audited."""
    from se4lip_dist import subject as sub
    from se4lip_dist.audit import OFFSET, AuditSettings, AuditSummary, ClipAudit

    calls: list[str | None] = []

    def fake_audit(data, model, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw.get("fix_out"))
        s = AuditSummary(list(data), model, {"pinned_uri": "models:/se4lip/2"}, AuditSettings(),
                         clips=[ClipAudit("c", "v.mp4", OFFSET, offset=3)])
        s.report = {"markdown": "report.md"}
        return s

    monkeypatch.setattr(sub, "run_audit", fake_audit)
    out = str(tmp_path)
    doc = sub._audit("v.mp4", "shards", out, "models:/se4lip@champion", "fix", "uri", None,
                     False)
    assert (doc["action"], doc["offset"], doc["model"]) == ("corrected", 3, "models:/se4lip/2")
    assert doc["shards"].endswith("shards-audited") and calls == [None, doc["shards"]]
    with pytest.raises(sub.SubjectError, match=r"runs 3 frames late.*--offset fix"):
        sub._audit("v.mp4", "shards", out, "models:/se4lip@champion", "stop", "uri", None, False)
    ignored = sub._audit("v.mp4", "shards", out, "m", "ignore", "uri", None, False)
    assert (ignored["action"], ignored["shards"]) == ("ignored", "shards")
    assert sub._audit("v.mp4", "shards", out, None, "stop", "uri", None, False)["action"] == \
        "not audited"
