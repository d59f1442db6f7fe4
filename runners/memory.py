"""Peak memory of one trial: CUDA max allocated on a GPU, peak resident set size on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Measure the peak memory of a block of work, resetting the high-water mark at the start.

    On CPU neither torch nor psutil can reset a process's peak RSS, so this writes "5" to
    /proc/self/clear_refs (Linux), which resets VmHWM; elsewhere the peak is since process start.
    `fold()` starts a fresh mark for a part of the work (`recent_mb()`) while `peak_mb()` keeps
    counting the whole.
    """

    def __init__(self) -> None:
        self.kind: Literal["cuda_max_allocated", "cpu_peak_rss"] = (
            "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        )
        self._folded_mb = 0.0

    def reset(self) -> None:
        self._folded_mb = 0.0
        self._reset_mark()

    def _reset_mark(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            pass

    def fold(self) -> None:
        """Keep the peak so far for `peak_mb()` and start a fresh mark for `recent_mb()`."""
        self._folded_mb = max(self._folded_mb, self.recent_mb() or 0.0)
        self._reset_mark()

    def recent_mb(self) -> float | None:
        """The peak since the last `fold()` (or `reset()`)."""
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated() / 2**20
        return _vm_hwm_mb()

    def peak_mb(self) -> float | None:
        """The peak since the last `reset()`."""
        recent = self.recent_mb()
        return None if recent is None else max(recent, self._folded_mb)
