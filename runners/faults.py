"""Fault injection for reliability tests: make a chosen trial run out of memory, die, or hit a full disk.

Faults are read from the `SWEEP_FAULTS` environment variable so they reach worker processes too,
e.g. `SWEEP_FAULTS="1:oom@2,3:sigkill@1,4:disk_full"`: trial 1 raises out-of-memory at step 2,
trial 3's process is killed with SIGKILL at step 1, trial 4 fails while writing its adapter.
A retry is a new Optuna trial with a new number, so it runs without the fault. Unset, nothing
here runs.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import TrainerCallback

FaultKind = Literal["oom", "sigkill", "raise", "disk_full"]
ENV = "SWEEP_FAULTS"


@dataclass(frozen=True)
class Fault:
    """One injected fault: what happens to which trial, at which optimizer step."""

    trial: int
    kind: FaultKind
    step: int = 1


def planned_faults(spec: str | None = None) -> dict[int, Fault]:
    """Parse `SWEEP_FAULTS` (or `spec`) into faults keyed by trial number."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    faults: dict[int, Fault] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        number, _, action = item.partition(":")
        kind, _, step = action.partition("@")
        if kind not in ("oom", "sigkill", "raise", "disk_full"):
            raise ValueError(
                f"{ENV}: unknown fault {kind!r} in {item!r}; allowed: oom, sigkill, raise, disk_full"
            )
        faults[int(number)] = Fault(int(number), kind, int(step or 1))
    return faults


class FaultCallback(TrainerCallback):
    """Fires a training-time fault at the end of its step."""

    def __init__(self, fault: Fault):
        self.fault = fault

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.fault.step:
            return
        if self.fault.kind == "oom":
            # Allocate for real first, so the peak memory the failed trial reports is visible.
            ballast = torch.empty(64 * 2**20, dtype=torch.uint8)
            ballast.fill_(1)
            raise torch.OutOfMemoryError(f"injected out of memory at step {state.global_step}")
        if self.fault.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault.kind == "raise":
            raise RuntimeError(f"injected failure at step {state.global_step}")


def disk_full() -> OSError:
    """The error a full disk raises while an adapter is being written."""
    return OSError(errno.ENOSPC, "No space left on device (injected)")
