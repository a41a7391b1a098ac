"""Ulysses against the halo-exchange mode: step time and communication volume of sequence parallelism.

    deepspeed --num_gpus P benchmarks/sequence_parallel.py [--seq-len 8192] [--out benchmarks/results/...json]

All P ranks form one sequence group over one sequence. The same random-init model (LoRA + embed/norm, activation
checkpointing, S²-Attn with G = N/4) runs forward + backward in each mode; the losses must agree. The bytes each
rank sends per layer are computed from the tensor shapes each mode exchanges (Ulysses: the all-to-all of q, k, v
and the attention output, (P-1)/P of each local tensor leaving the rank; halo: G/2 tokens of the kv heads that
shifted heads read, to the next rank), for one forward; backward sends as much again, and activation
checkpointing repeats the forward's exchanges.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

from longctx import parallel  # noqa: E402
from longctx.config import RunConfig, load_config  # noqa: E402
from longctx.distributed import init_distributed  # noqa: E402
from longctx.model import build_model  # noqa: E402
from longctx.trainer import token_loss_sum  # noqa: E402

HIDDEN, HEADS, KV_HEADS, LAYERS = 512, 8, 8, 2


def bytes_per_layer(mode: str, seq_len: int, size: int, group_size: int, element_size: int) -> int:
    """Bytes one rank sends in one layer's forward."""
    head_dim, local_len = HIDDEN // HEADS, seq_len // size
    if mode == "ulysses":
        elements = local_len * head_dim * (2 * HEADS + 2 * KV_HEADS)  # q and output, k and v
        return elements * element_size * (size - 1) // size
    shifted_kv_heads = KV_HEADS - (HEADS // 2) // (HEADS // KV_HEADS)
    return group_size // 2 * shifted_kv_heads * head_dim * 2 * element_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/sequence_parallel_cpu.json")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    size = dist.get_world_size()
    cfg = load_config(
        RunConfig,
        None,
        [
            f"model.init={{model_type: llama, hidden_size: {HIDDEN}, intermediate_size: {4 * HIDDEN}, "
            f"num_hidden_layers: {LAYERS}, num_attention_heads: {HEADS}, num_key_value_heads: {KV_HEADS}, "
            f"vocab_size: 4096, max_position_embeddings: {args.seq_len}}}",
            "attention.implementation=s2attn",
            "rope.type=none",
            f"train.seq_len={args.seq_len}",
            f"parallel.sequence_parallel_size={size}",
        ],
    )
    sp = parallel.init_sequence_parallel(size)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 4096, (1, args.seq_len), generator=generator)
    batch = parallel.shard_batch({"input_ids": input_ids, "labels": input_ids}, sp.size, sp.rank)

    rows = []
    for mode in ("ulysses", "halo"):
        model = build_model(cfg)
        parallel.enable_on_model(
            model, sp, micro_batch_size=1, seq_len=args.seq_len, implementation="s2attn", mode=mode
        )
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            model.zero_grad()
            dist.barrier()
            start = time.perf_counter()
            loss = token_loss_sum(model, batch)
            loss.backward()
            dist.barrier()
            times.append(time.perf_counter() - start)
        loss = loss.detach()
        dist.all_reduce(loss)
        forward_bytes = bytes_per_layer(mode, args.seq_len, size, cfg.group_size, 4)
        rows.append(
            {
                "mode": mode,
                "loss_sum": loss.item(),
                "step_seconds_median": round(statistics.median(times[1:]), 3),
                "sent_per_rank_per_layer_forward_mib": round(forward_bytes / 2**20, 3),
                # forward + checkpoint recompute + backward, every layer
                "sent_per_rank_per_step_mib": round(3 * LAYERS * forward_bytes / 2**20, 3),
            }
        )
    if dist.get_rank() == 0:
        result = {
            "environment": environment(),
            "sequence_parallel_size": size,
            "seq_len": args.seq_len,
            "group_size": cfg.group_size,
            "model": {"hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "layers": LAYERS, "dtype": "float32"},
            "rows": rows,
        }
        print(json.dumps(result["rows"], indent=1))
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)
    dist.barrier()


if __name__ == "__main__":
    main()
