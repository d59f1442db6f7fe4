"""The objectives a config may name, with their natural direction.

Kept free of heavy imports so a config can be validated without torch; `load_objective` imports
the implementation only when a trial needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Literal


@dataclass(frozen=True)
class ObjectiveEntry:
    """Where an objective lives and which way is better."""

    module: str
    attribute: str
    direction: Literal["minimize", "maximize"]
    description: str


OBJECTIVES: dict[str, ObjectiveEntry] = {
    "eval_loss": ObjectiveEntry(
        "objectives.eval_loss", "EvalLoss", "minimize", "mean loss per assistant token on the eval split"
    ),
}


def load_objective(name: str):
    """The objective class registered under `name`."""
    entry = OBJECTIVES[name]
    return getattr(import_module(entry.module), entry.attribute)
