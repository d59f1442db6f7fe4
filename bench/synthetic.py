"""Offline stand-ins for a hub model and an SFT data set: Qwen2-shaped random models, a byte-level
BPE tokenizer with a ChatML template, and alpaca rows of realistic, variable length.

The device machine has no network, so nothing can come from a hub. Random weights cost the same
FLOPs and bytes as trained ones, which is all a speed and memory benchmark needs; the loss values
they produce mean nothing and are never compared across methods.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-0.5B / 1.5B shapes (both tie the LM head to the embeddings, as the released models do).
# "tiny" is the same architecture at toy size, so `--tiny` exercises the very code path the GPU runs.
SHAPES: dict[str, dict] = {
    "0.5b": {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "1.5b": {
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1536,
        "tie_word_embeddings": True,
    },
}

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def _words(n: int, seed: int) -> list[str]:
    """Pseudo-words from syllables: a fixed vocabulary the BPE learns like a natural language's."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "st", "qu"]
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(seen)


class _Text:
    """Sentences drawn from a Zipf-like word distribution, with punctuation and line breaks."""

    def __init__(self, seed: int, vocabulary: int = 4000):
        self.rng = random.Random(seed)
        # One vocabulary for the tokenizer's corpus and every data set; `seed` only picks the text.
        self.words = _words(vocabulary, 0)
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]

    def words_(self, n: int) -> str:
        picked = self.rng.choices(self.words, weights=self.weights, k=max(1, n))
        out, since = [], 0
        for word in picked:
            since += 1
            if since > self.rng.randint(6, 18):
                out.append(word + self.rng.choice((".", ".", ",", "?", ".\n")))
                since = 0
            else:
                out.append(word)
        return " ".join(out).replace("\n ", "\n")


def build_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE trained on the synthetic language, with Qwen's special tokens and ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runners.data import CHATML_TEMPLATE

    text = _Text(seed)
    corpus = [text.words_(text.rng.randint(8, 40)) for _ in range(6000)]
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


def build_model(size: str, out_dir: Path, tokenizer, device: str, dtype_name: str, seed: int = 0) -> dict:
    """Write a randomly initialised Qwen2 of `size` and the tokenizer to `out_dir` (safetensors).

    Built directly on `device` so a 1.5B model takes seconds, not a minute of CPU init; a marker
    file makes a second call with the same arguments free.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    marker = out_dir / "bench_model.json"
    wanted = {"size": size, "dtype": dtype_name, "seed": seed, "shape": SHAPES[size]}
    if marker.exists() and json.loads(marker.read_text()).get("spec") == wanted:
        return json.loads(marker.read_text())
    if len(tokenizer) > SHAPES[size]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the {size} vocab")
    torch.manual_seed(seed)
    config = Qwen2Config(
        **SHAPES[size],
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    info = {"spec": wanted, "params": params, "path": str(out_dir), "random_weights": True}
    marker.write_text(json.dumps(info))
    return info


@dataclass(frozen=True)
class DataSpec:
    train_rows: int
    eval_rows: int
    min_tokens: int
    max_tokens: int
    seed: int = 0


def _row(text: _Text, tokens: int, tokens_per_word: float) -> dict:
    """An alpaca row of about `tokens` tokens: a short instruction, an optional input, a long reply."""
    rng = text.rng
    words = max(12, int(tokens / tokens_per_word))
    prompt_share = rng.uniform(0.15, 0.5)
    instruction = max(4, min(40, int(words * prompt_share * 0.3)))
    given = max(0, int(words * prompt_share) - instruction)
    row = {"instruction": text.words_(instruction), "output": text.words_(words - instruction - given)}
    if given > 3:
        row["input"] = text.words_(given)
    return row


def write_data(root: Path, tokenizer, spec: DataSpec) -> dict:
    """train.jsonl / eval.jsonl under `root`, lengths uniform in [min_tokens, max_tokens] as rendered."""
    from runners.data import CHATML_TEMPLATE

    text = _Text(spec.seed + 1)
    sample = [text.words_(200) for _ in range(20)]
    n_words = sum(len(s.split()) for s in sample)
    n_tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sample)
    tokens_per_word = n_tokens / n_words
    template_tokens = 12  # role markers and newlines of a two-turn ChatML conversation

    def rows(n: int) -> list[dict]:
        return [
            _row(text, text.rng.uniform(spec.min_tokens, spec.max_tokens) - template_tokens, tokens_per_word)
            for _ in range(n)
        ]

    train, evaluation = rows(spec.train_rows), rows(spec.eval_rows)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in (("train", train), ("eval", evaluation)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        files[name] = str(path)

    # Lengths as the trainer will see them: rendered through the chat template, then tokenized.
    rendered = [
        tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""),
                },
                {"role": "assistant", "content": r["output"]},
            ],
            chat_template=CHATML_TEMPLATE,
            tokenize=False,
        )
        for r in train
    ]
    lengths = sorted(len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return {
        **files,
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "tokens_per_word": round(tokens_per_word, 3),
        "train_tokens_total": sum(lengths),
        "length_min": lengths[0],
        "length_median": lengths[len(lengths) // 2],
        "length_p90": lengths[int(len(lengths) * 0.9)],
        "length_max": lengths[-1],
        "lengths": lengths,
    }
