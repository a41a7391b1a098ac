"""Every shipped preset and DeepSpeed JSON loads, validates and resolves; the LLaMA-2 presets follow the paper; the
128k presets take their RoPE from the model's released config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from longctx.config import RunConfig, load_config
from longctx.ds_config import resolve_deepspeed_config
from longctx.feasibility import run_problems
from longctx.model import resolve_rope
from longctx.plan import known_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "launch" / "presets").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
PROCESSES = {"tiny-cpu-base": 2, "tiny-cpu": 2}  # the demo's two stages
LLAMA2_PRESETS = [p for p in PRESETS if p.name.startswith("llama2-") and "qlora" not in p.name]  # qlora: test_qlora


def test_the_expected_files_ship():
    names = {p.stem for p in PRESETS}
    assert {"tiny-cpu", "llama2-7b-8k", "llama2-7b-32k", "llama2-7b-100k", "llama2-13b-64k", "llama2-70b-32k"} <= names
    assert {"llama3.1-8b-128k", "qwen2.5-7b-128k"} <= names
    assert {"stage2", "stage3", "stage3_offload"} <= {p.stem for p in DS_CONFIGS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_resolves(preset, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets name ds_configs/ relative to the repository root
    cfg = load_config(RunConfig, preset)
    world_size = PROCESSES.get(preset.stem, 8)  # the LLaMA-2 recipes are for 8 GPUs
    ds = resolve_deepspeed_config(cfg, world_size)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    data_parallel = world_size // cfg.parallel.sequence_parallel_size  # the ranks of one sequence share a batch
    assert ds["train_batch_size"] == cfg.train.global_batch_size == micro * accum * data_parallel
    if cfg.attention.implementation == "s2attn":
        assert cfg.train.seq_len % cfg.group_size == 0


@pytest.mark.parametrize("preset", LLAMA2_PRESETS, ids=lambda p: p.stem)
def test_llama2_presets_follow_the_longlora_recipe(preset):
    cfg = load_config(RunConfig, preset)
    assert cfg.train.max_steps == 1000 and cfg.train.global_batch_size == 64 and cfg.train.warmup_steps == 20
    assert cfg.train.lr == (1e-5 if "70b" in preset.name else 2e-5)
    assert cfg.train.adam_betas == [0.9, 0.95] and cfg.train.schedule == "constant"
    assert cfg.group_size * 4 == cfg.train.seq_len
    # The interpolation follows the model: seq_len / 4096 on Llama-2's config.json, with no context in the preset.
    rope = resolve_rope(cfg, AutoConfig.for_model("llama", max_position_embeddings=4096))
    assert cfg.rope.type == "linear" and rope.factor == cfg.train.seq_len / 4096 and not rope.problems
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.trainable) == (8, 16, ["embed", "norm"])


def preset_config(name: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, ROOT / "launch" / "presets" / f"{name}.yaml", list(overrides))


def released_config(preset: str, **changes) -> AutoConfig:
    """The config.json of the preset's model as released (the one `longctx plan` uses when it is not here)."""
    fields = {**known_config(preset_config(preset).model.path)[0], **changes}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def test_the_reach_preset_is_the_recipe_plus_the_variants_and_the_paper_presets_stay_plain():
    """llama2-7b-32k-reach differs from llama2-7b-32k only in the three S²-Attn variant options (and its output
    directory); the demo's LongLoRA stage trains the same combination; the paper's presets keep plain S²-Attn."""
    from dataclasses import asdict, replace

    plain, reach = preset_config("llama2-7b-32k"), preset_config("llama2-7b-32k-reach")
    assert (reach.attention.sink_tokens, reach.attention.dense_heads, reach.attention.dense_phase) == (4, 2, 0.25)
    variant = {"sink_tokens": 0, "dense_heads": 0, "dense_phase": 0.0}
    reach = replace(reach, attention=replace(reach.attention, **variant), train=replace(reach.train, output_dir=""))
    assert asdict(reach) == asdict(replace(plain, train=replace(plain.train, output_dir="")))
    demo = preset_config("tiny-cpu").attention
    assert (demo.sink_tokens, demo.dense_heads, demo.dense_phase) == (4, 1, 0.25)
    for preset in LLAMA2_PRESETS:
        if preset.stem != "llama2-7b-32k-reach":
            assert not load_config(RunConfig, preset).attention.variant, preset.stem


def test_llama31_at_128k_trains_at_its_own_context_without_interpolation():
    cfg, config = preset_config("llama3.1-8b-128k"), released_config("llama3.1-8b-128k")
    rope = resolve_rope(cfg, config)
    assert cfg.train.seq_len == 131072 == config.max_position_embeddings and cfg.group_size * 4 == cfg.train.seq_len
    assert (rope.base_type, rope.factor, rope.rope_parameters, rope.problems) == ("llama3", 1.0, None, [])
    assert run_problems(cfg, config) == []
    # Twice the length would extend llama3 in its own type: the preset's rope.type is the model's.
    longer = resolve_rope(preset_config("llama3.1-8b-128k", "train.seq_len=262144"), config)
    assert longer.rope_parameters["rope_type"] == "llama3" and longer.rope_parameters["factor"] == 16.0


@pytest.mark.parametrize("positions", [131072, 32768], ids=["base", "instruct"])
def test_qwen25_at_128k_is_qwens_yarn_x4_from_32768(positions):
    """Qwen2.5-7B's config.json states 131072 positions (its YaRN reach), Qwen2.5-7B-Instruct's 32768: both train
    in the YaRN Qwen documents for 131072 tokens."""
    cfg = preset_config("qwen2.5-7b-128k")
    config = released_config("qwen2.5-7b-128k", max_position_embeddings=positions)
    rope = resolve_rope(cfg, config)
    assert rope.rope_parameters == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000.0,
    }  # fmt: skip
    # run_problems: also the sequence-parallel split of its 28 heads and 4 kv heads.
    assert rope.max_position_embeddings == 131072 and rope.problems == [] and run_problems(cfg, config) == []


@pytest.mark.parametrize("ds_config", DS_CONFIGS, ids=lambda p: p.stem)
def test_ds_config_resolves_every_auto_value(ds_config):
    cfg = load_config(RunConfig, None, ["model.init={model_type: llama}", f"deepspeed.config={ds_config}"])
    ds = resolve_deepspeed_config(cfg, world_size=4)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # bf16 / fp16 runs accumulate gradients in fp32
    if "optimizer" in ds:
        assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
