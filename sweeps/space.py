"""Turn the YAML space into Optuna suggestions, honouring conditionals.

A parameter with `when: {method: [lora, qlora]}` is sampled only when `method` took one of those
values; otherwise the trial uses its fixed or default value and the sampler never sees it, so
TPE does not learn from values that had no effect.
"""

from __future__ import annotations

from typing import Any

import optuna

from core.config import BoolParam, CategoricalParam, FloatParam, IntParam, SweepConfig
from core.errors import InputError
from core.trial import TrialParams


def sampling_order(config: SweepConfig) -> list[str]:
    """Space parameters ordered so every conditional comes after the parameters it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise InputError(config.source, "conditionals form a cycle", f"space.{name}.when")
        visiting.add(name)
        for parent in config.space[name].when or {}:
            visit(parent)
        visiting.discard(name)
        order.append(name)

    for name in config.space:
        visit(name)
    return order


def _active(spec, values: dict[str, Any]) -> bool:
    return all(
        parent in values and values[parent] in allowed for parent, allowed in (spec.when or {}).items()
    )


def suggest(trial: optuna.Trial, config: SweepConfig) -> dict[str, Any]:
    """Sample the active parameters of the space for `trial` (ask-and-tell friendly)."""
    values: dict[str, Any] = {}
    for name in sampling_order(config):
        spec = config.space[name]
        if not _active(spec, values):
            continue
        if isinstance(spec, FloatParam):
            values[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)
        elif isinstance(spec, IntParam):
            values[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
        elif isinstance(spec, BoolParam):
            values[name] = trial.suggest_categorical(name, [False, True])
        else:
            values[name] = trial.suggest_categorical(name, spec.choices)
    return values


def trial_params(config: SweepConfig, sampled: dict[str, Any]) -> TrialParams:
    """Defaults, overridden by the fixed `training:` values, overridden by what was sampled."""
    return TrialParams(**{**config.fixed_params(), **sampled})


def grid(config: SweepConfig) -> dict[str, list[Any]]:
    """The search space as a grid, for the grid sampler: every parameter must be enumerable."""
    out: dict[str, list[Any]] = {}
    for name, spec in config.space.items():
        if isinstance(spec, (CategoricalParam, BoolParam)):
            out[name] = list(spec.choices)
        elif isinstance(spec, IntParam) and not spec.log:
            out[name] = list(range(spec.low, spec.high + 1, spec.step))
        elif isinstance(spec, FloatParam) and spec.step is not None and not spec.log:
            count = round((spec.high - spec.low) / spec.step) + 1
            out[name] = [spec.low + i * spec.step for i in range(count)]
        else:
            raise InputError(
                config.source,
                "the grid sampler needs categorical, bool, linear int, or float-with-step parameters",
                f"space.{name}",
            )
    return out
