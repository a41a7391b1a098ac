"""Tied input/output embeddings (SmolLM2, Llama-3.2-1B/3B, small Qwen2.5) with trainable embeddings and LoRA, 2 ranks
under the deepspeed launcher: tiled loss and tiled MLP train as the plain loss does, on ZeRO-2 and ZeRO-3.

The tied weight gets gradient from the output head (inside the tiled loss's nested backward) and later from the
embedding lookup; ZeRO must reduce it once, with both parts (see longctx.tiling). Before that was so, ZeRO-2 stopped
with "has already been reduced", ZeRO-3 with the weight twice in one bucket, or, when the bucket filled up in between
(as a real vocabulary's embedding always fills it), trained on silently with a partial gradient.

All runs share one launcher start (tests/dist/train_configs.py): each start costs ~20-30 s on CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longctx import checkpoint
from longctx.model import build_model

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tests" / "dist"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
sys.path.insert(0, str(DIST))
from train_tiny import TINY_LLAMA  # noqa: E402

TIED_LLAMA = TINY_LLAMA.replace("vocab_size: 96", "vocab_size: 96, tie_word_embeddings: true")
# 4 sequences = one global batch, so every step trains on the same batch and the loss falls fast.
COMMON = ["train.max_steps=4", "train.lr=1e-2", "train.save_every=0"]
TILED_LOSS = ["memory.tiled_loss=true", "memory.loss_chunk_tokens=16"]  # 4 chunks of a 64-token micro batch
TILED_MLP = ["memory.tiled_mlp=true", "memory.tiled_mlp_shards=4", "model.activation_checkpointing=true"]
TILINGS = {"plain": [], "tiled_loss": TILED_LOSS, "tiled_loss_mlp": TILED_LOSS + TILED_MLP}
# fp32: tiling changes only how the matmuls are blocked and the order of the loss sum. Measured over 4 steps: losses
# within 7.1e-8 (relative), trained weights within 1.7e-6 of their update's norm (a LoRA A; the tied embedding 9.3e-8).
# The partial tied gradient that ZeRO-3 used to reduce put the embedding 0.52 of its update's norm away.
LOSS_RTOL = 1e-6
UPDATE_RTOL = 1e-4


def zero3_json(path: Path) -> Path:
    """The shipped ZeRO-3 JSON scaled down to the tiny model: every weight partitioned (as a real model's large ones
    are), and a reduce bucket smaller than the embedding (as 5e7 elements is smaller than a 128k vocabulary's), so
    the bucket is reduced between the output head's gradient and the embedding's."""
    config = json.loads((ROOT / "ds_configs" / "stage3.json").read_text())
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, reduce_bucket_size=1000)
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tied")
    stages = {"zero2": "ds_configs/stage2.json", "zero3": str(zero3_json(root / "stage3_tiny.json"))}
    runs = {
        f"{stage}_{tiling}": [TIED_LLAMA, f"deepspeed.config={config}", *overrides]
        for stage, config in stages.items()
        for tiling, overrides in TILINGS.items()
    }
    # An untied model with a trainable output head, and a tied model with a frozen one (the embedding frozen too).
    untied = [TINY_LLAMA, f"deepspeed.config={stages['zero3']}", "lora.trainable=[embed,norm,lm_head]"]
    frozen_tied = [TIED_LLAMA, f"deepspeed.config={stages['zero2']}", "lora.trainable=[norm]"]
    for tiling in ("plain", "tiled_loss_mlp"):
        runs[f"untied_lm_head_{tiling}"] = untied + TILINGS[tiling]
        runs[f"frozen_tied_{tiling}"] = frozen_tied + TILINGS[tiling]
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", "29651", str(DIST / "train_configs.py"), str(root)]
    command += ["--num-samples", "4"]
    for name, overrides in runs.items():
        command += ["--run", name, *COMMON, *overrides]
    # One thread per rank: 2 ranks on 2 cores, torch's default thread pools make every step ~10x slower.
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    return root


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def trained_and_initial(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The checkpoint's fp32 master weights of every trainable parameter, and the same parameters as initialised."""
    saved = checkpoint.complete_checkpoints(run)[-1]
    trained = load_file(str(saved / "trained.safetensors"))
    initial = build_model(checkpoint.load_run_config(saved)).state_dict()
    return trained, {name: initial[name] for name in trained}


def assert_trains_like(run: Path, reference: Path) -> dict[str, torch.Tensor]:
    """run's losses and trained weights are reference's, and it trains; returns run's trained weights."""
    run_losses, reference_losses = losses(run), losses(reference)
    assert len(run_losses) == 4 and all(b < a for a, b in zip(run_losses, run_losses[1:])), run_losses
    for step, (a, b) in enumerate(zip(run_losses, reference_losses, strict=True), start=1):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), (step, a, b)
    (trained, initial), (expected, _) = trained_and_initial(run), trained_and_initial(reference)
    assert trained.keys() == expected.keys()
    for name, weight in expected.items():
        update = weight - initial[name]
        assert update.norm() > 0, name
        # Relative to the update, not the weight: a wrong gradient moves the update by far more than round-off.
        assert (trained[name] - weight).norm() <= UPDATE_RTOL * update.norm(), name
    return trained


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("tiling", ["tiled_loss", "tiled_loss_mlp"])
def test_tied_trainable_embeddings_train_as_with_the_plain_loss(runs, stage, tiling):
    trained = assert_trains_like(runs / f"{stage}_{tiling}", runs / f"{stage}_plain")
    # The tied weight trains once, under the embedding's name; LoRA and the norms train beside it.
    assert "base_model.model.model.embed_tokens.weight" in trained and not any("lm_head" in n for n in trained)
    assert any("lora_B" in n for n in trained) and any("norm" in n for n in trained)


@pytest.mark.distributed
def test_untied_trainable_head_and_frozen_tied_head_train_as_with_the_plain_loss(runs):
    untied = assert_trains_like(runs / "untied_lm_head_tiled_loss_mlp", runs / "untied_lm_head_plain")
    assert "base_model.model.lm_head.weight" in untied and "base_model.model.model.embed_tokens.weight" in untied
    frozen = assert_trains_like(runs / "frozen_tied_tiled_loss_mlp", runs / "frozen_tied_plain")
    assert not any("embed_tokens" in n or "lm_head" in n for n in frozen)
