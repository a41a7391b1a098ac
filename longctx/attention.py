"""S²-Attn (shifted sparse attention, LongLoRA) and its dense causal sibling, selected through transformers' registry.

The normative definition is in DESIGN.md: head h is shifted iff h >= H/2 (offset s_h = G/2, else 0); a token with
position id t lies in group floor((t + s_h) / G); token i attends to token j iff j <= i, both lie in the same group
for head h and (when documents are isolated) in the same segment. Nothing wraps around.

Both head halves reduce to one primitive: "causal attention among tokens that share a key", where the key of a token
is (segment, group). Two ways to compute it with PyTorch SDPA, neither building an N×N mask:

- plain positions (0..N-1, one segment): groups are fixed windows of the sequence, so the tokens are reshaped into
  (B * num_groups, heads, G, D) and SDPA runs causal inside each window (shifted heads: a half window first);
- anything else (per-sample positions restarting at document starts, segments, padding): the tokens are sorted by
  key (stable, so causal order survives; a no-op when equal keys are already contiguous, the packed-document case),
  cut into blocks of C tokens with C the longest run of one key, and each block attends to itself and the block
  before it through a (C, 2C) mask of "same key and causal". Memory O(N·C) with C <= G for real inputs.

With flash-attn installed on CUDA, the second form runs as one `flash_attn_varlen_func` call over the runs
(cu_seqlens from the run boundaries), which is the same function without the padding of blocks.

`register()` makes the function available as `attn_implementation="s2attn"`; `configure()` stores the group size on
the model config (`config.s2attn`). That attribute is saved into config.json by `save_pretrained`; it is a plain
dict that plain transformers ignores, so exported models load anywhere. In eval mode and during cached decoding the
registered function computes dense causal attention.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from longctx.errors import UserError

Backend = Literal["auto", "sdpa", "flash"]

# Key given to padding slots added at the end of the last block; real keys are >= 0.
_END_PAD_KEY = -1
# Key of the slots before the first block (the "previous block" of block 0); never equal to any other key.
_FRONT_PAD_KEY = -2


# ----------------------------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------------------------


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    *,
    position_ids: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Shifted sparse attention exactly as DESIGN.md defines it; returns (B, H, N, D) in q's dtype.

    q: (B, H, N, D); k, v: (B, Hkv, N, D) with H divisible by Hkv (query head h reads kv head h // (H / Hkv)).
    position_ids: (B, N) or (1, N), the t of each token (default 0..N-1). segment_ids: (B, N); when given, tokens
    attend only within their own segment (see `segment_ids_from_position_ids` for packed documents).
    """
    batch, num_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if group_size < 2 or group_size % 2:
        raise UserError(f"S²-Attn group size {group_size} must be even and >= 2: pick an even attention.group_size")
    if num_heads % 2:
        raise UserError(f"S²-Attn shifts half of the heads but there are {num_heads} heads: use an even head count")
    if num_heads % num_kv_heads or k.shape != v.shape or k.shape[0] != batch or k.shape[2] != seq_len:
        raise UserError(
            f"S²-Attn got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
            "k and v must be (B, Hkv, N, D) with the q's B and N and Hkv dividing H"
        )
    scale = head_dim**-0.5 if scale is None else scale
    backend = resolve_backend(backend, q)
    if position_ids is not None:
        position_ids = position_ids.expand(batch, seq_len)
    plain = segment_ids is None and (position_ids is None or _is_arange(position_ids))
    half = num_heads // 2
    outputs = []
    for first_head, offset in ((0, 0), (half, group_size // 2)):
        q_half = q[:, first_head : first_head + half]
        k_half, v_half = _kv_for_heads(k, v, num_heads, first_head, half)
        if plain and backend == "sdpa":
            outputs.append(_sdpa_in_fixed_groups(q_half, k_half, v_half, group_size, offset, scale, dropout))
            continue
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=q.device).expand(batch, seq_len)
        keys = _group_keys(position_ids, segment_ids, group_size, offset)
        outputs.append(_attend_by_keys(q_half, k_half, v_half, keys, scale, dropout, backend))
    return torch.cat(outputs, dim=1).to(q.dtype)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Dense causal attention with the same segment rule as `s2_attention`; shapes as there."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    if segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
    seq_len = q.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, N, N)
    mask = (same_segment & causal)[:, None]  # (B, 1, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def segment_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index per token of packed sequences: a new segment wherever the position is 0 or does not go up by 1.

    (B, N) -> (B, N) int64 counting from 0 in each row. This is how packed documents reach the model: position ids
    restarting at 0 at each document start, as with Hugging Face's packed flash attention.
    """
    starts = torch.zeros_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = (position_ids[:, 1:] == 0) | (position_ids[:, 1:] - position_ids[:, :-1] != 1)
    return starts.long().cumsum(dim=-1)


def resolve_backend(backend: Backend, q: torch.Tensor) -> Literal["sdpa", "flash"]:
    """auto: flash-attn varlen on CUDA when importable and the dtype is half precision, PyTorch SDPA otherwise."""
    if backend == "sdpa":
        return "sdpa"
    flash_usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None
    if backend == "flash":
        if not flash_usable:
            raise UserError(
                "attention.backend=flash needs the flash-attn package, a CUDA device and bf16/fp16: "
                "install longctx[flash] on a GPU machine or set attention.backend=auto"
            )
        return "flash"
    return "flash" if flash_usable else "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def _is_arange(position_ids: torch.Tensor) -> bool:
    expected = torch.arange(position_ids.shape[-1], device=position_ids.device)
    return bool((position_ids == expected).all())  # host sync: picks the code path


def _kv_for_heads(
    k: torch.Tensor, v: torch.Tensor, num_heads: int, first_head: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kv heads read by query heads [first_head, first_head + count), shaped so that GQA maps them right.

    With an even number of kv heads (or one) each half of the query heads reads its own kv heads uniformly, so a
    slice suffices and kv stays un-repeated. With an odd count > 1 one kv head serves both halves unevenly; those
    rare layouts get kv repeated to one head per query head.
    """
    num_kv_heads = k.shape[1]
    if num_kv_heads == 1:
        return k, v
    heads_per_kv = num_heads // num_kv_heads
    if num_kv_heads % 2 == 0:
        first_kv, num_kv = first_head // heads_per_kv, count // heads_per_kv
        return k[:, first_kv : first_kv + num_kv], v[:, first_kv : first_kv + num_kv]
    kv_index = torch.arange(first_head, first_head + count, device=k.device) // heads_per_kv
    return k[:, kv_index], v[:, kv_index]


def _sdpa(q, k, v, *, scale, dropout, is_causal=False, mask=None):
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def _sdpa_in_fixed_groups(q, k, v, group_size: int, offset: int, scale: float, dropout: float) -> torch.Tensor:
    """Causal attention inside windows [offset + m·G, offset + (m+1)·G), plus [0, offset) first; positions 0..N-1."""
    seq_len = q.shape[2]
    parts = []
    head = min(offset, seq_len)
    if head:  # the half group at the start of shifted heads
        parts.append(
            _sdpa(q[:, :, :head], k[:, :, :head], v[:, :, :head], scale=scale, dropout=dropout, is_causal=True)
        )
    if seq_len > head:
        parts.append(_causal_in_windows(q[:, :, head:], k[:, :, head:], v[:, :, head:], group_size, scale, dropout))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _causal_in_windows(q, k, v, window: int, scale: float, dropout: float) -> torch.Tensor:
    """Causal attention within consecutive windows of `window` tokens; the last window may be short.

    The tail is padded at the END of the last window: causal attention keeps every real token away from the padding.
    """
    batch, num_heads, seq_len, head_dim = q.shape
    num_windows = -(-seq_len // window)
    pad = num_windows * window - seq_len

    def windows(x):  # (B, h, N, D) -> (B * num_windows, h, window, D)
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        x = x.view(x.shape[0], x.shape[1], num_windows, window, head_dim).transpose(1, 2)
        return x.reshape(-1, x.shape[2], window, head_dim)

    out = _sdpa(windows(q), windows(k), windows(v), scale=scale, dropout=dropout, is_causal=True)
    out = out.view(batch, num_windows, num_heads, window, head_dim).transpose(1, 2)  # (B, h, num_windows, window, D)
    return out.reshape(batch, num_heads, num_windows * window, head_dim)[:, :, :seq_len]


def _group_keys(position_ids: torch.Tensor, segment_ids: torch.Tensor | None, group_size: int, offset: int):
    """(B, N) int64 key per token: tokens attend to each other (causally) iff their keys are equal."""
    groups = torch.div(position_ids + offset, group_size, rounding_mode="floor")
    if segment_ids is None:
        return groups - groups.amin(dim=-1, keepdim=True)
    pairs = torch.stack([segment_ids.expand_as(groups), groups], dim=-1).view(-1, 2)
    _, keys = torch.unique(pairs, dim=0, return_inverse=True)
    return keys.view(groups.shape)


def _attend_by_keys(q, k, v, keys: torch.Tensor, scale: float, dropout: float, backend: str) -> torch.Tensor:
    """Causal attention among tokens with equal keys. q: (B, h, N, D), k/v: (B, hkv, N, D), keys: (B, N) >= 0."""
    batch, _, seq_len, _ = q.shape
    # A stable sort keeps index order among equal keys, so "j <= i" survives; packed inputs are already sorted.
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    permuted = not bool((order == torch.arange(seq_len, device=q.device)).all())  # host sync: picks the code path
    if permuted:
        q, k, v = (_take_tokens(x, order) for x in (q, k, v))
    run_starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    run_starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    run_index = run_starts.view(-1).long().cumsum(0) - 1  # runs numbered across the whole batch
    run_lengths = torch.bincount(run_index)
    longest_run = int(run_lengths.max())  # host sync: sizes the blocks
    if backend == "flash":
        out = _flash_varlen_runs(q, k, v, run_lengths, longest_run, scale, dropout)
    else:
        out = _sdpa_banded(q, k, v, sorted_keys, longest_run, scale, dropout)
    if permuted:
        out = _take_tokens(out, torch.argsort(order, dim=-1))
    return out


def _take_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x[b, :, order[b, i]] for every b, i: (B, h, N, D) reordered along N."""
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _sdpa_banded(q, k, v, keys: torch.Tensor, block: int, scale: float, dropout: float) -> torch.Tensor:
    """Causal same-key attention when equal keys are contiguous runs of at most `block` tokens.

    Any token a query may see lies within `block` tokens before it, so query block m attends to key blocks m-1 and m
    under a (block, 2·block) mask: memory O(N · block), never N×N.
    """
    batch, num_heads, seq_len, head_dim = q.shape
    num_blocks = -(-seq_len // block)
    end_pad = num_blocks * block - seq_len

    def query_blocks(x):  # (B, h, N, D) -> (B * num_blocks, h, block, D)
        x = F.pad(x, (0, 0, 0, end_pad))
        x = x.view(batch, x.shape[1], num_blocks, block, head_dim).transpose(1, 2)
        return x.reshape(batch * num_blocks, x.shape[2], block, head_dim)

    def key_bands(x):  # (B, hkv, N, D) -> (B * num_blocks, hkv, 2 * block, D): previous block then own block
        x = F.pad(x, (0, 0, block, end_pad))
        x = x.view(batch, x.shape[1], num_blocks + 1, block, head_dim).transpose(1, 2)
        return torch.cat([x[:, :-1], x[:, 1:]], dim=3).reshape(batch * num_blocks, x.shape[2], 2 * block, head_dim)

    padded_keys = F.pad(keys, (block, end_pad), value=_END_PAD_KEY)
    padded_keys[:, :block] = _FRONT_PAD_KEY
    key_blocks = padded_keys.view(batch, num_blocks + 1, block)
    query_keys = key_blocks[:, 1:]  # (B, num_blocks, block)
    band_keys = torch.cat([key_blocks[:, :-1], key_blocks[:, 1:]], dim=2)  # (B, num_blocks, 2 * block)
    # In band coordinates query i sits at block + i, so "j <= i" is j <= i + block.
    causal = torch.ones(block, 2 * block, dtype=torch.bool, device=q.device).tril(diagonal=block)
    mask = (query_keys[..., :, None] == band_keys[..., None, :]) & causal  # (B, num_blocks, block, 2 * block)
    mask = mask.view(batch * num_blocks, 1, block, 2 * block)

    out = _sdpa(query_blocks(q), key_bands(k), key_bands(v), scale=scale, dropout=dropout, mask=mask)
    out = out.view(batch, num_blocks, num_heads, block, head_dim).transpose(1, 2)  # (B, h, num_blocks, block, D)
    return out.reshape(batch, num_heads, num_blocks * block, head_dim)[:, :, :seq_len]


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_varlen_runs(q, k, v, run_lengths: torch.Tensor, longest_run: int, scale: float, dropout: float):
    """flash-attn varlen over the runs of equal keys (each run one causal sequence). GPU only."""
    batch, num_heads, seq_len, head_dim = q.shape
    cu_seqlens = F.pad(run_lengths.cumsum(0), (1, 0)).to(torch.int32)

    def tokens(x):  # (B, h, N, D) -> (B * N, h, D)
        return x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], head_dim)

    out = _flash_varlen()(
        tokens(q),
        tokens(k),
        tokens(v),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=longest_run,
        max_seqlen_k=longest_run,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
    )
    return out.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------------------------

_CONFIG_ATTRIBUTE = "s2attn"


def configure(model_or_config, *, group_size: int | None = None, group_size_ratio: float = 0.25, backend="auto"):
    """Store the S²-Attn settings on the model config, where the registered attention function reads them.

    group_size: a fixed G (even); None: G = group_size_ratio × N for each sequence length N, rounded to an even
    number >= 2. The settings live in `config.s2attn` (a plain dict, saved into config.json and ignored by plain
    transformers).
    """
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise UserError(f"S²-Attn group_size={group_size} must be even and >= 2: pick an even group size")
    if not 0 < group_size_ratio <= 1:
        raise UserError(f"S²-Attn group_size_ratio={group_size_ratio} must be in (0, 1], e.g. 0.25")
    if backend not in ("auto", "sdpa", "flash"):
        raise UserError(f"S²-Attn backend={backend!r} is unknown: use auto, sdpa or flash")
    config = getattr(model_or_config, "config", model_or_config)
    settings = {"group_size": group_size, "group_size_ratio": group_size_ratio, "backend": backend}
    for target in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        setattr(target, _CONFIG_ATTRIBUTE, dict(settings))


def group_size_for(config, seq_len: int) -> int:
    """The G the registered function uses for sequences of seq_len tokens under `config`."""
    settings = getattr(config, _CONFIG_ATTRIBUTE, None) or {}
    if settings.get("group_size"):
        return settings["group_size"]
    ratio = settings.get("group_size_ratio", 0.25)
    return max(2, 2 * round(ratio * seq_len / 2))


def register(name: str = "s2attn") -> str:
    """Register S²-Attn (and its mask function) with transformers under `name`; idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, s2attn_forward)
    AttentionMaskInterface.register(name, s2attn_mask)
    return name


def s2attn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for transformers: the (B, kv_length) bool padding mask, or None when nothing is padded.

    Causality, groups and packed documents (position ids restarting) are applied inside `s2attn_forward` from the
    position ids, so no N×N mask is ever built here.
    """
    if attention_mask is None:
        return None
    if (missing := kv_offset + kv_length - attention_mask.shape[-1]) > 0:
        attention_mask = F.pad(attention_mask, (0, missing), value=True)
    attention_mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(attention_mask.all()) else attention_mask  # host sync, once per forward


def s2attn_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: S²-Attn while training, dense causal attention in eval and cached decoding.

    query (B, H, Nq, D), key/value (B, Hkv, Nk, D); returns (B, Nq, H, D). Packed documents (position ids restarting
    at 0) are isolated from each other, and padding (a 2D mask from `s2attn_mask`) is never attended to.
    """
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if sliding_window is not None and kv_len > sliding_window:
        raise UserError(
            f"the model has a sliding window of {sliding_window} tokens, shorter than the sequence ({kv_len}), "
            "which s2attn does not implement: set the model config's sliding_window to null or use "
            "attention.implementation=sdpa"
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        if module.training and q_len == kv_len:
            raise UserError("s2attn got a prepared 4D attention mask: pass a 2D padding mask (or none) instead")
        out = _sdpa(query, key, value, scale=scaling, dropout=dropout, mask=attention_mask)
        return out.transpose(1, 2), None
    if q_len != kv_len:  # cached decoding: the queries are the last q_len tokens
        out = _dense_decoding(query, key, value, attention_mask, scaling, dropout)
        return out.transpose(1, 2), None

    if position_ids is None:
        position_ids = torch.arange(q_len, device=query.device)[None]
    position_ids = position_ids.expand(batch, q_len)
    segment_ids = segment_ids_from_position_ids(position_ids)
    if attention_mask is not None:
        segment_ids = torch.where(attention_mask, segment_ids, -1)  # padding: its own segment, seen by no token
    elif not bool(segment_ids[:, -1].any()):  # host sync: one document per row, no isolation needed
        segment_ids = None

    if not module.training:
        out = dense_attention(query, key, value, segment_ids=segment_ids, scale=scaling, dropout=dropout)
    else:
        settings = getattr(module.config, _CONFIG_ATTRIBUTE, None) or {}
        out = s2_attention(
            query,
            key,
            value,
            group_size_for(module.config, q_len),
            position_ids=position_ids,
            segment_ids=segment_ids,
            scale=scaling,
            dropout=dropout,
            backend=settings.get("backend", "auto"),
        )
    return out.transpose(1, 2), None


def _dense_decoding(query, key, value, padding_mask, scale, dropout):
    """Dense attention of the last q_len tokens over all kv_len tokens (KV cache), honoring a padding mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(diagonal=kv_len - q_len)
    mask = visible[None, None] if padding_mask is None else visible[None, None] & padding_mask[:, None, None, :]
    return _sdpa(query, key, value, scale=scale, dropout=dropout, mask=mask)


__all__ = [
    "configure",
    "dense_attention",
    "group_size_for",
    "register",
    "resolve_backend",
    "s2_attention",
    "s2attn_forward",
    "s2attn_mask",
    "segment_ids_from_position_ids",
]
