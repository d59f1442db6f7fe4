"""The picture of a sweep: PNG plots and one self-contained HTML page, also logged to MLflow.

`write_report` reads the Optuna study (values, parameters, states) and the sweep's MLflow runs
(train-loss curves, peak memory, times) and writes to `mlruns/reports/<name>/`:

- `history.png`       objective by trial with the best-so-far line (Optuna)
- `importances.png`   parameter importances, fANOVA (Optuna)
- `parallel.png`      parallel coordinates of every parameter against the objective (Optuna)
- `slice.png`         objective against each of the most important parameters (Optuna)
- `loss_curves.png`   every trial's train loss by step, pruned trials dashed (matplotlib)
- `memory.png`        objective against peak memory; the Pareto front when the study is
                      multi-objective (Optuna)
- `index.html`        all of the above embedded as base64, the top trials and every trial in tables

The page has no scripts and loads nothing: it opens from disk, from an MLflow artifact view or
an e-mail attachment alike. The same files are logged under `report/` of the sweep's parent run.
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

# No display on servers and CI; Agg renders PNGs without one (and without a GUI toolkit).
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import optuna
from optuna.trial import TrialState

from core.config import SweepConfig
from core.store import Store

# How many trials the "top trials" table shows, and how many parameters get a slice plot.
TOP_TRIALS = 10
SLICE_PARAMS = 4
FIGURE_DPI = 110


@dataclass
class TrialRecord:
    """One trial as the report shows it: Optuna's view joined with its MLflow child run."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    peak_memory_mb: float | None = None
    seconds: float | None = None
    run_id: str | None = None
    loss_steps: list[int] = field(default_factory=list)
    loss_values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """Where a report was written, and what could not be drawn (with why)."""

    folder: Path
    index: Path
    images: dict[str, Path]
    skipped: dict[str, str]
    parent_run_id: str | None


def _primary_view(study: optuna.Study) -> optuna.Study:
    """A single-objective in-memory copy of `study` holding its first objective only.

    Optuna draws the best-so-far line and computes importances for single-objective studies only;
    a sweep that also minimises peak memory still wants both for its main objective.
    """
    if len(study.directions) == 1:
        return study
    view = optuna.create_study(direction=study.directions[0], study_name=study.study_name)
    for trial in study.get_trials(deepcopy=False):
        values = trial.values
        view.add_trial(
            optuna.trial.create_trial(
                state=trial.state,
                value=values[0] if values and trial.state == TrialState.COMPLETE else None,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=trial.user_attrs,
                intermediate_values=trial.intermediate_values,
            )
        )
    return view


def _mlflow_records(config: SweepConfig) -> tuple[str | None, dict[int, dict[str, Any]]]:
    """The parent run id and, per trial number, its child run's id, metrics and train-loss curve."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import resolve_uri

    client = MlflowClient(tracking_uri=resolve_uri(config.tracking.uri))
    experiment = client.get_experiment_by_name(config.experiment_name)
    if experiment is None:
        return None, {}
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`sweep.study` = '{config.name}' and tags.`sweep.role` = 'parent'",
        max_results=1,
    )
    if not parents:
        return None, {}
    parent_id = parents[0].info.run_id
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        max_results=10_000,
    )
    records: dict[int, dict[str, Any]] = {}
    for child in children:
        number = child.data.tags.get("optuna.trial_number")
        if number is None:
            continue
        curve = sorted(
            client.get_metric_history(child.info.run_id, "train_loss"), key=lambda m: (m.step, m.timestamp)
        )
        # A retried trial can own several runs; the newest one is the trial's record.
        previous = records.get(int(number))
        if previous is not None and previous["start_time"] >= child.info.start_time:
            continue
        records[int(number)] = {
            "run_id": child.info.run_id,
            "start_time": child.info.start_time,
            "metrics": dict(child.data.metrics),
            "loss_steps": [m.step for m in curve],
            "loss_values": [m.value for m in curve],
        }
    return parent_id, records


def collect_trials(study: optuna.Study, mlflow_records: dict[int, dict[str, Any]]) -> list[TrialRecord]:
    """Every trial of the study, in trial order, with what MLflow holds about it."""
    multi = len(study.directions) > 1
    records = []
    for trial in study.get_trials(deepcopy=False):
        found = mlflow_records.get(trial.number, {})
        metrics = found.get("metrics", {})
        memory = trial.values[1] if multi and trial.values else metrics.get("peak_memory_mb")
        records.append(
            TrialRecord(
                number=trial.number,
                state=trial.state.name,
                value=trial.values[0] if trial.values else None,
                params=dict(trial.params),
                peak_memory_mb=memory,
                seconds=trial.duration.total_seconds() if trial.duration else None,
                run_id=found.get("run_id"),
                loss_steps=found.get("loss_steps", []),
                loss_values=found.get("loss_values", []),
            )
        )
    return records


def _save(axes_or_figure: Any, path: Path) -> Path:
    figure = axes_or_figure if isinstance(axes_or_figure, plt.Figure) else _figure_of(axes_or_figure)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def _figure_of(axes: Any) -> plt.Figure:
    # Optuna returns one Axes, or an array of them (slice plots) that share a figure.
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.get_figure()


def _loss_curves(records: list[TrialRecord], path: Path) -> Path:
    """Every trial's train_loss by step on one axes; pruned trials dashed and ended with an x."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab10")
    for index, record in enumerate(r for r in records if r.loss_steps):
        pruned = record.state == "PRUNED"
        colour = colours(index % 10)
        label = f"trial {record.number}" + (" (pruned)" if pruned else "")
        axes.plot(
            record.loss_steps,
            record.loss_values,
            linestyle="--" if pruned else "-",
            color=colour,
            label=label,
        )
        if pruned:
            axes.plot(record.loss_steps[-1], record.loss_values[-1], marker="x", markersize=9, color=colour)
    axes.set_xlabel("step")
    axes.set_ylabel("train loss")
    axes.set_title("Train loss of every trial (pruned: dashed, x where stopped)")
    if axes.lines:
        axes.legend(fontsize="small", ncol=2)
    return _save(figure, path)


def _memory_plot(study: optuna.Study, records: list[TrialRecord], objective: str, path: Path) -> Path:
    """Objective against peak memory: Optuna's Pareto front for a multi-objective study, else a scatter."""
    if len(study.directions) > 1:
        axes = optuna.visualization.matplotlib.plot_pareto_front(
            study, target_names=[objective, "peak memory (MB)"]
        )
        return _save(axes, path)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    shown = [
        r for r in records if r.state == "COMPLETE" and r.value is not None and r.peak_memory_mb is not None
    ]
    axes.scatter([r.peak_memory_mb for r in shown], [r.value for r in shown], color="tab:blue")
    for record in shown:
        axes.annotate(f"#{record.number}", (record.peak_memory_mb, record.value), fontsize="small")
    axes.set_xlabel("peak memory (MB)")
    axes.set_ylabel(objective)
    axes.set_title(f"{objective} against peak memory (complete trials)")
    return _save(figure, path)


def _top_params(view: optuna.Study, importances: dict[str, float] | None) -> list[str]:
    if importances:
        return list(importances)[:SLICE_PARAMS]
    names: list[str] = []
    for trial in view.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        names += [name for name in trial.params if name not in names]
    return names[:SLICE_PARAMS]


def _draw(name: str, draw: Callable[[], Path], images: dict[str, Path], skipped: dict[str, str]) -> None:
    """Draw one plot; a plot Optuna cannot make yet (too few trials) is skipped with its reason."""
    try:
        with warnings.catch_warnings():
            # Optuna marks its matplotlib backend experimental on every call.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            images[name] = draw()
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        plt.close("all")
        skipped[name] = str(exc) or type(exc).__name__


def _importance_evaluator() -> optuna.importance.FanovaImportanceEvaluator:
    """fANOVA, seeded, fitted on every complete trial; a fresh one per call, so two calls agree.

    Not Optuna 5's default, PED-ANOVA: it compares the top 10% of trials with the rest, which in a
    sweep of tens of trials is the best one or two, and there a categorical parameter such as the
    method cannot stand out against a continuous one.
    """
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def write_plots(
    study: optuna.Study, records: list[TrialRecord], objective: str, folder: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """The report's PNGs in `folder`; returns those drawn and, for the rest, why not."""
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    view = _primary_view(study)
    images: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    complete = view.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importances: dict[str, float] | None = None
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(view, evaluator=_importance_evaluator())
        except (ValueError, RuntimeError) as exc:
            skipped["importances"] = str(exc)
    _draw(
        "history",
        lambda: _save(ovm.plot_optimization_history(view, target_name=objective), folder / "history.png"),
        images,
        skipped,
    )
    if importances:
        _draw(
            "importances",
            lambda: _save(
                ovm.plot_param_importances(view, evaluator=_importance_evaluator(), target_name=objective),
                folder / "importances.png",
            ),
            images,
            skipped,
        )
    elif "importances" not in skipped:
        skipped["importances"] = "needs at least 2 complete trials with parameters"
    _draw(
        "parallel",
        lambda: _save(ovm.plot_parallel_coordinate(view, target_name=objective), folder / "parallel.png"),
        images,
        skipped,
    )
    top = _top_params(view, importances)
    if top and complete:
        _draw(
            "slice",
            lambda: _save(ovm.plot_slice(view, params=top, target_name=objective), folder / "slice.png"),
            images,
            skipped,
        )
    else:
        skipped["slice"] = "needs a complete trial with parameters"
    _draw("loss_curves", lambda: _loss_curves(records, folder / "loss_curves.png"), images, skipped)
    _draw("memory", lambda: _memory_plot(study, records, objective, folder / "memory.png"), images, skipped)
    return images, skipped


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _trial_table(records: list[TrialRecord], params: list[str], objective: str) -> str:
    head = ["trial", "state", objective, "peak memory MB", "seconds", *params]
    rows = []
    for record in records:
        cells = [
            f"trial-{record.number}",
            record.state,
            _number(record.value),
            _number(record.peak_memory_mb, 5),
            _number(record.seconds, 3),
            *(_format_param(record.params.get(name)) for name in params),
        ]
        css = f' class="{record.state.lower()}"'
        rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(name)}</th>" for name in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _format_param(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


_TITLES = {
    "history": "Optimisation history (best so far as a line)",
    "importances": "Parameter importances (fANOVA)",
    "parallel": "Parallel coordinates",
    "slice": "Slices of the most important parameters",
    "loss_curves": "Train loss of every trial",
    "memory": "Objective against peak memory",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; } tr.pruned td { color: #8a6d00; } tr.fail td { color: #b00020; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.skipped { color: #666; font-style: italic; }
"""


def render_html(
    config: SweepConfig,
    records: list[TrialRecord],
    images: dict[str, Path],
    skipped: dict[str, str],
) -> str:
    """The report page: every image inlined as base64, so the one file is the whole report."""
    objective = config.objective.name
    params = list(config.space)
    sign = 1 if config.direction == "minimize" else -1
    scored = [r for r in records if r.state == "COMPLETE" and r.value is not None]
    top = sorted(scored, key=lambda r: sign * r.value)[:TOP_TRIALS]
    counts = {
        state: sum(r.state == state for r in records) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
    }
    best = top[0] if top else None
    summary = ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)
    best_line = (
        f"best: trial-{best.number}, {html.escape(objective)} = {_number(best.value)} ({config.direction}d)"
        if best
        else "no complete trial yet"
    )
    figures = []
    for name, title in _TITLES.items():
        if name in images:
            data = base64.b64encode(images[name].read_bytes()).decode("ascii")
            figures.append(
                f"<figure><figcaption><h2>{title}</h2></figcaption>"
                f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>'
            )
        else:
            reason = html.escape(skipped.get(name, "not drawn"))
            figures.append(f'<h2>{title}</h2><p class="skipped">not drawn: {reason}</p>')
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>sweep report: {html.escape(config.name)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>Sweep report: {html.escape(config.name)}</h1>
<p class="meta">{len(records)} trials ({summary or "none"}); {best_line}; objective {html.escape(objective)}
({config.direction}); written {when}</p>
<h2>Top trials</h2>
{_trial_table(top, params, objective)}
{"".join(figures)}
<h2>Every trial</h2>
{_trial_table(records, params, objective)}
</body></html>
"""


def write_report(config: SweepConfig, store: Store, log_to_mlflow: bool = True) -> Report:
    """Write the report of `config`'s sweep to `store.reports/<name>/` and log it on the parent run.

    Raises KeyError when the sweep has no study yet.
    """
    from sweeps.study import load_study

    study = load_study(config, store)
    parent_id, mlflow_records = _mlflow_records(config)
    records = collect_trials(study, mlflow_records)
    folder = store.reports / config.name
    images, skipped = write_plots(study, records, config.objective.name, folder)
    index = folder / "index.html"
    index.write_text(render_html(config, records, images, skipped), encoding="utf-8")
    if log_to_mlflow and parent_id is not None:
        from mlflow.tracking import MlflowClient

        from sweeps.tracking import resolve_uri

        client = MlflowClient(tracking_uri=resolve_uri(config.tracking.uri))
        # Logging again overwrites the same paths, so the parent run always holds the latest report.
        client.log_artifacts(parent_id, str(folder), "report")
    return Report(folder, index, images, skipped, parent_id)
