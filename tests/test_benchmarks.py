"""Smoke tests of ``benchmarks/``: never assert speed (the machine is shared and noisy).

Fast (default): the modules import, the table renders, the Ray-free pieces run on tiny inputs
(the DataLoader side of the pipeline benchmark, the plain training loop, the memory sampler,
the extraction benchmark at ``--quick`` size). Slow: every benchmark script end to end at
``--quick`` size, one Ray cluster at a time as ``run_all.py`` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

EXPECTED = {
    "bench_pipeline": ["windows_per_s", "steady_windows_per_s", "paired_ratios", "train_ray",
                       "train_dataloader"],
    "bench_ray_overhead": ["plain_samples_per_s", "ray_samples_per_s", "trainer_startup_s"],
    "bench_extract": ["real_time_factor_cpu", "gflops_per_audio_s", "int8_min_cosine_to_fp32"],
    "bench_prepare": [],  # skips itself without GRID video / detector
    "bench_memory": ["train_worker", "extract_actor", "shards"],
}


def test_modules_import_without_side_effects() -> None:
    import importlib

    for name in EXPECTED:
        mod = importlib.import_module(name)
        assert callable(mod.run)
    run_all = importlib.import_module("run_all")
    assert list(EXPECTED) == run_all.BENCHMARKS


def test_table_renders_targets() -> None:
    import harness
    import run_all

    recs = [harness.result("x", {}, [harness.ratio("a", 2.0, 1.5, "d"),
                                     harness.ratio("b", 0.3, None, "", unit="")]),
            {"name": "y", "error": "exit 1", "ratios": []}]
    md = run_all.table(recs)
    assert "| a | 2.00x | >= 1.50x | yes | d |" in md
    assert "| b | 0.30 |  |  |  |" in md
    assert "| y | **failed** |" in md


def test_dataloader_side_and_plain_loop(tmp_path: Path) -> None:
    import bench_memory
    import bench_pipeline
    import bench_ray_overhead
    import harness

    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import Manifest

    cfg = load_config("cpu-small")
    data = harness.synthetic_shards(tmp_path / "shards", n_clips=6, n_frames=40)
    batches = list(bench_pipeline.dataloader_batches(Manifest.load(data).shard_paths(data), cfg))
    assert batches and all(len(b["label"]) == bench_pipeline.BATCH for b in batches)
    assert batches[0]["lips"].shape[1:] == (cfg.train.window_frames, 48, 48, 3)
    out = bench_ray_overhead.train_steps({"cfg": cfg.to_dict(), "threads": 1, "steps": 1,
                                          "rounds": 1})
    assert len(out["rates"]) == 1 and out["threads"] == 1
    density = bench_memory.shard_bytes_per_minute(data)
    assert density["frames"] == 6 * 40 and density["mib_per_video_minute"] > 0


def test_proc_sampler_sees_only_descendants() -> None:
    import harness

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)",
                              "se4lip-sampler-probe"])
    sampler = harness.ProcSampler({"probe": "se4lip-sampler-probe"}, interval_s=0.05)
    sampler.start()
    try:
        import time

        time.sleep(0.5)
    finally:
        mem = sampler.stop()
        child.kill()
    assert mem["probe"]["processes"] == 1 and mem["probe"]["peak_pss_mib"] > 0


def test_extract_quick(tmp_path: Path) -> None:
    _run_quick("bench_extract", tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "bench_extract"])
def test_quick_run_reports_keys(name: str, tmp_path: Path) -> None:
    _run_quick(name, tmp_path)


def _run_quick(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["quick"] is True
    assert {"name", "metrics", "ratios", "wall_s"} <= set(rec)
    if rec["metrics"].get("skipped"):
        pytest.skip(rec["metrics"]["skipped"])
    assert rec["ratios"], "every benchmark contributes ratio rows"
    for r in rec["ratios"]:
        assert {"label", "value", "target", "met", "detail", "unit"} <= set(r)
    for key in EXPECTED[name]:
        assert key in rec["metrics"], key
