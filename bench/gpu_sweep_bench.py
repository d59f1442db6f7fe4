"""GPU benchmark for issue 6: per-trial cost, sweep makespan, train throughput and QLoRA memory.

Everything runs offline on random-weight Qwen2-shaped models (0.5B and 1.5B shapes, see
`synthetic.py`) and synthetic alpaca rows of 200-1200 tokens, saved to disk first so model load is
a real `from_pretrained`. Random weights cost the same FLOPs and bytes as trained ones; loss values
are meaningless and never compared.

Parts (`--part`, comma-separated, or `all`; they run in this order):
  per_trial   LoRA, rsLoRA, full FT and QLoRA at one batch x cutoff_len, per size, through the
              project's own `TrialRunner`: load time, train tokens/s, peak memory, eval time.
  qlora_mem   QLoRA vs bf16 LoRA peak memory on the 1.5B shape, each on a runner holding only its
              own base: at the per-trial batch, and at batch 4 and 1 with gradient checkpointing.
  makespan    8 short LoRA trials: `sweeps.loop.run_sweep` (one process, model and tokens reused,
              Optuna + MLflow on SQLite) vs `naive_trial.py` as a fresh python3 per trial.
  throughput  LoRA on the 0.5B shape at 16 x 1024: plain HF Trainer + peft on padded batches vs the
              runner as it stands vs runner variants (padding-free batches, TRL packing, a varlen
              attention kernel, Liger) built by overriding the runner's SFTConfig.

A time guard skips what no longer fits (`--budget-s`, noted in the output) and an alarm stops the
run shortly after, so a device call ends with its table printed. Results go to
`$OUT/gpu_sweep_bench_<parts>.json` after every measurement; the compact table is printed last.

    python3 bench/gpu_sweep_bench.py --part per_trial,qlora_mem            # device call A
    python3 bench/gpu_sweep_bench.py --part makespan,throughput --sizes 0.5b   # device call B
    python3 bench/gpu_sweep_bench.py --tiny --part all                      # CPU smoke run
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse
import gc
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (str(REPO), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Makespan before throughput: the Liger variant patches Qwen2's rotary function for the whole
# process, which must not leak into the project-vs-naive comparison.
PARTS = ("per_trial", "qlora_mem", "makespan", "throughput")
METHODS = ("lora", "rslora", "full", "qlora")  # QLoRA last: its 4-bit base then stays resident


class BudgetExceeded(BaseException):
    """Raised by the alarm. A BaseException, so the runner's `except Exception` cannot swallow it."""


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Bookkeeping: results file, time guard, memory helpers


class Results:
    """Everything measured, rewritten to disk after each measurement so a killed run keeps it."""

    def __init__(self, out_dir: Path, parts: tuple[str, ...]):
        # Named by part so the two device calls' files never overwrite each other once fetched.
        self.path = out_dir / f"gpu_sweep_bench_{'-'.join(parts)}.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"notes": [], "per_trial": [], "qlora_mem": [], "throughput": []}

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        say(f"note: {text}")
        self.save()

    def add(self, part: str, record: dict) -> None:
        self.data.setdefault(part, []).append(record)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class Guard:
    """Skip a unit of work that would not finish before the deadline; alarm shortly after it."""

    def __init__(self, budget_s: float, results: Results):
        self.deadline = _T0 + budget_s
        self.results = results
        self.slowdown = 1.0  # learnt: how much slower than estimated this machine runs

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allow(self, what: str, estimate_s: float) -> bool:
        needed = estimate_s * self.slowdown
        if self.left() >= needed:
            return True
        self.results.note(f"skipped {what}: needs ~{needed:.0f}s, {max(self.left(), 0):.0f}s of budget left")
        return False

    def learn(self, estimate_s: float, actual_s: float, ok: bool = True) -> None:
        """Fold a finished unit's real duration into later estimates (a fast failure teaches nothing)."""
        if ok and estimate_s > 0:
            self.slowdown = min(5.0, max(0.5, 0.5 * self.slowdown + 0.5 * actual_s / estimate_s))

    def arm(self, grace_s: float) -> None:
        def fire(signum, frame):
            raise BudgetExceeded()

        signal.signal(signal.SIGALRM, fire)
        signal.alarm(max(1, int(self.left() + grace_s)))


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_memory() -> None:
    gc.collect()
    if cuda():
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def allocated_mb() -> float | None:
    if not cuda():
        return None
    import torch

    return torch.cuda.memory_allocated() / 2**20


def gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def steady_rate(points: list[tuple[int, float, int]], warm: int) -> float | None:
    """Non-padding tokens per second between step `warm` and the last step (first steps pay warm-up)."""
    points = [p for p in points if p[0] >= 1]
    if len(points) < 2:
        return None
    start = next((p for p in points if p[0] >= warm), points[0])
    if start is points[-1]:
        start = points[-2]
    end = points[-1]
    seconds = end[1] - start[1]
    return (end[2] - start[2]) / seconds if seconds > 0 else None


class Probe:
    """Trial callbacks that clock each optimizer step and read memory, synchronised with the GPU.

    The trainer already synchronises every step (it logs the loss and token count each step), so
    one more synchronize costs nothing and makes the step clock mean GPU time.
    """

    def __init__(self) -> None:
        self.clock: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self.losses: dict[int, float] = {}
        self.max_alloc_mb: float | None = None
        self.resident_at_train_begin_mb: float | None = None

    def on_step(self, *args) -> None:
        step = args[-2]  # (step, total), or (trial number, step, total) for a sweep observer
        if cuda():
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            self.max_alloc_mb = max(self.max_alloc_mb or 0.0, peak)
            if step == 0:
                self.resident_at_train_begin_mb = allocated_mb()
        self.clock[step] = time.perf_counter()

    def on_log(self, metrics: dict[str, float], step: int) -> None:
        if "num_input_tokens_seen" in metrics:
            self.tokens[step] = int(metrics["num_input_tokens_seen"])
        if "train_loss" in metrics:
            self.losses[step] = float(metrics["train_loss"])

    def points(self) -> list[tuple[int, float, int]]:
        return [(s, self.clock[s], self.tokens[s]) for s in sorted(self.clock) if s in self.tokens]

    def callbacks(self):
        from runners.sft import TrialCallbacks

        return TrialCallbacks(on_step=self.on_step, on_log=self.on_log)


# --------------------------------------------------------------------------------------------------
# Set-up: environment, tokenizer, data, models, configs


def quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("alembic", "mlflow", "optuna", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def environment() -> dict:
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in (
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "tokenizers",
        "pydantic",
        "optuna",
        "mlflow",
        "sqlalchemy",
        "bitsandbytes",
        "liger_kernel",
        "flash_attn",
        "pyarrow",
    ):
        if importlib.util.find_spec(name) is None:
            env[name] = None
            continue
        try:
            from importlib.metadata import version

            dist = {"mlflow": "mlflow-skinny", "liger_kernel": "liger-kernel", "flash_attn": "flash-attn"}
            env[name] = version(dist.get(name, name))
        except Exception:  # noqa: BLE001  (a version is nice to have, never worth failing for)
            env[name] = "installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
        try:
            env["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    env["cpus"] = os.cpu_count()
    return env


def warm_up_gpu(results: Results) -> None:
    """Create the CUDA context and cuBLAS handles once, so the first trial is not charged for them."""
    if not cuda():
        return
    import torch

    started = time.perf_counter()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    del a
    torch.cuda.empty_cache()
    results.data["cuda_init_s"] = time.perf_counter() - started


def write_config(
    path: Path,
    name: str,
    model_dir: str,
    data: dict,
    dtype: str,
    training: dict,
    objective_batch: int,
    cutoff: int,
    trials: int = 8,
    store: Path | None = None,
):
    """A sweep YAML in the documented format, validated by the project's own loader."""
    from core.config import load_config

    lines = [
        f"name: {name}",
        "model:",
        f"  name_or_path: {model_dir}",
        f"  dtype: {dtype}",
        "  attn_implementation: sdpa",
        "data:",
        "  format: alpaca",
        f"  train_file: {data['train']}",
        f"  eval_file: {data['eval']}",
        "  chat_template: chatml",
        "objective:",
        "  name: eval_loss",
        f"  batch_size: {objective_batch}",
        f"  max_length: {cutoff}",
        "space:",
        "  learning_rate: {type: float, low: 1.0e-5, high: 5.0e-4, log: true}",
        "  lora_rank: {type: categorical, choices: [8, 16, 32]}",
        "  use_rslora: {type: bool}",
        "training:",
        *[f"  {k}: {json.dumps(v)}" for k, v in training.items()],
        "budget:",
        f"  trials: {trials}",
        f"  max_failed_trials: {trials}",
        "sampler: {type: random, seed: 0}",
    ]
    if store is not None:
        lines += [
            "tracking:",
            f"  uri: sqlite:///{store / 'mlflow.db'}",
            f"  artifact_location: {store / 'artifacts'}",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def trial_params(**overrides):
    from core.trial import TrialParams

    params = {"method": "lora", "lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "seed": 0}
    params.update(overrides)
    return TrialParams(**params)


def run_trial(runner, params, out_dir: Path, warm: int) -> dict:
    """One `TrialRunner.run` with a probe; returns a flat record of what the issue asks for."""
    probe = Probe()
    free_memory()
    resident = allocated_mb()
    started = time.perf_counter()
    result = runner.run(params, out_dir, probe.callbacks())
    wall = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)
    record = {
        "status": result.status.value,
        "error": (result.error or "")[:500] or None,
        "failure_kind": getattr(result, "failure_kind", None),
        "wall_s": wall,
        "load_s": result.timings.load_s,
        "train_s": result.timings.train_s,
        "eval_s": result.timings.eval_s,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.train_tokens_per_s,
        "steady_tokens_per_s": steady_rate(probe.points(), warm),
        "tokens_per_step": (result.train_tokens / params.max_steps) if params.max_steps > 0 else None,
        "peak_mb": result.peak_memory_mb,
        "memory_kind": result.memory_kind,
        "train_peak_mb": probe.max_alloc_mb,
        "resident_before_mb": resident,
        "resident_at_train_begin_mb": probe.resident_at_train_begin_mb,
        "resident_after_mb": allocated_mb(),
        "objective": result.objective,
        "steps_clocked": len(probe.points()),
        # Step-1 loss: variants that see the same batches (padded vs padding-free) must agree here.
        "first_loss": probe.losses.get(1),
    }
    free_memory()
    return record


# --------------------------------------------------------------------------------------------------
# Parts


class Bench:
    def __init__(self, args, results: Results, guard: Guard):
        self.args = args
        self.results = results
        self.guard = guard
        self.work = Path(args.work)
        self.dtype = "bfloat16" if cuda() else "float32"
        results.data["args"]["dtype"] = self.dtype
        self.models: dict[str, str] = {}
        self.data: dict = {}
        self.warm = max(1, min(5, args.steps // 4))

    # ---- set-up ----

    def setup(self, sizes: list[str]) -> None:
        import torch
        from synthetic import DataSpec, build_model, build_tokenizer, write_data

        started = time.perf_counter()
        tokenizer = build_tokenizer(self.args.tokenizer_vocab)
        self.data = write_data(
            self.work / "data",
            tokenizer,
            DataSpec(self.args.train_rows, self.args.eval_rows, self.args.min_tokens, self.args.max_tokens),
        )
        lengths = self.data.pop("lengths")
        over = sum(n > self.args.cutoff for n in lengths)
        self.results.data["data"] = {
            **{k: v for k, v in self.data.items() if k not in ("train", "eval")},
            "rows_over_cutoff": over,
            "tokenizer_vocab": len(tokenizer),
            "seconds": time.perf_counter() - started,
        }
        say(
            f"data: {self.data['train_rows']} train / {self.data['eval_rows']} eval rows, tokens min "
            f"{self.data['length_min']} median {self.data['length_median']} max {self.data['length_max']}, "
            f"{over} over cutoff {self.args.cutoff}"
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.results.data["models"] = {}
        for size in sizes:
            if not self.guard.allow(f"building the {size} model", {"0.5b": 30, "1.5b": 60}.get(size, 5)):
                continue
            started = time.perf_counter()
            info = build_model(size, self.work / "models" / size, tokenizer, device, self.dtype)
            free_memory()
            self.models[size] = info["path"]
            self.results.data["models"][size] = {**info, "build_s": time.perf_counter() - started}
            say(f"model {size}: {info['params'] / 1e6:.1f}M parameters (random weights) at {info['path']}")
        self.results.save()

    def config(self, name: str, size: str, training: dict | None = None, trials: int = 8, store=None):
        return write_config(
            self.work / "configs" / f"{name}.yaml",
            name,
            self.models[size],
            self.data,
            self.dtype,
            training or {"method": "lora", "max_steps": self.args.steps},
            self.args.eval_batch,
            self.args.cutoff,
            trials,
            store,
        )

    def estimate(self, size: str, steps: int, method: str = "lora", batch: int | None = None) -> float:
        """Seconds a trial should take on an H100 (issue 6: naive LoRA 0.5B ~0.35 s/step at 16x1024), padded."""
        per_step = {"0.5b": 0.35, "1.5b": 0.9, "tiny": 0.3}.get(size, 1.0)
        fixed = {"0.5b": 8, "1.5b": 15, "tiny": 4}.get(size, 15)
        factor = {"full": 1.8, "qlora": 2.0}.get(method, 1.0)
        scale = (batch or self.args.batch) / 16 if cuda() else 1.0
        return fixed * factor + per_step * factor * steps * max(scale, 0.25)

    # ---- per_trial ----

    def per_trial(self, sizes: list[str]) -> None:
        from runners.sft import TrialRunner

        a = self.args
        for size in sizes:
            if size not in self.models:
                continue
            config = self.config(f"per-trial-{size}", size)
            runner = TrialRunner(config, cache_dir=self.work / "tokenized")
            started = time.perf_counter()
            runner.prepare()
            say(f"per_trial {size}: runner prepared in {time.perf_counter() - started:.1f}s")
            # The base model's cold load, timed alone: from_pretrained from local safetensors to the GPU.
            free_memory()
            started = time.perf_counter()
            runner.models.base(quantized=False)
            if cuda():
                import torch

                torch.cuda.synchronize()
            base = {"base_load_s": time.perf_counter() - started, "base_mb": allocated_mb()}
            self.results.data.setdefault("base_load", {})[size] = base
            say(f"per_trial {size}: base loaded in {base['base_load_s']:.1f}s, {gib(base['base_mb'])} GiB")
            # An unrecorded 2-step trial next: it tokenizes the data and JIT-compiles TRL's Triton
            # loss kernels, one-time costs a sweep pays once (the makespan part counts them) that
            # would otherwise land on whichever method happens to come first in this table.
            if self.guard.allow(f"per_trial {size} warm-up", self.estimate(size, 2)):
                warm_up = trial_params(max_steps=2, per_device_batch_size=a.batch, cutoff_len=a.cutoff)
                record = self.safe(run_trial, runner, warm_up, self.work / "trials" / f"{size}-warmup", 1)
                self.results.data.setdefault("per_trial_warmup", {})[size] = record
                say(
                    f"per_trial {size} warm-up (tokenization + kernel compile): {record.get('wall_s', 0):.1f}s "
                    f"load {record.get('load_s', 0):.1f}s {record.get('error') or ''}"
                )
            for method in METHODS:
                estimate = self.estimate(size, a.steps, method)
                if not self.guard.allow(f"per_trial {size} {method}", estimate):
                    continue
                params = trial_params(
                    method="lora" if method == "rslora" else method,
                    use_rslora=method == "rslora",
                    learning_rate=2e-5 if method == "full" else 2e-4,
                    max_steps=a.steps,
                    per_device_batch_size=a.batch,
                    cutoff_len=a.cutoff,
                )
                record = {
                    "size": size,
                    "method": method,
                    "batch": a.batch,
                    "cutoff_len": a.cutoff,
                    "steps": a.steps,
                }
                record.update(
                    self.safe(run_trial, runner, params, self.work / "trials" / f"{size}-{method}", self.warm)
                )
                self.guard.learn(estimate, record.get("wall_s", 0), record.get("status") == "COMPLETE")
                self.results.add("per_trial", record)
                say(
                    f"per_trial {size} {method}: {record.get('status')} load {record.get('load_s', 0):.1f}s "
                    f"train {record.get('train_s', 0):.1f}s {record.get('tokens_per_s', 0):,.0f} tok/s "
                    f"(steady {record.get('steady_tokens_per_s') or 0:,.0f}) peak {gib(record.get('peak_mb'))} GiB "
                    f"eval {record.get('eval_s', 0):.1f}s {record.get('error') or ''}"
                )
            del runner
            free_memory()

    # ---- qlora_mem ----

    def qlora_mem(self) -> None:
        from runners.sft import TrialRunner

        a = self.args
        size = a.qlora_size
        if size not in self.models:
            self.results.note(f"qlora_mem: no {size} model built")
            return
        # The per-trial batch, then small batches with checkpointing, where weights dominate memory.
        settings = [(a.batch, False), (4, True), (a.qlora_small_batch, True)]
        steps = max(2, min(a.steps, a.qlora_steps))
        for method in ("lora", "qlora"):
            estimate = sum(self.estimate(size, steps, method, b) for b, _ in settings) + 15
            if not self.guard.allow(f"qlora_mem {method}", estimate):
                continue
            started = time.perf_counter()
            # A runner of its own, so only this method's base is resident while it is measured.
            config = self.config(f"qlora-mem-{size}-{method}", size)
            runner = TrialRunner(config, cache_dir=self.work / "tokenized")
            runner.prepare()
            free_memory()
            before = allocated_mb()
            load = {}
            try:
                t = time.perf_counter()
                runner.models.base(quantized=method == "qlora")
                load = {
                    "base_load_s": time.perf_counter() - t,
                    "base_mb": (allocated_mb() or 0) - (before or 0) if cuda() else None,
                }
            except Exception as exc:  # noqa: BLE001  (QLoRA without CUDA: the trial below records why)
                load = {"base_error": f"{type(exc).__name__}: {exc}"}
            for batch, checkpointing in settings:
                params = trial_params(
                    method=method,
                    max_steps=steps,
                    per_device_batch_size=batch,
                    cutoff_len=a.cutoff,
                    gradient_checkpointing=checkpointing,
                )
                record = {
                    "size": size,
                    "method": method,
                    "batch": batch,
                    "gradient_checkpointing": checkpointing,
                    "cutoff_len": a.cutoff,
                    "steps": steps,
                    **load,
                }
                record.update(
                    self.safe(run_trial, runner, params, self.work / "trials" / f"qmem-{method}-{batch}", 1)
                )
                self.results.add("qlora_mem", record)
                say(
                    f"qlora_mem {size} {method} batch {batch} gc={checkpointing}: {record.get('status')} "
                    f"peak {gib(record.get('peak_mb'))} GiB (train {gib(record.get('train_peak_mb'))}, "
                    f"resident at train begin {gib(record.get('resident_at_train_begin_mb'))}) {record.get('error') or ''}"
                )
            self.guard.learn(estimate, time.perf_counter() - started)
            del runner
            free_memory()

    # ---- throughput ----

    def variants(self) -> list[tuple[str, dict]]:
        """Runner settings to try, most informative first; see README.md for what each one means."""
        liger = importlib.util.find_spec("liger_kernel") is not None and cuda()
        flash = importlib.util.find_spec("flash_attn") is not None and cuda()
        out = [
            ("runner", {"packing": False, "attn": "sdpa"}),
            (
                "runner+bfd+varlen",
                {"packing": True, "attn": "sdpa_varlen", "sft": {"packing_strategy": "bfd"}},
            ),
            # Same batches as the padded runner, concatenated without padding: the optimisation path
            # is unchanged, only the padding compute goes. TRL needs max_length=None for that, which is
            # safe here because the runner's tokenized cache already truncated every row.
            (
                "runner+padfree+varlen",
                {"packing": False, "attn": "sdpa_varlen", "sft": {"padding_free": True, "max_length": None}},
            ),
            ("runner+bfd+sdpa", {"packing": True, "attn": "sdpa", "sft": {"packing_strategy": "bfd"}}),
            (
                "runner+wrapped+sdpa",
                {"packing": True, "attn": "sdpa", "sft": {"packing_strategy": "wrapped"}},
            ),
            ("runner+padded+varlen", {"packing": False, "attn": "sdpa_varlen"}),
        ]
        if flash:
            out.append(
                (
                    "runner+bfd+fa2",
                    {"packing": True, "attn": "flash_attention_2", "sft": {"packing_strategy": "bfd"}},
                )
            )
        if liger:
            # Last: Liger patches Qwen2's rotary function module-wide, which would leak into later runs.
            out.append(
                (
                    "runner+bfd+varlen+liger",
                    {
                        "packing": True,
                        "attn": "sdpa_varlen",
                        "sft": {"packing_strategy": "bfd", "use_liger_kernel": True},
                    },
                )
            )
        wanted = [v.strip() for v in self.args.variants.split(",")] if self.args.variants else None
        return [(n, v) for n, v in out if wanted is None or n in wanted]

    def throughput(self) -> None:
        import naive_trial
        import varlen_attention

        from runners.sft import TrialRunner

        a = self.args
        size = a.throughput_size
        if size not in self.models:
            self.results.note(f"throughput: no {size} model built")
            return
        steps, batch = a.throughput_steps, a.throughput_batch
        warm = max(1, min(5, steps // 4))

        varlen_ok = True
        varlen_attention.register()
        try:
            check = varlen_attention.self_check("cuda" if cuda() else "cpu")
            why = varlen_attention.available() if cuda() else None
            worst = max(v for k, v in check.items() if k != "finite")
            varlen_ok = check["finite"] and worst < 3e-2 and why is None
            self.results.data["varlen_check"] = {**check, "unavailable": why, "ok": varlen_ok}
            say(f"varlen attention check: {check} -> {'ok' if varlen_ok else 'NOT USED'} {why or ''}")
        except Exception as exc:  # noqa: BLE001
            varlen_ok = False
            self.results.data["varlen_check"] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"varlen attention check failed: {exc}")

        # The naive baseline first: plain Trainer + peft, padded batches, in this process.
        if self.guard.allow("throughput naive", self.estimate(size, steps, batch=batch) + 10):
            free_memory()
            started = time.perf_counter()

            def naive():
                import torch

                if cuda():
                    torch.cuda.reset_peak_memory_stats()
                out = naive_trial.run(
                    self.models[size],
                    self.data["train"],
                    None,
                    {
                        "method": "lora",
                        "lora_rank": 16,
                        "lora_alpha": 32,
                        "max_steps": steps,
                        "per_device_batch_size": batch,
                        "cutoff_len": a.cutoff,
                        "seed": 0,
                    },
                    str(self.work / "trials" / "naive-throughput"),
                    save=False,
                )
                return {
                    "status": "COMPLETE",
                    "train_s": out["train_s"],
                    "train_tokens": out["train_tokens"],
                    "tokens_per_s": out["train_tokens_per_s"],
                    "steady_tokens_per_s": steady_rate(out["clock"], warm),
                    "tokens_per_step": out["train_tokens"] / steps,
                    "train_peak_mb": out["train_peak_mb"],
                    "peak_mb": out["peak_mb"],
                    "load_s": out["load_s"],
                    "first_loss": out["first_loss"],
                }

            record = {
                "variant": "naive_hf_padded",
                "size": size,
                "batch": batch,
                "cutoff_len": a.cutoff,
                "steps": steps,
                "attn": "sdpa",
                "packing": False,
            }
            record.update(self.safe(naive))
            record["wall_s"] = time.perf_counter() - started
            self.results.add("throughput", record)
            self.report_throughput(record)
            free_memory()

        for name, spec in self.variants():
            if spec["attn"] == "sdpa_varlen" and not varlen_ok:
                self.results.note(f"throughput {name}: skipped, the varlen attention check did not pass")
                continue
            if not hasattr(TrialRunner, "_sft_config"):
                self.results.note(
                    f"throughput {name}: TrialRunner has no _sft_config to override; variant skipped"
                )
                continue
            estimate = self.estimate(size, steps, batch=batch) + 10
            if not self.guard.allow(f"throughput {name}", estimate):
                continue
            started = time.perf_counter()
            config = self.config(f"tp-{name.replace('+', '-')}", size)
            # Set after validation: `sdpa_varlen` is a bench-registered implementation the schema does not list.
            config.model.attn_implementation = spec["attn"]
            runner = _variant_runner(TrialRunner, config, self.work / "tokenized", spec.get("sft", {}))
            runner.prepare()
            params = trial_params(
                max_steps=steps, per_device_batch_size=batch, cutoff_len=a.cutoff, packing=spec["packing"]
            )
            record = {
                "variant": name,
                "size": size,
                "batch": batch,
                "cutoff_len": a.cutoff,
                "steps": steps,
                "attn": spec["attn"],
                "packing": spec["packing"],
                **spec.get("sft", {}),
            }
            record.update(self.safe(run_trial, runner, params, self.work / "trials" / f"tp-{name}", warm))
            self.guard.learn(estimate, time.perf_counter() - started)
            self.results.add("throughput", record)
            self.report_throughput(record)
            del runner
            free_memory()

    def report_throughput(self, record: dict) -> None:
        say(
            f"throughput {record['variant']}: {record.get('status')} steady {record.get('steady_tokens_per_s') or 0:,.0f} "
            f"tok/s (whole run {record.get('tokens_per_s') or 0:,.0f}), {record.get('tokens_per_step') or 0:,.0f} "
            f"tokens/step, train peak {gib(record.get('train_peak_mb'))} GiB {record.get('error') or ''}"
        )

    # ---- makespan ----

    def makespan(self) -> None:
        a = self.args
        size = a.makespan_size
        if size not in self.models:
            self.results.note(f"makespan: no {size} model built")
            return
        n, steps, batch = a.makespan_trials, a.makespan_steps, a.makespan_batch
        per_trial = self.estimate(size, steps, batch=batch)
        estimate = n * per_trial + 20 + n * (per_trial + 18)
        if not self.guard.allow("makespan (project + naive)", estimate):
            return
        from core.store import Store
        from sweeps.executors.local import InProcess
        from sweeps.loop import run_sweep
        from sweeps.study import load_study

        root = self.work / "makespan"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        training = {
            "method": "lora",
            "max_steps": steps,
            "per_device_batch_size": batch,
            "cutoff_len": a.cutoff,
            "lora_alpha": 16,
        }
        config = self.config("makespan", size, training, trials=n, store=root / "mlruns")
        mk: dict[str, Any] = {
            "size": size,
            "trials": n,
            "steps": steps,
            "batch": batch,
            "cutoff_len": a.cutoff,
        }
        self.results.data["makespan"] = mk

        # What `sweep run` pays once before its first trial: a python3 that imports the project.
        t = time.perf_counter()
        probe = subprocess.run(
            [sys.executable, "-c", "import sweeps.study, sweeps.tracking, runners.sft"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
            capture_output=True,
            text=True,
            check=False,
        )
        mk["project_process_start_s"] = time.perf_counter() - t
        if probe.returncode:
            mk["project_process_start_error"] = probe.stderr[-500:]

        try:
            from sweeps.preflight import quiet_libraries

            quiet_libraries()
        except ImportError:
            pass
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        observer = _Observer()
        cwd = os.getcwd()
        os.chdir(
            root
        )  # the study, trial scratch and tokenized cache live under ./mlruns, as with `sweep run`
        try:
            started = time.perf_counter()
            observer.t0 = started
            runner = _prepared_runner(config)
            store = Store.at()
            outcome = run_sweep(
                config,
                store,
                lambda parent_id, on_step: InProcess(config, store, runner, on_step),
                n_trials=n,
                observer=observer,
            )
            mk["project_s"] = time.perf_counter() - started
            mk["project_ran"] = len(outcome.ran)
            study = load_study(config, store)
            trials = sorted(study.get_trials(deepcopy=False), key=lambda tr: tr.number)
            param_sets = [
                {**training, **tr.params, "eval_batch_size": a.eval_batch} for tr in trials if tr.params
            ][:n]
        except Exception as exc:  # noqa: BLE001  (record it; the naive half has nothing to compare with)
            traceback.print_exc()
            mk["project_error"] = f"{type(exc).__name__}: {exc}"[:800]
            mk["project_trials"] = observer.records
            self.results.save()
            return
        finally:
            os.chdir(cwd)
            runner = None
            free_memory()
        mk["project_trials"] = observer.records
        mk["project_total_s"] = mk["project_s"] + mk["project_process_start_s"]
        say(
            f"makespan project: {mk['project_s']:.1f}s in process (+{mk['project_process_start_s']:.1f}s process start)"
        )
        self.results.save()

        naive_runs = []
        for index, params in enumerate(param_sets):
            if self.guard.left() < 15:
                self.results.note(
                    f"makespan naive: stopped after {index} of {len(param_sets)} trials (budget)"
                )
                break
            out = root / "naive" / f"trial-{index}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            try:
                proc = subprocess.run(
                    [
                        sys.executable,
                        str(BENCH / "naive_trial.py"),
                        "--model",
                        self.models[size],
                        "--train",
                        self.data["train"],
                        "--eval",
                        self.data["eval"],
                        "--params",
                        json.dumps(params),
                        "--out",
                        str(out),
                    ],
                    env={**os.environ, "PYTHONPATH": _pythonpath()},
                    capture_output=True,
                    text=True,
                    timeout=max(20.0, self.guard.left() + 20),
                    check=False,
                )
                wall = time.perf_counter() - t
                if proc.returncode or not out.exists():
                    naive_runs.append({"params": params, "wall_s": wall, "error": proc.stderr[-800:]})
                    say(f"makespan naive trial {index}: FAILED ({proc.returncode}) {proc.stderr[-300:]}")
                    continue
            except subprocess.TimeoutExpired:
                naive_runs.append({"params": params, "wall_s": time.perf_counter() - t, "error": "timeout"})
                break
            child = json.loads(out.read_text())
            child.pop("clock", None)
            record = {
                "params": params,
                "wall_s": wall,
                **child,
                "overhead_s": wall - child["train_s"] - child["eval_s"],
            }
            naive_runs.append(record)
            say(
                f"makespan naive trial {index}: {wall:.1f}s (import {child['import_s']:.1f}, load {child['load_s']:.1f}, "
                f"train {child['train_s']:.1f}, eval {child['eval_s']:.1f}) overhead {record['overhead_s']:.1f}s"
            )
            mk["naive_trials"] = naive_runs
            self.results.save()
        mk["naive_trials"] = naive_runs
        done = [r for r in naive_runs if "error" not in r]
        if done:
            mk["naive_s"] = sum(r["wall_s"] for r in naive_runs)
            if len(naive_runs) < len(param_sets):
                mk["naive_s_extrapolated"] = statistics.mean(r["wall_s"] for r in done) * len(param_sets)
            naive_total = mk.get("naive_s_extrapolated", mk["naive_s"])
            mk["ratio"] = naive_total / mk["project_total_s"]
            mk["ratio_in_process"] = naive_total / mk["project_s"]
        self.results.save()

    @staticmethod
    def safe(fn, *args) -> dict:
        """Run one measurement; a bench-side error is recorded, not fatal to the other parts."""
        try:
            return fn(*args)
        except BudgetExceeded:
            raise
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            return {"status": "BENCH_ERROR", "error": f"{type(exc).__name__}: {exc}"[:800]}


def _pythonpath() -> str:
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*parts, str(REPO)] if str(REPO) not in parts else parts)


def _prepared_runner(config):
    """The runner exactly as `sweep run` builds it (preflight), when this checkout has preflight."""
    from core.store import Store
    from sweeps.preflight import preflight

    return preflight(config, Store.at())


def _variant_runner(base_cls, config, cache_dir: Path, overrides: dict):
    """The project's runner with SFTConfig fields overridden: the runner change under test, made locally."""

    class VariantRunner(base_cls):
        def _sft_config(self, *args, **kwargs):
            sft = super()._sft_config(*args, **kwargs)
            for key, value in overrides.items():
                setattr(sft, key, value)
            return sft

    return VariantRunner(config, cache_dir=cache_dir)


class _Observer:
    """Sweep observer that timestamps trials; tolerant of the observer protocol gaining arguments."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last_end: float | None = None
        self.records: list[dict] = []

    def sweep_started(self, *args) -> None:
        pass

    def trial_started(self, *args) -> None:
        pass

    def trial_step(self, *args) -> None:
        pass

    def trial_finished(self, number, params, result, *args) -> None:
        now = time.perf_counter()
        since = now - (self.last_end if self.last_end is not None else self.t0)
        self.last_end = now
        work = result.timings.train_s + result.timings.eval_s
        self.records.append(
            {
                "number": number,
                "status": result.status.value,
                "params": params,
                "interval_s": since,
                "load_s": result.timings.load_s,
                "train_s": result.timings.train_s,
                "eval_s": result.timings.eval_s,
                "overhead_s": since - work,
                "tokens_per_s": result.train_tokens_per_s,
                "error": (result.error or "")[:300] or None,
            }
        )
        say(
            f"makespan project trial {number}: {result.status.value} interval {since:.1f}s "
            f"(train {result.timings.train_s:.1f}, eval {result.timings.eval_s:.1f}) overhead {since - work:.1f}s"
        )

    def __getattr__(self, name):  # any hook added to the protocol later is a no-op here
        return lambda *args, **kwargs: None


# --------------------------------------------------------------------------------------------------
# The table


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(results: Results) -> list[str]:
    d = results.data
    env = d.get("env", {})
    lines = [
        "=" * 100,
        (
            f"gpu_sweep_bench | {env.get('gpu', 'CPU')} | torch {env.get('torch')} transformers "
            f"{env.get('transformers')} trl {env.get('trl')} peft {env.get('peft')} bnb {env.get('bitsandbytes')} "
            "| random-weight Qwen2 shapes"
        ),
    ]
    targets: list[str] = []

    rows = d.get("per_trial", [])
    if rows:
        r0 = rows[0]
        lines.append(
            f"-- per trial via TrialRunner (as it stands): batch {r0['batch']} x cutoff_len {r0['cutoff_len']}, "
            f"{r0['steps']} steps, {d.get('args', {}).get('dtype', '')} sdpa padded batches; "
            "load_s after a warm-up trial loaded the base; peak = runner's whole trial (training only)"
        )
        loads = d.get("base_load", {})
        if loads:
            lines.append(
                f"cold base load (from_pretrained, {d.get('args', {}).get('dtype')} safetensors on local disk, "
                "page cache warm): "
                + ", ".join(
                    f"{k} {v['base_load_s']:.1f}s ({gib(v['base_mb'])} GiB)" for k, v in loads.items()
                )
            )
        lines.append(
            f"{'size':5} {'method':7} {'status':9} {'load_s':>6} {'train_s':>7} {'tok/s':>9} {'steady':>9} "
            f"{'peak(train)GiB':>14} {'resident':>8} {'eval_s':>6}"
        )
        for r in rows:
            lines.append(
                f"{r['size']:5} {r['method']:7} {str(r.get('status'))[:9]:9} {r.get('load_s', 0):6.1f} "
                f"{r.get('train_s', 0):7.1f} {r.get('tokens_per_s') or 0:9,.0f} {r.get('steady_tokens_per_s') or 0:9,.0f} "
                f"{gib(r.get('peak_mb')) + ' (' + gib(r.get('train_peak_mb')) + ')':>14} "
                f"{gib(r.get('resident_before_mb')):>8} {r.get('eval_s', 0):6.1f}"
                + (f"  {r['error'][:60]}" if r.get("error") else "")
            )

    q = d.get("qlora_mem", [])
    if q:
        lines.append("-- QLoRA vs bf16 LoRA peak memory (own runner each, only its base resident)")
        by = {(r["method"], r["batch"], r["gradient_checkpointing"]): r for r in q}
        for (method, batch, ckpt), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            if method != "qlora":
                continue
            lora = by.get(("lora", batch, ckpt))
            ratio = None
            if lora and lora.get("peak_mb") and r.get("peak_mb") and r.get("status") == "COMPLETE":
                ratio = r["peak_mb"] / lora["peak_mb"]
            train_ratio = None
            if (
                lora
                and lora.get("train_peak_mb")
                and r.get("train_peak_mb")
                and r.get("status") == "COMPLETE"
            ):
                train_ratio = r["train_peak_mb"] / lora["train_peak_mb"]
            lines.append(
                f"{r['size']} batch {batch:>2} ckpt={ckpt!s:5}: lora {gib(lora.get('peak_mb') if lora else None)} GiB, "
                f"qlora {gib(r.get('peak_mb'))} GiB -> {_fmt(ratio)} "
                f"(train-only {_fmt(train_ratio)}); bases {gib(lora.get('base_mb') if lora else None)} "
                f"vs {gib(r.get('base_mb'))} GiB" + (f"  {r['error'][:50]}" if r.get("error") else "")
            )
            if train_ratio:
                # Training peak is the target's measure: the whole-trial peak adds the eval-loss pass,
                # whose full fp32 logits are the same few GiB for both methods.
                targets.append(
                    f"QLoRA/LoRA train peak (batch {batch}, ckpt={ckpt}) {train_ratio:.2f} (target < 0.40): "
                    f"{'MET' if train_ratio < 0.40 else 'NOT MET'}; whole trial incl. eval {_fmt(ratio)}"
                )

    t = d.get("throughput", [])
    if t:
        naive = next(
            (r for r in t if r["variant"] == "naive_hf_padded" and r.get("steady_tokens_per_s")), None
        )
        r0 = t[0]
        lines.append(
            f"-- train throughput, LoRA {r0['size']} batch {r0['batch']} x {r0['cutoff_len']}, {r0['steps']} steps; "
            "non-padding tokens/s (steady = after warm-up steps)"
        )
        lines.append(
            f"{'variant':26} {'status':9} {'steady':>9} {'whole':>9} {'x naive':>7} {'tok/step':>8} {'train GiB':>9}"
        )
        for r in t:
            ratio = (r.get("steady_tokens_per_s") or 0) / naive["steady_tokens_per_s"] if naive else None
            r["x_naive"] = ratio
            lines.append(
                f"{r['variant']:26} {str(r.get('status'))[:9]:9} {r.get('steady_tokens_per_s') or 0:9,.0f} "
                f"{r.get('tokens_per_s') or 0:9,.0f} {_fmt(ratio, '-'):>7} "
                f"{r.get('tokens_per_step') or 0:8,.0f} {gib(r.get('train_peak_mb')):>9}"
                + (f"  {r['error'][:50]}" if r.get("error") else "")
            )
        if naive:
            asis = next((r for r in t if r["variant"] == "runner"), None)
            best = max(
                (r for r in t if r["variant"] != "naive_hf_padded" and r.get("x_naive")),
                key=lambda r: r["x_naive"],
                default=None,
            )
            if asis and asis.get("x_naive"):
                targets.append(
                    f"throughput runner as-is {asis['x_naive']:.2f}x naive (target >= 2x): "
                    f"{'MET' if asis['x_naive'] >= 2 else 'NOT MET'}"
                )
            if best:
                targets.append(
                    f"throughput best variant {best['variant']} {best['x_naive']:.2f}x naive: "
                    f"{'MET' if best['x_naive'] >= 2 else 'NOT MET'}"
                )

    mk = d.get("makespan")
    if mk and "project_s" in mk:
        lines.append(
            f"-- makespan, {mk['trials']} LoRA trials of {mk['steps']} steps x batch {mk['batch']} x "
            f"{mk['cutoff_len']} on {mk['size']}"
        )
        later = [r["overhead_s"] for r in mk.get("project_trials", [])[1:]]
        naive_later = [r["overhead_s"] for r in mk.get("naive_trials", [])[1:] if "overhead_s" in r]
        first = mk.get("project_trials", [{}])[0].get("overhead_s")
        lines.append(
            f"project {mk['project_s']:.1f}s in process + {mk['project_process_start_s']:.1f}s process start = "
            f"{mk['project_total_s']:.1f}s; naive {mk.get('naive_s', 0):.1f}s"
            + (f" (extrapolated {mk['naive_s_extrapolated']:.1f}s)" if "naive_s_extrapolated" in mk else "")
            + (
                f"; ratio {mk['ratio']:.2f}x (in-process {mk['ratio_in_process']:.2f}x)"
                if "ratio" in mk
                else ""
            )
        )
        lines.append(
            f"overhead outside train+eval: project 1st trial {first if first is None else round(first, 1)}s, "
            f"2nd+ median {_fmt(_median(later))}s max {_fmt(max(later) if later else None)}s; "
            f"naive 2nd+ median {_fmt(_median(naive_later))}s"
        )
        if later:
            targets.append(
                f"overhead 2nd+ trials max {max(later):.2f}s (target <= 2s): "
                f"{'MET' if max(later) <= 2 else 'NOT MET'}"
            )
        if "ratio" in mk:
            targets.append(
                f"makespan ratio {mk['ratio']:.2f}x incl. process start (target >= 3x): "
                f"{'MET' if mk['ratio'] >= 3 else 'NOT MET'}"
            )
    if targets:
        lines.append("-- targets")
        lines += targets
    skipped = [n for n in d.get("notes", []) if n.startswith("skipped") or "stopped" in n]
    if skipped:
        lines.append("-- skipped: " + "; ".join(skipped))
    lines.append(f"full results: {results.path}  (total {time.perf_counter() - _T0:.0f}s)")
    d["targets"] = targets
    return lines


def _fmt(value: float | None, missing: str = "n/a") -> str:
    return missing if not value else f"{value:.2f}"


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", default="all", help=f"comma-separated: {', '.join(PARTS)}, or all")
    p.add_argument("--sizes", default=None, help="model shapes: 0.5b,1.5b (tiny with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per per_trial run (30)")
    p.add_argument(
        "--batch", type=int, default=None, help="per-device batch for per_trial and qlora_mem (16)"
    )
    p.add_argument("--cutoff", type=int, default=None, help="cutoff_len (1024)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny Qwen2, small data, 2-4 steps")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting work after this many seconds")
    p.add_argument("--out", default=None, help="results folder ($OUT, else ./bench_out)")
    p.add_argument("--work", default=None, help="scratch for models, data and stores (/tmp/sweep_bench)")
    p.add_argument("--variants", default=None, help="throughput variants to run (default: all available)")
    p.add_argument("--throughput-steps", type=int, default=None)
    p.add_argument("--throughput-batch", type=int, default=None)
    p.add_argument("--makespan-trials", type=int, default=None)
    p.add_argument("--makespan-steps", type=int, default=None)
    p.add_argument("--makespan-batch", type=int, default=None)
    p.add_argument("--qlora-steps", type=int, default=6)
    p.add_argument("--qlora-small-batch", type=int, default=None)
    p.add_argument("--train-rows", type=int, default=None)
    p.add_argument("--eval-rows", type=int, default=None)
    args = p.parse_args(argv)

    tiny = args.tiny
    defaults = {
        "sizes": "tiny" if tiny else "0.5b,1.5b",
        "steps": 3 if tiny else 30,
        "batch": 4 if tiny else 16,
        "cutoff": 128 if tiny else 1024,
        "throughput_steps": 4 if tiny else 30,
        "throughput_batch": 4 if tiny else 16,
        "makespan_trials": 3 if tiny else 8,
        "makespan_steps": 2 if tiny else 10,
        "makespan_batch": 4 if tiny else 8,
        "qlora_small_batch": 1,
        "train_rows": 96 if tiny else 2048,
        "eval_rows": 8 if tiny else 64,
        "work": "/tmp/sweep_bench_tiny" if tiny else "/tmp/sweep_bench",
        "out": os.environ.get("OUT") or str(REPO / "bench_out"),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.min_tokens, args.max_tokens = (30, 170) if tiny else (200, 1200)
    args.tokenizer_vocab = 1024 if tiny else 8192
    args.eval_batch = 4 if tiny else 8
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.size_list = sizes
    args.throughput_size = "tiny" if tiny else ("0.5b" if "0.5b" in sizes else sizes[0])
    args.makespan_size = args.throughput_size
    args.qlora_size = "tiny" if tiny else ("1.5b" if "1.5b" in sizes else sizes[-1])
    parts = PARTS if args.part == "all" else tuple(x.strip() for x in args.part.split(","))
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)} or all")
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(Path(args.out), args.parts)
    guard = Guard(args.budget_s, results)
    guard.arm(grace_s=30)
    results.data["args"] = {k: v for k, v in vars(args).items() if k != "size_list"}
    say(
        f"parts {', '.join(args.parts)}; sizes {', '.join(args.size_list)}; budget {args.budget_s:.0f}s; "
        f"results to {results.path}"
    )
    code = 0
    try:
        import torch

        quiet()
        results.data["env"] = environment()
        results.data["import_s"] = time.perf_counter() - _T0
        say(f"environment: {json.dumps(results.data['env'])}")
        warm_up_gpu(results)
        results.note(
            "models have random weights (Qwen2 shapes); loss values are meaningless, speed and memory are real"
        )
        if not torch.cuda.is_available():
            results.note("no CUDA device: CPU smoke run, numbers are not benchmarks")
        bench = Bench(args, results, guard)
        needed: list[str] = list(args.size_list) if "per_trial" in args.parts else []
        for part, size in (
            ("qlora_mem", args.qlora_size),
            ("throughput", args.throughput_size),
            ("makespan", args.makespan_size),
        ):
            if part in args.parts and size not in needed:
                needed.append(size)
        bench.setup(needed)
        for part in PARTS:
            if part not in args.parts:
                continue
            say(f"--- {part}")
            if part == "per_trial":
                bench.per_trial(args.size_list)
            else:
                getattr(bench, part)()
    except BudgetExceeded:
        results.note("budget alarm: the run was stopped; the table shows what finished")
        code = 0
    except Exception as exc:  # noqa: BLE001  (print the table of whatever finished, then fail)
        traceback.print_exc()
        results.note(f"bench error: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        signal.alarm(0)
    lines = summarise(results)
    results.save()
    print("\n".join(lines), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
