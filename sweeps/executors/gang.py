"""Gang trials: each trial trains as one distributed job of `workers.gpus_per_trial` processes.

The visible GPUs are split into gangs of G (`gang_devices`); a gang runs one trial at a time. Its
G rank processes (`python -m sweeps.executors.gang`, torchrun's environment variables set, the
gang's GPUs in CUDA_VISIBLE_DEVICES) are started for its first trial and kept for the next ones:
each imports the libraries, joins the process group and prepares its runner (tokenizer, tokenized
data, the base's weights in CPU memory) once, then takes trial after trial. A trial is handed to
every rank as one line on its stdin, the path of the trial's job file; the ranks leave progress,
results, crash reports and their logs in the trial's own folder (`_Files`), where the executor
reads them. Rank 0 streams the loss curve to the trial's MLflow run and writes the `TrialResult`;
the loop records it, so a gang trial is one Optuna trial and one MLflow child run like any other.

A gang is kept only while all is well. A rank that dies (SIGKILL, a crash) leaves the others
blocked in a collective, and killing the whole gang is the one clean way out; so any rank that
dies or fails its trial ends the gang, and the next trial starts a fresh one. How a trial ended:

- every rank wrote its result: rank 0's (COMPLETE; PRUNED, every rank having stopped at the step
  rank 0 decided); the gang takes the next trial;
- a rank reports a failed trial (an out-of-memory error, say; also rank 0 alone, raising while it
  scores): the gang is stopped and the trial is FAILED with that rank's error and peak memory;
- a rank dies without a word: the gang is stopped and the trial is lost, so the loop fails it and
  queues it again (`budget.max_retries`), on a fresh gang;
- a rank hits a bug in this project's code: the gang is stopped and the sweep crashes with its
  traceback.

DeepSpeed (`zero2`, `zero3`) gangs are not kept: a fresh gang trains every trial. DeepSpeed holds
process-wide state beyond accelerate's, which transformers resets for each Trainer: its
communication backend, and with ZeRO-3 transformers' global DeepSpeed config, under which every
`from_pretrained` after the first Trainer's arguments loads partitioned parameters. No test here
can train DeepSpeed (not installed, no GPU) to show that a second engine in the same process
trains as a first one does.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import SweepConfig
from core.errors import is_programming_error
from core.store import Store
from core.trial import TrialResult, TrialStatus
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, Lost, OnStep, TrialJob

if TYPE_CHECKING:
    from runners.gang import Rank

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


def keeps_gangs(config: SweepConfig) -> bool:
    """Whether a gang's processes take trial after trial: with FSDP yes, with DeepSpeed no (module docstring)."""
    return config.distributed.effective_strategy == "fsdp"


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
    """Where a trial's ranks find their job and leave progress, results and logs: `<work_dir>/gang/`."""

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


def _empty(folder: Path) -> None:
    """Make `folder` exist and hold nothing: a retried or resumed trial reuses its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)  # a rank's scratch folder
        else:
            stale.unlink()


def _read_result(path: Path) -> TrialResult | None:
    return TrialResult.model_validate_json(path.read_text()) if path.is_file() else None


@dataclass
class _Gang:
    devices: list[str]
    ranks: list[subprocess.Popen] | None = None
    """The gang's live processes, kept between trials; None until a trial needs them again."""
    job: TrialJob | None = None
    files: _Files | None = None
    last_step: tuple[int, int] | None = None


class GangExecutor(Executor):
    """One trial at a time on each gang of GPUs (or on one CPU gang over gloo), its processes kept."""

    def __init__(self, config: SweepConfig, store: Store, gangs: list[list[str]], on_step: OnStep):
        self.config = config
        self.store = store
        self.on_step = on_step
        self.size = config.workers.gpus_per_trial
        self.keep = keeps_gangs(config)
        self.gangs = [_Gang(devices) for devices in gangs]
        self.capacity = len(self.gangs)

    def submit(self, job: TrialJob) -> None:
        gang = next(gang for gang in self.gangs if gang.job is None)
        files = _Files(Path(job.work_dir) / "gang")
        _empty(files.folder)
        _write_atomically(files.job, job.model_dump_json())
        if gang.ranks is not None and any(rank.poll() is not None for rank in gang.ranks):
            self._stop(gang)  # a rank died between trials: the rest of its gang is no use
        if gang.ranks is None:
            port = _free_port()
            gang.ranks = [
                self._start_rank(rank, gang.devices, port, files.log(rank)) for rank in range(self.size)
            ]
        gang.job, gang.files, gang.last_step = job, files, None
        for rank in gang.ranks:
            _send(rank, f"{files.job}\n")

    def _rank_command(self, rank: int, devices: list[str], port: int) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of rank `rank` of a gang on `devices`."""
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
        ]
        return command, env

    def _start_rank(self, rank: int, devices: list[str], port: int, log: Path) -> subprocess.Popen:
        """Start one rank, its jobs coming through its stdin; its output goes to `log` until its first job."""
        command, env = self._rank_command(rank, devices, port)
        with log.open("w") as output:
            return subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.PIPE,
                stdout=output,
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
        """The gang's trial, if it ended.

        The gang is kept for the next trial only when every rank wrote a result that is not FAILED
        and none exited (and the strategy keeps gangs at all); otherwise it is stopped here, its
        ranks still blocked in a collective included.
        """
        self._forward_progress(gang)
        exited = {
            rank: code for rank, process in enumerate(gang.ranks) if (code := process.poll()) is not None
        }
        results = {rank: _read_result(gang.files.result(rank)) for rank in range(self.size)}
        failed = any(
            result is not None and result.status == TrialStatus.FAILED for result in results.values()
        )
        if not exited and not failed and None in results.values():
            return []
        if exited or failed or not self.keep:
            self._stop(gang, gently=not (exited or failed))
        job, files = gang.job, gang.files
        gang.job = gang.files = None
        return [self._outcome(job, files, exited, results)]

    def _forward_progress(self, gang: _Gang) -> None:
        try:
            step, total = map(int, gang.files.progress.read_text().split())
        except (OSError, ValueError):
            return
        if (step, total) != gang.last_step:
            gang.last_step = (step, total)
            self.on_step(gang.job.number, step, total)

    def _outcome(
        self, job: TrialJob, files: _Files, exited: dict[int, int], results: dict[int, TrialResult | None]
    ) -> Event:
        for rank in range(self.size):
            if files.crash(rank).is_file():
                raise ExecutorCrashed(f"rank {rank} of trial {job.number}:\n{files.crash(rank).read_text()}")
        # The first rank that reported a failed trial (rank 0 first): its error and its memory figure.
        for rank, result in results.items():
            if result is not None and result.status == TrialStatus.FAILED:
                error = f"rank {rank} of {self.size}: {result.error}"
                return Finished(job.number, result.model_copy(update={"error": error}))
        if None not in results.values():
            return Finished(job.number, results[0])
        rank = min(exited)
        return Lost(
            job.number,
            f"rank {rank} of the trial's gang of {self.size} died (exit code {exited[rank]}); "
            f"its log: {files.log(rank)}",
        )

    def _stop(self, gang: _Gang, gently: bool = False) -> None:
        """End every rank of a gang; the next trial starts a fresh one.

        Each rank's job pipe is closed first. `gently`, for a gang between trials: its ranks see the
        pipe end, leave the process group and exit, given a few seconds. Otherwise, or after those,
        SIGTERM then SIGKILL: a rank blocked in a collective (waiting for a dead one) reads no pipe.
        """
        for process in gang.ranks:
            _close_pipe(process)
        until = time.monotonic() + _STOP_GRACE_S
        if gently:
            for process in gang.ranks:
                try:
                    process.wait(timeout=max(until - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    break
        alive = [process for process in gang.ranks if process.poll() is None]
        for process in alive:
            process.terminate()
        until = time.monotonic() + _STOP_GRACE_S
        for process in alive:
            try:
                process.wait(timeout=max(until - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        gang.ranks = None

    def close(self, interrupted: bool = False) -> None:
        """End every gang: an idle one gently, one still training (or on an interrupt) at once."""
        for gang in self.gangs:
            if gang.ranks is not None:
                self._stop(gang, gently=not interrupted and gang.job is None)
            gang.job = gang.files = None


def _send(process: subprocess.Popen, line: str) -> None:
    """Write `line` to a rank's job pipe; a rank that died meanwhile is seen by `_poll` instead."""
    try:
        process.stdin.write(line.encode())
        process.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass


def _close_pipe(process: subprocess.Popen) -> None:
    try:
        process.stdin.close()
    except (BrokenPipeError, OSError):
        pass


# -- inside a rank process ------------------------------------------------------------------------


def _log_to(path: Path) -> None:
    """Send this process's output (file descriptors 1 and 2) to `path` from now on.

    The rank lives through many trials, and each trial's ranks keep their logs in its own folder,
    where the executor points a lost trial's reason.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


class _RankTrainer:
    """What a rank process keeps between trials: its runner (tokenized data, the base's weights in
    CPU memory) and, on rank 0, the trial host (the study and the MLflow client).
    """

    def __init__(self, config_path: str, store_root: str, rank: Rank):
        import torch

        from core.config import load_config
        from runners.gang import GangTrialRunner, allow_fsdp_on_cpu
        from sweeps.executors.host import TrialHost

        self.rank = rank
        self.config = load_config(config_path)
        store = Store(Path(store_root))
        if not torch.cuda.is_available() and self.config.distributed.effective_strategy == "fsdp":
            allow_fsdp_on_cpu()
        self.runner = GangTrialRunner(self.config, rank, cache_dir=store.tokenized)
        self.runner.prepare()
        self.host = TrialHost(self.config, store, self.runner) if rank.is_main else None
        self.trials = 0

    def run(self, job: TrialJob, files: _Files) -> TrialResult:
        """Train `job` with the other ranks; rank 0 logs it and reports progress to the executor."""
        from runners.sft import TrialCallbacks

        self.trials += 1
        # One line a trial, to tell from the logs which processes trained it and what they kept.
        print(
            f"gang rank {self.rank.rank} of {self.rank.world_size}, pid {os.getpid()}: trial {job.number}, "
            f"this process's trial {self.trials}; base loads {self.runner.models.loads}; "
            f"last trial's model in memory: {self.runner.holds_last_model()}",
            flush=True,
        )
        if self.host is not None:
            return self.host.run(
                job, lambda number, step, total: _write_atomically(files.progress, f"{step} {total}")
            )
        # Scratch of its own: the Trainer's output folder is removed when a trial ends.
        scratch = files.folder / f"rank{self.rank.rank}"
        return self.runner.run(job.params, scratch, TrialCallbacks(), job.number)


def rank_main(config_path: str, store_root: str) -> int:
    """One rank of a gang: train each trial whose job file path arrives on stdin, until stdin ends.

    The rank sets itself up (imports, runner, process group through the first Trainer) for its
    first job, so whatever goes wrong there is that trial's, as it would be in a fresh process.
    Each trial's result goes to the trial's folder; rank 0's is the trial's.

    Returns the exit code: 0 when the executor closed the gang (stdin ended), 1 when a trial failed
    here or hit a bug (the executor then stops the ranks that may wait for this one in a
    collective, and records this rank's result or crash).
    """
    from runners.gang import Rank
    from sweeps.preflight import quiet_libraries

    _die_with_parent()
    # Ctrl-C reaches the whole process group; the `sweep run` process stops the gang itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_libraries()
    rank = Rank.from_env()
    import torch

    if torch.cuda.is_available():
        # The gang's GPUs are all visible to each rank; without this every rank's model, and
        # bitsandbytes' 4-bit base, would first land on the gang's first GPU.
        torch.cuda.set_device(rank.local_rank)
    trainer: _RankTrainer | None = None
    try:
        while job_path := sys.stdin.readline().strip():
            files = _Files(Path(job_path).parent)
            _log_to(files.log(rank.rank))
            try:
                if trainer is None:
                    trainer = _RankTrainer(config_path, store_root, rank)
                result = trainer.run(TrialJob.model_validate_json(Path(job_path).read_text()), files)
            except Exception as exc:
                if not is_programming_error(exc):
                    raise
                _write_atomically(files.crash(rank.rank), traceback.format_exc())
                return 1
            _write_atomically(files.result(rank.rank), result.model_dump_json())
            if result.status == TrialStatus.FAILED:
                return 1
        print(f"gang rank {rank.rank}: the executor closed the gang", flush=True)
        return 0
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _exit(code: int) -> None:
    """End the rank process now, skipping the interpreter's clean-up.

    Everything a rank leaves is written by then: its result or crash file (renamed into place),
    rank 0's curve (flushed to MLflow as each trial ends), and the process group is left. What the
    interpreter's finalization would still do took 3 s of native teardown per rank here (with
    gloo and the libraries' threads), enough to outlast `_STOP_GRACE_S` on a busy machine.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(rank_main(*sys.argv[1:]))
