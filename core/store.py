"""Where a sweep keeps its files: one folder (`mlruns/` of the working directory by default).

The CLI is the only place that knows the working directory; it builds a `Store` and everything
below it gets its paths from that object, never from a relative `Path("mlruns")` of its own.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Store:
    """The local store's folder and the layout inside it."""

    root: Path

    @classmethod
    def at(cls, root: Path | str = "mlruns") -> Store:
        """A store at `root`, made absolute now so a later change of directory does not move it."""
        return cls(Path(root).resolve())

    def journal(self, sweep: str) -> Path:
        """The Optuna journal file of a sweep whose config names no storage."""
        return self.root / "optuna" / f"{sweep}.journal"

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the host-wide lock `name`: one process at a time, across every `sweep` on this machine."""
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def trials(self, sweep: str) -> Path:
        """Scratch folders of a sweep's trials (adapters move to MLflow when a trial ends)."""
        return self.root / "trials" / sweep

    @property
    def tokenized(self) -> Path:
        """Tokenized data cached across invocations."""
        return self.root / "cache" / "tokenized"

    @property
    def promoted(self) -> Path:
        """Default parent folder of promoted (merged) models."""
        return self.root / "promoted"

    @property
    def reports(self) -> Path:
        """Parent folder of sweep reports (`sweep report`): one self-contained folder a sweep."""
        return self.root / "reports"

    @property
    def ray(self) -> Path:
        """Ray's own logs and state for sweeps run on Ray."""
        return self.root / "ray"
