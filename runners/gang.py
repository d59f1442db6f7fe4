"""One rank of a gang trial: the same TRL SFT trial as `runners.sft`, trained by G processes together.

Each of the G processes (started by `sweeps.executors.gang` with torchrun's environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) builds a `GangTrialRunner` and runs the trial's
`TrialParams`. transformers' Trainer, through accelerate, joins the process group, gives each rank
its share of every global batch (G x per_device_batch_size x gradient_accumulation_steps rows a
step) and shards the model with FSDP2 or DeepSpeed ZeRO. With a pruner, every rank runs each
intermediate evaluation (a forward of the sharded model is a collective), rank 0 reports it and
decides, and every rank stops at the step rank 0 says. After training every rank takes part in
gathering the full weights; rank 0 alone scores and saves them, with each rank's peak memory.

A rank process runs trial after trial (`sweeps.executors.gang` keeps its gang), so its runner keeps
the tokenized data and the base's weights between them, as a one-GPU worker does. Unlike there, a
trial cannot wrap the cached base itself: FSDP2's `fully_shard` turns the model it trains into
shards in place. The base therefore stays in CPU memory, never trained, and every trial (and rank
0's unsharded model for scoring) gets a fresh copy of it on the device (`GangTrialRunner.fresh_base`).

Like `runners.sft`, this knows neither Optuna nor MLflow.
"""

from __future__ import annotations

import copy
import gc
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.config import SweepConfig
from core.trial import TrialParams, TrialResult
from runners.memory import PeakMemory
from runners.models import ModelCache, device
from runners.multilora import lora_config, seeded_peft_model
from runners.sft import TrialCallbacks, TrialRunner, _Trainable


@dataclass(frozen=True)
class Rank:
    """Where this process stands in its gang, as torchrun's environment variables say."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Rank:
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_0_decides(report: Callable[[float, int], bool], rank: Rank) -> Callable[[float, int], bool]:
    """`report` for a gang member: rank 0's answer (continue or prune), handed to every rank.

    Only rank 0 holds the Optuna trial, so only its `report` is called; the others wait for its
    answer, and the whole gang stops training at the same step or goes on together. A rank that
    stopped alone would leave the others blocked in the next step's collectives.
    """
    import torch.distributed as dist

    def decide(value: float, step: int) -> bool:
        decision = [report(value, step) if rank.is_main else None]
        dist.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    return decide


def allow_fsdp_on_cpu() -> None:
    """Let accelerate shard with FSDP2 over gloo on CPU processes, as it does on GPUs.

    accelerate 1.15's `AcceleratorState` turns a run into FSDP only for accelerator devices
    (MULTI_GPU, MULTI_XPU, ...); on MULTI_CPU it drops the FSDP plugin without a word and the
    Trainer wraps the model in DistributedDataParallel instead. PyTorch's FSDP2 (`fully_shard`)
    itself runs on CPU with gloo, so a CPU gang keeps the plugin and trains through the very FSDP2
    code path a GPU gang takes. Called only in gang rank processes on CPU, before the Trainer.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_keeps_fsdp_on_cpu", False):
        return

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    init._keeps_fsdp_on_cpu = True
    AcceleratorState.__init__ = init


def _deepspeed_config(strategy: str, offload: bool) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO stage 2 or 3; "auto" lets the Trainer fill in its own settings."""
    zero: dict[str, Any] = {"stage": 3 if strategy == "zero3" else 2}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if strategy == "zero3":
            zero["offload_param"] = {"device": "cpu"}
    if strategy == "zero3":
        # Full weights gathered on save, so rank 0 writes one ordinary checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def _fsdp_file_config(section: dict[str, Any]) -> dict[str, Any]:
    """An accelerate YAML's `fsdp_config` as transformers' `fsdp_config`.

    transformers drops the `fsdp_` prefix of accelerate's key names, but reads offloading from
    `cpu_offload`, which accelerate's YAML calls `fsdp_offload_params`: without this, a recipe's
    `fsdp_offload_params: true` would be dropped without a word and the gang train without offload.
    """
    settings = dict(section)
    offload = settings.get("fsdp_offload_params", settings.get("offload_params"))
    if offload is not None and not {"cpu_offload", "fsdp_cpu_offload"} & set(settings):
        settings["cpu_offload"] = str(offload).strip().lower() in ("true", "1", "yes")
    return settings


def distributed_arguments(config: SweepConfig, on_gpu: bool) -> dict[str, Any]:
    """The `SFTConfig` arguments that make a trial's Trainer a gang member with the configured strategy."""
    dist = config.distributed
    strategy = dist.effective_strategy
    arguments: dict[str, Any] = {}
    if not on_gpu:
        # Without this, transformers leaves a CPU process out of the process group (one
        # process training alone on all the data, G times over).
        arguments |= {"use_cpu": True, "ddp_backend": "gloo"}
    if strategy == "fsdp":
        fsdp = _fsdp_file_config(dist.file_settings) if dist.config_file else {"cpu_offload": dist.offload}
        # FSDP2: FSDP1 is deprecated in transformers 5 and its accelerate plugin refuses CPU processes.
        return arguments | {"fsdp": True, "fsdp_config": {"version": 2, **fsdp}}
    settings = dist.file_settings if dist.config_file else _deepspeed_config(strategy, dist.offload)
    return arguments | {"deepspeed": settings}


def _held_fraction(model: torch.nn.Module) -> float:
    """The share of an FSDP2 model's parameter elements stored in this process: about 1/G.

    FSDP2 turns each parameter it shards into a DTensor whose local shard is what this rank holds;
    a parameter left whole counts whole, so 1.0 would mean nothing was sharded.
    """
    from torch.distributed.tensor import DTensor

    held = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        held += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    return held / total if total else 1.0


def copy_to(model: torch.nn.Module, target: torch.device) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are new tensors on `target`.

    Each tensor is copied straight to `target` (deep-copying first and moving after would hold a
    second full copy in CPU memory on a GPU host). deepcopy's memo maps every tensor object once,
    so weights tied under two names (embeddings and LM head) stay one tensor.
    """
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        copied = parameter.detach().to(target, copy=True)
        memo[id(parameter)] = torch.nn.Parameter(copied, requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to(target, copy=True)
    return copy.deepcopy(model, memo)


class GangTrialRunner(TrialRunner):
    """A `TrialRunner` for one rank of a gang: distributed Trainer arguments, weights gathered on rank 0."""

    def __init__(self, config: SweepConfig, rank: Rank, cache_dir: Path | None = None):
        super().__init__(config, cache_dir)
        # The base is loaded once, into CPU memory, and never trained: `fresh_base` copies it.
        self.models = ModelCache(config.model, place=torch.device("cpu"))
        self._last_model: weakref.ref | None = None
        self.rank = rank
        self.rank_peaks_mb: list[float | None] = []
        """Each rank's peak memory when training ended (filled on rank 0)."""
        self.shard_fraction: float | None = None
        """The share of the model's parameters this rank held while training with FSDP (`_held_fraction`)."""

    def fresh_base(self, quantized: bool) -> torch.nn.Module:
        """An unsharded base model of its own for one trial, on this process's device.

        A copy of the weights kept in CPU memory, not a read from disk. A 4-bit base (QLoRA)
        is loaded from disk each time, as before: bitsandbytes' quantized weights live on the GPU
        and are not copied tensor by tensor.
        """
        if quantized:
            return ModelCache(self.config.model).base(quantized=True)
        return copy_to(self.models.base(), device())

    def _trial_model(self, params: TrialParams) -> torch.nn.Module:
        """The trial's model on a fresh base: the base itself for full fine-tuning, else its adapter on it."""
        base = self.fresh_base(quantized=params.method == "qlora")
        if params.method == "full":
            return base
        return seeded_peft_model(base, lora_config(params), params.seed)

    def _trainable(self, params: TrialParams) -> _Trainable:
        """The trial's model on a fresh base: FSDP2 will shard it, so nothing of it outlives the trial."""
        model = self._trial_model(params)
        if params.method == "full":
            model.requires_grad_(True)
        self._last_model = weakref.ref(model)
        return _Trainable(model)

    def holds_last_model(self) -> bool:
        """Whether the model the last trial trained is still in memory (its shards, on a GPU).

        It should not be: the process lives on to run the next trial, whose model would then
        share the device with the leftover.
        """
        gc.collect()
        return self._last_model is not None and self._last_model() is not None

    def trainer_arguments(self, params: TrialParams) -> dict[str, Any]:
        return distributed_arguments(self.config, torch.cuda.is_available())

    def training_ended(self, trainer, model: torch.nn.Module) -> None:
        """Gather each rank's peak memory on rank 0, and note this rank's share of the FSDP weights.

        Every rank comes here at once, a pruned trial's too, since all stopped at the same step.
        """
        import torch.distributed as dist

        self.shard_fraction = _held_fraction(model) if trainer.is_fsdp_enabled else None
        peaks: list[float | None] = [None] * self.rank.world_size
        dist.all_gather_object(peaks, PeakMemory().peak_mb())
        if self.rank.is_main:
            self.rank_peaks_mb = peaks

    def trained_model(self, trainer, model: torch.nn.Module, params: TrialParams):
        """Gather the full weights on rank 0; there, an unsharded model.

        Every rank must take part in the gathering (it is a collective); only rank 0 gets a model
        back, a fresh base (`fresh_base`) with the trained weights, so scoring and saving run on
        plain modules, not on shards that would need every rank for each forward.
        """
        state = self._full_state_dict(trainer, model)
        if not self.rank.is_main:
            return None
        unsharded = self._trial_model(params)
        unsharded.load_state_dict(state)
        return unsharded

    def _full_state_dict(self, trainer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if trainer.is_deepspeed_enabled:
            return trainer.accelerator.get_state_dict(trainer.model_wrapped)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Works alike on FSDP2's DTensor shards and on replicated (DDP) parameters.
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def run(
        self,
        params: TrialParams,
        output_dir: Path,
        callbacks: TrialCallbacks | None = None,
        trial_number: int | None = None,
    ) -> TrialResult:
        """The trial as `TrialRunner.run`, pruned when rank 0 says; rank 0's result has each rank's peak memory."""
        self.rank_peaks_mb, self.shard_fraction = [], None
        callbacks = callbacks or TrialCallbacks()
        callbacks = replace(callbacks, report=rank_0_decides(callbacks.report, self.rank))
        result = super().run(params, output_dir, callbacks, trial_number)
        known = [peak for peak in self.rank_peaks_mb if peak is not None]
        if not self.rank.is_main or not known:
            return result
        per_rank = {
            f"peak_memory_mb_rank{rank}": peak for rank, peak in enumerate(self.rank_peaks_mb) if peak
        }
        return result.model_copy(
            update={
                "peak_memory_mb": max([*known, result.peak_memory_mb or 0.0]),
                "metrics": {
                    **result.metrics,
                    **per_rank,
                    "gang_size": float(self.rank.world_size),
                    **(
                        {"gang_shard_fraction": self.shard_fraction}
                        if self.shard_fraction is not None
                        else {}
                    ),
                },
            }
        )
