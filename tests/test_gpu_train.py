"""bf16 training on CUDA (NCCL, one rank) for the model shape of every GPU preset, and the 4-bit NF4 base.

Each GPU preset (launch/presets/llama2-*.yaml) trains 2 steps of 2 micro batches with its own settings (attention,
group size as a fraction of the sequence, RoPE scaling, LoRA targets and rank, trainable embed/norm, 4-bit base,
DeepSpeed JSON, tiled MLP / loss) on its LLaMA-2 shape scaled down: head_dim 128, the same ratio of heads to kv heads,
vocabulary 32000, but 2 layers and fewer heads (SCALED_HEADS), at min(seq_len, 16384) tokens. What changes besides:
model.init instead of model.path, the batch, the steps, and sequence_parallel_size=1 (one GPU).
The 4-bit tests run tests/dist/qlora_train.py (its base from a directory, as in real use) under ZeRO-2 and ZeRO-3
with the llama2-7b-8k-qlora preset's LoRA and quant settings; it checks that the engine left the 4-bit base
bit-identical.

Each run is a child process (`python tests/test_gpu_train.py OUTPUT_DIR PRESET [key=value ...]` for the presets), so
NCCL and DeepSpeed state never reach pytest. The runs start together when the first of them is asked for, at most
MAX_PARALLEL at a time (each takes a few GB of GPU memory; most of its time is imports and set-up), and each test then
waits for its own.
`test_scaled_preset_configs_validate` is the CPU half: every scaled preset config builds and validates in `make test`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from longctx.checkpoint import complete_checkpoints, step_dir_name
from longctx.config import RunConfig, load_config
from longctx.plan import LLAMA2_SHAPES

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "dist"))
from train_tiny import TINY_LLAMA, RandomDocuments  # noqa: E402

PRESETS = sorted((REPO / "launch" / "presets").glob("llama2-*.yaml"))
QLORA_PRESET = REPO / "launch" / "presets" / "llama2-7b-8k-qlora.yaml"
QLORA_SCRIPT = REPO / "tests" / "dist" / "qlora_train.py"
HEAD_DIM = 128
SCALED_HEADS = {"7b": (8, 8), "13b": (10, 10), "70b": (16, 2)}  # (heads, kv heads): LLaMA-2's ratio (1, 1, 8)
NUM_LAYERS, VOCAB, MAX_SEQ_LEN, STEPS = 2, 32000, 16384, 2
MAX_PARALLEL = 5
RUN_TIMEOUT_S = 420
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
BNB_SKIP = "bitsandbytes is not installed: carry its wheel (../shared/tools/gpu-wheels.sh --with-bnb)"


def model_size(preset: Path) -> str:
    return re.match(r"llama2-(\d+b)-", preset.name)[1]


def has_4bit_base(preset: Path) -> bool:
    return yaml.safe_load(preset.read_text()).get("quant", {}).get("type", "none") != "none"


def scaled_shape(size: str) -> dict:
    """LLaMA-2-<size>'s config scaled down: head_dim, heads per kv head, MLP ratio and vocabulary kept."""
    real = LLAMA2_SHAPES[size]
    heads, kv_heads = SCALED_HEADS[size]
    hidden = heads * HEAD_DIM
    intermediate = round(hidden * real["intermediate_size"] / real["hidden_size"] / 64) * 64
    return dict(
        model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip


def preset_overrides(preset: Path, output_dir: Path) -> list[str]:
    """What the scaled run changes in the preset (the module docstring); everything else is the preset's."""
    raw = yaml.safe_load(preset.read_text())
    seq_len = min(raw["train"]["seq_len"], MAX_SEQ_LEN)
    group_size_ratio = raw["attention"]["group_size"] / raw["train"]["seq_len"]
    return [
        "model.path=",
        f"model.init={flow_yaml(scaled_shape(model_size(preset)))}",
        f"train.seq_len={seq_len}",
        "attention.group_size=0",
        f"attention.group_size_ratio={group_size_ratio}",
        "train.micro_batch_size=1",
        "train.gradient_accumulation_steps=0",
        "train.global_batch_size=2",
        f"train.max_steps={STEPS}",
        "train.save_every=0",
        f"train.output_dir={output_dir}",
        "train.resume=none",
        "parallel.sequence_parallel_size=1",  # one GPU: the preset's split needs its 8 ranks
        "data.train=",
    ]


def preset_sections(preset: Path, sections: tuple[str, ...]) -> list[str]:
    """The preset's keys of `sections` as overrides, e.g. lora.r=64."""
    raw = yaml.safe_load(preset.read_text())
    return [f"{section}.{key}={flow_yaml(value)}" for section in sections for key, value in raw[section].items()]


def flow_yaml(value) -> str:
    """One-line YAML that reads back as `value` (json.dumps writes 1e-05, which YAML reads as a string)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------------------------------------------
# The runs, started together
# ----------------------------------------------------------------------------------------------------------------


def preset_command(preset: Path, output_dir: Path) -> list[str]:
    return [sys.executable, __file__, str(output_dir), str(preset)]


def qlora_command(stage: str, output_dir: Path, base_dir: Path) -> list[str]:
    settings = preset_sections(QLORA_PRESET, ("lora", "quant"))
    return [
        *(sys.executable, str(QLORA_SCRIPT), str(output_dir), "--num-samples", "4", *settings),
        *(f"deepspeed.config=ds_configs/{stage}.json", "model.init={}", f"model.path={base_dir}"),
        *("train.max_steps=1", "train.global_batch_size=2", "attention.implementation=s2attn"),
        *("attention.group_size=0", "model.activation_checkpointing=true"),
    ]


def run(command: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "log.txt").open("w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(command, result.returncode, (output_dir / "log.txt").read_text())


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """{run name: future of (CompletedProcess, output_dir)} for the runs the selected tests of this module need."""
    wanted = {
        item.callspec.params.get("run_name")
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("gpu_train")
    runnable = [p for p in PRESETS if p.stem in wanted and (has_bitsandbytes or not has_4bit_base(p))]
    commands = {p.stem: (preset_command(p, root / p.stem), root / p.stem) for p in runnable}
    if has_bitsandbytes and {"nf4-stage2", "nf4-stage3"} & wanted:
        from longctx.model import build_model

        base_dir = root / "base"
        base_cfg = load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none", "model.dtype=bfloat16"])
        build_model(base_cfg, for_training=False).save_pretrained(base_dir)
        for stage in ("stage2", "stage3"):
            commands[f"nf4-{stage}"] = (qlora_command(stage, root / stage, base_dir), root / stage)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_PARALLEL)
    futures = {
        name: pool.submit(lambda c, d: (run(c, d), d), command, output_dir)
        for name, (command, output_dir) in commands.items()
    }
    yield futures
    pool.shutdown(wait=True)


def finished(runs, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    result, output_dir = runs[name].result()
    assert result.returncode == 0, result.stdout[-4000:]
    return result, output_dir


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_scaled_preset_configs_validate(preset, tmp_path):
    cfg = load_config(RunConfig, preset, preset_overrides(preset, tmp_path))
    raw = yaml.safe_load(preset.read_text())
    real = LLAMA2_SHAPES[model_size(preset)]
    init = cfg.model.init
    heads_per_kv_head = init["num_attention_heads"] / init["num_key_value_heads"]
    assert init["hidden_size"] // init["num_attention_heads"] == HEAD_DIM
    assert real["hidden_size"] // real["num_attention_heads"] == HEAD_DIM
    assert heads_per_kv_head == real["num_attention_heads"] / real["num_key_value_heads"]
    assert init["vocab_size"] == real["vocab_size"]
    assert cfg.train.seq_len % cfg.group_size == 0 and cfg.group_size / cfg.train.seq_len == pytest.approx(0.25)
    # The preset's own settings are kept.
    assert cfg.lora.target_modules == raw["lora"]["target_modules"] and cfg.lora.r == raw["lora"]["r"]
    assert cfg.quant.type == raw.get("quant", {}).get("type", "none")
    assert cfg.deepspeed.config == raw["deepspeed"]["config"]
    assert cfg.rope.type == raw["rope"]["type"] and cfg.attention.implementation == "s2attn"
    assert cfg.memory.tiled_mlp == raw.get("memory", {}).get("tiled_mlp", False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("run_name", [p.stem for p in PRESETS])
def test_preset_trains_in_bf16_on_nccl_and_writes_checkpoint_and_final_model(runs, run_name):
    preset = REPO / "launch" / "presets" / f"{run_name}.yaml"
    if has_4bit_base(preset) and not has_bitsandbytes:
        pytest.skip(BNB_SKIP)
    result, output_dir = finished(runs, run_name)
    steps = metrics(output_dir)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for step in steps:
        assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0, step
        assert step["memory_gb"] > 0  # torch.cuda.max_memory_allocated: the run was on the GPU
    # A random model over 32000 tokens starts near the uniform loss, ln 32000 = 10.37.
    assert abs(steps[0]["loss"] - math.log(VOCAB)) < 1.5, steps[0]
    (checkpoint,) = complete_checkpoints(output_dir)  # save_every=0: the last step only
    assert checkpoint.name == step_dir_name(STEPS) and not list(checkpoint.parent.glob("*.tmp"))
    assert (checkpoint / "config.yaml").is_file() and list(checkpoint.glob("trained*.safetensors"))
    ds_config = json.loads((checkpoint / "ds_config.json").read_text())
    raw = yaml.safe_load(preset.read_text())
    expected_stage = json.loads((REPO / raw["deepspeed"]["config"]).read_text())["zero_optimization"]["stage"]
    assert ds_config["bf16"]["enabled"] is True and ds_config["zero_optimization"]["stage"] == expected_stage
    child = json.loads((output_dir / "child.json").read_text())
    assert child["backend"] == "nccl" and child["device"] == "cuda", child
    final = output_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert list(final.glob("*.safetensors")), sorted(p.name for p in final.iterdir())
    assert config["dtype"] == "bfloat16" and config["num_attention_heads"] == SCALED_HEADS[model_size(preset)][0]
    seq_len = min(raw["train"]["seq_len"], MAX_SEQ_LEN)  # interpolated from the scaled shape's 4096 positions
    assert config["rope_parameters"]["factor"] == seq_len / 4096 and config["max_position_embeddings"] == seq_len


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not has_bitsandbytes, reason=BNB_SKIP)
@pytest.mark.parametrize("run_name", ["nf4-stage2", "nf4-stage3"])
def test_4bit_base_trains_one_step_on_cuda_and_stays_bit_identical(runs, run_name):
    _, output_dir = finished(runs, run_name)
    (step,) = metrics(output_dir)
    assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0, step
    check = json.loads((output_dir / "base_check_rank0.json").read_text())
    zero3 = run_name.endswith("stage3")  # the packed codes in the model dtype (bf16), partitioned by ZeRO-3
    expected = {"num_partitioned": 14 if zero3 else 0, "storage_dtype": f"torch.{'bfloat16' if zero3 else 'uint8'}"}
    assert check == {"num_quantized": 14, "differing": [], **expected}, check  # 2 layers × 7 linears in 4 bits
    assert (output_dir / "final" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# The child: one preset's scaled run
# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="one preset's scaled-down training run (see the module docstring)")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("preset", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch.distributed as dist

    from longctx.trainer import train

    cfg = load_config(RunConfig, args.preset, preset_overrides(args.preset, args.output_dir) + args.overrides)
    train(cfg, dataset=RandomDocuments(8, cfg.train.seq_len, VOCAB))
    child = {"backend": dist.get_backend(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    (args.output_dir / "child.json").write_text(json.dumps(child))


if __name__ == "__main__":
    main()
