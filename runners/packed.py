"""Packed trials: up to K LoRA / QLoRA trials train together on one shared base, one step for all.

Each pack step runs one forward/backward over every active trial's next micro-batch at once (rows
concatenated and right-padded to a common length, each row through its trial's adapter slot), so
the base's matmuls and kernel launches are paid once for the pack. Each trial's loss reaches only
its own slot, so summing them gives every slot exactly the gradient it would get alone.

A trial keeps everything a plain PEFT + AdamW loop over its own data would have:
- data order: a `torch.Generator` seeded with its seed draws a permutation of its rows per epoch;
  micro-batches of `per_device_batch_size` follow it (the last of an epoch may be smaller) and
  optimizer steps take the next `gradient_accumulation_steps` of them, across epoch ends;
- loss: mean cross-entropy over the micro-batch's label tokens, divided by the accumulation steps;
- steps: `max_steps`, else `ceil(num_epochs * ceil(micro-batches / accumulation))` as transformers counts;
- its own `cutoff_len` view of the data, LR schedule (`get_scheduler`), weight decay and clipping.

Trials end one by one (complete, pruned, failed) and free their slot for the next trial at once.
"""

from __future__ import annotations

import gc
import itertools
import math
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from core.errors import is_programming_error
from core.eval import IGNORE_INDEX, EvalData, Score, TokenizedSplit, head_loss_sums, pad_right
from core.trial import Timings, TrialParams, TrialResult, TrialStatus
from runners.attention import fast_kernel_unavailable, joined_rows, model_unsupported
from runners.memory import PeakMemory
from runners.multilora import LRSchedule, MultiAdamW, MultiLoRA, lora_config
from runners.sft import TrialCallbacks, TrialRunner, write_atomically


class NonFiniteLoss(RuntimeError):
    """A trial's training loss became NaN or infinite."""


def total_steps(params: TrialParams, rows: int) -> int:
    """Optimizer steps a trial takes: `max_steps`, else its epochs counted as transformers does."""
    if params.max_steps > 0:
        return params.max_steps
    micro_batches = math.ceil(rows / params.per_device_batch_size)
    accumulation = params.gradient_accumulation_steps
    per_epoch = max(micro_batches // accumulation + int(micro_batches % accumulation > 0), 1)
    return math.ceil(params.num_epochs * per_epoch)


@dataclass
class _Trial:
    """One trial in the pack: its slot, data stream, progress and what it has cost so far."""

    number: int
    params: TrialParams
    output_dir: Path
    callbacks: TrialCallbacks
    slot: int
    train: TokenizedSplit
    total: int
    schedule: LRSchedule
    load_s: float
    generator: torch.Generator = field(init=False)
    order: list[int] = field(default_factory=list)
    position: int = 0
    step: int = 0
    micro: int = 0
    accumulated_loss: float = 0.0
    tokens: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    pack_size: int = 1
    last_value: float | None = None
    pruned_at: int | None = None
    _mark: tuple | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.params.seed)

    def next_rows(self) -> list[int]:
        """Indices of the next micro-batch; a new epoch draws a new permutation."""
        if self.position >= len(self.order):
            self.order = torch.randperm(self.train.rows, generator=self.generator).tolist()
            self.position = 0
        rows = self.order[self.position : self.position + self.params.per_device_batch_size]
        self.position += len(rows)
        return rows

    def mark(self) -> None:
        """Remember where the current optimizer step starts, to rewind to after an OOM."""
        self._mark = (self.order, self.position, self.generator.get_state(), self.tokens)

    def rewind(self) -> None:
        self.order, self.position, state, self.tokens = self._mark
        self.generator.set_state(state)
        self.micro = 0
        self.accumulated_loss = 0.0


SCORE_WAIT_STEPS = 2
"""Pack steps a completed trial may wait, unstepped in its slot, for other trials of its pack that
complete within them, so they are scored in one pass. Slots filled at different steps (an auto
pack growing after its first steps) stay that many steps apart, and a generation objective's
decode is the pack's largest cost: one batched decode of 8 adapters' prompts costs far less than
two of 4 (bench/RESULTS.md), against at most two steps of the waiting slots."""


PACK_MEMORY_SHARE = 0.85
"""Share of the card a pack may fill: what an auto pack sizes its trials to
(`sweeps.executors.packed.auto_capacity`) and what a joined forward's tokens are budgeted against."""


def split_trials(totals: Sequence[int], budget: int | None) -> list[range]:
    """Trials (their joined tokens in `totals`) in contiguous groups whose joined batch fits `budget`.

    A joined batch is (trials x the widest trial's tokens); a group holds at least one trial.
    One group when everything fits or there is no budget.
    """
    if budget is None or len(totals) * max(totals, default=0) <= budget:
        return [range(len(totals))]
    groups, start, width = [], 0, 0
    for index, total in enumerate(totals):
        if index > start and (index - start + 1) * max(width, total) > budget:
            groups.append(range(start, index))
            start, width = index, 0
        width = max(width, total)
    groups.append(range(start, len(totals)))
    return groups


def remaining_pack_steps(trial: _Trial) -> int:
    """Pack steps (micro-batches) before the trial's last optimizer step."""
    accumulation = trial.params.gradient_accumulation_steps
    return (trial.total - trial.step) * accumulation - trial.micro


CUT_COST_TOKENS = 8192
"""What one more forward/backward in a pack step costs, in tokens of work: its kernel launches
(~0.15 s on an H100 for a 0.5B model) at the ~55k tokens/s the card then computes. Measured
(`bench/pack_steps.py`): a cut's launches are not hidden behind the other chunks' arithmetic, so
a step cut in two at 6 trials of 16 rows took 0.79 s where one chunk took 0.60 s."""


def plan_chunks(lengths: list[int], cut_cost_tokens: int, granularity: int = 8) -> list[list[int]] | None:
    """Rows (by index) cut into length-sorted chunks, each padded only to its own longest row.

    Rows of the pack's trials vary in length (GSM8K rows from ~80 to ~400 tokens), and padding all
    of them to the longest computes up to twice the real tokens. A chunk costs its padded tokens
    plus `cut_cost_tokens` for its launches; cuts fall every `granularity` sorted rows and minimise
    the summed cost. None: one chunk is best (then the rows keep their trial order, grouped by
    adapter).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cuts = [*range(0, len(order), granularity), len(order)]
    best = [0.0] + [math.inf] * (len(cuts) - 1)
    previous = [0] * len(cuts)
    for j in range(1, len(cuts)):
        width = lengths[order[cuts[j] - 1]]
        for i in range(j):
            total = best[i] + (cuts[j] - cuts[i]) * width + cut_cost_tokens
            if total < best[j]:
                best[j], previous[j] = total, i
    chunks = []
    j = len(cuts) - 1
    while j > 0:
        chunks.append(order[cuts[previous[j]] : cuts[j]])
        j = previous[j]
    return None if len(chunks) == 1 else chunks[::-1]


def plan_parts(lengths: list[list[int]], cut_cost_tokens: int) -> list[list[int]] | None:
    """Equal micro-batches (one list of row lengths per trial) cut by length into equal parts.

    Each trial's rows are sorted by length and cut into q equal runs; chunk j holds run j of every
    trial, in trial order, so a chunk is still one equal run per trial (routed a run at a time,
    `Routing.by_group`) and is padded only to its own longest row. q is the divisor of the
    micro-batch size with the least summed cost, a chunk costing as in `plan_chunks`. Rows are
    indexed trial after trial. None: one part is best (the rows keep their order).
    """
    size = len(lengths[0])
    flat = [length for trial in lengths for length in trial]
    orders = [sorted(range(size), key=trial.__getitem__) for trial in lengths]
    best, best_cost = None, math.inf
    for parts in (q for q in range(1, size + 1) if size % q == 0):
        run = size // parts
        chunks = [
            [t * size + order[i] for t, order in enumerate(orders) for i in range(j * run, (j + 1) * run)]
            for j in range(parts)
        ]
        cost = sum(len(chunk) * max(flat[i] for i in chunk) + cut_cost_tokens for chunk in chunks)
        if cost < best_cost:
            best, best_cost = chunks, cost
    return None if len(best) == 1 else best


def _longs(values: list[int]) -> torch.Tensor:
    """A LongTensor of a long list of ints, through numpy.

    `torch.tensor` inspects every element of a list: 15 ms for the 63k token ids of a 16-trial
    pack step against 3 ms through numpy (2-core CPU), host time in which the GPU waits.
    """
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _to_device(parts: list[torch.Tensor], device) -> tuple[torch.Tensor, ...]:
    """Host tensors (integers) on the device in one pinned, asynchronous copy, split back into parts."""
    flat = torch.cat(parts)
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory()
    return flat.to(device, non_blocking=True).split([part.numel() for part in parts])


@dataclass
class PackBatch:
    """One forward/backward of a pack step on the device, with what its loss needs worked out on the host.

    Every index is computed on the host and the whole batch goes to the device in one pinned,
    asynchronous copy: a copy from pageable memory, or a boolean mask that picks labelled
    positions on the device, makes the host wait for the device, and a pack step is bound by how
    fast the host can queue its kernels.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """None for joined rows, where `bounds` tells attention where each row starts instead."""
    positions: torch.Tensor
    """Flat indices (row * width + column) of the hidden states that predict a label."""
    targets: torch.Tensor
    owner: torch.Tensor
    """The trial (index in the pack) of each labelled position."""
    divisor: torch.Tensor
    """Per trial: its labelled positions in the whole step times its accumulation steps (at least 1)."""
    route: torch.Tensor | None
    """Slot per row, or per run of rows when `grouped`; None when every row is one trial's."""
    grouped: bool
    shifted: torch.Tensor
    """Host copy of the labels shifted by one, for models that take the plain loss path."""
    row_owner: torch.Tensor
    """Host copy: the trial of each batch row."""
    position_ids: torch.Tensor | None = None
    """Joined rows: each token's position within its own row."""
    bounds: torch.Tensor | None = None
    """Joined rows: where each row (and each trial's padding tail) starts and ends over the
    flattened batch, as int32 cumulative lengths."""
    longest: int = 0
    """Joined rows: the longest row."""

    def model_inputs(self) -> dict:
        """The model's keyword arguments for this batch."""
        if self.bounds is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.bounds,
            "cu_seq_lens_k": self.bounds,
            "max_length_q": self.longest,
            "max_length_k": self.longest,
        }

    @classmethod
    def build(
        cls,
        rows: list[dict[str, list[int]]],
        row_owner: list[int],
        slots: list[int],
        divisor: list[int],
        pad_id: int,
        device,
        grouped: bool = False,
    ) -> PackBatch:
        """`rows` (row i of trial `row_owner[i]`, whose slot is `slots[row_owner[i]]`) as one batch.

        `grouped`: the rows come as equal runs, one per trial in order, routed a run at a time.
        """
        padded = pad_right(rows, pad_id)
        width = padded["input_ids"].shape[1]
        shifted = padded["labels"][:, 1:]
        owners = torch.tensor(row_owner)
        row, column = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        one_trial = len(set(row_owner)) == 1
        if one_trial:
            route = torch.zeros(0, dtype=torch.long)
        elif grouped:
            route = torch.tensor(slots)
        else:
            route = torch.tensor(slots)[owners]
        parts = [
            padded["input_ids"].flatten(),
            padded["attention_mask"].flatten(),
            row * width + column,
            shifted[row, column],
            owners[row],
            torch.tensor(divisor),
            route,
        ]
        on_device = _to_device(parts, device)
        shape = padded["input_ids"].shape
        return cls(
            input_ids=on_device[0].view(shape),
            attention_mask=on_device[1].view(shape),
            positions=on_device[2],
            targets=on_device[3],
            owner=on_device[4],
            divisor=on_device[5],
            route=None if one_trial else on_device[6],
            grouped=grouped,
            shifted=shifted,
            row_owner=owners,
        )

    @classmethod
    def joined(
        cls,
        rows: list[dict[str, list[int]]],
        row_owner: list[int],
        slots: list[int],
        divisor: list[int],
        pad_id: int,
        device,
    ) -> PackBatch:
        """`rows` joined end to end, one sequence per trial, for attention that reads row boundaries.

        Batch row t holds trial t's rows one after another and then padding up to the longest
        trial's total, so the base computes the real tokens plus that tail alone, and each batch
        row is one adapter's run (routed as `grouped`). Positions restart at every row, and the
        rows' (and tails') boundaries go to attention as cumulative lengths. `row_owner` must list
        the trials in order, each trial's rows together.
        """
        trials = len(slots)
        per_trial: list[list[list[int]]] = [[] for _ in range(trials)]
        shifted_rows: list[list[list[int]]] = [[] for _ in range(trials)]
        for row, owner in zip(rows, row_owner):
            per_trial[owner].append(row["input_ids"])
            # Position j predicts label j + 1 of its own row, never the next row's first token.
            shifted_rows[owner].append([*row["labels"][1:], IGNORE_INDEX])
        width = max(sum(len(ids) for ids in trial) for trial in per_trial)
        ids, labels, positions, lengths = [], [], [], []
        for trial_ids, trial_labels in zip(per_trial, shifted_rows):
            tail = width - sum(len(row) for row in trial_ids)
            for row_ids, row_labels in zip(trial_ids, trial_labels):
                ids.extend(row_ids)
                labels.extend(row_labels)
                positions.extend(range(len(row_ids)))
                lengths.append(len(row_ids))
            if tail:
                ids.extend([pad_id] * tail)
                labels.extend([IGNORE_INDEX] * tail)
                positions.extend(range(tail))
                lengths.append(tail)
        labels = _longs(labels)
        (labelled,) = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        one_trial = trials == 1
        route = torch.zeros(0, dtype=torch.long) if one_trial else torch.tensor(slots)
        parts = [
            _longs(ids),
            _longs(positions),
            labelled,
            labels[labelled],
            labelled // width,
            torch.tensor(divisor),
            route,
            torch.tensor([0, *itertools.accumulate(lengths)]),
        ]
        on_device = _to_device(parts, device)
        return cls(
            input_ids=on_device[0].view(trials, width),
            attention_mask=None,
            positions=on_device[2],
            targets=on_device[3],
            owner=on_device[4],
            divisor=on_device[5],
            route=None if one_trial else on_device[6],
            grouped=True,
            shifted=labels.view(trials, width)[:, :-1],
            row_owner=torch.arange(trials),
            position_ids=on_device[1].view(trials, width),
            bounds=on_device[7].to(torch.int32),
            longest=max(lengths),
        )


def _label_loss_sums(model, batch: PackBatch, trials: int) -> torch.Tensor:
    """Summed cross-entropy of each trial's labelled positions (`head_loss_sums`).

    Models that rescale logits (softcapping) take the plain path.
    """
    config = model.config
    ids = batch.input_ids
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        logits = model(**batch.model_inputs()).logits[:, :-1].float()
        shifted = batch.shifted.to(ids.device)
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(shifted.shape)
        owner = batch.row_owner.to(ids.device)
        return torch.zeros(trials, device=ids.device).index_add(0, owner, per_token.sum(dim=1))
    outputs = model(**batch.model_inputs(), output_hidden_states=True, logits_to_keep=1)
    last = outputs.hidden_states[-1]
    hidden = last.reshape(-1, last.shape[-1]).index_select(0, batch.positions)
    return head_loss_sums(model.get_output_embeddings(), hidden, batch.targets, batch.owner, trials)


class PackedRunner:
    """K LoRA / QLoRA trials on the `TrialRunner`'s cached base, stepped together.

    Reuses the runner's model cache, tokenized data, objective and config. While the pack holds
    the base, its target linears are `MultiLoRALinear` layers: the runner must not train on that
    base until `close()`, which gives the base back bit-identical.
    """

    def __init__(self, runner: TrialRunner, capacity: int):
        if capacity < 1:
            raise ValueError(f"pack capacity must be at least 1, not {capacity}")
        self.runner = runner
        self.capacity = capacity
        runner.prepare()
        self._tokenizer = runner.models.tokenizer()
        # TrialRunner keeps the parsed splits and template private; the pack reads the same ones.
        self._splits = runner._splits
        self._template = runner._template
        evaluation = runner.tokenized.get(
            self._tokenizer, self._template, self._splits.eval, runner.config.objective.max_length
        )
        self._eval = EvalData(self._splits.eval, evaluation, self._template)
        pruner = runner.config.pruner
        self._eval_every = pruner.eval_every_steps
        self._eval_head = self._eval.head(pruner.eval_samples) if self._eval_every else None
        self._memory = PeakMemory()
        self._memory.reset()
        self._step_peak_mb: float | None = None
        self._quantized: bool | None = None
        self._adapters: MultiLoRA | None = None
        self._optimizer: MultiAdamW | None = None
        self._was_training = False
        self._trials: dict[int, _Trial] = {}
        self._norms: torch.Tensor | None = None
        self.cut_cost_tokens = CUT_COST_TOKENS
        self.score_wait_steps = SCORE_WAIT_STEPS
        self.max_forward_tokens: int | None = None
        """A joined pack step whose batch would exceed this many tokens (trials x the widest
        trial's) runs as several forwards over groups of trials, each backpropagated before the
        next (`split_trials`). None: on CUDA, what the card holds at the memory per token the
        pack's steps have used (`_forward_budget`), else one forward. A step's memory follows its
        widest trial's rows, which vary from step to step: a pack sized from one step's peak ran
        out of memory at a later, wider step (H100, bench/RESULTS.md sixth round)."""
        self._per_token: dict[bool, float] = {}
        """Activation bytes per token of a forward, by whether the base checkpoints activations."""
        self._largest_forward: dict[bool, int] = {}
        self._forward_tokens = 0
        self._held_bytes = 0
        self.join_rows: bool | None = None
        """Join each trial's rows end to end in a pack step instead of padding every row to the
        longest (`PackBatch.joined`). None: where the fused varlen kernel runs (CUDA) and the
        model supports it; on CPU the per-row attention it falls back to costs more than padding."""
        self._checkpointing = False
        self._ended: list[tuple[int, TrialResult]] = []
        self._waiting: set[int] = set()
        """Slots of completed trials not stepped while they wait to be scored (`SCORE_WAIT_STEPS`)."""

    def active(self) -> list[int]:
        """Trial numbers training in the pack, in slot order."""
        return [self._trials[slot].number for slot in sorted(self._trials)]

    def _ensure_base(self, quantized: bool) -> MultiLoRA:
        if self._adapters is None:
            base = self.runner.models.base(quantized=quantized)
            self._was_training = base.training
            self._adapters = MultiLoRA(base, self.capacity)
            self._optimizer = MultiAdamW(self._adapters.parameters, self.capacity)
            self._quantized = quantized
        return self._adapters

    def add(self, params: TrialParams, output_dir: Path, callbacks: TrialCallbacks, number: int) -> None:
        """Give the trial a free slot, initialised as peft would with its seed.

        Raises ValueError for full fine-tuning, for a trial on the other base (LoRA vs QLoRA) than
        the pack's, and when the pack is full. Any other error (no row left at this cutoff_len,
        QLoRA unavailable) ends the trial FAILED: the next `advance()` returns it.
        """
        if not params.is_adapter:
            raise ValueError("full fine-tuning trains every weight and cannot share a base; run it alone")
        if params.packing:
            raise ValueError(
                "TRL packing builds its own batches (rows joined up to cutoff_len); run it alone"
            )
        quantized = params.method == "qlora"
        if self._quantized is not None and quantized != self._quantized:
            raise ValueError(
                f"this pack trains on the {'4-bit' if self._quantized else 'unquantized'} base; "
                f"a {params.method} trial needs its own pack"
            )
        free = [slot for slot in range(self.capacity) if slot not in self._trials]
        if not free:
            raise ValueError(f"the pack is full ({self.capacity} trials)")
        slot = free[0]
        started = perf_counter()
        try:
            train = self.runner.tokenized.get(
                self._tokenizer, self._template, self._splits.train, params.cutoff_len
            )
            if train.rows == 0:
                raise ValueError(
                    f"cutoff_len={params.cutoff_len} leaves no reply token in any of the "
                    f"{train.dropped_rows} training rows (every prompt is at least that long); raise cutoff_len"
                )
            adapters = self._ensure_base(quantized)
            adapters.assign(slot, lora_config(params), params.seed)
            self._optimizer.reset(slot, params.weight_decay, params.max_grad_norm)
        except Exception as exc:  # a trial's error is its FAILED result, not the pack's
            if is_programming_error(exc):
                raise
            if self._adapters is not None and self._adapters.slots[slot] is not None:
                self._adapters.free(slot)
            self._ended.append((number, self._failed(exc, Timings(load_s=perf_counter() - started))))
            return
        steps = total_steps(params, train.rows)
        schedule = LRSchedule(params.lr_scheduler, params.learning_rate, params.warmup_ratio, steps)
        trial = _Trial(
            number, params, output_dir, callbacks, slot, train, steps, schedule, perf_counter() - started
        )
        self._trials[slot] = trial
        callbacks.on_step(0, steps)

    def advance(self, max_steps: int | None = None) -> list[tuple[int, TrialResult]]:
        """Step every active trial together until at least one ends; the ended ones, their slots freed.

        A trial that completes waits up to `score_wait_steps` pack steps, unstepped, for others
        that complete within them, and all are scored together (`SCORE_WAIT_STEPS`); a trial that
        fails or is pruned ends at once, and the waiting ones with it.
        With `max_steps`, returns after that many pack steps even if none ended (an empty list):
        a pack sizing itself looks at its first step's memory before the trials run to their end.
        torch.OutOfMemoryError in a pack step propagates with the pack rewound to the start of each
        trial's current optimizer step (partial gradients dropped), ready to `close()` or go on;
        if completed trials were waiting, they are returned scored instead, and the next call
        meets the error.
        """
        if self._ended:
            ended, self._ended = self._ended, []
            return ended
        waiting: list[_Trial] = []
        wait_left = 0
        for taken in itertools.count(1):
            if not self._trials:
                break
            try:
                ended = self._pack_step()
            except torch.OutOfMemoryError:
                if not waiting:
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:
                # The waiting trials finished training: they are scored and saved now, outside the
                # `except` (its traceback holds the failed step's activations). The stepping ones
                # were rewound; their next step meets the error again, with nothing left waiting.
                self._waiting.clear()
                scores = self._score_together(waiting)
                return [self._finish(trial, "complete", scores.get(trial.slot)) for trial in waiting]
            complete = [trial for trial, outcome in ended if outcome == "complete"]
            if complete and not waiting:
                wait_left = self.score_wait_steps + 1
            waiting += complete
            self._waiting.update(trial.slot for trial in complete)
            wait_left -= 1
            stepping = [t for slot, t in self._trials.items() if slot not in self._waiting]
            soon = any(remaining_pack_steps(t) <= wait_left for t in stepping)
            others = [(trial, outcome) for trial, outcome in ended if outcome != "complete"]
            if others or (waiting and not soon):
                self._waiting.clear()
                scores = self._score_together(waiting)
                done = [(trial, "complete") for trial in waiting] + others
                return [self._finish(trial, outcome, scores.get(trial.slot)) for trial, outcome in done]
            if not waiting and max_steps is not None and taken >= max_steps:
                break
        return []

    def take_step_peak_mb(self) -> float | None:
        """The peak memory of the pack steps since the last call (None: none ran, or unmeasured).

        Steps alone: scoring runs between them and a generation objective sizes its batches to
        the memory it finds free, so a peak that counted it would say the card is full whatever
        the pack's size, and an auto pack sized from it could never grow.
        """
        peak, self._step_peak_mb = self._step_peak_mb, None
        return peak

    def close(self) -> None:
        """Remove the adapter layers: the base's modules and weights are exactly what they were."""
        if self._adapters is not None:
            self._checkpoint(False)
            self._adapters.remove()
            self._adapters.model.train(self._was_training)
        self._adapters = self._optimizer = None
        self._quantized = None
        self._trials.clear()
        self._waiting.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _pack_step(self) -> list[tuple[_Trial, str | BaseException]]:
        """One forward/backward over every trial's next micro-batch; optimizer steps where due."""
        optimizer = self._optimizer
        trials = [self._trials[slot] for slot in sorted(self._trials) if slot not in self._waiting]
        for trial in trials:
            if trial.micro == 0:
                trial.mark()
        started = perf_counter()
        batches = [trial.train.dataset[trial.next_rows()] for trial in trials]
        self._memory.fold()
        try:
            losses, norms = self._forward_backward(trials, batches)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(range(self.capacity))
            for trial in trials:
                trial.rewind()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        ended: list[tuple[_Trial, str | BaseException]] = []
        stepping: list[_Trial] = []
        for trial, loss, batch in zip(trials, losses, batches):
            trial.tokens += sum(len(ids) for ids in batch["input_ids"])
            trial.pack_size = max(trial.pack_size, len(trials))
            if not math.isfinite(loss):
                ended.append(
                    (
                        trial,
                        NonFiniteLoss(
                            f"train loss became {loss} at step {trial.step + 1}; the trial diverged "
                            "(learning rate too high?)"
                        ),
                    )
                )
                continue
            trial.micro += 1
            trial.accumulated_loss += loss / trial.params.gradient_accumulation_steps
            if trial.micro == trial.params.gradient_accumulation_steps:
                stepping.append(trial)
        # A diverged trial's gradient (its slot's alone) must not reach the idle slots' arithmetic.
        optimizer.zero_grad([trial.slot for trial, _ in ended])
        rates = [trial.schedule.current() for trial in stepping]
        optimizer.step([trial.slot for trial in stepping], rates, self._norms)
        # Read before `_after_step`, whose pruning evals are scoring, not the step.
        recent = self._memory.recent_mb()
        if recent is not None:
            self._step_peak_mb = max(self._step_peak_mb or 0.0, recent)
            if self._adapters.device.type == "cuda" and self._joins_rows():
                self._fit_forward_tokens(recent * 2**20)
        elapsed = perf_counter() - started
        for trial in trials:
            trial.train_s += elapsed
        for trial, rate in zip(stepping, rates):
            try:
                outcome = self._after_step(trial, rate, norms[trial.slot])
            except Exception as exc:  # a callback's or an eval's error fails its trial only
                if is_programming_error(exc):
                    raise
                outcome = exc
            if outcome is not None:
                ended.append((trial, outcome))
        return ended

    def _forward_backward(
        self, trials: list[_Trial], batches: list[dict[str, list]]
    ) -> tuple[list[float], list[float]]:
        """Each trial's mean label-token loss of its micro-batch, and each slot's gradient norm after it.

        Joined rows (`join_rows`) make one forward with no padding but each trial's tail. Padded,
        the rows are cut into length-sorted chunks where that saves more padding than the extra
        forwards cost (`_chunks`), each chunk backpropagated as soon as its loss is known.
        Every trial's loss is backpropagated, finite or not: its gradient reaches its own slot
        only (rows never mix, and the base is frozen), which the caller clears if it diverged.
        The host waits for the device once, for these numbers.
        """
        adapters = self._adapters
        model = adapters.model
        rows, row_owner = [], []
        counts = [0] * len(trials)
        for index, batch in enumerate(batches):
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                rows.append({"input_ids": ids, "labels": labels})
                row_owner.append(index)
                counts[index] += sum(label != IGNORE_INDEX for label in labels[1:])
        slots = [trial.slot for trial in trials]
        divisor = [
            max(count * trial.params.gradient_accumulation_steps, 1) for count, trial in zip(counts, trials)
        ]
        pad_id = self._tokenizer.pad_token_id
        join = self._joins_rows()
        model.train()
        self._checkpoint(any(trial.params.gradient_checkpointing for trial in trials))
        # Each forward: its batch, built one at a time (the host lays out the next while the device
        # computes this one), and the trials it holds, as a range of `trials`.
        if join:
            totals = [sum(map(len, batch["input_ids"])) for batch in batches]
            forwards = (
                (
                    PackBatch.joined(
                        [row for row, owner in zip(rows, row_owner) if owner in group],
                        [owner - group.start for owner in row_owner if owner in group],
                        slots[group.start : group.stop],
                        divisor[group.start : group.stop],
                        pad_id,
                        adapters.device,
                    ),
                    group,
                )
                for group in split_trials(totals, self._forward_budget())
            )
        else:
            forwards = (
                (
                    PackBatch.build(
                        [rows[i] for i in chunk],
                        [row_owner[i] for i in chunk],
                        slots,
                        divisor,
                        pad_id,
                        adapters.device,
                        grouped,
                    ),
                    range(len(trials)),
                )
                for chunk, grouped in self._chunks(batches)
            )
        sums = torch.zeros(len(trials), device=adapters.device)
        self._forward_tokens = 0
        # What the step starts from (weights, adapters, optimizer state): the forwards' activations
        # are the peak beyond it.
        self._held_bytes = (
            torch.cuda.memory_allocated(adapters.device) if adapters.device.type == "cuda" else 0
        )
        for batch, group in forwards:
            held = slots[group.start : group.stop]
            present = {held[i] for i in set(batch.row_owner.tolist())}
            self._forward_tokens = max(self._forward_tokens, batch.input_ids.numel())
            if batch.route is None:
                routed = adapters.routing.one_slot(held[int(batch.row_owner[0])])
            elif batch.grouped:
                routed = adapters.routing.by_group(batch.route, present)
            else:
                routed = adapters.routing.by_row(batch.route, present)
            # The backward runs inside the routing too: checkpointed layers run their forward again.
            with routed, joined_rows(model) if join else nullcontext():
                chunk_sums = _label_loss_sums(model, batch, len(held))
                (chunk_sums / batch.divisor).sum().backward()
            sums[group.start : group.stop] += chunk_sums.detach()
        self._norms = self._optimizer.grad_norms()
        values = torch.cat([sums, self._norms]).tolist()
        losses = [total / max(count, 1) for total, count in zip(values, counts)]
        return losses, values[len(trials) :]

    def _fit_forward_tokens(self, peak_bytes: float) -> None:
        """Learn a forward's activation bytes per token from a step's peak (for `_forward_budget`).

        Kept per checkpointing mode (checkpointed forwards hold a fraction of the activations).
        Only steps within half of the largest forward so far count: a small one (a trial or two
        stepping while the others wait to be scored) is mostly a forward's fixed costs, such as
        an LM-head chunk's logits, and would make a token look several times dearer. Among those,
        the dearest is kept; a forward twice the largest so far starts afresh.
        """
        tokens, mode = self._forward_tokens, self._checkpointing
        if not tokens:
            return
        largest = self._largest_forward.get(mode, 0)
        share = max(peak_bytes - self._held_bytes, 0.0) / tokens
        if tokens >= 2 * largest:
            self._per_token[mode] = share
        elif 2 * tokens >= largest:
            self._per_token[mode] = max(self._per_token[mode], share)
        self._largest_forward[mode] = max(largest, tokens)

    def _forward_budget(self) -> int | None:
        """Tokens a joined forward may hold now: `max_forward_tokens`, else fitted on CUDA, else None."""
        if self.max_forward_tokens is not None:
            return self.max_forward_tokens
        device = self._adapters.device
        per_token = self._per_token.get(self._checkpointing)
        if device.type != "cuda" or not per_token:
            return None
        total = torch.cuda.get_device_properties(device).total_memory
        room = total * PACK_MEMORY_SHARE - torch.cuda.memory_allocated(device)
        return max(1, int(room / per_token))

    def _joins_rows(self) -> bool:
        """Whether pack steps join each trial's rows (see `join_rows`), decided once the base is loaded."""
        if self.join_rows is None:
            model = self._adapters.model
            self.join_rows = (
                fast_kernel_unavailable(self._adapters.device) is None and model_unsupported(model) is None
            )
        return self.join_rows

    def _chunks(self, batches: list[dict[str, list]]) -> list[tuple[list[int], bool]]:
        """Padded pack steps: the rows (indexed trial after trial) of each forward, and whether it is grouped.

        Equal micro-batches are cut into parts that keep one run per trial (`plan_parts`), others
        into chunks of mixed trials (`plan_chunks`), where that saves more padding than the extra
        forwards cost.
        """
        lengths = [[len(ids) for ids in batch["input_ids"]] for batch in batches]
        grouped = len({len(trial) for trial in lengths}) == 1
        if grouped:
            chunks = plan_parts(lengths, self.cut_cost_tokens)
        else:
            chunks = plan_chunks([length for trial in lengths for length in trial], self.cut_cost_tokens)
        return [(chunk, grouped) for chunk in chunks or [list(range(sum(map(len, lengths))))]]

    def _checkpoint(self, on: bool) -> None:
        """Activation checkpointing on the base while any trial in the pack asks for it.

        It changes memory and time, never the gradients, so the pack as a whole follows the trial
        that needs it. Non-reentrant, as the base's inputs (frozen embeddings) need no gradient.
        """
        model = self._adapters.model
        if on == self._checkpointing:
            return
        # transformers 5.2x renamed these to activation_checkpointing_* (non-reentrant by default)
        # and warns on the old names; older 5.x releases only know the old ones.
        if on and hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable()
        elif on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        self._checkpointing = on

    def _after_step(self, trial: _Trial, rate: float, grad_norm: float) -> str | None:
        """Bookkeeping of an optimizer step; "complete" or "pruned" when the trial ends there."""
        trial.schedule.advance()
        trial.step += 1
        trial.micro = 0
        trial.callbacks.on_log(
            {"train_loss": trial.accumulated_loss, "learning_rate": rate, "grad_norm": grad_norm}, trial.step
        )
        trial.accumulated_loss = 0.0
        trial.callbacks.on_step(trial.step, trial.total)
        if trial.step >= trial.total:
            return "complete"
        if self._eval_every and trial.step % self._eval_every == 0:
            started = perf_counter()
            with self._adapters.routing.one_slot(trial.slot):
                value = self.runner.objective.score(
                    self._adapters.model, self._tokenizer, self._eval_head
                ).value
            trial.eval_s += perf_counter() - started
            trial.last_value = value
            trial.callbacks.on_log({"intermediate_objective": value}, trial.step)
            if not trial.callbacks.report(value, trial.step):
                trial.pruned_at = trial.step
                return "pruned"
        return None

    @contextmanager
    def _scored(self, slot: int) -> Iterator[None]:
        """The model as the slot's trial alone: merged into the base where it can be, else routed."""
        adapters = self._adapters
        if adapters.can_merge(slot):
            with adapters.merged(slot):
                yield
        else:
            with adapters.routing.one_slot(slot):
                yield

    def _save(self, trial: _Trial) -> Path:
        """Export the adapter as an ordinary PEFT adapter folder, put into place atomically."""
        return write_atomically(
            trial.output_dir / "adapter", lambda partial: self._adapters.export(trial.slot, partial)
        )

    def _score_together(self, trials: list[_Trial]) -> dict[int, Score]:
        """The objective's scores of trials that finished in the same step, in one pass where it can.

        An objective with `score_many` sees every one of them at once, each eval row once per
        trial, routed to its slot (one batched decode for generation objectives); each trial is
        charged an equal share of the time. Alone, or if the shared pass fails, each trial is
        scored on its own in `_complete` (merged weights where it can).
        """
        score_many = getattr(self.runner.objective, "score_many", None)
        if len(trials) < 2 or score_many is None:
            return {}
        adapters = self._adapters
        slots = [trial.slot for trial in trials]

        started = perf_counter()
        try:
            scores = score_many(
                adapters.model, self._tokenizer, self._eval, len(trials), adapters.router(slots)
            )
        except Exception as exc:  # the trials are then scored one by one, each failing on its own
            if is_programming_error(exc):
                raise
            return {}
        share = (perf_counter() - started) / len(trials)
        for trial in trials:
            trial.eval_s += share
        return dict(zip(slots, scores, strict=True))

    def _finish(
        self, trial: _Trial, outcome: str | BaseException, score: Score | None = None
    ) -> tuple[int, TrialResult]:
        del self._trials[trial.slot]
        try:
            if isinstance(outcome, BaseException):
                return trial.number, self._failed(outcome, self._timings(trial), trial)
            if outcome == "pruned":
                return trial.number, TrialResult(
                    status=TrialStatus.PRUNED,
                    objective=trial.last_value,
                    **self._measured(trial, {"pruned_at_step": float(trial.pruned_at)}),
                )
            try:
                return trial.number, self._complete(trial, score)
            except Exception as exc:  # scoring or saving fails this trial only
                if is_programming_error(exc):
                    raise
                return trial.number, self._failed(exc, self._timings(trial), trial)
        finally:
            self._adapters.free(trial.slot)
            self._optimizer.reset(trial.slot, 0.0, 1.0)

    def _complete(self, trial: _Trial, score: Score | None) -> TrialResult:
        if score is None:
            started = perf_counter()
            with self._scored(trial.slot):
                score = self.runner.objective.score(self._adapters.model, self._tokenizer, self._eval)
            trial.eval_s += perf_counter() - started
        saved = self._save(trial)
        train = trial.train
        metrics = {
            **score.metrics,
            "train_rows": float(train.rows),
            "truncated_rows": float(train.truncated_rows),
            "dropped_rows": float(train.dropped_rows),
        }
        return TrialResult(
            status=TrialStatus.COMPLETE,
            objective=score.value,
            adapter_path=str(saved),
            **self._measured(trial, metrics),
        )

    @staticmethod
    def _timings(trial: _Trial) -> Timings:
        return Timings(load_s=trial.load_s, train_s=trial.train_s, eval_s=trial.eval_s)

    def _pack_metrics(self, trial: _Trial | None) -> dict[str, float]:
        """Pack size the trial trained in (at most) and the pack's peak memory, shared by its trials."""
        metrics = {"pack_size": float(trial.pack_size if trial else 1)}
        peak = self._memory.peak_mb()
        if peak is not None:
            metrics["pack_peak_memory_mb"] = peak
        return metrics

    def _measured(self, trial: _Trial, metrics: dict[str, float]) -> dict:
        """The fields every ended trial reports; memory is the pack's peak, shared by its trials."""
        return {
            "metrics": {**metrics, **self._pack_metrics(trial)},
            "peak_memory_mb": self._memory.peak_mb(),
            "memory_kind": self._memory.kind,
            "timings": self._timings(trial),
            "train_tokens": trial.tokens,
            "train_tokens_per_s": trial.tokens / trial.train_s if trial.train_s > 0 else 0.0,
            "truncated_rows": trial.train.truncated_rows,
        }

    def _failed(self, exc: BaseException, timings: Timings, trial: _Trial | None = None) -> TrialResult:
        kind = (
            "oom"
            if isinstance(exc, torch.OutOfMemoryError)
            else "nonfinite"
            if isinstance(exc, NonFiniteLoss)
            else "error"
        )
        return TrialResult(
            status=TrialStatus.FAILED,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            failure_kind=kind,
            metrics=self._pack_metrics(trial),
            peak_memory_mb=self._memory.peak_mb(),
            memory_kind=self._memory.kind,
            timings=timings,
            train_tokens=trial.tokens if trial else 0,
        )
