"""Attention over rows joined end to end: each row attends only to itself, with no padding computed.

A pack step that pads every row of every trial to the longest computes up to twice the real
tokens (GSM8K rows run from ~80 to ~400 tokens). Joining each trial's rows into one sequence and
telling attention where the rows start keeps the arithmetic to the real tokens: the MLPs and
projections are per token, so only attention must know the boundaries.

Transformers passes `cu_seq_lens_q` / `max_length_q` model kwargs through to the attention
function (TRL's padding-free collator uses the same contract with `flash_attention_2`). The
`flash-attn` wheel is not a dependency here; `torch.nn.attention.varlen.varlen_attn` (PyTorch
>= 2.9) is the FlashAttention-2 varlen kernel inside torch, so `joined_rows(model)` switches the
model to it for the forwards inside. On CPU, or a torch without it, one SDPA call per row computes
the same thing: exact, slow, and what the CPU tests exercise.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "sweep_joined_rows"


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    # Looked up once: every layer of every pack step calls the kernel.
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def fast_kernel_unavailable(device: torch.device | str) -> str | None:
    """None when the fused varlen kernel serves `device`, else why not."""
    if torch.device(device).type != "cuda":
        return "the varlen kernel is CUDA-only"
    if _torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.9)"
    return None


def model_unsupported(model: torch.nn.Module) -> str | None:
    """None when `model` can run joined rows, else why not.

    The model must dispatch attention through Transformers' AttentionInterface, attend over the
    whole causal past (no sliding-window layers) and use no attention dropout.
    """
    config = model.config
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return f"{type(model).__name__} does not use Transformers' AttentionInterface"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window attention layers"
    if getattr(config, "attention_dropout", 0.0):
        return "the model uses attention dropout"
    return None


def _varlen_cuda(q, k, v, cu, max_len, scale):
    varlen_attn = _torch_varlen()
    accepted = _varlen_parameters()
    kwargs = {}
    # The causal flag changed form between releases: is_causal (2.9) became window_size (2.10+).
    if "is_causal" in accepted:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in accepted:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError("this torch's varlen_attn has no `scale` and the model's scaling is not 1/sqrt(d)")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in accepted:
            kwargs["enable_gqa"] = True
        else:
            # Query head h reads key/value head h // groups, as Transformers' repeat_kv does.
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_reference(q, k, v, cu, max_len, scale):
    """`varlen` as one SDPA call per sequence: slow, exact, and runs anywhere."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(cu.tolist()):
        if end <= start:
            continue
        qs = q[start:end].transpose(0, 1)[None]
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def varlen(q, k, v, cu, max_len, scale):
    """Causal attention over concatenated sequences; q (T, Hq, D), k and v (T, Hkv, D), cu (N+1,) int32."""
    if fast_kernel_unavailable(q.device) is None:
        return _varlen_cuda(q, k, v, cu, max_len, scale)
    return varlen_reference(q, k, v, cu, max_len, scale)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A Transformers attention function over joined rows: (B, H, L, D) in, (B, L, H, D) out.

    `cu_seq_lens_q` holds the row boundaries over the flattened B x L tokens, `max_length_q`
    the longest row.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        raise ValueError(f"{NAME} attention needs the row boundaries (cu_seq_lens_q)")
    batch, heads, length, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5

    def flat(t):  # (B, H, L, D) -> (B*L, H, D)
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], dim)

    # A no-op for the packed runner's boundaries; TRL's padding-free collator leaves them int64 on the CPU.
    bounds = bounds.to(device=query.device, dtype=torch.int32)
    out = varlen(flat(query), flat(key), flat(value), bounds, int(kwargs["max_length_q"]), scale)
    return out.reshape(batch, length, heads, dim), None


def _register() -> None:
    from transformers import AttentionInterface

    # Registered as an attention function only, with no mask function: Transformers then builds no
    # mask at all for it, and the boundaries alone decide what each token sees.
    AttentionInterface.register(NAME, attention_forward)


@contextmanager
def joined_rows(model: torch.nn.Module) -> Iterator[None]:
    """The model's forwards inside attend per row over joined rows (the caller passes the boundaries)."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
