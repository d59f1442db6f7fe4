"""MLflow records: one parent run a sweep, one nested child run a trial.

Runs are driven through `MlflowClient` with explicit run ids rather than the fluent
`mlflow.start_run` stack, so every run's status is set exactly once, by us: FINISHED, FAILED or
KILLED, never left RUNNING.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from core.config import SweepConfig
from core.trial import TrialParams, TrialResult

_BATCH = 200


def resolve_uri(uri: str) -> str:
    """A tracking URI with a relative SQLite path made absolute against the working directory.

    MLflow caches one store per URI string for the life of the process, so a relative
    `sqlite:///mlruns/mlflow.db` would keep pointing at the first project used.
    """
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SweepTracker:
    """Writes a sweep and its trials to MLflow; reopens the same parent run when a sweep resumes."""

    def __init__(self, config: SweepConfig):
        self.config = config
        self.client = MlflowClient(tracking_uri=resolve_uri(config.tracking.uri))
        self.experiment_id = self._experiment()
        self.parent_id: str | None = None
        self._pending: dict[str, list[Metric]] = {}

    def _experiment(self) -> str:
        name = self.config.experiment_name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = Path(self.config.tracking.artifact_location).resolve()
        location.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(name, artifact_location=location.as_uri())

    def find_parent(self) -> str | None:
        """The parent run of this sweep from an earlier invocation, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`sweep.study` = '{self.config.name}' and tags.`sweep.role` = 'parent'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def open_sweep(self) -> str:
        """Start the sweep's parent run, or reopen it when the sweep resumes."""
        existing = self.find_parent()
        if existing is not None:
            self.parent_id = existing
            self.client.update_run(existing, status="RUNNING")
            return existing
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"sweep-{self.config.name}",
            tags={"sweep.study": self.config.name, "sweep.role": "parent"},
        )
        self.parent_id = run.info.run_id
        cfg = self.config
        params = {
            "model": cfg.model.name_or_path,
            "objective": cfg.objective.name,
            "direction": cfg.direction,
            "sampler": cfg.sampler.type,
            "pruner": cfg.pruner.type,
            "budget.trials": cfg.budget.trials,
            "space": ",".join(cfg.space),
            **{f"fixed.{key}": value for key, value in cfg.fixed_params().items()},
        }
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in params.items()])
        if cfg.source.is_file():
            self.client.log_artifact(self.parent_id, str(cfg.source), "config")
        return self.parent_id

    def close_stale_children(
        self, keep: set[str], reason: str = "the process running this trial died"
    ) -> int:
        """Close child runs left RUNNING by a dead process, as KILLED; returns how many.

        `keep` holds the runs of trials still running in a live process (another `sweep run` of
        the same sweep), which are left alone.
        """
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and attributes.status = 'RUNNING'",
        )
        closed = 0
        for run in stale:
            if run.info.run_id in keep:
                continue
            self.kill_trial(run.info.run_id, reason)
            closed += 1
        return closed

    def start_trial(self, number: int, params: TrialParams, sampled: dict[str, Any]) -> str:
        """Open the child run of trial `number` with every parameter it trains with."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                "mlflow.parentRunId": self.parent_id,
                "sweep.study": self.config.name,
                "sweep.role": "trial",
                "optuna.trial_number": str(number),
                "optuna.state": "RUNNING",
                "sweep.sampled": ",".join(sampled),
            },
        )
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.model_dump().items()])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue step metrics (the loss curve); written in batches, not one request a step."""
        now = int(time.time() * 1000)
        pending = self._pending.setdefault(run_id, [])
        pending.extend(Metric(key, value, now, step) for key, value in metrics.items())
        if len(pending) >= _BATCH:
            self.flush(run_id)

    def flush(self, run_id: str) -> None:
        for chunk in _chunks(self._pending.pop(run_id, []), 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def end_trial(self, run_id: str, result: TrialResult) -> str | None:
        """Log the result, attach the adapter (or the traceback), close the run; returns the adapter's URI."""
        self.flush(run_id)
        now = int(time.time() * 1000)
        summary: dict[str, float] = {
            **result.metrics,
            "time_load_s": result.timings.load_s,
            "time_train_s": result.timings.train_s,
            "time_eval_s": result.timings.eval_s,
            "time_total_s": result.timings.total_s,
            "train_tokens": float(result.train_tokens),
            "train_tokens_per_s": result.train_tokens_per_s,
        }
        if result.objective is not None:
            summary["objective"] = result.objective
        if result.peak_memory_mb is not None:
            summary["peak_memory_mb"] = result.peak_memory_mb
        tags = [RunTag("optuna.state", result.status.optuna_state), RunTag("sweep.status", result.status.value)]
        if result.memory_kind:
            tags.append(RunTag("peak_memory_kind", result.memory_kind))
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()], tags=tags
        )
        if result.traceback:
            self.client.log_text(run_id, result.traceback, "error.txt")
        adapter_uri = None
        if result.adapter_path and self.config.tracking.log_adapter:
            local = Path(result.adapter_path)
            self.client.log_artifacts(run_id, str(local), local.name)
            adapter_uri = f"{self.client.get_run(run_id).info.artifact_uri}/{local.name}"
            shutil.rmtree(local, ignore_errors=True)
        self.client.set_terminated(run_id, status=result.status.mlflow_status)
        return adapter_uri

    def attach(self, parent_id: str) -> None:
        """Write trials under a parent run opened by another process (the orchestrator)."""
        self.parent_id = parent_id

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a trial's run as FAILED from outside its process (its worker died)."""
        self.client.set_tag(run_id, "optuna.state", "FAIL")
        self.client.set_tag(run_id, "error", reason)
        self.client.set_terminated(run_id, status="FAILED")

    def kill_trial(self, run_id: str, reason: str) -> None:
        """Close a trial's run as KILLED (interrupted), keeping the curve it logged so far."""
        self.flush(run_id)
        self.client.set_tag(run_id, "optuna.state", "FAIL")
        self.client.set_tag(run_id, "error", reason)
        self.client.set_terminated(run_id, status="KILLED")

    def summarise(
        self, counts: dict[str, int], best: dict[str, Any] | None, extra: dict[str, float] | None = None
    ) -> None:
        """Record the sweep's standing on the parent run: counts, best value and params."""
        now = int(time.time() * 1000)
        metrics = [Metric(f"n_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
        metrics += [Metric(key, float(value), now, 0) for key, value in (extra or {}).items()]
        tags = []
        if best is not None:
            metrics.append(Metric("best_value", float(best["value"]), now, 0))
            tags.append(RunTag("best.trial_number", str(best["number"])))
            tags.append(RunTag("best.params", json.dumps(best["params"], sort_keys=True)))
            tags += [RunTag(f"best.{key}", str(value)) for key, value in best["params"].items()]
        self.client.log_batch(self.parent_id, metrics=metrics, tags=tags)

    def close_sweep(self, status: str) -> None:
        """FINISHED after a normal end, KILLED when interrupted, FAILED when the sweep gave up."""
        self.client.set_terminated(self.parent_id, status=status)
