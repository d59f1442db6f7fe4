"""Build the offline demo: a tiny Llama, its tokenizer and small arithmetic word problems in GSM8K's form.

The repo ships the result under `search_spaces/demo/` so `sweep demo` needs no network; tests use
the same builders to make their own tiny model. Rebuild with `python -m sweeps.demo search_spaces/demo`.

The base model is pretrained to solve one-digit sums two ways: "Compute seven minus three." answered
with the working and GSM8K's final line ("7 - 3 = 4\n#### 4"), and word problems ("Ann has 7 pens
and gives away 3. ...") answered with the working alone. The demo sweep fine-tunes it on word
problems answered in GSM8K's form and scores it with the `gsm8k` objective (strict match: the
`#### n` line must be there and right). The base model scores 0; a trial that learns to put the two
skills together without breaking them scores close to 1, and one whose learning rate is too low
for its method (nothing learnt) or too high (the sums forgotten) stays near 0, so the method and
learning rate visibly decide it.

The tokenizer and the model's shape are those of the earlier number-list demo (the tokenizer is
trained on the same copy / reverse / sort rows), so tests that rely on them keep their figures.
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


NAMES = ("Tom", "Ann", "Bo", "Eva", "Sam", "Lu")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THINGS = ("apples", "pens", "cards", "shells", "eggs", "coins")


def _sum(rng: random.Random) -> tuple[int, str, int, int]:
    """A one-digit sum or difference with a result >= 0: (a, operator, b, result)."""
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return a, "+", b, a + b
    a = rng.randint(0, 9)
    b = rng.randint(0, a)
    return a, "-", b, a - b


def _story(rng: random.Random, a: int, op: str, b: int) -> str:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    change = f"gets {b} more" if op == "+" else f"gives away {b}"
    return f"{name} has {a} {thing} and {change}. How many {thing} does {name} have now?"


def word_problem_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` GSM8K rows (question, answer ending in '#### n') of one-digit word problems."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, op, b, result = _sum(rng)
        rows.append({"question": _story(rng, a, op, b), "answer": f"{a} {op} {b} = {result}\n#### {result}"})
    return rows


def arithmetic_pretrain_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (user, assistant) turns of the base model's two prior skills, half each.

    Bare sums come with GSM8K's final line, word problems with the working only: the model knows
    the form and the problems, but has never answered a word problem in that form. A bare sum's
    numbers are written as words, so its digits appear first in the working and the `#### n` line
    is learnt as a copy of the working's result, which is what a word problem's answer needs. With
    the digits in the prompt ("Compute 7 - 3.") the best fine-tuned trials stopped near 0.9
    accuracy, their errors a `#### n` line that did not repeat the working's (right) result.
    """
    from core.rows import QUESTION_TEMPLATE

    rng = random.Random(seed)
    turns = []
    for index in range(n):
        a, op, b, result = _sum(rng)
        working = f"{a} {op} {b} = {result}"
        if index % 2 == 0:
            verb = "plus" if op == "+" else "minus"
            turns.append((f"Compute {DIGIT_WORDS[a]} {verb} {DIGIT_WORDS[b]}.", f"{working}\n#### {result}"))
        else:
            turns.append((QUESTION_TEMPLATE.format(question=_story(rng, a, op, b)), working))
    return turns


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


def build_tiny_model(out_dir: Path, pretrain_steps: int = 1500, seed: int = 0) -> Path:
    """Write a tiny Llama (about 0.1M parameters) and its tokenizer to `out_dir` as safetensors.

    With `pretrain_steps` it is first trained on `arithmetic_pretrain_examples`; with 0 its weights
    stay random (what most tests want: fast, and no skill to hide a bug).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.eval import pad_right
    from core.rows import Example
    from runners.data import CHATML_TEMPLATE, tokenize_example

    # The number-list corpus of the first demo: keeps the tokenizer (and its ids) as it was.
    corpus = [" ".join(row.values()) for row in pretrain_rows(2000, seed) + sort_rows(200, seed + 1)]
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
            Example(({"role": "user", "content": user}, {"role": "assistant", "content": reply}))
            for user, reply in arithmetic_pretrain_examples(4000, seed)
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
    write_jsonl(root / "train.jsonl", word_problem_rows(320, seed + 2))
    write_jsonl(root / "eval.jsonl", word_problem_rows(64, seed + 3))


if __name__ == "__main__":
    build_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "search_spaces/demo"))
