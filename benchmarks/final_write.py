"""Checkpoint size and peak host memory of writing the final model, on a scaled-down LLaMA-2-7B shape (CPU).

    .venv/bin/python benchmarks/final_write.py [--layers 2] [--out /tmp/final_write]
    -> results/final_write_cpu.json

The shape is LLaMA-2-7B's (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with fewer layers, saved in bf16 as
the base. One LoRA run of the llama2-7b-32k preset's kind (LoRA r=8 on q/k/v/o, trainable embeddings and norms, bf16,
ZeRO-3, one rank) trains 1 step at a short length and checkpoints. Then, each in a fresh process whose peak resident
memory (ru_maxrss) is read:
  * streamed: `longctx.merge.write_final_model` (what a run's end and `longctx export` do now);
  * whole in fp32: the base loaded whole in fp32 and saved, the floor of what the end of a run did before (it also
    consolidated the checkpoint, frozen base included, in fp32).
Sizes are of the files on disk. The rule for other shapes follows from what is held: see the README.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_base(path: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.plan import LLAMA2_SHAPES

    shape = dict(LLAMA2_SHAPES["7b"], num_hidden_layers=layers)
    config = AutoConfig.for_model("llama", max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)


def train_one_step(base: Path, out: Path) -> Path:
    """A 1-rank bf16 ZeRO-3 LoRA run of one step at 64 tokens on random tokens; returns its checkpoint."""
    import torch

    from longctx import checkpoint
    from longctx.config import RunConfig, load_config
    from longctx.trainer import train

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            ids = torch.randint(0, 32000, (64,), generator=torch.Generator().manual_seed(index))
            return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(64)}

    cfg = load_config(
        RunConfig,
        REPO / "launch/presets/llama2-7b-32k.yaml",
        [
            f"model.path={base}",
            "model.dtype=bfloat16",
            "model.activation_checkpointing=false",
            "attention.group_size=16",
            "train.seq_len=64",
            "train.global_batch_size=1",
            "train.max_steps=1",
            f"train.output_dir={out}",
            f"deepspeed.config={REPO / 'ds_configs/stage3.json'}",
        ],
    )
    train(cfg, dataset=RandomTokens())
    return checkpoint.complete_checkpoints(out)[-1]


def measure_streamed(ckpt: str, out: str) -> None:
    from longctx.merge import write_final_model

    before = rss_gib()
    write_final_model(ckpt, out)
    print(json.dumps({"rss_before_gib": before, "peak_rss_gib": rss_gib()}))


def measure_whole_fp32(base: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    before = rss_gib()
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(out)
    print(json.dumps({"rss_before_gib": before, "peak_rss_gib": rss_gib()}))


def in_fresh_process(function: str, *args: str) -> dict:
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import final_write; final_write.{function}(*sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _specs(directory: Path):
    from longctx.tensor_files import SafetensorsReader

    reader = SafetensorsReader.of_directory(directory)
    return [reader.spec(name) for name in reader.names()]


def size_gib(path: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/longctx_final_write")
    parser.add_argument("--reuse", action="store_true", help="keep the base and checkpoint of an earlier run in --out")
    args = parser.parse_args()
    root = Path(args.out)
    from longctx import checkpoint

    if not (args.reuse and checkpoint.complete_checkpoints(root / "run")):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_base(root / "base", args.layers)
        train_one_step(root / "base", root / "run")
    for stale in ("final", "whole"):
        shutil.rmtree(root / stale, ignore_errors=True)
    ckpt = checkpoint.complete_checkpoints(root / "run")[-1]
    num_params = sum(math.prod(spec.shape) for spec in _specs(root / "base"))
    streamed = in_fresh_process("measure_streamed", str(ckpt), str(root / "final"))
    whole = in_fresh_process("measure_whole_fp32", str(root / "base"), str(root / "whole"))
    from safetensors import safe_open

    with safe_open(str(ckpt / "trained.safetensors"), "pt") as f:
        num_trainable = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    row = {
        "shape": f"llama2-7b with {args.layers} layers",
        "num_params": num_params,
        "num_trainable": num_trainable,
        "base_gib": size_gib(root / "base", "*.safetensors"),
        "checkpoint_gib": size_gib(ckpt),
        "checkpoint_deepspeed_gib": size_gib(ckpt, "*.pt"),
        "checkpoint_trained_gib": size_gib(ckpt, "trained*.safetensors"),
        "checkpoint_bytes_per_trainable": size_gib(ckpt) * 2**30 / num_trainable,
        "final_model_gib": size_gib(root / "final", "*.safetensors"),
        "streamed_write": {**streamed, "delta_gib": streamed["peak_rss_gib"] - streamed["rss_before_gib"]},
        "whole_fp32_write": {**whole, "delta_gib": whole["peak_rss_gib"] - whole["rss_before_gib"]},
        **environment(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "final_write_cpu.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
