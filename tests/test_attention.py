"""S²-Attn core against a naive masked reference written straight from the definition in docs/s2attn.md."""

import pytest
import torch

from longctx.attention import dense_attention, document_segment_ids, s2_attention, segment_ids_from_position_ids
from longctx.errors import UserError


def reference_attention(q, k, v, group_size=None, *, position_ids=None, segment_ids=None):
    """Float64 masked attention from the definition. group_size None: dense causal. Returns (B, H, N, D) float64."""
    q, k, v = q.double(), k.double(), v.double()
    batch, num_heads, seq_len, head_dim = q.shape
    heads_per_kv = num_heads // k.shape[1]
    kv_of_head = torch.arange(num_heads) // heads_per_kv
    k, v = k[:, kv_of_head], v[:, kv_of_head]  # query head h reads kv head h // (H / Hkv)
    t = torch.arange(seq_len).expand(batch, seq_len) if position_ids is None else position_ids.expand(batch, seq_len)
    index = torch.arange(seq_len)
    allowed = (index[None, None, :, None] >= index[None, None, None, :]).expand(batch, num_heads, seq_len, seq_len)
    if group_size is not None:
        shifted = torch.arange(num_heads) >= num_heads // 2  # floor(H/2): 9 heads shift heads 4..8
        offset = torch.where(shifted, group_size // 2, 0)  # (H,)
        group = torch.div(t[:, None, :] + offset[None, :, None], group_size, rounding_mode="floor")  # (B, H, N)
        allowed = allowed & (group[..., :, None] == group[..., None, :])
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_qkv(batch, num_heads, num_kv_heads, seq_len, head_dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, seq_len, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=generator).to(dtype)
    return q, k, v


def packed_positions(doc_lengths_per_row):
    """(B, N) position ids restarting at 0 at each document start."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in doc_lengths_per_row])


# (H, Hkv, N, G): MHA, GQA 4:1 and 8:1, MQA, odd kv head count, N not a multiple of G, N < G, N < G/2, N = 1;
# odd H (SmolLM2-135M's 9/3, SmolLM2-360M's 15/5, 7/1, 1/1, 3/1, 9 MHA), whose kv heads serve both sides of floor(H/2).
SHAPES = [
    (4, 4, 32, 8),
    (8, 2, 37, 8),
    (16, 2, 50, 12),
    (4, 1, 29, 6),
    (6, 3, 21, 4),
    (4, 4, 10, 16),
    (4, 2, 5, 16),
    (2, 1, 1, 4),
    (9, 3, 37, 8),
    (15, 5, 29, 6),
    (7, 1, 33, 8),
    (1, 1, 19, 4),
    (3, 1, 3, 4),
    (9, 9, 1, 4),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,seq_len,group_size", SHAPES)
def test_plain_positions_match_reference(num_heads, num_kv_heads, seq_len, group_size):
    q, k, v = random_qkv(2, num_heads, num_kv_heads, seq_len)
    expected = reference_attention(q, k, v, group_size)
    torch.testing.assert_close(s2_attention(q, k, v, group_size).double(), expected, atol=1e-5, rtol=1e-5)
    # Explicit arange positions take the same fast path; the general (keyed) path must agree too.
    arange = torch.arange(seq_len)[None]
    torch.testing.assert_close(
        s2_attention(q, k, v, group_size, position_ids=arange).double(), expected, atol=1e-5, rtol=1e-5
    )
    one_segment = torch.zeros(2, seq_len, dtype=torch.long)
    keyed = s2_attention(q, k, v, group_size, position_ids=arange, segment_ids=one_segment)
    torch.testing.assert_close(keyed.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (16, 2), (4, 4)])
def test_batch_of_packed_documents_matches_reference(num_heads, num_kv_heads):
    # Three rows with different document layouts: one long doc, docs crossing group edges, many short docs.
    layouts = [[40], [7, 19, 14], [3, 3, 1, 12, 5, 16]]
    position_ids = packed_positions(layouts)
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = random_qkv(3, num_heads, num_kv_heads, 40, seed=1)
    for group_size in (8, 6, 64):
        expected = reference_attention(q, k, v, group_size, position_ids=position_ids, segment_ids=segment_ids)
        got = s2_attention(q, k, v, group_size, position_ids=position_ids, segment_ids=segment_ids)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_random_configurations_match_reference(seed):
    generator = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    batch, num_kv_heads, heads_per_kv = pick([1, 2, 3]), pick([1, 2, 4]), pick([2, 4, 8, 1, 3, 5])
    seq_len, group_size = int(torch.randint(1, 80, (1,), generator=generator)), pick([2, 4, 6, 10, 16, 32, 128])
    layouts = []
    for _ in range(batch):  # random documents per row
        cuts = torch.randint(0, 2, (seq_len,), generator=generator).bool() & (
            torch.rand(seq_len, generator=generator) < 0.1
        )
        cuts[0] = True
        starts = cuts.nonzero().flatten().tolist() + [seq_len]
        layouts.append([end - start for start, end in zip(starts[:-1], starts[1:])])
    position_ids = packed_positions(layouts)
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = random_qkv(batch, num_kv_heads * heads_per_kv, num_kv_heads, seq_len, seed=seed)
    for kwargs in ({}, {"position_ids": position_ids}, {"position_ids": position_ids, "segment_ids": segment_ids}):
        expected = reference_attention(q, k, v, group_size, **kwargs)
        got = s2_attention(q, k, v, group_size, **kwargs)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_restarting_positions_without_isolation_match_reference():
    # No segment ids: documents are not isolated, tokens of different documents share groups by position.
    position_ids = packed_positions([[3, 3, 1, 12, 5], [10, 14]])
    q, k, v = random_qkv(2, 4, 2, 24, seed=2)
    expected = reference_attention(q, k, v, 4, position_ids=position_ids)
    got = s2_attention(q, k, v, 4, position_ids=position_ids)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_non_contiguous_segment_labels_match_reference():
    segment_ids = torch.tensor([[5, 5, 2, 2, 2, 5, 5, 7, 7, 2, 2, 2]])
    q, k, v = random_qkv(1, 4, 2, 12, seed=3)
    expected = reference_attention(q, k, v, 4, segment_ids=segment_ids)
    got = s2_attention(q, k, v, 4, segment_ids=segment_ids)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_returns_input_dtype(dtype, tolerance):
    q, k, v = random_qkv(2, 8, 2, 45, dtype=dtype)
    position_ids = packed_positions([[20, 25], [45]])
    segment_ids = segment_ids_from_position_ids(position_ids)
    for kwargs in ({}, {"position_ids": position_ids, "segment_ids": segment_ids}):
        got = s2_attention(q, k, v, 10, **kwargs)
        assert got.dtype == dtype
        expected = reference_attention(q, k, v, 10, **kwargs)
        torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)


def test_dense_attention_matches_reference():
    position_ids = packed_positions([[9, 11], [20]])
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = random_qkv(2, 8, 2, 20)
    torch.testing.assert_close(dense_attention(q, k, v).double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    expected = reference_attention(q, k, v, segment_ids=segment_ids)
    got = dense_attention(q, k, v, segment_ids=segment_ids)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_segment_ids_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 8, 2, 3, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 1, 1, 2, 2]])
    assert torch.equal(segment_ids_from_position_ids(position_ids), expected)


# ----------------------------------------------------------------------------------------------------------------
# Leaks, by gradients: d out[i] / d (q, k, v)[j] must be exactly zero wherever the definition forbids i -> j.
# ----------------------------------------------------------------------------------------------------------------


def input_gradients(q, k, v, output_fn, query_index):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    output_fn(q, k, v)[:, :, query_index].sum().backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (9, 3)])
@pytest.mark.parametrize("query_index", [0, 1, 3, 4, 9, 17, 30])
def test_no_gradient_from_the_future(query_index, num_heads, num_kv_heads):
    # G = 8: index 0..3 is the first half group of the shifted heads, where the roll formulation leaks the tail.
    q, k, v = random_qkv(2, num_heads, num_kv_heads, 31)
    q_grad, k_grad, v_grad = input_gradients(q, k, v, lambda q, k, v: s2_attention(q, k, v, 8), query_index)
    for grad in (q_grad, k_grad, v_grad):
        assert torch.count_nonzero(grad[:, :, query_index + 1 :]) == 0
    assert torch.count_nonzero(k_grad[:, :, : query_index + 1]) > 0 or query_index == 0


def test_gradients_stay_inside_the_group_of_each_head_half():
    # Query 13 with G = 8: unshifted heads (0, 1 -> kv head 0) see group [8, 16), shifted heads (2, 3 -> kv head 1)
    # see [12, 20); restricted to the causal past that is [8, 13] and [12, 13].
    q, k, v = random_qkv(1, 4, 2, 24)
    _, k_grad, v_grad = input_gradients(q, k, v, lambda q, k, v: s2_attention(q, k, v, 8), 13)
    for grad in (k_grad, v_grad):
        seen_unshifted = grad[0, 0].abs().sum(-1).nonzero().flatten().tolist()
        seen_shifted = grad[0, 1].abs().sum(-1).nonzero().flatten().tolist()
        assert seen_unshifted == list(range(8, 14))
        assert seen_shifted == [12, 13]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3)])
def test_no_gradient_across_documents(num_heads, num_kv_heads):
    position_ids = packed_positions([[5, 9, 10]])
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = random_qkv(1, num_heads, num_kv_heads, 24)

    def attend(q, k, v):
        return s2_attention(q, k, v, 16, position_ids=position_ids, segment_ids=segment_ids)

    for query_index, document in ((4, range(0, 5)), (10, range(5, 14)), (20, range(14, 24))):
        q_grad, k_grad, v_grad = input_gradients(q, k, v, attend, query_index)
        outside = torch.ones(24, dtype=torch.bool)
        outside[document.start : document.stop] = False
        for grad in (q_grad, k_grad, v_grad):
            assert torch.count_nonzero(grad[:, :, outside]) == 0
        assert torch.count_nonzero(k_grad[:, :, document.start]) > 0  # the document's first token is seen


def test_gradients_match_reference():
    position_ids = packed_positions([[13, 20], [33]])
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = random_qkv(2, 8, 2, 33)
    weights = torch.randn(2, 8, 33, 8, dtype=torch.float64)
    for kwargs in ({}, {"position_ids": position_ids, "segment_ids": segment_ids}):
        got = [x.detach().double().requires_grad_() for x in (q, k, v)]
        (s2_attention(*got, 6, **kwargs) * weights).sum().backward()
        expected = [x.detach().double().requires_grad_() for x in (q, k, v)]
        (reference_attention(*expected, 6, **kwargs) * weights).sum().backward()
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Any head count: head h is shifted iff h >= floor(H/2) (docs/s2attn.md; 9 heads shift heads 4..8)
# ----------------------------------------------------------------------------------------------------------------

# (H, Hkv): SmolLM2-135M, SmolLM2-360M, 7 over MQA, one head (shifted), 3 over MQA, odd kv count with an even H,
# and even cases (GQA, MHA, MQA).
HEAD_COUNTS = [(9, 3), (15, 5), (7, 1), (1, 1), (3, 1), (6, 3), (8, 2), (4, 4), (4, 1)]
ODD_N = 37  # G = 8: unshifted groups [0, 8) .. [32, 37), shifted [0, 4), [4, 12) .. [36, 37)


def odd_n_inputs(case, num_heads, num_kv_heads):
    """q, k, v of ODD_N tokens in 2 rows, and s2_attention's keyword arguments: plain positions, packed documents
    (restarting positions + segments) or packed documents with padding at the end of row 1 (its own segment)."""
    q, k, v = random_qkv(2, num_heads, num_kv_heads, ODD_N, seed=10 * num_heads + num_kv_heads)
    if case == "plain":
        return q, k, v, {}
    position_ids = packed_positions([[5, 19, 13], [ODD_N]])
    padding_mask = None
    if case == "padded":
        padding_mask = torch.ones(2, ODD_N, dtype=torch.bool)
        padding_mask[1, 30:] = False
    return q, k, v, {"position_ids": position_ids, "segment_ids": document_segment_ids(position_ids, padding_mask)}


@pytest.mark.parametrize("case", ["plain", "packed", "padded"])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_COUNTS)
def test_any_head_count_matches_reference_forward_and_backward(num_heads, num_kv_heads, case):
    q, k, v, kwargs = odd_n_inputs(case, num_heads, num_kv_heads)
    weights = torch.randn(2, num_heads, ODD_N, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = s2_attention(*got, 8, **kwargs)
    (out * weights).sum().backward()
    expected = [x.detach().double().requires_grad_() for x in (q, k, v)]
    reference = reference_attention(*expected, 8, **kwargs)
    (reference * weights).sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=1e-10)
    for name, a, b in zip("qkv", got, expected, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10, msg=name)
    # float32 inputs take the same path in q's dtype
    torch.testing.assert_close(s2_attention(q, k, v, 8, **kwargs).double(), reference, atol=1e-5, rtol=1e-5)


def visible_keys(attend, q, k, v, head, query_index):
    """Token indices whose value reaches out[:, head, query_index] (by gradient), per row."""
    v = v.detach().double().requires_grad_()
    attend(q.double(), k.double(), v)[:, head, query_index].sum().backward()
    kv_head = head // (q.shape[1] // k.shape[1])
    return [row.abs().sum(-1).nonzero().flatten().tolist() for row in v.grad[:, kv_head]]


@pytest.mark.parametrize("attend", [s2_attention, reference_attention], ids=["s2_attention", "reference"])
def test_nine_heads_shift_heads_four_to_eight(attend):
    """docs/s2attn.md's worked example (H = 9, Hkv = 3, G = 8, N = 20), for the implementation and for the reference
    every other test compares with: unshifted heads 0..3 see [0, 8), [8, 16), [16, 20); shifted heads 4..8 see
    [0, 4), [4, 12), [12, 20) (no wrap-around), each restricted to the causal past."""
    q, k, v = random_qkv(1, 9, 3, 20, seed=7)
    unshifted = {2: range(0, 3), 5: range(0, 6), 13: range(8, 14), 19: range(16, 20)}
    shifted = {2: range(0, 3), 5: range(4, 6), 13: range(12, 14), 19: range(12, 20)}
    for head in range(9):
        for query_index in unshifted:
            expected = (shifted if head >= 4 else unshifted)[query_index]
            assert visible_keys(lambda *x: attend(*x, 8), q, k, v, head, query_index) == [list(expected)], head


@pytest.mark.parametrize("attend", [s2_attention, reference_attention], ids=["s2_attention", "reference"])
def test_nine_heads_with_isolated_documents(attend):
    """The worked example's two documents of 6 and 14 tokens: groups restart with the positions, and a token never
    sees the other document even where the group numbers agree."""
    position_ids = packed_positions([[6, 14]])
    kwargs = {"position_ids": position_ids, "segment_ids": segment_ids_from_position_ids(position_ids)}
    q, k, v = random_qkv(1, 9, 3, 20, seed=8)
    unshifted = {5: range(0, 6), 9: range(6, 10), 17: range(14, 18), 19: range(14, 20)}
    shifted = {5: range(4, 6), 9: range(6, 10), 17: range(10, 18), 19: range(18, 20)}
    for head in range(9):
        for query_index in unshifted:
            expected = (shifted if head >= 4 else unshifted)[query_index]
            visible = visible_keys(lambda *x: attend(*x, 8, **kwargs), q, k, v, head, query_index)
            assert visible == [list(expected)], head


@pytest.mark.parametrize("num_kv_heads", [9, 1])
def test_any_contiguous_head_slice_computes_those_heads(num_kv_heads):
    """A slice [a, b) of 9 heads, as sequence parallelism hands a rank, with its count of heads below floor(9/2) = 4
    unshifted: every split point, including a slice that straddles head 4 anywhere (MHA and MQA, so that every slice
    has a kv layout)."""
    position_ids = packed_positions([[11, 20]])
    kwargs = {"position_ids": position_ids, "segment_ids": segment_ids_from_position_ids(position_ids)}
    q, k, v = random_qkv(1, 9, num_kv_heads, 31, seed=9)
    expected = reference_attention(q, k, v, 6, **kwargs)
    for first in range(9):
        for stop in range(first + 1, 10):
            kv = slice(first, stop) if num_kv_heads == 9 else slice(0, 1)
            unshifted = min(max(4 - first, 0), stop - first)
            got = s2_attention(q[:, first:stop], k[:, kv], v[:, kv], 6, num_unshifted_heads=unshifted, **kwargs)
            torch.testing.assert_close(got.double(), expected[:, first:stop], atol=1e-5, rtol=1e-5)


def test_bad_group_size_and_head_split_are_user_errors():
    q, k, v = random_qkv(1, 4, 2, 8)
    with pytest.raises(UserError, match="even"):
        s2_attention(q, k, v, 5)
    for num_unshifted_heads in (-1, 5):
        with pytest.raises(UserError, match="num_unshifted_heads between 0 and the number of heads") as error:
            s2_attention(q, k, v, 4, num_unshifted_heads=num_unshifted_heads)
        assert "\n" not in str(error.value)


def fake_flash_varlen(
    q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal
):
    """flash_attn_varlen_func's contract in plain PyTorch: each cu_seqlens span is one causal sequence."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k) and causal
    lengths = cu_seqlens_q.diff()
    assert max_seqlen_q == max_seqlen_k == int(lengths.max()) and int(cu_seqlens_q[-1]) == q.shape[0]
    outputs = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        q_run, k_run, v_run = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # (1, heads, L, D)
        out = torch.nn.functional.scaled_dot_product_attention(
            q_run, k_run, v_run, is_causal=True, scale=softmax_scale, enable_gqa=True
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (9, 3), (15, 5), (7, 1), (1, 1)])
def test_flash_varlen_plumbing_matches_reference(monkeypatch, num_heads, num_kv_heads):
    # No GPU here: the varlen kernel is replaced by its contract, which tests the run layout and cu_seqlens.
    from longctx import attention

    monkeypatch.setattr(attention, "_flash_varlen", lambda: fake_flash_varlen)
    monkeypatch.setattr(attention, "resolve_backend", lambda backend, q: "flash")
    position_ids = packed_positions([[7, 19, 14], [40]])
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = random_qkv(2, num_heads, num_kv_heads, 40, seed=4)
    for kwargs in ({}, {"position_ids": position_ids, "segment_ids": segment_ids}, {"position_ids": position_ids}):
        expected = reference_attention(q, k, v, 8, **kwargs)
        got = s2_attention(q, k, v, 8, **kwargs)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_flash_backend_without_flash_is_a_user_error():
    q, k, v = random_qkv(1, 4, 2, 8)
    with pytest.raises(UserError, match="attention.backend=auto"):
        s2_attention(q, k, v, 4, backend="flash")


def test_dense_attention_with_an_odd_head_count():
    segment_ids = segment_ids_from_position_ids(packed_positions([[4, 9]]))
    q, k, v = random_qkv(1, 3, 1, 13)
    expected = reference_attention(q, k, v, segment_ids=segment_ids)
    torch.testing.assert_close(
        dense_attention(q, k, v, segment_ids=segment_ids).double(), expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("packed", [False, True])
def test_no_allocation_grows_with_n_squared(packed):
    # N = 4096: any N×N mask would be >= 16 MiB in one allocation; S²-Attn's largest is O(N·G) (here < 1 MiB).
    seq_len, group_size = 4096, 64
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 4, 2, seq_len))
    kwargs = {}
    if packed:
        position_ids = packed_positions([[1000, 77, 2019, 1000]])
        kwargs = {"position_ids": position_ids, "segment_ids": segment_ids_from_position_ids(position_ids)}
    with torch.profiler.profile(profile_memory=True) as profile:
        s2_attention(q, k, v, group_size, **kwargs).sum().backward()
        dense_attention(q, k, v, segment_ids=kwargs.get("segment_ids"))
    largest = max(event.self_cpu_memory_usage for event in profile.events())
    assert 0 < largest < seq_len * seq_len // 4


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,num_slices", [(8, 2, 2), (8, 4, 4), (12, 3, 3), (9, 3, 3), (15, 5, 5), (15, 15, 3)]
)
def test_head_slices_compute_the_full_function(num_heads, num_kv_heads, num_slices):
    # Sequence parallelism gives each rank a contiguous slice of heads: shifted heads are chosen by global index.
    position_ids = packed_positions([[11, 30], [41]])
    kwargs = {"position_ids": position_ids, "segment_ids": segment_ids_from_position_ids(position_ids)}
    q, k, v = random_qkv(2, num_heads, num_kv_heads, 41, seed=5)
    heads, kv_heads = num_heads // num_slices, num_kv_heads // num_slices
    slices = []
    for index in range(num_slices):
        unshifted = min(max(num_heads // 2 - index * heads, 0), heads)
        q_slice = q[:, index * heads : (index + 1) * heads]
        k_slice, v_slice = (x[:, index * kv_heads : (index + 1) * kv_heads] for x in (k, v))
        slices.append(s2_attention(q_slice, k_slice, v_slice, 8, num_unshifted_heads=unshifted, **kwargs))
    expected = reference_attention(q, k, v, 8, **kwargs)
    torch.testing.assert_close(torch.cat(slices, dim=1).double(), expected, atol=1e-5, rtol=1e-5)
