"""Padding-free attention for Transformers through PyTorch's own FlashAttention varlen kernel.

Packed, padding-free batches (TRL `packing=True, packing_strategy="bfd"`) put a whole batch in one
row and mark where each conversation starts. `flash_attention_2` reads those boundaries, but the
`flash-attn` wheel is not on the device image and cannot be built there, and `sdpa` turns them
into a dense (tokens x tokens) block-diagonal mask: a 16k-token row then pays 16k^2 attention and
falls back from the flash kernel. `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.9) is the
FlashAttention-2 varlen kernel that ships inside torch, so registering it as an attention
implementation gives flash-attn behaviour with no extra package.

`register()` adds it as `attn_implementation="sdpa_varlen"`. It serves three input kinds:
- padding-free rows with `cu_seq_lens_q` / `max_length_q` (what TRL's collator passes): varlen;
- padded batches with a 2D attention mask (the runner's eval loss): unpad, varlen, pad back;
- no mask at all: plain causal SDPA, which already dispatches to the flash kernel.
The kernel and its CPU stand-in (a per-sequence SDPA loop, so the boundary logic is tested on the
`--tiny` run too) are the packed runner's, `runners/attention.py`.
"""

from __future__ import annotations

import random
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runners.attention import attention_forward as joined_rows_attention
from runners.attention import fast_kernel_unavailable, varlen, varlen_reference

NAME = "sdpa_varlen"


def available() -> str | None:
    """None when the CUDA varlen kernel can be used here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return fast_kernel_unavailable("cuda")


_unpad_cache: dict = {"mask": None, "value": None}


def _unpad_metadata(attention_mask: torch.Tensor):
    """Token indices, cumulative lengths and the longest length of a 2D padding mask.

    Every layer of one forward gets the same mask object; computing this once per forward instead
    of once per layer saves two device-to-host syncs a layer. A weak reference keys the cache, so a
    new mask that reuses the old one's memory can never hit a stale entry.
    """
    cached = _unpad_cache["mask"]
    if cached is not None and cached() is attention_mask:
        return _unpad_cache["value"]
    index = attention_mask.reshape(-1).bool().nonzero().flatten()
    lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    value = (index, cu, int(lengths.max()))
    _unpad_cache.update(mask=weakref.ref(attention_mask), value=value)
    return value


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A Transformers attention function: (B, H, L, D) in, (B, L, H, D) out, like `sdpa`."""
    if dropout:
        raise ValueError(f"{NAME} does not implement attention dropout")
    batch, heads, length, dim = query.shape
    if key.shape[2] != length:
        raise NotImplementedError(f"{NAME} is for training and eval-loss forwards, not cached decoding")
    scale = scaling if scaling is not None else dim**-0.5

    def flat(t):  # (B, H, L, D) -> (B*L, H, D)
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], dim)

    if kwargs.get("cu_seq_lens_q") is not None:
        # Padding-free: TRL's collator computed the boundaries on the CPU, so no device sync here.
        return joined_rows_attention(module, query, key, value, None, scaling=scale, **kwargs)

    if attention_mask is not None and attention_mask.dim() == 2:
        # Padded batch (the mask function returns a mask only when something is padded): attend
        # over the real tokens only, whichever side the padding is on.
        index, cu, max_len = _unpad_metadata(attention_mask)
        packed = varlen(flat(query)[index], flat(key)[index], flat(value)[index], cu, max_len, scale)
        out = query.new_zeros(batch * length, heads, dim)
        out[index] = packed
        return out.reshape(batch, length, heads, dim), None

    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} takes a 2D padding mask or none, got shape {tuple(attention_mask.shape)}")
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=length > 1, scale=scale, enable_gqa=key.shape[1] != heads
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` loadable; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    # FlashAttention's mask convention: None when nothing is padded, else the 2D padding mask.
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def self_check(device: str, dtype: torch.dtype = torch.bfloat16, seed: int | None = None) -> dict:
    """Compare forward and gradients with per-sequence SDPA in float32 on fresh random inputs.

    Runs the packed path and the padded path with Qwen2-0.5B's head layout (14 query, 2 key/value
    heads of 64). Returns relative errors; bf16 operands land around 1e-2 at most.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**31))
    lengths = [int(x) for x in torch.randint(5, 300, (6,), generator=gen)]
    total, hq, hkv, dim = sum(lengths), 14, 2, 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    base = [torch.randn(total, h, dim, generator=gen) for h in (hq, hkv, hkv)]
    grad_out = torch.randn(total, hq, dim, generator=gen)

    def run(fn, tensors, dev, dt):
        # Fresh leaves every run: `.to` returns the tensor itself when nothing changes, and setting
        # requires_grad on a shared input made the next run's copies non-leaves with no .grad.
        inputs = [t.detach().to(dev, dt).clone().requires_grad_(True) for t in tensors]
        out = fn(*inputs, cu.to(dev), max(lengths), dim**-0.5)
        out.backward(grad_out.to(dev, dt))
        return [out.detach().float().cpu()] + [t.grad.float().cpu() for t in inputs]

    ref = run(varlen_reference, base, "cpu", torch.float32)
    got = run(varlen, base, device, dtype if device != "cpu" else torch.float32)
    names = ["out", "dq", "dk", "dv"]
    errors = {n: float((g - r).norm() / r.norm()) for n, g, r in zip(names, got, ref)}

    # Padded path through the attention function itself: right padding, with a 2D mask.
    width = max(lengths)
    q4 = torch.zeros(len(lengths), hq, width, dim)
    k4 = torch.zeros(len(lengths), hkv, width, dim)
    v4 = torch.zeros(len(lengths), hkv, width, dim)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        q4[i, :, :n] = base[0][s : s + n].transpose(0, 1)
        k4[i, :, :n] = base[1][s : s + n].transpose(0, 1)
        v4[i, :, :n] = base[2][s : s + n].transpose(0, 1)
        mask[i, :n] = 1
    dt = dtype if device != "cpu" else torch.float32
    with torch.no_grad():
        padded, _ = attention_forward(
            None, q4.to(device, dt), k4.to(device, dt), v4.to(device, dt), mask.to(device), scaling=dim**-0.5
        )
    padded = padded.float().cpu()
    rows = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
    errors["padded_out"] = float((rows - ref[0]).norm() / ref[0].norm())
    errors["finite"] = all(bool(torch.isfinite(g).all()) for g in got)
    return errors
