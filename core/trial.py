"""What one trial is given (`TrialParams`) and what it hands back (`TrialResult`).

Both are plain pydantic models so they cross process boundaries (a local worker, a Ray actor) as
dicts and come back validated.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["lora", "qlora", "full"]
Scheduler = Literal[
    "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
]


class TrialParams(BaseModel):
    """Every hyperparameter a trial understands: sampled from the space or fixed in `training:`.

    A name that is not a field here is an unknown parameter, whether it appears in `space:` or
    `training:`; the defaults are the values a trial uses when neither sets it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "lora"
    learning_rate: float = Field(2e-4, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1 trains for num_epochs")
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    cutoff_len: int = Field(1024, ge=8)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: str = Field(
        "all-linear", description="'all-linear' or comma-separated module names, e.g. 'q_proj,v_proj'"
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: Scheduler = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    packing: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42

    @property
    def is_adapter(self) -> bool:
        """True when the trial trains an adapter (LoRA or QLoRA) rather than every weight."""
        return self.method != "full"

    def target_module_list(self) -> str | list[str]:
        """`target_modules` in the form peft expects: the 'all-linear' shortcut or a list of names."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


PARAM_NAMES: tuple[str, ...] = tuple(TrialParams.model_fields)


class TrialStatus(str, Enum):
    """How a trial ended, and the one place that says what each end is called in Optuna and MLflow.

    A pruned trial is a normal end of a run in MLflow (FINISHED, tagged `optuna.state=PRUNED`); a
    killed one (interrupted) is a FAIL in Optuna, which has no state for it, and KILLED in MLflow.
    """

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAILED = "FAILED"
    KILLED = "KILLED"

    @property
    def optuna_state(self) -> str:
        """The name of the `optuna.trial.TrialState` this end is told as."""
        return {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED"}.get(self.value, "FAIL")

    @property
    def mlflow_status(self) -> str:
        """The MLflow run status a trial's run is closed with."""
        return {"FAILED": "FAILED", "KILLED": "KILLED"}.get(self.value, "FINISHED")


class Timings(BaseModel):
    """Wall time of a trial split by phase, in seconds."""

    load_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.load_s + self.train_s + self.eval_s


class TrialResult(BaseModel):
    """Everything a finished trial reports back; the tracker and the study read nothing else."""

    status: TrialStatus
    objective: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    adapter_path: str | None = None
    peak_memory_mb: float | None = None
    memory_kind: Literal["cuda_max_allocated", "cpu_peak_rss"] | None = None
    timings: Timings = Field(default_factory=Timings)
    train_tokens: int = 0
    train_tokens_per_s: float = 0.0
    truncated_rows: int = 0
    error: str | None = None
    """One line: what the table and the run's `error` tag show."""
    traceback: str | None = None
    """The full traceback of a failed trial, kept as the run's `error.txt` artifact."""
    failure_kind: Literal["oom", "error", "nonfinite"] | None = None
