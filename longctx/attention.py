"""S²-Attn (shifted sparse attention, LongLoRA) and its dense causal sibling, selected through transformers' registry.

The normative definition is docs/s2attn.md: of H heads, head h is shifted iff h >= floor(H/2) (offset s_h = G/2, else
0); a token with position id t lies in group floor((t + s_h) / G); token i attends to token j iff j <= i, both lie in
the same group for head h and (when documents are isolated) in the same segment. Nothing wraps around.

How it is computed. The heads fall into head *blocks* of equal size, each with one group offset: two blocks (the
halves) when the unshifted and shifted heads are equally many, otherwise one block per offset, each computed in its
own pass (an odd H: 9 heads are a pass over heads 0..3 and one over heads 4..8). Each (sample, head block) is a row
of N tokens with a key per token, key = (segment, group); the definition is "causal attention among tokens that
share a key". Sorting a row by key (stable, so index order and thus causality survive among equal keys; a no-op for
plain or packed positions, where equal keys are already contiguous) turns every key into one contiguous *run* of
tokens. Then:

- SDPA backend: every run gets its own window, its length rounded up to one of at most 16 sizes (multiples of
  longest_run / 16), padding after the run. Windows of one size, across all samples and head blocks of a pass, are
  ONE SDPA call of shape (windows, block heads, size, D) with `is_causal`, exact because padding only follows real
  tokens: no mask at all, memory O(N·G), never N×N. Plain positions give full groups, the shifted heads' half groups
  and the tails, so at most three calls per pass and no padding but the tails'.
- flash backend (flash-attn installed, CUDA, half precision): the runs are the sequences of one
  `flash_attn_varlen_func` call per pass, cu_seqlens from the run lengths; no padding at all.
- plain positions on the CPU (0..N-1 in every row, no segments, no dropout): no layout and no buffer. Every run is a
  contiguous span, so CPU flash attention (the kernel SDPA runs) reads the windows in place and writes into one
  output, and its backward into one dq, dk, dv (`_InPlaceWindows`): what the backward keeps is dense attention's.

Tokens move between (B, N, H, D) and the window buffer by one index_copy / index_select each way, so autograd adds
no full-size zero fills per slice. Key/value heads are repeated only where a block of query heads reads kv heads
unevenly (an odd split, e.g. 9 heads over 3 kv heads, where kv head 1 serves heads 3 | 4, 5 across the two passes).

The layout (segment ids, keys, sort, runs, windows) depends only on the position ids, the padding mask, G, the
blocks' offsets, the backend and (B, N), and building it takes several host-device syncs. So it is built once per
forward pass (per offset pattern) and cached under the position-ids tensor that transformers hands to every layer
(`layout_key`; activation checkpointing's recompute gets the same tensor): the other layers and the recompute only
look it up. An entry lives as long as that tensor and is dropped when the tensor is changed in place.

`register()` makes the function available as `attn_implementation="s2attn"`; `configure()` stores the group size on
the model config (`config.s2attn`). The attribute is kept: `save_pretrained` writes it into config.json as a plain
dict that plain transformers ignores, so such a model loads anywhere (`longctx export` rebuilds the model with dense
attention, so its exports do not carry it at all). In eval mode and during cached decoding the registered function
computes dense causal attention.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F

from longctx.errors import UserError

Backend = Literal["auto", "sdpa", "flash"]

# SDPA windows come in at most this many sizes: a run of length L sits in a window of L rounded up to a multiple of
# longest_run / _WINDOW_SIZE_CLASSES, so padding adds at most ~1/16 of the longest run to any window.
_WINDOW_SIZE_CLASSES = 16


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
    num_unshifted_heads: int | None = None,
    layout_key: torch.Tensor | None = None,
    sink_tokens: int = 0,
    num_dense_heads: int = 0,
) -> torch.Tensor:
    """Shifted sparse attention exactly as docs/s2attn.md defines it; returns (B, H, N, D) in q's dtype.

    q: (B, H, N, D); k, v: (B, Hkv, N, D) with H divisible by Hkv (query head h reads kv head h // (H / Hkv)).
    position_ids: (B, N) or (1, N), the t of each token (default 0..N-1). segment_ids: (B, N); when given, tokens
    attend only within their own segment (see `segment_ids_from_position_ids` for packed documents).
    num_unshifted_heads: for a contiguous slice of a model's heads (sequence parallelism hands each rank one): how
    many of them, from the first, lie below the model's floor(H/2), i.e. are unshifted; any count from 0 to the
    slice's H. Default floor(H/2): these are all of the model's heads.
    layout_key: a tensor that stands for position_ids: while it is alive and unchanged, calls with the same G, head
    split, backend, shape and segment_ids tensor reuse one layout instead of building it (one per forward pass).
    sink_tokens (the "sinks" variant, docs/s2attn.md): k; in grouped heads every token also attends to the first k
    tokens of its segment that come before its group. 0: plain S²-Attn. At most G/2; computed by SDPA.
    num_dense_heads (the "dense heads" variant): the last this many heads of q attend densely (causal, segments
    kept apart, no groups). 0: plain S²-Attn. With num_unshifted_heads None the model's split is assumed: the
    unshifted heads are the first min(floor(H/2), H - num_dense_heads).
    """
    batch, num_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if group_size < 2 or group_size % 2:
        raise UserError(f"S²-Attn group size {group_size} must be even and >= 2: pick an even attention.group_size")
    if not 0 <= num_dense_heads <= num_heads:
        raise UserError(
            f"S²-Attn got {num_dense_heads} dense of {num_heads} heads: set attention.dense_heads between 0 and "
            "the number of heads"
        )
    if not 0 <= sink_tokens <= group_size // 2:
        raise UserError(
            f"S²-Attn sink_tokens={sink_tokens} must be between 0 and G/2 = {group_size // 2}: set "
            "attention.sink_tokens to at most half the group size"
        )
    if num_unshifted_heads is None:
        num_unshifted_heads = min(num_heads // 2, num_heads - num_dense_heads)
    if not 0 <= num_unshifted_heads <= num_heads - num_dense_heads:
        raise UserError(
            f"S²-Attn got {num_unshifted_heads} unshifted of {num_heads} heads ({num_dense_heads} dense): pass "
            "num_unshifted_heads between 0 and the number of heads that are not dense"
        )
    if num_heads % num_kv_heads or k.shape != v.shape or k.shape[0] != batch or k.shape[2] != seq_len:
        raise UserError(
            f"S²-Attn got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
            "k and v must be (B, Hkv, N, D) with the q's B and N and Hkv dividing H"
        )
    scale = head_dim**-0.5 if scale is None else scale
    if sink_tokens and backend == "flash":
        raise UserError("attention.sink_tokens is computed by PyTorch SDPA: set attention.backend=auto or sdpa")
    backend = "sdpa" if sink_tokens else resolve_backend(backend, q)
    heads_per_kv = num_heads // num_kv_heads
    passes = _head_passes(num_heads, num_unshifted_heads, group_size, num_dense_heads, seq_len)
    if _in_place_usable(q, k, v, backend, dropout, segment_ids, position_ids):
        plan = _in_place_plan(tuple(passes), seq_len, sink_tokens, heads_per_kv)
        return _InPlaceWindows.apply(q, k, v, plan, scale).transpose(1, 2)

    q_tokens = q.transpose(1, 2)  # (B, N, H, D): the order index_copy/select work in
    # split, not slicing: its backward is one cat instead of a zero-filled q per pass
    q_pieces = q_tokens.split([n for n, _ in passes], dim=2) if len(passes) > 1 else [q_tokens]
    outputs, first_head = [], 0
    for (num_pass_heads, blocks), q_piece in zip(passes, q_pieces, strict=True):
        # dense heads (one block whose group holds every position) see their whole segment: sinks add nothing there
        sinks = 0 if blocks[0][0] > 2 * seq_len else sink_tokens
        # Whether positions were given is part of the key: dense attention passes none under the key that the
        # S²-Attn path of the same forward passes them under.
        parts = ("s2", blocks, sinks, backend, batch, seq_len, q.device, position_ids is None)
        layout = _cached(
            layout_key,
            parts,
            (segment_ids,),
            lambda blocks=blocks, sinks=sinks: _build_layout(
                position_ids, segment_ids, blocks, (batch, seq_len), q.device, backend, sinks
            ),
        )
        num_blocks = len(blocks)
        block_heads = num_pass_heads // num_blocks
        # (B, N, heads of the pass, D) -> rows of (block heads, D), one per (sample, token, head block)
        q_rows = q_piece.reshape(batch * seq_len * num_blocks, block_heads, head_dim)
        k_rows, v_rows = (_kv_rows(x, first_head, num_blocks, block_heads, heads_per_kv) for x in (k, v))
        if backend == "flash":
            out_rows = _flash_over_runs(q_rows, k_rows, v_rows, layout, scale, dropout)
        else:
            out_rows = _sdpa_over_windows(q_rows, k_rows, v_rows, layout, scale, dropout)
        outputs.append(out_rows.view(batch, seq_len, num_pass_heads, head_dim))
        first_head += num_pass_heads
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, N, H, D)
    return out.transpose(1, 2).to(q.dtype)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    layout_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal attention with the same segment rule as `s2_attention`; shapes and layout_key as there."""
    if segment_ids is None:
        return _sdpa(q, k, v, scale=scale, dropout=dropout, is_causal=True)
    # With G > 2N every position lies in group 0, so S²-Attn's runs with all heads unshifted (one head block, one
    # pass) are exactly the segments: causal attention within each document without an N×N mask, for any H.
    seq_len, num_heads = q.shape[2], q.shape[1]
    return s2_attention(
        q,
        k,
        v,
        2 * seq_len + 2,
        segment_ids=segment_ids,
        scale=scale,
        dropout=dropout,
        num_unshifted_heads=num_heads,
        layout_key=layout_key,
    )


def segment_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index per token of packed sequences: a new segment wherever the position is 0 or does not go up by 1.

    (B, N) -> (B, N) int64 counting from 0 in each row. This is how packed documents reach the model: position ids
    restarting at 0 at each document start, as with Hugging Face's packed flash attention.
    """
    starts = torch.zeros_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = (position_ids[:, 1:] == 0) | (position_ids[:, 1:] - position_ids[:, :-1] != 1)
    return starts.long().cumsum(dim=-1)


def document_segment_ids(
    position_ids: torch.Tensor, padding_mask: torch.Tensor | None = None, *, layout_key: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The segment ids that keep packed documents and padding apart, or None when nothing needs isolating.

    position_ids (B, N), restarting at each document start; padding_mask (B, N) bool, False at padding, which
    becomes a segment of its own that no token sees. None: one document per row and no padding. Derived once per
    forward pass under layout_key (see `s2_attention`).
    """

    def derive() -> torch.Tensor | None:
        segment_ids = segment_ids_from_position_ids(position_ids)
        if padding_mask is not None:
            return torch.where(padding_mask, segment_ids, -1)
        if not bool(segment_ids[:, -1].any()):  # host sync: one document per row needs no isolation
            return None
        return segment_ids

    return _cached(layout_key, ("segments", *position_ids.shape, position_ids.device), (padding_mask,), derive)


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


def _head_passes(
    num_heads: int, num_unshifted_heads: int, group_size: int, num_dense_heads: int = 0, seq_len: int = 0
) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """How the heads are computed: (heads of the pass, (group size, group offset) of each of its equal head blocks)
    per pass, the passes covering heads 0..H-1 in order: the first num_unshifted_heads heads get (G, 0), the last
    num_dense_heads heads one group over every position ((2N + 2, 0), as `dense_attention`), the others (G, G/2).

    As many unshifted as shifted heads (an even H): one pass of two blocks, so each window size is one kernel call for
    all of them. Otherwise (an odd H, or a sequence-parallel slice on one side of floor(H/2) or straddling it unevenly)
    one pass of one block per offset present. Dense heads are a pass of their own.
    """
    num_shifted_heads = num_heads - num_dense_heads - num_unshifted_heads
    unshifted, shifted = (group_size, 0), (group_size, group_size // 2)
    if num_unshifted_heads == num_shifted_heads and num_shifted_heads:
        passes = [(2 * num_shifted_heads, (unshifted, shifted))]
    else:
        passes = [(n, (block,)) for n, block in ((num_unshifted_heads, unshifted), (num_shifted_heads, shifted)) if n]
    if num_dense_heads:
        passes.append((num_dense_heads, ((2 * seq_len + 2, 0),)))
    return passes


def _build_layout(
    position_ids: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    blocks: tuple[tuple[int, int], ...],
    shape: tuple[int, int],
    device: torch.device,
    backend: Literal["sdpa", "flash"],
    sink_tokens: int = 0,
) -> _RunLayout:
    """The run layout of (B, N) = shape tokens for each head block, the blocks' (group size, offset) given: all of
    S²-Attn's host syncs happen here, once per forward pass."""
    batch, seq_len = shape
    if position_ids is not None:
        position_ids = position_ids.expand(batch, seq_len)
    plain = segment_ids is None and (position_ids is None or _is_arange(position_ids))
    if position_ids is None or plain:
        position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
    # (B, blocks, N): one row of groups per head block; Python numbers, not a tensor, to copy nothing to the device
    groups = torch.stack([torch.div(position_ids + offset, size, rounding_mode="floor") for size, offset in blocks], 1)
    sinks = _SinkSource(segment_ids, sink_tokens, shape, device) if sink_tokens else None
    if plain:  # groups already increase along each row: every key is one run
        return _run_layout(groups, None, pack=backend == "sdpa", sinks=sinks)
    keys = _keys_with_segments(groups, segment_ids)
    # A stable sort keeps index order among equal keys, so "j <= i" survives the reordering.
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    return _run_layout(sorted_keys, order, pack=backend == "sdpa", sinks=sinks)


def _is_arange(position_ids: torch.Tensor) -> bool:
    expected = torch.arange(position_ids.shape[-1], device=position_ids.device)
    return bool((position_ids == expected).all())  # host sync: picks the code path


def _keys_with_segments(groups: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, blocks, N) key per token and head block: equal keys <=> same group (and same segment when given)."""
    if segment_ids is None:
        return groups
    # key = segment rank * (group span) + group: one integer per (segment, group) pair, without a row-wise unique.
    # host sync: unique sizes its output; any labels (padding is -1) -> 0, 1, ...
    _, segment_rank = torch.unique(segment_ids, return_inverse=True)
    groups = groups - groups.amin()
    return segment_rank[:, None, :] * (groups.amax() + 1) + groups


def _kv_rows(x: torch.Tensor, first_head: int, num_blocks: int, block_heads: int, heads_per_kv: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B * N * num_blocks, kv heads per block, D): the kv heads that each block of block_heads
    query heads, from head first_head on, reads; query head i of a block reads the block's kv head i // (its query
    heads per kv head), as SDPA's and flash-attn's grouped-query attention do.

    kv stays un-repeated (one copy, by the reshape) when the blocks read consecutive kv heads each, and is expanded
    from one head when all blocks read that one; only blocks that read kv heads unevenly (e.g. heads 0..3 of 9 over 3
    kv heads: kv head 0 three times, kv head 1 once) get a kv head per query head.
    """
    batch, _, seq_len, head_dim = x.shape
    kv_heads = _kv_heads_of_blocks(first_head, num_blocks, block_heads, heads_per_kv)
    first = kv_heads[0]
    x = x.transpose(1, 2)  # (B, N, Hkv, D)
    if kv_heads == tuple(range(first, first + len(kv_heads))):
        x = x[:, :, first : first + len(kv_heads)]
    elif len(set(kv_heads)) == 1:
        x = x[:, :, first : first + 1].expand(batch, seq_len, len(kv_heads), head_dim)
    else:
        # The same indices as kv_heads, made on the device: a tensor from a Python list would be a host-device copy.
        step = num_blocks * block_heads // len(kv_heads)
        index = torch.arange(first_head, first_head + num_blocks * block_heads, step, device=x.device) // heads_per_kv
        x = x.index_select(2, index)
    return x.reshape(batch * seq_len * num_blocks, len(kv_heads) // num_blocks, head_dim)


@functools.cache
def _kv_heads_of_blocks(first_head: int, num_blocks: int, block_heads: int, heads_per_kv: int) -> tuple[int, ...]:
    """The kv head of each kv row the blocks need, block after block: the fewest rows such that query head i of a
    block reads the block's row i // r for one r dividing block_heads (1: a row per query head always works)."""
    kv_of_head = [(first_head + head) // heads_per_kv for head in range(num_blocks * block_heads)]

    def fits(heads_per_row: int) -> bool:  # each run of heads_per_row query heads reads one kv head
        return all(kv == kv_of_head[head - head % heads_per_row] for head, kv in enumerate(kv_of_head))

    heads_per_row = next(r for r in range(block_heads, 0, -1) if block_heads % r == 0 and fits(r))
    return tuple(kv_of_head[::heads_per_row])


@dataclass
class _Windows:
    """`count` windows of `prefix + size` slots each: with sinks, `prefix` slots holding the keys and values of the
    sinks the run reads, then the run in `size` slots (padding after it)."""

    count: int
    size: int
    prefix: int = 0

    @property
    def width(self) -> int:
        return self.prefix + self.size


class _SinkSource:
    """Where the sinks come from: each token's segment (numbered over the batch) and each segment's first k tokens.

    segment_of_token: (B * N,) the segment of token b * N + t; first_tokens: (segments, k) the flat indices b * N + t
    of each segment's first k tokens in index order, -1 past a segment's end. No segment ids: one segment per row.
    """

    def __init__(
        self, segment_ids: torch.Tensor | None, sink_tokens: int, shape: tuple[int, int], device: torch.device
    ) -> None:
        batch, seq_len = shape
        if segment_ids is None:
            segment = torch.arange(batch, device=device).repeat_interleave(seq_len)
        else:
            labels = segment_ids.expand(batch, seq_len)
            labels = labels - labels.amin()
            sample = torch.arange(batch, device=device)[:, None]
            # host sync: unique sizes its output; (sample, label) pairs -> 0, 1, ...
            _, segment = torch.unique((sample * (labels.amax() + 1) + labels).reshape(-1), return_inverse=True)
        order = torch.argsort(segment, stable=True)  # tokens segment by segment, index order within each
        counts = torch.bincount(segment)  # host sync: bincount sizes its output
        starts = counts.cumsum(0) - counts
        in_order = segment[order]
        rank = torch.arange(len(order), device=device) - starts[in_order]
        first = torch.full((len(counts), sink_tokens), -1, dtype=torch.long, device=device)
        keep = rank < sink_tokens
        first[in_order[keep], rank[keep]] = order[keep]
        self.segment_of_token, self.first_tokens = segment, first

    def prefixes(self, first_token: torch.Tensor, block: torch.Tensor, num_blocks: int):
        """For runs starting at flat token first_token (R,) in head block `block` (R,): how many sinks each reads
        (the segment's first k tokens that come before the run: the rest, if any, are in the run or after it) and
        their rows (R, k) in (sample, token, block) row order, valid up to that count."""
        candidates = self.first_tokens[self.segment_of_token[first_token]]
        valid = (candidates >= 0) & (candidates < first_token[:, None])  # a prefix of each row: indices increase
        return valid.sum(1), candidates.clamp(min=0) * num_blocks + block[:, None]


@dataclass
class _RunLayout:
    """Where each (sample, token, head block) row goes in the buffer the kernel reads, and how runs are delimited."""

    slot_of_row: torch.Tensor  # (B * N * blocks,) buffer slot of each row, rows in (sample, token, block) order
    num_slots: int
    padding_slots: torch.Tensor | None  # slots no row maps to (zeroed), None when there are none
    windows: list[_Windows]  # SDPA: the buffer cut into windows, in buffer order; flash: unused
    cu_seqlens: torch.Tensor | None  # flash: (num_runs + 1,) int32 run boundaries in the buffer; SDPA: None
    longest_run: int
    # sinks: keys and values also go to the windows' sink slots, sink_slots[i] <- row sink_rows[i]; None without sinks
    sink_slots: torch.Tensor | None = None
    sink_rows: torch.Tensor | None = None


def _window_slots(
    run_lengths: torch.Tensor, longest_run: int, prefix_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[_Windows]]:
    """First buffer slot of each run's window, and the windows, when every run gets its own window.

    A run's window is its sink slots (prefix_lengths, with sinks) then its length rounded up to a multiple of
    `step`; runs of one window size and one sink count are adjacent in the buffer (largest size first), so each
    class is one SDPA call over (count, heads, prefix + size, D) with is_causal, exact because padding only follows
    real tokens and the sinks come before every query of the run. With plain positions that is full groups, the half
    groups of shifted heads and the tails: no padding but the tails'.
    """
    step = max(16, -(-longest_run // _WINDOW_SIZE_CLASSES))
    sizes = -(-run_lengths // step) * step
    stride = 1 if prefix_lengths is None else int(prefix_lengths.max()) + 1  # host sync, with sinks only
    classes = sizes * stride + (0 if prefix_lengths is None else prefix_lengths)
    class_keys, class_of_run = torch.unique(classes, return_inverse=True)  # host sync: unique sizes its output
    class_keys, class_of_run = class_keys.flip(0), len(class_keys) - 1 - class_of_run  # largest first
    class_widths = class_keys // stride + class_keys % stride  # window size + sink slots
    counts = torch.bincount(class_of_run, minlength=len(class_keys))  # host sync: bincount sizes its output
    class_first_slot = F.pad((counts * class_widths).cumsum(0), (1, 0))[:-1]
    class_first_run = F.pad(counts.cumsum(0), (1, 0))[:-1]
    by_class = torch.argsort(class_of_run, stable=True)
    rank_in_class = torch.empty_like(by_class)
    rank_in_class[by_class] = (
        torch.arange(len(by_class), device=by_class.device) - class_first_run[class_of_run[by_class]]
    )
    run_window_start = class_first_slot[class_of_run] + rank_in_class * class_widths[class_of_run]
    # host sync: the window shapes are the SDPA calls' shapes
    windows = [_Windows(count, key // stride, key % stride) for count, key in zip(counts.tolist(), class_keys.tolist())]
    return run_window_start, windows


def _run_layout(
    sorted_keys: torch.Tensor, order: torch.Tensor | None, *, pack: bool, sinks: _SinkSource | None = None
) -> _RunLayout:
    """Cut each sorted (sample, head block) row into runs of equal keys and give every token a buffer slot.

    pack=True (SDPA): each run gets a window (see `_window_slots`). pack=False (flash varlen): runs end to end.
    order: (B, blocks, N) token index at each sorted position (None: identity). sinks (SDPA only): each window also
    reads its segment's first tokens that come before its run.
    """
    batch, num_blocks, seq_len = sorted_keys.shape
    device = sorted_keys.device
    num_rows = sorted_keys.numel()
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    starts = starts.view(-1)  # runs never cross a (sample, block) row: each row starts one
    run_id = starts.long().cumsum(0) - 1  # (B * blocks * N,) in sorted order
    run_first = starts.nonzero().squeeze(1)  # host sync: the number of runs
    run_lengths = torch.diff(run_first, append=torch.tensor([num_rows], device=device))

    longest_run = int(run_lengths.max())  # host sync: sizes the windows
    token = torch.arange(seq_len, device=device).expand_as(sorted_keys) if order is None else order
    sample = torch.arange(batch, device=device)[:, None, None]
    block = torch.arange(num_blocks, device=device)[None, :, None]
    row = ((sample * seq_len + token) * num_blocks + block).reshape(-1)  # row of each sorted position
    sink_slots = sink_rows = None
    if pack:
        prefix_lengths = None
        if sinks is not None:  # a run's first sorted position holds its first token (the sort is stable)
            first_row = row[run_first]
            prefix_lengths, prefix_rows = sinks.prefixes(first_row // num_blocks, first_row % num_blocks, num_blocks)
        run_window_start, windows = _window_slots(run_lengths, longest_run, prefix_lengths)
        run_slot_start = run_window_start
        if prefix_lengths is not None:  # each window's first prefix_lengths slots hold its sinks, then the run
            run_slot_start = run_window_start + prefix_lengths
            slot = torch.arange(prefix_rows.shape[1], device=device)
            is_sink = slot < prefix_lengths[:, None]
            sink_slots = (run_window_start[:, None] + slot)[is_sink]  # host sync: boolean indexing sizes its output
            sink_rows = prefix_rows[is_sink]
        num_slots, cu_seqlens = sum(w.count * w.width for w in windows), None
    else:
        run_slot_start, num_slots, windows = run_first, num_rows, []
        cu_seqlens = F.pad(run_lengths.cumsum(0), (1, 0)).to(torch.int32)
    sorted_slot = run_slot_start[run_id] + torch.arange(num_rows, device=device) - run_first[run_id]

    slot_of_row = torch.empty_like(sorted_slot)
    slot_of_row[row] = sorted_slot
    padding_slots = None
    if num_slots > num_rows:
        is_padding = torch.ones(num_slots, dtype=torch.bool, device=device)
        is_padding[sorted_slot] = False
        padding_slots = is_padding.nonzero().squeeze(1)  # host sync: the number of padding slots
    return _RunLayout(slot_of_row, num_slots, padding_slots, windows, cu_seqlens, longest_run, sink_slots, sink_rows)


def _sdpa(q, k, v, *, scale, dropout, is_causal=False, mask=None):
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


class _RowsToSlots(torch.autograd.Function):
    """(rows, h, D) -> (num_slots, h, D) by an injective row -> slot map, padding slots zero; with_sinks (keys and
    values): the sink slots also get their sink rows' copies.

    Written out because autograd's own backward of the inverse (index_select) is a zero fill plus scatter-add, where
    an injective map only needs a gather (plus a small scatter-add of the sink slots' gradients); and only padding
    slots are ever zeroed.
    """

    @staticmethod
    def forward(ctx, rows, layout, with_sinks):
        ctx.layout, ctx.with_sinks = layout, with_sinks and layout.sink_slots is not None
        slots = _scatter_rows(rows, layout)
        if ctx.with_sinks:
            slots.index_copy_(0, layout.sink_slots, rows.index_select(0, layout.sink_rows))
        return slots

    @staticmethod
    def backward(ctx, grad_slots):
        layout = ctx.layout
        grad_rows = grad_slots.index_select(0, layout.slot_of_row)
        if ctx.with_sinks:
            grad_rows.index_add_(0, layout.sink_rows, grad_slots.index_select(0, layout.sink_slots))
        return grad_rows, None, None


class _SlotsToRows(torch.autograd.Function):
    """(num_slots, h, D) -> (rows, h, D): the inverse of `_RowsToSlots`."""

    @staticmethod
    def forward(ctx, slots, layout):
        ctx.layout = layout
        return slots.index_select(0, layout.slot_of_row)

    @staticmethod
    def backward(ctx, grad_rows):
        return _scatter_rows(grad_rows, ctx.layout), None


def _scatter_rows(rows: torch.Tensor, layout: _RunLayout) -> torch.Tensor:
    slots = rows.new_empty(layout.num_slots, *rows.shape[1:]).index_copy_(0, layout.slot_of_row, rows)
    if layout.padding_slots is not None:
        slots.index_fill_(0, layout.padding_slots, 0)
    return slots


def _to_buffer(rows: torch.Tensor, layout: _RunLayout, with_sinks: bool = False) -> torch.Tensor:
    return _RowsToSlots.apply(rows, layout, with_sinks)


def _from_buffer(slots: torch.Tensor, layout: _RunLayout) -> torch.Tensor:
    return _SlotsToRows.apply(slots, layout)


def _sdpa_over_windows(q_rows, k_rows, v_rows, layout: _RunLayout, scale: float, dropout: float) -> torch.Tensor:
    head_dim = q_rows.shape[-1]
    # (num_slots, h, D) each. With sinks, a window's sink slots hold the sinks' keys and values (and zero queries,
    # whose outputs no row reads): causal attention over the window lets every query of the run read all its sinks.
    buffers = [_to_buffer(q_rows, layout), _to_buffer(k_rows, layout, True), _to_buffer(v_rows, layout, True)]
    # split, not slicing: its backward is one cat instead of a zero-filled buffer per slice
    sizes = [windows.count * windows.width for windows in layout.windows]
    pieces = [x.split(sizes) for x in buffers]
    outputs = []
    for index, windows in enumerate(layout.windows):
        # (slots, h, D) -> (count, h, width, D)
        q, k, v = (
            x[index].view(windows.count, windows.width, x[index].shape[1], head_dim).transpose(1, 2) for x in pieces
        )
        out = _sdpa(q, k, v, scale=scale, dropout=dropout, is_causal=True)
        outputs.append(out.transpose(1, 2).reshape(-1, q_rows.shape[1], head_dim))
    return _from_buffer(torch.cat(outputs) if len(outputs) > 1 else outputs[0], layout)


@functools.cache  # a missing flash-attn stays missing: no import retried in every layer
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_over_runs(q_rows, k_rows, v_rows, layout: _RunLayout, scale: float, dropout: float) -> torch.Tensor:
    """flash-attn varlen with each run one causal sequence. GPU only."""
    cu_seqlens = layout.cu_seqlens
    out = _flash_varlen()(
        _to_buffer(q_rows, layout),
        _to_buffer(k_rows, layout),
        _to_buffer(v_rows, layout),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=layout.longest_run,
        max_seqlen_k=layout.longest_run,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
    )
    return _from_buffer(out, layout)


# ----------------------------------------------------------------------------------------------------------------
# Plain positions on the CPU: windows read in place, memory as dense attention's
# ----------------------------------------------------------------------------------------------------------------

# Tests turn this off to compare with the window-buffer computation.
_in_place_windows = True
# A kernel call covers at most this share of a sample's (token, query head) pairs (at least one window of one kv head).
_CALL_SHARE = 32
# CPU flash attention (what SDPA runs on the CPU) with its log-sum-exp, and its backward.
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass(frozen=True)
class _Piece:
    """`count` consecutive windows of `length` tokens from token `start` on, in query heads [q_heads) reading kv heads
    [kv_heads) (as grouped-query attention: evenly), each run also reading the first `sinks` tokens."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    start: int
    count: int
    length: int
    sinks: int


def _in_place_usable(q, k, v, backend, dropout, segment_ids, position_ids) -> bool:
    """Plain positions (0..N-1 in every row, no segments) on the CPU without dropout: each run is a contiguous span
    of tokens, so the kernel can read the windows where they are (a strided view), no layout, no copy."""
    return (
        _in_place_windows
        and _flash_cpu is not None
        and _flash_cpu_backward is not None
        and backend == "sdpa"
        and q.device.type == "cpu"
        and dropout == 0.0
        and segment_ids is None
        and q.dtype == k.dtype == v.dtype
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and (position_ids is None or _is_arange(position_ids))
    )


@functools.lru_cache(maxsize=64)  # one per (head split, N, sinks): few in a run, but lengths may vary
def _in_place_plan(
    passes: tuple[tuple[int, tuple[tuple[int, int], ...]], ...], seq_len: int, sink_tokens: int, heads_per_kv: int
) -> tuple[_Piece, ...]:
    """The pieces that cover every (token, query head) once, for plain positions: per head block (group size G,
    offset s), the run before the first boundary (t + s) % G == 0, the full groups after it and the tail. Every run
    but the one at token 0 starts at G/2 or later, past the k <= G/2 sinks: it reads all of them (dense heads none).

    Each piece is one kernel call per sample at most (all samples when it is one window) and covers at most
    1/_CALL_SHARE of the (token, query head) pairs of a sample, one window at least: a call's outputs and gradients
    live only until they are written into place, so they add that share at most.
    """
    pieces, first_head = [], 0
    budget = max(1, seq_len * sum(num_pass_heads for num_pass_heads, _ in passes) // _CALL_SHARE)
    for num_pass_heads, blocks in passes:
        block_heads = num_pass_heads // len(blocks)
        for size, offset in blocks:
            heads = (first_head, first_head + block_heads)
            first_head += block_heads
            dense = size > 2 * seq_len
            spans, start = [], 0
            if offset:
                spans.append((0, 1, min(seq_len, size - offset)))
                start = size - offset
            full = max(0, (seq_len - start) // size)
            if full and sink_tokens and start == 0 and not dense:  # the group at token 0 reads no sinks, the rest do
                spans.append((0, 1, size))
                start, full = size, full - 1
            if full:
                spans.append((start, full, size))
            tail = start + full * size
            if tail < seq_len and start < seq_len:
                spans.append((tail, 1, seq_len - tail))
            for head_range in _even_kv_ranges(heads, heads_per_kv):
                kv = (head_range[0] // heads_per_kv, (head_range[1] - 1) // heads_per_kv + 1)
                for span_start, count, length in spans:
                    sinks = 0 if dense or span_start == 0 else sink_tokens
                    for q_heads, kv_heads in _head_chunks(head_range, kv, length, budget):
                        per_call = max(1, budget // (length * (q_heads[1] - q_heads[0])))
                        for first in range(0, count, per_call):
                            start = span_start + first * length
                            pieces.append(_Piece(q_heads, kv_heads, start, min(per_call, count - first), length, sinks))
    return tuple(pieces)


def _head_chunks(heads: tuple[int, int], kv_heads: tuple[int, int], length: int, budget: int):
    """Query heads [heads) reading kv heads [kv_heads) evenly, cut at kv-head boundaries into chunks of at most
    `budget` // length query heads (at least one kv head's)."""
    num_kv = kv_heads[1] - kv_heads[0]
    per_kv = (heads[1] - heads[0]) // num_kv
    kv_per_chunk = max(1, budget // (length * per_kv))
    for first in range(0, num_kv, kv_per_chunk):
        last = min(first + kv_per_chunk, num_kv)
        yield (heads[0] + first * per_kv, heads[0] + last * per_kv), (kv_heads[0] + first, kv_heads[0] + last)


def _even_kv_ranges(heads: tuple[int, int], heads_per_kv: int) -> list[tuple[int, int]]:
    """Query heads [heads) as ranges that each read their kv heads evenly (grouped-query attention's rule): the whole
    range when it covers its kv heads alike, else one range per kv head (9 heads over 3 kv heads: heads 0..3 are
    0..2 reading kv head 0 and 3 reading kv head 1)."""
    first, end = heads
    counts = {}
    for head in range(first, end):
        counts[head // heads_per_kv] = counts.get(head // heads_per_kv, 0) + 1
    if len(set(counts.values())) == 1:
        return [heads]
    return [(max(first, kv * heads_per_kv), min(end, (kv + 1) * heads_per_kv)) for kv in counts]


def _piece_views(piece: _Piece, batch: int, *tensors: tuple[torch.Tensor, tuple[int, int]]):
    """For each kernel call of a piece: the views of the tensors (B, N, heads, D), token-major, each at its head range
    [heads), as (windows, heads, length, D); and the sample the call covers (None: all, or the only one)."""
    one_call = piece.count == 1 or batch == 1
    for sample in [None] if one_call else range(batch):
        views = []
        for x, heads in tensors:
            x = x[:, piece.start : piece.start + piece.count * piece.length, heads[0] : heads[1]]
            if piece.count == 1:
                views.append(x.transpose(1, 2))  # (B, heads, length, D)
            else:  # (1 sample, count * length, ...) -> (count, heads, length, D): still a view
                x = x[0 if sample is None else sample]
                views.append(x.unflatten(0, (piece.count, piece.length)).transpose(1, 2))
        yield views, sample


def _sinks_of(piece: _Piece, x: torch.Tensor, sample: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The sinks' keys or values from x (B, N, Hkv, D) as (B or 1 sample, query heads of the piece, k, D)."""
    x = x[:, : piece.sinks, piece.kv_heads[0] : piece.kv_heads[1]]
    if sample is not None:
        x = x[sample : sample + 1]
    x = x.transpose(1, 2).to(dtype)
    repeat = (piece.q_heads[1] - piece.q_heads[0]) // (piece.kv_heads[1] - piece.kv_heads[0])
    return x.repeat_interleave(repeat, dim=1) if repeat > 1 else x


class _InPlaceWindows(torch.autograd.Function):
    """S²-Attn over plain positions with the CPU flash kernel (the one SDPA runs), reading q, k, v in place: forward
    writes each call's output into one (B, N, H, D) tensor and keeps only it and the log-sum-exps, backward writes
    each call's gradients into dq, dk, dv. So the memory is dense attention's: inputs, output, one call's worth.

    Sinks are a second, small attention of each window's queries to the k sink keys, merged with the window's by
    log-sum-exp; the kernel's backward given the merged output and log-sum-exp yields the window part's exact
    gradients (softmax over the union), the sink part's are written out here.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        batch, num_heads, seq_len, head_dim = q.shape
        q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))  # (B, N, heads, D) views
        out = q.new_empty(batch, seq_len, num_heads, head_dim)
        log_sum_exps = []
        for piece in plan:
            for (q_p, k_p, v_p, out_p), sample in _piece_views(
                piece, batch, (q_t, piece.q_heads), (k_t, piece.kv_heads), (v_t, piece.kv_heads), (out, piece.q_heads)
            ):
                o, lse = _flash_cpu(q_p, k_p, v_p, 0.0, True, scale=scale)
                if piece.sinks:  # lse's dtype: float32, or float64 for float64 inputs
                    sink_k, sink_v = (_sinks_of(piece, x, sample, lse.dtype) for x in (k_t, v_t))
                    scores = q_p.to(lse.dtype) @ sink_k.transpose(-1, -2) * scale
                    merged = torch.logaddexp(lse, torch.logsumexp(scores, -1))
                    sink_part = torch.exp(scores - merged[..., None]) @ sink_v
                    o = o.to(lse.dtype) * torch.exp(lse - merged)[..., None] + sink_part
                    lse = merged
                out_p.copy_(o)
                log_sum_exps.append(lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, *log_sum_exps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *log_sum_exps = ctx.saved_tensors
        scale, batch = ctx.scale, q.shape[0]
        q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
        grad_q = torch.empty_like(q).transpose(1, 2)  # every (token, query head) lies in exactly one piece
        grad_k, grad_v = (torch.zeros_like(x).transpose(1, 2) for x in (k, v))  # kv heads and sinks: several
        lse_of_call = iter(log_sum_exps)
        for piece in ctx.plan:
            for (q_p, k_p, v_p, out_p, g_p, dq_p, dk_p, dv_p), sample in _piece_views(
                piece,
                batch,
                *((x, piece.q_heads) for x in (q_t,)),
                *((x, piece.kv_heads) for x in (k_t, v_t)),
                *((x, piece.q_heads) for x in (out, grad_out, grad_q)),
                *((x, piece.kv_heads) for x in (grad_k, grad_v)),
            ):
                lse = next(lse_of_call)
                if g_p.stride(-1) != 1 or 0 in g_p.stride():  # e.g. expanded (of a sum): one call's part only
                    g_p = g_p.contiguous()
                dq, dk, dv = _flash_cpu_backward(g_p, q_p, k_p, v_p, out_p, lse, 0.0, True, scale=scale)
                if piece.sinks:
                    sink_k, sink_v = (_sinks_of(piece, x, sample, lse.dtype) for x in (k_t, v_t))
                    g_acc, q_acc = g_p.to(lse.dtype), q_p.to(lse.dtype)
                    probs = torch.exp(q_acc @ sink_k.transpose(-1, -2) * scale - lse[..., None])  # (.., length, k)
                    rowsum = (g_acc * out_p.to(lse.dtype)).sum(-1, keepdim=True)
                    grad_scores = probs * (g_acc @ sink_v.transpose(-1, -2) - rowsum) * scale
                    dq = dq.to(lse.dtype) + grad_scores @ sink_k
                    _add_sink_grads(grad_k, piece, sample, grad_scores.transpose(-1, -2) @ q_acc)
                    _add_sink_grads(grad_v, piece, sample, probs.transpose(-1, -2) @ g_acc)
                dq_p.copy_(dq)
                dk_p.add_(dk)
                dv_p.add_(dv)
        return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2), None, None


def _add_sink_grads(grad: torch.Tensor, piece: _Piece, sample: int | None, sink_grad: torch.Tensor) -> None:
    """Add (windows, query heads, k, D) gradients of the sinks to grad (B, N, Hkv, D): summed over the windows (of
    one sample, or one per sample) and over the query heads that share a kv head."""
    windows, heads, sinks, head_dim = sink_grad.shape
    kv = piece.kv_heads[1] - piece.kv_heads[0]
    sink_grad = sink_grad.view(windows, kv, heads // kv, sinks, head_dim).sum(2).transpose(1, 2)  # (w, k, kv, D)
    target = grad[:, :sinks, piece.kv_heads[0] : piece.kv_heads[1]]  # (B, k, kv, D)
    if piece.count == 1:  # one window per sample (of all samples, or of `sample`)
        target = target if sample is None else target[sample : sample + 1]
    else:  # the windows of one sample (the only one when sample is None)
        target, sink_grad = target[sample or 0], sink_grad.sum(0)
    target.add_(sink_grad.to(grad.dtype))


# ----------------------------------------------------------------------------------------------------------------
# One layout per forward pass
# ----------------------------------------------------------------------------------------------------------------

_T = TypeVar("_T")

# Tests turn this off to compare with the computation that builds everything in every layer.
_cache_layouts = True


@dataclass
class _KeyEntry:
    """What was built under one live key tensor, at the key's version counter `version`."""

    key: weakref.ref
    version: int
    # parts -> (stamps of the companions it was built with, what was built)
    built: dict[tuple, tuple[tuple, object]] = field(default_factory=dict)


# id(key) -> entry. The id alone could name a dead tensor's successor: an entry is dropped when its key dies
# (weakref.finalize), and a lookup also checks that the weak reference still yields this very tensor.
_ENTRIES: dict[int, _KeyEntry] = {}


def _cached(key: torch.Tensor | None, parts: tuple, companions: tuple, build: Callable[[], _T]) -> _T:
    """build(), or what it returned before under the same live, unchanged `key` tensor, `parts` and `companions`.

    parts: the plain values the result depends on. companions: the other tensors it depends on, matched by identity
    and version (a new padding mask with the same position ids is another layout). No key: build every time. Inference
    tensors have no version counter, so under inference mode nothing is cached.
    """
    if key is None or not _cache_layouts or torch.is_inference_mode_enabled() or key.is_inference():
        return build()
    if any(c is not None and c.is_inference() for c in companions):
        return build()
    entry = _ENTRIES.get(id(key))
    if entry is None or entry.key() is not key:
        entry = _KeyEntry(weakref.ref(key), key._version)
        _ENTRIES[id(key)] = entry
        weakref.finalize(key, _forget, id(key), entry)
    elif entry.version != key._version:  # changed in place: nothing built from it holds
        entry.version, entry.built = key._version, {}
    stamps = tuple(None if c is None else (weakref.ref(c), c._version) for c in companions)
    hit = entry.built.get(parts)
    if hit is not None and _same_companions(hit[0], companions):
        return hit[1]
    value = build()
    entry.built[parts] = (stamps, value)  # one value per parts: a new companion replaces the old one's
    return value


def _same_companions(stamps: tuple, companions: tuple) -> bool:
    return all(
        (stamp is None) if c is None else (stamp is not None and stamp[0]() is c and stamp[1] == c._version)
        for stamp, c in zip(stamps, companions, strict=True)
    )


def _forget(key_id: int, entry: _KeyEntry) -> None:
    if _ENTRIES.get(key_id) is entry:
        del _ENTRIES[key_id]


# ----------------------------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------------------------

_CONFIG_ATTRIBUTE = "s2attn"
_VARIANTS = ("sink_tokens", "dense_heads", "dense")  # settings keys of the variants that reach beyond G


def configure(
    model_or_config,
    *,
    group_size: int | None = None,
    group_size_ratio: float = 0.25,
    backend="auto",
    sink_tokens: int = 0,
    dense_heads: int = 0,
):
    """Store the S²-Attn settings on the model config, where the registered attention function reads them.

    group_size: a fixed G (even); None: G = group_size_ratio × N for each sequence length N, rounded to an even
    number >= 2. sink_tokens, dense_heads: the variants (see `s2_attention`; dense_heads counts the model's last
    heads). The settings live in `config.s2attn` (a plain dict, saved into config.json and ignored by plain
    transformers).
    """
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise UserError(f"S²-Attn group_size={group_size} must be even and >= 2: pick an even group size")
    if not 0 < group_size_ratio <= 1:
        raise UserError(f"S²-Attn group_size_ratio={group_size_ratio} must be in (0, 1], e.g. 0.25")
    if backend not in ("auto", "sdpa", "flash"):
        raise UserError(f"S²-Attn backend={backend!r} is unknown: use auto, sdpa or flash")
    if sink_tokens < 0 or dense_heads < 0:
        raise UserError(f"S²-Attn sink_tokens={sink_tokens} and dense_heads={dense_heads} must be >= 0")
    settings = {"group_size": group_size, "group_size_ratio": group_size_ratio, "backend": backend}
    if sink_tokens or dense_heads:  # a plain S²-Attn config stays as it was
        settings.update(sink_tokens=sink_tokens, dense_heads=dense_heads)
    for target in _configs(model_or_config):
        setattr(target, _CONFIG_ATTRIBUTE, dict(settings))


def set_dense_training(model_or_config, dense: bool) -> None:
    """Train with dense causal attention (True) or S²-Attn as configured (False): the dense phase of training
    (attention.dense_phase) switches the registered function with this; evaluation is dense either way."""
    for target in _configs(model_or_config):
        settings = getattr(target, _CONFIG_ATTRIBUTE, None)
        if settings is None:
            raise UserError("set_dense_training needs a model configured for S²-Attn: call configure() first")
        if dense:
            settings["dense"] = True
        else:
            settings.pop("dense", None)


def _configs(model_or_config) -> list:
    config = getattr(model_or_config, "config", model_or_config)
    return list({id(config): config, id(config.get_text_config()): config.get_text_config()}.values())


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
    num_unshifted_heads: int | None = None,
    layout_key: torch.Tensor | None = None,
    num_dense_heads: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: S²-Attn while training, dense causal attention in eval and cached decoding.

    query (B, H, Nq, D), key/value (B, Hkv, Nk, D); returns (B, Nq, H, D). Packed documents (position ids restarting
    at 0) are isolated from each other, and padding (a 2D mask from `s2attn_mask`) is never attended to.
    num_unshifted_heads, num_dense_heads: see `s2_attention`; a sequence-parallel wrapper that hands this function a
    slice of the heads passes both (default: the configured split of all the model's heads). layout_key: the tensor
    the layout is cached under (default: position_ids); a wrapper that hands each layer new position ids (gathered
    ones) passes one tensor that stands for them for the whole forward. The settings' "dense" flag (the dense phase,
    `set_dense_training`) makes training dense too.
    sliding_window: the model's window (transformers passes it): training honours it by construction when G <= it
    and refuses a longer G; dense attention applies it (docs/s2attn.md, "Sliding-window models").
    """
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    # A sliding window (Mistral; Qwen2/3 with use_sliding_window) binds only when the sequence is longer than it.
    windowed = sliding_window is not None and kv_len > sliding_window
    if windowed and module.training and q_len == kv_len:
        # S²-Attn never reaches further back than G - 1 tokens (a group holds G consecutive positions, and isolated
        # documents keep index and position distances equal), so G <= window honours the window by construction.
        # longctx.feasibility refuses the other case from the config; this is the same rule where it is applied.
        group_size = group_size_for(module.config, q_len)
        if group_size > sliding_window:
            raise UserError(
                f"S²-Attn group size {group_size} is longer than the model's sliding window of {sliding_window} "
                f"tokens: set attention.group_size to at most {sliding_window}"
            )
        if any((getattr(module.config, _CONFIG_ATTRIBUTE, None) or {}).get(name) for name in _VARIANTS):
            raise UserError(
                f"S²-Attn's sinks, dense heads and dense phase attend beyond the model's sliding window of "
                f"{sliding_window} tokens: set attention.sink_tokens, dense_heads and dense_phase to 0"
            )
    elif windowed and (attention_mask is None or attention_mask.dim() == 2):
        # Dense attention (eval, cached decoding) with the model's window, as transformers' own masks apply it.
        out = _sliding_window_dense(query, key, value, sliding_window, position_ids, attention_mask, scaling, dropout)
        return out.transpose(1, 2), None
    if attention_mask is not None and attention_mask.dim() == 4:
        if module.training and q_len == kv_len:
            raise UserError("s2attn got a prepared 4D attention mask: pass a 2D padding mask (or none) instead")
        out = _sdpa(query, key, value, scale=scaling, dropout=dropout, mask=attention_mask)
        return out.transpose(1, 2), None
    if q_len != kv_len:  # cached decoding: the queries are the last q_len tokens
        out = _dense_decoding(query, key, value, attention_mask, scaling, dropout)
        return out.transpose(1, 2), None

    # transformers hands every layer of a forward pass the same position-ids tensor: the layout is built under it once
    layout_key = position_ids if layout_key is None else layout_key
    if position_ids is None:
        position_ids = torch.arange(q_len, device=query.device)[None]
    position_ids = position_ids.expand(batch, q_len)
    segment_ids = document_segment_ids(position_ids, attention_mask, layout_key=layout_key)

    settings = getattr(module.config, _CONFIG_ATTRIBUTE, None) or {}
    if not module.training or settings.get("dense"):
        out = dense_attention(
            query, key, value, segment_ids=segment_ids, scale=scaling, dropout=dropout, layout_key=layout_key
        )
    else:
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
            num_unshifted_heads=num_unshifted_heads,
            layout_key=layout_key,
            sink_tokens=settings.get("sink_tokens", 0),
            num_dense_heads=settings.get("dense_heads", 0) if num_dense_heads is None else num_dense_heads,
        )
    return out.transpose(1, 2), None


def _sliding_window_dense(query, key, value, window, position_ids, padding_mask, scale, dropout):
    """Dense causal attention of the last q_len queries over kv_len keys in which query i sees key j only when
    i - j < window (transformers' `sliding_window_overlay`), packed documents and padding kept apart as in the dense
    path. An explicit (B, 1, q_len, kv_len) mask: the window is the model's inference behaviour, not a training path."""
    q_len, kv_len = query.shape[2], key.shape[2]
    first = kv_len - q_len  # the first query's index among the keys
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
    mask = visible.tril(diagonal=first).triu(diagonal=first - window + 1)[None, None]
    if q_len == kv_len:
        if position_ids is None:
            position_ids = torch.arange(q_len, device=query.device)[None]
        segment_ids = document_segment_ids(position_ids.expand(query.shape[0], q_len), padding_mask)
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    elif padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :]
    return _sdpa(query, key, value, scale=scale, dropout=dropout, mask=mask)


def _dense_decoding(query, key, value, padding_mask, scale, dropout):
    """Dense attention of the last q_len tokens over all kv_len tokens (KV cache), honoring a padding mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(diagonal=kv_len - q_len)
    mask = visible[None, None] if padding_mask is None else visible[None, None] & padding_mask[:, None, None, :]
    return _sdpa(query, key, value, scale=scale, dropout=dropout, mask=mask)


__all__ = [
    "configure",
    "dense_attention",
    "document_segment_ids",
    "group_size_for",
    "register",
    "resolve_backend",
    "s2_attention",
    "s2attn_forward",
    "s2attn_mask",
    "segment_ids_from_position_ids",
    "set_dense_training",
]
