"""Every shipped preset and DeepSpeed JSON loads, validates and resolves; the LLaMA-2 presets follow the paper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from longctx.config import RunConfig, load_config
from longctx.ds_config import resolve_deepspeed_config
from longctx.model import resolve_rope

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "launch" / "presets").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
PROCESSES = {"tiny-cpu-base": 2, "tiny-cpu": 2}  # the demo's two stages
LLAMA2_PRESETS = [p for p in PRESETS if p.name.startswith("llama2-") and "qlora" not in p.name]  # qlora: test_qlora


def test_the_expected_files_ship():
    names = {p.stem for p in PRESETS}
    assert {"tiny-cpu", "llama2-7b-8k", "llama2-7b-32k", "llama2-7b-100k", "llama2-13b-64k", "llama2-70b-32k"} <= names
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
