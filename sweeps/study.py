"""The Optuna study behind a sweep: storage, sampler, pruner, and what the sweep reads back from it.

`--trials N` means N *finished* trials (complete or pruned) in the study. Re-running the same
command after a stop counts what is already there and runs only what is missing (`sweeps.loop`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from core.config import SweepConfig
from core.errors import InputError
from core.store import Store
from sweeps.space import grid

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def _torn_tail(path: Path) -> tuple[int, int, int] | None:
    """(line, byte offset, bytes) of a bad last record of a journal, or None when every record is whole.

    Raises `InputError` naming the file and line when a record before the last is bad.
    """
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    offset = 0
    for number, line in enumerate(lines, start=1):
        try:
            whole = line.endswith(b"\n") and json.loads(line) is not None
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            whole = False
        if not whole and number < len(lines):
            raise InputError(
                path,
                "the Optuna journal is damaged here (not a JSON record); restore it from a backup, "
                "or move it away to start the study afresh",
                line=number,
            )
        if not whole:
            return number, offset, len(line)
        offset += len(line)
    return None


def check_journal(path: Path) -> str | None:
    """Repair a journal whose last record was torn (a crash or a full disk mid-write), or refuse it.

    Optuna's `JournalFileBackend` skips a bad last line silently, but appends the next record
    right after it, so the study then fails to load with a bare JSONDecodeError or "Invalid log
    format". A torn last record never reached the study: it is cut off here, under the journal's
    own write lock, and a one-line warning is returned. A bad record before the last one means
    the file is damaged: `InputError` naming the file and line, and nothing is changed.
    """
    if not path.exists() or _torn_tail(path) is None:
        return None
    # The last line may be another process's write still in flight: decide again while holding
    # the lock that every journal write holds.
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    with optuna.storages.journal._file.get_lock_file(lock):
        torn = _torn_tail(path)
        if torn is None:
            return None
        number, offset, size = torn
        with path.open("r+b") as handle:
            handle.truncate(offset)
    return (
        f"{path}:{number}: removed a torn last record of the Optuna journal ({size} bytes); the study goes on"
    )


def open_storage(config: SweepConfig, store: Store) -> optuna.storages.BaseStorage | str:
    """The configured storage URL, else the sweep's journal file in the store (safe for several processes).

    A journal whose last record is torn is repaired with a warning on stderr; one damaged before
    its end raises `InputError` (`check_journal`).
    """
    if config.storage:
        return config.storage
    path = store.journal(config.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    warning = check_journal(path)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler that does not call `study.stop()` when the grid is done.

    `stop()` only works inside `study.optimize`; under ask/tell it raises in the middle of `tell`,
    before the last trial's result is stored. The loop ends on its own once the grid is covered,
    because `run_sweep` caps the target at the grid's size.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


def grid_size(config: SweepConfig) -> int | None:
    """Points in the grid of a grid-sampled sweep, else None."""
    if config.sampler.type != "grid":
        return None
    return math.prod(len(values) for values in grid(config).values())


def make_sampler(config: SweepConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, its seed shifted by `seed_offset` (see `open_study`)."""
    s = config.sampler
    seed = None if s.seed is None else s.seed + seed_offset
    startup = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
    if s.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **startup)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "grid":
        return _AskTellGridSampler(grid(config), seed=seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    return optuna.samplers.GPSampler(seed=seed, **startup)


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    p = config.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(config: SweepConfig, store: Store) -> optuna.Study:
    """Create the sweep's study, or load it when it exists (the study name is the sweep name).

    The sampler is re-seeded for each trial it samples (`sweeps.loop`), so its seed here only
    matters to code that samples outside the loop.
    """
    return optuna.create_study(
        study_name=config.name,
        storage=open_storage(config, store),
        sampler=make_sampler(config),
        pruner=make_pruner(config),
        directions=config.directions,
        load_if_exists=True,
    )


def load_study(config: SweepConfig, store: Store) -> optuna.Study:
    """The existing study of a sweep, for read-only commands (status, best); KeyError when there is none."""
    return optuna.load_study(study_name=config.name, storage=open_storage(config, store))


def count_states(study: optuna.Study) -> dict[str, int]:
    counts = {
        state.name: 0
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in counts:
            counts[trial.state.name] += 1
    return counts


def finished_count(study: optuna.Study) -> int:
    """Complete plus pruned trials: what `--trials N` counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial, or None before the first one finishes.

    In a multi-objective study: the Pareto-optimal trial with the best primary objective.
    """
    if len(study.directions) > 1:
        front = study.best_trials
        if not front:
            return None
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        return min(front, key=lambda trial: sign * trial.values[0])
    try:
        return study.best_trial
    except ValueError:
        return None


def _owner_alive(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the process that started a RUNNING trial still runs (trials record host and pid)."""
    host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
    if host != socket.gethostname() or pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Fail RUNNING trials whose process died (a kill -9, a crash); returns them as they were.

    Journal storage has no heartbeat, so ownership is checked through the pid each trial records;
    trials of a live process on this host, or of another host, are left alone.
    """
    orphaned = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if not _owner_alive(t)]
    for trial in orphaned:
        study.tell(trial.number, state=TrialState.FAIL)
    return orphaned


def enqueue_retry(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, overrides: dict[str, Any] | None = None
) -> None:
    """Queue the same parameters again as a new trial, remembering which trial it retries."""
    attrs = {
        "retry_of": trial.number,
        "retries": trial.user_attrs.get("retries", 0) + 1,
        "overrides": {**trial.user_attrs.get("overrides", {}), **(overrides or {})},
    }
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)
