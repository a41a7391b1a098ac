"""S²-Attn selected through transformers' registry: Llama, Mistral and Qwen2 from tiny random configs."""

import json

import pytest
import torch
from test_attention import reference_attention
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from longctx import attention
from longctx.errors import UserError

SEQ_LEN = 24
GROUP_SIZE = 8
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **_):
    """Attention straight from the definition (float64), with packed documents isolated as the model sees them."""
    seq_len = query.shape[2]
    position_ids = position_ids.expand(query.shape[0], seq_len)
    segment_ids = attention.segment_ids_from_position_ids(position_ids)
    group_size = attention.group_size_for(module.config, seq_len) if module.training else None
    out = reference_attention(query, key, value, group_size, position_ids=position_ids, segment_ids=segment_ids)
    return out.to(query.dtype).transpose(1, 2), None


AttentionInterface.register("s2attn_reference", reference_forward)


def tiny_model(arch, attn_implementation, **config_overrides):
    config = CONFIGS[arch](**TINY, **config_overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if attn_implementation == "s2attn_reference":
        attention.configure(model, group_size=GROUP_SIZE)
    return model


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert attention.register() == "s2attn"
    attention.register()  # idempotent


def s2_model(arch):
    model = tiny_model(arch, "s2attn")
    attention.configure(model, group_size=GROUP_SIZE)
    return model


def inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, SEQ_LEN), generator=generator)


PACKED_POSITIONS = torch.cat([torch.arange(9), torch.arange(15)])[None]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_train_mode_matches_reference_and_eval_mode_matches_sdpa(arch):
    s2 = s2_model(arch).train()
    reference = tiny_model(arch, "s2attn_reference").train()
    sdpa = tiny_model(arch, "sdpa").eval()
    input_ids = inputs()
    for position_ids in (None, PACKED_POSITIONS):
        reference_positions = torch.arange(SEQ_LEN)[None] if position_ids is None else position_ids
        with torch.no_grad():
            train_logits = s2(input_ids, position_ids=position_ids).logits
            expected = reference(input_ids, position_ids=reference_positions).logits
            torch.testing.assert_close(train_logits, expected, atol=1e-5, rtol=1e-5)
            s2.eval()
            eval_logits = s2(input_ids, position_ids=position_ids).logits
            # use_cache=False: with a cache, transformers' sdpa stops isolating packed documents.
            expected = sdpa(input_ids, position_ids=position_ids, use_cache=False).logits
            torch.testing.assert_close(eval_logits, expected)
            s2.train()  # switching back gives S²-Attn again
            torch.testing.assert_close(s2(input_ids, position_ids=position_ids).logits, train_logits)
        assert not torch.allclose(train_logits, eval_logits, atol=1e-3)  # G < N: sparse differs from dense


def test_set_attn_implementation_and_gradients():
    model = tiny_model("llama", "sdpa")
    model.set_attn_implementation("s2attn")
    attention.configure(model, group_size=GROUP_SIZE)
    reference = tiny_model("llama", "s2attn_reference")
    input_ids = inputs()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    expected_loss = reference(input_ids, labels=input_ids).loss
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_padding_is_never_attended_to(training):
    model = s2_model("qwen2").train(training)
    input_ids = inputs(batch=3)
    attention_mask = torch.ones(3, SEQ_LEN, dtype=torch.long)
    attention_mask[1, :6] = 0  # left padding: every real token of row 1 could see it
    attention_mask[2, 17:] = 0  # right padding
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        other_pads = input_ids.masked_fill(attention_mask == 0, 5)
        logits_other_pads = model(other_pads, attention_mask=attention_mask).logits
        alone = model(input_ids[2:, :17]).logits
        unpadded = model(input_ids[:1]).logits
    real = attention_mask.bool()
    torch.testing.assert_close(logits_other_pads[real], logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2:, :17], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:1], unpadded, atol=1e-5, rtol=1e-5)


def test_left_padding_in_eval_matches_sdpa():
    s2 = s2_model("mistral").eval()
    sdpa = tiny_model("mistral", "sdpa").eval()
    input_ids = inputs()
    attention_mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
    attention_mask[0, :5] = 0
    with torch.no_grad():
        got = s2(input_ids, attention_mask=attention_mask).logits
        expected = sdpa(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[0, 5:], expected[0, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_decoding_is_dense(arch):
    s2 = s2_model(arch).eval()
    sdpa = tiny_model(arch, "sdpa").eval()
    prompt = inputs(batch=2)[:, :10]
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :3] = 0  # left padding, as in batched generation
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, use_cache=True)
    with torch.no_grad():
        generated = s2.generate(prompt, **kwargs)
        assert torch.equal(generated, sdpa.generate(prompt, **kwargs))
        # Step by step with a cache: logits of every new token equal the full dense forward.
        full = sdpa(generated[:1]).logits
        out = s2(generated[:1, :10], use_cache=True)
        cache, step_logits = out.past_key_values, [out.logits]
        for index in range(10, generated.shape[1]):
            out = s2(generated[:1, index : index + 1], past_key_values=cache, use_cache=True)
            step_logits.append(out.logits)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_group_size_from_ratio_and_config_round_trip(tmp_path):
    model = tiny_model("llama", "s2attn")
    attention.configure(model, group_size_ratio=0.25)
    assert attention.group_size_for(model.config, 8192) == 2048
    assert attention.group_size_for(model.config, 24) == 6
    assert attention.group_size_for(model.config, 3) == 2  # rounded to an even number >= 2
    reference = tiny_model("llama", "s2attn_reference")
    attention.configure(reference, group_size_ratio=0.25)
    input_ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=1e-5)

    # The settings are a plain dict in config.json; plain transformers loads the model with any attention.
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["s2attn"] == {"group_size": None, "group_size_ratio": 0.25, "backend": "auto"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model.eval()(input_ids).logits)


def test_configure_rejects_bad_settings():
    model = tiny_model("llama", "s2attn")
    with pytest.raises(UserError, match="even"):
        attention.configure(model, group_size=7)
    with pytest.raises(UserError, match="group_size_ratio"):
        attention.configure(model, group_size_ratio=1.5)
    with pytest.raises(UserError, match="backend"):
        attention.configure(model, backend="triton")


def test_a_group_longer_than_the_sliding_window_is_refused():
    # G <= window: S²-Attn never looks further back than G - 1 tokens, so the window holds by construction.
    model = tiny_model("mistral", "s2attn", sliding_window=GROUP_SIZE // 2)
    attention.configure(model, group_size=GROUP_SIZE)
    with pytest.raises(UserError, match=f"set attention.group_size to at most {GROUP_SIZE // 2}$"):
        model(inputs())


# SmolLM2-135M's head layout at toy size: 9 heads over 3 kv heads, head_dim 8.
ODD_HEADS = dict(TINY, hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)


def odd_heads_model(attn_implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**ODD_HEADS), attn_implementation=attn_implementation)
    attention.configure(model, group_size=GROUP_SIZE)
    return model.train()


@pytest.mark.parametrize("position_ids", [None, PACKED_POSITIONS], ids=["plain", "packed"])
def test_nine_heads_train_a_step_as_the_reference(position_ids):
    """A Llama with 9 heads / 3 kv heads trains with attn_implementation="s2attn": one SGD step from the same weights
    gives the float64 reference's loss, gradients and next loss (shifted heads 4..8, G = 8 over 24 tokens)."""
    models = {name: odd_heads_model(name) for name in ("s2attn", "s2attn_reference")}
    input_ids = inputs()
    positions = torch.arange(SEQ_LEN)[None] if position_ids is None else position_ids
    losses = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        first = model(input_ids, labels=input_ids, position_ids=positions).loss
        first.backward()
        optimizer.step()
        with torch.no_grad():
            second = model(input_ids, labels=input_ids, position_ids=positions).loss
        losses[name] = (first.detach(), second)
    for name, p in models["s2attn"].named_parameters():
        torch.testing.assert_close(p, dict(models["s2attn_reference"].named_parameters())[name], msg=name)
    torch.testing.assert_close(losses["s2attn"], losses["s2attn_reference"], atol=1e-5, rtol=1e-5)
    assert losses["s2attn"][1] < losses["s2attn"][0]  # the step trained


def test_nine_heads_evaluate_densely():
    """In eval mode the 9-head model is dense causal attention with packed documents isolated, as sdpa computes it."""
    s2 = odd_heads_model("s2attn").eval()
    sdpa = odd_heads_model("sdpa").eval()
    input_ids = inputs()
    with torch.no_grad():
        for position_ids in (None, PACKED_POSITIONS):
            expected = sdpa(input_ids, position_ids=position_ids, use_cache=False).logits
            torch.testing.assert_close(s2(input_ids, position_ids=position_ids).logits, expected)
