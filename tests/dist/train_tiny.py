"""Train a tiny random-init LLaMA on a fixed in-memory dataset, single process or under the deepspeed launcher.

    python tests/dist/train_tiny.py OUTPUT_DIR [key=value ...] [--kill-during-save-at STEP]
    deepspeed --num_gpus 2 tests/dist/train_tiny.py OUTPUT_DIR [key=value ...]

--kill-during-save-at STEP sends SIGKILL to the process in the middle of writing the checkpoint of STEP: after
DeepSpeed wrote its files, before the checkpoint is marked complete (what a node failure mid-save leaves behind).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

from longctx import checkpoint
from longctx.config import RunConfig, load_config
from longctx.trainer import train

TINY_LLAMA = (
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 96, max_position_embeddings: 32}"
)
DEFAULTS = [
    TINY_LLAMA,
    "attention.implementation=sdpa",
    "model.activation_checkpointing=false",
    "rope.type=linear",
    "train.seq_len=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.max_steps=6",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.save_every=0",
    "deepspeed.config=ds_configs/stage3.json",
]


class RandomDocuments(torch.utils.data.Dataset):
    """num_samples sequences of seq_len tokens: a random 8-token motif repeated (learnable), a padded tail."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, vocab_size, (num_samples, 8), generator=generator)
        self.input_ids = motifs.repeat(1, seq_len // 8)  # (num_samples, seq_len)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.input_ids[index]
        labels = input_ids.clone()
        labels[-(5 + 7 * (index % 4)) :] = -100  # unequal token counts: the loss must weight by tokens
        return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(len(input_ids))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--kill-during-save-at", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_intermixed_args()
    cfg = load_config(RunConfig, None, DEFAULTS + [f"train.output_dir={args.output_dir}"] + args.overrides)
    if args.kill_during_save_at:
        finalize = checkpoint._finalize

        def finalize_or_die(tmp_dir, final_dir, step, *rest):
            if step == args.kill_during_save_at:
                os.kill(os.getpid(), signal.SIGKILL)
            finalize(tmp_dir, final_dir, step, *rest)

        checkpoint._finalize = finalize_or_die
    train(cfg, dataset=RandomDocuments(args.num_samples, cfg.train.seq_len, 96))


if __name__ == "__main__":
    main()
