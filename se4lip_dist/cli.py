"""The ``se4lip-dist`` command line: parse, build a config, call one ``run_*``, render with rich.

No logic lives here: every command hands a resolved :class:`~se4lip_dist.config.Config` to the
module that owns the stage, and turns its result (or its error) into output and an exit status.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from se4lip_dist.config import (
    HEADLINE,
    Config,
    ConfigError,
    DataConfig,
    TrainConfig,
    key_doc,
    list_presets,
    load_config,
)

if TYPE_CHECKING:
    from se4lip_dist.runtime import LogRoute
    from se4lip_dist.tuning import TrialRow

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prepare, train, tune, extract and evaluate SE4Lip lip-sync speech encoders on Ray.",
)
console = Console(stderr=True)
out = Console()


def _hide_flag_types() -> None:
    """typer's rich help prints a type after every option, flags too (``--json <bool>``), as if
    they took a value; a flag shows none."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag and not self.count else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()

PresetOpt = Annotated[str, typer.Option("--preset", help=f"Config preset: {', '.join(list_presets())}.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file overriding the preset.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one key, e.g. --set model.gru_layers=4 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address (default: a local Ray).")
]
PlacementOpt = Annotated[
    float | None,
    typer.Option("--placement-timeout", help="Seconds to wait for workers to be placed before failing (default 600; a request no node can hold fails at once)."),
]


KEY_OPTIONS: dict[str, str] = {}
"""CLI parameter name -> the config key its option sets (filled by :func:`_key_opt`)."""


def _key_opt(key: str, flag: str | None = None, note: str = "") -> typer.models.OptionInfo:
    """The option for config key ``key``: its help is the key's docstring in config.py.

    The flag defaults to the key's name (``train.max_steps`` -> ``--max-steps``); a command
    turns the values it got into overrides with :func:`_key_sets`.
    """
    flag = flag or "--" + key.partition(".")[2].replace("_", "-")
    KEY_OPTIONS[flag.removeprefix("--").replace("-", "_")] = key
    text = " ".join(t for t in (key_doc(key), note and f"{note}.") if t)
    return typer.Option(flag, help=f"{text} (config key {key})")


def _key_sets(**values: object) -> list[str]:
    """``--set`` overrides for the key options that were given (None: not given)."""
    return [f"{KEY_OPTIONS[name]}={v.resolve() if isinstance(v, Path) else v}"
            for name, v in values.items() if v is not None]


def _config(preset: str, config: Path | None, sets: list[str] | None, extra: list[str]) -> Config:
    try:
        return load_config(preset, config, [*(sets or []), *extra])
    except ConfigError as e:
        _fail(f"config: {e}")
        raise  # unreachable; keeps type checkers calm


_json_fd: int | None = None  # the real stdout while ``main`` routes fd 1 to stderr for --json


def _emit_json(obj: object) -> None:
    """One JSON object on stdout (NaN/inf become null so any JSON parser reads it)."""
    text = json.dumps(_finite(obj), default=str) + "\n"
    if _json_fd is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        os.write(_json_fd, text.encode())


def _finite(obj: object) -> object:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


VERBOSE_ENV = "SE4LIP_VERBOSE"
_verbose_flag = False  # --verbose of the current invocation
_own_process = False  # set by main(): fds 1 and 2 are this command's, not a test runner's
_log_route: LogRoute | None = None
_command: str | None = None  # the subcommand of the current invocation (names its log file)


def _verbose() -> bool:
    """--verbose (or SE4LIP_VERBOSE=1): library logs on the terminal, not in a log file."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return _verbose_flag or env


def _quiet_ray(as_json: bool, log_dir: Path | None = None) -> None:
    """Quiet by default: what Ray, Ray Data, Tune and MLflow print goes to a log file (its path
    printed once) and this command's own output to the terminal. --verbose leaves the library
    output on the terminal (with --json, Ray's worker output then stays off stdout)."""
    global _log_route
    from se4lip_dist.runtime import log_file_path, quiet_output, set_log_to_driver

    if _verbose() or not _own_process:
        if as_json:
            set_log_to_driver(False)
        return
    if _log_route is not None:
        return
    path = log_file_path(_command or "se4lip-dist", log_dir)
    _log_route = quiet_output(path)
    console.file = _terminal(_log_route.terminal_err)
    out.file = _terminal(_log_route.terminal_out)
    console.print(f"logs: {path} (--verbose shows them here)", style="dim", soft_wrap=True,
                  markup=False, highlight=False)


def _live_io() -> dict[str, bool]:
    """Options of rich's live displays: by default they catch ``sys.stdout``/``sys.stderr``
    while running and print it on the terminal, which would undo :func:`_quiet_ray`."""
    return {"redirect_stdout": _log_route is None, "redirect_stderr": _log_route is None}


def _job_progress(label: str, as_json: bool, status: bool = False) -> tuple[Progress, TaskID]:
    """A batch job's bar (items done of total, time left) and its task; ``status`` adds a
    ``status`` text field. Transient, and off in logs and pipes: no bar is left behind an
    error or the table that follows."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    progress = Progress(*columns, TimeRemainingColumn(), console=console, transient=True,
                        disable=as_json or not console.is_interactive, **_live_io())
    fields = {"status": ""} if status else {}
    return progress, progress.add_task(label, total=None, **fields)


def _terminal(fd: int) -> TextIO:
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)


DEBUG_ENV = "SE4LIP_DEBUG"
_debug_flag = False  # --debug of the current invocation


def _debug() -> bool:
    """--debug (or SE4LIP_DEBUG=1): show tracebacks, not only messages."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return _debug_flag or env


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of every error (also {DEBUG_ENV}=1).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=f"Print Ray, Ray Data and MLflow logs here instead of into a log file (also {VERBOSE_ENV}=1).")] = False,
) -> None:
    """Prepare, train, tune, extract and evaluate SE4Lip lip-sync speech encoders on Ray."""
    global _command, _debug_flag, _verbose_flag
    _debug_flag = debug
    _verbose_flag = verbose
    _command = ctx.invoked_subcommand


def _print_traceback(text: str) -> None:
    from se4lip_dist.credentials import redact_secrets

    console.print(redact_secrets(text.rstrip()), markup=False, highlight=False)


def _fail(message: str, code: int = 2, exc: BaseException | None = None) -> None:
    """Print ``message`` as the error and exit with ``code``.

    With ``exc``: under --debug its traceback comes first; otherwise an error that is not one of
    ours (torch, Ray, a bug) names its type and how to see where it came from.
    """
    from se4lip_dist.credentials import redact_secrets

    if exc is not None and _debug():
        _print_traceback("".join(traceback.format_exception(exc)))
    elif exc is not None and not type(exc).__module__.startswith("se4lip_dist"):
        message = (f"{message or type(exc).__name__} ({type(exc).__name__}; --debug or "
                   f"{DEBUG_ENV}=1 shows the traceback)")
    # soft_wrap: the terminal wraps, so paths, URLs and commands copy-paste whole.
    console.print(f"[bold red]error:[/] {redact_secrets(message)}", markup=True,
                  highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command("presets")
def presets_cmd(
    name: Annotated[str | None, typer.Argument(help="Show this preset resolved.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List the config presets, or print one resolved as YAML."""
    if name is None:
        for p in list_presets():
            out.print(p)
        return
    out.print(_config(name, config, set_, []).to_yaml(), end="")


@app.command()
def prepare(
    out_dir: Annotated[str, typer.Option("--out", help="Shard folder or s3://bucket/prefix (resumes if it exists).")],
    inputs: Annotated[list[str] | None, typer.Argument(help="Videos, folders of videos, or CSV/JSONL manifests (none: only bring --out's index up to date).")] = None,
    preset: PresetOpt = "paper",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    insightface_root: Annotated[Path | None, _key_opt("face.insightface_root")] = None,
    face_backend: Annotated[str | None, _key_opt("face.backend", "--face-backend")] = None,
    detect_every: Annotated[int | None, _key_opt("face.detect_every")] = None,
    refine_motion: Annotated[float | None, _key_opt("face.refine_motion")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Most clip workers at once; the pool grows to it as the cluster allows (default: no bound; 0: no Ray, in-process).")
    ] = None,
    min_workers: Annotated[
        int, typer.Option("--min-workers", help="Clip workers the cluster must hold before the run starts.")
    ] = 1,
    clips_per_shard: Annotated[
        int, typer.Option("--clips-per-shard", min=1, help="Most clips per shard: the block one worker prepares (and a lost one redoes).")
    ] = 64,
    address: AddressOpt = None,
    preview: Annotated[
        str | None, typer.Option("--preview", help="Write a PNG contact sheet of lip crops per clip here (folder or URL).")
    ] = None,
    placement_timeout: Annotated[
        float, typer.Option("--placement-timeout", help="Seconds the clip workers may wait for cluster resources.")
    ] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Turn talking-head videos into Parquet shards of aligned lip crops and audio.

    Inputs, --out and --preview take local paths or URLs (s3://...; credentials and endpoint
    from the standard AWS_* environment variables).
    """
    cfg = _config(preset, config, set_, _key_sets(
        insightface_root=insightface_root, face_backend=face_backend, detect_every=detect_every,
        refine_motion=refine_motion))
    _quiet_ray(as_json)
    from se4lip_dist.prepare import run_prepare

    progress, task = _job_progress("prepare", as_json, status=True)
    n_failed = 0

    def on_result(res) -> None:  # type: ignore[no-untyped-def]
        nonlocal n_failed
        if res.failure:
            n_failed += 1
            progress.console.print(f"[red]failed[/] {res.failure.error}", highlight=False)
            if _debug() and res.failure.traceback:
                _print_traceback(res.failure.traceback)
        progress.update(task, advance=1, status=f"{n_failed} failed" if n_failed else "")

    with progress:
        summary = _guard(
            run_prepare, inputs or [], out_dir, cfg, workers=workers, min_workers=min_workers,
            clips_per_shard=clips_per_shard, address=address, preview_dir=preview,
            placement_timeout_s=placement_timeout,
            on_start=lambda n: progress.update(task, total=n), on_result=on_result)
    if as_json:
        _emit_json(summary.to_json())
    else:
        _render_prepare(summary)
    if summary.failures:
        raise typer.Exit(1)


def _render_prepare(summary) -> None:  # type: ignore[no-untyped-def]
    t = Table(title=f"prepare -> {summary.out_dir}", show_header=False)
    t.add_row("inputs", str(summary.inputs))
    t.add_row("prepared now", str(summary.prepared))
    t.add_row("already complete (skipped)", str(summary.skipped))
    t.add_row("duplicates", str(len(summary.duplicates)))
    t.add_row("failed", f"[red]{len(summary.failures)}[/]" if summary.failures else "0")
    t.add_row("frames prepared", f"{summary.frames:,}")
    t.add_row("wall time", f"{summary.wall_seconds:.1f} s ({summary.frames_per_s:.0f} frames/s)")
    if summary.worker_cpu_seconds:
        t.add_row("clip workers", f"{summary.workers_used}, {summary.worker_cpu_seconds:.1f} CPU s "
                  f"({summary.frames_per_worker_cpu_s:.0f} frames per CPU s)")
    if summary.video_seconds:
        t.add_row("shard bytes / video minute", f"{summary.bytes_per_video_minute / 1e6:.2f} MB")
    t.add_row("folder total", f"{summary.total_clips} clips, {summary.total_frames:,} frames")
    out.print(t)
    for d in summary.duplicates:
        out.print(f"[yellow]duplicate skipped:[/] {d}")
    if summary.failures:
        # The file name first, whole: a long path is folded in its own column, never cut.
        rows = [(*_name_first(f.input), f.stage, f.error.removeprefix(f"{f.input}: "))
                for f in summary.failures]
        ft = Table(title="failures (also in failures.jsonl)")
        ft.add_column("file", overflow="fold", min_width=min(40, max(len(r[0]) for r in rows)))
        ft.add_column("folder", overflow="fold", style="dim")
        ft.add_column("stage")
        ft.add_column("error", overflow="fold")
        for r in rows:
            ft.add_row(*r)
        out.print(ft)


def _name_first(item: str) -> tuple[str, str]:
    """``(file name, folder)`` of a failed input.

    A manifest line naming a file (``/m/list.csv:3 (/m/x/clip.mp4)``) gives
    ``("clip.mp4 (list.csv:3)", "/m/x/")``.
    """
    line = re.fullmatch(r"(.*:\d+) \((.*)\)", item)
    if line:
        folder, sep, name = line[2].rpartition("/")
        return f"{name} ({line[1].rpartition('/')[2]})", folder + sep
    folder, sep, name = item.rpartition("/")
    return name, folder + sep


@app.command()
def train(
    data: Annotated[str, typer.Option("--data", help="Shard folder written by `prepare` (local path or s3://...).")],
    preset: PresetOpt = "cpu-small",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    epochs: Annotated[int | None, _key_opt("train.epochs")] = None,
    max_steps: Annotated[int | None, _key_opt("train.max_steps")] = None,
    steps_per_epoch: Annotated[int | None, _key_opt("train.steps_per_epoch")] = None,
    split: Annotated[str | None, _key_opt("train.split")] = None,
    init: Annotated[str | None, _key_opt("train.init")] = None,
    num_workers: Annotated[int | None, _key_opt("train.num_workers")] = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="One GPU per worker (nccl).")] = False,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow URI (default: ./se4lip-runs sqlite).")
    ] = None,
    experiment: Annotated[str, typer.Option("--experiment")] = "se4lip",
    run_name: Annotated[str | None, typer.Option("--name", help="Run name (stable: --resume finds it).")] = None,
    register: Annotated[
        str | None, typer.Option("--register", help="Register the model under this name.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run named --name.")] = False,
    storage_path: Annotated[
        str | None, typer.Option("--storage-path", help="Checkpoints (shared FS or s3:// on clusters).")
    ] = None,
    address: AddressOpt = None,
    placement_timeout: PlacementOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the speech and lip encoders with Ray Train, tracked in MLflow."""
    cfg = _config(preset, config, set_, _key_sets(
        epochs=epochs, max_steps=max_steps, steps_per_epoch=steps_per_epoch, split=split,
        init=init, num_workers=num_workers))
    _quiet_ray(as_json)
    from se4lip_dist.train import run_train
    try:
        result = run_train(
            cfg, str(data), tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
            register=register, resume=resume, use_gpu=use_gpu, address=address,
            storage_path=storage_path, placement_timeout_s=placement_timeout,
        )
    except (ValueError, RuntimeError, FileNotFoundError, ConnectionError) as e:
        _fail(str(e), exc=e)
    if as_json:
        _emit_json({k: v for k, v in result.items() if k != "history"})
        return
    t = Table(title=f"train {result['run_name']}: best epoch {result['best_epoch']} of "
                    f"{result['epochs']}", show_header=False)
    m = result["metrics"]
    t.add_row("val/shift_acc [95% CI]", _with_ci(m, "val/shift_acc"))
    for k in ("val/units", "val/offset_acc", "val/sync_acc", "val/loss", "val/clips",
              "train/loss", "perf/samples_per_s", "perf/data_wait_fraction"):
        t.add_row(k, _fmt(m.get(k)))
    for k in ("steps", "run_id", "model_uri", "checkpoint", "tracking_uri"):
        t.add_row(k, str(result.get(k)))
    out.print(t)
    reg = result.get("registered")
    if reg:
        _print_gate(reg["name"], reg["version"], reg["alias"], reg["reason"])
    _print_ui_hint(result["tracking_uri"])


def _with_ci(m: dict, key: str) -> str:
    """``0.92 [0.75, 0.98]`` from a metric and its ``_ci_low``/``_ci_high`` companions."""
    return f"{_fmt(m.get(key))} [{_fmt(m.get(key + '_ci_low'))}, {_fmt(m.get(key + '_ci_high'))}]"


def _print_gate(name: str, version: int, alias: str, reason: str) -> None:
    colour = "green" if alias == "champion" else "yellow"
    out.print(f"registered [bold]{name}[/] v{version} as [{colour}]{alias}[/]: {reason}",
              soft_wrap=True)


def _print_ui_hint(tracking_uri: str) -> None:
    """How to open the runs: the server's URL, or the command for a local store (with the
    ``mlflow`` of this interpreter's environment, so it runs without activating it)."""
    if tracking_uri.startswith(("http://", "https://")):
        out.print(f"MLflow UI: {tracking_uri}", soft_wrap=True)
        return
    exe = Path(sys.executable).with_name("mlflow")
    mlflow_cmd = str(exe) if exe.exists() else "mlflow"
    out.print(f"MLflow UI: {mlflow_cmd} ui --backend-store-uri {tracking_uri}", soft_wrap=True,
              markup=False, highlight=False)


# --- tune and the model registry (logic in se4lip_dist.tuning / se4lip_dist.registry) ------


@app.command()
def tune(
    data: Annotated[str, typer.Option("--data", help="Shard folder written by `prepare` (local path or s3://...).")],
    space: Annotated[Path, typer.Option("--space", help="Search space YAML (see tune/).")] = Path("tune/default.yaml"),
    preset: Annotated[str | None, typer.Option("--preset", help="Override the space's preset.")] = None,
    set_: SetOpt = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", help="Trials (default: the space's).")] = None,
    max_concurrent_trials: Annotated[int | None, typer.Option("--max-concurrent-trials")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option("--cpus-per-trial", help="CPUs a trial reserves (driver + workers).")] = None,
    gpus_per_trial: Annotated[float, typer.Option("--gpus-per-trial", help="Whole GPUs per trial: that many DDP ranks, one GPU each.")] = 0.0,
    num_workers_per_trial: Annotated[int | None, typer.Option("--num-workers-per-trial", help="DDP ranks per trial (default: --gpus-per-trial, or 2 on CPUs).")] = None,
    epochs: Annotated[int | None, _key_opt("train.epochs", note="Per trial: ASHA's max_t")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="val/shift_acc | val/offset_acc | val/sync_acc | val/hard_neg_acc | val/loss (default: the space's).")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="max | min.")] = None,
    register: Annotated[str, typer.Option("--register", help="Registered model name.")] = "se4lip",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri")] = None,
    experiment: Annotated[str, typer.Option("--experiment")] = "se4lip-tune",
    name: Annotated[str, typer.Option("--name", help="Stable tune name (--resume finds it).")] = "se4lip-tune",
    resume: Annotated[bool, typer.Option("--resume", help="Finish the unfinished trials of --name.")] = False,
    storage_path: Annotated[str | None, typer.Option("--storage-path", help="Tune/Train results (shared FS or s3:// on clusters).")] = None,
    address: AddressOpt = None,
    placement_timeout: PlacementOpt = None,
    search: Annotated[str, typer.Option("--search", help="random | grid (every choice enumerated) | tpe (Optuna TPE: learns from finished trials).")] = "random",
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="asha | fifo | pbt (default: the space's, else asha). pbt: population-based training, exploiting between epochs; mutates train.* and augment.* keys.")] = None,
    objective: Annotated[str, typer.Option("--objective", help="accuracy | pareto (metric vs extraction cost; multi-objective TPE with --search tpe).")] = "accuracy",
    cost: Annotated[str, typer.Option("--cost", help="gflop (per audio second, from the architecture) | rtf (measured real-time factor): what --max-cost and the front are over.")] = "gflop",
    max_cost: Annotated[float | None, typer.Option("--max-cost", help="Cost budget in --cost units: the winner and @champion must be within it.")] = None,
    search_seed: Annotated[int | None, typer.Option("--search-seed", help="Seed of the searcher's sampling.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search GRU depth, window and learning rate with Ray Tune; register the best encoder."""
    from rich.live import Live

    _quiet_ray(as_json)
    from se4lip_dist.search import SearchPlan
    from se4lip_dist.tuning import TuneOptions, run_tune

    overrides = list(set_ or [])
    opts = TuneOptions(
        preset=preset,
        num_samples=num_samples, max_concurrent_trials=max_concurrent_trials,
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
        num_workers_per_trial=num_workers_per_trial, epochs=epochs, metric=metric, mode=mode,
        register=register, tracking_uri=tracking_uri, experiment=experiment, name=name,
        resume=resume, storage_path=storage_path, address=address, overrides=tuple(overrides),
        plan=SearchPlan(search=search, scheduler=scheduler, objective=objective, cost=cost,
                        max_cost=max_cost, seed=search_seed),
        **({"placement_timeout_s": placement_timeout} if placement_timeout else {}),
    )
    live = Live(_trials_table([], metric or HEADLINE, "trials"), console=console,
                refresh_per_second=2, transient=True, **_live_io())

    def show(rows: list[TrialRow]) -> None:
        live.update(_trials_table(rows, metric or HEADLINE, "trials (live)",
                                  epochs=epochs, mode=mode or "max"))

    def waiting(line: str) -> None:  # on stderr, so --json's stdout stays one document
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        if as_json:
            result = run_tune(str(space), str(data), opts, on_wait=waiting)
        else:
            with live:
                result = run_tune(str(space), str(data), opts, on_update=show, on_wait=waiting)
    except (ValueError, RuntimeError, FileNotFoundError, ConnectionError) as e:
        _fail(str(e), exc=e)
    if as_json:
        _emit_json(result)
        return
    _render_ranked(result)


def _trials_table(rows: list[TrialRow], metric: str, title: str, *, epochs: int | None = None,
                  mode: str = "max") -> Table:
    """Trials with their epoch (of ``epochs``), last and best score; the best so far below."""
    t = Table(title=title)
    for col in ("trial", "status", "epoch", "params", metric, f"best {metric} (epoch)"):
        t.add_column(col)
    best: TrialRow | None = None
    for r in rows:
        m = r.metrics
        t.add_row(r.name, r.status, f"{r.epoch}/{epochs}" if epochs else str(r.epoch),
                  " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r.params.items()),
                  _fmt(m.get(metric)), f"{_fmt(m.get(f'best/{metric}'))} ({r.best_epoch})")
        score = m.get(f"best/{metric}")
        if score is not None and (best is None or (score > best.metrics[f"best/{metric}"])
                                  == (mode == "max")):
            best = r
    if best is not None:
        t.caption = (f"best so far: {best.name}, {metric} "
                     f"{_fmt(best.metrics[f'best/{metric}'])} at epoch {best.best_epoch}")
    return t


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _render_ranked(result: dict) -> None:
    metric = result["metric"]
    t = Table(title=f"tune {result['name']}: trials ranked by their best epoch's {metric} "
                    f"({result['mode']})")
    front = {r["trial"] for r in result.get("front", [])}
    for col in ("#", "trial", "status", "epochs", "best epoch", "params", metric,
                "GFLOP/audio s", "RTF", "front"):
        t.add_column(col)
    for i, r in enumerate(result["trials"], 1):
        t.add_row(str(i), r["trial"], r["status"], str(r["epoch"]), str(r.get("best_epoch")),
                  " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r["params"].items()),
                  _fmt(r.get(metric)), _fmt(r.get("cost/gflop_per_audio_s")),
                  _fmt(r.get("cost/rtf")), "*" if r["trial"] in front else "")
    out.print(t)
    reg = result["registered"]
    out.print(f"best: {result['best']['trial']}  {result['stopped_early']} trial(s) stopped early "
              f"by the scheduler  wall {result['wall_s']:.0f} s")
    _print_gate(reg["name"], reg["version"], reg["alias"], reg["reason"])
    _print_ui_hint(result["tracking_uri"])


models_app = typer.Typer(no_args_is_help=True,
                         help="List, show, compare and promote registered encoders.")
app.add_typer(models_app, name="models")
TrackingOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: ./se4lip-runs sqlite).")]


@models_app.command("list")
def models_list(tracking_uri: TrackingOpt = None, as_json: JsonOpt = False) -> None:
    """Registered models with their latest version and aliases."""
    from se4lip_dist.registry import list_models

    res = _guard(list_models, tracking_uri)
    if as_json:
        _emit_json(res)
        return
    t = Table(title=f"registered models in {res['tracking_uri']}")
    for col in ("name", "latest", "aliases", "updated"):
        t.add_column(col)
    for r in res["models"]:
        t.add_row(r["name"], str(r["latest_version"]),
                  ", ".join(f"{a}=v{v}" for a, v in r["aliases"].items()), r["updated"])
    out.print(t)
    if not res["models"]:
        out.print("no registered models there yet (`train --register NAME` or `tune` adds one)")


@models_app.command("show")
def models_show(name: str, tracking_uri: TrackingOpt = None, as_json: JsonOpt = False) -> None:
    """Every version of NAME: aliases, gate scores and the reason for its alias."""
    from se4lip_dist.registry import show_model

    info = _guard(show_model, name, tracking_uri)
    if as_json:
        _emit_json(info)
        return
    t = Table(title=f"{name} in {info['tracking_uri']}")
    for col in ("version", "aliases", "val/shift_acc [95% CI]", "units", "floor",
                "val/offset_acc", "epoch", "data"):
        t.add_column(col)
    for v in info["versions"]:
        tags = v["tags"]
        ci = (f"{tags.get('gate.val/shift_acc', '-')} [{tags.get('gate.val/shift_acc_ci_low', '')}"
              f", {tags.get('gate.val/shift_acc_ci_high', '')}]")
        t.add_row(str(v["version"]), ", ".join(v["aliases"]), ci,
                  tags.get("gate.val/units", "-"), tags.get("gate.floor.floor", "-"),
                  tags.get("gate.val/offset_acc", "-"), tags.get("se4lip.epoch", "-"),
                  tags.get("se4lip.data_manifest_hash", "-"))
    out.print(t)
    for v in info["versions"]:
        tags = v["tags"]
        if "gate.decision" in tags:
            out.print(f"v{v['version']} {tags['gate.decision']}: {tags.get('gate.reason', '')}",
                      soft_wrap=True)


@models_app.command("compare")
def models_compare(
    name: str,
    v1: Annotated[int, typer.Argument(help="A version of NAME.")],
    v2: Annotated[int, typer.Argument(help="Another version of NAME.")],
    data: Annotated[str | None, typer.Option("--data", help="Shards to score on (default: the data the newer version's gate used).")] = None,
    tracking_uri: TrackingOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score two versions on the same validation clips with the gate's protocol, side by side."""
    from se4lip_dist.lifecycle import compare

    res = _guard(compare, name, (v1, v2), data_dir=data, tracking_uri=tracking_uri)
    if as_json:
        _emit_json(res)
        return
    t = Table(title=f"{name} v{v1} vs v{v2} on {res['data']} (protocol {res['protocol']})")
    for col in ("metric", f"v{v1}", f"v{v2}", "better"):
        t.add_column(col)
    for r in res["rows"]:
        t.add_row(r["metric"], _fmt(r[f"v{v1}"]), _fmt(r[f"v{v2}"]), r["better"] or "")
    out.print(t)
    pr = res["paired"]
    out.print(f"shift-consistent on the same {pr['units']} units: only v{v1} "
              f"{pr['only'][f'v{v1}']}, only v{v2} {pr['only'][f'v{v2}']}; one-sided exact McNemar "
              + ", ".join(f"p({k}) = {p:.3g}" for k, p in pr["p_value"].items()), soft_wrap=True)
    out.print(f"[dim]{res['protocol_text']}[/]", soft_wrap=True)


@models_app.command("promote")
def models_promote(
    name: str, version: int,
    alias: Annotated[str, typer.Option("--alias")] = "champion",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point ALIAS (default champion) at VERSION, by hand (no quality gate)."""
    from se4lip_dist.lifecycle import promote

    previous = _guard(promote, name, version, alias, tracking_uri)
    was = f" (was v{previous})" if previous else ""
    out.print(f"{name}@{alias} -> v{version}{was}")


def _guard(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kwargs)
    except (ValueError, RuntimeError, FileNotFoundError, ConnectionError) as e:
        _fail(str(e), exc=e)


# --- features and sync metrics (logic in extract / evaluate / lmd / probe) -----------------


@app.command()
def extract(
    inputs: Annotated[list[str], typer.Argument(help="Audio or video files, folders, or CSV/JSONL manifests.")],
    model: Annotated[str, typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...")] = "models:/se4lip@champion",
    out_dir: Annotated[str, typer.Option("--out", help="Feature folder or s3://bucket/prefix (resumes if it exists).")] = "features",
    fps: Annotated[int, _key_opt("data.fps", note="Here: the frame rate the features follow")] = DataConfig.fps,
    fmt: Annotated[str, typer.Option("--format", help="frame ([N,D]) | window ([N,16,D]) | both.")] = "both",
    parquet: Annotated[bool, typer.Option("--parquet", help="Also write clip,frame,feature Parquet.")] = False,
    use_gpu: Annotated[bool, typer.Option("--use-gpu")] = False,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | int8 (CPU: dynamic int8 GRU, faster, checked against fp32).")] = "fp32",
    concurrency: Annotated[int, typer.Option("--concurrency", help="Encoder actors.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per encoder call.")] = 256,
    tracking_uri: TrackingOpt = None,
    experiment: Annotated[str, typer.Option("--experiment")] = "se4lip-extract",
    address: AddressOpt = None,
    placement_timeout: Annotated[float, typer.Option("--placement-timeout", help="Seconds the encoder actors may wait for cluster resources.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Write one speech embedding per video frame for renderer datasets (Ray Data batch job).

    Inputs and --out take local paths or URLs (s3://...; credentials and endpoint from the
    standard AWS_* environment variables).
    """
    _quiet_ray(as_json)
    from se4lip_dist.extract import run_extract
    progress, task = _job_progress("extract", as_json)
    with progress:
        summary = _guard(
            run_extract, inputs, model, out_dir, tracking_uri=tracking_uri, fps=fps, fmt=fmt,
            parquet=parquet, batch_size=batch_size, concurrency=concurrency, use_gpu=use_gpu,
            precision=precision, address=address, experiment=experiment,
            placement_timeout_s=placement_timeout,
            on_start=lambda n: progress.update(task, total=n),
            on_result=lambda _row: progress.update(task, advance=1),
        )
    if as_json:
        _emit_json(summary.to_json())
    else:
        d = summary.to_json()
        t = Table(title=f"extract -> {out_dir}", show_header=False)
        for k, v in d.items():
            if not isinstance(v, list | dict):
                t.add_row(k, _fmt(v))
        out.print(t)
        for f in summary.failures:
            out.print(f"[red]failed[/] {f.error}", highlight=False)
            if _debug() and f.traceback:
                _print_traceback(f.traceback)
    raise typer.Exit(summary.exit_code)


@app.command()
def evaluate(
    videos: Annotated[list[str], typer.Argument(help="Videos, folders or manifests.")],
    model: Annotated[str, typer.Option("--model", help="A logged/registered SE4Lip model URI.")] = "models:/se4lip@champion",
    max_offset: Annotated[int, _key_opt("train.max_offset")] = TrainConfig.max_offset,
    shift: Annotated[list[int] | None, typer.Option("--shift", help="Delay the audio by K frames first (default 0). Repeat (--shift -3 --shift 0 --shift 3) to search every clip at each shift and score the clips recovering all of them.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Distance-vs-offset PNG per clip here.")] = None,
    tracking_uri: TrackingOpt = None,
    insightface_root: Annotated[Path | None, _key_opt("face.insightface_root")] = None,
    face_backend: Annotated[str | None, _key_opt("face.backend", "--face-backend")] = None,
    as_json: JsonOpt = False,
) -> None:
    """AV offset, LSE-D/LSE-C-style scores (this encoder's scale) and offset accuracy per clip.

    With several --shift values each clip is searched at every shift and the headline is the
    share of clips whose offset is recovered at all of them, with a 95% interval over clips.
    """
    _quiet_ray(as_json)
    from se4lip_dist.evaluate import reference_shift, run_evaluate
    res = _guard(run_evaluate, videos, model, tracking_uri=tracking_uri, max_offset=max_offset,
                 shift=shift or [0], plot_dir=plot,
                 insightface_root=str(insightface_root.resolve()) if insightface_root else None,
                 face_backend=face_backend)
    shifts = res["shifts"]
    several = len(shifts) > 1
    if as_json:
        _emit_json({**res, "clips": [{k: v for k, v in c.items() if k != "distances"}
                                     for c in res["clips"]]})
    else:
        ref = f" @{reference_shift(shifts)}" if several else ""
        t = Table(title=f"evaluate {model} (shift{'s' * several} "
                        f"{', '.join(str(s) for s in shifts)})")
        per_shift = [f"offset @{s}" for s in shifts] + ["consistent"] if several else ["offset"]
        for col in ("clip", *per_shift, f"lse_d{ref}", f"lse_c{ref}", "frames", "error"):
            t.add_column(col)
        for c in res["clips"]:
            cells = ([*(c.get("offsets") or [None] * len(shifts)), c.get("shift_consistent")]
                     if several else [c.get("offset")])
            t.add_row(c["name"], *(_fmt(v) for v in cells), _fmt(c.get("lse_d")),
                      _fmt(c.get("lse_c")), _fmt(c.get("frames")), c.get("error", ""))
        out.print(t)
        for c in res["clips"]:
            if _debug() and c.get("traceback"):
                _print_traceback(c["traceback"])
        if res["evaluated"] and not several:
            out.print(f"offset accuracy (|offset - {shifts[0]}| <= 1): {res['hits']}/"
                      f"{res['evaluated']} ({res['offset_accuracy']:.2f})")
        elif res["evaluated"]:
            per = ", ".join(f"at {p['shift']}: {p['accuracy']:.2f}" for p in res["per_shift"])
            out.print(f"shift-consistent clips (|offset - K| <= 1 at every shift K): "
                      f"{res['consistent']}/{res['evaluated']}, {_with_ci(res, 'shift_acc')} "
                      f"(95% CI over clips; a constant answer scores "
                      f"{res['constant_floor']['consistent']:.2f}); per shift: {per}")
        out.print(f"[dim]{res['note']}[/]")
    if not res["evaluated"]:
        console.print("[bold red]error:[/] no clip could be evaluated (see the errors above)")
        raise typer.Exit(1)
    if res.get("failed"):
        raise typer.Exit(1)


@app.command()
def audit(
    data: Annotated[list[str], typer.Argument(help="A prepared-shards folder, or videos (files, folders, CSV/JSONL manifests).")],
    model: Annotated[str, typer.Option("--model", help="The sync model that measures: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...")] = "models:/se4lip@champion",
    fix: Annotated[str | None, typer.Option("--fix", help="Write a corrected prepared-shards folder here (a new folder, or one an unfinished run of the same audit left: it resumes): offset clips get their audio shifted back and both streams trimmed to their overlap.")] = None,
    undecidable: Annotated[str, typer.Option("--undecidable", help="With --fix: drop undecidable clips, or keep them (flagged in the index).")] = "drop",
    report: Annotated[str | None, typer.Option("--report", help="Folder for audit.parquet, audit.csv and the report (default: FIX/audit with --fix, else ./audit).")] = None,
    shift: Annotated[list[int] | None, typer.Option("--shift", help="Audio shifts every clip is searched at (repeat; default -3, 0, 3).")] = None,
    max_offset: Annotated[int, _key_opt("train.max_offset")] = TrainConfig.max_offset,
    min_confidence: Annotated[float | None, typer.Option("--min-confidence", help="Least LSE-C (this encoder's scale) for a decision.")] = None,
    sync_tolerance: Annotated[int, typer.Option("--sync-tolerance", help="A clip with |offset| <= this is in sync (never corrected).")] = 1,
    workers: Annotated[int, typer.Option("--workers", help="Most audit actors (0.5 CPU each); 0: in this process, no Ray.")] = 1,
    min_workers: Annotated[int, typer.Option("--min-workers", help="Audit actors the cluster must hold before the job starts.")] = 1,
    use_gpu: Annotated[bool, typer.Option("--use-gpu")] = False,
    tracking_uri: TrackingOpt = None,
    experiment: Annotated[str, typer.Option("--experiment")] = "se4lip-audit",
    address: AddressOpt = None,
    placement_timeout: Annotated[float, typer.Option("--placement-timeout", help="Seconds the audit actors may wait for cluster resources.")] = 600.0,
    insightface_root: Annotated[Path | None, _key_opt("face.insightface_root")] = None,
    face_backend: Annotated[str | None, _key_opt("face.backend", "--face-backend")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure every clip's audio-video offset (shift protocol), classify it (in sync, offset
    by k frames, undecidable) and, with --fix, write a corrected copy of the data."""
    _quiet_ray(as_json)
    from se4lip_dist.audit import MIN_CONFIDENCE, AuditSettings, run_audit

    settings = _guard(AuditSettings, shifts=tuple(shift or (-3, 0, 3)), max_offset=max_offset,
                      min_confidence=MIN_CONFIDENCE if min_confidence is None else min_confidence,
                      sync_tolerance=sync_tolerance)
    progress, task = _job_progress("audit", as_json)
    with progress:
        res = _guard(run_audit, data, model, report_dir=report, fix_out=fix,
                     undecidable=undecidable, settings=settings, tracking_uri=tracking_uri,
                     workers=workers, min_workers=min_workers, use_gpu=use_gpu, address=address,
                     experiment=experiment, placement_timeout_s=placement_timeout,
                     insightface_root=str(insightface_root.resolve()) if insightface_root else None,
                     face_backend=face_backend,
                     on_start=lambda n: progress.update(task, total=n),
                     on_result=lambda _a: progress.update(task, advance=1))
    if as_json:
        _emit_json(res.to_json())
        return
    t = Table(title=f"audit {model} ({len(res.clips)} clips)")
    for col in ("status", "clips", "share (95% CI over clips)"):
        t.add_column(col)
    for status, d in res.shares().items():
        t.add_row(status, str(res.counts[status]), "-" if d["share"] is None else
                  f"{d['share']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]")
    out.print(t)
    if res.reasons:
        out.print("undecidable: " + ", ".join(f"{r} {k}" for r, k in res.reasons.items()))
    for a in res.clips:
        if a.status == "offset":
            out.print(f"offset {a.offset:+d} frames: {a.clip_id} ({a.source})", soft_wrap=True,
                      highlight=False)
    if res.fix_out:
        out.print(f"corrected copy: {res.fix_out} (corrected {res.corrected}, copied "
                  f"{res.copied}, flagged {res.flagged}, dropped {res.dropped}"
                  + (f"; {res.resumed} clips done by the earlier run it resumed" if res.resumed
                     else "") + ")", soft_wrap=True)
    out.print(f"report: {res.report['markdown']}", soft_wrap=True)


@app.command()
def lmd(
    pred: Annotated[Path, typer.Argument(help="Generated video.")],
    gt: Annotated[Path, typer.Argument(help="Ground-truth video of the same speech.")],
    fps: Annotated[int, _key_opt("data.fps")] = DataConfig.fps,
    max_frames: Annotated[int | None, typer.Option("--max-frames")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Lip landmark distance (dlib 68-point mouth landmarks) between two videos."""
    from se4lip_dist.lmd import run_lmd

    res = _guard(run_lmd, pred, gt, fps=fps, max_frames=max_frames)
    if as_json:
        _emit_json(res)
        return
    out.print(f"LMD {res['lmd']:.4f} px over {res['frames']} frames "
              f"(pred {res['pred_frames']}, gt {res['gt_frames']} frames)")


@app.command("probe-visemes")
def probe_visemes(
    grid_dir: Annotated[Path, typer.Argument(help="GRID speaker folder with align/ and video/.")],
    model: Annotated[str | None, typer.Option("--model", help="Encoder URI (omit: random-init control).")] = None,
    tracking_uri: TrackingOpt = None,
    pairs: Annotated[str, typer.Option("--pairs", help="Letter pairs, e.g. d/t,b/p,g/k.")] = "d/t,b/p,g/k",
    plot: Annotated[Path | None, typer.Option("--plot", help="Folder for one PCA PNG per pair.")] = None,
    max_per_letter: Annotated[int | None, typer.Option("--max-per-letter")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Preset of the random-init control.")] = "cpu-small",
    seed: Annotated[int, _key_opt("train.seed", note="Here: of the random-init control")] = TrainConfig.seed,
    as_json: JsonOpt = False,
) -> None:
    """Linear-probe separability of viseme-identical letters: encoder vs acoustic features."""
    from se4lip_dist.probe import run_probe

    try:
        pair_list = tuple(tuple(p.split("/")) for p in pairs.split(","))
        if any(len(p) != 2 for p in pair_list):
            raise ValueError
    except ValueError:
        _fail(f"--pairs must look like d/t,b/p, got {pairs!r}")
    res = _guard(run_probe, model, grid_dir, tracking_uri=tracking_uri, pairs=pair_list,
                 plot=plot, max_per_letter=max_per_letter, preset=preset, seed=seed)
    if as_json:
        _emit_json(res)
        return
    t = Table(title="viseme probe: 5-fold linear-probe accuracy (lower = pair less separated)")
    rows = res.get("pairs", [])
    if rows:
        for col in rows[0]:
            t.add_column(str(col))
        for r in rows:
            t.add_row(*[_fmt(v) for v in r.values()])
    out.print(t)


@app.command()
def quickstart(
    video_dir: Annotated[Path | None, typer.Argument(help="Your videos (default: synthetic clips).")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where shards, runs and features go.")] = Path("se4lip-quickstart"),
    insightface_root: Annotated[Path | None, _key_opt("face.insightface_root", note="Needed for real videos")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """prepare -> tiny tune (2 trials) -> register -> extract -> evaluate, on local Ray + sqlite."""
    _quiet_ray(False, log_dir=workdir.resolve() / "logs")
    from se4lip_dist.quickstart import EPOCHS, run_quickstart
    view = _QuickstartView(EPOCHS)
    try:
        res = _guard(run_quickstart, video_dir, workdir,
                     insightface_root=str(insightface_root.resolve()) if insightface_root else None,
                     tracking_uri=tracking_uri, reporter=view)
    finally:
        view.close()
    _print_quickstart_summary(res)


class _StepProgress(Progress):
    """A step's spinner, bar and elapsed time, with the live trial table under it."""

    table: Table | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        if self.table is not None:
            yield self.table


class _QuickstartView:
    """Draws the quickstart as it runs (a :class:`se4lip_dist.quickstart.Reporter`): a rule per
    step, a bar over the step's clips, the live trial table during the tune, one line of outcome
    per step. The moving parts are transient: a log or a pipe gets only the lines that stay."""

    def __init__(self, epochs: int, metric: str = HEADLINE) -> None:
        self.epochs = epochs
        self.metric = metric
        self.progress: _StepProgress | None = None
        self.task: TaskID | None = None

    def step(self, title: str) -> None:
        """A rule with the step's title, and a spinner until it ends."""
        self.close()
        console.rule(f"[bold]{title}")
        self.progress = _StepProgress(
            SpinnerColumn(), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=console, transient=True, disable=not console.is_interactive, **_live_io())
        self.task = self.progress.add_task("", total=None)
        self.progress.start()

    def items(self, total: int) -> None:
        """The step's bar counts ``total`` items."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, total=total, completed=0, description=f"0/{total}")

    def advance(self) -> None:
        """One more item done."""
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
            task = self.progress.tasks[0]
            self.progress.update(self.task, description=f"{task.completed:g}/{task.total:g}")

    def trials(self, rows: list[TrialRow]) -> None:
        """The live trial table (status, epoch, scores, best so far)."""
        if self.progress is not None:
            self.progress.table = _trials_table(rows, self.metric, "trials", epochs=self.epochs)
            self.progress.refresh()

    def note(self, text: str) -> None:
        """A line that stays, under the step's rule."""
        target = self.progress.console if self.progress is not None else console
        target.print(f"  {text}", soft_wrap=True, markup=False, highlight=False)

    def close(self) -> None:
        """Remove the moving parts."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None


def _print_quickstart_summary(res: dict) -> None:
    """Where everything went, and the follow-up commands as this environment runs them (its
    own ``se4lip-dist``, so they work without activating it), one line each, never wrapped."""
    from se4lip_dist.quickstart import follow_up_commands

    console.rule("[bold green]done")
    for label, value in (("shards", res["shards"]), ("model", f"{res['model_uri']} "
                         f"({res['alias']}; `models show` below says why)"),
                         ("features", res["features"])):
        out.print(f"{label + ':':<10} {value}", soft_wrap=True, markup=False, highlight=False)
    _print_ui_hint(res["tracking_uri"])
    exe = Path(sys.executable).with_name("se4lip-dist")
    out.print("next:")
    for line in follow_up_commands(res, str(exe) if exe.exists() else "se4lip-dist"):
        out.print(f"  {line}", soft_wrap=True, markup=False, highlight=False)


@app.command()
def subject(
    video: Annotated[str, typer.Argument(help="The subject's video (local path or s3://...).")],
    out_dir: Annotated[str, typer.Option("--out", help="Folder for shards, features and the report.")],
    name: Annotated[str | None, typer.Option("--name", help="Subject name (default: from the file name); the model is se4lip-NAME.")] = None,
    init: Annotated[str, _key_opt("train.init", note="Here: the general encoder to fine-tune; '' trains from scratch")] = "models:/se4lip@champion",
    preset: PresetOpt = "cpu-small",
    set_: SetOpt = None,
    insightface_root: Annotated[Path | None, _key_opt("face.insightface_root")] = None,
    face_backend: Annotated[str | None, _key_opt("face.backend", "--face-backend")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: ./se4lip-runs sqlite).")] = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="Train and extract on GPUs.")] = False,
    offset: Annotated[str, typer.Option("--offset", help="When the sync audit finds the video's audio offset: stop (with the measured offset), fix (train and extract on corrected data) or ignore.")] = "stop",
    audit_model: Annotated[str | None, typer.Option("--audit-model", help="Model that audits the video's sync (default: the --init encoder).")] = None,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One person's video -> its sync audit -> that person's encoder (fine-tuned, end of the
    video held out) -> renderer features and a held-out report."""
    sets = [*(set_ or []), *_key_sets(insightface_root=insightface_root, face_backend=face_backend)]
    _quiet_ray(as_json)
    from se4lip_dist.subject import run_subject
    res = _guard(run_subject, video, out_dir, name=name, init=init or None, preset=preset,
                 overrides=sets, tracking_uri=tracking_uri, address=address, use_gpu=use_gpu,
                 on_offset=offset, audit_model=audit_model,
                 on_step=None if as_json else lambda title: console.rule(f"[bold]{title}"))
    if as_json:
        _emit_json(res)
        return
    reg = res["registered"]
    _print_gate(reg["name"], reg["version"], reg["alias"], reg["reason"])
    h = res["heldout"]
    out.print(f"held-out tail: shift-consistent offset accuracy {_with_ci(h, 'val/shift_acc')} "
              f"over {int(h['val/units'])} pieces (per shift: "
              + ", ".join(f"{k.rsplit('shift', 1)[1]} {h[k]:.2f}" for k in h
                          if k.startswith("val/offset_acc_shift") and not k.endswith(("_low", "_high")))
              + f"), LSE-D {h['val/lse_d']:.3f}, LSE-C {h['val/lse_c']:.3f} ({res['init']})",
              soft_wrap=True)
    out.print(f"sync audit: {res['audit']['note']}", soft_wrap=True)
    out.print(f"features: {res['features']}", soft_wrap=True)
    out.print(f"report:   {res['report']['markdown']}", soft_wrap=True)


# --- remote execution: Ray Jobs API (logic in se4lip_dist.remote) ---------------------------

DashboardOpt = Annotated[
    str,
    typer.Option("--address", envvar="RAY_API_SERVER_ADDRESS",
                 help="Ray dashboard URL of the cluster (env RAY_API_SERVER_ADDRESS)."),
]


def _remote_call(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    from se4lip_dist.remote import RemoteError

    try:
        return fn(*args, **kwargs)
    except (RemoteError, ValueError) as e:
        _fail(str(e))


def _print_logs(chunk: str) -> None:
    out.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[list[str], typer.Argument(help="The se4lip-dist command to run remotely, after `--`.")],
    address: DashboardOpt = "http://127.0.0.1:8265",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the logs until the job ends.")] = True,
    working_dir: Annotated[
        str | None, typer.Option("--working-dir", help="Folder uploaded as the job's cwd (default: this checkout; '' for none).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="K=V env var for the job (repeatable; never printed).")
    ] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", help="Submission id (default: Ray's).")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Stop waiting after S seconds.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a se4lip-dist command on a Ray cluster as a job: `se4lip-dist submit -- tune --data ...`.

    Exits with the job's status (0 when it SUCCEEDED).

    Non-secret settings in this environment (MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, AWS_REGION, ...)
    go with the job; credentials never do: the cluster's nodes have their own (cluster/README.md).
    """
    from se4lip_dist.credentials import SecretInJobError, left_behind
    from se4lip_dist.remote import build_runtime_env, exit_code, submit_job

    extra = dict(kv.split("=", 1) for kv in env or [] if "=" in kv)
    if env and len(extra) != len(env):
        _fail("--env takes K=V")
    try:
        runtime_env = build_runtime_env(working_dir, env_vars=extra)
    except SecretInJobError as e:
        _fail(str(e))
    if stay := left_behind():
        console.print(f"not sent to the cluster: {', '.join(stay)} (its nodes use their own "
                      "credentials: cluster/README.md, \"Credentials\")", markup=False,
                      highlight=False)
    try:
        jid, status = _remote_call(
            submit_job, address, command, runtime_env, wait=wait, submission_id=job_id,
            stream_logs=None if as_json else _print_logs, timeout_s=timeout,
        )
    except KeyboardInterrupt:
        console.print("[yellow]stopped following; the job keeps running[/] "
                      "(`se4lip-dist jobs stop ID` stops it)")
        raise typer.Exit(130) from None
    if as_json:
        _emit_json({"job_id": jid, "status": status, "address": address})
    elif wait:
        colour = "green" if status == "SUCCEEDED" else "red"
        console.print(f"job [bold]{jid}[/] [{colour}]{status}[/]")
    else:
        console.print(f"submitted [bold]{jid}[/] ({status}); follow it with "
                      f"`se4lip-dist jobs logs --follow {jid} --address {address}`")
    if wait:
        raise typer.Exit(exit_code(status))


jobs_app = typer.Typer(no_args_is_help=True, help="List, follow and stop Ray jobs on a cluster.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(address: DashboardOpt = "http://127.0.0.1:8265", as_json: JsonOpt = False) -> None:
    """List the cluster's jobs, newest first."""
    import datetime as dt

    from se4lip_dist.remote import list_jobs

    jobs = _remote_call(list_jobs, address)
    if as_json:
        _emit_json([j.to_json() for j in jobs])
        return
    t = Table(title=f"jobs on {address}")
    for col in ("job id", "status", "started", "entrypoint"):
        t.add_column(col)
    for j in jobs:
        started = dt.datetime.fromtimestamp(j.start_time).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else ""
        t.add_row(j.job_id, j.status, started, j.entrypoint)
    out.print(t)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="Job (submission) id.")],
    address: DashboardOpt = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
) -> None:
    """Print a job's logs (with --follow: until it ends, exiting with its status)."""
    from se4lip_dist.remote import exit_code, job_logs

    result = _remote_call(job_logs, address, job_id, follow=follow, stream_logs=_print_logs)
    if follow:
        raise typer.Exit(exit_code(result))
    _print_logs(result)


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(help="Job (submission) id.")],
    address: DashboardOpt = "http://127.0.0.1:8265",
) -> None:
    """Stop a running job."""
    from se4lip_dist.remote import stop_job

    stopped = _remote_call(stop_job, address, job_id)
    console.print(f"stop requested for {job_id}" if stopped else f"{job_id} had already ended")


def main() -> None:
    """Entry point for ``se4lip-dist`` and ``python -m se4lip_dist``.

    With ``--json`` the process's fd 1 points at stderr for the rest of its life, so Ray's
    raylet warnings, Tune's reporter, every child process (they inherit fd 1) and MLflow's
    exit-time "View run" lines cannot reach stdout; only the JSON object is written to the real
    stdout (through a saved copy of fd 1). Not restored on return: atexit handlers run later.

    Commands that start Ray or MLflow point fds 1 and 2 at a log file unless --verbose
    (:func:`_quiet_ray`); an unexpected exception gives the terminal back for its traceback.
    """
    global _json_fd, _own_process
    _own_process = True
    if "--json" in sys.argv[1:]:
        sys.stdout.flush()
        _json_fd = os.dup(1)
        os.dup2(2, 1)
    try:
        app()
    except Exception:
        if _log_route is not None:
            _log_route.restore()  # an unexpected error's traceback belongs on the terminal
        raise


if __name__ == "__main__":
    sys.exit(main())
