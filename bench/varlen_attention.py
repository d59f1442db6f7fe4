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
On CPU (the `--tiny` run) varlen_attn does not exist; a per-sequence SDPA loop computes the same
thing so the boundary logic is tested there too.
"""

from __future__ import annotations

import inspect
import itertools
import random
import weakref

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available() -> str | None:
    """None when the CUDA varlen kernel can be used here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.9)"
    return None


def _varlen_cuda(q, k, v, cu, max_len, scale):
    varlen_attn = _torch_varlen()
    accepted = inspect.signature(varlen_attn).parameters
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


def _varlen_reference(q, k, v, cu, max_len, scale):
    """The same function, one SDPA call per sequence: slow, exact, and runs anywhere."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
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
    if q.is_cuda and _torch_varlen() is not None:
        return _varlen_cuda(q, k, v, cu, max_len, scale)
    return _varlen_reference(q, k, v, cu, max_len, scale)


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

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        # Padding-free: TRL's collator computed the boundaries on the CPU, so no device sync here.
        cu = cu.to(device=query.device, dtype=torch.int32)
        out = varlen(flat(query), flat(key), flat(value), cu, int(kwargs["max_length_q"]), scale)
        return out.reshape(batch, length, heads, dim), None

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
        inputs = [t.to(dev, dt).requires_grad_(True) for t in tensors]
        out = fn(*inputs, cu.to(dev), max(lengths), dim**-0.5)
        out.backward(grad_out.to(dev, dt))
        return [out.detach().float().cpu()] + [t.grad.float().cpu() for t in inputs]

    ref = run(_varlen_reference, base, "cpu", torch.float32)
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
