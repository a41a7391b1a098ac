"""Sequence parallelism (DeepSpeed Ulysses / ALST) with S²-Attn as the core attention, and the process groups.

With parallel.sequence_parallel_size = P, the ranks form groups of P consecutive ranks (DeepSpeed's
`parallel_state_sp`): the P ranks of a group share one sequence, the groups are the data-parallel replicas
(world = DP × P). Each rank holds N/P contiguous tokens through embeddings, norms, MLPs and the loss. In every
attention layer DeepSpeed's `UlyssesSPAttentionHF` swaps the split with an all-to-all: rank r then holds the WHOLE
sequence for heads [r·H/P, (r+1)·H/P) (kv heads likewise, replicated when P > Hkv), runs the core attention, and
swaps back. The position ids are all-gathered too, so RoPE (applied before the swap, on local positions that are
the full sequence's) and document isolation (segments from restarting positions) see the full sequence.

S²-Attn shifts head h iff h >= floor(H/2) by its GLOBAL index (docs/s2attn.md), for any H. A rank's slice of heads
is all unshifted, all shifted, or (when it straddles floor(H/2)) unshifted up to some head and shifted from it on;
`num_unshifted_heads` tells `s2_attention` how many of the slice's heads are unshifted, so a run with P ranks computes
the same function as one rank. Ulysses itself asks only that P divides H, and divides Hkv or is a multiple of it.

parallel.sequence_parallel_mode=halo is S²-Attn's own, cheaper split (`halo_forward`): no all-to-all; each rank
keeps its chunk (a multiple of G tokens) and its heads, and receives G/2 tokens of keys/values per layer from the
previous rank, whatever the sequence length or P (no head-count limit; no document isolation).

The labels are shifted by one BEFORE the split (`shard_batch`), so the last token of each chunk is scored against
the first token of the next one, and the loss is a token-weighted sum over all chunks, exactly as with P = 1.
Each rank's loss is scaled by `gradient_sum_factor` so that DeepSpeed's gradient reduction yields the sum.
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.data import IGNORE_INDEX
from longctx.errors import UserError

# attn_implementation names under which the sequence-parallel wrappers are registered with transformers.
ULYSSES_ATTENTION = {"s2attn": "s2attn_ulysses", "sdpa": "sdpa_ulysses"}


RELEASE_TIMEOUT_S = 10.0


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """`dist.all_reduce` in place that returns only once the backend has let go of the buffer it communicated.

    Gloo's worker thread drops its reference to the buffer just AFTER the collective completes (about one time in
    five it still holds it when `dist.all_reduce` returns). If the process is already shutting down by then, the
    thread needs the GIL to free the tensor, cannot get it, and the process aborts ("terminate called without an
    active exception"): a rank whose last act is a collective dies at exit. So the collective runs on a private
    copy, and a weak reference tells when the worker has freed it (tenths of a millisecond). CUDA tensors (NCCL)
    are reduced directly: waiting for their release would stall the host on the GPU stream.
    """
    if tensor.device.type == "cuda":
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    buffer = tensor.clone()
    dist.all_reduce(buffer, op=op, group=group)
    tensor.copy_(buffer)
    released = weakref.ref(buffer)
    del buffer
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while released() is not None and time.monotonic() < deadline:
        time.sleep(1e-4)
    return tensor


@dataclass(frozen=True)
class SequenceParallel:
    """Where this rank sits: sequence-parallel degree `size`, its `rank` in its sequence group, and the
    data-parallel layout (`data_parallel_size` groups; this rank's group is `data_parallel_rank`)."""

    size: int = 1
    rank: int = 0
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    group: object = None  # the torch ProcessGroup of this rank's sequence group (None when size == 1)
    mpu: object = None  # DeepSpeed's parallel_state_sp module, passed to deepspeed.initialize(mpu=...)


def layout(world_size: int, global_rank: int, sequence_parallel_size: int) -> tuple[int, int, int]:
    """(sequence-parallel rank, data-parallel size, data-parallel rank) of global_rank: groups of consecutive ranks."""
    if sequence_parallel_size < 1 or world_size % sequence_parallel_size:
        raise UserError(
            f"world size {world_size} is not a multiple of parallel.sequence_parallel_size={sequence_parallel_size}: "
            "launch data-parallel × sequence-parallel ranks"
        )
    return (
        global_rank % sequence_parallel_size,
        world_size // sequence_parallel_size,
        global_rank // sequence_parallel_size,
    )


def check_model(hf_config, sequence_parallel_size: int, seq_len: int, implementation: str) -> None:
    """One-line UserError when the model's heads or the sequence length cannot be split over P ranks (the rules of
    `longctx.feasibility.sequence_parallel_problems`, which `longctx plan` applies too)."""
    from longctx.feasibility import sequence_parallel_problems

    text_config = hf_config.get_text_config()
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    problems = sequence_parallel_problems(num_heads, num_kv_heads, seq_len, implementation, sequence_parallel_size)
    if problems:
        raise UserError("; ".join(problems))


def num_unshifted_heads(num_heads: int, size: int, rank: int, dense_heads: int = 0) -> int:
    """How many of rank's heads [rank·H/P, (rank+1)·H/P) lie below floor(H/2), i.e. are S²-Attn's unshifted heads:
    the first ones of the slice, any count from 0 to H/P (9 heads over 3 ranks: 3, 1, 0). With dense_heads, the
    model's last dense_heads heads are dense, and unshifted heads end where they begin if that is earlier."""
    local = num_heads // size
    return min(max(min(num_heads // 2, num_heads - dense_heads) - rank * local, 0), local)


def num_dense_heads(num_heads: int, size: int, rank: int, dense_heads: int) -> int:
    """How many of rank's heads are among the model's last dense_heads (the dense-heads variant): its last ones."""
    local = num_heads // size
    return min(max((rank + 1) * local - (num_heads - dense_heads), 0), local)


def gradient_sum_factor(ds_config: dict, sp: SequenceParallel) -> int:
    """The factor on each rank's loss that makes DeepSpeed's gradient reduction the SUM over all ranks.

    DeepSpeed 0.19 sums gradients within a sequence group and averages them over the data-parallel groups (so the
    factor is the data-parallel size), except on ZeRO-3's reduce-scatter path (zero_optimization.reduce_scatter,
    on by default), which averages over every rank of the sequence-data-parallel group: there it is the world size.
    tests/test_parallel_distributed.py checks both against one-process gradients. ZeRO-3's other path has no factor
    here: config validation refuses it (longctx.ds_config.sequence_parallel_problem), and so does this function.
    """
    from longctx.ds_config import sequence_parallel_problem

    zero = ds_config.get("zero_optimization", {})
    if sp.size == 1 or zero.get("stage", 0) != 3:
        return sp.data_parallel_size
    problem = sequence_parallel_problem(ds_config, sp.size)
    if problem:
        raise UserError(problem)
    return sp.size * sp.data_parallel_size


def init_sequence_parallel(sequence_parallel_size: int) -> SequenceParallel:
    """Build DeepSpeed's sequence / sequence-data-parallel groups (a collective; once per process)."""
    world_size, global_rank = dist.get_world_size(), dist.get_rank()
    sp_rank, dp_size, dp_rank = layout(world_size, global_rank, sequence_parallel_size)
    if sequence_parallel_size == 1:
        return SequenceParallel(data_parallel_size=dp_size, data_parallel_rank=dp_rank)
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(sequence_parallel_size=sequence_parallel_size)
    group = mpu.get_sequence_parallel_group()
    assert dist.get_rank(group) == sp_rank, "DeepSpeed's sequence groups are not consecutive ranks"
    return SequenceParallel(sequence_parallel_size, sp_rank, dp_size, dp_rank, group, mpu)


def enable_on_model(
    model, sp: SequenceParallel, *, micro_batch_size: int, seq_len: int, implementation: str, mode: str = "ulysses"
) -> None:
    """Switch the model's attention to its sequence-parallel version over sp.group (no-op when sp.size == 1).

    mode: "ulysses" (all-to-all over heads, any attention) or "halo" (S²-Attn only, see `halo_forward`).
    """
    if sp.size == 1:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode == "halo":
        name = register_halo_attention(sp)
    else:
        check_model(base.config, sp.size, seq_len, implementation)
        name = register_ulysses_attention(base.config, sp, micro_batch_size=micro_batch_size, core=implementation)
    base.set_attn_implementation(name)


def register_ulysses_attention(hf_config, sp: SequenceParallel, *, micro_batch_size: int, core: str) -> str:
    """Register `core` ("s2attn" or "sdpa") wrapped in DeepSpeed's UlyssesSPAttentionHF; returns its name.

    The core runs on this rank's slice of the heads over the whole sequence. S²-Attn gets the number of unshifted
    heads of the slice, so that heads are shifted by their global index. sdpa means dense causal attention (with
    document isolation when positions restart), computed by longctx's dense path.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from longctx import attention

    text_config = hf_config.get_text_config()
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    if core == "s2attn":
        dense_heads = (getattr(text_config, "s2attn", None) or {}).get("dense_heads", 0)
        core_attention = functools.partial(
            attention.s2attn_forward,
            num_unshifted_heads=num_unshifted_heads(num_heads, sp.size, sp.rank, dense_heads),
            num_dense_heads=num_dense_heads(num_heads, sp.size, sp.rank, dense_heads),
        )
    else:
        core_attention = dense_forward
    ulysses = UlyssesSPAttentionHF(
        attn=core_attention,
        batch_size=micro_batch_size,
        attn_head_count=num_heads,
        attn_head_size=head_dim,
        kv_head_count=getattr(text_config, "num_key_value_heads", None) or num_heads,
        num_hidden_layers=text_config.num_hidden_layers,
        process_group=sp.group,
        seq_length_is_variable=True,
    )

    def ulysses_forward(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None:  # a local padding mask would not describe the gathered sequence
            raise UserError(
                "sequence parallelism takes no attention mask: mark padding with labels=-100 at the end of a sequence"
            )
        # DeepSpeed gathers the position ids into a new tensor in every layer, but the local ones that the model
        # hands every layer (and the checkpoint recompute) are one tensor per forward: the core builds its layout
        # once under them. The other ranks' positions in the gathered ones change only with a new batch, which
        # comes as new tensors on every rank.
        return ulysses(module, query, key, value, None, layout_key=kwargs.get("position_ids"), **kwargs)

    name = ULYSSES_ATTENTION[core]
    AttentionInterface.register(name, ulysses_forward)
    # No mask is built for the local chunk: positions (gathered inside the wrapper) carry causality and documents.
    AttentionMaskInterface.register(name, attention.s2attn_mask)
    return name


# ----------------------------------------------------------------------------------------------------------------
# Halo exchange: S²-Attn's own split (parallel.sequence_parallel_mode=halo)
# ----------------------------------------------------------------------------------------------------------------

HALO_ATTENTION = "s2attn_halo"


def register_halo_attention(sp: SequenceParallel) -> str:
    """Register `halo_forward` over sp.group with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from longctx import attention

    AttentionInterface.register(HALO_ATTENTION, functools.partial(halo_forward, sp=sp))
    AttentionMaskInterface.register(HALO_ATTENTION, attention.s2attn_mask)
    return HALO_ATTENTION


def halo_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, sp, **kwargs):
    """S²-Attn on this rank's contiguous chunk of n tokens, the chunk starting at a multiple of G.

    Unshifted heads' groups never cross a chunk edge. A shifted head's group that does is [start - G/2,
    start + G/2): its queries here need the previous rank's last G/2 keys and values, and nothing else crosses
    (causality: the next rank's tokens are all later). So each layer receives a halo of G/2 tokens of the kv heads
    that shifted heads read, from rank - 1 (and sends its own tail to rank + 1): G/2 tokens per layer, whatever n
    or P, instead of Ulysses's all-to-all of q, k, v and the output. The chunk is computed as [halo; chunk] with
    the global positions, and the halo's own outputs dropped.
    query (B, H, n, D), key/value (B, Hkv, n, D); returns (B, n, H, D).
    """
    from longctx.attention import group_size_for, s2_attention

    if attention_mask is not None or not module.training:
        raise UserError(
            "parallel.sequence_parallel_mode=halo only trains (no attention mask, no evaluation): "
            "evaluate the saved model on one rank"
        )
    batch, num_heads, local_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group_size = group_size_for(module.config, local_len * sp.size)
    half_group = group_size // 2
    start = sp.rank * local_len
    # kv heads read by any shifted head (h >= floor(H/2), any H): from the one head floor(H/2) reads onwards; with an
    # odd split that kv head may serve unshifted heads too, which never read the halo (it lies in an earlier group)
    first_shifted_kv = (num_heads // 2) // (num_heads // num_kv_heads)
    tail = torch.stack([key[:, first_shifted_kv:, -half_group:], value[:, first_shifted_kv:, -half_group:]])
    halo = _HaloExchange.apply(tail.contiguous(), sp)  # (2, B, shifted kv heads, G/2, D) from rank - 1
    # The layout depends only on n, G and the rank (no document isolation here): built once per forward pass under
    # the local position ids that the model hands every layer, not under `positions`, a new tensor in each layer.
    layout_key = kwargs.get("position_ids")
    if sp.rank == 0:
        out = s2_attention(query, key, value, group_size, scale=scaling, dropout=dropout, layout_key=layout_key)
        # Rank 0 reads no halo, but its exchange's backward must run: it receives the gradient of rank 0's tail
        # from rank 1. A zero-weight dependency on the (zero) halo makes autograd run it.
        return (out + 0 * halo.sum()).transpose(1, 2), None
    # [halo; chunk]: the halo's unshifted kv heads and its queries are zeros; no query here reads them and the
    # halo's outputs are dropped.
    pad = query.new_zeros(batch, num_heads, half_group, head_dim)
    kv_pad = key.new_zeros(batch, first_shifted_kv, half_group, head_dim)
    key = torch.cat([torch.cat([kv_pad, halo[0]], 1), key], 2)  # (B, Hkv, G/2 + n, D)
    value = torch.cat([torch.cat([kv_pad, halo[1]], 1), value], 2)
    query = torch.cat([pad, query], 2)  # (B, H, G/2 + n, D)
    positions = torch.arange(start - half_group, start + local_len, device=query.device)[None]
    out = s2_attention(
        query, key, value, group_size, position_ids=positions, scale=scaling, dropout=dropout, layout_key=layout_key
    )
    return out[:, :, half_group:].transpose(1, 2), None


class _HaloExchange(torch.autograd.Function):
    """Send `tail` to rank + 1 and return what rank - 1 sent (zeros on rank 0); backward sends the halo's gradient
    back to rank - 1 and returns the gradient rank + 1 sent for `tail` (zeros on the last rank)."""

    @staticmethod
    def forward(ctx, tail, sp):
        ctx.sp = sp
        return _shift(tail, sp, step=1)

    @staticmethod
    def backward(ctx, grad_halo):
        return _shift(grad_halo.contiguous(), ctx.sp, step=-1), None


def _shift(tensor: torch.Tensor, sp: SequenceParallel, step: int) -> torch.Tensor:
    """What rank - step sent; this rank sends `tensor` to rank + step (point to point, within sp.group)."""
    received = torch.zeros_like(tensor)
    operations = []
    destination, source = sp.rank + step, sp.rank - step
    if 0 <= destination < sp.size:
        operations.append(dist.P2POp(dist.isend, tensor, dist.get_global_rank(sp.group, destination), sp.group))
    if 0 <= source < sp.size:
        operations.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(sp.group, source), sp.group))
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


def dense_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, layout_key=None, **kwargs
):
    """Dense causal attention over the gathered sequence; packed documents (restarting positions) kept apart.

    layout_key: see `ulysses_forward`; the documents' segments and layout are derived once per forward under it.
    """
    from longctx.attention import dense_attention, document_segment_ids

    segment_ids = None
    if position_ids is not None:
        segment_ids = document_segment_ids(position_ids.expand(query.shape[0], -1), layout_key=layout_key)
    out = dense_attention(
        query, key, value, segment_ids=segment_ids, scale=scaling, dropout=dropout, layout_key=layout_key
    )
    return out.transpose(1, 2), None  # (B, H, N, D) -> (B, N, H, D)


def shard_batch(batch: dict[str, torch.Tensor], size: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous 1/size of a (B, N) batch, with `target_ids`: the labels shifted by one (the token each
    position predicts; IGNORE_INDEX after the last) BEFORE the split, so no prediction is lost at chunk edges.

    Position ids are those of the full sequence (0..N-1, or restarting per document), sliced, never renumbered.
    """
    labels = batch["labels"]
    seq_len = labels.shape[1]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=labels.device).expand_as(labels)
    target_ids = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, N): target of each position
    chunk = seq_len // size
    local = slice(rank * chunk, (rank + 1) * chunk)
    return {
        "input_ids": batch["input_ids"][:, local],
        "position_ids": position_ids[:, local],
        "target_ids": target_ids[:, local],
    }
