"""Sequence parallelism computes the one-rank function: loss and LoRA / embedding / norm gradients.

    deepspeed --num_gpus P tests/dist/sp_equivalence.py OUT.json [key=value ...]
    deepspeed --num_gpus W tests/dist/sp_equivalence.py OUT.json --engine SP [key=value ...]

Every rank builds the same tiny LLaMA twice from one seed: a reference with plain S²-Attn, which runs the whole
batch on this rank, and a sequence-parallel copy (Ulysses), which runs this rank's 1/P of its sequences. Packed
documents (position ids restarting) and tail padding are in the batch. Rank 0 writes the largest differences of
loss and trainable gradients to OUT.json.

Plain mode: all ranks are one sequence group; the gradients are summed over it by hand. --engine SP: the
sequence-parallel copy runs as the trainer runs it, in a DeepSpeed engine (deepspeed.config) over W / SP
data-parallel groups of SP ranks (each group one of the batch's sequences), with the trainer's loss weighting; the
full gradients are read back from ZeRO's partitions.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from longctx import parallel
from longctx.config import RunConfig, load_config
from longctx.data import IGNORE_INDEX
from longctx.distributed import init_distributed
from longctx.ds_config import resolve_deepspeed_config
from longctx.model import build_model
from longctx.trainer import token_loss_sum

TINY_LLAMA = (
    "model.init={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 8, num_key_value_heads: 2, vocab_size: 96, max_position_embeddings: 32}"
)
DEFAULTS = [
    TINY_LLAMA,
    "attention.implementation=s2attn",
    "attention.isolate_documents=true",
    "rope.type=linear",  # 32 -> 64 positions: factor 2
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "deepspeed.config=ds_configs/stage3.json",
]


def batch(seq_len: int, vocab_size: int, isolate_documents: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, vocab_size, (2, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[1, -11:] = IGNORE_INDEX  # padded tail
    # Documents start at 0, 21 and 40 in row 0 (one crosses the chunk edge at 32), at 0 and 32 in row 1.
    position_ids = torch.stack(
        [
            torch.cat([torch.arange(21), torch.arange(19), torch.arange(seq_len - 40)]),
            torch.cat([torch.arange(32), torch.arange(seq_len - 32)]),
        ]
    )
    if not isolate_documents:
        position_ids = torch.arange(seq_len).expand(2, -1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--engine", type=int, default=0, help="sequence-parallel degree inside a ZeRO-3 engine")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_intermixed_args()
    init_distributed()
    world_size = dist.get_world_size()
    size = args.engine or world_size
    cfg = load_config(RunConfig, None, DEFAULTS + [f"parallel.sequence_parallel_size={size}", *args.overrides])
    sp = parallel.init_sequence_parallel(size)
    full = batch(
        cfg.train.seq_len, 96, cfg.attention.isolate_documents
    )  # (2, N): one sequence per data-parallel group under --engine

    reference = build_model(cfg)
    reference_loss = token_loss_sum(reference, parallel.shard_batch(full, 1, 0))
    num_tokens = int((full["labels"][:, 1:] != IGNORE_INDEX).sum())
    (reference_loss / num_tokens if args.engine else reference_loss).backward()
    reference_grads = trainable_grads(reference)

    model = build_model(cfg)  # same seed: the same weights
    micro_batch_size = 1 if args.engine else 2  # --engine: one sequence per data-parallel group
    parallel.enable_on_model(
        model,
        sp,
        micro_batch_size=micro_batch_size,
        seq_len=cfg.train.seq_len,
        implementation=cfg.attention.implementation,
        mode=cfg.parallel.sequence_parallel_mode,
    )
    if args.engine:
        loss, grads = engine_loss_and_grads(cfg, model, full, sp, num_tokens, world_size)
    else:
        loss = token_loss_sum(model, parallel.shard_batch(full, sp.size, sp.rank), cfg.memory)
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss, group=sp.group)
        grads = trainable_grads(model)
        for grad in grads.values():
            dist.all_reduce(grad, group=sp.group)

    relative = {
        name: float((grads[name] - reference_grads[name]).norm() / reference_grads[name].norm().clamp(min=1e-30))
        for name in reference_grads
    }
    if dist.get_rank() == 0:
        worst = max(relative, key=relative.get)
        result = {
            "sequence_parallel_size": size,
            "data_parallel_size": sp.data_parallel_size,
            "loss": loss.item(),
            "reference_loss": reference_loss.item(),
            "num_trainable": len(reference_grads),
            "same_names": sorted(grads) == sorted(reference_grads),
            "trainable_names": sorted(reference_grads),
            "max_relative_grad_diff": relative[worst],
            "worst_parameter": worst,
            "max_abs_grad": max(float(g.abs().max()) for g in reference_grads.values()),
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()


def engine_loss_and_grads(cfg, model, full, sp, num_tokens, world_size):
    """The trainer's micro step in a DeepSpeed engine: data-parallel group g takes sequence g of `full`."""
    assert sp.data_parallel_size == full["input_ids"].shape[0], "one sequence per data-parallel group"
    cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.grad_clip = 1, sp.data_parallel_size, 0.0
    ds_config = resolve_deepspeed_config(cfg, world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=0.0), config=ds_config, mpu=sp.mpu
    )
    engine.train()
    own = {key: value[sp.data_parallel_rank : sp.data_parallel_rank + 1] for key, value in full.items()}
    loss = token_loss_sum(engine, parallel.shard_batch(own, sp.size, sp.rank), cfg.memory)
    factor = parallel.gradient_sum_factor(ds_config, sp)
    engine.backward(loss * factor / num_tokens, scale_wrt_gas=False)  # as the trainer weights it
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters() if p.requires_grad}
    loss = loss.detach()
    dist.all_reduce(loss)
    return loss, grads


if __name__ == "__main__":
    main()
