"""Trainer logic with no process group: DeepSpeed config resolution, the LR schedule, errors, the CLI entry."""

from __future__ import annotations

import json

import pytest
import torch

from longctx import trainer
from longctx.cli import main
from longctx.config import RunConfig, describe, load_config
from longctx.errors import UserError
from longctx.trainer import lr_lambda, resolve_deepspeed_config


def run_config(*overrides: str) -> RunConfig:
    return load_config(RunConfig, None, ["model.init={model_type: llama}", *overrides])


def write_json(path, tree) -> str:
    path.write_text(json.dumps(tree))
    return str(path)


def test_batch_sizes_are_derived_from_each_other():
    ds = resolve_deepspeed_config(run_config("train.global_batch_size=64", "train.micro_batch_size=2"), world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        2,
        4,
    )
    cfg = run_config("train.global_batch_size=0", "train.gradient_accumulation_steps=3", "train.micro_batch_size=2")
    assert resolve_deepspeed_config(cfg, world_size=2)["train_batch_size"] == 12


def test_batch_size_contradictions_name_the_fix():
    with pytest.raises(UserError, match="not a multiple of train.micro_batch_size=1 × 3 data-parallel ranks"):
        resolve_deepspeed_config(run_config(), world_size=3)
    cfg = run_config("train.global_batch_size=64", "train.gradient_accumulation_steps=4")
    with pytest.raises(UserError, match="set train.gradient_accumulation_steps=0 to derive it"):
        resolve_deepspeed_config(cfg, world_size=2)
    cfg = run_config("parallel.sequence_parallel_size=2")
    with pytest.raises(UserError, match="world size 3 is not a multiple of parallel.sequence_parallel_size=2"):
        resolve_deepspeed_config(cfg, world_size=3)


def test_json_values_that_contradict_the_run_are_refused(tmp_path):
    stage3 = json.loads(open("ds_configs/stage3.json").read())
    hard_coded = write_json(tmp_path / "a.json", {**stage3, "train_batch_size": 32})
    with pytest.raises(UserError, match='hard-codes train_batch_size=32 but the run has 64 .* set it to "auto"') as e:
        resolve_deepspeed_config(run_config(f"deepspeed.config={hard_coded}"), world_size=1)
    assert "\n" not in str(e.value)
    bf16 = write_json(tmp_path / "b.json", {**stage3, "bf16": {"enabled": True}})
    with pytest.raises(UserError, match="bf16.enabled=True but the run has False .from model.dtype"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={bf16}", "model.dtype=float32"), world_size=1)
    agreeing = write_json(tmp_path / "c.json", {**stage3, "train_batch_size": 64, "gradient_clipping": 1.0})
    assert resolve_deepspeed_config(run_config(f"deepspeed.config={agreeing}"), world_size=1)["train_batch_size"] == 64
    scheduler = write_json(tmp_path / "d.json", {**stage3, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(UserError, match="remove the scheduler section"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={scheduler}"), world_size=1)
    (tmp_path / "e.json").write_text("{ not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={tmp_path / 'e.json'}"), world_size=1)
    with pytest.raises(UserError, match="does not exist"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={tmp_path / 'missing.json'}"), world_size=1)


def test_json_optimizer_gets_the_runs_hyperparameters():
    cfg = run_config("deepspeed.config=ds_configs/stage3_offload.json", "train.lr=1e-4", "train.weight_decay=0.1")
    params = resolve_deepspeed_config(cfg, world_size=1)["optimizer"]["params"]
    assert params["lr"] == 1e-4 and params["weight_decay"] == 0.1 and params["betas"] == [0.9, 0.95]


def test_schedule_warms_up_then_stays_constant_or_decays():
    constant = lr_lambda(run_config("train.warmup_steps=4", "train.max_steps=20"))
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_lambda(run_config("train.warmup_steps=4", "train.max_steps=20", "train.schedule=cosine"))
    values = [cosine(s) for s in range(4, 21)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_out_of_memory_becomes_a_message_naming_the_knobs(monkeypatch):
    def out_of_memory(cfg, dataset):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer, "_train", out_of_memory)
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
