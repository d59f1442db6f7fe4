"""`sweep`: run, inspect and browse hyperparameter sweeps.

Heavy imports (torch, transformers, mlflow) happen inside commands, after the config is
validated, so a typo is reported in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from core.config import SweepConfig, load_config
from core.errors import InputError
from core.store import Store
from sweeps.preflight import preflight, quiet_libraries, stop_on_signals


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """A usage error (`--trials abc`, an unknown option) as one `error:` line and exit 2, as bad input is.

    Typer would draw a box with the usage around it; scripts and logs want the one line.
    """
    try:
        yield
    except NoArgsIsHelpError:
        raise  # plain `sweep`: the help is the answer
    except UsageError as exc:
        param = getattr(exc, "param", None)
        if param is not None and getattr(param, "opts", None) and exc.message:
            where = max(param.opts, key=len)
            message = exc.message
        else:
            where, message = None, exc.format_message()
        line = f"{where}: {message}" if where else message
        err_console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


class _PlainErrors(TyperGroup):
    """The app's group: usage errors of any command are printed as one line (see above)."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


def _at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be a whole number >= 1, got {value}")
    return value


def _seconds(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number of seconds > 0, got {value}")
    return value


app = typer.Typer(
    cls=_PlainErrors, help="Find the best fine-tuning recipe for a language model.", no_args_is_help=True
)
# Rich falls back to 80 columns when stdout is not a terminal (CI logs, `| tee`), which cuts the
# trial table's parameter names; logs get room for them instead.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"

ConfigArg = Annotated[Path, typer.Argument(help="search-space YAML, e.g. search_spaces/lora.yaml")]


def _fail_input(exc: InputError) -> None:
    # escape: messages quote YAML such as `when: {method: [lora]}`, which rich would read as markup.
    err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(path: Path) -> SweepConfig:
    try:
        return load_config(path)
    except InputError as exc:
        _fail_input(exc)


def _executor(config: SweepConfig, store: Store, runner, on_ray: bool, pool, ray_address: str | None):
    """The executor factory for this invocation: Ray actors (gangs or not), gangs, the pool, or this process."""
    if on_ray:
        from sweeps.executors.ray import RayActors

        return lambda parent_id, on_step: RayActors(config, store, ray_address, on_step)
    if config.workers.gpus_per_trial > 1:
        from sweeps.executors.devices import visible_gpus
        from sweeps.executors.gang import GangExecutor, gang_devices

        gangs = gang_devices(visible_gpus(), config.workers.gpus_per_trial)
        return lambda parent_id, on_step: GangExecutor(config, store, gangs, on_step)
    if pool is not None:
        return lambda parent_id, on_step: pool.attach(on_step)
    from sweeps.executors.local import local_executor

    return lambda parent_id, on_step: local_executor(config, store, runner, on_step)


def _run(
    config: SweepConfig,
    trials: int | None,
    timeout: float | None,
    workers: int | None = None,
    backend: str | None = None,
    ray_address: str | None = None,
) -> None:
    from sweeps.executors.devices import pin_to, visible_gpus

    on_ray = (backend or config.backend) == "ray"
    gangs = config.workers.gpus_per_trial > 1
    if gangs and workers:
        _fail_input(
            config.error("workers.gpus_per_trial", "gang trials run on their own; --workers does not apply")
        )
    gpus = visible_gpus()
    count = workers or config.workers.count or max(len(gpus), 1) * config.workers.trials_per_gpu
    if not on_ray and count == 1 and gpus and not gangs:
        # Before anything starts CUDA here: this process runs the trials, on exactly one GPU.
        pin_to(gpus[0])
    store = Store.at()
    pool = None
    if not on_ray and not gangs and count > 1:
        from sweeps.executors.processes import WorkerPool

        # First thing: each worker's imports, preflight and tokenizing then overlap this process's
        # own (on two H100s the workers were ready 20 s after the loop began when started from it).
        pool = WorkerPool(config, store, count, on_step=None)
    try:
        _sweep(config, store, trials, timeout, on_ray, pool, ray_address)
    finally:
        if pool is not None and pool.on_step is None:
            # Never handed to the loop (bad input, nothing left to run): stop its processes.
            pool.close(interrupted=True)


def _sweep(
    config: SweepConfig,
    store: Store,
    trials: int | None,
    timeout: float | None,
    on_ray: bool,
    pool,
    ray_address: str | None,
) -> None:
    """`sweep run` once the workers are starting: preflight, the live view over the loop, the best trial."""
    quiet_libraries()
    from sweeps.display import LiveView
    from sweeps.executors.base import ExecutorCrashed
    from sweeps.loop import TooManyFailures, run_sweep

    try:
        if on_ray and config.workers.gpus_per_trial > 1:
            from sweeps.executors.ray import ray_gang_preflight

            runner = ray_gang_preflight(config, store, ray_address)
        else:
            runner = preflight(config, store)
    except InputError as exc:
        _fail_input(exc)
    try:
        from sweeps.study import open_storage

        # Before the live view: a damaged journal is one line, not a line under an empty table.
        open_storage(config, store)
    except InputError as exc:
        _fail_input(exc)
    stop_on_signals()
    executor = _executor(config, store, runner, on_ray, pool, ray_address)
    try:
        with LiveView(list(config.space), console) as view:
            outcome = run_sweep(config, store, executor, n_trials=trials, timeout=timeout, observer=view)
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted:[/] running trials are recorded as KILLED; run the same command to resume"
        )
        raise typer.Exit(130)
    except InputError as exc:
        _fail_input(exc)
    except TooManyFailures as exc:
        err_console.print(f"[red]sweep stopped:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1)
    except ExecutorCrashed as exc:
        err_console.print(
            f"[red]sweep crashed[/] (a bug in sweep itself; please report it):\n{exc}", soft_wrap=True
        )
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
    _refresh_report(config, store)


def _refresh_report(config: SweepConfig, store: Store) -> None:
    """Rewrite the sweep's report and its copy on the MLflow parent run; a plot error never fails the sweep."""
    from sweeps.report import write_report

    try:
        report = write_report(config, store)
    except Exception as exc:  # noqa: BLE001 - the trials are recorded; a broken picture is not worth exit 1
        err_console.print(f"[yellow]report not written:[/] {escape(str(exc))}", soft_wrap=True)
        return
    console.print(f"report: {report.index}", highlight=False, soft_wrap=True)


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
        int | None,
        typer.Option(
            help="finished trials the study should hold (default: budget.trials)", callback=_at_least_one
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="stop starting trials after this many seconds", callback=_seconds)
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="parallel worker processes (default: one per visible GPU, 1 on CPU)", callback=_at_least_one
        ),
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
        int | None, typer.Option(help="finished trials (default: the demo's budget)", callback=_at_least_one)
    ] = None,
) -> None:
    """The embedded default: a real sweep of a tiny model on small arithmetic word problems, offline, on CPU."""
    # The demo model's matmuls are too small to split across threads: on 2 cores one thread ran the sweep in
    # 25 s (30 s with another process on a core) where two took 28 s (67 s: the second OpenMP thread
    # spins at every barrier against the other process). Set before torch loads; a user's own setting wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _run(_load(DEMO_CONFIG), trials, None)
    console.print(
        f"next: open the report above, or rewrite it with: sweep report {DEMO_CONFIG}\n"
        "      browse every run in MLflow with: sweep ui  (http://127.0.0.1:5000)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def report(config: ConfigArg) -> None:
    """Write a sweep's report: plots and one self-contained HTML page (also logged to MLflow)."""
    cfg = _load(config)
    quiet_libraries()
    from sweeps.report import write_report

    try:
        written = write_report(cfg, Store.at())
    except KeyError:
        err_console.print(
            f"[red]error:[/] no study named '{cfg.name}' yet; start it with: sweep run {cfg.source}"
        )
        raise typer.Exit(2)
    for name, reason in written.skipped.items():
        console.print(f"not drawn: {name} ({reason})", highlight=False, soft_wrap=True)
    where = f"; logged on MLflow run {written.parent_run_id} under report/" if written.parent_run_id else ""
    console.print(f"report: {written.index}{where}", highlight=False, soft_wrap=True)


def _study_or_exit(config: SweepConfig):
    from sweeps.study import load_study

    try:
        return load_study(config, Store.at())
    except InputError as exc:
        _fail_input(exc)
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


def _exit_if_port_busy(host: str, port: int) -> None:
    """One line and exit 1 when `host:port` cannot be served, before any server starts."""
    busy = _port_in_use(host, port)
    if busy is not None:
        err_console.print(
            f"[red]error:[/] --port: cannot serve on {host}:{port} ({busy}); pick a free one with --port",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound (the OS's words), or None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server binds: a port left in TIME_WAIT by a stopped server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _stop_group(server: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the server and every process it started (its own process group): SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # Whatever is left of the group (the server's job runner, a server that ignored SIGTERM).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def _browsable(host: str) -> str:
    """The address a browser can open for a server bound to `host` (a wildcard means this machine)."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _experiment_link(config: SweepConfig, uri: str, host: str, port: int) -> str:
    """The line pointing at the sweep's experiment page, or saying it has none yet."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(config.experiment_name)
    if experiment is None:
        name = config.experiment_name
        return f"no MLflow experiment '{name}' yet; start it with: sweep run {config.source}"
    link = f"http://{_browsable(host)}:{port}/#/experiments/{experiment.experiment_id}"
    return f"sweep '{config.name}': {link}"


@app.command()
def ui(
    config: Annotated[Path | None, typer.Argument(help="a sweep's YAML, to use its tracking URI")] = None,
    host: Annotated[
        str, typer.Option(help="interface to bind; 127.0.0.1 keeps it private to this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 5000,
) -> None:
    """The MLflow UI over the local store (bound to 127.0.0.1 unless --host says otherwise).

    The server runs in its own process group; SIGINT or SIGTERM to `sweep ui` stops it and every
    process it started, so none is left serving after `sweep ui` is gone.
    """
    from sweeps.tracking import resolve_uri

    cfg = _load(config) if config else None
    uri = resolve_uri(cfg.tracking.uri if cfg else "sqlite:///mlruns/mlflow.db")
    _exit_if_port_busy(host, port)
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
    console.print(f"MLflow UI on http://{host}:{port} (backend {uri})", highlight=False, soft_wrap=True)
    if cfg is not None:
        console.print(_experiment_link(cfg, uri, host, port), highlight=False, soft_wrap=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, interrupt)
    server = subprocess.Popen(command, start_new_session=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        # A second signal must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = 130
    finally:
        _stop_group(server, grace_s=10.0 if server.returncode is None else 0.0)
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    raise typer.Exit(code)


@app.command()
def dashboard(
    config: ConfigArg,
    host: Annotated[
        str, typer.Option(help="interface to bind; 127.0.0.1 keeps it private to this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8080,
) -> None:
    """optuna-dashboard over the sweep's study (bound to 127.0.0.1 unless --host says otherwise)."""
    cfg = _load(config)
    try:
        import optuna_dashboard
    except ImportError:
        err_console.print(
            "[red]error:[/] optuna-dashboard is not installed; "
            "install it with: pip install 'sweep\\[dashboard]'",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    store = Store.at()
    if cfg.storage is None and not store.journal(cfg.name).is_file():
        err_console.print(
            f"[red]error:[/] no study named '{cfg.name}' yet; start it with: sweep run {cfg.source}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    _exit_if_port_busy(host, port)
    from sweeps.study import open_storage

    storage = open_storage(cfg, store)
    link = f"http://{_browsable(host)}:{port}/dashboard"
    try:
        link += f"/studies/{storage.get_study_id_from_name(cfg.name)}"
    except KeyError:
        pass  # an RDB storage without this study yet: the dashboard's study list
    console.print(
        f"Optuna dashboard of '{cfg.name}' on {link} (Ctrl-C stops it)", highlight=False, soft_wrap=True
    )

    server = _wsgi_server(host, port, optuna_dashboard.wsgi(storage))

    def interrupt(signum, frame):
        # shutdown() waits for serve_forever, which runs in this (the main) thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()
        stopped.append(signum)

    stopped: list[int] = []
    previous = signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGTERM, interrupt)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    raise typer.Exit(130 if stopped else 0)


def _wsgi_server(host: str, port: int, wsgi_app):
    """A threaded WSGI server without a log line per request; stopped cleanly by `shutdown()`."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):
            pass

    return make_server(host, port, wsgi_app, server_class=Server, handler_class=Quiet)


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
        result = promote_trial(cfg, Store.at(), trial_number=trial, export=export, output=output)
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
    table.add_row("load with mlflow.pyfunc", f"models:/{result.model_name}@champion")
    console.print(table)


# Modules whose shutdown hooks a normal exit must run: Ray's session, vLLM's engine processes, and
# the worker pool's multiprocessing queues (skipping their teardown warns of leaked semaphores).
_NEEDS_NORMAL_EXIT = ("ray", "vllm", "sweeps.executors.processes")


def main() -> None:
    """The `sweep` command: the app, then an exit that skips tearing the interpreter down.

    Everything a command writes is on disk when it returns (MLflow and Optuna commit each record,
    and nothing here logs to MLflow asynchronously; temporary folders are context-managed). What a
    normal exit adds is the teardown of every module torch, transformers and MLflow loaded:
    measured at 2-3.5 s of a sweep's wall on 2 cores, paid after the last line is printed. Where
    Ray, vLLM or the worker pool was loaded, their shutdown hooks need the normal exit.
    """
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if any(name in sys.modules for name in _NEEDS_NORMAL_EXIT) or not isinstance(code, (int, type(None))):
        sys.exit(code)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        # `sweep status | head`: the reader is gone, which a normal exit would not report either.
        code = code or 120
    os._exit(code or 0)


if __name__ == "__main__":
    main()
