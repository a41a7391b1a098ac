"""Tiled MLP, tiled loss and activation offload compute the same values and gradients as the plain model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.config import RunConfig, load_config
from longctx.model import build_model
from longctx.parallel import shard_batch
from longctx.tiling import TiledMLP, _is_parameter, offload_activations, tiled_loss_sum
from longctx.trainer import IGNORE_INDEX, token_loss_sum

TINY_LLAMA = (
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 96, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 200, max_position_embeddings: 64}"
)
# fp32: tiling only changes how matmuls are blocked and the order of the loss sum.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="silu"))


def output_and_grads(fn, inputs: list[torch.Tensor], params: list[torch.Tensor], grad_out=None):
    """fn(*inputs), then the .grad of inputs and params after backward (tiling accumulates parameter gradients
    in a nested backward, so they are read from .grad, as an optimizer does)."""
    for tensor in [*inputs, *params]:
        tensor.grad = None
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in [*inputs, *params]]


@pytest.mark.parametrize("num_shards", [0, 3, 7])
def test_tiled_mlp_same_values_and_gradients(num_shards):
    mlp = llama_mlp()
    params = list(mlp.parameters())
    x = torch.randn(2, 50, 16, requires_grad=True)
    grad_out = torch.randn(2, 50, 16)
    expected, expected_grads = output_and_grads(mlp, [x], params, grad_out)

    tiled = TiledMLP(mlp, num_shards)
    assert tiled.shards_for(x) == (num_shards or 4)  # 0: ceil(50 tokens / hidden 16)
    out, grads = output_and_grads(tiled, [x], params, grad_out)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)
    # The wrapper exposes the MLP's own parameters under the MLP's own names.
    assert tiled.state_dict().keys() == mlp.state_dict().keys()
    assert all(getattr(p, "ds_grad_is_ready", True) for p in params)


def test_tiled_mlp_runs_each_tile_separately():
    mlp = llama_mlp()
    rows_seen = []
    mlp.gate_proj.register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[1]))
    TiledMLP(mlp, 5)(torch.randn(1, 50, 16, requires_grad=True)).sum().backward()
    # 5 tiles of 10 tokens in forward, recomputed one at a time in backward: never the 50-token intermediate.
    assert rows_seen == [10] * 10


def test_tiled_loss_same_value_and_gradients_and_small_logits():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    targets = torch.randint(0, 300, (2, 37))
    targets[0, -5:] = IGNORE_INDEX

    def plain_loss(h):
        return F.cross_entropy(lm_head(h).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    expected, expected_grads = output_and_grads(plain_loss, [hidden], [lm_head.weight])
    logit_rows = []
    lm_head.register_forward_hook(lambda module, args, out: logit_rows.append(out.shape[0]))
    loss, grads = output_and_grads(lambda h: tiled_loss_sum(lm_head, h, targets, 16), [hidden], [lm_head.weight])
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)
    # 74 tokens in chunks of 16: forward and backward recompute see at most 16 rows of logits at a time.
    assert max(logit_rows) == 16 and sum(logit_rows) == 2 * 74


def model_loss_and_grads(*overrides: str):
    cfg = load_config(RunConfig, None, [TINY_LLAMA, "attention.implementation=s2attn", "train.seq_len=64", *overrides])
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 200, (2, 64), generator=generator)
    labels = input_ids.clone()
    labels[1, -9:] = IGNORE_INDEX
    batch = shard_batch({"input_ids": input_ids, "labels": labels}, 1, 0)
    loss = token_loss_sum(model, batch, cfg.memory)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lora", ["lora.enabled=true", "lora.trainable=[embed,norm,lm_head]", "lora.enabled=false"])
def test_memory_options_leave_the_model_loss_and_gradients_unchanged(lora):
    plain_loss, plain_grads = model_loss_and_grads(lora)
    loss, grads = model_loss_and_grads(
        lora,
        "memory.tiled_mlp=true",
        "memory.tiled_mlp_shards=4",
        "memory.tiled_loss=true",
        "memory.loss_chunk_tokens=24",
        "memory.offload_activations=true",
    )
    torch.testing.assert_close(loss, plain_loss, **TOLERANCE)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **TOLERANCE, msg=name)


TIED_LLAMA = TINY_LLAMA.replace("vocab_size: 200", "vocab_size: 200, tie_word_embeddings: true")


def loss_and_gradients_zero_reduces(*overrides: str):
    """The loss of TIED_LLAMA, and for each trainable weight the gradients ZeRO (stage 1-3) would reduce: its .grad
    each time its gradient hook fires with `ds_grad_is_ready` set (or unset). ZeRO reduces a weight once; a second
    ready firing is its "has already been reduced" error, a first one before the gradient is whole a wrong update."""
    cfg = load_config(RunConfig, None, [TIED_LLAMA, "attention.implementation=s2attn", "train.seq_len=64", *overrides])
    model = build_model(cfg)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    reduced: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            reduced[name] = []

            def hook(param, name=name):  # DeepSpeed's gradient hook is a post-accumulate-grad hook, as this one
                if getattr(param, "ds_grad_is_ready", True):
                    reduced[name].append(param.grad.clone())

            param.register_post_accumulate_grad_hook(hook)
    input_ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(1))
    batch = shard_batch({"input_ids": input_ids, "labels": input_ids}, 1, 0)
    loss = token_loss_sum(model, batch, cfg.memory)
    loss.backward()
    return loss.detach(), reduced


@pytest.mark.parametrize("trainable", ["lora.trainable=[embed,norm]", "lora.enabled=false"])
def test_tied_weight_reaches_zero_once_with_the_plain_gradient(trainable):
    """A tied output head gets gradient inside the tiled loss's nested backward and then from the embedding lookup:
    it must be ready once, after both. Full fine-tuning (lora.enabled=false) covers the tiled MLP's weights too.
    Plain PyTorch sums the parts whatever the flag says: before the fix .grad was right, the ZeRO protocol not."""
    plain_loss, plain = loss_and_gradients_zero_reduces(trainable)
    loss, tiled = loss_and_gradients_zero_reduces(
        trainable, "memory.tiled_loss=true", "memory.loss_chunk_tokens=24", "memory.tiled_mlp=true"
    )
    torch.testing.assert_close(loss, plain_loss, **TOLERANCE)
    assert tiled.keys() == plain.keys() and any("embed_tokens" in name for name in plain)
    for name, gradients in tiled.items():
        assert len(plain[name]) == 1 and len(gradients) == 1, (name, len(gradients))
        torch.testing.assert_close(gradients[0], plain[name][0], **TOLERANCE, msg=name)


def test_offload_keeps_parameters_and_round_trips_activations():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.tanh(linear(x)).sum().backward()
    expected = x.grad.clone()
    # What the hook sees: the input, the weight as a view of the parameter, the tanh output.
    assert [_is_parameter(t) for t in saved] == [False, True, False]

    x.grad = None
    with offload_activations():
        y = torch.tanh(linear(x)).sum()
    y.backward()
    torch.testing.assert_close(x.grad, expected)
