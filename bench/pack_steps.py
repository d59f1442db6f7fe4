"""Where a big pack's step goes: packed step time against pack size, at the makespan sweep's rows.

`packed_bench.py`'s makespan sweep (16 trials, 16 rows of 100-400 tokens each, 0.5B shape) runs
packs of ~6 trials. This measures, in one process on one GPU, the packed runner's steady step at
K = 1..16 trials of those rows for each step layout (`--layouts`): `joined` (each trial's rows
joined end to end, attention told the row boundaries: no padding but each trial's tail),
`padded` (rows padded to the longest, cut where the cut cost says it pays) and `one-chunk`
(padded, never cut); with the GPU sampled every 0.5 s. First it checks the varlen attention
kernel against per-row SDPA (forward and gradients); last it profiles two steps of one pack with
torch.profiler (host and device time by op), so the next change aims at what costs.

    python3 bench/pack_steps.py --ks 1,4,6,8,16 --steps 12 --warm 4   # $OUT/pack_steps.json, pack_profile.txt
    python3 bench/pack_steps.py --tiny                                 # CPU smoke run, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from packed_bench import (
    Assets,
    GpuSampler,
    Results,
    bench_config,
    busy_text,
    cuda,
    free_memory,
    pack_measure,
    say,
)

_NO_CUT = 10**12
"""A cut cost no padding saving reaches: every step stays one chunk."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, K 1 and 2, 3 steps")
    p.add_argument("--ks", default=None, help="pack sizes (1,4,6,8,16)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trial (12)")
    p.add_argument("--warm", type=int, default=None, help="steps before the clock starts (4)")
    p.add_argument("--layouts", default="joined,padded", help="joined, padded, one-chunk (comma list)")
    p.add_argument("--profile-k", type=int, default=None, help="pack size profiled, joined rows (8; tiny 2)")
    p.add_argument("--out", default=None, help="results folder ($OUT, else ./bench_out)")
    p.add_argument("--work", default=None, help="scratch for the model and data")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.ks = [int(k) for k in (args.ks or ("1,2" if tiny else "1,4,6,8,16")).split(",")]
    args.steps = args.steps or (3 if tiny else 12)
    args.warm = args.warm or (1 if tiny else 4)
    args.profile_k = args.profile_k or (2 if tiny else 8)
    args.out = args.out or os.environ.get("OUT") or "bench_out"
    args.work = args.work or "/tmp/pack_steps"
    # What packed_bench's Assets read: the makespan sweep's rows and model.
    args.size = "tiny" if tiny else "0.5b"
    args.cutoff = 128 if tiny else 512
    args.row_min, args.row_max = (30, 170) if tiny else (100, 400)
    args.train_rows = 96 if tiny else 1024
    args.eval_rows = 8 if tiny else 64
    args.tokenizer_vocab = 1024 if tiny else 16384
    args.batch = 4 if tiny else 16
    return args


def trial_params(args: argparse.Namespace, k: int) -> list[Any]:
    """K trials as the makespan sweep samples them: ranks 8/16/32 in turn, rsLoRA on every other."""
    from core.trial import TrialParams

    return [
        TrialParams(
            method="lora",
            learning_rate=1e-4,
            lora_rank=(8, 16, 32)[i % 3],
            lora_alpha=32,
            use_rslora=bool(i % 2),
            max_steps=args.steps,
            per_device_batch_size=args.batch,
            cutoff_len=args.cutoff,
            seed=i,
        )
        for i in range(k)
    ]


def profile(runner: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Two steady steps of the largest pack under torch.profiler: the top ops by host and by device time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from runners.packed import PackedRunner
    from runners.sft import TrialCallbacks

    free_memory()
    pack = PackedRunner(runner, args.profile_k)
    pack.join_rows = True
    work = Path(args.work) / "profile"
    try:
        for number, params in enumerate(trial_params(args, args.profile_k)):
            pack.add(params, work / f"trial-{number}", TrialCallbacks(), number)
        # Steps of the pack one at a time (advance() would run them to the trials' end).
        for _ in range(args.warm):
            pack._pack_step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
        started = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                pack._pack_step()
            if cuda():
                torch.cuda.synchronize()
        wall = time.perf_counter() - started
    finally:
        pack.close()
        shutil.rmtree(work, ignore_errors=True)
    averages = prof.key_averages()
    device_key = "self_device_time_total" if cuda() else "self_cpu_time_total"
    tables = {
        "by host time": averages.table(sort_by="self_cpu_time_total", row_limit=30),
        "by device time": averages.table(sort_by=device_key, row_limit=30),
    }
    (out / "pack_profile.txt").write_text(
        f"K={args.profile_k}, 2 steps, {wall:.3f} s wall\n\n"
        + "\n\n".join(f"== {name}\n{table}" for name, table in tables.items())
    )
    host_us = sum(event.self_cpu_time_total for event in averages)
    device_us = sum(getattr(event, "self_device_time_total", 0) for event in averages) if cuda() else None
    return {
        "k": args.profile_k,
        "steps": 2,
        "wall_s": wall,
        "host_self_s": host_us / 1e6,
        "device_self_s": device_us / 1e6 if device_us is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from runners import packed
    from runners.sft import TrialRunner

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    sampler = GpuSampler()
    sampler.start()
    assets = Assets(args, results)
    data = assets.alpaca("rows", args.row_min, args.row_max, args.train_rows, args.eval_rows)
    config = bench_config(
        Path(args.work) / "configs" / "pack-steps.yaml",
        "pack-steps",
        assets.model(args.size, "alpaca"),
        {
            "format": "alpaca",
            "train_file": data["train"],
            "eval_file": data["eval"],
            "chat_template": "chatml",
        },
        {"name": "eval_loss", "batch_size": 8, "max_length": args.cutoff},
        {"method": "lora"},
    )
    runner = TrialRunner(config, cache_dir=Path(args.work) / "tokenized")
    runner.prepare()
    import varlen_attention

    record: dict[str, Any] = {"rows_tokens": [args.row_min, args.row_max], "batch": args.batch, "runs": []}
    try:
        record["varlen_check"] = varlen_attention.self_check("cuda" if cuda() else "cpu")
    except Exception as exc:  # noqa: BLE001 -- recorded with its traceback; the joined runs then show it too
        record["varlen_check"] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    say(f"varlen kernel against per-row SDPA: {record['varlen_check']}")
    # layout -> (join_rows, cut cost)
    layouts = {
        "joined": (True, packed.CUT_COST_TOKENS),
        "padded": (False, packed.CUT_COST_TOKENS),
        "one-chunk": (False, _NO_CUT),
    }
    default_cost = packed.CUT_COST_TOKENS
    # Untimed: loads the base and runs the pack's kernels once.
    pack_measure(runner, trial_params(args, 1), Path(args.work) / "warm-up", 1)
    for layout in args.layouts.split(","):
        join_rows, packed.CUT_COST_TOKENS = layouts[layout]
        for k in args.ks:
            start = time.time()
            try:
                run = pack_measure(
                    runner, trial_params(args, k), Path(args.work) / f"k{k}", args.warm, join_rows
                )
            except torch.OutOfMemoryError as exc:
                run = {"status": "OOM", "error": str(exc).splitlines()[0]}
                free_memory()
            run.update(layout=layout, k=k, gpu=sampler.summary(start, time.time()))
            step = run.get("step_s")
            run["trial_step_s"] = step / k if step else None
            record["runs"].append(run)
            say(
                f"{layout:9} K={k:2}: step {step or float('nan'):.3f} s, "
                f"{(run['trial_step_s'] or float('nan')):.3f} s per trial-step, "
                f"{(run.get('steady_tokens_per_s') or 0):,.0f} real tok/s, peak {(run.get('peak_mb') or 0) / 1024:.1f} GiB, "
                f"GPU {busy_text(run['gpu'])} {run.get('error') or ''}"
            )
            (out / "pack_steps.json").write_text(json.dumps(record, indent=1, default=str))
    packed.CUT_COST_TOKENS = default_cost
    record["profile"] = profile(runner, args, out)
    say(f"profile: {record['profile']}")
    (out / "pack_steps.json").write_text(json.dumps(record, indent=1, default=str))
    sampler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
