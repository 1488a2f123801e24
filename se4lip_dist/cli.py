"""The ``se4lip-dist`` command line: parse, build a config, call one ``run_*``, render with rich.

No logic lives here: every command hands a resolved :class:`~se4lip_dist.config.Config` to the
module that owns the stage, and turns its result (or its error) into output and an exit status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from se4lip_dist.config import Config, ConfigError, list_presets, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prepare, train, tune, extract and evaluate SE4Lip lip-sync speech encoders on Ray.",
)
console = Console(stderr=True)
out = Console()

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


def _config(preset: str, config: Path | None, sets: list[str] | None, extra: list[str]) -> Config:
    try:
        return load_config(preset, config, [*(sets or []), *extra])
    except ConfigError as e:
        _fail(f"config: {e}")
        raise  # unreachable; keeps type checkers calm


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
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
    inputs: Annotated[list[str], typer.Argument(help="Videos, folders of videos, or CSV/JSONL manifests.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Shard folder (resumes if it exists).")],
    preset: PresetOpt = "paper",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    insightface_root: Annotated[
        Path | None,
        typer.Option("--insightface-root", help="InsightFace model root holding models/<pack>/."),
    ] = None,
    face_backend: Annotated[
        str | None, typer.Option("--face-backend", help="insightface | none (fixed box).")
    ] = None,
    detect_every: Annotated[
        int | None, typer.Option("--detect-every", help="Run face detection on every k-th frame.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Parallel clip workers (0: no Ray, in-process).")
    ] = None,
    address: AddressOpt = None,
    preview: Annotated[
        Path | None, typer.Option("--preview", help="Write a PNG contact sheet of lip crops per clip here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn talking-head videos into Parquet shards of aligned lip crops and audio."""
    from se4lip_dist.prepare import PrepareError, run_prepare

    extra = []
    if insightface_root is not None:
        extra.append(f"face.insightface_root={insightface_root.resolve()}")
    if face_backend is not None:
        extra.append(f"face.backend={face_backend}")
    if detect_every is not None:
        extra.append(f"face.detect_every={detect_every}")
    cfg = _config(preset, config, set_, extra)

    progress = Progress(
        TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console,
        disable=as_json,
    )
    task = progress.add_task("prepare", total=None, status="")
    n_failed = 0

    def on_result(res) -> None:  # type: ignore[no-untyped-def]
        nonlocal n_failed
        if res.failure:
            n_failed += 1
            progress.console.print(f"[red]failed[/] {res.failure.error}")
        progress.update(task, advance=1, status=f"{n_failed} failed" if n_failed else "")

    with progress:
        try:
            summary = run_prepare(
                inputs, out_dir, cfg, workers=workers, address=address, preview_dir=preview,
                on_start=lambda n: progress.update(task, total=n), on_result=on_result,
            )
        except PrepareError as e:
            _fail(str(e))
    if as_json:
        out.print_json(json.dumps(summary.to_json()))
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
    if summary.video_seconds:
        t.add_row("shard bytes / video minute", f"{summary.bytes_per_video_minute / 1e6:.2f} MB")
    t.add_row("folder total", f"{summary.total_clips} clips, {summary.total_frames:,} frames")
    out.print(t)
    for d in summary.duplicates:
        out.print(f"[yellow]duplicate skipped:[/] {d}")
    if summary.failures:
        ft = Table(title="failures (also in failures.jsonl)")
        ft.add_column("input")
        ft.add_column("stage")
        ft.add_column("error")
        for f in summary.failures:
            ft.add_row(f.input, f.stage, f.error)
        out.print(ft)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Shard folder written by `prepare`.")],
    preset: PresetOpt = "cpu-small",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Ray Train workers.")] = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Train the speech and lip encoders with Ray Train, tracked in MLflow."""
    from se4lip_dist.train import run_train

    extra = []
    if epochs is not None:
        extra.append(f"train.epochs={epochs}")
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    if num_workers is not None:
        extra.append(f"train.num_workers={num_workers}")
    cfg = _config(preset, config, set_, extra)
    try:
        result = run_train(
            cfg, str(data), tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
            register=register, resume=resume, use_gpu=use_gpu, address=address,
            storage_path=storage_path,
        )
    except (ValueError, RuntimeError, FileNotFoundError, ConnectionError) as e:
        _fail(str(e))
    if as_json:
        out.print_json(json.dumps(result, default=str))
    else:
        t = Table(title="train", show_header=False)
        for k, v in result.items():
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        out.print(t)


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

    MLflow and S3 credentials in this environment (MLFLOW_TRACKING_*, AWS_*) are passed to the job.
    """
    from se4lip_dist.remote import build_runtime_env, exit_code, submit_job

    extra = dict(kv.split("=", 1) for kv in env or [] if "=" in kv)
    if env and len(extra) != len(env):
        _fail("--env takes K=V")
    runtime_env = build_runtime_env(working_dir, env_vars=extra)
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
        out.print_json(json.dumps({"job_id": jid, "status": status, "address": address}))
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
        out.print_json(json.dumps([j.to_json() for j in jobs]))
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
    """Entry point for ``python -m se4lip_dist``."""
    app()


if __name__ == "__main__":
    sys.exit(main())
