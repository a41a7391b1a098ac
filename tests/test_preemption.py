"""Preemption on one box: 2 ranks under the deepspeed launcher get SIGUSR1 or SIGTERM mid-run, checkpoint the same
step, exit with PREEMPTED_EXIT_CODE, and the resumed runs end with exactly the losses of an uninterrupted run.

Also the training script of the test (the launcher runs this file):
    deepspeed --num_gpus 2 tests/test_preemption.py OUTPUT_DIR [key=value ...]
It trains tests/dist/train_tiny.py's model on data that takes STEP_DELAY_S per micro batch to read, so that a
signal sent after a step reliably lands in the middle of the run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from train_tiny import DEFAULTS, RandomDocuments  # noqa: E402

from longctx import checkpoint  # noqa: E402
from longctx.config import RunConfig, load_config  # noqa: E402
from longctx.trainer import PREEMPTED_EXIT_CODE, train  # noqa: E402

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEP_DELAY_S = 0.1
RUN = ["train.max_steps=12", "train.save_every=0", "train.keep_last=2"]


class SlowDocuments(RandomDocuments):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        time.sleep(STEP_DELAY_S)
        return super().__getitem__(index)


def main() -> None:
    output_dir, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(RunConfig, None, DEFAULTS + [f"train.output_dir={output_dir}", *overrides])
    train(cfg, dataset=SlowDocuments(16, cfg.train.seq_len, 96))


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def launch(output_dir: Path, port: int) -> subprocess.Popen:
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), __file__, str(output_dir), *RUN]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process:
    """The worker process of local_rank among the launcher's descendants."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            with_rank = [a for a in child.cmdline() if a == f"--local_rank={local_rank}"]
            if with_rank and any(a.endswith("test_preemption.py") for a in child.cmdline()):
                return child
        time.sleep(0.2)
    raise AssertionError(f"no worker with --local_rank={local_rank} started")


def signal_after_step(output_dir: Path, port: int, step: int, local_rank: int, signum: int) -> tuple[int, str]:
    """Run until metrics.jsonl has `step`, send signum to one rank only; return (exit code, output)."""
    launcher = launch(output_dir, port)
    worker = rank_process(launcher, local_rank)
    deadline = time.monotonic() + 300
    while len(metrics(output_dir)) < step and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signum)
    output, _ = launcher.communicate(timeout=300)
    return launcher.returncode, output


@pytest.mark.distributed
def test_signalled_ranks_checkpoint_exit_75_and_resume_to_the_same_losses(tmp_path):
    whole = launch(tmp_path / "whole", 29531)
    output, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, output[-3000:]
    expected = metrics(tmp_path / "whole")
    assert [m["step"] for m in expected] == list(range(1, 13))

    # SIGUSR1 (SLURM's --signal) to rank 0 only: both ranks stop after the same step and checkpoint it.
    run = tmp_path / "preempted"
    code, output = signal_after_step(run, 29532, step=3, local_rank=0, signum=signal.SIGUSR1)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    first_stop = metrics(run)[-1]["step"]
    assert 3 <= first_stop < 12 and "preempted (SIGUSR1)" in output, output[-3000:]
    assert checkpoint.complete_checkpoints(run)[-1].name == f"step_{first_stop:08d}"

    # SIGTERM (a scheduler's kill) to rank 1 only, while the resumed run trains.
    code, output = signal_after_step(run, 29533, step=first_stop + 2, local_rank=1, signum=signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    assert f"at step {first_stop}" in output
    second_stop = metrics(run)[-1]["step"]
    assert first_stop < second_stop < 12, (first_stop, second_stop)

    finish = launch(run, 29534)
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output[-3000:]
    assert f"at step {second_stop}" in output
    # No step skipped or repeated, and the same data in the same order: the very same losses.
    trajectory = lambda rows: [(m["step"], m["loss"], m["lr"], m["grad_norm"]) for m in rows]
    assert trajectory(metrics(run)) == trajectory(expected)


if __name__ == "__main__":
    main()
