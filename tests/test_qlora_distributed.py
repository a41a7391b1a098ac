"""A 4-bit NF4 base on 2 processes under the deepspeed launcher (gloo): ZeRO-2 and ZeRO-3 (which partitions the
packed 4-bit weights, stored in the model dtype) both train, follow the same loss trajectory, and leave the 4-bit
base bit-identical on every rank."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.config import RunConfig, load_config
from longctx.model import build_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist" / "qlora_train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
sys.path.insert(0, str(SCRIPT.parent))
from train_tiny import TINY_LLAMA  # noqa: E402

# 4 sequences = one global batch (2 ranks × 2 accumulation steps), trained on again and again.
RUN = ["--num-samples", "4", "train.max_steps=6", "train.lr=1e-2", "train.save_every=0"]
# ZeRO-2 and ZeRO-3 reduce gradients in a different order; fp32 round-off stays far below this.
RELATIVE_TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_ranks_train_a_4bit_base_under_zero2_and_zero3(tmp_path):
    # The base comes from a directory, as in real use: under ZeRO-3 transformers loads the 4-bit model whole on every
    # rank (never inside zero.Init) and the engine then partitions it.
    base = tmp_path / "base"
    build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False).save_pretrained(base)
    trajectories = {}
    for stage in ("stage2", "stage3"):
        launcher = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port())]
        result = subprocess.run(
            [*launcher, str(SCRIPT), str(tmp_path / stage), *RUN, f"deepspeed.config=ds_configs/{stage}.json"]
            + ["model.init={}", f"model.path={base}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "on 2 rank(s)" in result.stdout
        for rank in (0, 1):
            check = json.loads((tmp_path / stage / f"base_check_rank{rank}.json").read_text())
            zero3 = stage == "stage3"  # the packed codes in the model dtype (fp32 on CPU), partitioned by ZeRO-3
            expected = {
                "num_partitioned": 14 if zero3 else 0,
                "storage_dtype": f"torch.{'float32' if zero3 else 'uint8'}",
            }
            assert check == {"num_quantized": 14, "differing": [], **expected}, (stage, rank, check)
        trajectories[stage] = losses(tmp_path / stage)

    zero2, zero3 = trajectories["stage2"], trajectories["stage3"]
    assert len(zero2) == 6 and zero2[-1] < 0.9 * zero2[0], zero2
    for step, (a, b) in enumerate(zip(zero2, zero3), start=1):
        assert math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE), (step, a, b)
