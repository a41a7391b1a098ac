"""A 4-bit NF4 base (LongQLoRA): one-rank ZeRO-2 training from a base directory; the loss falls; only LoRA, embedding
and norms change while the 4-bit base stays bit-identical; resume is exact; export dequantizes and merges into a
plain transformers model with the training-time logits; eval loads 4-bit checkpoints; bad combinations are refused."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from longctx import checkpoint
from longctx.config import ConfigError, RunConfig, load_config
from longctx.ds_config import resolve_deepspeed_config
from longctx.errors import UserError
from longctx.evaluate import load_eval_model
from longctx.export import export
from longctx.model import build_model, count_parameters, resolve_rope
from longctx.quant import BLOCK_LINEARS, is_quantized_linear

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist" / "qlora_train.py"
LOAD_SCRIPT = ROOT / "tests" / "dist" / "qlora_load_plain.py"
sys.path.insert(0, str(SCRIPT.parent))
from qlora_train import QLORA  # noqa: E402
from test_export import write_word_tokenizer  # noqa: E402
from train_tiny import TINY_LLAMA  # noqa: E402

# 4 sequences = one global batch, trained on again and again: the loss must fall well within 8 steps.
RUN = ["--num-samples", "4", "train.max_steps=8", "train.lr=1e-2", "train.save_every=4", "train.keep_last=2"]
# Longer than the base context (32 positions), so the logits also depend on the RoPE scaling.
TOKENS = [(7 * i + 3) % 96 for i in range(48)]
# Export vs training-time 4-bit model, fp32: the export multiplies by exactly the dequantized 4-bit weights, so only
# the summation order differs (merged W + s·B·A vs W·x + s·B·(A·x)): measured 1.5e-7 on logits of size ~0.9. The
# same trained weights on the full-precision base differ by ~7e-2 (the 4-bit quantization error).
EXPORT_ATOL = 1e-5


def run_qlora(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output_dir), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, base dir): NF4 base loaded from a directory (with a tokenizer), one rank, ZeRO-2, 8 steps."""
    root = tmp_path_factory.mktemp("qlora")
    base = root / "base"
    build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False).save_pretrained(base)
    write_word_tokenizer(base)
    overrides = ["model.init={}", f"model.path={base}", "deepspeed.config=ds_configs/stage2.json"]
    run_qlora(root / "run", *RUN, *overrides)
    return root / "run", base


def training_time_logits(ckpt_dir: Path, *, quantized: bool = True) -> torch.Tensor:
    """Logits of the model as training ran it: the 4-bit base + LoRA + trained embed/norm, in train mode with
    autograd on (bitsandbytes' training path), loaded with the checkpoint's trained weights. quantized=False puts the
    same trained weights on the original full-precision base instead."""
    cfg = checkpoint.load_run_config(ckpt_dir)
    if not quantized:
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, type="none"))
    model = build_model(cfg)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == trainable  # the checkpoint holds exactly what trains: no frozen 4-bit base
    model.load_state_dict(trained, strict=False)
    return model(torch.tensor([TOKENS])).logits[0].detach()  # (N, vocab)


def test_4bit_run_trains_only_lora_embed_norm_and_keeps_the_base_bit_identical(qlora_run):
    run_dir, _ = qlora_run
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses

    # The engine's packed NF4 codes and quantization constants after 8 steps equal a fresh 4-bit build's.
    base_check = json.loads((run_dir / "base_check_rank0.json").read_text())
    assert base_check["num_quantized"] == 14 and base_check["differing"] == []  # 2 blocks × 7 linears
    assert base_check["storage_dtype"] == "torch.uint8"  # ZeRO-2: the plain packed bytes

    # What trained moved; the checkpoint holds only LoRA, embedding and norms (the 4-bit base is rebuilt, not saved).
    saved = checkpoint.complete_checkpoints(run_dir)[-1]
    trained = get_fp32_state_dict_from_zero_checkpoint(str(saved.parent), tag=saved.name)
    initial = build_model(checkpoint.load_run_config(saved)).state_dict()
    assert all("lora_" in name or "embed_tokens" in name or "norm" in name for name in trained), sorted(trained)
    changed = {name for name in trained if not torch.equal(trained[name], initial[name])}
    for part in ("mlp.down_proj.lora_B", "self_attn.q_proj.lora_B", "embed_tokens", "input_layernorm", "model.norm"):
        assert any(part in name for name in changed), part
    assert sum(f.stat().st_size for f in saved.glob("*.pt")) < 1_000_000


def test_4bit_resume_continues_exactly(qlora_run, tmp_path):
    run_dir, base = qlora_run
    step_4 = run_dir / "checkpoints" / "step_00000004"
    overrides = ["model.init={}", f"model.path={base}", "deepspeed.config=ds_configs/stage2.json"]
    resumed = run_qlora(tmp_path / "resumed", *RUN, *overrides, f"train.resume={step_4}")
    assert "step_00000004 at step 4" in resumed.stdout
    expected = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(run_dir)][4:]
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(tmp_path / "resumed")] == expected


def test_export_dequantizes_and_merges_into_a_plain_model_with_the_training_logits(qlora_run, tmp_path):
    run_dir, base = qlora_run
    result = export(run_dir, tmp_path / "export", format="both", dtype="fp32")
    out = result.written["merged"]
    adapter = load_file(result.written["adapter"] / "adapter_model.safetensors")
    assert any("mlp.down_proj.lora_B" in key for key in adapter) and not any("base_layer" in key for key in adapter)
    assert 'bnb_4bit_quant_type="nf4"' in (result.written["adapter"] / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["rope_parameters"]["factor"] == 2.0
    weights = load_file(out / "model.safetensors")
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    assert not any("absmax" in key or "lora" in key for key in weights)

    loaded = subprocess.run(
        [sys.executable, str(LOAD_SCRIPT), str(out), str(tmp_path / "plain"), *map(str, TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    facts = json.loads((tmp_path / "plain.json").read_text())
    assert facts == {
        "longctx_imported": False,
        "bitsandbytes_imported": False,
        "q_proj_class": "Linear",
        "is_quantized": False,
    }
    plain = load_file(tmp_path / "plain.safetensors")["logits"]
    expected = training_time_logits(result.checkpoint)
    torch.testing.assert_close(plain, expected, atol=EXPORT_ATOL, rtol=0)
    # The same trained weights on the full-precision base give other logits: the export carries the 4-bit weights.
    assert (plain - training_time_logits(result.checkpoint, quantized=False)).abs().max() > 10 * EXPORT_ATOL


def test_eval_loads_a_4bit_run_as_its_dequantized_merged_model(qlora_run, tmp_path):
    run_dir, _ = qlora_run
    model = load_eval_model(run_dir, device=torch.device("cpu"))
    assert not any(is_quantized_linear(m) for m in model.modules())
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0]
    expected = training_time_logits(checkpoint.complete_checkpoints(run_dir)[-1])
    torch.testing.assert_close(logits, expected, atol=EXPORT_ATOL, rtol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_build_quantizes_the_block_linears_only(quant_type):
    cfg = load_config(RunConfig, None, [TINY_LLAMA, *QLORA, f"quant.type={quant_type}"])
    model = build_model(cfg)
    base = model.get_base_model()
    quantized = [m for m in base.modules() if is_quantized_linear(m)]
    assert len(quantized) == 14 and all(m.weight.quant_state.quant_type == quant_type for m in quantized)
    assert type(base.lm_head) is nn.Linear and not base.lm_head.weight.requires_grad  # unquantized, frozen
    assert base.model.embed_tokens.weight.requires_grad and base.model.norm.weight.requires_grad
    assert base.model.embed_tokens.weight.dtype == torch.float32
    full = build_model(load_config(RunConfig, None, [TINY_LLAMA, *QLORA[1:]]))
    assert count_parameters(model) == count_parameters(full)  # packed 4-bit weights counted as what they stand for


def test_bad_combinations_are_one_line_errors():
    with pytest.raises(ConfigError) as full_fine_tuning:
        load_config(RunConfig, None, [TINY_LLAMA, "quant.type=nf4", "lora.enabled=false"])
    assert "set lora.enabled=true" in str(full_fine_tuning.value) and "\n" not in str(full_fine_tuning.value)

    # A bf16 engine casts float parameters to bf16, which would rewrite fp32-stored packed codes.
    cfg = load_config(RunConfig, None, [TINY_LLAMA, *QLORA, "model.dtype=bfloat16", "quant.storage_dtype=float32"])
    with pytest.raises(UserError) as wrong_container:
        build_model(cfg)
    message = str(wrong_container.value)
    assert "quant.storage_dtype=auto" in message and "corrupt" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "num_gpus", "zero_stage"), [("llama2-7b-8k-qlora", 1, 2), ("llama2-70b-32k-qlora", 8, 3)]
)
def test_qlora_presets_follow_the_longqlora_recipe(name, num_gpus, zero_stage, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets name ds_configs/ relative to the repository root
    cfg = load_config(RunConfig, ROOT / "launch" / "presets" / f"{name}.yaml")
    assert (cfg.quant.type, cfg.quant.double_quant, cfg.quant.storage_dtype) == ("nf4", True, "auto")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.trainable) == (64, 16, 0.05, ["embed", "norm"])
    assert sorted(cfg.lora.target_modules) == sorted(BLOCK_LINEARS)
    assert (cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.warmup_steps) == (1000, 16, 20)
    assert cfg.train.grad_clip == 0.3 and cfg.train.schedule == "constant"
    rope = resolve_rope(cfg, AutoConfig.for_model("llama", max_position_embeddings=4096))  # Llama-2's context
    assert cfg.group_size * 4 == cfg.train.seq_len and rope.factor == cfg.train.seq_len / 4096 and not rope.problems
    ds = resolve_deepspeed_config(cfg, num_gpus)
    assert ds["zero_optimization"]["stage"] == zero_stage and ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 16 // num_gpus
