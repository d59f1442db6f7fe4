"""Where a packed gsm8k eval's decode goes: K adapters' prompts in one batched decode, against one.

The gsm8k sweep of `packed_bench.py` is decode-bound (bench/RESULTS.md, fourth round: a pack of 4
trains 40 steps in 14 s, then decodes 4 x 256 prompts in ~28 s). This measures, in one process on
one GPU, the path a pack's scoring takes (`generate` with the pack's row routing, frozen
adapters, static KV cache) at K = 1, 4, 8 adapters x `--prompts` prompts of ~`--prompt-tokens`
tokens, `--new-tokens` new each (forced: random weights never stop), and the plain base model
alone (what a one-at-a-time trial decodes through once its adapter is merged). For each: wall
time, decode steps, seconds a step, rows a batch, GPU busy share (nvidia-smi every 0.5 s). Last,
torch.profiler over a short decode of the largest K, by host and device time per op.

    python3 bench/pack_decode.py --out $OUT          # 0.5B shape, 256 prompts x ~800 tokens, 256 new
    python3 bench/pack_decode.py --tiny              # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from packed_bench import GpuSampler, busy_text, free_memory, say


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--ks", default=None, help="adapters decoded together (1,4,8)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per adapter (256)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (800)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (256)")
    p.add_argument("--compiled", action="store_true", help="also time the compiled decode of the base")
    p.add_argument("--out", default=None)
    p.add_argument("--work", default="/tmp/pack_decode")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.ks = [int(k) for k in (args.ks or ("1,2" if tiny else "1,4,8")).split(",")]
    args.prompts = args.prompts or (4 if tiny else 256)
    args.prompt_tokens = args.prompt_tokens or (40 if tiny else 800)
    args.new_tokens = args.new_tokens or (4 if tiny else 256)
    args.size = "tiny" if tiny else "0.5b"
    args.out = args.out or os.environ.get("OUT") or str(BENCH.parent / "bench_out")
    return args


def prompts_of(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """`n` texts of about `tokens` tokens each, decoded from random ids of the tokenizer's vocabulary."""
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    texts = []
    for _ in range(n):
        length = rng.randint(int(tokens * 0.9), int(tokens * 1.1))
        texts.append(tokenizer.decode([rng.randrange(4, vocab) for _ in range(length)]))
    return texts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from synthetic import build_model, build_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.trial import TrialParams
    from objectives.generation import generate
    from objectives.gsm8k import STOP_SEQUENCES
    from runners.multilora import MultiLoRA, lora_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    sampler = GpuSampler()
    sampler.start()
    folder = Path(args.work) / args.size
    build_model(
        args.size, folder, build_tokenizer(1024 if args.tiny else 16384), device, str(dtype).split(".")[1]
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    prompts = prompts_of(tokenizer, args.prompts, args.prompt_tokens)
    results: dict[str, Any] = {"args": vars(args), "runs": []}

    def timed(label: str, k: int, run) -> None:
        free_memory()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.time()
        t0 = time.perf_counter()
        outputs = run()
        if on_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        record = {
            "label": label,
            "adapters": k,
            "rows": len(outputs),
            "wall_s": wall,
            "s_per_adapter": wall / max(k, 1),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
            "gpu": sampler.summary(started, time.time()),
        }
        results["runs"].append(record)
        say(
            f"{label}: {len(outputs)} rows in {wall:.1f}s ({wall / max(k, 1):.1f}s an adapter), "
            f"peak {record['peak_gib'] or 0:.1f} GiB, GPU busy {busy_text(record['gpu'])}"
        )

    def decode(
        texts: list[str], route=None, new_tokens: int = args.new_tokens, compile: bool = False
    ) -> list[str]:
        return generate(
            model,
            tokenizer,
            texts,
            new_tokens,
            STOP_SEQUENCES,
            ignore_eos=True,
            cache_implementation="static" if on_cuda else "dynamic",
            compile=compile,
            route=route,
        )

    timed("base model alone (a merged one-at-a-time trial)", 1, lambda: decode(prompts))
    if on_cuda and args.compiled:
        # What Hugging Face's compiled static-cache decode step buys: the first call pays the
        # compilation, the second shows the steady speed.
        for attempt in ("compiling", "compiled"):
            try:
                timed(f"base model alone, {attempt}", 1, lambda: decode(prompts, compile=True))
            except Exception as exc:  # noqa: BLE001 - a bench records what failed and goes on
                say(f"compiled decode failed: {type(exc).__name__}: {exc}"[:400])
                break
    adapters = MultiLoRA(model, max(args.ks))
    for slot in range(max(args.ks)):
        params = TrialParams(lora_rank=16, lora_alpha=32, target_modules="all-linear", seed=slot)
        adapters.assign(slot, lora_config(params), params.seed)
    model.eval()

    def routed(k: int):
        def route(rows):
            index = torch.tensor([row // len(prompts) for row in rows], device=device)
            return adapters.routing.by_row(index, present=range(k), frozen=True)

        return route

    for k in args.ks:
        timed(f"{k} adapters routed, one decode", k, lambda k=k: decode(prompts * k, routed(k)))

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sort = "cuda_time_total" if on_cuda else "cpu_time_total"
    k = max(args.ks)
    rows = prompts * k
    # A short decode of each path (8 new tokens) under the profiler: the base alone over one
    # adapter's prompts, and the largest pack's routed decode.
    for name, texts, route in [("base", prompts, None), (f"routed{k}", rows[:1024], routed(k))]:
        with profile(activities=activities) as prof:
            decode(texts, route, new_tokens=8)
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (out / f"pack_decode_profile_{name}.txt").write_text(table)
        print(f"profile of {name} ({len(texts)} rows, 8 new tokens)")
        print(table[:7000])
    sampler.stop()
    (out / "pack_decode.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
