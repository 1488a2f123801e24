"""Smoke tests of ``benchmarks/``: never assert speed (the machine is shared and noisy).

Fast (default): the modules import, the table renders, the Ray-free pieces run on tiny inputs
(the DataLoader side of the pipeline benchmark, the plain training loop, the memory sampler,
the extraction benchmark at ``--quick`` size), and the prepared-input cache (its key, its atomic
build, the real GRID subset where the shared data is present). Slow: every benchmark script end
to end at ``--quick`` size, one Ray cluster at a time as ``run_all.py`` runs them.
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
    "bench_pipeline": ["windows_per_epoch", "cpu_ms_per_window", "windows_per_s", "train"],
    "bench_ray_overhead": ["plain_samples_per_s", "ray_samples_per_s", "trainer_startup_s"],
    "bench_extract": ["real_time_factor_cpu", "gflops_per_audio_s", "int8_min_cosine_to_fp32",
                      "achieved_gflop_per_cpu_s", "matmul_gflop_per_cpu_s"],
    "bench_prepare": ["frames_per_cpu_s", "centre_error_px_vs_every_frame"],  # or skipped
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
    assert "| a | 2.00x |  |  | >= 1.50x | yes | d |" in md
    assert "| b | 0.30 |  |  |  |  |  |" in md
    assert "| y | **failed** |" in md


def test_table_shows_bound_and_previous_run(tmp_path: Path) -> None:
    import harness
    import run_all

    old = {"records": [harness.result("x", {}, [harness.ratio("a", 1.25, None)])]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    prev = run_all.previous_rows(tmp_path / "results.json")
    rec = harness.result("x", {}, [harness.ratio("a", 2.0, 1.5, "d", bound="decode-only"),
                                   harness.ratio("new", 3.0, None)])
    md = run_all.table([rec], prev)
    assert "| a | 2.00x | 1.25x | decode-only | >= 1.50x | yes | d |" in md
    assert "| new | 3.00x |  |  |" in md
    assert "(smoke)" in run_all.table([rec], prev, quick=True)
    assert run_all.previous_rows(tmp_path / "absent.json") == {}


def test_environment_records_machine_load_versions_and_code() -> None:
    import harness
    import run_all

    env = harness.environment()
    assert env["cpu_count"] >= 1 and len(env["load_avg"]) == 3
    assert {"torch", "ray", "mlflow"} <= set(env["packages"])
    assert env["packages"]["torch"] and env["python"]
    assert "git_commit" in env and "git_dirty" in env
    env["load_avg_end"] = [0.0, 0.0, 0.0]
    head = run_all.header(env, 60.0, quick=True)
    assert "meaningless" in head and "torch" in head and "load average" in head


# ---------------------------------------------------------------- the prepared-input cache


def _videos(tmp_path: Path, n: int = 2) -> list[str]:
    out = []
    for i in range(n):
        f = tmp_path / f"v{i}.mp4"
        f.write_bytes(bytes([i]) * 100)
        out.append(str(f))
    return out


def test_cache_key_changes_with_inputs_code_and_config(tmp_path: Path) -> None:
    import harness

    videos = _videos(tmp_path)
    det = tmp_path / "det.onnx"
    det.write_bytes(b"model")
    conf = {"data": {"fps": 25}, "face": {"detect_every": 5}}
    code = {"prepare_source_sha256": "abc"}
    key, record = harness.cache_key(videos, det, conf, code)
    assert harness.cache_key(videos, det, conf, code)[0] == key  # deterministic
    assert record["inputs"][0][0] == "v0.mp4" and len(record["inputs"][0][1]) == 64
    changed = [
        harness.cache_key(videos[:1], det, conf, code),  # another subset
        harness.cache_key(videos[::-1], det, conf, code),  # another order
        harness.cache_key(videos, det, {**conf, "face": {"detect_every": 1}}, code),
        harness.cache_key(videos, det, conf, {"prepare_source_sha256": "abd"}),
        harness.cache_key(videos, None, conf, code),
    ]
    det.write_bytes(b"model2")
    changed.append(harness.cache_key(videos, det, conf, code))  # another detector
    det.write_bytes(b"model")
    Path(videos[1]).write_bytes(b"other bytes, same name")
    changed.append(harness.cache_key(videos, det, conf, code))  # same name, other content
    keys = [k for k, _ in changed]
    assert key not in keys and len(set(keys)) == len(keys)


def test_code_version_follows_prepare_source(tmp_path: Path, monkeypatch) -> None:
    import harness

    pkg = tmp_path / "se4lip_dist"
    pkg.mkdir()
    for name in harness.PREPARE_MODULES:
        (pkg / f"{name}.py").write_text(f"# {name}\n")
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    before = harness.code_version()
    assert before["cache_format"] == str(harness.CACHE_FORMAT)
    (pkg / "faces.py").write_text("# faces, edited\n")
    assert harness.code_version()["prepare_source_sha256"] != before["prepare_source_sha256"]
    (pkg / "faces.py").write_text("# faces\n")
    assert harness.code_version() == before
    # The real package: every module named is there (a rename would silently drop it).
    monkeypatch.undo()
    assert all((ROOT / "se4lip_dist" / f"{n}.py").is_file() for n in harness.PREPARE_MODULES)


def test_cache_reuses_only_complete_entries(tmp_path: Path) -> None:
    import harness

    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "data.txt").write_text("built")

    root = tmp_path / "cache"
    # A half-built entry (no marker; e.g. copied in, or an older layout) is never reused.
    (root / "k1").mkdir(parents=True)
    (root / "k1" / "data.txt").write_text("partial")
    got = harness.build_cached("k1", {"x": 1}, build, root)
    assert got == root / "k1" and len(calls) == 1
    assert (got / "data.txt").read_text() == "built"
    assert json.loads((got / harness.COMPLETE).read_text())["key"] == "k1"
    assert harness.build_cached("k1", {"x": 1}, build, root) == got and len(calls) == 1
    # A marker naming another key is not this entry.
    (got / harness.COMPLETE).write_text(json.dumps({"key": "k0"}))
    harness.build_cached("k1", {"x": 1}, build, root)
    assert len(calls) == 2
    # The build runs in a private temp folder, never in place.
    assert all(c.parent == root and c.name.startswith(".tmp-k1-") for c in calls)


def test_failed_build_leaves_nothing_reusable(tmp_path: Path) -> None:
    import harness

    def broken(out: Path) -> None:
        (out / "half.parquet").write_text("half")
        raise RuntimeError("killed halfway")

    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="halfway"):
        harness.build_cached("k2", {}, broken, root)
    assert not (root / "k2").exists()
    assert list(root.iterdir()) == []  # the temp folder is gone too
    assert not harness.cached_complete(root / "k2", "k2")


def test_grid_shards_says_when_shared_data_is_absent(tmp_path: Path, monkeypatch) -> None:
    import harness

    monkeypatch.setattr(harness, "GRID_VIDEO", tmp_path / "absent" / "video")
    assert not harness.grid_available()
    assert harness.grid_videos(3) == []
    assert "no GRID video" in harness.missing_reason()
    with pytest.raises(harness.SharedDataMissing, match="SE4LIP_SHARED_DATA"):
        harness.grid_shards(2)


def test_grid_videos_is_a_deterministic_spread(tmp_path: Path, monkeypatch) -> None:
    import harness

    video = tmp_path / "video"
    video.mkdir()
    for name in ["c.mp4", "a.mp4", "d.mp4", "b.mp4", "e.mp4", "f.mp4"]:
        (video / name).write_bytes(b"x")
    monkeypatch.setattr(harness, "GRID_VIDEO", video)
    assert [Path(v).name for v in harness.grid_videos(3)] == ["a.mp4", "c.mp4", "e.mp4"]
    assert len(harness.grid_videos(10)) == 6


@pytest.mark.shared_data
@pytest.mark.timeout(300)
def test_grid_shards_prepares_once_from_shared_data(tmp_path: Path, monkeypatch) -> None:
    import harness

    import se4lip_dist.prepare as prepare

    if not harness.grid_available():
        pytest.skip(harness.missing_reason())
    monkeypatch.setattr(harness, "CACHE_ROOT", tmp_path / "cache")
    out = harness.grid_shards(2)
    assert out.parent.parent == tmp_path / "cache"
    sizes = harness.shard_sizes(out)
    assert (sizes["clips"], sizes["rows"]) == (2, 2) and sizes["frames"] >= 2 * 74
    record = json.loads((out.parent / harness.COMPLETE).read_text())
    assert [n for n, _ in record["inputs"]] == [Path(v).name for v in harness.grid_videos(2)]
    assert "insightface_root" not in record["config"]["face"]

    def no_prepare(*a: object, **k: object) -> None:
        raise AssertionError("a complete cache entry was prepared again")

    monkeypatch.setattr(prepare, "run_prepare", no_prepare)
    assert harness.grid_shards(2) == out


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
    import harness

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
        assert {"label", "value", "target", "met", "detail", "unit", "bound"} <= set(r)
    assert rec["notes"][0] == harness.QUICK_NOTE  # smoke numbers are labelled meaningless
    env = rec["environment"]
    assert {"cpu_count", "load_avg", "load_avg_end", "packages", "git_commit"} <= set(env)
    assert rec["inputs"], "every record says what it measured"
    for key in EXPECTED[name]:
        assert key in rec["metrics"], key


def test_scale_sim_table_shows_per_clip_ratios() -> None:
    import scale_sim

    row = {"clips": 1000, "shards": 16, "cpu_s": 1.0, "peak_mib": 1.0, "index_bytes": 40_000,
           "manifest_bytes": 4000, "first_dispatch_s": 2.0, "wall_s": 4.0,
           "resume_cpu_s": 0.5, "read_cpu_s": 0.1, "read_peak_mib": 2.0}
    big = {**row, "clips": 10_000, "shards": 157, "cpu_s": 5.0}
    lines = scale_sim.table([row, big]).splitlines()
    assert len(lines) == 4 and lines[1].startswith("| --- |")
    assert "| 10,000 | 157 | 0.500 (0.50x) |" in lines[3]  # 1.0 vs 0.5 ms per clip


def test_scale_out_table_compares_each_run_per_worker_cpu_with_one_node() -> None:
    import scale_out

    one = {"nodes": 1, "clips": 10, "frames": 750, "wall_s": 10.0, "workers_used": 1,
           "worker_cpu_s": 1.0, "frames_per_worker_cpu_s": 750.0, "driver_cpu_s": 2.0}
    two = {**one, "nodes": 2, "wall_s": 6.0, "workers_used": 2, "worker_cpu_s": 1.25,
           "frames_per_worker_cpu_s": 600.0}
    lines = scale_out.table([one, two]).splitlines()
    assert len(lines) == 4 and lines[1].startswith("| --- |")
    assert "| 600 | 0.80x | 1.67x |" in lines[3]  # 600 vs 750 per CPU s; 10 s vs 6 s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scale_sim_runs_the_real_pipeline_on_fake_media(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / "scale_sim.py"), "--sizes", "200", "600",
                           "--clips-per-shard", "16", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["clips"] for r in rows] == [200, 600] and rows[1]["shards"] >= 600 // 16
    assert "| 600 |" in proc.stdout


def test_search_compare_table_and_best_after() -> None:
    import search_compare as sc

    assert sc.best_after([0.1, float("nan"), 0.5, 0.3], 2) == 0.1
    assert sc.best_after([0.1, float("nan"), 0.5, 0.3], 4) == 0.5
    md = sc.table({"random": {0: [0.1, 0.2], 1: [0.3, 0.1]}, "tpe": {0: [0.2, 0.4]}}, [1, 2],
                  "val/x")
    assert md.splitlines()[0] == "| best val/x after k trials | random | tpe |"
    assert "| k = 2 | 0.250 [0.200, 0.300] (n=2) | 0.400 (n=1) |" in md


@pytest.mark.timeout(600)
def test_search_compare_runs_both_searchers_on_a_synthetic_objective(tmp_path: Path) -> None:
    """The mechanics on real Ray Tune: every (searcher, seed) runs --trials trials in order."""
    import search_compare as sc
    import yaml

    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"metric": "val/shift_acc", "params": {
        "model.gru_layers": {"choice": [1, 2, 4]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    out = sc.main(["--synthetic", "--space", str(space), "--trials", "3", "--seeds", "0", "1",
                   "--at", "1", "3", "--storage-path", str(tmp_path / "ray"),
                   "--out", str(tmp_path / "o.json")])
    for s in ("random", "tpe"):
        assert set(out["scores"][s]) == {"0", "1"}
        assert all(len(v) == 3 and all(x <= 1.0 for x in v) for v in out["scores"][s].values())
    assert "| k = 3 |" in out["table"]
    assert json.loads((tmp_path / "o.json").read_text())["table"] == out["table"]
