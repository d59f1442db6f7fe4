"""Checks and process set-up done before any weight is loaded."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Any

from core.config import SweepConfig
from core.errors import InputError
from core.store import Store


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


def unwritable_reason(path: Path, folder: bool) -> str | None:
    """Why `path` (a folder, or a file when not `folder`) could not be created or written, or None.

    Only looks: nothing is created, so a check that passes leaves no trace.
    """
    path = path.expanduser().absolute()
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create {path}: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {path}: {ancestor} is not writable"
    return None


def _sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (relative to the working directory), else None."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?", 1)[0])


def _check_outputs(config: SweepConfig, store: Store) -> None:
    """Every place a sweep writes must be writable now, not when the first trial ends."""
    reason = unwritable_reason(store.root, folder=True)
    if reason:
        raise InputError(store.root, f"the sweep's store folder cannot be used: {reason}")
    uri = config.tracking.uri
    checks: list[tuple[str, Path | None, bool]] = [
        ("tracking.uri", _sqlite_file(uri), False),
        ("storage", _sqlite_file(config.storage or ""), False),
        ("tracking.artifact_location", Path(config.tracking.artifact_location), True),
    ]
    if "://" not in uri or uri.startswith("file://"):  # a plain path or file:// is MLflow's folder store
        checks.append(("tracking.uri", Path(uri.removeprefix("file://")), True))
    for field, path, folder in checks:
        reason = unwritable_reason(path, folder) if path is not None else None
        if reason:
            raise config.error(field, reason)


def _check_target_modules(config: SweepConfig) -> None:
    """LoRA `target_modules` names must exist in the model; peft would only say so in every trial."""
    from core.config import CategoricalParam
    from runners.models import linear_layer_names, module_names, unknown_target_module

    values: list[tuple[str, Any]] = []
    if "target_modules" in config.training:
        values.append(("training.target_modules", config.training["target_modules"]))
    spec = config.space.get("target_modules")
    if isinstance(spec, CategoricalParam):
        values += [(f"space.target_modules.choices[{i}]", choice) for i, choice in enumerate(spec.choices)]
    values = [(field, value) for field, value in values if isinstance(value, str) and value != "all-linear"]
    if not values:
        return
    names = module_names(config.model)
    if names is None:
        return
    for field, value in values:
        unknown = unknown_target_module(names, [name.strip() for name in value.split(",") if name.strip()])
        if unknown is not None:
            raise config.error(
                field,
                f"the model has no module named {unknown!r}; its Linear layers: "
                f"{', '.join(linear_layer_names(names))} (or all-linear)",
            )


def _located(config: SweepConfig, exc: InputError) -> InputError:
    """`exc` pointing at the YAML line of its field when it names a field of the config."""
    if exc.field and exc.line is None and str(exc.file) in (str(config.source), "config"):
        return config.error(exc.field, exc.message)
    return exc


def preflight(config: SweepConfig, store: Store, gang_gpus: list[str] | None = None):
    """Everything that can be checked before a weight is loaded: model source, QLoRA, data rows.

    Gang settings are checked against `gang_gpus`, the GPUs a gang will have where they are not
    this process's visible ones (a Ray cluster's). Returns the prepared `TrialRunner` so the
    tokenized data and tokenizer are reused by trials. Every problem is an `InputError`, at the
    YAML line of the field when it is the config's.
    """
    try:
        return _preflight(config, store, gang_gpus)
    except InputError as exc:
        raise _located(config, exc) from None


def _check_data_files(config: SweepConfig) -> None:
    """Local data files must exist; checked first, since a missing download is the likeliest mistake."""
    files = [("data.train_file", config.data.train_file), ("data.eval_file", config.data.eval_file)]
    objective = config.objective
    files += [
        (f"objective.{field}", Path(value))
        for field, value in (("eval_file", objective.eval_file), ("fewshot_file", objective.fewshot_file))
        if value is not None and value.endswith((".json", ".jsonl"))
    ]
    for field, path in files:
        if path is not None and not Path(path).is_file():
            raise InputError(path, f"data file not found (set by {field} in {config.source})")


def _qlora_field(config: SweepConfig) -> str | None:
    """The config field through which trials may use QLoRA, or None when none can."""
    if config.training.get("method") == "qlora":
        return "training.method"
    method = config.space.get("method")
    if method is not None and "qlora" in getattr(method, "choices", []):
        return "space.method.choices"
    return None


def check_gangs(config: SweepConfig, gpus: list[str]) -> None:
    """Gang trials (`workers.gpus_per_trial` > 1) must fit the visible GPUs and their strategy.

    With no GPU visible a gang runs as CPU processes over gloo only when `distributed.allow_cpu`
    says so: that is for testing the gang path, and a user who forgot to expose the GPUs should
    hear about it rather than wait for G slow CPU processes.
    """
    size = config.workers.gpus_per_trial
    if size == 1:
        return
    field = "workers.gpus_per_trial"
    shown = f"CUDA_VISIBLE_DEVICES={','.join(gpus)}" if gpus else "none"
    if not gpus and not config.distributed.allow_cpu:
        raise config.error(
            field,
            f"{size} GPUs a trial, but no GPU is visible; set distributed.allow_cpu: true to run each "
            "trial as that many CPU processes over gloo (for testing)",
        )
    if not gpus:
        # Each rank a process of its own: a number meant for a GPU host (or a typo) would start that
        # many trainers here. Two always, so a gang can be tried on a one-core machine.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if size > max(cores, 2):
            raise config.error(
                field,
                f"{size} processes a trial, but no GPU is visible and this machine has {cores} CPU "
                f"cores; a CPU gang (distributed.allow_cpu) takes at most {max(cores, 2)}",
            )
    if gpus and size > len(gpus):
        raise config.error(field, f"{size} GPUs a trial, but only {len(gpus)} are visible ({shown})")
    if gpus and len(gpus) % size:
        divisors = [str(n) for n in range(1, len(gpus) + 1) if len(gpus) % n == 0]
        raise config.error(
            field,
            f"{size} does not divide the {len(gpus)} visible GPUs ({shown}), so "
            f"{len(gpus) % size} would stay idle; use one of {', '.join(divisors)}",
        )
    strategy = config.distributed.effective_strategy
    strategy_field = "distributed.config_file" if config.distributed.config_file else "distributed.strategy"
    qlora = _qlora_field(config)
    if qlora and strategy in ("zero3", "fsdp"):
        # Sharding the 4-bit base needs bitsandbytes' quant_storage set to the compute dtype (and
        # for ZeRO-3 a DeepSpeed-aware load); this project loads QLoRA bases without either.
        raise config.error(
            strategy_field,
            f"{strategy} shards the base model, which QLoRA trials' 4-bit base does not support here "
            f"(QLoRA comes from {qlora}); use zero2 or remove qlora",
        )
    if not gpus and strategy == "fsdp":
        from runners.gang import distributed_arguments

        if distributed_arguments(config, on_gpu=False)["fsdp_config"].get("cpu_offload"):
            # FSDP2's CPU offload copies shards to the accelerator for each step: every trial would fail.
            raise config.error(
                "distributed.config_file" if config.distributed.config_file else "distributed.offload",
                "offloads to CPU memory, but no GPU is visible and a CPU gang's state is in CPU memory "
                "already; turn offload off (fsdp_offload_params in an accelerate config)",
            )
    if strategy in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise config.error(strategy_field, f"{strategy} needs DeepSpeed: pip install deepspeed")


def _preflight(config: SweepConfig, store: Store, gang_gpus: list[str] | None):
    from runners.models import check_model_source, qlora_unavailable_reason
    from runners.sft import TrialRunner
    from sweeps.executors.devices import visible_gpus

    _check_data_files(config)
    _check_outputs(config, store)
    check_gangs(config, visible_gpus() if gang_gpus is None else gang_gpus)
    qlora = _qlora_field(config)
    reason = qlora_unavailable_reason() if qlora else None
    if reason:
        raise InputError(config.source, f"{reason}; remove qlora or run on a GPU", qlora)
    check_model_source(config.model, config.source)
    _check_target_modules(config)
    runner = TrialRunner(config, cache_dir=store.tokenized)
    try:
        runner.models.tokenizer()
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise config.error("model.name_or_path", f"cannot load the tokenizer: {first_line}") from None
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
