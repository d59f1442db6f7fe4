"""What every executor does in the process that runs a trial: train, log the curve, report to the pruner."""

from __future__ import annotations

from pathlib import Path

import optuna

from core.config import SweepConfig
from core.store import Store
from core.trial import TrialResult
from runners.sft import TrialCallbacks, TrialRunner
from sweeps.executors.base import OnStep, TrialJob
from sweeps.study import make_pruner, open_storage
from sweeps.tracking import SweepTracker


class TrialHost:
    """A runner (base model and tokenized data kept between trials) with the sweep's stores at hand.

    The loop process owns each trial's records; the host only streams what happens during
    training: the loss curve to the trial's MLflow run, intermediate values to its Optuna trial
    (through the shared storage, so the pruner sees every trial of every process).
    """

    def __init__(self, config: SweepConfig, store: Store, runner: TrialRunner):
        self.config = config
        self.runner = runner
        self.tracker = SweepTracker(config)
        # A loaded study has Optuna's default pruner (a median pruner after 5 trials), whatever the
        # sweep's; `should_prune` asks this one.
        self.study = optuna.load_study(
            study_name=config.name, storage=open_storage(config, store), pruner=make_pruner(config)
        )

    def callbacks(self, job: TrialJob, on_step: OnStep) -> TrialCallbacks:
        """The hooks a trial calls while it trains, bound to this job's run and trial."""
        trial = optuna.trial.Trial(self.study, job.trial_id)

        def report(value: float, step: int) -> bool:
            trial.report(value, step)
            return not trial.should_prune()

        return TrialCallbacks(
            on_step=lambda step, total: on_step(job.number, step, total),
            on_log=lambda metrics, step: self.tracker.log_metrics(job.run_id, metrics, step),
            report=report,
        )

    def run(self, job: TrialJob, on_step: OnStep) -> TrialResult:
        """Train and score `job`; the curve (and system metrics) are written before the result is handed back."""
        monitor = self.tracker.monitor_system(job.run_id)
        try:
            return self.runner.run(job.params, Path(job.work_dir), self.callbacks(job, on_step), job.number)
        finally:
            self.tracker.flush(job.run_id)
            if monitor is not None:
                monitor.stop()
