"""Build the offline demo: a tiny Llama, its tokenizer and a small number-sorting SFT task.

The repo ships the result under `search_spaces/demo/` so `sweep demo` needs no network; tests use
the same builders to make their own tiny model. Rebuild with `python -m sweeps.demo search_spaces/demo`.

The base model is pretrained for a few hundred steps on copying and reversing number lists, then
the demo sweep fine-tunes it to *sort* them: a new skill, so learning rate, rank and method move the
eval loss a lot, and different trials score visibly differently.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SORT_INSTRUCTION = "Sort the numbers from smallest to largest."
PRETRAIN_INSTRUCTIONS = {
    "Repeat the numbers.": lambda xs: xs,
    "Reverse the numbers.": lambda xs: xs[::-1],
}
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]


def _row(instruction: str, numbers: list[int], answer: list[int]) -> dict[str, str]:
    return {
        "instruction": instruction,
        "input": " ".join(map(str, numbers)),
        "output": " ".join(map(str, answer)),
    }


def sort_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` alpaca rows of the sorting task."""
    rng = random.Random(seed)
    return [_row(SORT_INSTRUCTION, xs, sorted(xs)) for xs in (_numbers(rng) for _ in range(n))]


def pretrain_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` alpaca rows of copying and reversing, the base model's prior skills."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, solve = rng.choice(list(PRETRAIN_INSTRUCTIONS.items()))
        xs = _numbers(rng)
        rows.append(_row(instruction, xs, solve(xs)))
    return rows


def build_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained on `corpus`, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runners.data import CHATML_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(out_dir: Path, pretrain_steps: int = 400, seed: int = 0) -> Path:
    """Write a tiny Llama (about 0.1M parameters) and its tokenizer to `out_dir` as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.eval import pad_right
    from core.rows import Example
    from runners.data import CHATML_TEMPLATE, tokenize_example

    rows = pretrain_rows(2000, seed)
    corpus = [" ".join(row.values()) for row in rows + sort_rows(200, seed + 1)]
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        examples = [
            Example(
                (
                    {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                    {"role": "assistant", "content": row["output"]},
                )
            )
            for row in rows
        ]
        encoded = [tokenize_example(tokenizer, CHATML_TEMPLATE, ex) for ex in examples]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = random.Random(seed)
        model.train()
        for _ in range(pretrain_steps):
            loss = model(**pad_right(rng.sample(encoded, 32), tokenizer.pad_token_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def build_demo(root: Path, seed: int = 0) -> None:
    """Everything `search_spaces/demo.yaml` points at: model/, train.jsonl, eval.jsonl."""
    build_tiny_model(root / "model", seed=seed)
    write_jsonl(root / "train.jsonl", sort_rows(320, seed + 2))
    write_jsonl(root / "eval.jsonl", sort_rows(64, seed + 3))


if __name__ == "__main__":
    build_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "search_spaces/demo"))
