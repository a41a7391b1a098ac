"""Evaluation computes in the dtype training used: parameters in bf16 on a GPU, RoPE's inv_freq kept in fp32.

Casting the whole model to bf16 (buffers included, what `model.to(device, dtype)` did) rounds inv_freq to 8 bits of
mantissa: the rotation angle position × inv_freq is then off by up to position × 2^-9 rad, a phase error that grows
with the distance, exactly where a long-context evaluation looks. Measured on this model over 8192 positions (mean
|logit difference| from fp32 per block of 1024 positions): parameters-only bf16 0.063 … 0.075, flat; the old cast
0.20 … 1.68, growing; mean NLL over the far half off by 0.003 against 0.028.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from longctx.evaluate import load_eval_model

LENGTH = 8192
BLOCK = 1024
# bf16 evaluation matches fp32 to within this mean |logit difference| per block and NLL over the far half.
BF16_LOGIT_TOLERANCE = 0.15
BF16_NLL_TOLERANCE = 0.01


def logits_and_nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (N, vocab)
    return logits, F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")


def block_means(values: torch.Tensor) -> list[float]:
    return [values[i : i + BLOCK].mean().item() for i in range(0, len(values), BLOCK)]


def test_bf16_evaluation_keeps_rope_in_fp32_and_matches_fp32_where_the_old_cast_drifts(tmp_path):
    torch.manual_seed(0)
    # A larger init than transformers' 0.02 makes attention sharp, so the logits depend on the rotation phases.
    config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=LENGTH, initializer_range=0.2, rope_theta=10000.0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 256, (1, LENGTH))

    fp32 = load_eval_model(tmp_path / "model", torch.device("cpu"))
    bf16 = load_eval_model(tmp_path / "model", torch.device("cpu"), dtype=torch.bfloat16)
    old_cast = copy.deepcopy(fp32).to(torch.bfloat16)  # what evaluation did: buffers cast too
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    assert old_cast.model.rotary_emb.inv_freq.dtype == torch.bfloat16

    reference, reference_nll = logits_and_nll(fp32, ids)
    far = slice(LENGTH // 2, None)
    errors = {}
    for name, model in (("bf16", bf16), ("old cast", old_cast)):
        logits, nll = logits_and_nll(model, ids)
        errors[name] = block_means((logits - reference).abs().mean(-1))
        errors[name + " nll"] = abs(nll[far].mean() - reference_nll[far].mean()).item()
    assert max(errors["bf16"]) < BF16_LOGIT_TOLERANCE, errors
    assert errors["bf16"][-1] < 1.5 * errors["bf16"][0], errors  # no growth with the position
    assert errors["bf16 nll"] < BF16_NLL_TOLERANCE, errors
    # The old cast: an error that grows with the position, far beyond bf16 rounding.
    assert errors["old cast"][-1] > 4 * errors["old cast"][0] and errors["old cast"][-1] > 5 * BF16_LOGIT_TOLERANCE
    assert errors["old cast nll"] > 2 * BF16_NLL_TOLERANCE, errors
