"""Several LoRA adapters on one frozen base, each batch row through its own adapter, and their optimizer.

A `MultiLoRALinear` wraps a base linear (nn.Linear, or bitsandbytes Linear4bit for QLoRA: only
`base(x)` is called) and holds K adapter *slots* stacked: A as [K, in, r_max] and B as
[K, r_max, out] in fp32. A forward computes `base(x) + scale[s] * (dropout(x) @ A[s]) @ B[s]`
with `s` the slot of each row, as two batched matmuls whatever K is: K small kernels per module
would multiply the launch floor of a step by K, which is the cost packing removes.

Per-slot differences are data, not modules:
- rank: a slot of rank r uses the first r columns of A and rows of B; the rest are zero, so they
  add nothing and get exactly zero gradient (their AdamW update is then zero too);
- target modules: the model holds the union of every slot's targets; a slot that does not target
  a module has scale 0 and zero A/B there;
- scale (alpha/r, alpha/sqrt(r) for rsLoRA) and dropout on the LoRA input.

`MultiLoRA` injects the layers into a model, fills a slot exactly as peft would initialise that
`LoraConfig` (the init rule, `seeded_peft_model`: peft's own init drawn from the CPU generator
seeded with the trial's seed), exports a slot as an ordinary PEFT adapter folder, merges one slot
into the base for evaluation and restores the base bit for bit, and removes itself.
`MultiAdamW` steps the stacked tensors with per-slot learning rate, weight decay, step count and
gradient clipping, matching torch.optim.AdamW and `clip_grad_norm_` in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import get_scheduler

from core.trial import TrialParams

_ADAPTER = "default"


def lora_config(params: TrialParams) -> LoraConfig:
    """The peft `LoraConfig` of a LoRA / QLoRA trial."""
    return LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        use_rslora=params.use_rslora,
        target_modules=params.target_module_list(),
        task_type="CAUSAL_LM",
    )


def seeded_peft_model(model: nn.Module, config: LoraConfig, seed: int) -> PeftModel:
    """`get_peft_model` with the LoRA init drawn from the CPU generator seeded with `seed`.

    This is the init rule packed and unpacked trials share: peft creates and initialises its LoRA
    weights on the CPU before moving them to the base's device, so the CPU generator alone decides
    them. The process's own random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return get_peft_model(model, config)


class Routing:
    """Which slot each batch row goes through; one object shared by every layer of a model.

    Three modes: `rows` (a LongTensor of slot ids, one per batch row, plus the set of slots
    present), one `slot` for every row (evaluation, generation, a pack of one), or neither: the
    base alone.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.rows: torch.Tensor | None = None
        self.present: frozenset[int] = frozenset()
        self.slot: int | None = None
        self.dropout = [0.0] * capacity
        self.dropout_tensor = torch.zeros(capacity, device=device)

    def set_dropout(self, slot: int, p: float) -> None:
        self.dropout[slot] = p
        self.dropout_tensor[slot] = p

    @contextmanager
    def by_row(self, rows: torch.Tensor) -> Iterator[None]:
        """Route row i of the next forwards through slot `rows[i]`."""
        self.rows, self.present = rows, frozenset(rows.tolist())
        try:
            yield
        finally:
            self.rows, self.present = None, frozenset()

    @contextmanager
    def one_slot(self, slot: int) -> Iterator[None]:
        """Route every row of the next forwards, whatever the batch, through `slot`."""
        self.slot = slot
        try:
            yield
        finally:
            self.slot = None


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus K stacked LoRA slots, routed per row by a shared `Routing`."""

    def __init__(self, base: nn.Module, capacity: int, rank: int, routing: Routing):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = base.weight.device
        self.A = nn.Parameter(torch.zeros(capacity, self.in_features, rank, device=device))
        self.B = nn.Parameter(torch.zeros(capacity, rank, self.out_features, device=device))
        self.register_buffer("scale", torch.zeros(capacity, device=device), persistent=False)
        # Python copies of what the forward branches on, so routing decisions never sync a GPU.
        self.scales = [0.0] * capacity
        self.targets = [False] * capacity
        self.routing = routing

    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Fill `slot` with peft-layout weights (A as [r, in], B as [out, r]), or clear it (None)."""
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            if A is not None:
                r = A.shape[0]
                self.A[slot, :, :r] = A.t()
                self.B[slot, :r, :] = B.t()
        targeted = A is not None
        self.targets[slot] = targeted
        self.scales[slot] = scale if targeted else 0.0
        self.scale[slot] = self.scales[slot]

    def slot_weights(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's weights in peft's layout: lora_A [r, in], lora_B [out, r]."""
        return self.A[slot, :, :rank].t(), self.B[slot, :rank, :].t()

    def grow(self, rank: int) -> None:
        """Widen every slot to `rank` columns; the new columns are zero, so nothing changes."""
        extra = rank - self.A.shape[2]
        if extra <= 0:
            return
        # Gradients grow too: other slots may be midway through gradient accumulation.
        for p, padding in ((self.A, (0, extra)), (self.B, (0, 0, 0, extra))):
            grad = p.grad
            p.data = nn.functional.pad(p.data, padding)
            p.grad = None if grad is None else nn.functional.pad(grad, padding)

    def delta_weight(self, slot: int) -> torch.Tensor:
        """The slot's update of the base weight, [out, in], as peft merges it."""
        return (self.A[slot] @ self.B[slot]).t() * self.scales[slot]

    def _dropout(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        keep = torch.rand_like(x) >= p
        return x * keep / (1 - p)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Half-precision activations keep their dtype, as peft's layers do under a bf16 trainer's
        # autocast: upcasting every input to the fp32 master weights would store an fp32 copy of
        # each activation for the backward pass and run the adapter matmuls without tensor cores.
        return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.A.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routing = self.routing
        dtype = self._compute_dtype(x)
        if routing.slot is not None:
            slot = routing.slot
            if not self.targets[slot]:
                return y
            h = nn.functional.dropout(x.to(dtype), routing.dropout[slot], self.training)
            # Same order of operations as peft's lora.Linear: B(A(x)) * scaling.
            delta = (h @ self.A[slot].to(dtype)) @ self.B[slot].to(dtype) * self.scales[slot]
            return (y + delta).to(y.dtype)
        if routing.rows is None or not any(self.targets[s] for s in routing.present):
            return y
        rows = routing.rows
        n = rows.numel()
        h = x.to(dtype).reshape(n, -1, self.in_features)
        if self.training and any(routing.dropout[s] > 0 for s in routing.present):
            h = self._dropout(h, routing.dropout_tensor.index_select(0, rows).to(dtype).view(n, 1, 1))
        A, B = self.A.to(dtype).index_select(0, rows), self.B.to(dtype).index_select(0, rows)
        delta = torch.bmm(torch.bmm(h, A), B) * self.scale.index_select(0, rows).to(dtype).view(n, 1, 1)
        return (y + delta.reshape(*y.shape[:-1], self.out_features)).to(y.dtype)


@dataclass
class _Slot:
    config: LoraConfig
    rank: int
    targets: frozenset[str]


class MultiLoRA:
    """K LoRA slots injected into one base model; the base's own modules come back on `remove()`.

    The model holds `MultiLoRALinear` layers on the union of the assigned slots' target modules
    (added as slots need them). Every peft call (init, export) runs on the plain base: the layers
    are swapped out for the base linears meanwhile, so peft's own rules ('all-linear' included)
    decide what a slot targets.
    """

    def __init__(self, model: nn.Module, capacity: int):
        self.model = model
        self.capacity = capacity
        self.device = next(model.parameters()).device
        self.routing = Routing(capacity, self.device)
        self.layers: dict[str, MultiLoRALinear] = {}
        self.slots: list[_Slot | None] = [None] * capacity
        self.rank = 1

    def parameters(self) -> list[nn.Parameter]:
        """Every stacked A and B, in a stable order."""
        return [p for layer in self.layers.values() for p in (layer.A, layer.B)]

    def _place(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    @contextmanager
    def _plain_base(self) -> Iterator[None]:
        """The base's own linears back in place for the duration (for peft)."""
        for name, layer in self.layers.items():
            self._place(name, layer.base)
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                self._place(name, layer)

    @staticmethod
    def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
        return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}

    def assign(self, slot: int, config: LoraConfig, seed: int) -> None:
        """Fill `slot` with the init peft gives `config` under `seeded_peft_model(..., seed)`."""
        if config.r > self.rank:
            for layer in self.layers.values():
                layer.grow(config.r)
            self.rank = config.r
        with self._plain_base():
            peft_model = seeded_peft_model(self.model, config, seed)
            try:
                init = {
                    name: (
                        module.lora_A[_ADAPTER].weight.detach().float().clone(),
                        module.lora_B[_ADAPTER].weight.detach().float().clone(),
                        module.scaling[_ADAPTER],
                    )
                    for name, module in self._lora_layers(self.model).items()
                }
            finally:
                peft_model.unload()
        for name in init:
            if name not in self.layers:
                self.layers[name] = MultiLoRALinear(
                    self.model.get_submodule(name), self.capacity, self.rank, self.routing
                )
                self._place(name, self.layers[name])
        for name, layer in self.layers.items():
            A, B, scale = init.get(name, (None, None, 0.0))
            layer.set_slot(slot, A, B, scale)
        self.routing.set_dropout(slot, config.lora_dropout)
        self.slots[slot] = _Slot(config, config.r, frozenset(init))

    def free(self, slot: int) -> None:
        """Clear `slot`: zero weights, no targets, free for the next `assign`."""
        for layer in self.layers.values():
            layer.set_slot(slot, None, None, 0.0)
        self.routing.set_dropout(slot, 0.0)
        self.slots[slot] = None

    def _slot(self, slot: int) -> _Slot:
        info = self.slots[slot]
        if info is None:
            raise ValueError(f"slot {slot} holds no adapter")
        return info

    def export(self, slot: int, folder: Path) -> None:
        """Write `slot` as an ordinary PEFT adapter folder (`PeftModel.from_pretrained` loads it)."""
        info = self._slot(slot)
        with self._plain_base():
            # The throwaway init must not move the process's random state either.
            peft_model = seeded_peft_model(self.model, info.config, 0)
            try:
                with torch.no_grad():
                    for name, module in self._lora_layers(self.model).items():
                        A, B = self.layers[name].slot_weights(slot, info.rank)
                        module.lora_A[_ADAPTER].weight.copy_(A)
                        module.lora_B[_ADAPTER].weight.copy_(B)
                peft_model.save_pretrained(str(folder), safe_serialization=True)
            finally:
                peft_model.unload()

    def can_merge(self, slot: int) -> bool:
        """Whether every module `slot` targets has a floating-point weight (not 4-bit) to merge into."""
        return all(self.layers[name].base.weight.dtype.is_floating_point for name in self._slot(slot).targets)

    @contextmanager
    def merged(self, slot: int) -> Iterator[None]:
        """The base runs with `slot` merged into its weights, then gets them back bit for bit.

        Merging and unmerging in bf16 does not give the weights back exactly, and the base serves
        every later trial, so the touched weights are restored from a copy kept meanwhile.
        """
        kept: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name in self._slot(slot).targets:
                    weight = self.layers[name].base.weight
                    kept[name] = weight.detach().clone()
                    weight += self.layers[name].delta_weight(slot).to(weight.dtype)
            yield
        finally:
            with torch.no_grad():
                for name, weight in kept.items():
                    self.layers[name].base.weight.copy_(weight)

    def remove(self) -> None:
        """Put the base's own linears back; the model is then exactly the base it was."""
        for name, layer in self.layers.items():
            self._place(name, layer.base)
        self.layers.clear()
        self.slots = [None] * self.capacity


class LRSchedule:
    """One trial's learning rate per optimizer step, as transformers' `get_scheduler` computes it.

    A ratio warmup becomes `ceil(ratio * total_steps)` steps, as `TrainingArguments` does for a
    `warmup_steps` below 1.
    """

    def __init__(self, name: str, learning_rate: float, warmup_ratio: float, total_steps: int):
        self._optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
        self._scheduler = get_scheduler(
            name,
            self._optimizer,
            num_warmup_steps=math.ceil(total_steps * warmup_ratio),
            num_training_steps=total_steps,
        )

    def current(self) -> float:
        """The rate of the step about to be taken."""
        return self._optimizer.param_groups[0]["lr"]

    def advance(self) -> None:
        # The stand-in optimizer has no gradient, so its step is a no-op; it only tells the
        # scheduler the step happened in the order torch expects.
        self._optimizer.step()
        self._scheduler.step()


class MultiAdamW:
    """AdamW over stacked [K, ...] tensors, each slot its own optimizer.

    Per slot: learning rate (given at each step), weight decay, step count, and gradient clipping
    to `max_grad_norm` of the slot's global gradient norm over all its tensors. Only the slots
    named in `step()` move; the others keep accumulating gradients (gradient accumulation) or stay
    empty. The math is torch.optim.AdamW's (decoupled weight decay, bias corrections) and
    `clip_grad_norm_`'s, in fp32.
    """

    def __init__(
        self,
        params: Callable[[], Sequence[nn.Parameter]],
        capacity: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = params
        self.betas = betas
        self.eps = eps
        self.steps = [0] * capacity
        self.weight_decay = [0.0] * capacity
        self.max_grad_norm = [1.0] * capacity
        self._moments: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}

    def _state(self, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self._moments.get(p)
        if moments is None or moments[0].shape != p.shape:
            # New or widened parameter: widened columns are zero and have never stepped.
            fresh = (torch.zeros_like(p), torch.zeros_like(p))
            if moments is not None:
                for new, old in zip(fresh, moments):
                    new[tuple(slice(0, n) for n in old.shape)] = old
            moments = self._moments[p] = fresh
        return moments

    def reset(self, slot: int, weight_decay: float, max_grad_norm: float) -> None:
        """Start `slot` afresh: no steps, zero moments and gradients."""
        self.steps[slot] = 0
        self.weight_decay[slot] = weight_decay
        self.max_grad_norm[slot] = max_grad_norm
        for p in self.params():
            for moment in self._state(p):
                moment[slot].zero_()
        self.zero_grad([slot])

    def zero_grad(self, slots: Sequence[int]) -> None:
        for p in self.params():
            if p.grad is not None:
                p.grad[list(slots)] = 0

    @torch.no_grad()
    def step(self, slots: Sequence[int], learning_rates: Sequence[float]) -> list[float]:
        """Clip and step `slots` at the given rates, zero their gradients; their grad norms before clipping."""
        if not slots:
            return []
        params = [p for p in self.params() if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        sel = torch.tensor(list(slots), device=device)
        n = len(slots)
        grads = [p.grad.index_select(0, sel) for p in params]
        # clip_grad_norm_: the norm of the per-tensor norms, then one coefficient for all tensors.
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
        total = torch.linalg.vector_norm(norms, dim=0)
        max_norm = torch.tensor([self.max_grad_norm[s] for s in slots], device=device)
        clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        beta1, beta2 = self.betas
        for s in slots:
            self.steps[s] += 1

        # Per-slot scalars in double precision, as torch computes them in Python, then fp32.
        def per_slot(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        lr = [float(x) for x in learning_rates]
        decay = per_slot([1 - lr[i] * self.weight_decay[s] for i, s in enumerate(slots)])
        step_size = per_slot([lr[i] / (1 - beta1 ** self.steps[s]) for i, s in enumerate(slots)])
        bc2_sqrt = per_slot([math.sqrt(1 - beta2 ** self.steps[s]) for s in slots])
        for p, g in zip(params, grads):
            shape = (n,) + (1,) * (p.dim() - 1)
            g.mul_(clip.view(shape))
            exp_avg, exp_avg_sq = self._state(p)
            w = p.index_select(0, sel)
            m = exp_avg.index_select(0, sel)
            v = exp_avg_sq.index_select(0, sel)
            w.mul_(decay.view(shape))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(self.eps)
            w.add_(m / denom * -step_size.view(shape))
            p.index_copy_(0, sel, w)
            exp_avg.index_copy_(0, sel, m)
            exp_avg_sq.index_copy_(0, sel, v)
            p.grad.index_fill_(0, sel, 0)
        return total.tolist()
