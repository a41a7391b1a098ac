"""S²-Attn backends on CUDA: SDPA and flash-attn varlen against the float64 reference and each other."""

import pytest
import torch
from test_attention import packed_positions, random_qkv, reference_attention

from longctx.attention import _flash_varlen, s2_attention, segment_ids_from_position_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_inputs(batch, num_heads, num_kv_heads, seq_len, head_dim=64):
    return [x.cuda() for x in random_qkv(batch, num_heads, num_kv_heads, seq_len, head_dim, dtype=torch.bfloat16)]


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_backend_matches_reference(backend):
    if backend == "flash" and _flash_varlen() is None:
        pytest.skip("flash-attn is not installed")
    position_ids = packed_positions([[300, 700, 24], [1024], [5, 1000, 19]]).cuda()
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = cuda_inputs(3, 8, 2, 1024)
    for kwargs in ({}, {"position_ids": position_ids, "segment_ids": segment_ids}):
        expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), 256, **{n: t.cpu() for n, t in kwargs.items()})
        got = s2_attention(q, k, v, 256, backend=backend, **kwargs)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double().cpu(), expected, atol=2e-2, rtol=2e-2)


def test_no_gradient_from_the_future_on_cuda():
    q, k, v = (x.float().requires_grad_() for x in cuda_inputs(1, 4, 2, 96))
    s2_attention(q, k, v, 32)[:, :, 5].sum().backward()  # index 5: inside the shifted heads' first half group
    for x in (q, k, v):
        assert torch.count_nonzero(x.grad[:, :, 6:]) == 0
