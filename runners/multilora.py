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

import copy
import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn
from transformers import get_scheduler

from core.trial import TrialParams

_ADAPTER = "default"

# MultiAdamW points each stacked parameter's gradient at a strided view of one flat buffer, and
# autograd then accumulates into it in place; torch warns that such a gradient "may impair
# performance", which one in-place add per tensor does not.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


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


def distinct_equal_runs(owners: Sequence[int]) -> list[int] | None:
    """The owner of each run if `owners` is runs of one length, each of another owner; else None."""
    runs = [(owner, len(list(group))) for owner, group in itertools.groupby(owners)]
    if not runs or len({length for _, length in runs}) != 1 or len({o for o, _ in runs}) != len(runs):
        return None
    return [owner for owner, _ in runs]


class Routing:
    """Which slot each batch row goes through; one object shared by every layer of a model.

    Three modes: `rows` (a LongTensor of slot ids, one per batch row, plus the set of slots
    present; `groups` when the rows come as equal runs of one slot each), one `slot` for every row
    (evaluation, generation, a pack of one), or neither: the base alone.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.rows: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self.present: frozenset[int] = frozenset()
        self.slot: int | None = None
        self.cache: dict | None = None
        self.dropout = [0.0] * capacity
        self.dropout_tensor = torch.zeros(capacity, device=device)

    def set_dropout(self, slot: int, p: float) -> None:
        self.dropout[slot] = p
        self.dropout_tensor[slot] = p

    @contextmanager
    def by_row(
        self, rows: torch.Tensor, present: Iterable[int] | None = None, frozen: bool = False
    ) -> Iterator[None]:
        """Route row i of the next forwards through slot `rows[i]`.

        `present` (the distinct slots in `rows`) spares a device-to-host copy of `rows`.
        `frozen`: the adapters do not change meanwhile (evaluation, generation), so each layer
        prepares its products once for every forward inside (every decode step of a batch).
        """
        self.rows = rows
        self.present = frozenset(rows.tolist() if present is None else present)
        self.cache = {} if frozen else None
        try:
            yield
        finally:
            self.rows, self.present, self.cache = None, frozenset(), None

    def row_mask(self, capacity: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, capacity * rank]: 1 on the rank columns of each row's slot, 0 elsewhere (cached)."""
        key = ("mask", rank, dtype)
        if key not in self.cache:
            one_hot = torch.nn.functional.one_hot(self.rows, capacity).to(dtype)
            self.cache[key] = one_hot.repeat_interleave(rank, dim=1)
        return self.cache[key]

    @contextmanager
    def by_group(self, groups: torch.Tensor, present: Iterable[int]) -> Iterator[None]:
        """Route the batch, cut into `len(groups)` equal runs of rows, run g through slot `groups[g]`.

        Each run is then one matrix product per adapter matmul (rows x tokens at once), and only
        one adapter per run is gathered instead of one per row. `present`: the slots in `groups`.
        """
        self.groups = groups
        self.present = frozenset(present)
        try:
            yield
        finally:
            self.groups, self.present = None, frozenset()

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

    @staticmethod
    def _gathered(stacked: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Cast the fewer elements: the gathered ones when there are fewer runs than slots, the
        # stack when many rows (generation batches) share few slots.
        if index.numel() <= stacked.shape[0]:
            return stacked.index_select(0, index).to(dtype)
        return stacked.to(dtype).index_select(0, index)

    def _frozen_rows(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows through their slots with every slot side by side: h @ [A_0 .. A_K-1], masked, @ [B; ..].

        Generation batches hold many rows over few slots; gathering each row's A and B would copy
        them once per row at every decode step. Computing every slot's low-rank product and masking
        the others costs K x r columns instead of r, which is small next to the base's matmul.
        """
        routing = self.routing
        capacity, rank = self.A.shape[0], self.A.shape[2]
        key = id(self)
        if key not in routing.cache:
            A = self.A.permute(1, 0, 2).to(dtype).contiguous().reshape(self.in_features, capacity * rank)
            B = (
                (self.B * self.scale.view(capacity, 1, 1))
                .to(dtype)
                .reshape(capacity * rank, self.out_features)
            )
            routing.cache[key] = (A, B)
        A, B = routing.cache[key]
        n = routing.rows.numel()
        h = x.to(dtype).reshape(n, -1, self.in_features)
        low = (h @ A) * routing.row_mask(capacity, rank, dtype).view(n, 1, -1)
        return (y + (low @ B).reshape(*y.shape[:-1], self.out_features)).to(y.dtype)

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
        if not any(self.targets[s] for s in routing.present):
            return y
        if routing.cache is not None and routing.rows is not None:
            return self._frozen_rows(x, y, dtype)
        # Rows (one adapter each) or equal runs of rows (one adapter a run) as the batch dimension.
        index = routing.rows if routing.groups is None else routing.groups
        n = index.numel()
        h = x.to(dtype).reshape(n, -1, self.in_features)
        if self.training and any(routing.dropout[s] > 0 for s in routing.present):
            h = self._dropout(h, routing.dropout_tensor.index_select(0, index).to(dtype).view(n, 1, 1))
        A, B = self._gathered(self.A, index, dtype), self._gathered(self.B, index, dtype)
        # The scale goes on the rank-wide product and the add into the second matmul (baddbmm):
        # scaling and adding the output-wide delta were full passes over every target module's
        # output, forward and backward, and the largest device cost of a pack step (H100 profile).
        low = torch.bmm(h, A) * self.scale.index_select(0, index).to(dtype).view(n, 1, 1)
        out = torch.baddbmm(y.reshape(n, -1, self.out_features).to(dtype), low, B)
        return out.reshape(y.shape).to(y.dtype)


_Init = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
"""Per target module: lora_A [r, in] and lora_B [out, r] in fp32, and the scaling."""

KEPT_DRAWS = 4
"""Drawn inits a pack keeps for later trials with the same targets, rank and seed (~70 MB each at
rank 32 on every linear of a 0.5B model, the zero B matrices included)."""


def lora_scale(config: LoraConfig) -> float:
    """peft's scaling of the LoRA product: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config.r
    return config.lora_alpha / math.sqrt(r) if config.use_rslora else config.lora_alpha / r


def draw_lora_init(shapes: dict[str, tuple[int, int, torch.dtype]], config: LoraConfig, seed: int) -> _Init:
    """peft's default LoRA init for modules of these (in, out, base dtype), as `seeded_peft_model` draws it.

    peft injects modules in `named_modules` order; each gets `nn.Linear(in, r)` and
    `nn.Linear(r, out)`, both initialised by their constructors, then lora_A drawn again with
    `kaiming_uniform_(a=sqrt(5))` and lora_B zeroed; the weights then pass through the dtype of a
    floating-point base weight on their way to its device. The same draws from the same CPU
    generator give the same values, without building a peft model over the whole base (which walks
    every module).
    """
    r = config.r
    scale = lora_scale(config)
    init: _Init = {}
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for name, (fan_in, fan_out, base_dtype) in shapes.items():
            for shape in ((r, fan_in), (fan_out, r)):  # the two constructors' draws
                nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
            A = torch.empty(r, fan_in)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if base_dtype.is_floating_point:
                A = A.to(base_dtype).float()
            init[name] = (A, torch.zeros(fan_out, r), scale)
    return init


def _same_init(a: _Init, b: _Init) -> bool:
    return list(a) == list(b) and all(
        torch.equal(a[name][0].cpu(), b[name][0].cpu())
        and torch.equal(a[name][1].cpu(), b[name][1].cpu())
        and a[name][2] == b[name][2]
        for name in a
    )


@dataclass
class _Targets:
    """What peft's injection resolved for one `target_modules` setting, kept for later trials with it."""

    shapes: dict[str, tuple[int, int, torch.dtype]]
    """Targeted module -> (in, out) features and its base weight's dtype, in injection order."""
    config: LoraConfig
    """The resolved config: target modules as peft expanded them, the base model's name."""
    dtype: torch.dtype
    drawn_matches_peft: bool
    """`draw_lora_init` gave peft's own init bit for bit when checked against it; if not (another
    peft release initialises differently), every trial keeps going through peft."""


@dataclass
class _Slot:
    config: LoraConfig
    """The config as peft left it after injection: target modules resolved, base model named."""
    rank: int
    targets: frozenset[str]
    dtype: torch.dtype
    """The dtype peft keeps this adapter's weights in (fp32 on a half-precision base)."""


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
        self._targets: dict[str | tuple[str, ...], _Targets] = {}
        self._drawn: OrderedDict[tuple, _Init] = OrderedDict()

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

    def _peft_init(self, config: LoraConfig, seed: int) -> tuple[_Init, _Targets]:
        """The init and resolved targets of `config`, from peft itself on the plain base."""
        with self._plain_base():
            peft_model = seeded_peft_model(self.model, config, seed)
            try:
                lora_layers = self._lora_layers(self.model)
                init = {
                    name: (
                        module.lora_A[_ADAPTER].weight.detach().float().clone(),
                        module.lora_B[_ADAPTER].weight.detach().float().clone(),
                        module.scaling[_ADAPTER],
                    )
                    for name, module in lora_layers.items()
                }
                resolved = copy.deepcopy(peft_model.peft_config[_ADAPTER])
                if resolved.base_model_name_or_path is None:
                    resolved.base_model_name_or_path = self.model.__dict__.get("name_or_path") or None
                targets = _Targets(
                    shapes={
                        name: (module.in_features, module.out_features, module.get_base_layer().weight.dtype)
                        for name, module in lora_layers.items()
                    },
                    config=resolved,
                    dtype=next(iter(lora_layers.values())).lora_A[_ADAPTER].weight.dtype,
                    drawn_matches_peft=False,
                )
            finally:
                peft_model.unload()
        return init, targets

    def _init(self, config: LoraConfig, seed: int) -> tuple[_Init, LoraConfig, torch.dtype]:
        """The slot's init, its resolved config and its dtype, through peft once per target setting.

        The first trial with a `target_modules` setting goes through peft, and the targets peft
        resolved are kept; `draw_lora_init` is checked against it then. Later trials with that
        setting draw the same init directly: peft's pass walks the whole base and cost 0.5-0.9 s
        a trial on a 0.5B model (2-core CPU), while every other trial in the pack waited.
        """
        spec = config.target_modules
        key = spec if isinstance(spec, str) else tuple(sorted(spec))
        known = self._targets.get(key)
        if known is not None and known.drawn_matches_peft:
            resolved = copy.deepcopy(config)
            resolved.target_modules = copy.deepcopy(known.config.target_modules)
            resolved.base_model_name_or_path = known.config.base_model_name_or_path
            return self._draw(key, known, config, seed), resolved, known.dtype
        init, targets = self._peft_init(config, seed)
        if known is None:
            targets.drawn_matches_peft = _same_init(draw_lora_init(targets.shapes, config, seed), init)
            self._targets[key] = targets
        return init, targets.config, targets.dtype

    def _draw(self, key, targets: _Targets, config: LoraConfig, seed: int) -> _Init:
        """`draw_lora_init`, kept for the last `KEPT_DRAWS` (targets, rank, seed).

        The init depends on nothing else (the scale is the config's), and trials of one sweep
        often share a seed: drawing is ~0.1-0.2 s a trial on the CPU, the pack waiting meanwhile.
        Slots copy the kept tensors, never write them.
        """
        draw_key = (key, config.r, seed)
        drawn = self._drawn.pop(draw_key, None)
        if drawn is None:
            drawn = draw_lora_init(targets.shapes, config, seed)
        self._drawn[draw_key] = drawn
        while len(self._drawn) > KEPT_DRAWS:
            self._drawn.popitem(last=False)
        scale = lora_scale(config)
        return {name: (A, B, scale) for name, (A, B, _) in drawn.items()}

    def assign(self, slot: int, config: LoraConfig, seed: int) -> None:
        """Fill `slot` with the init peft gives `config` under `seeded_peft_model(..., seed)`."""
        if config.r > self.rank:
            for layer in self.layers.values():
                layer.grow(config.r)
            self.rank = config.r
        init, resolved, dtype = self._init(config, seed)
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
        self.slots[slot] = _Slot(resolved, config.r, frozenset(init), dtype)

    def free(self, slot: int) -> None:
        """Clear `slot`: zero weights, no targets, free for the next `assign`."""
        for layer in self.layers.values():
            layer.set_slot(slot, None, None, 0.0)
        self.routing.set_dropout(slot, 0.0)
        self.slots[slot] = None

    def router(self, slots: Sequence[int]) -> Callable[[Sequence[int]], AbstractContextManager]:
        """A `RowRouter` over `slots`: rows the objective gives to adapter k go through `slots[k]`.

        Batches made of equal runs, one adapter each (eval batches come adapter by adapter), are
        routed a run at a time: each layer's low-rank product is then r columns wide, where row
        routing computes every slot's side by side (K x r) and masks.
        """

        def route(rows: Sequence[int]) -> AbstractContextManager:
            owners = [slots[row] for row in rows]
            runs = distinct_equal_runs(owners)
            if runs is not None and len(runs) == 1:
                return self.routing.one_slot(runs[0])
            if runs is not None:
                return self.routing.by_group(torch.tensor(runs, device=self.device), runs)
            return self.routing.by_row(torch.tensor(owners, device=self.device), present=slots, frozen=True)

        return route

    def _slot(self, slot: int) -> _Slot:
        info = self.slots[slot]
        if info is None:
            raise ValueError(f"slot {slot} holds no adapter")
        return info

    def export(self, slot: int, folder: Path) -> None:
        """Write `slot` as an ordinary PEFT adapter folder (`PeftModel.from_pretrained` loads it).

        The files are what `PeftModel.save_pretrained` writes (weights under peft's key names, in
        its dtype; the config in inference mode), written directly: building a throwaway peft
        model to save through walks the whole base twice and took ~1 s a trial on a 0.5B model
        while the rest of the pack waited.
        """
        info = self._slot(slot)
        tensors = {}
        with torch.no_grad():
            for name in sorted(info.targets):
                A, B = self.layers[name].slot_weights(slot, info.rank)
                tensors[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu", info.dtype).contiguous()
                tensors[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu", info.dtype).contiguous()
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        config = copy.deepcopy(info.config)
        config.inference_mode = True
        config.save_pretrained(str(folder))

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

    Every parameter, its gradient and its two moments are views of four [K, T] buffers (T: the
    elements of one slot over all tensors), so a step is about fifteen kernels over whole buffers,
    whatever the number of tensors: a loop over the ~340 stacked tensors of a 0.5B model took
    ~5,000 kernel launches a step, more than the forward and backward together. Slots that do not
    step get factors that leave them exactly as they are (weight 0 in the moment updates, step
    size 0). The buffers are laid out again when a parameter appears, widens or is replaced.
    """

    def __init__(
        self,
        params: Callable[[], Sequence[nn.Parameter]],
        capacity: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = params
        self.capacity = capacity
        self.betas = betas
        self.eps = eps
        self.steps = [0] * capacity
        self.weight_decay = [0.0] * capacity
        self.max_grad_norm = [1.0] * capacity
        self._views: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _laid_out(self, params: Sequence[nn.Parameter]) -> bool:
        return len(params) == len(self._views) and all(
            p is view[0] and p.data.data_ptr() == view[1].data_ptr() and p.shape == view[1].shape
            for p, view in zip(params, self._views)
        )

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The [K, T] buffers, laid out again if the parameters changed; gradients re-pointed at them."""
        params = list(self.params())
        if not params:
            return None
        if not self._laid_out(params):
            old = {id(view[0]): view for view in self._views}
            total = sum(p[0].numel() for p in params)
            weights, grads, exp_avg, exp_avg_sq = (
                torch.zeros(self.capacity, total, dtype=params[0].dtype, device=params[0].device)
                for _ in range(4)
            )
            views = []
            offset = 0
            for p in params:
                size = p[0].numel()
                new = [
                    b[:, offset : offset + size].view(p.shape) for b in (weights, grads, exp_avg, exp_avg_sq)
                ]
                offset += size
                new[0].copy_(p.data)
                if p.grad is not None:
                    new[1].copy_(p.grad)
                previous = old.get(id(p))
                if previous is not None:
                    # A widened parameter keeps its moments in the leading columns; the new ones never stepped.
                    for target, moment in zip(new[2:], previous[3:]):
                        target[tuple(slice(0, n) for n in moment.shape)] = moment
                p.data = new[0]
                p.grad = new[1]
                views.append((p, *new))
            self._views = views
            self._buffers = (weights, grads, exp_avg, exp_avg_sq)
        for p, _, grad, _, _ in self._views:
            if p.grad is not grad:
                # Someone set `.grad` anew (or to None): take its values back into the buffer.
                grad.copy_(p.grad) if p.grad is not None else grad.zero_()
                p.grad = grad
        return self._buffers

    def reset(self, slot: int, weight_decay: float, max_grad_norm: float) -> None:
        """Start `slot` afresh: no steps, zero moments and gradients."""
        self.steps[slot] = 0
        self.weight_decay[slot] = weight_decay
        self.max_grad_norm[slot] = max_grad_norm
        buffers = self._layout()
        if buffers is not None:
            for buffer in buffers[1:]:
                buffer[slot].zero_()

    def zero_grad(self, slots: Sequence[int]) -> None:
        buffers = self._layout()
        if buffers is not None and slots:
            buffers[1][list(slots)] = 0

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor | None:
        """Each slot's global gradient norm, on the device, without a host sync (None: no parameters)."""
        buffers = self._layout()
        return None if buffers is None else torch.linalg.vector_norm(buffers[1], dim=1)

    @torch.no_grad()
    def step(
        self, slots: Sequence[int], learning_rates: Sequence[float], norms: torch.Tensor | None = None
    ) -> None:
        """Clip and step `slots` at the given rates and zero their gradients.

        `norms` (from `grad_norms()`, when the caller already has them) saves recomputing them.
        Nothing here waits for the device.
        """
        buffers = self._layout()
        if not slots or buffers is None:
            return
        weights, grads, exp_avg, exp_avg_sq = buffers
        if norms is None:
            norms = torch.linalg.vector_norm(grads, dim=1)
        beta1, beta2 = self.betas
        # Per-slot factors, computed on the host in double precision as torch does, neutral for
        # slots that do not step; one host-to-device copy.
        neutral = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
        factors = [list(neutral) for _ in range(self.capacity)]
        for slot, rate in zip(slots, learning_rates):
            self.steps[slot] += 1
            t = self.steps[slot]
            factors[slot] = [
                self.max_grad_norm[slot],
                1 - float(rate) * self.weight_decay[slot],
                1 - beta1,
                beta2,
                1 - beta2,
                float(rate) / (1 - beta1**t),
                math.sqrt(1 - beta2**t),
                0.0,
            ]
        table = torch.tensor(factors, dtype=weights.dtype)
        if weights.is_cuda:
            table = table.pin_memory()
        max_norm, decay, m_weight, v_keep, v_weight, step_size, bc2_sqrt, idle = (
            column.unsqueeze(1) for column in table.to(weights.device, non_blocking=True).t()
        )
        # clip_grad_norm_'s coefficient; 1 (no change) for idle slots.
        clip = torch.where(idle == 0, torch.clamp(max_norm / (norms.unsqueeze(1) + 1e-6), max=1.0), 1.0)
        grads.mul_(clip)
        weights.mul_(decay)
        exp_avg.lerp_(grads, m_weight)
        exp_avg_sq.mul_(v_keep).addcmul_(grads * v_weight, grads)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
        weights.add_(exp_avg / denom * -step_size)
        grads.mul_(idle)
