"""Gang trials: each trial trains as one distributed job of `workers.gpus_per_trial` processes.

The visible GPUs are split into gangs of G (`gang_devices`); a gang runs one trial at a time. For
each trial the executor starts G rank processes (`python -m sweeps.executors.gang`, torchrun's
environment variables set, the gang's GPUs in CUDA_VISIBLE_DEVICES) and waits for them. Rank 0
streams the loss curve to the trial's MLflow run and writes the `TrialResult`; the loop records it,
so a gang trial is one Optuna trial and one MLflow child run like any other.

Fresh processes for every trial, rather than gangs kept alive: a rank that dies (SIGKILL, a crash)
leaves the others blocked in a collective, and killing the whole gang is the one clean way out.
The base model is therefore loaded per trial (a few seconds against the minutes of a trial that
needs several GPUs). How the gang ended:

- every rank exits 0: rank 0's result (COMPLETE; PRUNED, every rank having stopped at the step
  rank 0 decided; or FAILED when the trial raised on rank 0);
- a rank reports a failed trial (an out-of-memory error, say): the gang is stopped and the trial
  is FAILED with that rank's error and peak memory;
- a rank dies without a word: the gang is stopped and the trial is lost, so the loop fails it and
  queues it again (`budget.max_retries`), on a fresh gang;
- a rank hits a bug in this project's code: the sweep crashes with its traceback.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from core.config import SweepConfig
from core.errors import is_programming_error
from core.store import Store
from core.trial import TrialResult, TrialStatus
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, Lost, OnStep, TrialJob

_POLL_S = 0.2
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1
_PARENT_ENV = "SWEEP_GANG_PARENT"


def gang_devices(gpus: list[str], gpus_per_trial: int) -> list[list[str]]:
    """The visible GPUs as consecutive gangs of `gpus_per_trial`; one device-less gang on a CPU machine.

    Preflight has checked that `gpus_per_trial` divides the GPUs (or that CPU gangs are allowed).
    """
    if not gpus:
        return [[]]
    return [gpus[start : start + gpus_per_trial] for start in range(0, len(gpus), gpus_per_trial)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the `sweep run` process dies, so no gang outlives its sweep.

    Set in the rank itself (a `preexec_fn` is unsafe in the threaded parent); a parent that died
    before it was set is seen by the pid check.
    """
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(_PARENT_ENV):
        os._exit(1)


@dataclass(frozen=True)
class _Files:
    """Where a trial's ranks leave their job, progress, results and logs: `<work_dir>/gang/`."""

    folder: Path

    @property
    def job(self) -> Path:
        return self.folder / "job.json"

    @property
    def progress(self) -> Path:
        return self.folder / "progress"

    def result(self, rank: int) -> Path:
        return self.folder / f"result-rank{rank}.json"

    def crash(self, rank: int) -> Path:
        return self.folder / f"crash-rank{rank}.txt"

    def log(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.log"


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.rename(path)


@dataclass
class _Gang:
    devices: list[str]
    job: TrialJob | None = None
    files: _Files | None = None
    ranks: list[subprocess.Popen] | None = None
    last_step: tuple[int, int] | None = None


class GangExecutor(Executor):
    """One trial at a time on each gang of GPUs (or on one CPU gang over gloo)."""

    def __init__(self, config: SweepConfig, store: Store, gangs: list[list[str]], on_step: OnStep):
        self.config = config
        self.store = store
        self.on_step = on_step
        self.size = config.workers.gpus_per_trial
        self.gangs = [_Gang(devices) for devices in gangs]
        self.capacity = len(self.gangs)

    def submit(self, job: TrialJob) -> None:
        gang = next(gang for gang in self.gangs if gang.job is None)
        files = _Files(Path(job.work_dir) / "gang")
        files.folder.mkdir(parents=True, exist_ok=True)
        for stale in files.folder.iterdir():  # a retried trial reuses its folder
            stale.unlink()
        _write_atomically(files.job, job.model_dump_json())
        port = _free_port()
        gang.job, gang.files, gang.last_step = job, files, None
        gang.ranks = [self._start_rank(rank, gang.devices, port, files) for rank in range(self.size)]

    def _start_rank(self, rank: int, devices: list[str], port: int, files: _Files) -> subprocess.Popen:
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(self.size),
            "LOCAL_WORLD_SIZE": str(self.size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            _PARENT_ENV: str(os.getpid()),
        }
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        command = [
            sys.executable,
            "-m",
            "sweeps.executors.gang",
            str(Path(self.config.source).resolve()),
            str(self.store.root),
            str(files.job),
        ]
        with files.log(rank).open("w") as log:
            return subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path.cwd(),
            )

    def wait(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            ended = [event for gang in self.gangs if gang.job is not None for event in self._poll(gang)]
            if ended or time.monotonic() >= deadline:
                return ended
            time.sleep(_POLL_S)

    def _poll(self, gang: _Gang) -> list[Event]:
        self._forward_progress(gang)
        codes = [rank.poll() for rank in gang.ranks]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if not failed and None in codes:
            return []
        if failed:
            self._stop(gang)
        event = self._outcome(gang, failed, codes)
        gang.job = gang.files = gang.ranks = None
        return [event]

    def _forward_progress(self, gang: _Gang) -> None:
        try:
            step, total = map(int, gang.files.progress.read_text().split())
        except (OSError, ValueError):
            return
        if (step, total) != gang.last_step:
            gang.last_step = (step, total)
            self.on_step(gang.job.number, step, total)

    def _outcome(self, gang: _Gang, failed: list[int], codes: list[int | None]) -> Event:
        job, files = gang.job, gang.files
        for rank in range(self.size):
            if files.crash(rank).is_file():
                raise ExecutorCrashed(f"rank {rank} of trial {job.number}:\n{files.crash(rank).read_text()}")
        if not failed:
            return Finished(job.number, TrialResult.model_validate_json(files.result(0).read_text()))
        # The first rank that reported a failed trial (rank 0 first): its error and its memory figure.
        for rank in failed:
            if files.result(rank).is_file():
                result = TrialResult.model_validate_json(files.result(rank).read_text())
                error = f"rank {rank} of {self.size}: {result.error}"
                return Finished(job.number, result.model_copy(update={"error": error}))
        rank = failed[0]
        return Lost(
            job.number,
            f"rank {rank} of the trial's gang of {self.size} died (exit code {codes[rank]}); "
            f"its log: {files.log(rank)}",
        )

    def _stop(self, gang: _Gang) -> None:
        """End every rank of a gang still running: the others wait in a collective for a dead rank."""
        alive = [rank for rank in gang.ranks if rank.poll() is None]
        for rank in alive:
            rank.terminate()
        until = time.monotonic() + _STOP_GRACE_S
        for rank in alive:
            try:
                rank.wait(timeout=max(until - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                rank.kill()
                rank.wait()

    def close(self, interrupted: bool = False) -> None:
        for gang in self.gangs:
            if gang.ranks is not None:
                self._stop(gang)
            gang.job = gang.files = gang.ranks = None


def rank_main(config_path: str, store_root: str, job_path: str) -> int:
    """One rank of a gang: train the job's trial with the others; rank 0 logs and writes the result.

    Returns the exit code: 0 when this rank's part of the trial ended well, 1 when the trial failed
    here (the executor then stops the ranks that may wait for this one in a collective, and records
    this rank's result).
    """
    from core.config import load_config
    from runners.gang import GangTrialRunner, Rank, allow_fsdp_on_cpu
    from runners.sft import TrialCallbacks
    from sweeps.executors.host import TrialHost
    from sweeps.preflight import quiet_libraries

    _die_with_parent()
    # Ctrl-C reaches the whole process group; the `sweep run` process stops the gang itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_libraries()
    rank = Rank.from_env()
    files = _Files(Path(job_path).parent)
    try:
        import torch

        config = load_config(config_path)
        store = Store(Path(store_root))
        job = TrialJob.model_validate_json(Path(job_path).read_text())
        if not torch.cuda.is_available() and config.distributed.effective_strategy == "fsdp":
            allow_fsdp_on_cpu()
        runner = GangTrialRunner(config, rank, cache_dir=store.tokenized)
        runner.prepare()
        if rank.is_main:
            host = TrialHost(config, store, runner)
            result = host.run(
                job, lambda number, step, total: _write_atomically(files.progress, f"{step} {total}")
            )
        else:
            # Scratch of its own: the Trainer's output folder is removed when a trial ends.
            scratch = Path(job.work_dir) / "gang" / f"rank{rank.rank}"
            result = runner.run(job.params, scratch, TrialCallbacks(), job.number)
    except Exception as exc:
        if not is_programming_error(exc):
            raise
        _write_atomically(files.crash(rank.rank), traceback.format_exc())
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _write_atomically(files.result(rank.rank), result.model_dump_json())
    return 1 if result.status == TrialStatus.FAILED else 0


if __name__ == "__main__":
    sys.exit(rank_main(*sys.argv[1:]))
