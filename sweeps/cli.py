"""`sweep`: run, inspect and browse hyperparameter sweeps.

Heavy imports (torch, transformers, mlflow) happen inside commands, after the config is
validated, so a typo is reported in a fraction of a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.config import SweepConfig, load_config
from core.errors import InputError
from sweeps.preflight import preflight, quiet_libraries, stop_on_signals

app = typer.Typer(help="Find the best fine-tuning recipe for a language model.", no_args_is_help=True)
# Rich falls back to 80 columns when stdout is not a terminal (CI logs, `| tee`), which cuts the
# trial table's parameter names; logs get room for them instead.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"

ConfigArg = Annotated[Path, typer.Argument(help="search-space YAML, e.g. search_spaces/lora.yaml")]


def _fail_input(exc: InputError) -> None:
    err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(path: Path) -> SweepConfig:
    try:
        return load_config(path)
    except InputError as exc:
        _fail_input(exc)


def _run(
    config: SweepConfig,
    trials: int | None,
    timeout: float | None,
    workers: int | None = None,
    backend: str | None = None,
    ray_address: str | None = None,
) -> None:
    quiet_libraries()
    from sweeps.display import LiveView
    from sweeps.study import TooManyFailures, run_sweep
    from sweeps.workers import default_worker_count, run_workers

    try:
        runner = preflight(config)
    except InputError as exc:
        _fail_input(exc)
    stop_on_signals()
    keys = list(config.space)
    try:
        with LiveView(keys, console) as view:
            n_workers = workers or default_worker_count(config)
            if (backend or config.backend) == "ray":
                from sweeps.ray_backend import run_ray

                outcome = run_ray(
                    config, n_trials=trials, timeout=timeout, address=ray_address, observer=view
                )
            elif n_workers == 1:
                outcome = run_sweep(config, runner, n_trials=trials, timeout=timeout, observer=view)
            else:
                outcome = run_workers(config, n_workers, n_trials=trials, timeout=timeout, observer=view)
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted:[/] the running trial is recorded as KILLED; run the same command to resume"
        )
        raise typer.Exit(130)
    except TooManyFailures as exc:
        err_console.print(f"[red]sweep stopped:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1)
    console.print()
    if outcome.already_done:
        console.print(
            f"study '{config.name}' already has {outcome.finished}/{outcome.target} finished trials; nothing to run"
        )
    elif outcome.timed_out:
        console.print(
            f"timeout reached with {outcome.finished}/{outcome.target} finished trials; run again to continue"
        )
    _print_best(config, outcome.best)


def _print_best(config: SweepConfig, best) -> None:
    if best is None:
        console.print("no complete trial yet")
        return
    table = Table(title=f"best trial of '{config.name}': #{best.number}", show_header=False)
    table.add_row(f"objective ({config.objective.name}, {config.direction})", f"{best.values[0]:.6g}")
    for key, value in best.params.items():
        table.add_row(key, str(value))
    table.add_row("adapter", best.user_attrs.get("adapter_uri", "-"))
    table.add_row("mlflow run", best.user_attrs.get("mlflow_run_id", "-"))
    console.print(table)


@app.command()
def run(
    config: ConfigArg,
    trials: Annotated[
        int | None, typer.Option(help="finished trials the study should hold (default: budget.trials)", min=1)
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="stop starting trials after this many seconds")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="parallel worker processes (default: one per visible GPU, 1 on CPU)", min=1),
    ] = None,
    backend: Annotated[str | None, typer.Option(help="local | ray (default: the config's backend)")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address, e.g. auto or ray://head:10001")
    ] = None,
) -> None:
    """Run (or resume) a sweep until the study holds N finished trials."""
    if backend not in (None, "local", "ray"):
        err_console.print(f"[red]error:[/] --backend: unknown backend {backend!r}; allowed: local, ray")
        raise typer.Exit(2)
    _run(_load(config), trials, timeout, workers, backend, ray_address)


@app.command()
def demo(
    trials: Annotated[
        int | None, typer.Option(help="finished trials (default: the demo's budget)", min=1)
    ] = None,
) -> None:
    """The embedded default: a real sweep of a tiny model on a sorting task, offline, on CPU."""
    _run(_load(DEMO_CONFIG), trials, None)


def _study_or_exit(config: SweepConfig):
    from sweeps.study import load_study

    try:
        return load_study(config)
    except KeyError:
        err_console.print(
            f"[red]error:[/] no study named '{config.name}' yet; start it with: sweep run {config.source}"
        )
        raise typer.Exit(2)


@app.command()
def status(config: ConfigArg) -> None:
    """Where a sweep stands: trial counts and a table of trials."""
    cfg = _load(config)
    quiet_libraries()
    from sweeps.display import trials_table
    from sweeps.study import count_states

    study = _study_or_exit(cfg)
    counts = count_states(study)
    console.print(
        f"study '{cfg.name}': {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
        f"{counts['FAIL']} failed, {counts['RUNNING']} running; budget {cfg.budget.trials}"
    )
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        value = trial.values[0] if trial.values else None
        rows.append((trial.number, trial.params, trial.state.name, value, seconds))
    console.print(trials_table(rows, list(cfg.space)))


@app.command()
def best(config: ConfigArg) -> None:
    """The best trial of a sweep: its objective, parameters and where its adapter is."""
    cfg = _load(config)
    quiet_libraries()
    from sweeps.study import best_trial

    study = _study_or_exit(cfg)
    _print_best(cfg, best_trial(study))
    if cfg.objective.minimize_peak_memory:
        _print_pareto_front(cfg, study.best_trials)


def _print_pareto_front(config: SweepConfig, front) -> None:
    table = Table(title="Pareto front: no other trial is better on both")
    table.add_column("#", justify="right")
    table.add_column(f"{config.objective.name} ({config.direction})", justify="right")
    table.add_column("peak memory MB", justify="right")
    for key in config.space:
        table.add_column(key)
    for trial in sorted(front, key=lambda t: t.values[1]):
        table.add_row(
            str(trial.number),
            f"{trial.values[0]:.6g}",
            f"{trial.values[1]:.0f}",
            *(str(trial.params.get(key, "-")) for key in config.space),
        )
    console.print(table)


@app.command()
def ui(
    config: Annotated[Path | None, typer.Argument(help="a sweep's YAML, to use its tracking URI")] = None,
    host: Annotated[
        str, typer.Option(help="interface to bind; 127.0.0.1 keeps it private to this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 5000,
) -> None:
    """The MLflow UI over the local store (bound to 127.0.0.1 unless --host says otherwise)."""
    from sweeps.tracking import resolve_uri

    uri = resolve_uri(_load(config).tracking.uri if config else "sqlite:///mlruns/mlflow.db")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    console.print(f"MLflow UI on http://{host}:{port} (backend {uri})")
    raise typer.Exit(subprocess.call(command))


@app.command()
def promote(
    config: ConfigArg,
    trial: Annotated[
        int | None, typer.Option(help="trial number to promote (default: the best complete trial)", min=0)
    ] = None,
    export: Annotated[
        str | None,
        typer.Option(
            help="also write a quantized copy: gptq (4-bit, group size 128; needs CUDA and llmcompressor)"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="folder for the merged model (default: mlruns/promoted/<sweep>/trial-<N>)"),
    ] = None,
) -> None:
    """Merge a trial's adapter into its base, check it, optionally export GPTQ, register it as champion."""
    cfg = _load(config)
    quiet_libraries()
    from sweeps.promote import MergeMismatch
    from sweeps.promote import promote as promote_trial

    try:
        result = promote_trial(cfg, trial_number=trial, export=export, output=output)
    except InputError as exc:
        _fail_input(exc)
    except MergeMismatch as exc:
        err_console.print(f"[red]promotion failed:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    table = Table(title=f"promoted trial #{result.trial} of '{cfg.name}'", show_header=False)
    table.add_row(f"trial objective ({cfg.objective.name})", f"{result.trial_value:.6g}")
    table.add_row(f"merged objective ({result.dtype})", f"{result.merged_objective:.6g}")
    if result.merge_error is not None:
        table.add_row("merge check (max rel. logit error)", f"{result.merge_error:.3g}")
    table.add_row("merged model", f"{result.merged_dir} ({result.merged_bytes / 2**20:.1f} MiB)")
    if result.gptq_dir is not None:
        table.add_row("gptq export", f"{result.gptq_dir} ({result.gptq_bytes / 2**20:.1f} MiB)")
        table.add_row("gptq objective (delta)", f"{result.gptq_objective:.6g} ({result.gptq_delta:+.4g})")
    table.add_row("registered", f"{result.model_name} version {result.version} (alias champion)")
    console.print(table)


if __name__ == "__main__":
    app()
