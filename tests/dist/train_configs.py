"""Train several tiny-LLaMA runs one after another in one process, so one launcher start (~20-30 s) serves them all.

    deepspeed --num_gpus 2 tests/dist/train_configs.py OUTPUT_ROOT [--num-samples N] \\
        --run NAME [key=value ...] --run NAME [key=value ...] ...

Each run is train_tiny.py's: its DEFAULTS, then the run's overrides, on its RandomDocuments, written to
OUTPUT_ROOT/NAME.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train_tiny import DEFAULTS, RandomDocuments

from longctx.config import RunConfig, load_config
from longctx.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_root", type=Path)
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar="NAME [key=value ...]")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    for name, *overrides in args.run:
        output_dir = args.output_root / name
        cfg = load_config(RunConfig, None, [*DEFAULTS, f"train.output_dir={output_dir}", *overrides])
        train(cfg, dataset=RandomDocuments(args.num_samples, cfg.train.seq_len, 96))


if __name__ == "__main__":
    main()
