"""Checks and process set-up done before any weight is loaded."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

from core.config import SweepConfig
from core.errors import InputError


def quiet_libraries() -> None:
    """Keep the live view readable: libraries' own progress bars and info logs off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import mlflow  # noqa: F401  (it configures its loggers on import; quiet them after)
    import optuna
    import transformers

    for name in ("alembic", "mlflow", "optuna", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def preflight(config: SweepConfig):
    """Everything that can be checked before a weight is loaded: model source, QLoRA, data rows.

    Returns the prepared `TrialRunner` so the tokenized data and tokenizer are reused by trials.
    """
    from runners.models import check_model_source, qlora_unavailable_reason
    from runners.sft import TrialRunner

    method = config.space.get("method")
    wants_qlora = config.training.get("method") == "qlora" or (
        method is not None and "qlora" in getattr(method, "choices", [])
    )
    reason = qlora_unavailable_reason() if wants_qlora else None
    if reason:
        field = "training.method" if config.training.get("method") == "qlora" else "space.method.choices"
        raise InputError(config.source, f"{reason}; remove qlora or run on a GPU", field)
    check_model_source(config.model, config.source)
    runner = TrialRunner(config, cache_dir=Path("mlruns") / "cache" / "tokenized")
    runner.prepare()
    return runner


def stop_on_signals() -> None:
    """SIGINT and SIGTERM stop a sweep cleanly: running trial KILLED, nothing finished lost.

    The first SIGINT or SIGTERM raises KeyboardInterrupt; later ones are ignored, so a second
    signal cannot cut short the clean-up that records the interrupted trial.
    """

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
