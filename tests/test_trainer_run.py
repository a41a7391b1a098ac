"""End-to-end single-process runs (1-rank gloo group, ZeRO-3): outputs, resume to the last bit, kill -9 mid-save."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from longctx import checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist" / "train_tiny.py"
# Constant LR after warm-up: stopping early and resuming sees the same schedule as one uninterrupted run.
RUN = ["train.max_steps=4", "train.save_every=2", "train.keep_last=1", "train.schedule=constant"]


def run_tiny(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(output_dir), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_mid_save_resumes_from_the_last_complete_checkpoint_bit_exactly(tmp_path):
    uninterrupted = run_tiny(tmp_path / "a", *RUN)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    # What it wrote: one metrics line per step, the newest complete checkpoint only (keep_last=1), a final model.
    expected = metrics(tmp_path / "a")
    assert [m["step"] for m in expected] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "memory_gb"} <= expected[0].keys()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "a")] == ["step_00000004"]
    saved = tmp_path / "a" / "checkpoints" / "step_00000004"
    assert {"config.yaml", "ds_config.json", "COMPLETE", "trainer_state_rank0.pt"} <= {p.name for p in saved.iterdir()}
    assert json.loads((saved / "ds_config.json").read_text())["train_batch_size"] == 4
    assert list((tmp_path / "a" / "tensorboard").iterdir())
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final")
    assert final.config.rope_parameters["rope_type"] == "linear" and final.config.rope_parameters["factor"] == 2.0
    assert "step      4 | loss" in uninterrupted.stdout

    # Same run, killed with SIGKILL while writing the step-4 checkpoint (the step-2 one is complete).
    killed = run_tiny(tmp_path / "b", *RUN, "--kill-during-save-at", "4")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "b" / "checkpoints"
    assert (checkpoints / "step_00000004.tmp").is_dir() and not (checkpoints / "step_00000004").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "b")] == ["step_00000002"]

    resumed = run_tiny(tmp_path / "b", *RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000002 at step 2" in resumed.stdout
    assert not (checkpoints / "step_00000004.tmp").exists()  # the interrupted save was cleaned up
    # Bit-exact on CPU: same losses and grad norms (so the same data order and optimizer state) at every step.
    got = metrics(tmp_path / "b")
    assert [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in got] == [
        (m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in expected
    ]
    weights_a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    weights_b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_finished_run_is_not_trained_again_and_another_run_is_not_resumed(tmp_path):
    first = run_tiny(tmp_path, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_tiny(tmp_path, "train.max_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stdout and [m["step"] for m in metrics(tmp_path)] == [1, 2]
    other = run_tiny(tmp_path, "train.max_steps=4", "train.lr=0.5")
    assert other.returncode != 0
    assert "holds checkpoints of a different run (train.lr: 0.003 -> 0.5)" in other.stderr


def test_too_little_data_for_one_micro_batch_is_refused(tmp_path):
    result = run_tiny(tmp_path, "--num-samples", "2", "train.micro_batch_size=4", "train.global_batch_size=4")
    assert result.returncode != 0
    assert "the training data has 2 sequences, fewer than train.micro_batch_size=4 per rank" in result.stderr
