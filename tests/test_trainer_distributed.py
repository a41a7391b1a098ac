"""2 processes under the deepspeed launcher on gloo, ZeRO-3: the loss falls, 2 ranks follow 1 rank's trajectory on
the same global batch, and only LoRA, embedding and norm weights change."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longctx import checkpoint
from longctx.config import RunConfig, load_config
from longctx.model import build_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist" / "train_tiny.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_tiny import TINY_LLAMA  # noqa: E402

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
# 4 sequences = one global batch: every step trains on the same batch (in a new order).
FIXED_BATCH = ["--num-samples", "4", "train.max_steps=8", "train.lr=1e-2", "train.save_every=0"]
# 2 ranks and 1 rank reduce in a different order; fp32 round-off stays far below this.
RELATIVE_TOLERANCE = 1e-5


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_ranks_zero3_train_like_one_rank_and_touch_only_lora_embed_norm(tmp_path):
    # The base model comes from a directory, as in real use: under ZeRO-3 each rank loads only its shard of it.
    base = build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False)
    base.save_pretrained(tmp_path / "base")
    run = [*FIXED_BATCH, "model.init={}", f"model.path={tmp_path / 'base'}"]
    two = subprocess.run(
        [str(DEEPSPEED), "--num_gpus", "2", "--master_port", "29517", str(SCRIPT), str(tmp_path / "two"), *run],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    # DeepSpeed's CPU allreduce leaves a 66 MB /dev/shm file per rank unless longctx removes it (longctx.distributed).
    left = list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*_29517_*"))
    assert not left, f"the run left {left} in /dev/shm"
    one = subprocess.run(
        # The whole global batch in one micro batch: the plain token mean, whatever the weighting across micro
        # batches and ranks does; 2 ranks × 2 accumulation steps must reproduce it.
        [sys.executable, str(SCRIPT), str(tmp_path / "one"), *run, "train.micro_batch_size=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    two_losses, one_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two_losses) == 8 and two_losses[-1] < 0.9 * two_losses[0], two_losses
    for step, (a, b) in enumerate(zip(two_losses, one_losses), start=1):
        assert math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE), (step, a, b)

    # The 2-rank ZeRO-3 checkpoint's consolidated trainable weights against the (seeded) initial ones: exactly the
    # LoRA, embedding and norm weights are there, and they moved.
    saved = checkpoint.complete_checkpoints(tmp_path / "two")[-1]
    trained = load_file(str(saved / "trained.safetensors"))
    model = build_model(checkpoint.load_run_config(saved))
    initial = model.state_dict()
    assert trained.keys() == {name for name, p in model.named_parameters() if p.requires_grad}
    changed = {name for name in trained if not torch.equal(initial[name], trained[name])}
    assert all("lora_" in n or "embed_tokens" in n or "norm" in n for n in trained), sorted(trained)
    assert any("lora_B" in n for n in changed) and any("embed_tokens" in n for n in changed)
    assert any("input_layernorm" in n for n in changed) and any(n.endswith("model.norm.weight") for n in changed)
    assert any("q_proj.base_layer" in n for n in initial) and any("lm_head" in n for n in initial)
