"""GPU benchmark of `sweep promote --export gptq` on a Qwen2.5-0.5B-shaped model.

Builds a model with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151936, tied embeddings; about 494M parameters) with random weights and the demo's
tokenizer, runs a one-trial LoRA sweep on the demo's sorting data, then promotes that trial with
a GPTQ export through the same code path as the CLI: merge in bf16, merge check, GPTQ (4-bit,
group size 128) calibrated on the train file, re-score, register. It prints size and objective
before/after as a table and writes them to $OUT/promote_gptq.json.

    OUT=/some/dir python bench/promote_gptq.py            # the 0.5B shape
    OUT=/some/dir python bench/promote_gptq.py --small    # a 2-layer smoke run of the same path

Random weights make the objective values a measure of the pipeline, not of a useful model: the
numbers to read are the size ratio, the GPTQ delta against the merge, the merge error and times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO = REPO / "search_spaces" / "demo"
QWEN2_5_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
}
# Multiples of 128 so every Linear splits into whole GPTQ groups, as in the real shape.
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}

SWEEP_YAML = """\
name: bench-promote-gptq
model:
  name_or_path: {model}
  dtype: bfloat16
  attn_implementation: sdpa
data:
  format: alpaca
  train_file: {demo}/train.jsonl
  eval_file: {demo}/eval.jsonl
objective:
  name: eval_loss
  batch_size: 32
space:
  lora_rank: {{type: categorical, choices: [16]}}
training:
  method: lora
  lora_alpha: 32
  learning_rate: 1.0e-3
  num_epochs: 3
  per_device_batch_size: 16
  cutoff_len: 128
  lr_scheduler: constant
  seed: 0
budget:
  trials: 1
"""


def build_model(folder: Path, shape: dict[str, int]) -> int:
    """Write a random-weight Qwen2 of `shape` with the demo tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    config = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    # Initialised on the GPU: seconds instead of a minute of CPU random numbers for 0.5B weights.
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer model: a quick smoke run")
    args = parser.parse_args()

    import torch

    from core.config import load_config
    from core.store import Store
    from sweeps.promote import gptq_unavailable_reason, promote

    reason = gptq_unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", ".")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shape = SMALL if args.small else QWEN2_5_0_5B

    work = Path(tempfile.mkdtemp(prefix="promote-gptq-"))
    os.chdir(work)  # mlruns/ (tracking, study, promoted folders) lands here
    times: dict[str, float] = {}

    started = time.perf_counter()
    parameters = build_model(work / "base", shape)
    times["build_s"] = time.perf_counter() - started

    config_path = work / "sweep.yaml"
    config_path.write_text(SWEEP_YAML.format(model=work / "base", demo=DEMO))
    started = time.perf_counter()
    # The sweep runs as users run it: the CLI, in its own process.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config_path)]
    sweep = subprocess.run(command, check=False, env=env)
    if sweep.returncode != 0:
        print(
            f"error: the sweep failed (exit {sweep.returncode}); its records are in {work}", file=sys.stderr
        )
        return sweep.returncode
    times["sweep_s"] = time.perf_counter() - started
    config = load_config(config_path)

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = promote(config, Store.at(), export="gptq")
    times["promote_s"] = time.perf_counter() - started

    record = {
        "model": "Qwen2-shaped, random weights" + (" (small)" if args.small else " (Qwen2.5-0.5B shape)"),
        "shape": shape,
        "parameters": parameters,
        "trial": result.trial,
        "trial_objective": result.trial_value,
        "objective": config.objective.name,
        "merged_dtype": result.dtype,
        "merge_max_rel_logit_error": result.merge_error,
        "merged_objective": result.merged_objective,
        "gptq_objective": result.gptq_objective,
        "gptq_delta": result.gptq_delta,
        "merged_bytes": result.merged_bytes,
        "gptq_bytes": result.gptq_bytes,
        "size_ratio": result.gptq_bytes / result.merged_bytes,
        "registered": f"{result.model_name} v{result.version}",
        "promote_peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20,
        **{key: round(value, 2) for key, value in times.items()},
        "device": torch.cuda.get_device_name(0),
        "versions": {
            name: package_version(name)
            for name in ("torch", "transformers", "peft", "trl", "llmcompressor", "compressed-tensors")
        },
        "python": platform.python_version(),
        "work_dir": str(work),
    }
    (out / "promote_gptq.json").write_text(json.dumps(record, indent=2) + "\n")

    mib = 2**20
    print()
    print(
        table(
            [
                ("", "merged (bf16)", "gptq (int4, g128)"),
                (
                    "size on disk",
                    f"{result.merged_bytes / mib:.1f} MiB",
                    f"{result.gptq_bytes / mib:.1f} MiB",
                ),
                (
                    f"objective ({config.objective.name})",
                    f"{result.merged_objective:.4f}",
                    f"{result.gptq_objective:.4f} ({result.gptq_delta:+.4f})",
                ),
            ]
        )
    )
    print(
        f"\n{record['model']}, {parameters / 1e6:.0f}M parameters, on {record['device']}; "
        f"merge check {result.merge_error:.3g}; sweep {times['sweep_s']:.0f}s, promote {times['promote_s']:.0f}s; "
        f"numbers in {out / 'promote_gptq.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
