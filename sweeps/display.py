"""The live terminal view of a sweep: progress over trials, steps of the running trial, a trial table."""

from __future__ import annotations

from typing import Any, Self

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.trial import TrialResult, TrialStatus


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trials_table(rows: list[tuple[int, dict[str, Any], str, float | None, float]], keys: list[str]) -> Table:
    """A table of trials: number, parameters, objective, state, duration."""
    table = Table(title="trials", expand=False)
    table.add_column("#", justify="right")
    for key in keys:
        table.add_column(key)
    table.add_column("objective", justify="right")
    table.add_column("state")
    table.add_column("time", justify="right")
    for number, params, state, value, seconds in rows:
        style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "FAILED": "red"}.get(state, "")
        table.add_row(
            str(number),
            *(_fmt(params.get(key, "-")) for key in keys),
            "-" if value is None else f"{value:.4f}",
            f"[{style}]{state}[/]" if style else state,
            f"{seconds:.1f}s",
        )
    return table


class LiveView:
    """Implements `SweepObserver` with rich: two progress bars and a table, redrawn in place."""

    def __init__(self, keys: list[str], console: Console | None = None):
        self.console = console or Console()
        self.keys = keys
        self.trials = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.steps = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.rows: list[tuple[int, dict[str, Any], str, float | None, float]] = []
        self._trial_task = None
        self._step_tasks: dict[int, int] = {}
        self._live: Live | None = None

    def _render(self) -> Group:
        return Group(self.trials, self.steps, trials_table(self.rows[-15:], self.keys))

    def __enter__(self) -> Self:
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def sweep_started(self, done: int, target: int) -> None:
        self._trial_task = self.trials.add_task("trials", total=target, completed=done)

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self._step_tasks[number] = self.steps.add_task(f"trial {number} steps", total=None)

    def trial_step(self, number: int, step: int, total: int) -> None:
        if number in self._step_tasks:
            self.steps.update(self._step_tasks[number], completed=step, total=total or None)

    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None:
        state = {TrialStatus.COMPLETE: "COMPLETE", TrialStatus.PRUNED: "PRUNED"}.get(result.status, "FAIL")
        self.rows.append((number, params, state, result.objective, result.timings.total_s))
        if number in self._step_tasks:
            self.steps.remove_task(self._step_tasks.pop(number))
        if result.status != TrialStatus.FAILED and self._trial_task is not None:
            self.trials.advance(self._trial_task)
        if result.status == TrialStatus.FAILED:
            self.console.print(f"[red]trial {number} failed:[/] {result.error}")
        if self._live is not None:
            self._live.update(self._render())
