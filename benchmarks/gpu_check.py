"""GPU check: the paper preset end to end on one GPU, with a pass/fail per step.

    .venv/bin/python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu_check.py --cpu --quick   # the same steps on CPU (smoke)

Steps (each reported PASS/FAIL with its numbers, and written to ``--out`` as JSON):

1. ``prepare``: synthetic talking-mouth clips -> shards (no face model needed);
2. ``train``: the paper preset (8-layer GRU, 96x96 lips, batch 16) with autocast (bf16) for a
   few hundred steps on one GPU worker: samples/s;
3. ``resume``: the same run continued for more steps (``--resume``): the optimizer state and
   the AMP scaler must follow the parameters onto the GPU (a device mismatch fails here);
4. ``fp16``: a short fp16 run with the GradScaler, then resumed (its state is checkpointed);
5. ``tune``: a 2-trial search with ``--gpus-per-trial 1`` (one GPU per DDP rank), registry
   gate included;
6. ``extract --use-gpu``: features for the clips from ``models:/...@champion``: real-time
   factor.

Exit status 0 only when every step passed. Nothing here is a timed test: the numbers are for
the record (``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _step(results: list[dict[str, Any]], name: str, fn: Callable[[], dict[str, Any]]) -> bool:
    t0 = time.perf_counter()
    try:
        info = fn()
        ok = True
    except Exception as e:  # a check script: report every failure and go on
        info = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        ok = False
    info.update(step=name, passed=ok, wall_s=round(time.perf_counter() - t0, 1))
    results.append(info)
    shown = {k: v for k, v in info.items() if k not in ("traceback", "step")}
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {json.dumps(shown, default=str)}", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="Run the same steps on CPU (smoke).")
    ap.add_argument("--quick", action="store_true", help="Tiny sizes (numbers meaningless).")
    ap.add_argument("--steps", type=int, default=300, help="Training steps of step 2.")
    ap.add_argument("--work", type=Path, default=None, help="Work folder (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=None, help="Write the results JSON here.")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    from se4lip_dist.config import load_config
    from se4lip_dist.extract import run_extract
    from se4lip_dist.prepare import run_prepare
    from se4lip_dist.synthetic import make_synthetic_dataset
    from se4lip_dist.train import run_train
    from se4lip_dist.tuning import TuneOptions, run_tune

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU smoke version", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="se4lip-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = str(work / "ray")
    n_clips, seconds = (12, 2.0) if args.quick else (48, 6.0)
    steps = 20 if args.quick else args.steps
    size = ["model.gru_layers=1", "model.embed_dim=32", "model.lip_channels=[8,16,16,32,32]",
            "model.lip_height=32", "model.lip_width=32"] if args.cpu else []
    # A GPU rank takes train.cpus_per_gpu_worker CPUs (default); CPU ranks this share.
    common = [*size, "face.backend=none", "train.num_workers=1", "train.val_fraction=0.25",
              "train.cpus_per_worker=0.5"]
    results: list[dict[str, Any]] = []
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if gpu else "cpu",
                            "torch": torch.__version__, "work": str(work)}
    print(json.dumps(info), flush=True)
    shards = work / "shards"

    def prepare() -> dict[str, Any]:
        videos = make_synthetic_dataset(work / "videos", n_clips, seconds)
        cfg = load_config("paper", overrides=common)
        summary = run_prepare([str(v) for v in videos], shards, cfg, workers=0)
        assert not summary.failures, summary.failures
        return {"clips": summary.total_clips, "frames": summary.total_frames}

    def train(name: str, extra: list[str], resume: bool = False) -> dict[str, Any]:
        cfg = load_config("paper", overrides=[*common, *extra])
        r = run_train(cfg, str(shards), tracking_uri=uri, experiment="gpu-check",
                      run_name=name, resume=resume, use_gpu=gpu, storage_path=storage)
        last = r["last"]
        return {"steps": r["steps"], "epochs": r["epochs"],
                "samples_per_s": round(last["perf/samples_per_s"], 1),
                "data_wait_fraction": round(last["perf/data_wait_fraction"], 3),
                "val/shift_acc": last["val/shift_acc"], "best_epoch": r["best_epoch"]}

    def tune() -> dict[str, Any]:
        space = work / "space.yaml"
        space.write_text(json.dumps({"preset": "paper", "metric": "val/shift_acc",
                                     "num_samples": 1, "scheduler": "asha",
                                     "params": {"model.gru_layers": {"grid": [4, 8]}}}))
        r = run_tune(str(space), str(shards), TuneOptions(
            gpus_per_trial=1 if gpu else 0, num_workers_per_trial=None if gpu else 1,
            max_concurrent_trials=1, epochs=2, tracking_uri=uri, storage_path=storage,
            name="gpu-check", register="se4lip-gpu", experiment="gpu-check",
            overrides=tuple([*common, f"train.max_steps={max(4, steps // 4)}"])))
        reg = r["registered"]
        return {"trials": len(r["trials"]), "registered": f"v{reg['version']} {reg['alias']}",
                "reason": reg["reason"], "wall_s_tune": r["wall_s"]}

    def extract() -> dict[str, Any]:
        out = work / "features"
        s = run_extract([str(work / "videos")], "models:/se4lip-gpu/1", out, tracking_uri=uri,
                        use_gpu=gpu, concurrency=1)
        assert s.ok, s.failures
        return {"inputs": s.inputs, "frames": s.frames,
                "real_time_factor": round(s.real_time_factor, 1),
                "compute_real_time_factor": round(s.audio_seconds / s.compute_seconds, 1)
                if s.compute_seconds else None}

    ok = _step(results, "prepare", prepare)
    if ok:
        per_epoch = max(2, steps // 2)
        ok = _step(results, "train (bf16 autocast)", lambda: train(
            "amp", [f"train.max_steps={steps}", "train.epochs=1000",
                    f"train.pairs_per_segment={per_epoch}"]))
        _step(results, "resume (optimizer state on the device)", lambda: train(
            "amp", [f"train.max_steps={steps + max(4, steps // 5)}", "train.epochs=1000",
                    f"train.pairs_per_segment={per_epoch}"], resume=True))
        _step(results, "fp16 + GradScaler, resumed", lambda: (
            train("fp16", ["train.amp_dtype=fp16", "train.max_steps=8", "train.epochs=1000"]),
            train("fp16", ["train.amp_dtype=fp16", "train.max_steps=16", "train.epochs=1000"],
                  resume=True))[1])
        _step(results, "tune (2 trials, 1 GPU per rank)", tune)
        _step(results, "extract --use-gpu", extract)
    passed = all(r["passed"] for r in results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**info, "passed": passed, "steps": results}, indent=1,
                                       default=str))
    print("ALL PASSED" if passed else "SOME STEPS FAILED", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
