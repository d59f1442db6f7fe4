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
