"""Packed trials: K LoRA / QLoRA trials stepped together on one shared base in this process.

A small model leaves a GPU mostly idle: one trial's step is bound by kernel launches, not by
arithmetic, so K trials stepped together cost about what one costs alone (`runners.packed`).
Slots, not waves: as soon as a trial ends (complete, pruned, failed) the loop hands its slot the
next trial. LoRA and QLoRA trials train on different bases, so each gets its own pack; full
fine-tuning trains every weight, and TRL packing builds batches of its own, so those trials run
alone between pack steps.
"""

from __future__ import annotations

import gc
import itertools
import traceback
from pathlib import Path

import torch

from core.config import SweepConfig
from core.store import Store
from core.trial import TrialResult, TrialStatus
from runners.packed import PACK_MEMORY_SHARE, PackedRunner
from runners.sft import TrialRunner
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, OnStep, TrialJob
from sweeps.executors.host import TrialHost
from sweeps.tracking import SystemMetrics

AUTO_START = 4
"""Pack size an `auto` pack starts from before it has measured a step."""
AUTO_MAX = 16
_pack_ids = itertools.count()


def auto_capacity(base_bytes: int, peak_bytes: int, active: int, total_bytes: int, current: int) -> int:
    """Trials that fit once a pack step with `active` trials peaked at `peak_bytes` on the GPU.

    What the pack holds beyond the base grows with each trial (adapters, optimizer state,
    activations), so the share of one trial is (peak - base) / active; the pack may use
    `PACK_MEMORY_SHARE` of the card. Never below 1, never above `AUTO_MAX`, and never more than
    double the current size in one go, since a larger pack's step may peak higher per trial.
    """
    per_trial = max(peak_bytes - base_bytes, 1) / max(active, 1)
    fits = int((total_bytes * PACK_MEMORY_SHARE - base_bytes) // per_trial)
    return max(1, min(AUTO_MAX, fits, 2 * current))


class Packed(Executor):
    """Up to `capacity` adapter trials stepped together; `capacity=None` sizes the pack to free GPU memory."""

    def __init__(
        self, config: SweepConfig, store: Store, runner: TrialRunner, on_step: OnStep, capacity: int | None
    ):
        self.host = TrialHost(config, store, runner)
        self.runner = runner
        self.on_step = on_step
        self.auto = capacity is None
        self.capacity = AUTO_START if capacity is None else capacity
        self.measured: dict[str, int] = {}
        """Per pack, the most trials a step of it has held: an auto pack that holds more probes."""
        self.packs: dict[str, PackedRunner] = {}
        self.pack_ids: dict[str, int] = {}
        self.jobs: dict[int, TrialJob] = {}
        self.waiting: list[TrialJob] = []
        self.solo: list[TrialJob] = []
        self.monitors: dict[int, SystemMetrics] = {}
        self.restarts: dict[int, int] = {}
        """Per trial, how often an out-of-memory pack step sent it back to its first step."""
        self.turn = 0

    def submit(self, job: TrialJob) -> None:
        self.jobs[job.number] = job
        if not job.params.is_adapter or job.params.packing:
            self.solo.append(job)
        else:
            self._add(job)

    def _add(self, job: TrialJob) -> None:
        method = job.params.method
        pack = self.packs.get(method)
        if pack is None:
            pack = self.packs[method] = PackedRunner(self.runner, self._pack_capacity())
            self.pack_ids[method] = next(_pack_ids)
        if len(pack.active()) >= pack.capacity:
            self.waiting.append(job)
            return
        pack.add(job.params, Path(job.work_dir), self.host.callbacks(job, self.on_step), job.number)
        # Each trial's run gets the card's time series while it is in the pack (shared with the
        # pack's other trials, as its memory is).
        monitor = self.host.tracker.monitor_system(job.run_id)
        if monitor is not None:
            self.monitors[job.number] = monitor

    def _pack_capacity(self) -> int:
        # A pack's slots are allocated when it is built; an auto pack gets room to grow into.
        return AUTO_MAX if self.auto else self.capacity

    def wait(self, timeout: float) -> list[Event]:
        try:
            if self.solo:
                job = self.solo.pop(0)
                return self._finished([(job.number, self.host.run(job, self.on_step))], pack=None)
            busy = [method for method, pack in self.packs.items() if pack.active()]
            if not busy:
                return []
            method = busy[self.turn % len(busy)]
            self.turn += 1
            pack = self.packs[method]
            stepped = len(pack.active())
            # A step with more trials than any measured one is a probe: after it the pack resizes
            # and the loop fills the new slots at once, not when the first trials end (a sweep's
            # first pack would otherwise run a whole wave at AUTO_START trials).
            probe = self.auto and stepped > self.measured.get(method, 0)
            try:
                ended = pack.advance(max_steps=1 if probe else None)
            except torch.OutOfMemoryError:
                ended = None
            if ended is None:
                # Shrunk outside the `except`: while the error is handled, its traceback holds the
                # failed step's activations, and the smaller pack's trials ran out of memory on
                # being added (measured: 12 of 14 trials of a gsm8k sweep FAILED that way).
                return self._shrink(method)
            self._resize(method, stepped)
            events = self._finished(ended, pack=method)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise ExecutorCrashed(traceback.format_exc()) from exc
        self._refill()
        return events

    def _finished(self, ended: list[tuple[int, TrialResult]], pack: str | None) -> list[Event]:
        events: list[Event] = []
        for number, result in ended:
            job = self.jobs.pop(number)
            self.host.tracker.flush(job.run_id)
            self._stop_monitor(number)
            if pack is not None:
                # pack_size and the pack's shared peak memory come from the pack itself.
                metrics = {**result.metrics, "pack_id": float(self.pack_ids[pack])}
                restarts = self.restarts.pop(number, 0)
                if restarts:
                    metrics["pack_restarts"] = float(restarts)
                result = result.model_copy(update={"metrics": metrics})
            events.append(Finished(number, result))
        return events

    def _stop_monitor(self, number: int) -> None:
        monitor = self.monitors.pop(number, None)
        if monitor is not None:
            monitor.stop()

    def _refill(self) -> None:
        waiting, self.waiting = self.waiting, []
        for job in waiting:
            self._add(job)

    def _resize(self, method: str, stepped: int) -> None:
        """Grow or shrink an auto pack to what the peak memory of steps with `stepped` trials says fits.

        Counted before the steps, not after: trials that ended in them have left the pack already.
        The peak is the pack steps' alone, not the scoring's between them (`take_step_peak_mb`).
        """
        pack = self.packs[method]
        peak_mb = pack.take_step_peak_mb()
        if peak_mb is not None or not torch.cuda.is_available():
            # No peak on a GPU: the call ran no step (it returned trials that failed on being
            # added), so this size is still unmeasured.
            self.measured[method] = max(self.measured.get(method, 0), stepped)
        if not (self.auto and torch.cuda.is_available()) or not stepped or peak_mb is None:
            return
        base_bytes = sum(
            p.numel() * p.element_size() for p in self.runner.models.base(method == "qlora").parameters()
        )
        total = torch.cuda.get_device_properties(0).total_memory
        self.capacity = min(
            pack.capacity,
            auto_capacity(base_bytes, int(peak_mb * 2**20), stepped, total, self.capacity),
        )

    def _shrink(self, method: str) -> list[Event]:
        """Out of memory in a pack step: halve the pack and rerun its trials from their start.

        An auto pack that ran out of memory growing past a size whose steps already ran goes back
        to that size instead: halving would leave it below what is known to fit for the rest of
        the sweep (H100, eval-loss sweep: an optimistic probe step at 10 trials ran out of memory
        after 8 had run, and halving kept the pack at 5). Either way it stops growing. At one
        trial a pack cannot shrink: the trial fails as out of memory and the loop retries it at
        half the micro-batch (`budget.oom_retry`).
        """
        pack = self.packs.pop(method)
        numbers = pack.active()
        ran = self.measured.get(method, 0) if self.auto else 0
        pack.close()
        for number in numbers:
            self._stop_monitor(number)
        gc.collect()
        torch.cuda.empty_cache()
        if self.capacity == 1:
            failed = TrialResult(
                status=TrialStatus.FAILED,
                error="OutOfMemoryError: out of memory with one trial in the pack",
                failure_kind="oom",
            )
            return [Finished(number, failed) for number in numbers if self.jobs.pop(number, None)]
        halved = max(1, min(self.capacity, len(numbers)) // 2)
        self.capacity = ran if halved < ran < len(numbers) else halved
        self.auto = False
        for number in numbers:
            job = self.jobs[number]
            # The trial starts over: its queued curve points would repeat the steps its rerun logs.
            self.host.tracker.discard_pending(job.run_id)
            self.restarts[number] = self.restarts.get(number, 0) + 1
            self._add(job)
        return []

    def close(self, interrupted: bool = False) -> None:
        for number in list(self.monitors):
            self._stop_monitor(number)
        for pack in self.packs.values():
            pack.close()
        self.packs.clear()
        self.waiting.clear()
        self.solo.clear()
