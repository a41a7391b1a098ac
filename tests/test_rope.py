"""RoPE scaling resolved against the model's own config: its trained context and its scaling win over a preset's
numbers, extending a model that has scaling already composes with it (or is refused where no single rope_type can),
and the exported config.json makes plain transformers compute what training computed.

The bases are tiny random models with the RoPE settings of real ones, positions scaled down 128x: Llama-2 (no
scaling), Llama-3.1 (llama3 factor 8 over 64 positions, max_position_embeddings 1024, as 8192 / 131072), Qwen2.5
with YaRN (rope_scaling in the 4.x spelling, factor 4 over max_position_embeddings 256), a linear model (as longctx
exports: max_position_embeddings is the scaled context) and a dynamic NTK model. Every run extends to 2048 tokens.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from longctx import checkpoint, merge
from longctx.config import ConfigError, RunConfig, load_config
from longctx.model import apply_rope_scaling, build_model, check_rope, resolve_rope, trained_context

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "tests" / "dist" / "train_tiny.py"
SEQ_LEN = 2048
# head_dim 16: 8 rotary frequencies
SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96, tie_word_embeddings=False,
)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
BASES = {
    "llama2": dict(max_position_embeddings=256, rope_theta=10000.0),
    "llama3.1": dict(
        max_position_embeddings=1024,
        rope_parameters={**LLAMA3, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    ),
    "qwen2.5-yarn": dict(
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    ),
    "linear": dict(max_position_embeddings=512, rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(max_position_embeddings=256, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
}
# (base, rope.type) -> (the model's trained context, the extension, the extended model's rope_parameters).
EXTENSIONS = {
    ("llama2", "linear"): (256, 8.0, {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}),
    ("llama2", "dynamic"): (256, 8.0, {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}),
    ("llama2", "yarn"): (
        256,
        8.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
    ),
    ("llama3.1", "llama3"): (  # trained to max_position_embeddings (1024), not 64 x 8: factor 8 x 2
        1024,
        2.0,
        {**LLAMA3, "factor": 16.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    ),
    ("qwen2.5-yarn", "yarn"): (  # trained to 256 x 4 = 1024 by its YaRN: factor 4 x 2, the legacy "type" gone
        1024,
        2.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 1000000.0},
    ),
    ("linear", "linear"): (512, 4.0, {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}),
    ("dynamic", "linear"): (256, 8.0, {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}),
    ("dynamic", "yarn"): (
        256,
        8.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
    ),
}
# (base, rope.type) -> what the refusal must offer instead.
REFUSED = {
    ("llama3.1", "linear"): "set rope.type=llama3 (its factor 8 x 2 = 16",
    ("llama3.1", "yarn"): "set rope.type=llama3",
    ("qwen2.5-yarn", "linear"): "set rope.type=yarn (its factor 4 x 2 = 8",
    ("qwen2.5-yarn", "dynamic"): "set rope.type=yarn",
    ("linear", "yarn"): "set rope.type=linear (its factor 2 x 4 = 8",
    ("llama2", "llama3"): "set rope.type=linear or rope.type=dynamic or rope.type=yarn",
}


def pair_ids(pairs) -> list[str]:
    return [f"{kind}-on-{base}" for base, kind in pairs]


def hf_config(base: str):
    return AutoConfig.for_model("llama", **SHAPE, **BASES[base])


def run_config(*overrides: str, seq_len: int = SEQ_LEN) -> RunConfig:
    init = "model.init={model_type: llama}"  # the HF config is given to the functions directly
    return load_config(RunConfig, None, [init, f"train.seq_len={seq_len}", "attention.implementation=sdpa", *overrides])


def rotary(config):
    """The rotary embedding plain transformers builds for `config`."""
    return AutoModelForCausalLM.from_config(config).model.rotary_emb


def cos_sin(rotary_embedding, positions: torch.Tensor) -> torch.Tensor:
    """(2, N, head_dim): cos and sin (attention scaling included) at `positions`, as attention receives them."""
    x = torch.zeros(1, len(positions), 16)
    cos, sin = rotary_embedding(x, positions[None])
    return torch.stack([cos[0], sin[0]])


def export_config(config, cfg: RunConfig, directory: Path) -> dict:
    """config.json as the export writes it (merge.write_merged / export's adapter): clean_config + legacy keys."""
    merge.clean_config(config, cfg, torch.float32).save_pretrained(str(directory))
    merge.add_legacy_rope_keys(directory / "config.json")
    return json.loads((directory / "config.json").read_text())


@pytest.fixture
def rope_warnings(caplog):
    """Warnings transformers logs about RoPE settings (its validation warns, and goes on, on keys it does not read)."""
    transformers_logging.enable_propagation()
    yield lambda: [r.getMessage() for r in caplog.records if "rope" in r.getMessage().lower()]
    transformers_logging.disable_propagation()


# ----------------------------------------------------------------------------------------------------------------
# Resolution: the model's context and scaling win
# ----------------------------------------------------------------------------------------------------------------


def test_trained_context_is_the_scaled_one():
    assert trained_context(hf_config("llama2")) == (256, "max_position_embeddings")
    assert trained_context(hf_config("llama3.1")) == (1024, "max_position_embeddings")  # not 64 x 8 = 512
    context, source = trained_context(hf_config("qwen2.5-yarn"))  # its YaRN reaches past max_position_embeddings
    assert context == 1024 and "original_max_position_embeddings 256" in source
    assert trained_context(hf_config("linear"))[0] == 512 and trained_context(hf_config("dynamic"))[0] == 256


@pytest.mark.parametrize(("base", "kind"), EXTENSIONS, ids=pair_ids(EXTENSIONS))
def test_extension_resolves_from_the_models_context(base, kind):
    original_context, factor, rope_parameters = EXTENSIONS[base, kind]
    scaling = resolve_rope(run_config(f"rope.type={kind}"), hf_config(base))
    assert scaling.problems == []
    assert (scaling.original_context, scaling.factor) == (original_context, factor)
    assert scaling.rope_parameters == rope_parameters and scaling.max_position_embeddings == SEQ_LEN


@pytest.mark.parametrize(("base", "kind"), REFUSED, ids=pair_ids(REFUSED))
def test_extension_without_an_exact_composition_is_refused_naming_the_alternatives(base, kind):
    (problem,) = check_rope(run_config(f"rope.type={kind}"), hf_config(base))
    assert f"rope.type={kind}" in problem and REFUSED[base, kind] in problem and "\n" not in problem
    config = hf_config(base)
    with pytest.raises(ConfigError, match=f"rope.type={kind}"):
        apply_rope_scaling(config, run_config(f"rope.type={kind}"))
    assert config.to_dict() == hf_config(base).to_dict()  # nothing written


def test_a_rope_type_longctx_cannot_extend_is_refused():
    phi3 = AutoConfig.for_model(
        "llama",
        **SHAPE,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 256, "rope_theta": 10000.0,
        },
    )  # fmt: skip
    (problem,) = check_rope(run_config(), phi3)
    assert "rope_type=longrope" in problem and "set rope.type=none" in problem


def test_nothing_changes_when_the_model_already_covers_the_run():
    # Llama-3.1 at 512 tokens: its llama3 scaling is kept, whatever rope.type says.
    for kind in ("linear", "yarn", "llama3", "none"):
        scaling = resolve_rope(run_config(f"rope.type={kind}", seq_len=512), hf_config("llama3.1"))
        assert scaling.rope_parameters is None and scaling.problems == []
    config = hf_config("llama3.1")
    apply_rope_scaling(config, run_config(seq_len=1024))
    assert config.to_dict() == hf_config("llama3.1").to_dict()


# ----------------------------------------------------------------------------------------------------------------
# A preset that contradicts the model
# ----------------------------------------------------------------------------------------------------------------

SMOLLM2 = dict(max_position_embeddings=8192, rope_theta=100000.0)  # SmolLM2-135M: trained to 8192 tokens
OLD_LLAMA2_PRESET = ["rope.original_context=4096", "rope.factor=8.0"]  # what llama2-7b-32k.yaml used to impose


def test_a_preset_context_that_contradicts_the_model_is_one_line_naming_both_numbers():
    smollm2 = AutoConfig.for_model("llama", **SHAPE, **SMOLLM2)
    cfg = run_config(*OLD_LLAMA2_PRESET, "model.path=models/SmolLM2-135M", "model.init={}", seq_len=32768)
    (problem,) = check_rope(cfg, smollm2)
    assert problem.startswith("rope.original_context=4096 but model.path=models/SmolLM2-135M was trained to 8192")
    assert "(max_position_embeddings)" in problem and "remove rope.original_context" in problem
    assert "rope.override_model=true" in problem and "\n" not in problem
    with pytest.raises(ConfigError, match="rope.original_context=4096 but"):
        apply_rope_scaling(smollm2, cfg)
    assert smollm2.max_position_embeddings == 8192  # nothing written


def test_a_preset_factor_that_contradicts_train_seq_len_is_refused():
    cfg = run_config("rope.factor=8", seq_len=32768)
    (problem,) = check_rope(cfg, AutoConfig.for_model("llama", **SHAPE, **SMOLLM2))
    assert problem.startswith("rope.factor=8 but train.seq_len=32768 / the original context 8192 = 4: remove")
    # Llama-3.1 with the factor a LLaMA-2 preset set: refused, where it used to replace llama3 by plain linear;
    # both problems at once (the factor, and linear on llama3).
    factor, composition = check_rope(run_config("rope.factor=8", seq_len=512), hf_config("llama3.1"))
    assert factor.startswith("rope.factor=8 but train.seq_len=512 / the original context 1024 = 0.5")
    assert "set rope.type=llama3" in composition


def test_override_model_takes_the_presets_numbers():
    smollm2 = AutoConfig.for_model("llama", **SHAPE, **SMOLLM2)
    cfg = run_config(*OLD_LLAMA2_PRESET, "rope.override_model=true", seq_len=32768)
    assert check_rope(cfg, smollm2) == []
    apply_rope_scaling(smollm2, cfg)
    assert smollm2.rope_parameters == {"rope_type": "linear", "factor": 8.0, "rope_theta": 100000.0}
    assert smollm2.max_position_embeddings == 32768
    with pytest.raises(ConfigError, match="rope.override_model=true overrides nothing"):
        run_config("rope.override_model=true")


@pytest.mark.parametrize(("preset", "context", "factor"), [("llama2-7b-32k", 4096, 8.0), ("llama2-7b-32k", 8192, 4.0)])
def test_the_llama2_preset_interpolates_from_the_models_own_context(preset, context, factor, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets name ds_configs/ relative to the repository root
    cfg = load_config(RunConfig, ROOT / "launch" / "presets" / f"{preset}.yaml")
    scaling = resolve_rope(cfg, AutoConfig.for_model("llama", **SHAPE, max_position_embeddings=context))
    assert scaling.problems == [] and scaling.factor == factor and scaling.max_position_embeddings == 32768


# ----------------------------------------------------------------------------------------------------------------
# What plain transformers computes from the extended config
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "scale"), [("llama2", 8), ("linear", 4), ("dynamic", 8)])
def test_linear_extension_is_exactly_position_interpolation_on_the_model(base, scale, tmp_path):
    """Position s·p of the extended model has the angles of position p of the model, at every p of its context:
    what interpolating the model's own positions by s means. (A linear base whose factor were replaced, not
    multiplied, or a dynamic base extended from the wrong context, would fail this.)"""
    cfg, config = run_config("rope.type=linear"), hf_config(base)
    apply_rope_scaling(config, cfg)
    export_config(config, cfg, tmp_path)
    extended = AutoConfig.from_pretrained(tmp_path)
    context = trained_context(hf_config(base))[0]
    positions = torch.arange(context)
    torch.testing.assert_close(
        cos_sin(rotary(extended), positions * scale), cos_sin(rotary(hf_config(base)), positions), atol=1e-4, rtol=0
    )


def test_llama3_extension_divides_the_low_band_and_keeps_the_high_band(tmp_path):
    """llama3 at factor 8 x 2: the low-frequency band (wavelength > 64 positions) is interpolated 2x further, the
    high band (< 16) stays as trained. That is not interpolation of the whole model (which divides every frequency
    by 2), the reason rope.type=linear is refused on a llama3 model."""
    cfg = run_config("rope.type=llama3")
    config = hf_config("llama3.1")
    apply_rope_scaling(config, cfg)
    export_config(config, cfg, tmp_path)
    extended = AutoConfig.from_pretrained(tmp_path)
    base_rotary, extended_rotary = rotary(hf_config("llama3.1")), rotary(extended)
    base_inv_freq, inv_freq = base_rotary.inv_freq, extended_rotary.inv_freq
    wavelength = 2 * math.pi / (1.0 / 500000.0 ** (torch.arange(0, 16, 2) / 16))
    low, high = wavelength > 64, wavelength < 16
    assert low.sum() == 6 and high.sum() == 1  # the tiny model has all three bands
    torch.testing.assert_close(inv_freq[low], base_inv_freq[low] / 2)
    torch.testing.assert_close(inv_freq[high], base_inv_freq[high])
    medium = ~(low | high)
    assert (inv_freq[medium] < base_inv_freq[medium]).all() and (inv_freq[medium] > base_inv_freq[medium] / 2).all()
    assert extended_rotary.attention_scaling == 1.0
    assert not torch.allclose(inv_freq, base_inv_freq / 2)  # what linear on top would have been


@pytest.mark.parametrize(("base", "factor"), [("llama2", 8.0), ("qwen2.5-yarn", 8.0), ("dynamic", 8.0)])
def test_yarn_extension_is_yarn_from_the_unscaled_frequencies(base, factor, tmp_path):
    """YaRN at the total factor over original_max_position_embeddings: the highest frequency as pretrained, the
    lowest divided by the factor, cos/sin scaled by 0.1 ln(factor) + 1."""
    cfg, config = run_config("rope.type=yarn"), hf_config(base)
    apply_rope_scaling(config, cfg)
    export_config(config, cfg, tmp_path)
    extended = AutoConfig.from_pretrained(tmp_path)
    theta = config.rope_parameters["rope_theta"]
    pretrained = 1.0 / theta ** (torch.arange(0, 16, 2) / 16)
    extended_rotary = rotary(extended)
    assert extended_rotary.inv_freq[0] == pretrained[0]
    torch.testing.assert_close(extended_rotary.inv_freq[-1], pretrained[-1] / factor)
    assert extended_rotary.attention_scaling == pytest.approx(0.1 * math.log(factor) + 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The exported config.json
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "kind"), EXTENSIONS, ids=pair_ids(EXTENSIONS))
def test_exported_config_says_the_same_in_both_spellings_and_loads_as_trained(base, kind, tmp_path, rope_warnings):
    cfg, config = run_config(f"rope.type={kind}"), hf_config(base)
    apply_rope_scaling(config, cfg)
    positions = torch.arange(SEQ_LEN)
    trained = cos_sin(rotary(config), positions)
    raw = export_config(config, cfg, tmp_path)
    rope_parameters = raw["rope_parameters"]
    assert rope_parameters == EXTENSIONS[base, kind][2] and raw["max_position_embeddings"] == SEQ_LEN
    scaling = {key: value for key, value in rope_parameters.items() if key != "rope_theta"}
    assert raw["rope_scaling"] == {**scaling, "type": rope_parameters["rope_type"]}
    assert raw["rope_theta"] == rope_parameters["rope_theta"]
    # Each spelling alone (a reader that knows only one) and both together give the training-time cos/sin.
    only_parameters = {key: value for key, value in raw.items() if key not in ("rope_scaling", "rope_theta")}
    only_legacy = {key: value for key, value in raw.items() if key != "rope_parameters"}
    for variant in (raw, only_parameters, only_legacy):
        (tmp_path / "config.json").write_text(json.dumps(variant))
        loaded = AutoConfig.from_pretrained(tmp_path)
        torch.testing.assert_close(cos_sin(rotary(loaded), positions), trained, atol=0, rtol=0)
    assert rope_warnings() == []  # transformers' validation accepts every key written


def test_exported_dynamic_keeps_the_max_position_embeddings_it_trained_with(tmp_path):
    """Dynamic NTK reads max_position_embeddings: with an overridden factor (2: 512 positions) the run trained at
    2048 with NTK active past 512, so the export must not move max_position_embeddings to train.seq_len."""
    cfg = run_config("rope.type=dynamic", "rope.factor=2", "rope.override_model=true")
    config = hf_config("llama2")
    apply_rope_scaling(config, cfg)
    positions = torch.arange(SEQ_LEN)
    trained = cos_sin(rotary(config), positions)
    raw = export_config(config, cfg, tmp_path)
    assert raw["max_position_embeddings"] == 512
    torch.testing.assert_close(cos_sin(rotary(AutoConfig.from_pretrained(tmp_path)), positions), trained)


# ----------------------------------------------------------------------------------------------------------------
# End to end: the exported model's logits are the training-time model's, past the base's context
# ----------------------------------------------------------------------------------------------------------------

TOKENS = torch.tensor([[(7 * i + 3) % 96 for i in range(1536)]])  # longer than every base's context


def save_base(base: str, directory: Path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config(base)).save_pretrained(directory)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS).logits[0]  # (N, vocab)


@pytest.mark.parametrize(
    ("base", "kind"), [("llama2", "linear"), ("llama3.1", "llama3"), ("qwen2.5-yarn", "yarn"), ("linear", "linear")]
)
def test_exported_model_computes_the_training_time_logits(base, kind, tmp_path):
    save_base(base, tmp_path / "base")
    overrides = [f"model.path={tmp_path / 'base'}", f"rope.type={kind}", "model.dtype=float32"]
    cfg = load_config(RunConfig, None, [*overrides, f"train.seq_len={SEQ_LEN}", "attention.implementation=sdpa"])
    training_model = build_model(cfg, for_training=False)
    out = tmp_path / "exported"
    training_model.save_pretrained(out)
    export_config(merge.scaled_config(cfg), cfg, out)  # what merge.write_merged writes beside the weights

    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.rope_parameters["factor"] == EXTENSIONS[base, kind][2]["factor"]
    expected = logits(training_model)
    torch.testing.assert_close(logits(exported), expected, atol=1e-5, rtol=0)
    # The RoPE scaling is what the comparison is about: the base's own RoPE gives other logits.
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base")) - expected).abs().max() > 1e-3


def test_a_trained_llama3_model_exports_as_it_trained(tmp_path):
    """The public path: a run on a Llama-3.1-style base (tests/dist/train_tiny.py, one process, ZeRO-3) writes its
    final model; plain transformers loads it and computes the checkpoint's logits at 1536 tokens."""
    save_base("llama3.1", tmp_path / "base")
    overrides = [f"model.path={tmp_path / 'base'}", "model.init={}", "rope.type=llama3", f"train.seq_len={SEQ_LEN}"]
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), str(tmp_path / "run"), "--num-samples", "2", "train.max_steps=1"]
        + ["train.global_batch_size=1", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["rope_parameters"] == EXTENSIONS["llama3.1", "llama3"][2]
    assert config["rope_scaling"]["factor"] == 16.0 and config["max_position_embeddings"] == SEQ_LEN
    trained, _ = merge.load_trained_model(checkpoint.complete_checkpoints(tmp_path / "run")[-1])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(final)), logits(trained), atol=1e-5, rtol=0)
