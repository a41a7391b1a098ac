"""`longctx plan`: the memory accounting's closed forms, the search, the shipped 100k presets, bad input, the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.config import RunConfig, load_config
from longctx.errors import UserError
from longctx.plan import (
    GIB,
    Cluster,
    Strategy,
    estimate,
    model_shape,
    parameter_inventory,
    plan_run,
    quantized_bytes_per_weight,
    resolve_preset,
    training_flops_per_sequence,
    zero_settings_by_strategy,
)

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
BIG = Cluster(nodes=1, gpus_per_node=8, gpu_memory_gib=1e6, host_memory_gib=1e6)  # everything fits


def tiny_config(*overrides: str) -> RunConfig:
    base = [f"model.init={json.dumps(TINY)}", "train.seq_len=1024", "train.global_batch_size=8", "model.dtype=float32"]
    return load_config(RunConfig, None, [*base, *overrides])


def preset(name: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, resolve_preset(name), list(overrides))


def estimate_of(cfg: RunConfig, zero: str = "3", sp: int = 1, cluster: Cluster = BIG, param_bytes: int = 2):
    settings, _ = zero_settings_by_strategy(cfg)
    return estimate(cfg, model_shape(cfg), cluster, Strategy(zero, sp), settings[zero], param_bytes=param_bytes)


@pytest.fixture(scope="module")
def meta_models():
    """The tiny model as longctx.model builds it (meta device, no weights), with LoRA and for full fine-tuning."""
    import torch

    from longctx.model import build_model

    with torch.device("meta"):
        return {"lora": build_model(tiny_config()), "full": build_model(tiny_config("lora.enabled=false"))}


# ----------------------------------------------------------------------------------------------------------------
# Parameter accounting against the real model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", ["lora", "full"])
def test_parameter_inventory_counts_what_build_model_builds(meta_models, training):
    model = meta_models[training]
    groups = parameter_inventory(
        model_shape(tiny_config()), tiny_config(*(["lora.enabled=false"] * (training == "full")))
    )
    assert sum(g.numel * g.count for g in groups) == sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(g.numel * g.count for g in groups if g.trainable) == trainable


def test_flop_count_is_the_benchmark_rule(meta_models):
    """plan's step-time FLOPs equal benchmarks/train_step.py's, which counts the real model's nn.Linear weights."""
    spec = importlib.util.spec_from_file_location("train_step_for_plan", REPO / "benchmarks" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_step  # its dataclasses look their module up there
    spec.loader.exec_module(train_step)
    cfg = tiny_config()
    linear, layer_linear, trainable_linear = train_step.linear_parameter_counts(meta_models["lora"])
    expected = train_step.training_flops(
        batch=1,
        seq_len=cfg.train.seq_len,
        linear_params=linear,
        layer_linear_params=layer_linear,
        trainable_linear_params=trainable_linear,
        num_layers=TINY["num_hidden_layers"],
        num_heads=TINY["num_attention_heads"],
        head_dim=TINY["hidden_size"] // TINY["num_attention_heads"],
        group_size=cfg.group_size,
        checkpointing=True,
    )
    assert training_flops_per_sequence(model_shape(cfg), cfg) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", ["2", "3", "3+offload"])
def test_the_parts_add_up_to_the_peak(zero):
    e = estimate_of(preset("llama2-7b-100k", "memory.tiled_loss=false"), zero, sp=2)
    assert set(e.gpu) == {
        "weights", "gradients", "optimizer", "activation checkpoints", "layer working set", "logits",
        "ZeRO buckets", "all-to-all", "reserve",
    }  # fmt: skip
    # ZeRO-2 allocates its buckets at the first gradient, after the logits are freed: they join the layer phase
    late = ("ZeRO buckets",) if zero == "2" else ()
    throughout = sum(v for k, v in e.gpu.items() if k not in ("layer working set", "logits", *late))
    backward = e.gpu["layer working set"] + sum(e.gpu[k] for k in late)
    assert e.gpu_total == pytest.approx(throughout + max(e.gpu["logits"], backward))
    assert e.gpu_total < sum(e.gpu.values())  # the two phases are not counted together


def test_full_finetuning_costs_16_bytes_per_parameter_on_one_gpu_under_zero2():
    """bf16 weights 2 + bf16 gradients 2 + fp32 master and two Adam moments 12, with nothing to shard over."""
    cfg = preset("llama2-7b-32k", "lora.enabled=false")
    one_gpu = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=1e6, host_memory_gib=1e6)
    e = estimate_of(cfg, "2", cluster=one_gpu)
    params = sum(g.numel * g.count for g in parameter_inventory(model_shape(cfg), cfg))
    assert params == 6_738_415_616  # LLaMA-2-7B
    largest_gradient = 32000 * 4096 * 2  # embed / lm_head, whole before it is reduced
    assert e.gpu["weights"] + e.gpu["gradients"] - largest_gradient + e.gpu["optimizer"] == 16 * params


def test_zero3_divides_the_sharded_state_by_the_world_size():
    cfg = preset("llama2-70b-32k", "lora.enabled=false")
    eight, sixteen = (estimate_of(cfg, "3", cluster=dataclasses.replace(BIG, nodes=n)) for n in (1, 2))
    assert sixteen.gpu["optimizer"] == pytest.approx(eight.gpu["optimizer"] / 2)
    largest_gradient = 32000 * 8192 * 2
    assert sixteen.gpu["gradients"] - largest_gradient == pytest.approx((eight.gpu["gradients"] - largest_gradient) / 2)
    # weights: the shard halves, the gathered layer and the persistent small tensors do not
    assert eight.gpu["weights"] - sixteen.gpu["weights"] == pytest.approx(70 * 10**9 * 2 / 16, rel=0.02)
    zero2 = estimate_of(cfg, "2", cluster=dataclasses.replace(BIG, nodes=2))
    assert zero2.gpu["weights"] == pytest.approx(eight.gpu["weights"] * 0 + 2 * 68_976_648_192)


def test_sequence_parallelism_divides_activations_by_its_degree():
    cfg = preset("llama2-7b-100k", "memory.tiled_mlp=false", "memory.tiled_loss=false")
    one, four = estimate_of(cfg, sp=1), estimate_of(cfg, sp=4)
    for part in ("activation checkpoints", "layer working set", "logits"):
        assert four.gpu[part] == pytest.approx(one.gpu[part] / 4), part
    assert one.gpu["weights"] == four.gpu["weights"] and one.gpu["optimizer"] == four.gpu["optimizer"]


def test_tiled_loss_removes_the_full_sequence_logits():
    full = estimate_of(preset("llama2-7b-100k", "memory.tiled_loss=false"))
    assert full.gpu["logits"] == 102400 * 32000 * (2 + 4 + 4 + 4)
    tiled = estimate_of(preset("llama2-7b-100k", "memory.tiled_loss=true", "memory.loss_chunk_tokens=4096"))
    assert tiled.gpu["logits"] == 4096 * 32000 * (2 + 4 + 4 + 4)
    longer = estimate_of(preset("llama2-7b-100k", "memory.tiled_loss=true", "memory.loss_chunk_tokens=4096",
                                "train.seq_len=204800", "attention.group_size=51200"))  # fmt: skip
    assert longer.gpu["logits"] == tiled.gpu["logits"]  # no longer grows with the sequence


def test_tiled_mlp_shrinks_the_layer_working_set():
    plain = estimate_of(preset("llama2-7b-100k", "memory.tiled_mlp=false"))
    tiled = estimate_of(preset("llama2-7b-100k", "memory.tiled_mlp=true"))
    # six intermediate-sized tensors (four saved, two gradients) for 102400 tokens, or for one tile of
    # 102400 / ceil(102400 / 4096 hidden) = 4096 tokens; tiling adds three hidden-sized tensors (outputs, concat)
    saved = (102400 - 4096) * 6 * 11008 * 2 - 102400 * 3 * 4096 * 2
    assert plain.gpu["layer working set"] - tiled.gpu["layer working set"] == saved
    four_tiles = estimate_of(preset("llama2-7b-100k", "memory.tiled_mlp=true", "memory.tiled_mlp_shards=4"))
    assert four_tiles.gpu["layer working set"] - tiled.gpu["layer working set"] == (25600 - 4096) * 6 * 11008 * 2


def test_4bit_base_weights_cost_half_a_byte_plus_constants():
    cfg = preset("llama2-7b-32k")
    shape = model_shape(cfg)
    linear = sum(g.numel * g.count for g in parameter_inventory(shape, cfg) if g.name.endswith("_proj"))
    bf16 = estimate_of(cfg, "2").gpu["weights"]
    for double_quant, per_weight in ((True, 0.5 + 1 / 64 + 4 / (64 * 256)), (False, 0.5 + 4 / 64)):
        nf4_cfg = preset("llama2-7b-32k", "quant.type=nf4", f"quant.double_quant={str(double_quant).lower()}")
        assert quantized_bytes_per_weight(nf4_cfg) == pytest.approx(per_weight)
        nf4 = estimate_of(nf4_cfg, "2").gpu["weights"]
        assert bf16 - nf4 == pytest.approx(linear * (2 - per_weight))
        assert 0.5 < per_weight < 0.57


def test_offloaded_checkpoints_move_to_the_host():
    on_gpu = estimate_of(preset("llama2-7b-100k"))
    offloaded = estimate_of(preset("llama2-7b-100k", "memory.offload_activations=true"))
    checkpoints = 32 * 102400 * 4096 * 2 + 2 * 102400 * 128 * 2  # every layer's input + RoPE's cos and sin
    assert on_gpu.gpu["activation checkpoints"] == checkpoints
    assert offloaded.gpu["activation checkpoints"] == 2 * 102400 * 4096 * 2  # two layers in flight
    assert offloaded.host["offloaded checkpoints"] == 8 * checkpoints  # the node's 8 GPUs


# ----------------------------------------------------------------------------------------------------------------
# The search and the shipped presets
# ----------------------------------------------------------------------------------------------------------------


def test_the_smallest_fitting_configuration_is_picked():
    """A GPU size between ZeRO-3 SP=2 (fits) and every SP=1 option and ZeRO-2 SP=2 (do not): ZeRO-3 SP=2."""
    cfg = preset("llama2-7b-100k")
    totals = {(e.strategy.zero, e.strategy.sequence_parallel): e.gpu_total for e in plan_run(cfg, BIG).estimates}
    memory = (totals[("3", 2)] + totals[("2", 2)]) / 2
    assert totals[("3", 2)] < memory < min(totals[("2", 2)], *(t for (z, sp), t in totals.items() if sp == 1))
    plan = plan_run(cfg, dataclasses.replace(BIG, gpu_memory_gib=memory / GIB))
    assert plan.recommended.strategy == Strategy("3", 2)


def test_llama2_7b_at_100k_fits_one_node_of_8x80gb_with_its_preset():
    plan = plan_run(preset("llama2-7b-100k"), Cluster(1, 8, 80, 1024))
    mine = next(e for e in plan.estimates if e.strategy == plan.preset_strategy)
    assert plan.preset_strategy == Strategy("3", 1) and mine.fits
    assert plan.fewest_nodes == 1


@pytest.mark.parametrize("nodes", [2, 4, 8])
def test_llama2_70b_at_100k_fits_multinode_with_its_sp_preset(nodes):
    plan = plan_run(preset("llama2-70b-100k-sp"), Cluster(nodes, 8, 80, 1024))
    mine = next(e for e in plan.estimates if e.strategy == plan.preset_strategy)
    assert plan.preset_strategy == Strategy("3", 8) and mine.fits
    # without sequence parallelism the 80 layers' checkpoints alone (125 GiB) do not fit
    assert not any(e.fits for e in plan.estimates if e.strategy.sequence_parallel == 1)


@pytest.mark.parametrize(
    ("name", "shape", "degrees"),
    [
        ("llama3.1-8b-128k", (32, 4096, 14336, 32, 8, 128256), [1, 2, 4, 8]),
        ("qwen2.5-7b-128k", (28, 3584, 18944, 28, 4, 152064), [1, 2, 4]),  # 4 kv heads: no 8-way split
    ],
)
def test_128k_presets_plan_from_the_released_config_and_fit_one_node_of_8x80gb(name, shape, degrees):
    plan = plan_run(preset(name), Cluster(1, 8, 80, 1024))
    s = plan.shape
    fields = (s.num_hidden_layers, s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads)
    assert (*fields, s.vocab_size) == shape and "config.json as released" in s.source
    assert sorted({e.strategy.sequence_parallel for e in plan.estimates}) == degrees
    mine = next(e for e in plan.estimates if e.strategy == plan.preset_strategy)
    assert plan.preset_strategy == Strategy("3", 2) and mine.fits and mine.gpu_total < 0.5 * 80 * GIB


@pytest.mark.parametrize(
    "directory", ["models/Llama-3.1-8B-Instruct", "/data/Meta-Llama-3.1-8B", "models/Qwen2.5-7B-Instruct"]
)
def test_known_models_are_found_by_their_directory_name(directory):
    shape = model_shape(preset("llama2-7b-32k", f"model.path={directory}"))
    assert shape.vocab_size == (152064 if "Qwen" in directory else 128256)


def test_sequence_parallel_degrees_respect_heads_and_kv_heads():
    plan = plan_run(preset("llama2-70b-100k-sp"), Cluster(8, 8, 80, 1024))  # 64 heads: any slice of them, S²-Attn too
    assert sorted({e.strategy.sequence_parallel for e in plan.estimates}) == [1, 2, 4, 8, 16, 32, 64]
    dense = plan_run(preset("llama2-70b-100k-sp", "attention.implementation=sdpa"), Cluster(8, 8, 80, 1024))
    assert sorted({e.strategy.sequence_parallel for e in dense.estimates}) == [1, 2, 4, 8, 16, 32, 64]
    tiny = plan_run(tiny_config("attention.implementation=sdpa"), Cluster(2, 6, 80, 1024))  # 4 heads, 2 kv, 12 GPUs
    assert sorted({e.strategy.sequence_parallel for e in tiny.estimates}) == [1, 2, 4]
    eager = plan_run(tiny_config("attention.implementation=eager"), Cluster(2, 6, 80, 1024))
    assert {e.strategy.sequence_parallel for e in eager.estimates} == {1}


@pytest.mark.parametrize("implementation", ["s2attn", "sdpa"])
def test_sequence_parallel_rules_agree_with_the_trainer(implementation):
    """plan offers exactly the degrees that longctx.parallel.check_model accepts."""
    from transformers import LlamaConfig

    from longctx.parallel import check_model
    from longctx.plan import sequence_parallel_problem

    for heads, kv_heads in [(64, 8), (32, 32), (8, 2), (40, 40)]:
        hf_config = LlamaConfig(hidden_size=heads * 16, num_attention_heads=heads, num_key_value_heads=kv_heads)
        shape = dataclasses.replace(model_shape(tiny_config()), num_attention_heads=heads, num_key_value_heads=kv_heads)
        cfg = tiny_config(f"attention.implementation={implementation}", "train.seq_len=5120")
        for size in range(1, 81):
            try:
                check_model(hf_config, size, 5120, implementation)
                accepted = True
            except UserError:
                accepted = False
            assert accepted == (sequence_parallel_problem(shape, cfg, size) == ""), (heads, kv_heads, size)


def test_model_shape_from_a_config_json_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY | {"num_hidden_layers": 3}))
    cfg = load_config(RunConfig, None, [f"model.path={tmp_path}"])
    shape = model_shape(cfg)
    assert (shape.num_hidden_layers, shape.num_key_value_heads, shape.vocab_size) == (3, 2, 512)


# ----------------------------------------------------------------------------------------------------------------
# Bad input and the CLI
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: resolve_preset("llama2-1t-1m"), "llama2-1t-1m is neither a YAML file nor a shipped preset"),
        (lambda: plan_run(preset("llama2-7b-100k"), Cluster(1, 8, 0, 1024)), "--gpu-memory-gb=0 must be > 0"),
        (lambda: plan_run(preset("llama2-7b-100k"), Cluster(1, 8, -80, 1024)), "--gpu-memory-gb=-80 must be > 0"),
        (
            lambda: plan_run(preset("llama2-7b-100k", "parallel.sequence_parallel_size=5"), Cluster(5, 8, 80, 1024)),
            "the model's 32 attention heads do not divide over parallel.sequence_parallel_size=5",
        ),
        (
            lambda: plan_run(preset("llama2-70b-100k-sp"), Cluster(1, 4, 80, 1024)),
            "parallel.sequence_parallel_size=8 does not divide 4 GPUs",
        ),
        (
            lambda: plan_run(preset("llama2-7b-100k", "model.path=models/mystery-model"), BIG),
            "model.path=models/mystery-model has no config.json",
        ),
    ],
)
def test_bad_input_is_a_one_line_user_error(make, message):
    with pytest.raises(UserError) as error:
        make()
    assert message in str(error.value) and "\n" not in str(error.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longctx.cli", "plan", *args], cwd=REPO, capture_output=True, text=True
    )


def test_cli_prints_the_table_for_the_70b_sp_preset():
    result = run_cli("--config", "llama2-70b-100k-sp", "--nodes", "4", "--gpus-per-node", "8",
                     "--gpu-memory-gb", "80", "--host-memory-gb", "1024")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cluster: 4 node(s) × 8 GPUs = 32 GPUs of 80 GiB" in out
    assert "ZeRO-3 SP=8" in out and "<- preset" in out and "smallest configuration that fits: ZeRO-3 SP=" in out
    assert "step time:" in out and "legend:" in out


def test_cli_json_agrees_with_the_library():
    result = run_cli("--config", "launch/presets/llama2-7b-100k.yaml", "--nodes", "1", "--json", "--mfu", "0.5")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    plan = plan_run(preset("llama2-7b-100k"), Cluster(1, 8, 80, 1024, mfu=0.5))
    assert report["smallest_fitting"] == {"zero": plan.recommended.strategy.zero, "sequence_parallel": 1}
    assert report["step_seconds"] == pytest.approx(plan.step_seconds)
    assert len(report["estimates"]) == 3 * 4  # ZeRO-2, 3, 3+offload × SP 1, 2, 4, 8
    for row in report["estimates"]:
        parts = row["gpu_gib"]
        late = parts["ZeRO buckets"] if row["zero"] == "2" else 0
        throughout = sum(parts.values()) - parts["layer working set"] - parts["logits"] - late
        expected = throughout + max(parts["logits"], parts["layer working set"] + late)
        assert row["gpu_peak_gib"] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("name", ["llama3.1-8b-128k", "qwen2.5-7b-128k"])
def test_cli_plans_the_128k_presets(name):
    result = run_cli("--config", name, "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80")
    assert result.returncode == 0, result.stderr
    assert "seq_len 131072" in result.stdout and "ZeRO-3 SP=2" in result.stdout and "<- preset" in result.stdout


def test_cli_bad_input_exits_2_with_one_line():
    result = run_cli("--config", "llama2-7b-100k", "--gpu-memory-gb", "0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--gpu-memory-gb=0 must be > 0" in result.stderr
