"""Where each objective named in a config is implemented."""

from __future__ import annotations

from importlib import import_module

from core.objectives import OBJECTIVES


def load_objective(name: str):
    """The objective class registered under `name`."""
    entry = OBJECTIVES[name]
    return getattr(import_module(entry.module), entry.attribute)
