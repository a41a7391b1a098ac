"""Trainer logic with no process group: the LR schedule, errors, the CLI entry (DeepSpeed JSON: test_ds_config)."""

from __future__ import annotations

import pytest
import torch

from longctx import trainer
from longctx.cli import main
from longctx.config import RunConfig, describe, load_config
from longctx.errors import UserError
from longctx.trainer import lr_lambda


def run_config(*overrides: str) -> RunConfig:
    return load_config(RunConfig, None, ["model.init={model_type: llama}", *overrides])


def test_schedule_warms_up_then_stays_constant_or_decays():
    constant = lr_lambda(run_config("train.warmup_steps=4", "train.max_steps=20"))
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_lambda(run_config("train.warmup_steps=4", "train.max_steps=20", "train.schedule=cosine"))
    values = [cosine(s) for s in range(4, 21)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_out_of_memory_becomes_a_message_naming_the_knobs(monkeypatch):
    def out_of_memory(cfg, dataset, preemption):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer, "build", out_of_memory)
    with pytest.raises(UserError) as e:
        trainer.train(run_config("train.seq_len=32768"))
    message = str(e.value)
    assert "seq_len=32768" in message and "\n" not in message
    for knob in ("stage3_offload.json", "micro_batch_size", "activation_checkpointing", "sequence_parallel_size"):
        assert knob in message


def test_cli_help_config_lists_every_key(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key, _, doc in describe(RunConfig):
        assert key in out and doc
    assert "train.global_batch_size" in out and "deepspeed.config" in out


def test_cli_unknown_key_is_one_line_with_a_suggestion(capsys):
    assert main(["train", "--config", "launch/presets/tiny-cpu.yaml", "train.max_step=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key train.max_step: did you mean train.max_steps?" in err
