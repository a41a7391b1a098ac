"""S²-Attn backends on CUDA: SDPA and flash-attn varlen against the float64 reference and each other.

Tolerances, bf16 against the float64 reference computed from the same bf16 inputs: outputs within atol = rtol = 2e-2
(bf16 keeps 8 significant bits, ~4e-3 relative, and the kernels accumulate in fp32). Input gradients sum over up to
G keys (dk, dv) or G keys and the head dimension (dq), so their rounding scales with their typical size: each entry
within GRAD_ATOL_RMS × rms(reference) + GRAD_RTOL × |reference|, and the whole tensor within GRAD_NORM_RTOL relative
error in norm. Measured with the SDPA backend in bf16 on CPU for these shapes: at most 0.08 × rms (with rtol 2e-2)
and 0.005 in norm.
"""

import pytest
import torch
from test_attention import packed_positions, random_qkv, reference_attention

from longctx.attention import _flash_varlen, s2_attention, segment_ids_from_position_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


GRAD_ATOL_RMS, GRAD_RTOL, GRAD_NORM_RTOL = 0.25, 2e-2, 2e-2


def cuda_inputs(batch, num_heads, num_kv_heads, seq_len, head_dim=64):
    return [x.cuda() for x in random_qkv(batch, num_heads, num_kv_heads, seq_len, head_dim, dtype=torch.bfloat16)]


def assert_gradient_close(got, expected, what):
    rms = expected.pow(2).mean().sqrt().item()
    torch.testing.assert_close(got, expected, atol=GRAD_ATOL_RMS * rms, rtol=GRAD_RTOL, msg=lambda m: f"{what}: {m}")
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < GRAD_NORM_RTOL, f"{what}: relative error {relative:.2e} in norm"


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


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_backend_forward_and_backward_match_reference_with_packed_documents(backend):
    if backend == "flash" and _flash_varlen() is None:
        pytest.skip("flash-attn is not installed")
    # LLaMA's head_dim 128, GQA 4:1; documents that cross group edges, one as long as the row, many short ones.
    position_ids = packed_positions([[300, 700, 24], [1024], [5, 1000, 19]])
    segment_ids = segment_ids_from_position_ids(position_ids)
    q, k, v = cuda_inputs(3, 8, 2, 1024, head_dim=128)
    grad_output = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for kwargs in ({}, {"position_ids": position_ids, "segment_ids": segment_ids}):
        got = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        output = s2_attention(*got, 256, backend=backend, **{n: t.cuda() for n, t in kwargs.items()})
        output.backward(grad_output.cuda())
        expected = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
        reference = reference_attention(*expected, 256, **kwargs)
        reference.backward(grad_output.double())
        what = f"{backend}, {'packed documents' if kwargs else 'plain positions'}"
        torch.testing.assert_close(output.detach().double().cpu(), reference.detach(), atol=2e-2, rtol=2e-2)
        for name, x, x_reference in zip("qkv", got, expected):
            assert x.grad.dtype == torch.bfloat16, (what, name)
            assert_gradient_close(x.grad.double().cpu(), x_reference.grad, f"d{name} ({what})")


def test_no_gradient_from_the_future_on_cuda():
    q, k, v = (x.float().requires_grad_() for x in cuda_inputs(1, 4, 2, 96))
    s2_attention(q, k, v, 32)[:, :, 5].sum().backward()  # index 5: inside the shifted heads' first half group
    for x in (q, k, v):
        assert torch.count_nonzero(x.grad[:, :, 6:]) == 0
