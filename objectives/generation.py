"""The one batched greedy generation path every generation objective uses.

Generation is where a sweep spends its evaluation time, and for small models it is bound by the
per-step cost of a decode step, not by arithmetic: the fewer decode steps, the faster. So prompts
are left-padded into as few, as large, length-sorted batches as memory allows (the batch size is
fitted to free GPU memory and halved on out-of-memory), every row stops on EOS or a stop string,
and a batch ends as soon as all its rows have. Outputs come back in input order, cut at the first
stop string, as lm-eval cuts them.

`generate` runs Hugging Face `model.generate`; given a model *folder* instead of a model it runs
vLLM, which must be installed (`pip install 'sweep[vllm]'`). `generate_for_objective` picks between
them from an objective's config. The objectives also share how they read their own eval rows (a
file or a `datasets` id, every row located for error messages) and pick a fixed subset of them.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from core.errors import InputError
from core.eval import RowRouter

if TYPE_CHECKING:
    from core.config import ObjectiveConfig

BatchSize = int | Literal["auto"]

# Rows per batch when not on CUDA: CPU generation gains little from larger batches.
CPU_BATCH_SIZE = 16
# Share of the free GPU memory the first batch-size guess may plan to use; the estimate below is
# rough, and what it misses (allocator fragmentation, kernel workspaces) must fit in the rest.
GPU_MEMORY_SHARE = 0.85
# Prompts longer than this are prefilled this many tokens at a time: a whole batch's prefill
# activations would otherwise take more memory than its KV cache and cap the batch size.
PREFILL_CHUNK = 512
# vLLM's share of total GPU memory when it shares the card with the sweep's training model.
VLLM_GPU_MEMORY_SHARE = 0.4

_vllm_engines: dict[tuple[str, bool, int | None], Any] = {}
_vllm_adapter_ids = itertools.count(1)


def vllm_installed() -> bool:
    """Whether the optional vLLM backend can be imported."""
    return find_spec("vllm") is not None


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string."""
    cut = min((index for s in stop if s and (index := text.find(s)) != -1), default=len(text))
    return text[:cut]


def generate(
    model: torch.nn.Module | str | os.PathLike,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: BatchSize = "auto",
    *,
    max_prompt_tokens: int | None = None,
    ignore_eos: bool = False,
    cache_implementation: Literal["dynamic", "static"] = "dynamic",
    compile: bool = False,
    prefill_chunk: int | None = PREFILL_CHUNK,
    route: RowRouter | None = None,
) -> list[str]:
    """Greedy continuations of `prompts`, in input order, each cut at its first stop string.

    Prompts are complete texts (a chat template's output, or a plain n-shot prompt), encoded as
    lm-eval encodes them: with the tokenizer's special tokens unless the prompt already starts with
    the BOS text. A prompt longer than `max_prompt_tokens` tokens keeps its end. A row stops at
    EOS (the tokenizer's and the model's generation config's) or once its text contains a stop
    string; special tokens are dropped from the text.

    `model` is a Hugging Face causal LM (a peft model included), or the folder of one, which is
    then run by vLLM (which batches on its own: the options below are Hugging Face's).
    `batch_size="auto"` fits the batch to free GPU memory and halves it on out-of-memory; on CPU it
    is `CPU_BATCH_SIZE`. `ignore_eos` forces `max_new_tokens` tokens for every row (for benchmarks:
    random weights never choose to stop). `cache_implementation` and `compile` select Hugging
    Face's static KV cache and its compiled decode step (CUDA only; compiling costs time up front
    and again for every new model, such as each trial's adapter, so it pays only on large eval
    sets). Prompts longer than `prefill_chunk` tokens are prefilled in chunks of that size.
    `route` (Hugging Face only) is entered around each batch with the indices of its prompts.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if compile and cache_implementation != "static":
        raise ValueError(
            "compile=True needs cache_implementation='static' (a dynamic cache is not compilable)"
        )
    encoded = _encode(tokenizer, prompts, max_prompt_tokens)
    if isinstance(model, (str, os.PathLike)):
        return _generate_vllm(str(model), tokenizer, encoded, max_new_tokens, stop, ignore_eos)
    return _generate_hf(
        model,
        tokenizer,
        encoded,
        max_new_tokens,
        stop,
        batch_size,
        ignore_eos,
        cache_implementation,
        compile,
        prefill_chunk,
        route,
    )


def generate_for_objective(
    config: ObjectiveConfig,
    model,
    tokenizer,
    prompts: list[str],
    stop: Sequence[str],
    route: RowRouter | None = None,
) -> list[str]:
    """`generate` with an objective's settings: backend, max_new_tokens, batch size, prompt budget.

    With `backend: vllm` a LoRA trial's adapter is saved to a temporary folder and served by one
    vLLM engine over the base model, kept for the whole sweep; a fully fine-tuned model, which vLLM
    could only load as a new engine per trial, goes through Hugging Face instead, as do several
    adapters of one model routed by `route` (packed trials scored together).
    """
    budget = config.max_length - config.max_new_tokens
    lora_base = _peft_base_path(model) if config.backend == "vllm" and route is None else None
    if lora_base is None:
        # A static KV cache halved generation time on the GPU (bench/RESULTS.md: 13.4 s vs 25.1 s
        # for 1319 GSM8K-length prompts); compiling it is left off, as it would recompile per trial.
        on_cuda = next(model.parameters()).is_cuda
        return generate(
            model,
            tokenizer,
            prompts,
            config.max_new_tokens,
            stop,
            config.generation_batch_size,
            max_prompt_tokens=budget,
            cache_implementation="static" if on_cuda else "dynamic",
            route=route,
        )
    encoded = _encode(tokenizer, prompts, budget)
    with tempfile.TemporaryDirectory(prefix="sweep-adapter-") as adapter:
        model.save_pretrained(adapter, safe_serialization=True)
        return _generate_vllm(
            lora_base,
            tokenizer,
            encoded,
            config.max_new_tokens,
            stop,
            ignore_eos=False,
            lora_path=adapter,
            max_model_len=config.max_length,
        )


def _encode(tokenizer, prompts: list[str], max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt as lm-eval encodes them, cut to its last `max_prompt_tokens`.

    The tokenizer adds its special tokens (a BOS, for many models) unless the prompt already starts
    with the BOS text, as a chat template's output often does.
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and prompt.startswith(bos) for prompt in prompts]
    encoded: list[list[int]] = [[] for _ in prompts]
    for flag in (False, True):
        indices = [i for i, starts in enumerate(has_bos) if starts is flag]
        if indices:
            ids = tokenizer([prompts[i] for i in indices], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(indices, ids, strict=True):
                encoded[i] = row
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} encodes to no tokens")
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    return encoded


class _StopInContinuation(StoppingCriteria):
    """Hugging Face's stop-string matcher applied to the generated tokens only.

    On the whole sequence it would also stop on a stop string that starts in the prompt and ends in
    the first generated token; lm-eval looks at the continuation alone, and so does this. Left
    padding puts every row's continuation at the same column, and the matcher runs on the device
    without a host sync.
    """

    def __init__(self, matcher: StopStringCriteria, prompt_width: int):
        self.matcher = matcher
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.matcher(input_ids[:, self.prompt_width :], scores, **kwargs)


def _stop_matcher(tokenizer, stops: list[str]) -> StopStringCriteria | None:
    """Hugging Face's on-device matcher for the stop strings this tokenizer can produce.

    It is built once per call (it preprocesses the whole vocabulary) and refuses a stop string no
    token can form, or a vocabulary it cannot read; those strings are then only cut from the text
    afterwards, which costs time (the row runs on) but never changes an output.
    """
    if not stops:
        return None
    try:
        return StopStringCriteria(tokenizer, stops)
    except ValueError:
        matchable = []
        for stop in stops:
            try:
                StopStringCriteria(tokenizer, [stop])
            except ValueError:
                continue
            matchable.append(stop)
        return StopStringCriteria(tokenizer, matchable) if matchable else None


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often list two)."""
    ids: list[int] = []
    sources = [
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ]
    for source in sources:
        for token in source if isinstance(source, (list, tuple)) else [source]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, the KV cache on and no autograd, restoring the trainer's settings afterwards.

    The model loader turns `use_cache` off for training; generating without a cache recomputes the
    whole prefix at every step.
    """
    was_training = model.training
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    config.use_cache = True
    try:
        with torch.inference_mode():
            yield
    finally:
        config.use_cache = use_cache
        model.train(was_training)


def _bytes_per_row(model, prompt_tokens: int, total_tokens: int, prefill_chunk: int | None) -> int | None:
    """Rough peak GPU memory one row of a batch needs, or None for an unfamiliar config.

    Prefill holds the MLP intermediates (3 x intermediate + a few x hidden) of every token of the
    chunk being prefilled, the attention inputs of that chunk against the prompt, and the prompt's
    KV cache; decode holds the KV cache of prompt and continuation.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (hidden and layers and heads):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", 0)
    element = 4 if next(model.parameters()).dtype == torch.float32 else 2
    cache_per_token = 2 * layers * kv_heads * head_dim * element
    chunk = min(prompt_tokens, prefill_chunk or prompt_tokens)
    # The padding mask as bool, as an additive bias, and that bias padded for the attention kernel;
    # with a mask, grouped-query keys and values are repeated to every head for the kernel.
    attention = 5 * chunk * prompt_tokens + 2 * heads * head_dim * element * prompt_tokens
    if getattr(config, "_attn_implementation", None) == "eager":
        attention += 4 * heads * chunk * prompt_tokens
    activations = (3 * intermediate + 4 * hidden) * element * chunk
    prefill = activations + attention + cache_per_token * prompt_tokens
    decode = cache_per_token * total_tokens
    # Last-position logits in float32, and the copies the logits processors make.
    return max(prefill, decode) + 3 * 4 * vocab


def _first_batch_size(
    model,
    device: torch.device,
    longest_prompt: int,
    max_new_tokens: int,
    rows: int,
    prefill_chunk: int | None,
) -> int:
    """A starting batch size: fixed on CPU, fitted to free memory on CUDA (capped at `rows`)."""
    if device.type != "cuda":
        return min(CPU_BATCH_SIZE, rows)
    per_row = _bytes_per_row(model, longest_prompt, longest_prompt + max_new_tokens, prefill_chunk)
    if per_row is None:
        return min(CPU_BATCH_SIZE, rows)
    free, _ = torch.cuda.mem_get_info(device)
    # Memory this process's allocator holds but does not use (a training step's activations,
    # cached for the next step) is free to generation too; the driver counts it as taken.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(rows, int(free * GPU_MEMORY_SHARE) // per_row))


def _generate_hf(
    model: torch.nn.Module,
    tokenizer,
    encoded: list[list[int]],
    max_new_tokens: int,
    stop: Sequence[str],
    batch_size: BatchSize,
    ignore_eos: bool,
    cache_implementation: str,
    compile: bool,
    prefill_chunk: int | None,
    route: RowRouter | None,
) -> list[str]:
    if not encoded:
        return []
    device = next(model.parameters()).device
    # Longest first: the first batch is the most memory-hungry, so an over-large batch size fails
    # (and is halved) before any work is wasted on the shorter ones.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    size = (
        _first_batch_size(model, device, len(encoded[order[0]]), max_new_tokens, len(encoded), prefill_chunk)
        if batch_size == "auto"
        else batch_size
    )
    stops = [s for s in stop if s]
    matcher = _stop_matcher(tokenizer, stops)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        # A model's generation_config may ask for a repetition penalty; greedy means plain argmax.
        "repetition_penalty": 1.0,
        "use_cache": True,
        "pad_token_id": pad,
        "eos_token_id": eos,
    }
    if ignore_eos:
        settings["min_new_tokens"] = max_new_tokens
    if cache_implementation == "static":
        settings |= {"cache_implementation": "static", "disable_compile": not compile}
    # Tokens after a row's EOS are padding, so the text ends there; with ignore_eos an EOS is an
    # ordinary token.
    ends = set() if ignore_eos else set(eos)

    outputs: list[str] = [""] * len(encoded)
    start = 0
    with _inference(model):
        while start < len(order):
            rows = order[start : start + size]
            out_of_memory = False
            try:
                with route(rows) if route is not None else nullcontext():
                    texts = _generate_batch(
                        model,
                        tokenizer,
                        [encoded[i] for i in rows],
                        device,
                        pad,
                        ends,
                        matcher,
                        settings,
                        prefill_chunk,
                    )
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                out_of_memory = True
            if out_of_memory:
                # Outside the except block, so the failed batch's tensors are no longer referenced.
                size = max(1, size // 2)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            for index, text in zip(rows, texts, strict=True):
                outputs[index] = trim_at_stop(text, stops)
            start += len(rows)
    return outputs


def _generate_batch(
    model,
    tokenizer,
    rows: list[list[int]],
    device: torch.device,
    pad: int,
    ends: set[int],
    matcher: StopStringCriteria | None,
    settings: dict,
    prefill_chunk: int | None,
) -> list[str]:
    width = max(len(ids) for ids in rows)
    chunking = {"prefill_chunk_size": prefill_chunk} if prefill_chunk and width > prefill_chunk else {}
    criteria = StoppingCriteriaList([_StopInContinuation(matcher, width)] if matcher else [])
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    sequences = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        stopping_criteria=criteria,
        **settings,
        **chunking,
    )
    continuations = [
        next((row[:k] for k, token in enumerate(row) if token in ends), row)
        for row in sequences[:, width:].tolist()
    ]
    return tokenizer.batch_decode(continuations, skip_special_tokens=True)


def _peft_base_path(model) -> str | None:
    """The base model folder or hub id of a peft model, None for any other model."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    return peft_config[model.active_adapter].base_model_name_or_path


def _generate_vllm(
    model_path: str,
    tokenizer,
    encoded: list[list[int]],
    max_new_tokens: int,
    stop: Sequence[str],
    ignore_eos: bool,
    lora_path: str | None = None,
    max_model_len: int | None = None,
) -> list[str]:
    """Greedy generation by a vLLM engine over `model_path`, kept for reuse by later calls."""
    if not vllm_installed():
        raise RuntimeError("generating from a model folder needs vLLM: pip install 'sweep[vllm]'")
    from vllm import LLM, SamplingParams

    key = (model_path, lora_path is not None, max_model_len)
    if key not in _vllm_engines:
        # Another process (or the sweep's own training model) may hold part of the card.
        total = torch.cuda.get_device_properties(0).total_memory
        free, _ = torch.cuda.mem_get_info(0)
        share = min(VLLM_GPU_MEMORY_SHARE, 0.9 * free / total) if lora_path else 0.9 * free / total
        engine_args: dict[str, Any] = {"model": model_path, "seed": 0, "gpu_memory_utilization": share}
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        if lora_path is not None:
            engine_args |= {"enable_lora": True, "max_lora_rank": 256, "max_loras": 1}
        _vllm_engines[key] = LLM(**engine_args)
    engine = _vllm_engines[key]
    stops = [s for s in stop if s]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        min_tokens=max_new_tokens if ignore_eos else 0,
        ignore_eos=ignore_eos,
        stop=stops or None,
        skip_special_tokens=True,
    )
    lora_request = None
    if lora_path is not None:
        from vllm.lora.request import LoRARequest

        # A fresh id per call: vLLM caches adapters by id, and each trial's adapter is new.
        adapter_id = next(_vllm_adapter_ids)
        lora_request = LoRARequest(f"trial-{adapter_id}", adapter_id, lora_path)
    requests = [{"prompt_token_ids": ids} for ids in encoded]
    results = engine.generate(requests, params, lora_request=lora_request, use_tqdm=False)
    return [trim_at_stop(result.outputs[0].text, stops) for result in results]


def generate_for_adapters(
    config: ObjectiveConfig,
    model,
    tokenizer,
    prompts: list[str],
    stop: Sequence[str],
    adapters: int,
    route: RowRouter,
) -> list[list[str]]:
    """Every prompt's greedy continuation through each of `adapters` adapters, in one batched decode.

    The prompts are repeated once per adapter and decoded together (batches fitted to memory as
    usual), so a decode step's fixed cost is paid once for all adapters. Returns one list of
    outputs per adapter, in prompt order.
    """
    repeated = prompts * adapters

    def route_rows(rows: Sequence[int]):
        return route([row // len(prompts) for row in rows])

    outputs = generate_for_objective(config, model, tokenizer, repeated, stop, route_rows)
    return [outputs[k * len(prompts) : (k + 1) * len(prompts)] for k in range(adapters)]


def fixed_subset(n: int, max_samples: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of `range(n)` (all of it without `max_samples`), in order.

    The same arguments give the same subset, so every trial of a sweep is scored on the same items.
    """
    if max_samples is None or max_samples >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_samples))


def require_backend(config: ObjectiveConfig) -> None:
    """Raise `InputError` if the configured generation backend is not installed."""
    if config.backend == "vllm" and not vllm_installed():
        raise InputError(
            "config", "backend vllm needs the vllm package: pip install 'sweep[vllm]'", "objective.backend"
        )
