"""The one error type for bad user input: a config typo, a malformed data row, a missing path.

Every input problem is reported as a single line that names the file, the line when known, the
field, and what is allowed, so users fix it before any model is loaded or any GPU time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class InputError(Exception):
    """Bad user input, located as precisely as we can: ``file:line: field: message``."""

    file: Path | str
    message: str
    field: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = str(self.file) if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {what}"


_PROJECT_PACKAGES = ("core", "runners", "objectives", "sweeps")
_BUG_TYPES = (AttributeError, NameError, TypeError, ImportError, AssertionError, SyntaxError)


def is_programming_error(exc: BaseException) -> bool:
    """Whether `exc` is a bug in this project's own code rather than something a trial ran into.

    A trial that runs out of memory or hits a library's complaint about its parameters has failed
    and the sweep goes on; an AttributeError raised by our own code would fail every trial the
    same way, so it must surface with its traceback instead of being counted as failed trials.
    """
    if not isinstance(exc, _BUG_TYPES):
        return False
    frame = exc.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    parts = Path(frame.tb_frame.f_code.co_filename).resolve().parts
    root = Path(__file__).resolve().parent.parent.parts
    return parts[: len(root)] == root and len(parts) > len(root) and parts[len(root)] in _PROJECT_PACKAGES
