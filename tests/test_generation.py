"""The shared batched greedy generation path, checked against one-prompt-at-a-time generate."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from objectives.generation import fixed_subset, generate, trim_at_stop

PROMPTS = [
    "Sort the numbers from smallest to largest.\n\n42 7 19 3 88 61",
    "hi",
    "Reverse the numbers.\n\n5 6 7",
    "Question: Ann has 3 pens and buys 2 more. How many pens does she have?\nAnswer:",
    "1 2",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def varied(tiny_model):
    """The tiny model with weights large enough that its greedy output varies from token to token.

    At the default initialisation its argmax barely depends on the context, so every row would
    repeat one token and batching mistakes could go unseen. Tokens that decode to a partial UTF-8
    character or a control character are suppressed, so outputs are plain text to cut stops from.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.generation_config.suppress_tokens = [
        token
        for token in range(len(tokenizer))
        if "\ufffd" in tokenizer.decode([token]) or not tokenizer.decode([token]).isprintable()
    ]
    model.eval()
    return model, tokenizer


def one_at_a_time(model, tokenizer, prompt: str, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """The continuation plain `model.generate` gives a single, unpadded prompt."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, ids.shape[1] :].tolist()


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


class CountForwards:
    """Counts the model's forward passes (one per generated token after the prefill)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *args) -> None:
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_batched_outputs_equal_one_prompt_at_a_time_across_several_batches(varied):
    model, tokenizer = varied
    expected = [text(tokenizer, one_at_a_time(model, tokenizer, p)) for p in PROMPTS]
    assert len(set(expected)) == len(PROMPTS)  # the rows really differ
    assert generate(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=2) == expected


def test_prompts_prefilled_in_chunks_give_the_same_outputs(varied):
    model, tokenizer = varied
    expected = [text(tokenizer, one_at_a_time(model, tokenizer, p)) for p in PROMPTS]
    assert generate(model, tokenizer, PROMPTS, NEW_TOKENS, prefill_chunk=4) == expected


def test_results_follow_input_order_not_length_order(varied):
    model, tokenizer = varied
    forward = generate(model, tokenizer, PROMPTS, NEW_TOKENS)
    backward = generate(model, tokenizer, PROMPTS[::-1], NEW_TOKENS)
    assert backward == forward[::-1]


def test_a_stop_string_trims_its_row_and_leaves_the_others_whole(varied):
    model, tokenizer = varied
    full = generate(model, tokenizer, PROMPTS, NEW_TOKENS)
    windows = (full[0][i : i + 3] for i in range(4, len(full[0]) - 3))
    stop = next(window for window in windows if all(window not in other for other in full[1:]))
    stopped = generate(model, tokenizer, PROMPTS, NEW_TOKENS, stop=[stop])
    assert stopped[0] == full[0][: full[0].index(stop)]
    assert stopped[1:] == full[1:]


def test_the_earliest_of_several_stop_strings_wins(varied):
    model, tokenizer = varied
    (full,) = generate(model, tokenizer, PROMPTS[:1], NEW_TOKENS)
    (stopped,) = generate(model, tokenizer, PROMPTS[:1], NEW_TOKENS, stop=[full[10:12], full[4:6]])
    assert stopped == full[: full.index(full[4:6])]


def test_a_stop_string_ends_generation_early(varied):
    model, tokenizer = varied
    ids = one_at_a_time(model, tokenizer, PROMPTS[0])
    # A stop string the third generated token completes.
    stop = text(tokenizer, ids[:3])[-2:]
    assert stop not in text(tokenizer, ids[:2])
    with CountForwards(model) as count:
        generate(model, tokenizer, PROMPTS[:1], NEW_TOKENS, stop=[stop])
    assert count.calls == 3


def test_a_stop_string_that_starts_in_the_prompt_does_not_stop(varied):
    model, tokenizer = varied
    (full,) = generate(model, tokenizer, PROMPTS[:1], NEW_TOKENS)
    stop = PROMPTS[0][-2:] + full[:2]
    assert stop not in full
    assert generate(model, tokenizer, PROMPTS[:1], NEW_TOKENS, stop=[stop]) == [full]


def test_an_eos_of_the_model_generation_config_ends_its_row(varied):
    model, tokenizer = varied
    ids = one_at_a_time(model, tokenizer, PROMPTS[2])
    eos = ids[3]
    assert eos not in ids[:3]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [saved, eos]
    try:
        outputs = generate(model, tokenizer, PROMPTS, NEW_TOKENS)
    finally:
        model.generation_config.eos_token_id = saved
    assert outputs[2] == text(tokenizer, ids[:3])


def test_ignore_eos_generates_max_new_tokens(varied):
    model, tokenizer = varied
    saved = model.generation_config.eos_token_id
    # Make the first generated token an EOS: without ignore_eos the row would end at once.
    model.generation_config.eos_token_id = [saved, one_at_a_time(model, tokenizer, PROMPTS[0])[0]]
    try:
        with CountForwards(model) as count:
            generate(model, tokenizer, PROMPTS[:1], 5, ignore_eos=True)
    finally:
        model.generation_config.eos_token_id = saved
    assert count.calls == 5


def test_long_prompts_keep_their_end(varied):
    model, tokenizer = varied
    ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    tail = tokenizer.decode(ids[-4:])
    assert generate(model, tokenizer, PROMPTS[:1], NEW_TOKENS, max_prompt_tokens=4) == generate(
        model, tokenizer, [tail], NEW_TOKENS
    )


def test_prompts_get_one_bos_whether_or_not_they_start_with_it(varied, monkeypatch):
    model, tokenizer = varied
    with_bos = copy.deepcopy(tokenizer)
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, bos)]
    )
    real_generate = model.generate
    rows = []

    def record(input_ids, attention_mask, **kwargs):
        rows.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", record)
    generate(model, with_bos, ["1 2", f"{with_bos.bos_token}1 2"], 2)
    plain = tokenizer("1 2", add_special_tokens=False)["input_ids"]
    assert rows == [[bos, *plain], [bos, *plain]]


def test_out_of_memory_halves_the_batch_and_loses_no_row(varied, monkeypatch):
    model, tokenizer = varied
    expected = generate(model, tokenizer, PROMPTS, NEW_TOKENS)
    real_generate = model.generate
    sizes = []

    def tight_memory(input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", tight_memory)
    assert generate(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=8) == expected
    assert sizes == [5, 4, 2, 2, 1]


def test_training_mode_and_use_cache_are_restored(varied):
    model, tokenizer = varied
    model.train()
    model.config.use_cache = False
    try:
        generate(model, tokenizer, PROMPTS[:1], 2)
        assert model.training and model.config.use_cache is False
    finally:
        model.eval()
        model.config.use_cache = True


def test_trim_at_stop_cuts_at_the_earliest_stop():
    assert trim_at_stop("a #### 5\n\nQuestion: b</s>", ["</s>", "Question:"]) == "a #### 5\n\n"


def test_fixed_subset_is_seeded_sorted_and_sized():
    first = fixed_subset(100, 10, seed=3)
    assert first == fixed_subset(100, 10, seed=3)
    assert first == sorted(first) and len(set(first)) == 10
    assert first != fixed_subset(100, 10, seed=4)


def test_fixed_subset_without_max_samples_is_everything():
    assert fixed_subset(4, None, seed=0) == [0, 1, 2, 3]
