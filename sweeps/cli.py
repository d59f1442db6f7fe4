"""`sweep`: run, inspect and browse hyperparameter sweeps.

Heavy imports (torch, transformers, mlflow) happen inside commands, after the config is
validated, so a typo is reported in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sweeps.config import SweepConfig, load_config
from sweeps.errors import InputError

app = typer.Typer(help="Find the best fine-tuning recipe for a language model.", no_args_is_help=True)
console = Console()
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


def _quiet_libraries() -> None:
    """Keep the live view readable: libraries' own progress bars and info logs off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import mlflow  # noqa: F401  (it configures its loggers on import; quiet them after)
    import optuna
    import transformers

    for name in ("alembic", "mlflow", "optuna", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def preflight(config: SweepConfig):
    """Everything that can be checked before a weight is loaded: model source, QLoRA, data rows.

    Returns the prepared `TrialRunner` so the tokenized data and tokenizer are reused by trials.
    """
    from runners.models import check_model_source, qlora_unavailable_reason
    from runners.sft import TrialRunner

    method = config.space.get("method")
    wants_qlora = config.training.get("method") == "qlora" or (
        method is not None and "qlora" in getattr(method, "choices", [])
    )
    reason = qlora_unavailable_reason() if wants_qlora else None
    if reason:
        field = "training.method" if config.training.get("method") == "qlora" else "space.method.choices"
        raise InputError(config.source, f"{reason}; remove qlora or run on a GPU", field)
    check_model_source(config.model, config.source)
    runner = TrialRunner(config, cache_dir=Path("mlruns") / "cache" / "tokenized")
    runner.prepare()
    return runner


def _install_sigterm() -> None:
    """SIGTERM stops a sweep the way Ctrl-C does: running trial KILLED, nothing finished lost."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _run(config: SweepConfig, trials: int | None, timeout: float | None) -> None:
    _quiet_libraries()
    from sweeps.display import LiveView
    from sweeps.study import TooManyFailures, run_sweep

    try:
        runner = preflight(config)
    except InputError as exc:
        _fail_input(exc)
    _install_sigterm()
    keys = list(config.space)
    try:
        with LiveView(keys, console) as view:
            outcome = run_sweep(config, runner, n_trials=trials, timeout=timeout, observer=view)
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted:[/] the running trial is recorded as KILLED; run the same command to resume"
        )
        raise typer.Exit(130)
    except TooManyFailures as exc:
        err_console.print(f"[red]sweep stopped:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1)
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
    table.add_row(f"objective ({config.objective.name}, {config.direction})", f"{best.value:.6g}")
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
) -> None:
    """Run (or resume) a sweep until the study holds N finished trials."""
    _run(_load(config), trials, timeout)


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
    _quiet_libraries()
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
        rows.append((trial.number, trial.params, trial.state.name, trial.value, seconds))
    console.print(trials_table(rows, list(cfg.space)))


@app.command()
def best(config: ConfigArg) -> None:
    """The best trial of a sweep: its objective, parameters and where its adapter is."""
    cfg = _load(config)
    _quiet_libraries()
    from sweeps.study import best_trial

    _print_best(cfg, best_trial(_study_or_exit(cfg)))


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


if __name__ == "__main__":
    app()
