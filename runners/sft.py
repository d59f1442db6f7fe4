"""One trial: LoRA, rsLoRA, QLoRA or full SFT with TRL on the cached base, then scoring.

A `TrialRunner` lives as long as its worker. It knows neither Optuna nor MLflow: it takes
`TrialParams` and plain callbacks, and returns a `TrialResult`.
"""

from __future__ import annotations

import copy
import gc
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import torch
from transformers import PrinterCallback, TrainerCallback

from core.config import SweepConfig
from core.errors import is_programming_error
from core.eval import EvalData
from core.rows import SplitExamples, load_splits
from core.trial import Timings, TrialParams, TrialResult, TrialStatus
from objectives.registry import load_objective
from runners.data import TokenizedCache, resolve_chat_template
from runners.faults import FaultCallback, disk_full, planned_faults
from runners.memory import PeakMemory
from runners.models import ModelCache
from runners.multilora import lora_config, seeded_peft_model

if TYPE_CHECKING:
    from trl import SFTConfig, SFTTrainer


def _checkpointing_arg(config_class: type) -> str:
    # transformers renamed gradient_checkpointing to activation_checkpointing in 5.2x and warns on the
    # old name; older 5.x releases (still common on GPU images) only know the old one.
    fields = config_class.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _ignore_step(step: int, total: int) -> None:
    return None


def _ignore_log(metrics: dict[str, float], step: int) -> None:
    return None


def _keep_going(value: float, step: int) -> bool:
    return True


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary folder, then rename it to `final`; returns `final`.

    A crash or a full disk mid-write leaves no folder a promotion could mistake for a finished
    adapter: the partial one is removed, and a kill leaves only `*.partial`.
    """
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


@dataclass
class TrialCallbacks:
    """Hooks a trial calls while it trains; the orchestrator decides what they do."""

    on_step: Callable[[int, int], None] = _ignore_step
    on_log: Callable[[dict[str, float], int], None] = _ignore_log
    report: Callable[[float, int], bool] = _keep_going
    """Takes an intermediate objective value at a step; returns False to stop (prune) the trial."""


class _Bridge(TrainerCallback):
    """Forwards the trainer's progress and logs to `TrialCallbacks`."""

    def __init__(self, callbacks: TrialCallbacks):
        self.callbacks = callbacks

    def on_train_begin(self, args, state, control, **kwargs):
        self.callbacks.on_step(0, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.callbacks.on_step(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Step logs call the loss `loss`; the end-of-training summary calls the run's mean
        # `train_loss`. Renaming both keeps the per-step curve clean under one name.
        renames = {"loss": "train_loss", "train_loss": "train_loss_mean"}
        metrics = {
            renames.get(key, key): float(value)
            for key, value in (logs or {}).items()
            if isinstance(value, (int, float)) and key not in {"epoch", "total_flos"}
        }
        if metrics:
            self.callbacks.on_log(metrics, state.global_step)


class _Pruning(TrainerCallback):
    """Scores the model on an eval subset every `every` steps and stops training when told to."""

    def __init__(self, every: int, evaluate: Callable[[], float], callbacks: TrialCallbacks):
        self.every = every
        self.evaluate = evaluate
        self.callbacks = callbacks
        self.last_value: float | None = None
        self.pruned_at: int | None = None
        self.seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every or step >= state.max_steps:
            return
        started = perf_counter()
        self.last_value = self.evaluate()
        self.seconds += perf_counter() - started
        self.callbacks.on_log({"intermediate_objective": self.last_value}, step)
        if not self.callbacks.report(self.last_value, step):
            self.pruned_at = step
            control.should_training_stop = True


@dataclass
class _Trainable:
    """The model a trial trains and how to give the shared base back afterwards."""

    model: torch.nn.Module
    release: Callable[[], None] = field(default=lambda: None)


class TrialRunner:
    """Trains and scores trials one after another, paying model load and tokenization once.

    `prepare()` reads and validates the data and the tokenizer; the base model is loaded by the
    first trial that needs it and reused by the rest.
    """

    def __init__(self, config: SweepConfig, cache_dir: Path | None = None):
        self.config = config
        self.models = ModelCache(config.model)
        self.tokenized = TokenizedCache(cache_dir)
        self.objective = load_objective(config.objective.name)(config.objective)
        self._splits: SplitExamples | None = None
        self._template: str | None = None
        self._faults = planned_faults()

    def prepare(self) -> None:
        """Validate data rows and the chat template and tokenize once; raises `InputError` on bad input."""
        if self._splits is None:
            tokenizer = self.models.tokenizer()
            self._splits = load_splits(self.config.data)
            self._template = resolve_chat_template(tokenizer, self.config.data.chat_template)
            for examples in (self._splits.train, self._splits.eval):
                self.tokenized.full(tokenizer, self._template, examples)
            validate = getattr(self.objective, "validate", None)
            if validate is not None:
                validate()

    def _trainable(self, params: TrialParams) -> _Trainable:
        base = self.models.base(quantized=params.method == "qlora")
        if params.method == "full":
            # Full fine-tuning changes every weight, so it trains a copy and the shared base stays clean.
            model = copy.deepcopy(base)
            model.requires_grad_(True)
            return _Trainable(model)
        # QLoRA trials get no prepare_model_for_kbit_training: it upcasts norms and embeddings to
        # fp32, which turns every activation fp32 and cost more memory than bf16 LoRA in
        # bench/RESULTS.md; the adapters train in fp32 either way and the base stays frozen.
        # Seeded init, the rule packed trials share: the same trial gets the same adapter init either way.
        peft_model = seeded_peft_model(base, lora_config(params), params.seed)

        def release() -> None:
            peft_model.unload()
            # TRL's SFTTrainer patches the base's forward with a fused LM head (an instance attribute
            # closing over the previous forward). Left in place, patches would stack trial after
            # trial, and a deep copy for full fine-tuning would still run the shared base's weights.
            vars(base).pop("forward", None)
            if params.gradient_checkpointing:
                base.gradient_checkpointing_disable()
                base.disable_input_require_grads()

        return _Trainable(peft_model, release)

    def _fault_callbacks(self, trial_number: int | None) -> list[TrainerCallback]:
        fault = self._faults.get(trial_number)
        return [FaultCallback(fault)] if fault is not None and fault.kind != "disk_full" else []

    def _sft_config(self, params: TrialParams, output_dir: Path) -> SFTConfig:
        # Imported here, not at the top: packed sweeps never build a trainer, and importing TRL
        # is 1-2 s of every sweep's start-up.
        from trl import SFTConfig

        on_gpu = torch.cuda.is_available()
        # Mixed precision whenever the GPU has bf16, also for dtype auto/float32 weights (classic AMP);
        # only float16 models are left to train as they are.
        bf16 = on_gpu and torch.cuda.is_bf16_supported() and self.config.model.dtype != "float16"
        return SFTConfig(
            output_dir=str(output_dir / "trainer"),
            per_device_train_batch_size=params.per_device_batch_size,
            gradient_accumulation_steps=params.gradient_accumulation_steps,
            learning_rate=params.learning_rate,
            num_train_epochs=params.num_epochs,
            max_steps=params.max_steps,
            lr_scheduler_type=params.lr_scheduler,
            warmup_steps=params.warmup_ratio,
            weight_decay=params.weight_decay,
            max_grad_norm=params.max_grad_norm,
            seed=params.seed,
            bf16=bf16,
            **{_checkpointing_arg(SFTConfig): params.gradient_checkpointing},
            max_length=params.cutoff_len,
            packing=params.packing,
            # Data arrives tokenized, masked and truncated from the cache; letting TRL re-map it per
            # trial would repeat that work. Packing is TRL's job, so only then does it prepare.
            dataset_kwargs={"skip_prepare_dataset": not params.packing},
            include_num_input_tokens_seen="non_padding",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=on_gpu,
            **self.trainer_arguments(params),
        )

    def trainer_arguments(self, params: TrialParams) -> dict[str, Any]:
        """Further `SFTConfig` arguments of this kind of runner; none for a trial in one process.

        A gang's runner (`runners.gang`) adds its process group's: FSDP or DeepSpeed, the backend.
        """
        return {}

    def training_ended(self, trainer: SFTTrainer, model: torch.nn.Module) -> None:
        """Called in every process as soon as training ends, pruned or not; nothing to do in one process.

        A gang's runner gathers its ranks' figures here, where every rank has arrived together.
        """

    def trained_model(self, trainer: SFTTrainer, model: torch.nn.Module, params: TrialParams):
        """The model to score and save once training is done, or None where this process does neither.

        In one process that is the model trained; a gang's runner consolidates its shards on rank 0.
        """
        return model

    def _save(
        self, model, tokenizer, params: TrialParams, output_dir: Path, trial_number: int | None
    ) -> Path:
        """Write the adapter (or full weights) into place with `write_atomically`."""

        def write(partial: Path) -> None:
            model.save_pretrained(partial, safe_serialization=True)
            if params.method == "full":
                tokenizer.save_pretrained(partial)
            fault = self._faults.get(trial_number)
            if fault is not None and fault.kind == "disk_full":
                raise disk_full()

        return write_atomically(output_dir / ("model" if params.method == "full" else "adapter"), write)

    def run(
        self,
        params: TrialParams,
        output_dir: Path,
        callbacks: TrialCallbacks | None = None,
        trial_number: int | None = None,
    ) -> TrialResult:
        """Train with `params`, score with the sweep's objective, save the adapter under `output_dir`.

        A trial that raises (out of memory included) comes back FAILED with the error, its traceback
        and the peak memory it reached; an interrupt (KeyboardInterrupt) and a bug in this project's
        own code (`core.errors.is_programming_error`) propagate.
        """
        memory = PeakMemory()
        memory.reset()
        try:
            return self._run(params, output_dir, callbacks or TrialCallbacks(), memory, trial_number)
        except Exception as exc:  # any trial error is a FAILED trial, not a dead sweep
            if is_programming_error(exc):
                raise
            return TrialResult(
                status=TrialStatus.FAILED,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                failure_kind="oom" if isinstance(exc, torch.OutOfMemoryError) else "error",
                peak_memory_mb=memory.peak_mb(),
                memory_kind=memory.kind,
            )

    def _run(
        self,
        params: TrialParams,
        output_dir: Path,
        callbacks: TrialCallbacks,
        memory: PeakMemory,
        trial_number: int | None,
    ) -> TrialResult:
        # Before the adapter goes onto the cached base: a TRL that fails to import then leaves it bare.
        from trl import SFTTrainer

        self.prepare()
        started = perf_counter()
        tokenizer = self.models.tokenizer()
        train = self.tokenized.get(tokenizer, self._template, self._splits.train, params.cutoff_len)
        evaluation = self.tokenized.get(
            tokenizer, self._template, self._splits.eval, self.config.objective.max_length
        )
        if train.rows == 0:
            raise ValueError(
                f"cutoff_len={params.cutoff_len} leaves no reply token in any of the {train.dropped_rows} "
                "training rows (every prompt is at least that long); raise cutoff_len"
            )
        eval_data = EvalData(self._splits.eval, evaluation, self._template)
        trainable = self._trainable(params)
        timings = Timings(load_s=perf_counter() - started)
        pruning = None
        if self.config.pruner.eval_every_steps is not None:
            subset = eval_data.head(self.config.pruner.eval_samples)
            pruning = _Pruning(
                self.config.pruner.eval_every_steps,
                lambda: self.objective.score(trainable.model, tokenizer, subset).value,
                callbacks,
            )
        try:
            trainer = SFTTrainer(
                model=trainable.model,
                args=self._sft_config(params, output_dir),
                train_dataset=train.dataset,
                processing_class=tokenizer,
                callbacks=[
                    _Bridge(callbacks),
                    *([pruning] if pruning else []),
                    *self._fault_callbacks(trial_number),
                ],
            )
            trainer.remove_callback(PrinterCallback)
            started = perf_counter()
            trainer.train()
            timings.eval_s = pruning.seconds if pruning else 0.0
            timings.train_s = perf_counter() - started - timings.eval_s
            tokens = int(trainer.state.num_input_tokens_seen)
            measured = {
                "peak_memory_mb": memory.peak_mb(),
                "memory_kind": memory.kind,
                "timings": timings,
                "train_tokens": tokens,
                "train_tokens_per_s": tokens / timings.train_s if timings.train_s > 0 else 0.0,
                "truncated_rows": train.truncated_rows,
            }
            self.training_ended(trainer, trainable.model)
            # Before `trained_model`: a pruned trial is neither scored nor saved, so a gang, whose
            # ranks all stop at the same step, need not gather its weights for it.
            if pruning is not None and pruning.pruned_at is not None:
                return TrialResult(
                    status=TrialStatus.PRUNED,
                    objective=pruning.last_value,
                    metrics={"pruned_at_step": float(pruning.pruned_at)},
                    **measured,
                )
            model = self.trained_model(trainer, trainable.model, params)
            if model is None:
                return TrialResult(status=TrialStatus.COMPLETE, **measured)
            started = perf_counter()
            score = self.objective.score(model, tokenizer, eval_data)
            timings.eval_s += perf_counter() - started
            saved = self._save(model, tokenizer, params, output_dir, trial_number)
        finally:
            trainable.release()
            shutil.rmtree(output_dir / "trainer", ignore_errors=True)
            trainer = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        metrics = {
            **score.metrics,
            "train_rows": float(train.rows),
            "truncated_rows": float(train.truncated_rows),
            "dropped_rows": float(train.dropped_rows),
        }
        # The peak is read again: scoring and saving may have raised it.
        measured["peak_memory_mb"] = memory.peak_mb()
        return TrialResult(
            status=TrialStatus.COMPLETE,
            objective=score.value,
            metrics=metrics,
            adapter_path=str(saved),
            **measured,
        )
