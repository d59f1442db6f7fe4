"""Benchmark the shared generation path on issue 3's GSM8K-sized workload.

Workload: a Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocab 151936, tied embeddings) with random weights in bf16; 1319 prompts of ~900 tokens
(850-950, random token ids); 256 new tokens each, greedy.

Random weights never choose to stop, and a real model stops at different points, so every path
is forced to generate the full 256 tokens (`min_new_tokens` in Hugging Face, `min_tokens` +
`ignore_eos` in vLLM): the comparison is of equal work. Our path still carries GSM8K's stop
strings (plus one the synthetic vocabulary can form), so the per-step stop check is in its time.

Compared, in one process on one GPU:
  baseline   plain `model.generate`, batches of 256 in input order, dynamic KV cache
  dynamic    objectives.generation.generate: batch fitted to memory, length-sorted, dynamic cache
  static     the same with Hugging Face's static KV cache (no compile)
  compiled   static cache + torch.compile of the decode step; timed cold (with the compile) and warm
  vllm       the model saved to a folder and run by vLLM, when vLLM is installed (engine start-up
             timed apart)
Each variant's outputs are checked against the baseline's on a few rows: identical, or diverging
only where the two tokens are a near-tie under a reference forward pass (bf16 logits of different
kernels and batch shapes round differently, and random weights have many near-ties). A variant
that disagrees is marked in the table and the script exits 1.

Run from the repository root on the GPU machine (torch and transformers >= 5 installed; vLLM
optional):  PYTHONPATH=. python bench/eval_generation.py --out "$OUT"
The table is printed last; the same figures go to <out>/eval_generation.json. `--smoke` shrinks
everything to check the script on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from objectives.generation import generate, vllm_installed
from objectives.gsm8k import STOP_SEQUENCES

VOCAB = 151936
FIRST_WORD_ID = 4  # ids below are <unk>, <pad>, <eos> and the marker token
# HF's stop-string matcher reads a vocabulary by decoding this word in front of each token.
MARKER = "abcdef"
STOPS = (*STOP_SEQUENCES, MARKER * 2)
CHECKED_ROWS = 4


@dataclass
class Result:
    """One timed variant."""

    name: str
    seconds: float | None = None
    setup_seconds: float | None = None
    batch_sizes: list[int] = field(default_factory=list)
    peak_memory_gb: float | None = None
    identical_rows: int | None = None
    tie_rows: int | None = None
    max_tie_gap: float | None = None
    disagreement: str | None = None
    error: str | None = None


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the model's full vocabulary: word 't<id>' is token <id>."""
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, MARKER: 3}
    vocab |= {f"t{i}": i for i in range(FIRST_WORD_ID, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def build_model(smoke: bool, device: torch.device) -> Qwen2ForCausalLM:
    """The Qwen2-0.5B-shaped model (a 2-layer one for --smoke), random weights, bf16, on `device`."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64 if smoke else 896,
        intermediate_size=128 if smoke else 4864,
        num_hidden_layers=2 if smoke else 24,
        num_attention_heads=4 if smoke else 14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def make_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """`n` prompts of random words, each `length` tokens give or take a few percent."""
    rng = random.Random(seed)
    spread = max(1, length // 18)
    return [
        " ".join(
            f"t{rng.randrange(FIRST_WORD_ID, VOCAB)}"
            for _ in range(rng.randint(length - spread, length + spread))
        )
        for _ in range(n)
    ]


def token_ids(text: str) -> list[int]:
    """Ids back from a decoded continuation (the decoder fuses 't12' 't3' into 't12t3')."""
    return [3 if word == MARKER else int(word[1:]) for word in re.findall(rf"t\d+|{MARKER}", text)]


class BatchRecorder:
    """Wraps `model.generate` to record each call's batch size."""

    def __init__(self, model):
        self.model = model
        self.sizes: list[int] = []
        self.inner = model.generate

    def __enter__(self):
        def recording(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.sizes.append(int(ids.shape[0]))
            return self.inner(*args, **kwargs)

        self.model.generate = recording
        return self

    def __exit__(self, *exc) -> None:
        del self.model.generate


def baseline(model, tokenizer, prompts: list[str], new_tokens: int, batch: int) -> list[str]:
    """What one writes first: fixed batches in input order, default (dynamic) cache."""
    device = next(model.parameters()).device
    outputs = []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[start : start + batch], padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            sequences = model.generate(
                **encoded,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = encoded["input_ids"].shape[1]
        outputs += tokenizer.batch_decode(sequences[:, width:], skip_special_tokens=True)
    return outputs


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Give cached GPU memory back and restart the peak count, so each variant starts equal."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(name: str, device: torch.device, run) -> tuple[Result, list[str] | None]:
    """Run `run()` once, timing it and its peak GPU memory; an exception is recorded, not raised."""
    release(device)
    result = Result(name)
    started = time.perf_counter()
    try:
        outputs = run()
    except Exception as exc:  # noqa: BLE001  (a variant that cannot run is reported, the others go on)
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        print(f"[{name}] failed: {result.error}", flush=True)
        return result, None
    synchronize(device)
    result.seconds = time.perf_counter() - started
    if device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"[{name}] {result.seconds:.1f} s", flush=True)
    return result, outputs


def check_agreement(
    model,
    tokenizer,
    prompts: list[str],
    reference: list[str],
    outputs: list[str],
    result: Result,
    tolerance: float,
) -> None:
    """Count checked rows equal to the baseline, or leaving it only at a near-tie; note any other."""
    device = next(model.parameters()).device
    rows = sorted({0, 1, len(prompts) // 2, len(prompts) - 1})[:CHECKED_ROWS]
    result.identical_rows, result.tie_rows, result.max_tie_gap = 0, 0, 0.0
    for row in rows:
        ours, theirs = token_ids(outputs[row]), token_ids(reference[row])
        if ours == theirs:
            result.identical_rows += 1
            continue
        split = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if split is None:
            result.disagreement = f"row {row}: {len(ours)} tokens against the baseline's {len(theirs)}"
            return
        prefix = tokenizer(prompts[row], add_special_tokens=False)["input_ids"] + theirs[:split]
        with torch.no_grad():
            logits = model(torch.tensor([prefix], device=device)).logits[0, -1].float()
        top = logits.max().item()
        gap = max(top - logits[ours[split]].item(), top - logits[theirs[split]].item())
        if gap > tolerance:
            result.disagreement = (
                f"row {row} leaves the baseline at token {split}, where the two tokens' logits are "
                f"{gap:.3f} below the top ({top:.3f}): no near-tie"
            )
            return
        result.tie_rows += 1
        result.max_tie_gap = max(result.max_tie_gap, gap)


def vllm_variant(
    model, tokenizer, prompts: list[str], new_tokens: int, device
) -> tuple[Result, list[str] | None]:
    """The model saved to a folder and generated by vLLM through `generate`."""
    folder = Path(tempfile.mkdtemp(prefix="bench-qwen2-"))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # Start-up (engine, CUDA graphs) is paid once per sweep, not per trial; time it apart.
    warm, _ = timed(
        "vllm start-up",
        device,
        lambda: generate(str(folder), tokenizer, prompts[:2], 4, STOPS, ignore_eos=True),
    )
    result, outputs = timed(
        "vllm", device, lambda: generate(str(folder), tokenizer, prompts, new_tokens, STOPS, ignore_eos=True)
    )
    result.setup_seconds = warm.seconds
    result.error = result.error or warm.error
    # vLLM's engine runs in its own process; this process's peak says nothing about it.
    result.peak_memory_gb = None
    return result, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1319)
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--baseline-batch", type=int, default=256)
    parser.add_argument(
        "--variants",
        default="baseline,dynamic,static,compiled,vllm",
        help="comma-separated subset of baseline,dynamic,static,compiled,vllm",
    )
    parser.add_argument(
        "--tie-tolerance",
        type=float,
        default=0.1,
        help="largest gap (in logits) below the top for two diverging tokens to count as a near-tie",
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for eval_generation.json")
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer model and a tiny workload, for a CPU check"
    )
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.prompt_tokens, args.new_tokens, args.baseline_batch = 6, 24, 6, 4
    variants = args.variants.split(",")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = build_tokenizer()
    model = build_model(args.smoke, device)
    prompts = make_prompts(args.prompts, args.prompt_tokens)
    n, new = args.prompts, args.new_tokens
    # First CUDA calls (context, cuBLAS handles) would otherwise land in whichever variant runs first.
    generate(model, tokenizer, prompts[:2], 2)

    results: list[Result] = []
    reference = None
    if "baseline" in variants:
        result, reference = timed(
            f"baseline: HF generate, batch {args.baseline_batch}, dynamic cache",
            device,
            lambda: baseline(model, tokenizer, prompts, new, args.baseline_batch),
        )
        result.batch_sizes = [min(args.baseline_batch, n - s) for s in range(0, n, args.baseline_batch)]
        results.append(result)

    ours = {
        "dynamic": ("ours: auto batch, sorted, dynamic cache", {}),
        "static": ("ours: auto batch, sorted, static cache", {"cache_implementation": "static"}),
        "compiled": (
            "ours: static cache + compile (cold, incl. compile)",
            {"cache_implementation": "static", "compile": True},
        ),
    }
    for key, (name, options) in ours.items():
        if key not in variants:
            continue
        runs = [name] if key != "compiled" else [name, "ours: static cache + compile (warm)"]
        for label in runs:
            with BatchRecorder(model) as recorder:
                result, outputs = timed(
                    label,
                    device,
                    lambda options=options: generate(
                        model, tokenizer, prompts, new, STOPS, ignore_eos=True, **options
                    ),
                )
            result.batch_sizes = recorder.sizes
            if outputs is not None and reference is not None:
                check_agreement(model, tokenizer, prompts, reference, outputs, result, args.tie_tolerance)
            results.append(result)
            if result.error:
                break

    if "vllm" in variants:
        if not vllm_installed():
            results.append(Result("vllm", error="not installed (pip install vllm)"))
        elif device.type != "cuda":
            results.append(Result("vllm", error="needs CUDA"))
        else:
            # Compiled graphs keep CUDA-graph memory pools that vLLM would otherwise not get.
            torch.compiler.reset()
            result, outputs = vllm_variant(model, tokenizer, prompts, new, device)
            if outputs is not None and reference is not None:
                check_agreement(model, tokenizer, prompts, reference, outputs, result, args.tie_tolerance)
            results.append(result)

    report = write_report(args, results, device, Path(args.out))
    print_table(report, results)
    if any(r.disagreement for r in results):
        raise SystemExit(1)


def baseline_seconds(results: list[Result]) -> float | None:
    return next((r.seconds for r in results if r.name.startswith("baseline") and r.seconds), None)


def write_report(args: argparse.Namespace, results: list[Result], device: torch.device, out: Path) -> dict:
    """The figures as JSON in `out`/eval_generation.json; returns them."""
    base = baseline_seconds(results)
    report = {
        "workload": {
            "prompts": args.prompts,
            "prompt_tokens": f"{args.prompt_tokens} +- {max(1, args.prompt_tokens // 18)}",
            "new_tokens": args.new_tokens,
            "forced_full_length": "every row generates exactly new_tokens (min_new_tokens / ignore_eos): "
            "random weights never emit EOS",
            "model": "smoke: 2-layer Qwen2, hidden 64"
            if args.smoke
            else "Qwen2 hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab 151936, bf16",
        },
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": [
            asdict(r) | {"ratio_vs_baseline": (base / r.seconds) if base and r.seconds else None}
            for r in results
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_generation.json").write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict, results: list[Result]) -> None:
    """Seconds and speed-up against the baseline, one row a variant."""
    base = baseline_seconds(results)
    workload = report["workload"]
    print(
        f"\n{workload['prompts']} prompts x {workload['new_tokens']} new tokens "
        f"(forced: random weights never emit EOS) on {report['device']}"
    )
    print(f"{'variant':<52} {'seconds':>8} {'speed-up':>9} {'batches':>16} {'peak GB':>8} {'agree':>9}")
    for r in results:
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        ratio = f"{base / r.seconds:.2f}x" if base and r.seconds else "-"
        batches = ",".join(map(str, r.batch_sizes[:4])) + ("..." if len(r.batch_sizes) > 4 else "")
        peak = f"{r.peak_memory_gb:.1f}" if r.peak_memory_gb is not None else "-"
        if r.disagreement:
            agree = "FAIL"
        else:
            agree = f"{r.identical_rows}={r.tie_rows}~" if r.identical_rows is not None else "-"
        print(f"{r.name:<52} {seconds:>8} {ratio:>9} {batches or '-':>16} {peak:>8} {agree:>9}")
        if r.setup_seconds is not None:
            print(f"{'  (engine start-up, once per sweep)':<52} {r.setup_seconds:>8.1f}")
        if r.error:
            print(f"  error: {r.error}")
        if r.disagreement:
            print(f"  disagrees with the baseline: {r.disagreement}")
    print("agree: checked rows identical to the baseline (=) / leaving it only at a near-tie (~)")


if __name__ == "__main__":
    main()
