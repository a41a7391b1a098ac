"""build_model: random init or a local directory, RoPE scaling, what trains, and bad model directories."""

from __future__ import annotations

import pytest
import torch

from longctx.config import RunConfig, load_config
from longctx.errors import UserError
from longctx.model import build_model, count_parameters

TINY_LLAMA = (
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 64}"
)


def tiny_config(*overrides: str) -> RunConfig:
    base = [TINY_LLAMA, "attention.implementation=sdpa", "train.seq_len=256", "model.activation_checkpointing=false"]
    return load_config(RunConfig, None, base + list(overrides))


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_adapters_embeddings_and_norms_only():
    model = build_model(tiny_config())
    names = trainable_names(model)
    assert names, "nothing is trainable"
    for name in names:
        assert "lora_" in name or "embed_tokens" in name or "norm" in name, name
    assert any("embed_tokens" in n for n in names) and any(n.endswith("model.norm.weight") for n in names)
    assert any("input_layernorm" in n for n in names) and any("post_attention_layernorm" in n for n in names)
    assert {t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if any(f"{t}.lora_A" in n for n in names)} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any("lm_head" in n for n in frozen) and any("q_proj.base_layer" in n for n in frozen)
    assert any("mlp" in n for n in frozen) and not any("mlp" in n for n in names)


def test_lm_head_trains_when_asked_and_full_fine_tuning_trains_everything():
    with_head = build_model(tiny_config("lora.trainable=[embed,norm,lm_head]"))
    assert any("lm_head" in n for n in trainable_names(with_head))
    full = build_model(tiny_config("lora.enabled=false"))
    trainable, total = count_parameters(full)
    assert trainable == total > 0


def test_random_init_is_seeded():
    a, b = build_model(tiny_config()), build_model(tiny_config())
    c = build_model(tiny_config("train.seed=7"))
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_scaling_goes_into_rope_parameters(rope_type):
    model = build_model(tiny_config(f"rope.type={rope_type}"))  # 64 → 256 tokens: factor 4
    params = model.config.rope_parameters
    assert params["rope_type"] == rope_type and params["factor"] == 4.0 and params["rope_theta"] == 10000.0
    assert model.config.max_position_embeddings == 256
    # YaRN needs the context it extends from; dynamic NTK reads max_position_embeddings, not this key
    assert params.get("original_max_position_embeddings") == (64 if rope_type == "yarn" else None)


def test_linear_interpolation_divides_the_rotary_frequencies():
    plain = build_model(tiny_config("rope.type=none"))
    scaled = build_model(tiny_config("train.seq_len=512"))  # 64 → 512 tokens: factor 8
    inv_freq = dict(plain.named_buffers())["base_model.model.model.rotary_emb.inv_freq"]
    scaled_inv_freq = dict(scaled.named_buffers())["base_model.model.model.rotary_emb.inv_freq"]
    torch.testing.assert_close(scaled_inv_freq, inv_freq / 8)
    assert plain.config.max_position_embeddings == 64 and scaled.config.max_position_embeddings == 512


def test_loads_a_saved_directory_with_its_weights(tmp_path):
    base = build_model(tiny_config("lora.enabled=false", "rope.type=none"), for_training=False)
    base.save_pretrained(tmp_path / "base")
    loaded = build_model(
        load_config(RunConfig, None, [f"model.path={tmp_path / 'base'}", "train.seq_len=128"]), for_training=False
    )
    assert loaded.config.rope_parameters["factor"] == 2.0 and loaded.config.max_position_embeddings == 128
    for (name, p), (_, q) in zip(base.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name


def test_missing_or_corrupt_model_directory_is_one_line_error(tmp_path):
    def build(path):
        return build_model(load_config(RunConfig, None, [f"model.path={path}", "attention.implementation=sdpa"]))

    with pytest.raises(UserError, match="is not a directory"):
        build(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        build(tmp_path / "empty")
    base = build_model(tiny_config("lora.enabled=false", "rope.type=none"), for_training=False)
    base.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not be loaded") as e:
        build(tmp_path / "model")
    assert "\n" not in str(e.value)
    (tmp_path / "model" / "config.json").write_text("{ broken")
    with pytest.raises(UserError, match="config.json is corrupt"):
        build(tmp_path / "model")


def test_s2attn_group_size_must_divide_the_sequence():
    with pytest.raises(UserError, match="not a multiple of the S²-Attn group size 96"):
        build_model(tiny_config("attention.implementation=s2attn", "attention.group_size=96"))


def test_s2attn_takes_an_odd_number_of_heads():
    # LongLoRA shifts heads[H//2:] for any H (SmolLM2: 9 heads); docs/s2attn.md, tests/test_attention.py check the math.
    odd_heads = (
        "model.init={model_type: llama, hidden_size: 48, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 3, num_key_value_heads: 1, vocab_size: 64, max_position_embeddings: 64}"
    )
    model = build_model(tiny_config(odd_heads, "attention.implementation=s2attn"))
    loss = model(input_ids=torch.arange(64)[None] % 64, labels=torch.arange(64)[None] % 64).loss
    loss.backward()
    assert torch.isfinite(loss) and model.config._attn_implementation == "s2attn"
