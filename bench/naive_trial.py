"""The naive baseline for issue 6: one SFT trial the way a plain script does it, in its own process.

A fresh `python3` per trial imports everything, loads the model from disk, tokenizes the data,
trains with the plain Hugging Face `Trainer` + peft on padded batches (`DataCollatorForSeq2Seq`,
full logits and the stock cross-entropy), scores the eval loss with `Trainer.evaluate`, saves the
adapter and exits. Nothing is shared between trials; that is the point of the comparison.

It deliberately does not import this project, so it measures what a user without `sweep` pays.
`gpu_sweep_bench.py` launches it once per trial (makespan) and also calls `run()` in-process for
the padded-batch throughput baseline.

    python3 bench/naive_trial.py --model DIR --train train.jsonl --eval eval.jsonl \
        --params '{"learning_rate": 2e-4, "lora_rank": 16, ...}' --out result.json
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse
import json
from pathlib import Path

DEFAULTS = {
    "method": "lora",
    "learning_rate": 2e-4,
    "max_steps": 10,
    "per_device_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "cutoff_len": 1024,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "target_modules": "all-linear",
    "weight_decay": 0.0,
    "lr_scheduler": "linear",
    "max_grad_norm": 1.0,
    "seed": 42,
    "eval_batch_size": 8,
}


def _messages(row: dict) -> list[dict]:
    prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def tokenize_file(tokenizer, path: Path, cutoff: int) -> dict[str, list]:
    """input_ids / labels with the prompt masked, truncated to `cutoff`; rows with no reply token dropped."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    conversations = [_messages(r) for r in rows]
    prompts = tokenizer.apply_chat_template(
        [c[:-1] for c in conversations], tokenize=False, add_generation_prompt=True
    )
    fulls = tokenizer.apply_chat_template(conversations, tokenize=False)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, full in zip(prompt_ids, full_ids):
        labels = [-100] * len(prompt) + full[len(prompt) :]
        ids, labels = full[:cutoff], labels[:cutoff]
        if all(label == -100 for label in labels):
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def run(
    model_dir: str,
    train_file: str,
    eval_file: str | None,
    params: dict,
    output_dir: str,
    save: bool = True,
    started: float | None = None,
) -> dict:
    """One trial; returns its timings, token counts, per-step clock and peak memory."""
    started = started if started is not None else time.perf_counter()
    p = {**DEFAULTS, **params}
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    import_s = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa"
    )
    model.to("cuda" if cuda else "cpu")
    model.config.use_cache = False
    load_s = time.perf_counter() - t

    t = time.perf_counter()
    train = Dataset.from_dict(tokenize_file(tokenizer, Path(train_file), p["cutoff_len"]))
    evaluation = (
        Dataset.from_dict(tokenize_file(tokenizer, Path(eval_file), p["cutoff_len"])) if eval_file else None
    )
    data_s = time.perf_counter() - t

    if p["method"] == "lora":
        targets = p["target_modules"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=p["lora_rank"],
                lora_alpha=p["lora_alpha"],
                lora_dropout=p["lora_dropout"],
                use_rslora=p["use_rslora"],
                target_modules=targets if targets == "all-linear" else targets.split(","),
                task_type="CAUSAL_LM",
            ),
        )
    elif p["method"] != "full":
        raise ValueError(f"the naive baseline runs lora or full, not {p['method']!r}")

    clock: list[tuple[int, float, int]] = []

    class StepClock(TrainerCallback):
        """(step, seconds, tokens seen) at each step end; synchronised so the clock means GPU time."""

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            clock.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    args = TrainingArguments(
        output_dir=str(Path(output_dir) / "trainer"),
        per_device_train_batch_size=p["per_device_batch_size"],
        per_device_eval_batch_size=p["eval_batch_size"],
        gradient_accumulation_steps=p["gradient_accumulation_steps"],
        learning_rate=p["learning_rate"],
        max_steps=p["max_steps"],
        lr_scheduler_type=p["lr_scheduler"],
        weight_decay=p["weight_decay"],
        max_grad_norm=p["max_grad_norm"],
        seed=p["seed"],
        bf16=cuda,
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[StepClock()],
    )
    trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    tokens = int(trainer.state.num_input_tokens_seen)
    first_loss = next((float(e["loss"]) for e in trainer.state.log_history if "loss" in e), None)

    eval_s, eval_loss = 0.0, None
    if evaluation is not None:
        t = time.perf_counter()
        eval_loss = float(trainer.evaluate()["eval_loss"])
        eval_s = time.perf_counter() - t

    save_s = 0.0
    if save:
        t = time.perf_counter()
        model.save_pretrained(str(Path(output_dir) / ("adapter" if p["method"] == "lora" else "model")))
        save_s = time.perf_counter() - t
    result = {
        "import_s": import_s,
        "load_s": load_s,
        "data_s": data_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "save_s": save_s,
        "train_rows": len(train),
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
        "eval_loss": eval_loss,
        "first_loss": first_loss,
        "train_peak_mb": train_peak,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "clock": clock,
        "in_process_s": time.perf_counter() - started,
    }
    del trainer, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", default=None)
    parser.add_argument("--params", default="{}", help="JSON object of trial parameters")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument(
        "--output-dir", default=None, help="adapter and trainer scratch (default: next to --out)"
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    out = Path(args.out)
    result = run(
        args.model,
        args.train,
        args.eval,
        json.loads(args.params),
        args.output_dir or str(out.with_suffix("")),
        save=not args.no_save,
        started=_STARTED,
    )
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
