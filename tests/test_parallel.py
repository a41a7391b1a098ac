"""Sequence parallelism without a process group: the per-head S²-Attn pattern of a rank's head slice, the batch
split, the rank layout and the one-line errors for combinations that cannot be split."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from longctx import parallel
from longctx.attention import s2_attention, s2attn_forward, segment_ids_from_position_ids
from longctx.config import ConfigError, RunConfig, load_config
from longctx.errors import UserError
from longctx.parallel import (
    IGNORE_INDEX,
    SequenceParallel,
    check_model,
    gradient_sum_factor,
    halo_forward,
    layout,
    num_unshifted_heads,
    shard_batch,
)


def packed_positions(seq_len: int, doc_starts: list[int]) -> torch.Tensor:
    positions, start = [], 0
    for end in [*doc_starts[1:], seq_len]:
        positions += list(range(end - start))
        start = end
    return torch.tensor(positions)[None]


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "size"),
    [
        (4, 2, 2),
        (8, 2, 4),
        (8, 8, 2),
        (12, 6, 3),  # rank 1 holds heads 4..7, H/2 = 6
        (8, 2, 2),
        (8, 8, 8),  # one head per rank
        (9, 3, 3),  # SmolLM2-135M: rank 1 holds heads 3..5, floor(H/2) = 4: one unshifted, two shifted
        (9, 3, 9),  # kv heads replicated over 3 ranks each
        (15, 5, 5),  # SmolLM2-360M: rank 2 holds heads 6..8, floor(H/2) = 7
        (15, 15, 3),  # rank 1 holds heads 5..9: two unshifted, three shifted
        (7, 1, 7),
    ],
)
def test_each_rank_head_slice_computes_the_single_rank_heads(num_heads, num_kv_heads, size):
    """What a rank's core attention computes on its slice equals those heads of the one-rank S²-Attn."""
    torch.manual_seed(0)
    seq_len, group_size, head_dim = 48, 16, 8
    q = torch.randn(2, num_heads, seq_len, head_dim, dtype=torch.float64)
    k = torch.randn(2, num_kv_heads, seq_len, head_dim, dtype=torch.float64)
    v = torch.randn(2, num_kv_heads, seq_len, head_dim, dtype=torch.float64)
    position_ids = packed_positions(seq_len, [0, 13, 30]).expand(2, -1)
    segment_ids = segment_ids_from_position_ids(position_ids)  # three packed documents, kept apart
    reference = s2_attention(q, k, v, group_size, position_ids=position_ids, segment_ids=segment_ids)  # (B, H, N, D)

    module = types.SimpleNamespace(training=True, config=types.SimpleNamespace(s2attn={"group_size": group_size}))
    heads_per_rank = num_heads // size
    for rank in range(size):
        heads = slice(rank * heads_per_rank, (rank + 1) * heads_per_rank)
        # Ulysses hands kv heads in the same slices, replicated when there are fewer kv heads than ranks.
        kv_index = torch.arange(rank * heads_per_rank, (rank + 1) * heads_per_rank) // (num_heads // num_kv_heads)
        kv_heads = kv_index.unique()
        out, _ = s2attn_forward(
            module,
            q[:, heads],
            k[:, kv_heads],
            v[:, kv_heads],
            None,
            position_ids=position_ids,
            num_unshifted_heads=num_unshifted_heads(num_heads, size, rank),
        )
        torch.testing.assert_close(out.transpose(1, 2), reference[:, heads], rtol=1e-12, atol=1e-12)


def test_local_head_offsets_are_global():
    assert [num_unshifted_heads(8, 1, 0)] == [4]
    assert [num_unshifted_heads(8, 2, r) for r in range(2)] == [4, 0]
    assert [num_unshifted_heads(8, 4, r) for r in range(4)] == [2, 2, 0, 0]
    assert [num_unshifted_heads(12, 3, r) for r in range(3)] == [4, 2, 0]
    # Odd H: heads below floor(H/2) are unshifted, so a slice can straddle it at any point.
    assert [num_unshifted_heads(9, 1, 0)] == [4]
    assert [num_unshifted_heads(9, 3, r) for r in range(3)] == [3, 1, 0]
    assert [num_unshifted_heads(9, 9, r) for r in range(9)] == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert [num_unshifted_heads(15, 5, r) for r in range(5)] == [3, 3, 1, 0, 0]
    assert [num_unshifted_heads(15, 3, r) for r in range(3)] == [5, 2, 0]
    assert [num_unshifted_heads(1, 1, 0)] == [0]


def test_ranks_of_an_odd_head_count_compute_the_one_rank_function():
    """9 heads over 3 ranks, stitched back together, are the one-rank S²-Attn; treating each rank's slice as a model
    of its own (floor(3/2) = 1 unshifted head per rank) is not, so the global count is what makes it right."""
    torch.manual_seed(0)
    q = torch.randn(1, 9, 40, 4, dtype=torch.float64)
    k, v = (torch.randn(1, 3, 40, 4, dtype=torch.float64) for _ in range(2))
    reference = s2_attention(q, k, v, 8)
    by_rank = [
        s2_attention(q[:, 3 * r : 3 * r + 3], k[:, r : r + 1], v[:, r : r + 1], 8, num_unshifted_heads=unshifted)
        for r, unshifted in enumerate(num_unshifted_heads(9, 3, r) for r in range(3))
    ]
    torch.testing.assert_close(torch.cat(by_rank, dim=1), reference, rtol=1e-12, atol=1e-12)
    as_own_models = [s2_attention(q[:, 3 * r : 3 * r + 3], k[:, r : r + 1], v[:, r : r + 1], 8) for r in range(3)]
    assert not torch.allclose(torch.cat(as_own_models, dim=1), reference)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(9, 3), (15, 5), (7, 1), (1, 1), (8, 2)])
def test_halo_chunks_compute_the_one_rank_function(num_heads, num_kv_heads, monkeypatch):
    """halo_forward on each of 3 ranks' chunks, the previous rank's tail handed over in place of the point-to-point
    send, gives the one-rank S²-Attn: the halo carries the kv heads of every shifted head h >= floor(H/2) (forward;
    the backward exchange is tests/test_parallel_distributed.py's)."""
    size, group_size, chunk = 3, 8, 16
    torch.manual_seed(0)
    q = torch.randn(1, num_heads, size * chunk, 4, dtype=torch.float64)
    k, v = (torch.randn(1, num_kv_heads, size * chunk, 4, dtype=torch.float64) for _ in range(2))
    reference = s2_attention(q, k, v, group_size)
    sent = {}

    def shift(tensor, sp, step):  # ranks run in order: rank r receives what rank r - 1 sent
        sent[sp.rank] = tensor
        return sent[sp.rank - 1] if sp.rank else torch.zeros_like(tensor)

    monkeypatch.setattr(parallel, "_shift", shift)
    module = types.SimpleNamespace(training=True, config=types.SimpleNamespace(s2attn={"group_size": group_size}))
    for rank in range(size):
        local = slice(rank * chunk, (rank + 1) * chunk)
        sp = SequenceParallel(size=size, rank=rank)
        out, _ = halo_forward(module, q[:, :, local], k[:, :, local], v[:, :, local], None, sp=sp)
        torch.testing.assert_close(out.transpose(1, 2), reference[:, :, local], rtol=1e-12, atol=1e-12)


def test_ignoring_the_global_index_changes_the_result():
    """The test above can fail: a rank of shifted heads treated as a one-rank run (half unshifted) differs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 4, dtype=torch.float64) for _ in range(3))
    as_shifted = s2_attention(q, k, v, 8, num_unshifted_heads=0)
    as_one_rank = s2_attention(q, k, v, 8)
    assert not torch.allclose(as_shifted, as_one_rank)


def test_shard_batch_shifts_labels_before_splitting():
    input_ids = torch.arange(16).view(2, 8)
    labels = input_ids.clone()
    labels[1, -2:] = IGNORE_INDEX
    position_ids = packed_positions(8, [0, 3]).expand(2, -1)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    chunks = [shard_batch(batch, 2, rank) for rank in range(2)]
    # Rank 0's last position predicts rank 1's first token.
    assert chunks[0]["target_ids"][0, -1] == input_ids[0, 4]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks], 1), input_ids)
    assert torch.equal(torch.cat([c["position_ids"] for c in chunks], 1), position_ids)
    targets = torch.cat([c["target_ids"] for c in chunks], 1)
    assert torch.equal(targets, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX))
    # Over the chunks, the same tokens are scored as by the unsplit next-token loss.
    assert int((targets != IGNORE_INDEX).sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_layout_groups_consecutive_ranks():
    assert [layout(4, r, 2) for r in range(4)] == [(0, 2, 0), (1, 2, 0), (0, 2, 1), (1, 2, 1)]
    with pytest.raises(UserError, match="world size 3 is not a multiple of parallel.sequence_parallel_size=2"):
        layout(3, 0, 2)


def llama_config(num_heads: int, num_kv_heads: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=8 * num_heads, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size", "seq_len", "implementation", "message"),
    [
        (6, 6, 4, 64, "s2attn", "6 attention heads do not divide over parallel.sequence_parallel_size=4"),
        (9, 3, 2, 64, "s2attn", "9 attention heads do not divide over parallel.sequence_parallel_size=2"),
        (15, 5, 3, 64, "s2attn", "5 key/value heads and parallel.sequence_parallel_size=3 do not divide"),
        (12, 3, 2, 64, "s2attn", "3 key/value heads and parallel.sequence_parallel_size=2 do not divide"),
        (8, 2, 4, 66, "s2attn", "train.seq_len=66 is not a multiple of parallel.sequence_parallel_size=4"),
        (8, 2, 2, 64, "eager", "attention.implementation=eager has no sequence-parallel version"),
    ],
)
def test_bad_sequence_parallel_combinations_are_one_line_errors(
    heads, kv_heads, size, seq_len, implementation, message
):
    with pytest.raises(UserError, match=message) as error:
        check_model(llama_config(heads, kv_heads), size, seq_len, implementation)
    assert "\n" not in str(error.value) and ": " in str(error.value)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size"),
    [(8, 2, 2), (8, 2, 4), (64, 8, 8), (64, 8, 16), (32, 32, 8), (8, 8, 8)]
    + [(9, 3, 3), (9, 3, 9), (15, 5, 5), (7, 1, 7)],  # odd head counts: any number of heads per rank
)
def test_good_sequence_parallel_combinations_pass(heads, kv_heads, size):
    check_model(llama_config(heads, kv_heads), size, 1024 * size, "s2attn")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.sequence_parallel_size=2", "attention.implementation=eager"], "has no sequence-parallel version"),
        (
            ["parallel.sequence_parallel_size=3", "train.seq_len=64"],
            "not a multiple of parallel.sequence_parallel_size",
        ),
        (["memory.offload_activations=true", "model.activation_checkpointing=false"], "model.activation_checkpointing"),
        (
            [
                "parallel.sequence_parallel_size=2",
                "parallel.sequence_parallel_mode=halo",
                "attention.isolate_documents=true",
            ],
            "without document isolation only",
        ),
        (
            ["parallel.sequence_parallel_size=8", "parallel.sequence_parallel_mode=halo", "train.seq_len=1024"],
            "needs train.seq_len / 8 = 128 tokens per rank to be a multiple of the S²-Attn group size 256",
        ),
    ],
)
def test_config_refuses_bad_parallel_and_memory_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(RunConfig, None, ["model.init={model_type: llama}", *overrides])
    assert "\n" not in str(error.value)


def test_gradient_sum_factor_follows_deepspeeds_averaging():
    sp = SequenceParallel(size=2, rank=1, data_parallel_size=3, data_parallel_rank=0)
    assert gradient_sum_factor({"zero_optimization": {"stage": 2}}, sp) == 3  # averages over data-parallel groups
    assert gradient_sum_factor({"zero_optimization": {"stage": 3}}, sp) == 6  # reduce-scatter: over every rank
    assert gradient_sum_factor({"zero_optimization": {"stage": 3}}, SequenceParallel(data_parallel_size=4)) == 4
    with pytest.raises(UserError, match="needs zero_optimization.reduce_scatter=true"):
        gradient_sum_factor({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, sp)
