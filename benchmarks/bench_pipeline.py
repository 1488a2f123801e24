"""Input pipeline: CPU seconds per delivered training window, Ray Data stream vs a DataLoader.

Every side reads the same shards and runs the same per-batch work, ``stream.make_pair_batch``
(split crop, pair sampling, JPEG decode of the frames the pairs use) on 16 shard rows at a time,
and delivers batches of 32 windows. CPU is counted over *every* process involved (``/proc``
utime+stime of this process and all its descendants, exited ones through their parent's
cutime+cstime), so a side cannot look cheap by moving work into another process:

- ``ray_after`` (the product): ``stream.row_dataset`` through ``streaming_split(1)`` (as Ray
  Train's ``get_dataset_shard``, SplitCoordinator actor included), then
  ``stream.iter_pair_batches``, which samples and decodes in the consumer's collate.
- ``ray_before``: the previous design, pairs sampled and decoded in ``map_batches`` tasks
  (decoded uint8 windows through the object store), same split and batch size.
- ``ray_after_unordered``: ``ray_after`` without ``preserve_order`` (the cost of determinism).
- ``dataloader``: a torch DataLoader, 2 workers, each reading its share of the Parquet files
  with pyarrow and running ``make_pair_batch``; the loop re-batches to 32.

Bounds: the JPEG-decode floor (decoding ``window_frames`` crops, single thread) and the work
floor (``make_pair_batch`` on the same rows in this process, no pipeline at all), both per
window. With ``py-spy`` installed, the full run profiles the coordinator and the consumer.

Training: the product's own loop (``se4lip_dist.train.TrainRecipe.train_epoch``; cpu-small
model, 1 torch thread, batch 32) inside a 1-worker TorchTrainer built by
``se4lip_dist.train.build_trainer``, fed by ``train.epoch_batches`` on the Ray dataset shard or by
the DataLoader, for ``TRAIN_STEPS`` steps; samples/s, data-wait fraction and CPU per window of
all processes.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness
import numpy as np

BATCH = 32
ROWS_PER_TASK = 16
N_ROWS = 320
"""GRID clips (one shard row each) of the stream row."""
TRAIN_STEPS = 200
CLK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- inputs


def inputs(quick: bool, tmp: str) -> tuple[Path, dict[str, Any]]:
    """The shards every side reads, and what they are (the one place that picks the data)."""
    if quick:
        return harness.synthetic_shards(tmp, n_clips=8, n_frames=60), {"data": "synthetic",
                                                                       "why": "--quick"}
    try:
        data = harness.grid_shards(N_ROWS)
        return data, {"data": "grid", **harness.shard_sizes(data)}
    except harness.SharedDataMissing as e:
        data = harness.synthetic_shards(tmp, n_clips=N_ROWS // 4, n_frames=75)
        return data, {"data": "synthetic", "why": str(e), **harness.shard_sizes(data)}


# ---------------------------------------------------------------- CPU of a process tree


class ProcCpu:
    """One ``/proc/PID/stat`` reading: parent, own CPU s, reaped children's CPU s, command."""

    __slots__ = ("cmd", "own", "ppid", "reaped")

    def __init__(self, ppid: int, own: float, reaped: float, cmd: str) -> None:
        self.ppid, self.own, self.reaped, self.cmd = ppid, own, reaped, cmd


def tree_cpu(root: int | None = None) -> dict[int, ProcCpu]:
    """CPU readings of ``root`` (default: this process) and all its descendants.

    Our Ray cluster (gcs, raylet, its workers and actors) and our DataLoader workers descend
    from this process; other users' Ray clusters on the machine do not, so they never count.
    """
    root = os.getpid() if root is None else root
    procs: dict[int, ProcCpu] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        stat = harness.read_text(f"/proc/{d}/stat")
        if not stat:
            continue
        f = stat.rsplit(")", 1)[1].split()
        procs[int(d)] = ProcCpu(int(f[1]), (int(f[11]) + int(f[12])) / CLK,
                                (int(f[13]) + int(f[14])) / CLK, "")
    keep = {}
    for pid in procs:
        p, hops = pid, 0
        while p in procs and p != root and hops < 64:
            p, hops = procs[p].ppid, hops + 1
        if p == root:
            keep[pid] = procs[pid]
            keep[pid].cmd = harness.read_text(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
    return keep


def role(pid: int, p: ProcCpu, root: int, root_cmd: str) -> str:
    """Which part of the pipeline a process is (Ray sets worker titles to ``ray::<task>``)."""
    if pid == root:
        return "consumer"
    if "SplitCoordinator" in p.cmd:
        return "coordinator"
    if p.cmd.startswith("ray::"):
        return "ray_workers"
    if p.ppid == root and p.cmd == root_cmd:
        return "dataloader_workers"
    return "ray_system"


def cpu_delta(a: dict[int, ProcCpu], b: dict[int, ProcCpu]) -> dict[str, float]:
    """CPU seconds spent between two close readings ``a`` and ``b``, by role.

    A process that started in between counts from zero. One of our DataLoader workers that
    ended in between is seen through this process's reaped time (``consumer_children_exited``:
    what it used after its last reading). A Ray process that ended in between loses only its
    last interval: raylet does not reliably reap through ``wait``, so readings must be close.
    """
    root = os.getpid()
    root_cmd = b[root].cmd if root in b else ""
    out: dict[str, float] = collections.defaultdict(float)
    for pid, p in b.items():
        prev = a.get(pid)
        out[role(pid, p, root, root_cmd)] += p.own - (prev.own if prev else 0.0)
    if root in a and root in b:
        gone = sum(p.own for pid, p in a.items() if pid not in b and p.ppid == root)
        out["consumer_children_exited"] += b[root].reaped - a[root].reaped - gone
    return dict(out)


DATALOADER_ROLES = ("consumer", "dataloader_workers", "consumer_children_exited")
"""The processes of a DataLoader side: Ray's processes run idle beside it and do not count."""


def side_cpu(side: str, delta: dict[str, float]) -> float:
    """CPU seconds of one side: everything for Ray, consumer + its workers for the DataLoader."""
    if side == "dataloader":
        return sum(delta.get(k, 0.0) for k in DATALOADER_ROLES)
    return sum(delta.values())


class CpuTimeline(threading.Thread):
    """Reads the tree's CPU every ``interval_s``; CPU by role between two wall-clock instants.

    The reading thread's own CPU is taken out of the consumer's.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, ProcCpu], float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            procs = tree_cpu()
            self.samples.append((time.time(), procs, time.thread_time()))
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def mark(self) -> float:
        """Now, once a reading at or after now exists."""
        t = time.time()
        while not self.samples or self.samples[-1][0] < t:
            time.sleep(self.interval_s / 4)
        return t

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU by role from the last reading at or before ``t0`` to the first at or after
        ``t1`` (epoch seconds)."""
        s = list(self.samples)
        i0 = max((i for i, x in enumerate(s) if x[0] <= t0), default=0)
        i1 = min((i for i, x in enumerate(s) if x[0] >= t1), default=len(s) - 1)
        out: dict[str, float] = collections.defaultdict(float)
        for i in range(i0, i1):
            for k, v in cpu_delta(s[i][1], s[i + 1][1]).items():
                out[k] += v
        out["consumer"] -= s[i1][2] - s[i0][2]
        return dict(out)


# ---------------------------------------------------------------- the sides


class ShardPairs:
    """``torch.utils.data.IterableDataset`` body: pair blocks from this worker's Parquet files."""

    def __init__(self, paths: list[str], spec: Any, rule: Any) -> None:
        self.paths = paths
        self.spec = spec
        self.rule = rule

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq
        import torch.utils.data

        from se4lip_dist.stream import READ_COLUMNS, make_pair_batch

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng()
        paths = list(self.paths)
        rng.shuffle(paths)  # same as Ray's shuffle="files" for training
        for path in paths[wid::nw]:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_TASK,
                                                        columns=READ_COLUMNS):
                batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
                out = make_pair_batch(batch, spec=self.spec, rule=self.rule, role="train")
                if len(out["label"]):
                    yield out


def _torch_dataset(paths: list[str], spec: Any, rule: Any) -> Any:
    import torch.utils.data

    class _DS(ShardPairs, torch.utils.data.IterableDataset):
        pass

    return _DS(paths, spec, rule)


def _rule(data_dir: str | Path, cfg: Any) -> Any:
    from se4lip_dist.manifest import Manifest
    from se4lip_dist.splits import SplitRule

    return SplitRule.for_manifest(Manifest.load(str(data_dir)), cfg)


def dataloader_batches(paths: list[str], cfg: Any, rule: Any = None
                       ) -> Iterator[dict[str, Any]]:
    """Batches of ``BATCH`` pairs from a 2-worker DataLoader (drop_last, block-shuffled)."""
    import torch
    import torch.utils.data

    from se4lip_dist.splits import SplitRule
    from se4lip_dist.stream import PairSpec

    rule = rule or SplitRule(cfg.train.split, cfg.train.val_fraction)
    loader = torch.utils.data.DataLoader(
        _torch_dataset(paths, PairSpec.from_config(cfg), rule),
        batch_size=None, num_workers=2, prefetch_factor=2)
    carry: dict[str, torch.Tensor] | None = None
    for block in loader:
        if carry is not None:
            block = {k: torch.cat([carry[k], block[k]]) for k in block}
        perm = torch.randperm(len(block["label"]))
        block = {k: v[perm] for k, v in block.items()}
        n = len(block["label"]) // BATCH * BATCH
        for i in range(0, n, BATCH):
            yield {k: v[i:i + BATCH] for k, v in block.items()}
        carry = {k: v[n:] for k, v in block.items()}


def decoded_block(batch: dict[str, Any], **kwargs: Any) -> Any:
    """The previous design's ``map_batches`` UDF: ``make_pair_batch`` in a Ray Data task.

    A batch without pairs becomes an empty Arrow table with the tensor columns of the others
    (Ray Data cannot type 0-row numpy tensors).
    """
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from se4lip_dist.shards import decode_lips
    from se4lip_dist.stream import make_pair_batch

    out = make_pair_batch(batch, **kwargs)
    if len(out["label"]):
        return out
    spec = kwargs["spec"]
    first = next((row[0] for row in batch["lips"] if len(row)), None)
    h, w = decode_lips([first]).shape[1:3] if first is not None else (1, 1)
    one = {"wav": np.zeros((1, spec.window_frames * spec.samples_per_frame), np.float32),
           "lips": np.zeros((1, spec.window_frames, h, w, 3), np.uint8)}
    return pa.table({
        **{k: ArrowTensorArray.from_numpy(v) for k, v in one.items()},
        "label": pa.array([0.0], pa.float32()), "kind": pa.array([0], pa.int8()),
    }).slice(0, 0)


class RaySide:
    """A Ray Data side: one ``streaming_split(1)`` iterator (one SplitCoordinator), iterated
    once per epoch, as a Ray Train worker iterates ``get_dataset_shard`` across epochs."""

    def __init__(self, data_dir: str, cfg: Any, design: str) -> None:
        from se4lip_dist.stream import PairSpec, read_shards, row_dataset

        self.cfg, self.design, self.epoch = cfg, design, 0
        self.spec, self.rule = PairSpec.from_config(cfg), _rule(data_dir, cfg)
        if design == "before":
            ds = read_shards(data_dir, shuffle_files=True).map_batches(
                decoded_block, fn_kwargs={"spec": self.spec, "rule": self.rule,
                                          "role": "train", "seed": None},
                batch_size=ROWS_PER_TASK, batch_format="numpy", num_cpus=0.5)
        else:
            ds = row_dataset(data_dir, cfg)
            ds.context.execution_options.preserve_order = design == "after"
        self.it = ds.streaming_split(1, equal=True)[0]

    def batches(self) -> Iterator[dict[str, Any]]:
        from se4lip_dist.stream import iter_pair_batches, pair_seed

        self.epoch += 1
        if self.design == "before":
            return iter(self.it.iter_torch_batches(batch_size=BATCH, drop_last=True,
                                                   prefetch_batches=2))
        return iter_pair_batches(self.it, spec=self.spec, rule=self.rule,
                                 seed=pair_seed(self.cfg.train.seed, self.epoch),
                                 batch_size=BATCH, rows_per_batch=ROWS_PER_TASK)


def _drain(batches: Iterator[dict[str, Any]]) -> tuple[int, float]:
    """Windows delivered and wall seconds of one epoch."""
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in batches)
    return n, time.perf_counter() - t0


# ---------------------------------------------------------------- bounds


def _rows(paths: list[str]) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    from se4lip_dist.stream import READ_COLUMNS

    for path in paths:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_TASK,
                                                    columns=READ_COLUMNS):
            yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}


def floors(paths: list[str], cfg: Any, rule: Any) -> dict[str, float]:
    """CPU s per window of JPEG decoding alone and of ``make_pair_batch`` (this process)."""
    from se4lip_dist.shards import decode_lips
    from se4lip_dist.stream import PairSpec, make_pair_batch

    batches = list(_rows(paths))
    jpegs = [j for b in batches for row in b["lips"] for j in row][:3000]
    t0 = time.process_time()
    for i in range(0, len(jpegs), 64):
        decode_lips(jpegs[i:i + 64])
    per_frame = (time.process_time() - t0) / len(jpegs)
    spec = PairSpec.from_config(cfg)
    t0 = time.process_time()
    n = sum(len(make_pair_batch(b, spec=spec, rule=rule, role="train", seed=i)["label"])
            for i, b in enumerate(batches))
    work = (time.process_time() - t0) / n
    return {"decode": per_frame * cfg.train.window_frames, "work": work,
            "decode_per_frame": per_frame}


# ---------------------------------------------------------------- profile


def profile(pids: dict[str, int], seconds: float, load: Callable[[], Any]) -> dict[str, Any]:
    """py-spy ``record`` of each pid (on-CPU samples only) while ``load()`` runs.

    Returns, per name, the sample count and the leaf functions and modules with the largest
    share of samples; an ``error`` when py-spy is missing or cannot attach.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install -e '.[bench]')"}
    tmp = tempfile.mkdtemp(prefix="se4lip-spy-")
    procs = {name: subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
         "--format", "raw", "--nonblocking", "--output", f"{tmp}/{name}.txt"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for name, pid in pids.items()}
    time.sleep(1.0)
    t_end = time.time() + seconds
    while time.time() < t_end:
        load()
    out: dict[str, Any] = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=seconds + 60)
        path = Path(f"{tmp}/{name}.txt")
        if p.returncode != 0 or not path.exists():
            out[name] = {"error": err.decode(errors="replace")[-300:]}
            continue
        out[name] = summarize_profile(path.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def summarize_profile(raw: str, top: int = 8) -> dict[str, Any]:
    """Collapsed stacks (``frame;frame;... count``) -> top leaf functions and leaf modules."""
    leaf: collections.Counter[str] = collections.Counter()
    module: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frame = stack.split(";")[-1]
        func, _, where = frame.partition(" (")
        file = where.split(":")[0]
        leaf[f"{func} ({Path(file).name})"] += n
        module[_module(file)] += n

    def share(c: collections.Counter[str]) -> list[list[Any]]:
        return [[k, round(v / total, 3)] for k, v in c.most_common(top)]

    return {"samples": total, "leaf": share(leaf) if total else [],
            "module": share(module) if total else []}


def _module(file: str) -> str:
    parts = Path(file).parts
    for anchor in ("site-packages", "se4lip_dist", "lib"):
        if anchor in parts:
            i = parts.index(anchor)
            rest = parts[i + 1:] if anchor != "se4lip_dist" else parts[i:]
            return "/".join(rest[:3 if rest[:1] == ("ray",) else 1])
    return file


# ---------------------------------------------------------------- training


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """``config["steps"]`` steps of the product's loop (``TrainRecipe.train_epoch``, the loop
    ``se4lip_dist.train.train_loop`` runs each epoch) in a Ray Train worker, fed by
    ``config["feed"]``: the product's ``epoch_batches`` on the Ray dataset shard, or the
    DataLoader."""
    import ray.train
    import ray.train.torch
    import torch

    from se4lip_dist.config import Config
    from se4lip_dist.train import TrainRecipe, epoch_batches

    torch.set_num_threads(1)
    cfg = Config.from_dict(config["cfg"])
    rule = _rule(config["data_dir"], cfg)
    recipe = TrainRecipe(cfg, device=ray.train.torch.get_device())
    recipe.setup(place=ray.train.torch.prepare_model)
    if config["feed"] == "ray":  # train.steps_per_epoch: as many passes as the steps need
        it = epoch_batches(ray.train.get_dataset_shard("train"), cfg, rule, 0, recipe.device, 1)
    else:
        it = (b for _ in range(10_000) for b in dataloader_batches(config["paths"], cfg, rule))
    next(it)  # first batch: stream start-up is not a training step
    t_wall = time.time()
    stats = recipe.train_epoch(it)
    return {"steps": recipe.step, "windows": int(stats.seen),
            "samples_per_s": stats.seen / stats.elapsed,
            "data_wait_fraction": stats.wait / stats.elapsed, "t0": t_wall, "t1": time.time()}


def train_side(feed: str, data: Path, paths: list[str], cfg: Any, steps: int,
               timeline: CpuTimeline) -> dict[str, Any]:
    """One 1-worker run of :func:`train_loop`, in the trainer ``train`` and ``tune`` build
    (``se4lip_dist.train.build_trainer``); its numbers and CPU per window."""
    from se4lip_dist.resources import Resources
    from se4lip_dist.train import build_trainer

    cfg = cfg.override({"train.batch_size": BATCH, "train.steps_per_epoch": steps,
                        "train.max_steps": None, "train.epochs": 1})
    trainer = build_trainer(
        cfg, str(data), Resources(0.0, 0.5, 0, 1, 1), name=f"bench-pipeline-{feed}",
        storage_path=tempfile.mkdtemp(prefix="se4lip-bp-"),
        datasets=None if feed == "ray" else {}, loop=train_loop,
        extra_config={"feed": feed, "paths": paths, "steps": steps})
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = dict(result.return_value)
    cpu = timeline.between(out.pop("t0"), out.pop("t1"))
    out["cpu_s_per_window"] = sum(cpu.values()) / out["windows"]
    out["cpu_by_role"] = {k: round(v, 2) for k, v in sorted(cpu.items())}
    return out


# ---------------------------------------------------------------- run


def run(quick: bool) -> dict[str, Any]:
    """CPU per window of every side (interleaved repeats), the floors, a profile, training."""
    import ray
    import ray.cloudpickle
    import torch

    from se4lip_dist.config import load_config
    from se4lip_dist.manifest import Manifest

    if __name__ != "__main__":  # imported (tests, run_all): ship this module's functions by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config("cpu-small")
    tmp = tempfile.mkdtemp(prefix="se4lip-bench-pipe-")
    data, info = inputs(quick, tmp)
    paths = Manifest.load(str(data)).shard_paths(str(data))
    rule = _rule(data, cfg)
    reps, steps = (1, 5) if quick else (3, TRAIN_STEPS)
    torch.set_num_threads(1)
    bounds = floors(paths, cfg, rule)
    harness.start_ray()
    timeline = CpuTimeline()
    timeline.start()
    try:
        t0 = timeline.mark()
        time.sleep(3.0)
        idle = timeline.between(t0, timeline.mark())
        idle_rate = (sum(idle.values()) - idle.get("consumer", 0.0)) / 3.0
        ray_sides = {d: RaySide(str(data), cfg, d)
                     for d in ("after", "before", "after_unordered")}
        sides: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
            "ray_after": ray_sides["after"].batches,
            "ray_before": ray_sides["before"].batches,
            "ray_after_unordered": ray_sides["after_unordered"].batches,
            "dataloader": lambda: dataloader_batches(paths, cfg, rule),
        }
        for make in sides.values():  # warm-up: processes, imports, fork, page cache
            _drain(make())
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        rate: dict[str, list[float]] = {k: [] for k in sides}
        roles: dict[str, dict[str, float]] = {k: collections.defaultdict(float) for k in sides}
        windows: dict[str, int] = {}
        for _ in range(reps):
            for k, make in sides.items():
                t0 = timeline.mark()
                n, s = _drain(make())
                d = timeline.between(t0, timeline.mark())
                cpu[k].append(side_cpu(k, d) / n)
                rate[k].append(n / s)
                windows[k] = n
                for r, v in d.items():
                    roles[k][r] += v / n / reps
        print(json.dumps({"cpu_ms_per_window": {k: [round(x * 1e3, 2) for x in v]
                                                for k, v in cpu.items()}}), file=sys.stderr)
        prof = {} if quick else {
            side: profile(_profile_pids(), 12.0, lambda s=side: _drain(sides[s]()))
            for side in ("ray_after", "ray_before")}
        ray_sides.clear()  # their coordinators end; the training runs start their own
        train = {}
        for feed in ("ray", "dataloader"):
            train[feed] = train_side(feed, data, paths, cfg, steps, timeline)
    finally:
        timeline.stop()
        ray.shutdown()
    med = {k: harness.median(v) for k, v in cpu.items()}
    paired = [d / r for r, d in zip(cpu["ray_after"], cpu["dataloader"], strict=True)]
    paired_before = [d / r for r, d in zip(cpu["ray_before"], cpu["dataloader"], strict=True)]
    ms = {k: round(v * 1e3, 2) for k, v in med.items()}
    metrics = {
        "windows_per_epoch": windows,
        "cpu_ms_per_window": {k: [round(x * 1e3, 2) for x in v] for k, v in cpu.items()},
        "cpu_ms_per_window_by_role": {k: {r: round(v * 1e3, 2) for r, v in sorted(d.items())}
                                      for k, d in roles.items()},
        "windows_per_s": {k: [round(x, 1) for x in v] for k, v in rate.items()},
        "decode_floor_ms_per_window": round(bounds["decode"] * 1e3, 2),
        "work_floor_ms_per_window": round(bounds["work"] * 1e3, 2),
        "ray_idle_cpu_per_s": round(idle_rate, 3),
        "profile": prof,
        "train": train,
        "other_ray_clusters": harness.other_ray_clusters(),
    }
    tr, td = train["ray"], train["dataloader"]
    ratios = [
        harness.ratio(
            "stream: DataLoader / Ray Data CPU s per window (>= 0.83: Ray within 1.2x)",
            harness.median(paired), 1 / 1.2,
            f"{ms['ray_after']} vs {ms['dataloader']} ms per window, all processes; paired "
            f"repeats {_fmt(paired)}", bound="DataLoader(2 workers) on the same shards"),
        harness.ratio(
            "stream, before (decode in map_batches): DataLoader / Ray CPU s per window",
            harness.median(paired_before), 1 / 1.2,
            f"{ms['ray_before']} ms per window; paired repeats {_fmt(paired_before)}",
            bound="DataLoader(2 workers) on the same shards"),
        harness.ratio(
            "stream: JPEG-decode floor / Ray Data CPU s per window",
            bounds["decode"] / med["ray_after"], None,
            f"decode {bounds['decode'] * 1e3:.2f} ms, make_pair_batch alone "
            f"{bounds['work'] * 1e3:.2f} ms per window (1 thread); DataLoader "
            f"{bounds['decode'] / med['dataloader']:.2f}",
            bound="decoding window_frames JPEG crops"),
        harness.ratio(
            "stream: cost of preserve_order (unordered / ordered CPU s per window)",
            med["ray_after_unordered"] / med["ray_after"], None,
            f"{ms['ray_after_unordered']} vs {ms['ray_after']} ms per window", unit="x"),
        harness.ratio(
            f"training {tr['steps']} steps: Ray Data / DataLoader samples/s",
            tr["samples_per_s"] / td["samples_per_s"], None,
            f"{tr['samples_per_s']:.0f} vs {td['samples_per_s']:.0f} samples/s; data-wait "
            f"{tr['data_wait_fraction']:.2f} vs {td['data_wait_fraction']:.2f}; CPU per window "
            f"{tr['cpu_s_per_window'] * 1e3:.1f} vs {td['cpu_s_per_window'] * 1e3:.1f} ms",
            bound="the same TorchTrainer loop fed by a DataLoader"),
    ]
    return harness.result("pipeline", metrics, ratios, inputs={
        **info, "windows_per_epoch": windows.get("ray_after"), "train_steps": steps,
        "repeats": reps})


def _profile_pids() -> dict[str, int]:
    """This process (the consumer) and the live SplitCoordinator actors."""
    pids = {"consumer": os.getpid()}
    for pid, p in tree_cpu().items():
        if "SplitCoordinator" in p.cmd:
            pids[f"coordinator_{pid}"] = pid
    return pids


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    harness.main(run)
