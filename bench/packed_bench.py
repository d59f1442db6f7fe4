"""GPU benchmark for issue 10: packed LoRA trials vs one trial at a time vs the naive baseline.

Every sweep here runs through the real command, `python3 -m sweeps.cli run SPACE.yaml --trials N
--workers W`, in a fresh process whose working folder is a scratch directory. Its Optuna study and
its MLflow SQLite store live in that folder's `mlruns/`, as with a user's first `sweep run`. The
bench writes the YAML, times the whole process (import and start costs included), then reads each
trial's timings back from MLflow. The models have random weights (Qwen2.5 shapes, `synthetic.py`):
speed and memory are real, loss and accuracy mean nothing.

Parts (`--part`, comma-separated, or `all`; they run in this order):
  makespan  16 LoRA trials (eval_loss, synthetic alpaca rows) with `workers.pack: auto`, then the
            naive baseline (`naive_trial.py`, one python3 per trial) on a few of the same trials,
            extrapolated to 16, then `workers.pack: 1` (today's one-at-a-time runner).
  gsm8k     the same 16 trials scored by the gsm8k objective on real GSM8K rows (`--gsm8k DIR`),
            packed vs one at a time.
  probes    the stacked multi-LoRA probes (`--probes DIR`) as subprocesses, then the packed runner
            in this process at the probes' own shapes (K adapters x b rows x 512 full rows).
  qlora     the 1.5B shape: QLoRA trials packed (K at once) vs one trial, tokens/s and peak memory.
  two_gpus  16 packed trials with `--workers 2` (one packed process per GPU) vs `--workers 1`.

A background thread samples nvidia-smi every 0.5 s. Each measurement reports the share of samples
in which the GPU was busy (utilization > 0) and the mean utilization. The time guard (`--budget-s`)
skips what would not fit and says so. The one-at-a-time sweeps get a `--timeout` that makes them fit:
then only the trials that finished are timed, and the rest are extrapolated, marked in the output.
The JSON results go to `$OUT/packed_bench.json` after every measurement. Subprocess output goes to
`$OUT/packed_bench_cli.log`. The closing table, with each target and its verdict, is printed last.

    python3 bench/packed_bench.py --part makespan                      # device call A
    python3 bench/packed_bench.py --part gsm8k --gsm8k .shared/gsm8k   # device call B
    python3 bench/packed_bench.py --part probes,qlora --probes .shared/probes   # call C
    python3 bench/packed_bench.py --part two_gpus                      # call D, 2 GPUs
    python3 bench/packed_bench.py --tiny --part all --gsm8k ../shared/data/gsm8k   # CPU smoke
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse
import ast
import gc
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (str(REPO), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

PARTS = ("makespan", "gsm8k", "probes", "qlora", "two_gpus")

# Seconds each unit should take on one H100: all the guard knows before a unit runs. From issue 10
# and bench/RESULTS.md: a 0.5B trial of 40 steps at 16 x 512 trains in ~8 s, a python3 that imports
# the project and starts a sweep takes ~20 s, and a naive trial takes ~25-30 s.
ESTIMATES_GPU = {
    "setup": 30.0,
    "cli_start": 25.0,
    "makespan_packed": 120.0,
    "makespan_trial": 10.0,
    "naive_trial": 35.0,
    "gsm8k_packed": 280.0,
    "gsm8k_trial": 22.0,
    "probes": 150.0,
    "qlora": 150.0,
    "two_gpus": 240.0,
}
# The CPU smoke run: tiny model, a few steps, on 2 shared cores where imports dominate.
ESTIMATES_TINY = {
    "setup": 20.0,
    "cli_start": 40.0,
    "makespan_packed": 70.0,
    "makespan_trial": 5.0,
    "naive_trial": 40.0,
    "gsm8k_packed": 80.0,
    "gsm8k_trial": 10.0,
    "probes": 60.0,
    "qlora": 5.0,
    "two_gpus": 180.0,
}


class BudgetExceeded(BaseException):
    """Raised by the alarm; a BaseException so the runners' `except Exception` cannot swallow it."""


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_memory() -> None:
    gc.collect()
    if cuda():
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def fmt(value: float | None, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


# --------------------------------------------------------------------------------------------------
# Bookkeeping: the results file, the time guard, the GPU sampler


class Results:
    """Everything measured, rewritten to disk after each measurement so a killed run keeps it."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "packed_bench.json"
        self.log = out_dir / "packed_bench_cli.log"
        self.data: dict[str, Any] = {"notes": []}

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        say(f"note: {text}")
        self.save()

    def part(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class Guard:
    """Skips a unit of work that would not finish before the deadline; an alarm fires shortly after it."""

    def __init__(self, budget_s: float, results: Results):
        self.deadline = _T0 + budget_s
        self.results = results

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allow(self, what: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.results.note(
            f"skipped {what}: needs ~{estimate_s:.0f}s, {max(self.left(), 0):.0f}s of budget left"
        )
        return False

    def arm(self, grace_s: float) -> None:
        def fire(signum: int, frame: Any) -> None:
            raise BudgetExceeded()

        signal.signal(signal.SIGALRM, fire)
        signal.alarm(max(1, int(self.left() + grace_s)))


@dataclass(frozen=True)
class GpuSample:
    at: float
    """time.time(), so windows can be cut with MLflow's run timestamps too."""
    gpu: int
    utilization: float
    memory_mib: float


class GpuSampler:
    """Runs nvidia-smi every `period_s` in a background thread; summaries are cut by time window."""

    QUERY = ("--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits")

    def __init__(self, period_s: float = 0.5):
        self.period_s = period_s
        self.available = shutil.which("nvidia-smi") is not None
        self.samples: list[GpuSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvidia-smi-sampler", daemon=True)

    def start(self) -> None:
        if self.available:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", *self.QUERY], capture_output=True, text=True, timeout=5, check=False
                ).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            now = time.time()
            parsed = []
            for line in out.splitlines():
                fields = [field.strip() for field in line.split(",")]
                try:
                    parsed.append(GpuSample(now, int(fields[0]), float(fields[1]), float(fields[2])))
                except (IndexError, ValueError):  # "[N/A]" or a partial line: not a sample
                    continue
            with self._lock:
                self.samples += parsed
            # A fixed cadence, not a fixed pause: a slow nvidia-smi call does not stretch the period.
            due = max(due + self.period_s, time.monotonic())
            self._stop.wait(due - time.monotonic())

    def summary(self, start: float, end: float) -> dict[str, Any] | None:
        """Busy share (utilization > 0), mean utilization and peak memory between two time.time() stamps."""
        if not self.available:
            return None
        with self._lock:
            window = [s for s in self.samples if start <= s.at <= end]
        per_gpu: dict[str, dict[str, float]] = {}
        for gpu in sorted({s.gpu for s in window}):
            mine = [s for s in window if s.gpu == gpu]
            per_gpu[str(gpu)] = {
                "samples": len(mine),
                "busy_share": sum(s.utilization > 0 for s in mine) / len(mine),
                "mean_utilization": statistics.fmean(s.utilization for s in mine),
                "max_memory_mib": max(s.memory_mib for s in mine),
            }
        # With several GPUs the headline is the busiest one: a one-GPU run on a two-GPU host leaves
        # the other idle by design.
        head = max(per_gpu.values(), key=lambda g: g["mean_utilization"], default=None)
        return {"seconds": end - start, "per_gpu": per_gpu, **(head or {"samples": 0})}


def busy_text(gpu: dict[str, Any] | None) -> str:
    if not gpu or not gpu.get("samples"):
        return "-"
    return f"{gpu['busy_share'] * 100:.0f}% / {gpu['mean_utilization']:.0f}%"


# --------------------------------------------------------------------------------------------------
# Inputs: tokenizers, data, models, sweep configs


class Assets:
    """Tokenizers, data sets and random-weight models, each built once and reused by the parts."""

    def __init__(self, args: argparse.Namespace, results: Results):
        self.args = args
        self.results = results
        self.work = Path(args.work)
        self.dtype = "bfloat16" if cuda() else "float32"
        self._tokenizers: dict[str, Any] = {}
        self._data: dict[str, dict[str, Any]] = {}
        self._models: dict[str, str] = {}

    def tokenizer(self, flavour: str) -> Any:
        """`alpaca`: the synthetic language's BPE; `gsm8k`: a BPE trained on the GSM8K train rows."""
        if flavour not in self._tokenizers:
            from synthetic import build_tokenizer

            if flavour == "alpaca":
                self._tokenizers[flavour] = build_tokenizer(self.args.tokenizer_vocab)
            else:
                self._tokenizers[flavour] = gsm8k_tokenizer(
                    Path(self.args.gsm8k) / "train.jsonl", self.args.tokenizer_vocab
                )
        return self._tokenizers[flavour]

    def alpaca(self, name: str, min_tokens: int, max_tokens: int, train_rows: int, eval_rows: int) -> dict:
        """Synthetic alpaca rows whose rendered length is uniform in [min_tokens, max_tokens]."""
        if name not in self._data:
            from synthetic import DataSpec, write_data

            data = write_data(
                self.work / "data" / name,
                self.tokenizer("alpaca"),
                DataSpec(train_rows, eval_rows, min_tokens, max_tokens),
            )
            lengths = data.pop("lengths")
            data["rows_over_cutoff"] = sum(n > self.args.cutoff for n in lengths)
            self.results.data.setdefault("data", {})[name] = data
            say(
                f"data {name}: {data['train_rows']} train / {data['eval_rows']} eval rows, tokens min "
                f"{data['length_min']} median {data['length_median']} max {data['length_max']}"
            )
            self._data[name] = data
        return self._data[name]

    def model(self, size: str, flavour: str) -> str:
        """A random-weight Qwen2 of `size` saved with the `flavour` tokenizer; returns its folder."""
        key = f"{size}-{flavour}"
        if key not in self._models:
            import torch
            from synthetic import build_model

            started = time.perf_counter()
            info = build_model(
                size,
                self.work / "models" / key,
                self.tokenizer(flavour),
                "cuda" if torch.cuda.is_available() else "cpu",
                self.dtype,
            )
            free_memory()
            self.results.data.setdefault("models", {})[key] = {
                **info,
                "build_s": time.perf_counter() - started,
            }
            say(f"model {key}: {info['params'] / 1e6:.1f}M parameters (random weights) at {info['path']}")
            self._models[key] = info["path"]
        return self._models[key]


def gsm8k_tokenizer(train_file: Path, vocab_size: int) -> Any:
    """A byte-level BPE trained on GSM8K's own text, with Qwen's special tokens and ChatML.

    The synthetic tokenizer knows only the synthetic language, so it would cut English into bytes
    and make GSM8K prompts several times longer than Qwen's tokenizer does. A BPE trained on the
    same text gives prompts of about Qwen's length (the JSON records the median row length).
    """
    from synthetic import IM_END, IM_START, PAD
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runners.data import CHATML_TEMPLATE

    rows = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    corpus = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=IM_END,
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
    )


def lora_space() -> dict[str, Any]:
    """The space every sweep here samples: what issue 10 names (learning rate, rank, alpha, rsLoRA)."""
    return {
        "learning_rate": {"type": "float", "low": 1.0e-5, "high": 3.0e-4, "log": True},
        "lora_rank": {"type": "categorical", "choices": [8, 16, 32]},
        "lora_alpha": {"type": "categorical", "choices": [16, 32, 64]},
        "use_rslora": {"type": "bool"},
    }


def write_space(path: Path, document: dict[str, Any]) -> Any:
    """Write a sweep YAML and validate it with the project's loader, so a config error shows here."""
    import yaml

    from core.config import load_config

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(path)


def bench_config(path: Path, name: str, model_dir: str, data: dict, objective: dict, training: dict) -> Any:
    """A TrialRunner config for the in-process parts (probes, qlora): random sampler, no CLI."""
    return write_space(
        path,
        {
            "name": name,
            "model": {
                "name_or_path": model_dir,
                "dtype": "bfloat16" if cuda() else "float32",
                "attn_implementation": "sdpa",
            },
            "data": data,
            "objective": objective,
            "space": lora_space(),
            "training": training,
            "sampler": {"type": "random", "seed": 0},
        },
    )


def pythonpath() -> str:
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts if str(REPO) in parts else [*parts, str(REPO)])


def literal(value: str) -> Any:
    """An MLflow param string back as the value it was ("16" -> 16, "True" -> True)."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


# --------------------------------------------------------------------------------------------------
# In-process step clocks (probes, qlora)


class StepClock:
    """A trial's `on_step`: the GPU-synchronised time of each optimizer step."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def __call__(self, step: int, total: int) -> None:
        if cuda():
            import torch

            torch.cuda.synchronize()
        self.times[step] = time.perf_counter()

    def steady(self, warm: int, tokens_per_step: float) -> float | None:
        """Tokens/s from step `warm` to the last step: the first steps pay allocation and warm-up."""
        steps = sorted(s for s in self.times if s >= warm)
        if len(steps) < 2:
            return None
        seconds = self.times[steps[-1]] - self.times[steps[0]]
        return tokens_per_step * (steps[-1] - steps[0]) / seconds if seconds > 0 else None

    def step_s(self, warm: int) -> float | None:
        steps = sorted(s for s in self.times if s >= warm)
        if len(steps) < 2:
            return None
        return (self.times[steps[-1]] - self.times[steps[0]]) / (steps[-1] - steps[0])


def ignore_step(step: int, total: int) -> None:
    return None


def pack_measure(
    runner: Any, trials: list[Any], out_dir: Path, warm: int, join_rows: bool | None = None
) -> dict[str, Any]:
    """Train `trials` (TrialParams) together in one `PackedRunner`; steady pack tokens/s and peak memory.

    `join_rows`: the pack's layout (None: the runner's own choice).
    """
    from runners.packed import PackedRunner
    from runners.sft import TrialCallbacks

    free_memory()
    clock = StepClock()
    started = time.perf_counter()
    pack = PackedRunner(runner, len(trials))
    pack.join_rows = join_rows
    ended: list[Any] = []
    try:
        for number, params in enumerate(trials):
            # Trials step in lockstep (same steps, no accumulation), so the first one's clock is the pack's.
            callbacks = TrialCallbacks(on_step=clock if number == 0 else ignore_step)
            pack.add(params, out_dir / f"trial-{number}", callbacks, number)
        while len(ended) < len(trials):
            finished = pack.advance()
            if not finished:
                break
            ended += [result for _, result in finished]
    finally:
        pack.close()
        shutil.rmtree(out_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    steps = trials[0].max_steps
    tokens = sum(result.train_tokens for result in ended)
    per_step = tokens / steps if steps > 0 else 0.0
    errors = [result.error for result in ended if result.error]
    record = {
        "status": "COMPLETE" if len(ended) == len(trials) and not errors else "FAILED",
        "error": (errors[0] or "")[:500] if errors else None,
        "wall_s": wall,
        "tokens_per_step": per_step,
        "step_s": clock.step_s(warm),
        "steady_tokens_per_s": clock.steady(warm, per_step),
        "train_s": max((result.timings.train_s for result in ended), default=None),
        "eval_s_each": mean([result.timings.eval_s for result in ended]),
        "peak_mb": max((result.peak_memory_mb or 0.0 for result in ended), default=None),
    }
    free_memory()
    return record


def solo_measure(runner: Any, params: Any, out_dir: Path, warm: int) -> dict[str, Any]:
    """One trial through `TrialRunner.run` (TRL, today's unpacked path): steady tokens/s and peak memory."""
    from runners.sft import TrialCallbacks

    free_memory()
    clock = StepClock()
    started = time.perf_counter()
    result = runner.run(params, out_dir, TrialCallbacks(on_step=clock))
    shutil.rmtree(out_dir, ignore_errors=True)
    per_step = result.train_tokens / params.max_steps
    record = {
        "status": result.status.value,
        "error": (result.error or "")[:500] or None,
        "wall_s": time.perf_counter() - started,
        "tokens_per_step": per_step,
        "step_s": clock.step_s(warm),
        "steady_tokens_per_s": clock.steady(warm, per_step),
        "train_s": result.timings.train_s,
        "eval_s_each": result.timings.eval_s,
        "peak_mb": result.peak_memory_mb,
    }
    free_memory()
    return record


# --------------------------------------------------------------------------------------------------
# Sweeps through the CLI, read back from MLflow


def read_sweep(run_dir: Path, name: str, space: list[str]) -> dict[str, Any]:
    """The parent run's span and every trial's timings, tokens and pack, from the sweep's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return {"trials": [], "error": "no MLflow experiment: the sweep did not start"}
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    out: dict[str, Any] = {}
    if parents and parents[0].info.end_time:
        parent = parents[0].info
        out.update(loop_start=parent.start_time / 1000, loop_end=parent.end_time / 1000)
        out["loop_s"] = out["loop_end"] - out["loop_start"]
    trials = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("sweep.role") != "trial":
            continue
        start = run.info.start_time / 1000
        end = run.info.end_time / 1000 if run.info.end_time else None
        trials.append(
            {
                "number": int(tags.get("optuna.trial_number", -1)),
                "status": tags.get("sweep.status") or run.info.status,
                "params": {key: literal(run.data.params[key]) for key in space if key in run.data.params},
                "start": start,
                "end": end,
                "wall_s": end - start if end else None,
                "load_s": metrics.get("time_load_s", 0.0),
                "train_s": metrics.get("time_train_s", 0.0),
                "eval_s": metrics.get("time_eval_s", 0.0),
                "train_tokens": metrics.get("train_tokens", 0.0),
                "tokens_per_s": metrics.get("train_tokens_per_s"),
                "pack_size": metrics.get("pack_size"),
                "pack_id": metrics.get("pack_id"),
                "peak_mb": metrics.get("peak_memory_mb"),
                "objective": metrics.get("objective"),
                "error": (tags.get("error") or "")[:300] or None,
                # MLflow's system metrics on the trial's run (issue 12: GPU ones on a GPU sweep).
                "system_metrics": {k: v for k, v in metrics.items() if k.startswith("system/gpu")},
            }
        )
    out["trials"] = sorted(trials, key=lambda t: t["number"])
    out["trials_with_gpu_system_metrics"] = sum(bool(t["system_metrics"]) for t in trials)
    return out


def summarise_sweep(record: dict[str, Any], target: int) -> None:
    """Per-trial overheads and the sweep's totals, added to `record` in place.

    Overhead of a trial = wall time it occupied minus its load, train and eval seconds:
    - one at a time, the interval since the previous trial ended (the first: since the loop began);
    - in a pack, its own run's span, so it also counts the time it waited while other trials of
      its pack were scored and saved (one process does one thing at a time).
    Sweep tokens/s = all trials' non-padding train tokens / (loop time - all eval and load time):
    the same definition for every mode, a lower bound of the training rate.
    """
    trials = [t for t in record.get("trials", []) if t["end"] is not None]
    finished = [t for t in trials if t["status"] in ("COMPLETE", "PRUNED")]
    record["finished"] = len(finished)
    record["statuses"] = {
        s: sum(t["status"] == s for t in trials) for s in sorted({t["status"] for t in trials})
    }
    if not finished:
        return
    sequential = record["pack"] == 1 and record["workers"] == 1
    previous = record.get("loop_start", min(t["start"] for t in trials))
    for trial in sorted(trials, key=lambda t: t["end"]):
        span = trial["end"] - previous if sequential else trial["wall_s"]
        trial["overhead_s"] = span - trial["load_s"] - trial["train_s"] - trial["eval_s"]
        previous = trial["end"]
    for key in ("load_s", "train_s", "eval_s", "overhead_s", "tokens_per_s"):
        values = [t[key] for t in finished if t.get(key) is not None]
        record[f"mean_{key}"] = mean(values)
        record[f"median_{key}"] = median(values)
    record["pack_sizes"] = sorted({int(t["pack_size"]) for t in finished if t.get("pack_size")})
    record["packs"] = len({t["pack_id"] for t in finished if t.get("pack_id") is not None})
    eval_total = sum(t["eval_s"] for t in trials)
    load_total = sum(t["load_s"] for t in trials)
    tokens = sum(t["train_tokens"] for t in trials)
    record["eval_total_s"] = eval_total
    loop = record.get("loop_s")
    if loop:
        record["startup_s"] = record["wall_s"] - loop
        train_wall = loop - eval_total - load_total
        record["sweep_tokens_per_s"] = tokens / train_wall if train_wall > 0 else None
        record["amortized_train_s"] = train_wall / len(finished)
    record["amortized_eval_s"] = eval_total / len(finished)
    record["amortized_s"] = record["wall_s"] / len(finished)
    if len(finished) < target:
        # One at a time, each further trial costs what the later ones did (the first paid the warm-up).
        ends = sorted(t["end"] for t in finished)
        intervals = [b - a for a, b in itertools.pairwise(ends)]
        if intervals:
            record["extrapolated_wall_s"] = record["wall_s"] + median(intervals) * (target - len(finished))
            record["extrapolated_from"] = len(finished)


# --------------------------------------------------------------------------------------------------
# The parts


WARM_IMPORTS = (
    "import matplotlib.pyplot, mlflow, optuna.visualization.matplotlib, trl\n"
    "from trl import SFTTrainer\n"
    "import sweeps.cli, sweeps.loop, sweeps.report, sweeps.tracking, sweeps.executors.packed\n"
    "import runners.packed, runners.sft, objectives.eval_loss, objectives.gsm8k"
)


class Bench:
    def __init__(self, args: argparse.Namespace, results: Results, guard: Guard, sampler: GpuSampler):
        self.args = args
        self.results = results
        self.guard = guard
        self.sampler = sampler
        self.assets = Assets(args, results)
        self.work = Path(args.work)
        self.est = ESTIMATES_TINY if args.tiny else ESTIMATES_GPU
        self.warm_s: float | None = None

    # ---- shared helpers ----

    def warm(self) -> None:
        """Import what a sweep imports, once and untimed, before the first timed sweep of the call.

        The device's wheels are installed with `--no-compile` (it saves device time), so the first
        process to import them compiles their bytecode and reads the libraries from a cold disk; a
        user's `pip install` compiles at install time. Without this, whichever sweep runs first pays
        seconds of start-up the later ones do not (fifth round: 30.7 s packed, first, vs 25.4 s).
        """
        if self.warm_s is not None:
            return
        code, self.warm_s, _ = self.spawn([sys.executable, "-c", WARM_IMPORTS], REPO, "warm imports")
        self.results.data["warm_imports_s"] = self.warm_s
        say(f"warm imports: exit {code}, {self.warm_s:.1f}s (untimed, before the first sweep)")

    def reserve_after(self, part: str) -> float:
        """Seconds to keep for the requested parts after `part`."""
        later = self.args.parts[self.args.parts.index(part) + 1 :]
        keys = {"makespan": "makespan_packed", "gsm8k": "gsm8k_packed"}
        return sum(self.est[keys.get(p, p)] for p in later)

    def spawn(
        self, cmd: list[str], cwd: Path, title: str, env: dict[str, str] | None = None, capture: bool = False
    ) -> tuple[int, float, str]:
        """Run `cmd` in its own process group, output appended to the CLI log; stopped when the budget ends.

        Returns (exit code, seconds, captured output). A sweep is stopped with SIGINT first, so it
        closes its runs as KILLED; whatever is still alive 30 s later is killed.
        """
        environment = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
        with self.results.log.open("a", encoding="utf-8") as log:
            log.write(f"\n===== {title}: {' '.join(cmd)}\n")
            log.flush()
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=environment,
                stdout=subprocess.PIPE if capture else log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            output = ""
            try:
                if capture:
                    output, _ = proc.communicate(timeout=max(self.guard.left() + 20, 30))
                    log.write(output)
                else:
                    proc.wait(timeout=max(self.guard.left() + 20, 30))
            except subprocess.TimeoutExpired:
                self.results.note(f"{title}: stopped at the end of the budget")
            finally:
                if proc.poll() is None:
                    stop_group(proc)
            return proc.returncode, time.perf_counter() - started, output

    def sweep(
        self,
        part: str,
        label: str,
        document: dict[str, Any],
        trials: int,
        pack: int | str,
        workers: int,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One `sweep run` in a fresh folder: timed as a whole process, then read back from MLflow."""
        self.warm()
        run_dir = self.work / part / label
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        name = f"{part}-{label}".replace("_", "-")
        config = {**document, "name": name, "workers": {"pack": pack}}
        write_space(run_dir / "space.yaml", config)
        cmd = [
            sys.executable,
            "-m",
            "sweeps.cli",
            "run",
            "space.yaml",
            "--trials",
            str(trials),
            "--workers",
            str(workers),
        ]
        if timeout_s is not None:
            cmd += ["--timeout", f"{timeout_s:.0f}"]
        if self.args.spy:
            # Sampled from outside, without pausing it (--nonblocking): the sweep's wall time as it
            # is spent, start-up and report included (`bench/spy_summary.py` reads the file).
            out = Path(self.args.out) / f"spy_{name}.txt"
            cmd = [
                self.args.spy,
                "record",
                "--idle",
                "--threads",
                "--nonblocking",
                "-r",
                "50",
                "-f",
                "raw",
                "-o",
                str(out),
                "--",
                *cmd,
            ]
        say(
            f"{part} {label}: sweep run, {trials} trials, pack {pack}, workers {workers}"
            + (f", --timeout {timeout_s:.0f}" if timeout_s is not None else "")
        )
        start = time.time()
        code, wall, _ = self.spawn(cmd, run_dir, f"{part} {label}")
        end = time.time()
        record: dict[str, Any] = {
            "label": label,
            "pack": pack,
            "workers": workers,
            "trials_target": trials,
            "timeout_s": timeout_s,
            "exit_code": code,
            "wall_s": wall,
            "gpu_whole": self.sampler.summary(start, end),
        }
        try:
            record.update(read_sweep(run_dir, name, list(document["space"])))
        except Exception as exc:  # noqa: BLE001  (a sweep that never wrote its store is recorded, not fatal)
            record["error"] = f"reading MLflow: {type(exc).__name__}: {exc}"
        if "loop_start" in record:
            record["gpu_loop"] = self.sampler.summary(record["loop_start"], record["loop_end"])
        summarise_sweep(record, trials)
        if code != 0:
            record["error"] = record.get("error") or f"sweep run exited {code}; see {self.results.log.name}"
        say(
            f"{part} {label}: exit {code}, {wall:.1f}s, {record.get('finished', 0)}/{trials} finished "
            f"{record.get('statuses')}, pack sizes {record.get('pack_sizes')}, train/eval/overhead per trial "
            f"{fmt(record.get('mean_train_s'))}/{fmt(record.get('mean_eval_s'))}/{fmt(record.get('mean_overhead_s'))}s, "
            f"sweep {fmt(record.get('sweep_tokens_per_s'), ',.0f')} tok/s, GPU busy (loop) {busy_text(record.get('gpu_loop'))}"
        )
        return record

    def one_at_a_time_timeout(self, part: str, per_trial_s: float) -> float | None:
        """The `--timeout` that lets a one-at-a-time sweep end inside the budget; None when all trials fit.

        The sweep stops starting trials after it, then finishes the running one; the rest are
        extrapolated from the trials that finished.
        """
        room = self.guard.left() - self.reserve_after(part) - self.est["cli_start"] - per_trial_s - 10
        if room >= self.args.trials * per_trial_s * 1.3:
            return None
        # At least two trials must finish: the extrapolation needs an interval between two trial ends.
        return max(room, 2 * per_trial_s)

    def sweep_document(self, model_dir: str, data: dict, objective: dict) -> dict[str, Any]:
        a = self.args
        return {
            "model": {"name_or_path": model_dir, "dtype": self.assets.dtype, "attn_implementation": "sdpa"},
            "data": data,
            "objective": objective,
            "space": lora_space(),
            "training": {
                "method": "lora",
                "max_steps": a.steps,
                "per_device_batch_size": a.batch,
                "cutoff_len": a.cutoff,
                "target_modules": "all-linear",
                "seed": 0,
            },
            "budget": {"trials": a.trials, "max_failed_trials": a.trials},
            # Random sampling seeded per trial number: every mode trains the very same 16 parameter sets.
            "sampler": {"type": "random", "seed": 0},
        }

    def synthetic_document(self) -> tuple[dict[str, Any], str, dict]:
        a = self.args
        data = self.assets.alpaca("rows", a.row_min, a.row_max, a.train_rows, a.eval_rows)
        model = self.assets.model(a.size, "alpaca")
        document = self.sweep_document(
            model,
            {
                "format": "alpaca",
                "train_file": data["train"],
                "eval_file": data["eval"],
                "chat_template": "chatml",
            },
            {"name": "eval_loss", "batch_size": a.eval_batch, "max_length": a.cutoff},
        )
        return document, model, data

    @staticmethod
    def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
        left = {t["number"]: t["params"] for t in a.get("trials", [])}
        right = {t["number"]: t["params"] for t in b.get("trials", [])}
        common = set(left) & set(right)
        return all(left[n] == right[n] for n in common) if common else None

    # ---- makespan ----

    def makespan(self) -> None:
        a = self.args
        part = self.results.part("makespan")
        if not self.guard.allow("makespan", self.est["makespan_packed"] + self.est["cli_start"]):
            return
        document, model, data = self.synthetic_document()
        part["setting"] = {
            "trials": a.trials,
            "steps": a.steps,
            "batch": a.batch,
            "cutoff_len": a.cutoff,
            "rows_tokens": [a.row_min, a.row_max],
            "objective": "eval_loss",
            "eval_rows": a.eval_rows,
            "size": a.size,
            "pack": a.pack,
        }
        part["packed"] = self.sweep("makespan", "packed", document, a.trials, a.pack, 1)
        self.results.save()

        part["naive"] = self.naive(part["packed"], model, data)
        self.results.save()

        per_trial = self.est["makespan_trial"]
        if self.guard.allow("makespan one-at-a-time", self.est["cli_start"] + 3 * per_trial):
            timeout = self.one_at_a_time_timeout("makespan", per_trial)
            part["one_at_a_time"] = self.sweep("makespan", "one_at_a_time", document, a.trials, 1, 1, timeout)
            part["same_params"] = self.same_params(part["packed"], part["one_at_a_time"])
        self.results.save()

    def naive(self, reference: dict[str, Any], model: str, data: dict) -> dict[str, Any]:
        """`naive_trial.py` as a fresh python3 per trial, on the first trials' parameters; extrapolated."""
        a = self.args
        sets = [t["params"] for t in reference.get("trials", [])][: a.naive_trials]
        runs: list[dict[str, Any]] = []
        folder = self.work / "makespan" / "naive"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.time()
        for index, sampled in enumerate(sets):
            if not self.guard.allow(f"naive trial {index}", self.est["naive_trial"]):
                break
            params = {
                "method": "lora",
                **sampled,
                "max_steps": a.steps,
                "per_device_batch_size": a.batch,
                "cutoff_len": a.cutoff,
                "target_modules": "all-linear",
                "seed": 0,
                "eval_batch_size": a.eval_batch,
            }
            out = folder / f"trial-{index}.json"
            cmd = [
                sys.executable,
                str(BENCH / "naive_trial.py"),
                "--model",
                model,
                "--train",
                data["train"],
                "--eval",
                data["eval"],
                "--params",
                json.dumps(params),
                "--out",
                str(out),
            ]
            code, wall, _ = self.spawn(cmd, folder, f"naive trial {index}")
            if code != 0 or not out.exists():
                runs.append(
                    {"params": params, "wall_s": wall, "error": f"exit {code}; see {self.results.log.name}"}
                )
                say(f"makespan naive trial {index}: FAILED (exit {code})")
                continue
            child = json.loads(out.read_text())
            child.pop("clock", None)
            runs.append(
                {
                    "params": params,
                    "wall_s": wall,
                    **child,
                    "overhead_s": wall - child["train_s"] - child["eval_s"],
                }
            )
            say(
                f"makespan naive trial {index}: {wall:.1f}s (import {child['import_s']:.1f}, load {child['load_s']:.1f}, "
                f"data {child['data_s']:.1f}, train {child['train_s']:.1f}, eval {child['eval_s']:.1f}), "
                f"{child['train_tokens_per_s']:,.0f} tok/s"
            )
        record: dict[str, Any] = {"trials": runs, "gpu_whole": self.sampler.summary(start, time.time())}
        done = [r for r in runs if "error" not in r]
        if done:
            record["ran"] = len(done)
            record["mean_wall_s"] = statistics.fmean(r["wall_s"] for r in done)
            record["extrapolated_wall_s"] = record["mean_wall_s"] * a.trials
            for key in ("train_s", "eval_s", "overhead_s", "train_tokens_per_s"):
                record[f"mean_{key}"] = statistics.fmean(r[key] for r in done)
        return record

    # ---- gsm8k ----

    def gsm8k(self) -> None:
        a = self.args
        part = self.results.part("gsm8k")
        folder = Path(a.gsm8k)
        if not (folder / "train.jsonl").exists() or not (folder / "test.jsonl").exists():
            self.results.note(f"skipped gsm8k: no train.jsonl / test.jsonl in {folder} (--gsm8k)")
            return
        if not self.guard.allow("gsm8k", self.est["gsm8k_packed"] + self.est["cli_start"]):
            return
        model = self.assets.model(a.size, "gsm8k")
        tokenizer = self.assets.tokenizer("gsm8k")
        train = [
            json.loads(line)
            for line in (folder / "train.jsonl").read_text().splitlines()[:500]
            if line.strip()
        ]
        row_tokens = sorted(
            len(tokenizer(f"Question: {r['question']}\nAnswer: {r['answer']}")["input_ids"]) for r in train
        )
        document = self.sweep_document(
            model,
            {
                "format": "gsm8k",
                "train_file": str((folder / "train.jsonl").resolve()),
                "max_samples": a.gsm8k_train_rows,
                "eval_split": 0.05,
                "chat_template": "chatml",
            },
            {
                "name": "gsm8k",
                "eval_file": str((folder / "test.jsonl").resolve()),
                "fewshot_file": str((folder / "train.jsonl").resolve()),
                "num_fewshot": a.gsm8k_shots,
                "max_samples": a.gsm8k_items,
                "seed": 0,
                "max_new_tokens": a.gsm8k_new_tokens,
                "max_length": a.gsm8k_max_length,
            },
        )
        part["setting"] = {
            "trials": a.trials,
            "steps": a.steps,
            "batch": a.batch,
            "cutoff_len": a.cutoff,
            "train_rows": a.gsm8k_train_rows,
            "items": a.gsm8k_items,
            "shots": a.gsm8k_shots,
            "max_new_tokens": a.gsm8k_new_tokens,
            "size": a.size,
            "pack": a.pack,
            "train_row_tokens_median": row_tokens[len(row_tokens) // 2],
            "tokenizer": f"byte-level BPE, {len(tokenizer)} tokens, trained on GSM8K train",
        }
        part["packed"] = self.sweep("gsm8k", "packed", document, a.trials, a.pack, 1)
        self.results.save()
        per_trial = self.est["gsm8k_trial"]
        if self.guard.allow("gsm8k one-at-a-time", self.est["cli_start"] + 3 * per_trial):
            timeout = self.one_at_a_time_timeout("gsm8k", per_trial)
            part["one_at_a_time"] = self.sweep("gsm8k", "one_at_a_time", document, a.trials, 1, 1, timeout)
            part["same_params"] = self.same_params(part["packed"], part["one_at_a_time"])
        self.results.save()

    # ---- probes ----

    def probes(self) -> None:
        part = self.results.part("probes")
        if not self.guard.allow("probes", self.est["probes"] * 0.5):
            return
        if cuda():
            self.run_probe_scripts(part)
        else:
            self.results.note("probes: the probe scripts need CUDA; only the packed runner's shapes run here")
        part["runner"] = self.runner_at_probe_shapes()
        self.results.save()

    def run_probe_scripts(self, part: dict[str, Any]) -> None:
        a = self.args
        folder = Path(a.probes)
        scratch = self.work / "probes"
        scratch.mkdir(parents=True, exist_ok=True)
        env_pack = {"BS": a.probe_bs, "T": str(a.probe_tokens), "OUT": str(scratch)}
        if not a.probe_decode:
            env_pack["NODECODE"] = "1"
        for script, env in (("multilora_probe.py", {}), ("pack_probe.py", env_pack)):
            path = folder / script
            key = script.removesuffix(".py")
            if not path.exists():
                self.results.note(f"probes: no {path} (--probes)")
                continue
            if not self.guard.allow(f"probe {script}", 40):
                continue
            start = time.time()
            code, wall, output = self.spawn(
                [sys.executable, str(path.resolve())], scratch, f"probe {script}", env, capture=True
            )
            figures = []
            for line in output.splitlines():
                if line.startswith("{"):
                    try:
                        figures.append(ast.literal_eval(line.strip()))
                    except (ValueError, SyntaxError):
                        continue
            part[key] = {
                "exit_code": code,
                "wall_s": wall,
                "env": env,
                "figures": figures,
                "gpu_whole": self.sampler.summary(start, time.time()),
                **({"output_tail": output[-1500:]} if code else {}),
            }
            say(f"probe {script}: exit {code}, {wall:.1f}s, {len(figures)} figures")
            self.results.save()

    def long_rows_runner(self, size: str, name: str) -> Any:
        """A TrialRunner on rows longer than the cutoff: every row is exactly `probe_tokens` long, no padding."""
        from runners.sft import TrialRunner

        a = self.args
        t = a.probe_tokens
        data = self.assets.alpaca(
            "long", t + (40 if a.tiny else 150), int(t * 2.3), a.long_rows, a.long_eval_rows
        )
        config = bench_config(
            self.work / "configs" / f"{name}.yaml",
            name,
            self.assets.model(size, "alpaca"),
            {
                "format": "alpaca",
                "train_file": data["train"],
                "eval_file": data["eval"],
                "chat_template": "chatml",
            },
            {"name": "eval_loss", "batch_size": a.eval_batch, "max_length": t},
            {"method": "lora"},
        )
        runner = TrialRunner(config, cache_dir=self.work / "tokenized")
        runner.prepare()
        return runner

    def runner_at_probe_shapes(self) -> list[dict[str, Any]]:
        """The packed runner at each (adapters x rows) shape of multilora_probe.py, 512-token rows, r16."""
        from core.trial import TrialParams

        a = self.args
        records: list[dict[str, Any]] = []
        if not self.guard.allow("probes: packed runner at the probe shapes", 30):
            return records
        runner = self.long_rows_runner(a.size, "probe-shapes")
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in a.probe_shapes.split(",")]
        steps = a.probe_warm + a.probe_steps

        def params(rows: int, seed: int) -> Any:
            return TrialParams(
                method="lora",
                lora_rank=16,
                lora_alpha=32,
                learning_rate=1e-4,
                max_steps=steps,
                per_device_batch_size=rows,
                cutoff_len=a.probe_tokens,
                seed=seed,
            )

        try:
            # Untimed: loads the base and runs the pack's first kernels once for every shape after it.
            warm_up = self.safe(
                pack_measure, runner, [params(shapes[0][1], 0)], self.work / "trials" / "probe-warmup", 1
            )
            self.results.part("probes")["runner_warmup"] = warm_up
            for adapters, rows in shapes:
                if not self.guard.allow(f"packed runner {adapters}x{rows}", 15):
                    break
                start = time.time()
                record = {
                    "runner": "packed",
                    "adapters": adapters,
                    "rows_per_adapter": rows,
                    "tokens": a.probe_tokens,
                }
                record.update(
                    self.safe(
                        pack_measure,
                        runner,
                        [params(rows, seed) for seed in range(adapters)],
                        self.work / "trials" / f"probe-{adapters}x{rows}",
                        a.probe_warm,
                    )
                )
                record["gpu_whole"] = self.sampler.summary(start, time.time())
                records.append(record)
                self.results.save()
                say(
                    f"packed runner {adapters} x {rows} x {a.probe_tokens}: {record.get('status')} "
                    f"{fmt(record.get('steady_tokens_per_s'), ',.0f')} tok/s, step {fmt(record.get('step_s'), '.3f')}s, "
                    f"peak {gib(record.get('peak_mb'))} GiB {record.get('error') or ''}"
                )
            # Today's unpacked path (TRL) at the first one-adapter shape, for reference.
            single = next((rows for adapters, rows in shapes if adapters == 1), None)
            if single is not None and self.guard.allow("TRL runner reference", 15):
                record = {
                    "runner": "trl",
                    "adapters": 1,
                    "rows_per_adapter": single,
                    "tokens": a.probe_tokens,
                }
                record.update(
                    self.safe(
                        solo_measure,
                        runner,
                        params(single, 0),
                        self.work / "trials" / "probe-trl",
                        a.probe_warm,
                    )
                )
                records.append(record)
                say(
                    f"TRL runner 1 x {single} x {a.probe_tokens}: {fmt(record.get('steady_tokens_per_s'), ',.0f')} tok/s"
                )
        finally:
            runner = None
            free_memory()
        return records

    # ---- qlora ----

    def qlora(self) -> None:
        from core.trial import TrialParams
        from runners.models import qlora_unavailable_reason

        a = self.args
        part = self.results.part("qlora")
        reason = qlora_unavailable_reason()
        if reason:
            part["skipped"] = reason
            self.results.note(f"skipped qlora: {reason}")
            return
        if not self.guard.allow("qlora", self.est["qlora"]):
            return
        runner = self.long_rows_runner(a.qlora_size, "qlora")
        steps = a.probe_warm + a.qlora_steps

        def params(seed: int, max_steps: int = steps) -> Any:
            return TrialParams(
                method="qlora",
                lora_rank=16,
                lora_alpha=32,
                learning_rate=1e-4,
                max_steps=max_steps,
                per_device_batch_size=a.qlora_batch,
                cutoff_len=a.probe_tokens,
                seed=seed,
            )

        part["setting"] = {
            "size": a.qlora_size,
            "batch": a.qlora_batch,
            "cutoff_len": a.probe_tokens,
            "steps": steps,
            "pack": a.qlora_pack,
            "rank": 16,
        }
        try:
            # Untimed: loads and quantizes the base and compiles TRL's kernels, once for both sides.
            part["warmup"] = self.safe(
                solo_measure, runner, params(0, 2), self.work / "trials" / "qlora-warmup", 1
            )
            sides = (
                ("unpacked", solo_measure, params(0)),
                ("packed", pack_measure, [params(seed) for seed in range(a.qlora_pack)]),
            )
            for label, measure, trials in sides:
                start = time.time()
                record = self.safe(
                    measure, runner, trials, self.work / "trials" / f"qlora-{label}", a.probe_warm
                )
                record["gpu_whole"] = self.sampler.summary(start, time.time())
                part[label] = record
                self.results.save()
                say(
                    f"qlora {a.qlora_size} {label}: {record.get('status')} "
                    f"{fmt(record.get('steady_tokens_per_s'), ',.0f')} tok/s, peak {gib(record.get('peak_mb'))} GiB "
                    f"{record.get('error') or ''}"
                )
        finally:
            runner = None
            free_memory()

    # ---- two_gpus ----

    def two_gpus(self) -> None:
        from sweeps.executors.devices import visible_gpus

        a = self.args
        part = self.results.part("two_gpus")
        gpus = visible_gpus()
        workers = len(gpus)
        if cuda() and workers < 2:
            part["skipped"] = f"needs 2 GPUs, sees {workers}"
            self.results.note(f"skipped two_gpus: needs 2 GPUs, this machine has {workers}")
            return
        # On a CPU the two workers are two processes: the smoke run checks the path, not the speed.
        workers = max(workers, 2)
        if not self.guard.allow("two_gpus", self.est["two_gpus"]):
            return
        document, _, _ = self.synthetic_document()
        part["setting"] = {
            "trials": a.trials,
            "steps": a.steps,
            "batch": a.batch,
            "cutoff_len": a.cutoff,
            "pack": a.pack,
        }
        part["one_gpu"] = self.sweep("two_gpus", "one_gpu", document, a.trials, a.pack, 1)
        self.results.save()
        part[f"{workers}_gpus"] = self.sweep(
            "two_gpus", f"{workers}_gpus", document, a.trials, a.pack, workers
        )
        part["workers"] = workers
        self.results.save()

    @staticmethod
    def safe(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """One measurement; a failure is recorded in its record, and the other measurements go on."""
        try:
            return fn(*args)
        except BudgetExceeded:
            raise
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            return {"status": "BENCH_ERROR", "error": f"{type(exc).__name__}: {exc}"[:800]}


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT the child's process group (a sweep then closes its runs), SIGKILL what is left after 30 s."""
    for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------------
# The closing table


def sweep_wall(record: dict[str, Any] | None) -> tuple[float | None, str]:
    """A sweep's wall time, or its extrapolation to every trial, and a marker when extrapolated."""
    if not record:
        return None, ""
    if "extrapolated_wall_s" in record:
        return record["extrapolated_wall_s"], f" (extrapolated from {record['extrapolated_from']} trials)"
    if record.get("finished", 0) < record.get("trials_target", 0):
        return None, ""
    return record["wall_s"], ""


def sweep_rows(title: str, records: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    header = (
        f"{'mode':18} {'wall_s':>7} {'start':>6} {'done':>6} {'train/tr':>8} {'eval/tr':>7} {'ovh/tr':>7} "
        f"{'amort/tr':>8} {'sweep tok/s':>11} {'GPU busy/util loop':>18} {'whole':>10} {'packs':>10}"
    )
    lines = [title, header]
    for label, r in records:
        if not r:
            continue
        if "mean_wall_s" in r:  # the naive baseline
            lines.append(
                f"{label:18} {fmt(r.get('extrapolated_wall_s')):>7} {'-':>6} {str(r.get('ran', 0)) + '/' + str(len(r['trials'])):>6} "
                f"{fmt(r.get('mean_train_s')):>8} {fmt(r.get('mean_eval_s')):>7} {fmt(r.get('mean_overhead_s')):>7} "
                f"{fmt(r.get('mean_wall_s')):>8} {fmt(r.get('mean_train_tokens_per_s'), ',.0f'):>11} {'-':>18} "
                f"{busy_text(r.get('gpu_whole')):>10} {'-':>10}  (wall extrapolated from {r.get('ran', 0)} trials)"
            )
            continue
        wall, mark = sweep_wall(r)
        lines.append(
            f"{label:18} {fmt(wall):>7} {fmt(r.get('startup_s')):>6} {str(r.get('finished', 0)) + '/' + str(r.get('trials_target')):>6} "
            f"{fmt(r.get('mean_train_s')):>8} {fmt(r.get('mean_eval_s')):>7} {fmt(r.get('mean_overhead_s')):>7} "
            f"{fmt(r.get('amortized_s')):>8} {fmt(r.get('sweep_tokens_per_s'), ',.0f'):>11} "
            f"{busy_text(r.get('gpu_loop')):>18} {busy_text(r.get('gpu_whole')):>10} {r.get('pack_sizes') or '-'!s:>10}"
            + mark
            + (f"  ERROR {r['error'][:60]}" if r.get("error") else "")
        )
    return lines


def ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


def summarise(results: Results) -> list[str]:
    d = results.data
    env = d.get("env", {})
    lines = [
        "=" * 120,
        (
            f"packed_bench | {env.get('gpu', 'CPU')} | torch {env.get('torch')} transformers {env.get('transformers')} "
            f"trl {env.get('trl')} peft {env.get('peft')} optuna {env.get('optuna')} mlflow {env.get('mlflow')} "
            f"bnb {env.get('bitsandbytes')} | random-weight Qwen2.5 shapes"
        ),
        (
            "per trial: train/eval/overhead = runner-recorded means (a packed trial's train_s is the wall time of "
            "the pack steps it was in, shared); amort/tr = wall / trials; GPU busy = % of nvidia-smi samples with "
            "utilization > 0 / mean utilization, during the sweep loop and over the whole process"
        ),
    ]
    targets: list[str] = []

    mk = d.get("makespan", {})
    if mk.get("packed"):
        s = mk["setting"]
        lines += sweep_rows(
            f"-- makespan: {s['trials']} LoRA trials x {s['steps']} steps x {s['batch']} x {s['cutoff_len']}, rows "
            f"{s['rows_tokens'][0]}-{s['rows_tokens'][1]} tokens, eval_loss, {s['size']}; same params across modes: "
            f"{mk.get('same_params')}",
            [
                ("packed", mk.get("packed")),
                ("one at a time", mk.get("one_at_a_time")),
                ("naive", mk.get("naive")),
            ],
        )
        packed, _ = sweep_wall(mk.get("packed"))
        one, one_mark = sweep_wall(mk.get("one_at_a_time"))
        naive = (mk.get("naive") or {}).get("extrapolated_wall_s")
        vs_one, vs_naive = ratio(one, packed), ratio(naive, packed)
        lines.append(
            f"speedup packed vs one at a time {fmt(vs_one, '.2f')}x{one_mark}; vs naive {fmt(vs_naive, '.2f')}x "
            f"(naive extrapolated from {(mk.get('naive') or {}).get('ran', 0)} trials to {s['trials']})"
        )
        if vs_one:
            targets.append(
                f"makespan packed >= 3x one at a time: {vs_one:.2f}x{one_mark}: {verdict(vs_one >= 3)}"
            )
        gpu = mk["packed"].get("gpu_loop") or {}
        if gpu.get("samples"):
            targets.append(
                f"makespan packed GPU busy >= 80% of samples: {gpu['busy_share'] * 100:.0f}% in the sweep loop "
                f"({busy_text(mk['packed'].get('gpu_whole'))} over the whole process): {verdict(gpu['busy_share'] >= 0.8)}"
            )

    g = d.get("gsm8k", {})
    if g.get("packed"):
        s = g["setting"]
        lines += sweep_rows(
            f"-- gsm8k: {s['trials']} LoRA trials x {s['steps']} steps x {s['batch']} x {s['cutoff_len']} on "
            f"{s['train_rows']} GSM8K train rows (median {s['train_row_tokens_median']} tokens), scored on "
            f"{s['items']} test items {s['shots']}-shot, {s['max_new_tokens']} new tokens; same params: {g.get('same_params')}",
            [("packed", g.get("packed")), ("one at a time", g.get("one_at_a_time"))],
        )
        packed, _ = sweep_wall(g.get("packed"))
        one, one_mark = sweep_wall(g.get("one_at_a_time"))
        vs_one = ratio(one, packed)
        lines.append(f"speedup packed vs one at a time {fmt(vs_one, '.2f')}x{one_mark}")
        if vs_one:
            targets.append(
                f"gsm8k packed >= 3x one at a time: {vs_one:.2f}x{one_mark}: {verdict(vs_one >= 3)}"
            )
        for label in ("packed", "one_at_a_time"):
            r = g.get(label) or {}
            if r.get("median_eval_s") is None:
                continue
            targets.append(
                f"gsm8k {label} eval <= train per trial: median eval {r['median_eval_s']:.1f}s vs train "
                f"{r['median_train_s']:.1f}s (amortized over the sweep: eval {fmt(r.get('amortized_eval_s'))}s vs "
                f"train {fmt(r.get('amortized_train_s'))}s): {verdict(r['median_eval_s'] <= r['median_train_s'])}"
            )
        gpu = g["packed"].get("gpu_loop") or {}
        if gpu.get("samples"):
            targets.append(
                f"gsm8k packed GPU busy >= 80% of samples: {gpu['busy_share'] * 100:.0f}% in the sweep loop "
                f"({busy_text(g['packed'].get('gpu_whole'))} whole process): {verdict(gpu['busy_share'] >= 0.8)}"
            )

    p = d.get("probes", {})
    if p:
        lines.append(
            "-- train tokens/s at the probes' shapes (K adapters x b rows x T tokens, r16, full rows)"
        )
        stacked = {
            (f["adapters"], f["rows_per_adapter"]): f
            for f in (p.get("multilora_probe") or {}).get("figures", [])
            if "tok_s_total" in f
        }
        plain = {f["batch"]: f for f in (p.get("pack_probe") or {}).get("figures", []) if "tok_s" in f}
        lines.append(
            f"{'runner':7} {'K x b':>7} {'tok/step':>8} {'step_s':>7} {'tok/s':>9} {'probe tok/s':>11} "
            f"{'ratio':>6} {'peft 1xKb':>9} {'peak GiB':>8} {'probe GiB':>9}"
        )
        ratios: list[tuple[float, str]] = []
        for r in p.get("runner", []):
            shape = (r["adapters"], r["rows_per_adapter"])
            probe = stacked.get(shape) if r["runner"] == "packed" else None
            peft = plain.get(r["adapters"] * r["rows_per_adapter"])
            share = ratio(r.get("steady_tokens_per_s"), probe.get("tok_s_total") if probe else None)
            if share and r["adapters"] > 1:
                ratios.append((share, f"{shape[0]}x{shape[1]}"))
            lines.append(
                f"{r['runner']:7} {f'{shape[0]}x{shape[1]}':>7} {fmt(r.get('tokens_per_step'), ',.0f'):>8} "
                f"{fmt(r.get('step_s'), '.3f'):>7} {fmt(r.get('steady_tokens_per_s'), ',.0f'):>9} "
                f"{fmt(probe.get('tok_s_total') if probe else None, ',.0f'):>11} {fmt(share, '.2f'):>6} "
                f"{fmt(peft.get('tok_s') if peft else None, ',.0f'):>9} {gib(r.get('peak_mb')):>8} "
                f"{fmt(probe.get('peak_gib') if probe else None):>9}"
                + (f"  {r['error'][:60]}" if r.get("error") else "")
            )
        if ratios:
            worst, where = min(ratios)
            targets.append(
                f"packed runner tok/s >= 80% of the stacked probe at the same shapes (K > 1): worst {worst:.2f} at "
                f"{where}: {verdict(worst >= 0.8)}"
            )

    q = d.get("qlora", {})
    if q.get("packed") or q.get("unpacked"):
        s = q["setting"]
        solo, pack = q.get("unpacked") or {}, q.get("packed") or {}
        lines.append(
            f"-- QLoRA {s['size']}: {s['batch']} x {s['cutoff_len']} rows a trial, r16, {s['steps']} steps; "
            f"unpacked = TrialRunner (TRL), packed = {s['pack']} trials in one PackedRunner"
        )
        lines.append(
            f"unpacked: {fmt(solo.get('steady_tokens_per_s'), ',.0f')} tok/s, peak {gib(solo.get('peak_mb'))} GiB | packed: "
            f"{fmt(pack.get('steady_tokens_per_s'), ',.0f')} tok/s, peak {gib(pack.get('peak_mb'))} GiB | tok/s x"
            f"{fmt(ratio(pack.get('steady_tokens_per_s'), solo.get('steady_tokens_per_s')), '.2f')}, peak x"
            f"{fmt(ratio(pack.get('peak_mb'), solo.get('peak_mb')), '.2f')} for {s['pack']}x the trials"
        )
    elif q.get("skipped"):
        lines.append(f"-- QLoRA: skipped: {q['skipped']}")

    two = d.get("two_gpus", {})
    many = two.get(f"{two.get('workers')}_gpus")
    if two.get("one_gpu"):
        s = two["setting"]
        lines += sweep_rows(
            f"-- {s['trials']} packed trials on 1 GPU (--workers 1) vs {two.get('workers')} (--workers {two.get('workers')})",
            [("--workers 1", two.get("one_gpu")), (f"--workers {two.get('workers')}", many)],
        )
        one, _ = sweep_wall(two.get("one_gpu"))
        several, _ = sweep_wall(many)
        speedup = ratio(one, several)
        if speedup:
            targets.append(
                f"{two.get('workers')} GPUs >= 1.8x one GPU: {speedup:.2f}x: {verdict(speedup >= 1.8)}"
            )
    elif two.get("skipped"):
        lines.append(f"-- two GPUs: skipped: {two['skipped']}")

    spans = [
        f"{name} {busy_text(d[name].get('gpu_part'))}" for name in PARTS if d.get(name, {}).get("gpu_part")
    ]
    if spans:
        lines.append("-- GPU busy / mean utilization over each whole part: " + ", ".join(spans))
    if targets:
        lines.append("-- targets")
        lines += targets
    skipped = [n for n in d.get("notes", []) if n.startswith("skipped") or "stopped" in n or "error" in n]
    if skipped:
        lines.append("-- skipped / stopped: " + "; ".join(skipped))
    lines.append(
        f"full results: {results.path}; subprocess output: {results.log}  (total {time.perf_counter() - _T0:.0f}s)"
    )
    d["targets"] = targets
    return lines


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", default="all", help=f"comma-separated: {', '.join(PARTS)}, or all")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 4 trials, 3 steps, pack 2")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting work after this many seconds (480; tiny 1500)",
    )
    p.add_argument("--out", default=None, help="results folder ($OUT, else ./bench_out)")
    p.add_argument("--work", default=None, help="scratch for models, data and sweep folders")
    p.add_argument(
        "--gsm8k", default=str(REPO / ".shared" / "gsm8k"), help="folder with GSM8K train.jsonl / test.jsonl"
    )
    p.add_argument("--probes", default=str(REPO / ".shared" / "probes"), help="folder with the probe scripts")
    p.add_argument("--size", default=None, help="model shape of the sweeps and probes (0.5b)")
    p.add_argument("--trials", type=int, default=None, help="trials per sweep (16)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trial (40)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch per trial (16)")
    p.add_argument("--cutoff", type=int, default=None, help="cutoff_len (512)")
    p.add_argument("--pack", default=None, help="workers.pack of the packed sweeps: auto or N (auto; tiny 2)")
    p.add_argument(
        "--row-tokens",
        default=None,
        help="min,max rendered tokens of the synthetic rows (100,400: GSM8K-like, 1-4k real tokens a 16-row step)",
    )
    p.add_argument("--naive-trials", type=int, default=None, help="naive trials run, then extrapolated (3)")
    p.add_argument(
        "--gsm8k-train-rows", type=int, default=None, help="data.max_samples of the GSM8K train rows (2000)"
    )
    p.add_argument(
        "--gsm8k-items", type=int, default=None, help="objective.max_samples: test items scored (256)"
    )
    p.add_argument("--gsm8k-shots", type=int, default=None, help="num_fewshot (5)")
    p.add_argument("--gsm8k-new-tokens", type=int, default=None, help="max_new_tokens (256, lm-eval's)")
    p.add_argument(
        "--probe-shapes", default=None, help="KxB shapes for the packed runner (multilora_probe.py's)"
    )
    p.add_argument("--probe-bs", default="2,4,8,16", help="BS of pack_probe.py")
    p.add_argument("--probe-decode", action="store_true", help="let pack_probe.py also time decode (~30 s)")
    p.add_argument(
        "--spy", default=None, help="py-spy executable: record every `sweep run` to $OUT/spy_<name>.txt"
    )
    p.add_argument("--qlora-size", default=None, help="model shape of the QLoRA part (1.5b)")
    p.add_argument("--qlora-pack", type=int, default=4)
    p.add_argument("--qlora-batch", type=int, default=None, help="micro-batch per QLoRA trial (4)")
    args = p.parse_args(argv)

    tiny = args.tiny
    defaults: dict[str, Any] = {
        "budget_s": 1500 if tiny else 480,
        "out": os.environ.get("OUT") or str(REPO / "bench_out"),
        "work": "/tmp/packed_bench_tiny" if tiny else "/tmp/packed_bench",
        "size": "tiny" if tiny else "0.5b",
        "trials": 4 if tiny else 16,
        "steps": 3 if tiny else 40,
        "batch": 4 if tiny else 16,
        "cutoff": 128 if tiny else 512,
        "pack": "2" if tiny else "auto",
        "row_tokens": "30,170" if tiny else "100,400",
        "naive_trials": 1 if tiny else 3,
        "gsm8k_train_rows": 64 if tiny else 2000,
        "gsm8k_items": 4 if tiny else 256,
        "gsm8k_shots": 1 if tiny else 5,
        "gsm8k_new_tokens": 8 if tiny else 256,
        "probe_shapes": "1x2,2x2" if tiny else "1x4,4x4,8x4,1x2,8x2,16x2",
        "qlora_size": "tiny" if tiny else "1.5b",
        "qlora_batch": 2 if tiny else 4,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.pack = "auto" if args.pack == "auto" else int(args.pack)
    args.row_min, args.row_max = (int(x) for x in args.row_tokens.split(","))
    args.train_rows = 96 if tiny else 1024
    args.eval_rows = 8 if tiny else 64
    args.eval_batch = 4 if tiny else 8
    args.tokenizer_vocab = 1024 if tiny else 16384
    args.gsm8k_max_length = 512 if tiny else 2048
    # Rows as long as the probes' (512 tokens, every row full) for the probe shapes and QLoRA.
    args.probe_tokens = 64 if tiny else 512
    args.probe_warm = 1 if tiny else 3
    args.probe_steps = 3 if tiny else 8
    args.qlora_steps = 3 if tiny else 12
    args.long_rows = 64 if tiny else 512
    args.long_eval_rows = 4 if tiny else 8
    parts = PARTS if args.part == "all" else tuple(x.strip() for x in args.part.split(","))
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)} or all")
    args.parts = tuple(part for part in PARTS if part in parts)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(Path(args.out))
    results.log.write_text("")
    guard = Guard(args.budget_s, results)
    guard.arm(grace_s=30)
    sampler = GpuSampler()
    sampler.start()
    results.data["args"] = dict(vars(args))
    say(f"parts {', '.join(args.parts)}; budget {args.budget_s:.0f}s; results to {results.path}")
    code = 0
    try:
        import torch
        from gpu_sweep_bench import environment, quiet

        quiet()
        results.data["env"] = environment()
        say(f"environment: {json.dumps(results.data['env'])}")
        if not sampler.available:
            results.note("no nvidia-smi: GPU busy shares are not measured")
        results.note(
            "models have random weights (Qwen2.5 shapes); loss and accuracy are meaningless, speed and memory are real"
        )
        if not torch.cuda.is_available():
            results.note("no CUDA device: CPU smoke run, the numbers are not benchmarks")
        bench = Bench(args, results, guard, sampler)
        for part in args.parts:
            say(f"--- {part}")
            started = time.time()
            try:
                getattr(bench, part)()
            except Exception as exc:  # noqa: BLE001  (a broken part is recorded; the next part still runs)
                traceback.print_exc()
                results.note(f"{part}: bench error: {type(exc).__name__}: {exc}")
                code = 1
            results.part(part)["gpu_part"] = sampler.summary(started, time.time())
            results.save()
    except BudgetExceeded:
        results.note("budget alarm: the run was stopped; the table shows what finished")
    except Exception as exc:  # noqa: BLE001  (print the table of whatever finished, then fail)
        traceback.print_exc()
        results.note(f"bench error: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        signal.alarm(0)
        sampler.stop()
    lines = summarise(results)
    results.save()
    print("\n".join(lines), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
