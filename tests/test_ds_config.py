"""The DeepSpeed JSON (longctx.ds_config): reading, validation when the config is built, filling at start, precision.

No process group and no GPU: the CUDA branches of precision resolution run here through monkeypatched torch.cuda
queries (a bf16 GPU, a V100-like GPU without bf16, the CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from longctx import ds_config
from longctx.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from longctx.ds_config import resolve_deepspeed_config
from longctx.errors import UserError
from longctx.model import build_model, resolve_dtype
from longctx.parallel import SequenceParallel, gradient_sum_factor

ROOT = Path(__file__).resolve().parent.parent
STAGE2 = json.loads((ROOT / "ds_configs" / "stage2.json").read_text())
STAGE3 = json.loads((ROOT / "ds_configs" / "stage3.json").read_text())
TINY_LLAMA = (
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 96, max_position_embeddings: 32}"
)


def run_config(*overrides: str) -> RunConfig:
    return load_config(RunConfig, None, ["model.init={model_type: llama}", *overrides])


def write_json(path: Path, tree) -> str:
    path.write_text(json.dumps(tree))
    return str(path)


def without(tree: dict, key: str) -> dict:
    return {k: v for k, v in tree.items() if k != key}


def fake_gpu(monkeypatch, *, name: str, has_bf16: bool) -> None:
    """torch.cuda as a machine with one GPU `name` would answer (nothing is allocated on it)."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        # A V100 emulates bf16 (torch answers True by default there): the dtype choice must not count emulation.
        assert not including_emulation, "resolve_dtype must ask without emulation"
        return has_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def test_unreadable_json_is_one_line_naming_the_fix(tmp_path):
    (tmp_path / "broken.json").write_text('{\n  "train_batch_size": "auto",\n  oops\n}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    cases = {
        tmp_path / "missing.json": "does not exist: use ds_configs/stage2.json, stage3.json or your own",
        tmp_path / "broken.json": r"is not valid JSON \(line 3\): fix its syntax",
        tmp_path / "list.json": "holds a JSON list, not an object",
        tmp_path / "binary.json": "is not a text file",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=f"deepspeed.config={path} {message}") as e:
            ds_config.read(path)
        assert "\n" not in str(e.value)


def test_shipped_json_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. `longctx plan` or `export` run elsewhere: presets name ds_configs/ relatively
    assert ds_config.read("ds_configs/stage3.json") == STAGE3
    assert ds_config.zero_stage(run_config("deepspeed.config=ds_configs/stage2.json")) == 2
    (tmp_path / "ds_configs").mkdir()
    write_json(tmp_path / "ds_configs" / "stage3.json", {**STAGE3, "zero_optimization": {"stage": 1}})
    assert ds_config.read("ds_configs/stage3.json")["zero_optimization"]["stage"] == 1  # the working directory wins


# ----------------------------------------------------------------------------------------------------------------
# Validation when the config is built
# ----------------------------------------------------------------------------------------------------------------


def test_config_validation_reports_every_json_problem_with_the_configs_own(tmp_path):
    bad = write_json(
        tmp_path / "bad.json",
        {
            **STAGE3,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 0.5,
            "zero_optimization": {**STAGE3["zero_optimization"], "reduce_scatter": False},
            "scheduler": {"type": "WarmupLR"},
        },
    )
    with pytest.raises(ConfigError) as e:
        run_config(
            f"deepspeed.config={bad}",
            "parallel.sequence_parallel_size=2",
            "attention.group_size=2048",
            "train.seq_len=1024",
        )
    message = str(e.value)
    assert "\n" not in message
    for problem in (
        "attention.group_size=2048 exceeds train.seq_len=1024",  # the config's own check, in the same report
        "remove the scheduler section",
        "needs zero_optimization.reduce_scatter=true",
        "hard-codes train_micro_batch_size_per_gpu=4 but the run has 1 (from train.micro_batch_size)",
        "hard-codes gradient_clipping=0.5 but the run has 1.0 (from train.grad_clip)",
    ):
        assert problem in message, problem


def test_reduce_scatter_rule_is_a_config_error_before_anything_is_built(tmp_path):
    no_reduce_scatter = write_json(
        tmp_path / "a.json", {**STAGE3, "zero_optimization": {**STAGE3["zero_optimization"], "reduce_scatter": False}}
    )
    with pytest.raises(ConfigError, match="needs zero_optimization.reduce_scatter=true .* remove reduce_scatter=false"):
        run_config(f"deepspeed.config={no_reduce_scatter}", "parallel.sequence_parallel_size=2")
    run_config(f"deepspeed.config={no_reduce_scatter}")  # without sequence parallelism the other path is right
    zero2 = write_json(tmp_path / "b.json", {**STAGE2, "zero_optimization": {"stage": 2, "reduce_scatter": False}})
    run_config(f"deepspeed.config={zero2}", "parallel.sequence_parallel_size=2")  # ZeRO-2 reduces differently
    # gradient_sum_factor has no factor for that path either, and says so with the same words.
    sp = SequenceParallel(size=2, rank=0, data_parallel_size=2)
    with pytest.raises(UserError, match="needs zero_optimization.reduce_scatter=true"):
        gradient_sum_factor(json.loads(Path(no_reduce_scatter).read_text()), sp)


def test_malformed_sections_and_values_are_config_errors(tmp_path):
    cases = {
        "a.json": ({**STAGE3, "bf16": True}, '"bf16" is true, not a JSON object'),
        "b.json": ({**STAGE3, "zero_optimization": {"stage": "3"}}, "zero_optimization.stage='3': use 0, 1, 2 or 3"),
        "c.json": ({**STAGE3, "data_types": {"grad_accum_dtype": "fp64"}}, "grad_accum_dtype='fp64': use fp32"),
    }
    for name, (tree, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            run_config(f"deepspeed.config={write_json(tmp_path / name, tree)}")


def test_a_checkpoints_saved_config_loads_where_its_json_is_gone(tmp_path):
    json_path = shutil.copy(ROOT / "ds_configs" / "stage3.json", tmp_path / "mine.json")
    saved = to_dict(run_config(f"deepspeed.config={json_path}"))
    Path(json_path).unlink()
    assert from_dict(RunConfig, saved).deepspeed.config == str(json_path)  # export / eval / resume need no JSON
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, None, ["model.init={model_type: llama}", f"deepspeed.config={json_path}"])


# ----------------------------------------------------------------------------------------------------------------
# Filling at start (moved from test_trainer: behaviour and messages unchanged)
# ----------------------------------------------------------------------------------------------------------------


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
    hard_coded = write_json(tmp_path / "a.json", {**STAGE3, "train_batch_size": 32})
    with pytest.raises(UserError, match='hard-codes train_batch_size=32 but the run has 64 .* set it to "auto"') as e:
        resolve_deepspeed_config(run_config(f"deepspeed.config={hard_coded}"), world_size=1)
    assert "\n" not in str(e.value)
    bf16 = write_json(tmp_path / "b.json", {**STAGE3, "bf16": {"enabled": True}})
    with pytest.raises(UserError, match="bf16.enabled=True but the run has False .from model.dtype"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={bf16}", "model.dtype=float32"), world_size=1)
    agreeing = write_json(tmp_path / "c.json", {**STAGE3, "train_batch_size": 64, "gradient_clipping": 1.0})
    assert resolve_deepspeed_config(run_config(f"deepspeed.config={agreeing}"), world_size=1)["train_batch_size"] == 64
    scheduler = write_json(tmp_path / "d.json", {**STAGE3, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(UserError, match="remove the scheduler section"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={scheduler}"), world_size=1)
    (tmp_path / "e.json").write_text("{ not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={tmp_path / 'e.json'}"), world_size=1)
    with pytest.raises(UserError, match="does not exist"):
        resolve_deepspeed_config(run_config(f"deepspeed.config={tmp_path / 'missing.json'}"), world_size=1)


def test_values_that_need_the_world_size_or_the_device_are_checked_at_start(tmp_path):
    # train_batch_size derived from the rank count, bf16.enabled from the GPU that runs model.dtype=auto: neither
    # is known when the config is built, so both pass then and are refused at start.
    derived = write_json(tmp_path / "a.json", {**STAGE3, "train_batch_size": 32})
    cfg = run_config(f"deepspeed.config={derived}", "train.global_batch_size=0", "train.gradient_accumulation_steps=2")
    with pytest.raises(UserError, match="hard-codes train_batch_size=32 but the run has 8 "):
        resolve_deepspeed_config(cfg, world_size=4)
    with pytest.raises(ConfigError, match="hard-codes train_batch_size=32 but the run has 64 "):
        run_config(f"deepspeed.config={derived}")  # an explicit global batch is known at once
    bf16 = write_json(tmp_path / "b.json", {**STAGE3, "bf16": {"enabled": True}})
    cfg = run_config(f"deepspeed.config={bf16}")
    with pytest.raises(UserError, match="bf16.enabled=True but the run has False"):
        resolve_deepspeed_config(cfg, world_size=1)  # model.dtype=auto is float32 on this CPU


def test_json_optimizer_gets_the_runs_hyperparameters():
    cfg = run_config("deepspeed.config=ds_configs/stage3_offload.json", "train.lr=1e-4", "train.weight_decay=0.1")
    params = resolve_deepspeed_config(cfg, world_size=1)["optimizer"]["params"]
    assert params["lr"] == 1e-4 and params["weight_decay"] == 0.1 and params["betas"] == [0.9, 0.95]


# ----------------------------------------------------------------------------------------------------------------
# fp32 gradient accumulation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shipped", [STAGE2, STAGE3], ids=["zero2", "zero3"])
def test_16_bit_runs_accumulate_gradients_in_fp32(shipped, tmp_path):
    user_json = write_json(tmp_path / "user.json", without(shipped, "data_types"))  # a JSON written before this
    for dtype in ("bfloat16", "float16"):
        ds = resolve_deepspeed_config(run_config(f"deepspeed.config={user_json}", f"model.dtype={dtype}"), 1)
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}, dtype
    ds = resolve_deepspeed_config(run_config(f"deepspeed.config={user_json}", "model.dtype=float32"), 1)
    assert "data_types" not in ds  # fp32 runs accumulate in fp32 anyway
    kept = write_json(tmp_path / "kept.json", {**shipped, "data_types": {"grad_accum_dtype": "bf16"}})
    ds = resolve_deepspeed_config(run_config(f"deepspeed.config={kept}", "model.dtype=bfloat16"), 1)
    assert ds["data_types"]["grad_accum_dtype"] == "bf16"  # the user's explicit choice stands


def test_without_zero_the_accumulation_dtype_must_be_the_models(tmp_path):
    # DeepSpeed's engine raises "unsupported mix" for stage 0 with a model dtype other than the accumulation's.
    zero0 = without(without(STAGE2, "zero_optimization"), "data_types")
    plain = write_json(tmp_path / "plain.json", zero0)
    ds = resolve_deepspeed_config(run_config(f"deepspeed.config={plain}", "model.dtype=bfloat16"), 1)
    assert "data_types" not in ds  # not filled where DeepSpeed would refuse it
    mixed = write_json(tmp_path / "mixed.json", {**zero0, "data_types": {"grad_accum_dtype": "fp32"}})
    with pytest.raises(ConfigError, match="fp32 .* for a bfloat16 model without ZeRO, which DeepSpeed refuses"):
        run_config(f"deepspeed.config={mixed}", "model.dtype=bfloat16")
    run_config(f"deepspeed.config={mixed}", "model.dtype=float32")  # the same dtype: fine


# ----------------------------------------------------------------------------------------------------------------
# Precision a GPU can run
# ----------------------------------------------------------------------------------------------------------------


def test_auto_precision_is_bf16_on_a_gpu_that_has_it(monkeypatch):
    fake_gpu(monkeypatch, name="NVIDIA A100-SXM4-80GB", has_bf16=True)
    cfg = run_config()
    assert resolve_dtype(cfg) == torch.bfloat16
    ds = resolve_deepspeed_config(cfg, world_size=1)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (True, False)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and "loss_scale" not in ds["fp16"]


def test_auto_precision_is_fp16_with_loss_scaling_on_a_v100(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, name="Tesla V100-SXM2-32GB", has_bf16=False)
    user_json = write_json(tmp_path / "user.json", without(STAGE3, "data_types"))
    ds = resolve_deepspeed_config(run_config(f"deepspeed.config={user_json}"), world_size=1)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (False, True)
    # Dynamic loss scaling (loss_scale 0) from 2^16, halved on overflow, doubled after 1000 clean steps.
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    tuned = write_json(tmp_path / "tuned.json", {**STAGE3, "fp16": {"enabled": "auto", "initial_scale_power": 12}})
    assert resolve_deepspeed_config(run_config(f"deepspeed.config={tuned}"), 1)["fp16"]["initial_scale_power"] == 12


def test_explicit_bf16_on_a_gpu_without_it_is_refused_before_the_model_loads(monkeypatch):
    fake_gpu(monkeypatch, name="Tesla V100-SXM2-32GB", has_bf16=False)
    cfg = load_config(RunConfig, None, [TINY_LLAMA, "model.dtype=bfloat16"])  # fine as a config: another GPU may run it
    for step in (lambda: resolve_dtype(cfg), lambda: resolve_deepspeed_config(cfg, 1), lambda: build_model(cfg)):
        with pytest.raises(UserError) as e:
            step()
        message = str(e.value)
        assert "\n" not in message and "Tesla V100-SXM2-32GB" in message
        assert "model.dtype=float16" in message and "model.dtype=auto" in message
    assert resolve_dtype(run_config("model.dtype=float16")) == torch.float16


def test_auto_precision_is_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = run_config()
    assert resolve_dtype(cfg) == torch.float32
    ds = resolve_deepspeed_config(cfg, world_size=1)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (False, False)
    assert resolve_dtype(run_config("model.dtype=bfloat16")) == torch.bfloat16  # CPU bf16: asked for explicitly


# ----------------------------------------------------------------------------------------------------------------
# The ZeRO stage for a 4-bit base
# ----------------------------------------------------------------------------------------------------------------


def test_only_training_a_4bit_base_reads_the_json(tmp_path):
    pytest.importorskip("bitsandbytes")
    json_path = shutil.copy(ROOT / "ds_configs" / "stage3.json", tmp_path / "mine.json")
    cfg = load_config(RunConfig, None, [TINY_LLAMA, "quant.type=nf4", f"deepspeed.config={json_path}"])
    Path(json_path).unlink()  # export / eval in another directory: the run's JSON is not at hand
    model = build_model(cfg, for_training=False)  # the dequantized base: no stage needed
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    with pytest.raises(UserError, match=f"deepspeed.config={json_path} does not exist"):
        build_model(cfg)
