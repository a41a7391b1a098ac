"""bf16 trains wherever fp32 trains: 2 ranks under the deepspeed launcher (gloo), through the real CLI, on a model
directory saved in bf16 and shards packed from text, for every training setup the GPU presets use.

The model ties its input and output embeddings (as SmolLM2 and Llama-3.2 do), so the trainable embeddings move the
output distribution and a random-init model's loss falls clearly within a few steps.

Each bf16 run must train (its loss falls) and its first steps must follow the same run in fp32 (the same bf16 weights
loaded as fp32) within BF16_LOSS_TOLERANCE; a bf16 run stopped and resumed must give the uninterrupted run's losses
and final weights bit for bit.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.pack import pack
from data_prep.tokenizer import train_sentencepiece
from longctx.config import PrepConfig, from_dict

sys.path.insert(0, str(Path(__file__).parent))
from prep_fixtures import synthetic_docs, write_text_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
VOCAB = 500
# Relative difference of a bf16 run's loss from the fp32 run's over the first FIRST_STEPS steps. bf16 keeps 8 bits of
# mantissa (relative rounding 2^-9 = 0.2% per operation); measured here: at most 0.073% (LoRA on ZeRO-2, ZeRO-3 and
# ZeRO-3 with CPU offload), 0.020% (full fine-tuning), 0.043% (4-bit base), while the loss falls by 20-37%.
BF16_LOSS_TOLERANCE = 0.005
FIRST_STEPS = 3
STEPS = 6

# The preset's shape in miniature: S²-Attn at 2x the base context (position interpolation), LoRA on q/k/v/o plus
# trainable embeddings and norms, activation checkpointing, lr high enough that 6 steps move the loss.
RUN = [
    "rope.type=linear",
    "attention.implementation=s2attn",
    "attention.group_size=32",
    "model.activation_checkpointing=true",
    "train.seq_len=128",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    f"train.max_steps={STEPS}",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.save_every=0",
]
SETUPS = {
    "lora-zero2": ["deepspeed.config=ds_configs/stage2.json"],
    "lora-zero3": ["deepspeed.config=ds_configs/stage3.json"],
    "lora-zero3-offload": ["deepspeed.config=ds_configs/stage3_offload.json"],
    "full-zero3": ["deepspeed.config=ds_configs/stage3.json", "lora.enabled=false", "train.lr=3e-3"],
    "4bit-zero2": ["deepspeed.config=ds_configs/stage2.json", "quant.type=nf4"],
    "4bit-zero3": ["deepspeed.config=ds_configs/stage3.json", "quant.type=nf4"],
}
# The fp32 run each bf16 run is compared with (ZeRO stages agree to ~1e-7 in fp32, tests/test_qlora_distributed.py).
FP32_REFERENCE = {
    "lora-zero2": "lora-zero3",
    "lora-zero3": "lora-zero3",
    "lora-zero3-offload": "lora-zero3",
    "full-zero3": "full-zero3",
    "4bit-zero2": "4bit-zero3",
    "4bit-zero3": "4bit-zero3",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def longctx_train(*overrides: str) -> subprocess.CompletedProcess:
    launcher = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port())]
    command = [*launcher, "--module", "longctx.cli", "train", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Overrides naming a tiny LLaMA saved in bf16 (with its tokenizer) and shards of 128 tokens packed with it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from data_prep.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("bf16")
    docs = write_text_dir(root / "text", synthetic_docs(80))
    train_sentencepiece(docs, VOCAB, root / "tok.model")
    prep = {"inputs": [str(root / "text")], "tokenizer": str(root / "tok.model"), "out": str(root / "shards")}
    pack(from_dict(PrepConfig, {**prep, "seq_len": 128, "num_workers": 1}), progress=False)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    load_tokenizer(root / "tok.model").save_hf(root / "model")
    return [f"model.path={root / 'model'}", f"data.train={root / 'shards' / 'train'}", *RUN]


@pytest.fixture(scope="module")
def fp32_losses(inputs, tmp_path_factory) -> dict[str, list[float]]:
    root = tmp_path_factory.mktemp("fp32")
    trajectories = {}
    for name in sorted(set(FP32_REFERENCE.values())):
        longctx_train(*inputs, *SETUPS[name], "model.dtype=float32", f"train.output_dir={root / name}")
        trajectories[name] = losses(root / name)
    return trajectories


@pytest.fixture(scope="module")
def bf16_runs(inputs, tmp_path_factory) -> dict[str, Path]:
    """Output directory of each setup's bf16 run (lora-zero3 also checkpoints at step 3, for the resume test)."""
    root = tmp_path_factory.mktemp("bf16_runs")
    for name, setup in SETUPS.items():
        save = ["train.save_every=3"] if name == "lora-zero3" else []
        result = longctx_train(*inputs, *setup, *save, "model.dtype=bfloat16", f"train.output_dir={root / name}")
        assert "on 2 rank(s)" in result.stdout
    return {name: root / name for name in SETUPS}


@pytest.mark.distributed
@pytest.mark.parametrize("setup", list(SETUPS))
def test_bf16_trains_and_follows_fp32(setup, bf16_runs, fp32_losses):
    run_dir = bf16_runs[setup]
    got, reference = losses(run_dir), fp32_losses[FP32_REFERENCE[setup]]
    assert len(got) == STEPS and got[-1] < 0.9 * got[0], got
    for step in range(FIRST_STEPS):
        assert math.isclose(got[step], reference[step], rel_tol=BF16_LOSS_TOLERANCE), (step + 1, got, reference)
    assert not any(math.isclose(a, b, rel_tol=1e-7) for a, b in zip(got, reference)), "the run was not in bf16"

    # The final model is in the training dtype, and a LoRA checkpoint holds only what trained.
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    trained = load_file(str(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trained.safetensors"))
    assert {t.dtype for t in trained.values()} == {torch.float32}
    if setup.startswith("full"):
        assert not any("lora_" in name for name in trained) and len(trained) == len(final)
    else:
        assert any("lora_A" in name for name in trained) and any("embed_tokens" in name for name in trained)
        assert not any("base_layer" in name or "mlp.gate_proj.weight" in name for name in trained), sorted(trained)


@pytest.mark.distributed
def test_bf16_resume_is_bit_exact(inputs, bf16_runs, tmp_path):
    uninterrupted = bf16_runs["lora-zero3"]
    run = [*inputs, *SETUPS["lora-zero3"], "model.dtype=bfloat16", "train.save_every=3", f"train.output_dir={tmp_path}"]
    longctx_train(*run, "train.max_steps=3")  # stops after writing the step-3 checkpoint
    resumed = longctx_train(*run)
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (uninterrupted, tmp_path)]
    rows = [[(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, run)] for run in lines]
    assert rows[0] == rows[1] and len(rows[0]) == STEPS
    weights = [load_file(str(d / "final" / "model.safetensors")) for d in (uninterrupted, tmp_path)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
