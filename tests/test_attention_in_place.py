"""S²-Attn over plain positions on the CPU, computed in place (longctx.attention._InPlaceWindows): the kernel reads
each window where it lies in q, k, v and writes into one output and one gradient each, with sinks merged by
log-sum-exp. Checked against the window-buffer computation (the one packed documents and GPUs use) and the float64
reference from the definition, forward and backward; that it keeps no copies; and when it is taken."""

import itertools

import pytest
import torch
from test_attention import packed_positions, random_qkv
from test_attention_variants import variant_reference

from longctx import attention
from longctx.attention import s2_attention, segment_ids_from_position_ids

# (B, H, Hkv, N, G): MHA, GQA, MQA, odd H over kv heads that serve both head halves (9/3, 15/5, 7/1), N not a
# multiple of G, N < G, N < G/2, N = 1, two samples.
SHAPES = [
    (1, 4, 4, 32, 8),
    (2, 8, 2, 37, 8),
    (2, 9, 3, 37, 8),
    (1, 15, 5, 29, 6),
    (2, 7, 1, 33, 8),
    (1, 4, 2, 10, 16),
    (2, 4, 2, 5, 16),
    (1, 2, 1, 1, 4),
]


def both_ways(monkeypatch, *args, **kwargs):
    """forward_and_grads(*args, **kwargs) in place and with the window buffer: both results."""
    in_place = forward_and_grads(*args, **kwargs)
    monkeypatch.setattr(attention, "_in_place_windows", False)
    buffered = forward_and_grads(*args, **kwargs)
    monkeypatch.setattr(attention, "_in_place_windows", True)
    return in_place, buffered


def forward_and_grads(q, k, v, group_size, weights, **kwargs):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = s2_attention(*leaves, group_size, **kwargs)
    (out.double() * weights).sum().backward()
    return [out.detach(), *(x.grad for x in leaves)]


@pytest.mark.parametrize("batch,num_heads,num_kv_heads,seq_len,group_size", SHAPES)
def test_matches_the_buffer_and_the_definition_forward_and_backward(
    monkeypatch, batch, num_heads, num_kv_heads, seq_len, group_size
):
    q, k, v = (x.double() for x in random_qkv(batch, num_heads, num_kv_heads, seq_len, seed=seq_len))
    weights = torch.randn(batch, num_heads, seq_len, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sinks, dense in itertools.product([0, 1, 3], sorted({0, 1, num_heads})):
        if sinks > group_size // 2:
            continue
        kwargs = {"sink_tokens": sinks, "num_dense_heads": dense}
        in_place, buffered = both_ways(monkeypatch, q, k, v, group_size, weights, **kwargs)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        expected_out = variant_reference(*leaves, group_size, sink_tokens=sinks, dense_heads=dense)
        (expected_out * weights).sum().backward()
        expected = [expected_out.detach(), *(x.grad for x in leaves)]
        for name, got, other, want in zip(["out", "dq", "dk", "dv"], in_place, buffered, expected, strict=True):
            message = f"{name} {sinks=} {dense=}"
            torch.testing.assert_close(got, other, atol=1e-10, rtol=1e-10, msg=message)
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=message)


@pytest.mark.parametrize("num_heads,num_kv_heads,num_slices", [(8, 2, 2), (9, 3, 3), (15, 5, 5)])
def test_head_slices_with_any_split_match_the_buffer(monkeypatch, num_heads, num_kv_heads, num_slices):
    """Sequence parallelism hands a rank a slice of heads on one side of floor(H/2) or straddling it."""
    q, k, v = (x.double() for x in random_qkv(2, num_heads, num_kv_heads, 41, seed=3))
    heads, kv_heads = num_heads // num_slices, num_kv_heads // num_slices
    weights = torch.randn(2, heads, 41, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for index in range(num_slices):
        unshifted = min(max(num_heads // 2 - index * heads, 0), heads)
        q_slice = q[:, index * heads : (index + 1) * heads]
        k_slice, v_slice = (x[:, index * kv_heads : (index + 1) * kv_heads] for x in (k, v))
        kwargs = {"num_unshifted_heads": unshifted, "sink_tokens": 2}
        in_place, buffered = both_ways(monkeypatch, q_slice, k_slice, v_slice, 8, weights, **kwargs)
        for got, other in zip(in_place, buffered, strict=True):
            torch.testing.assert_close(got, other, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("call_share", [1, 4, 1000])
def test_any_cut_into_kernel_calls_gives_the_same_result(monkeypatch, call_share):
    """One call per head block and span, or calls of a window of one kv head each: the same numbers."""
    monkeypatch.setattr(attention, "_CALL_SHARE", call_share)
    attention._in_place_plan.cache_clear()
    try:
        q, k, v = (x.double() for x in random_qkv(2, 8, 4, 64, seed=4))
        weights = torch.randn(2, 8, 64, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        got = forward_and_grads(q, k, v, 16, weights, sink_tokens=4, num_dense_heads=2)
        monkeypatch.setattr(attention, "_in_place_windows", False)
        expected = forward_and_grads(q, k, v, 16, weights, sink_tokens=4, num_dense_heads=2)
    finally:
        attention._in_place_plan.cache_clear()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("num_heads,num_kv_heads,seq_len,group_size,sinks,dense", [
    (32, 32, 8192, 2048, 4, 2), (9, 3, 4097, 1024, 4, 1), (15, 5, 100, 6, 3, 0), (7, 1, 3, 16, 8, 7),
])  # fmt: skip
def test_the_plan_covers_every_token_and_head_once(num_heads, num_kv_heads, seq_len, group_size, sinks, dense):
    heads_per_kv = num_heads // num_kv_heads
    unshifted = min(num_heads // 2, num_heads - dense)
    passes = attention._head_passes(num_heads, unshifted, group_size, dense, seq_len)
    plan = attention._in_place_plan(tuple(passes), seq_len, sinks, heads_per_kv)
    covered = torch.zeros(seq_len, num_heads, dtype=torch.long)
    budget = seq_len * num_heads // attention._CALL_SHARE
    for piece in plan:
        h0, h1 = piece.q_heads
        covered[piece.start : piece.start + piece.count * piece.length, h0:h1] += 1
        assert [h // heads_per_kv for h in (h0, h1 - 1)] == [piece.kv_heads[0], piece.kv_heads[1] - 1]
        assert (h1 - h0) % (piece.kv_heads[1] - piece.kv_heads[0]) == 0  # even grouped-query attention
        assert piece.sinks == (0 if piece.start == 0 or h0 >= num_heads - dense else sinks)
        one_window_of_one_kv_head = piece.count == 1 and piece.kv_heads[1] - piece.kv_heads[0] == 1
        assert piece.count * piece.length * (h1 - h0) <= budget or one_window_of_one_kv_head
    assert bool((covered == 1).all())


def test_half_precision_is_as_close_to_the_definition_as_the_buffer(monkeypatch):
    q, k, v = random_qkv(2, 9, 3, 70, dtype=torch.bfloat16, seed=6)
    weights = torch.randn(2, 9, 70, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    in_place, buffered = both_ways(monkeypatch, q, k, v, 16, weights, sink_tokens=4, num_dense_heads=1)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    expected_out = variant_reference(*leaves, 16, sink_tokens=4, dense_heads=1)
    (expected_out * weights).sum().backward()
    expected = [expected_out.detach(), *(x.grad for x in leaves)]
    for name, got, other, want in zip(["out", "dq", "dk", "dv"], in_place, buffered, expected, strict=True):
        assert got.dtype == torch.bfloat16
        error, buffer_error = ((x.double() - want).abs().max().item() for x in (got, other))
        assert error <= 1.5 * buffer_error + 1e-3, (name, error, buffer_error)


def test_a_gradient_of_a_sum_is_never_materialized_whole():
    """.sum().backward() hands over a stride-0 gradient: each call materializes its own part, which must work."""
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 4, 2, 48, seed=8))
    s2_attention(q, k, v, 8, sink_tokens=2).sum().backward()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    variant_reference(*leaves, 8, sink_tokens=2).sum().backward()
    for got, want in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-10)


def test_keeps_no_copy_of_q_k_v_for_backward():
    """What the backward keeps: q, k, v themselves (the same storage), the output and one log-sum-exp per call (one
    number per token and head): nothing of q's size besides."""
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 8, 4, 256))
    out = s2_attention(q, k, v, 64, sink_tokens=4, num_dense_heads=2)
    saved = out.grad_fn.next_functions[0][0].saved_tensors  # out is a transposed view of the function's output
    assert [x.data_ptr() for x in saved[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    assert saved[3].data_ptr() == out.data_ptr()
    assert sum(x.numel() for x in saved[4:]) == 8 * 256  # B * H * N log-sum-exps


def test_taken_for_plain_positions_only(monkeypatch):
    calls = []
    apply = attention._InPlaceWindows.apply
    monkeypatch.setattr(attention._InPlaceWindows, "apply", lambda *a: calls.append(1) or apply(*a))
    q, k, v = random_qkv(2, 4, 2, 40)
    positions = packed_positions([[15, 25], [40]])
    s2_attention(q, k, v, 8)
    s2_attention(q, k, v, 8, position_ids=torch.arange(40)[None])
    assert len(calls) == 2
    s2_attention(q, k, v, 8, position_ids=positions)  # restarting positions: groups are no longer contiguous spans
    s2_attention(q, k, v, 8, position_ids=positions, segment_ids=segment_ids_from_position_ids(positions))
    s2_attention(q, k, v, 8, dropout=0.1)
    assert len(calls) == 2
