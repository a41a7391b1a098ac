"""Evaluation on CUDA in bf16 at 32k tokens: `load_eval_model` and `perplexity` over one 32k window.

The model is a small random LLaMA (head_dim 128, vocabulary 32000) whose config carries linear position
interpolation 4096 -> 32768, as an exported LongLoRA model's does. bf16 parameters with RoPE's inv_freq kept in fp32
is what `load_eval_model` promises on a GPU; the bf16 perplexity must match the fp32 one on the same GPU to
NLL_TOLERANCE (a random model predicts nearly uniformly, so the two differ by rounding only: 5e-5 measured on
CPU at 4k tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longctx.evaluate import load_eval_model, perplexity

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LENGTH = 32768
VOCAB = 32000
NLL_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    config.rope_parameters = {"rope_type": "linear", "factor": LENGTH / 4096, "rope_theta": 10000.0}
    config.max_position_embeddings = LENGTH
    path = tmp_path_factory.mktemp("eval") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, VOCAB, (LENGTH + 1,), generator=torch.Generator().manual_seed(1))


def test_load_eval_model_on_cuda_is_bf16_with_fp32_rope(model_dir):
    model = load_eval_model(model_dir, torch.device("cuda"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and inv_freq.device.type == "cuda"
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert model.config.rope_parameters["factor"] == LENGTH / 4096  # the interpolation reaches 32k


def test_perplexity_over_one_32k_window_in_bf16_matches_fp32(model_dir, stream):
    bf16 = perplexity(load_eval_model(model_dir, torch.device("cuda")), [stream], [LENGTH])[LENGTH]
    torch.cuda.empty_cache()
    fp32 = perplexity(load_eval_model(model_dir, torch.device("cuda"), torch.float32), [stream], [LENGTH])[LENGTH]
    assert bf16["num_tokens"] == fp32["num_tokens"] == LENGTH  # one window scores all its predictions
    assert math.isfinite(bf16["perplexity"]) and math.isfinite(fp32["perplexity"])
    assert abs(bf16["mean_nll"] - math.log(VOCAB)) < 1.0, bf16  # near uniform over 32000 tokens
    assert abs(bf16["mean_nll"] - fp32["mean_nll"]) < NLL_TOLERANCE, (bf16, fp32)
