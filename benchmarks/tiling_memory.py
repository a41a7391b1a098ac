"""Peak memory of one training step with and without the `memory` options (tiled loss, tiled MLP, offload).

    python benchmarks/tiling_memory.py [--seq-len 16384] [--out benchmarks/results/tiling_memory_cpu.json]

Each configuration runs in a fresh process: a random-init LLaMA-shaped model (LoRA + embed/norm, activation
checkpointing, S²-Attn), one forward + backward of `longctx.trainer.token_loss_sum` on seq_len tokens. Reported:
the step's peak memory above what was resident before it (CPU: peak RSS; GPU: peak allocated), the loss and the
time. The loss must be the same in every row (the options do not change the math).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

CONFIGURATIONS = {
    "plain": [],
    "tiled_loss": ["memory.tiled_loss=true"],
    "tiled_mlp": ["memory.tiled_mlp=true"],
    "tiled_loss+tiled_mlp": ["memory.tiled_loss=true", "memory.tiled_mlp=true"],
    "tiled_loss+tiled_mlp+offload": [
        "memory.tiled_loss=true",
        "memory.tiled_mlp=true",
        "memory.offload_activations=true",
    ],
}


def model_overrides(seq_len: int) -> list[str]:
    return [
        # LLaMA's vocabulary, a wide MLP (16 × hidden): the two activations the options tile, on a small model
        "model.init={model_type: llama, hidden_size: 256, intermediate_size: 4096, num_hidden_layers: 1, "
        f"num_attention_heads: 4, num_key_value_heads: 4, vocab_size: 32000, max_position_embeddings: {seq_len}}}",
        "attention.implementation=s2attn",
        "rope.type=none",
        f"train.seq_len={seq_len}",
        "memory.loss_chunk_tokens=2048",
    ]


def resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(seq_len: int, name: str) -> dict:
    """One step of configuration `name` in this process."""
    import torch

    from longctx.config import RunConfig, load_config
    from longctx.model import build_model
    from longctx.parallel import shard_batch
    from longctx.trainer import token_loss_sum

    cfg = load_config(RunConfig, None, model_overrides(seq_len) + CONFIGURATIONS[name])
    cuda = torch.cuda.is_available()
    model = build_model(cfg).to("cuda" if cuda else "cpu")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 32000, (1, seq_len), generator=generator).to(model.device)
    batch = shard_batch({"input_ids": input_ids, "labels": input_ids}, 1, 0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        before = resident_gib()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # must stay below the step's peak
    start = time.perf_counter()
    loss = token_loss_sum(model, batch, cfg.memory)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "configuration": name,
        "seq_len": seq_len,
        "step_peak_above_start_gib": round(peak - before, 3),
        "peak_before_step_gib": None if cuda else round(peak_before, 3),
        "loss_sum": float(loss),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--out", default="benchmarks/results/tiling_memory_cpu.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.seq_len, args.one)))
        return
    rows = []
    for name in CONFIGURATIONS:
        run = subprocess.run(
            [sys.executable, __file__, "--seq-len", str(args.seq_len), "--one", name],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"environment": environment(), "model": model_overrides(args.seq_len), "rows": rows}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
