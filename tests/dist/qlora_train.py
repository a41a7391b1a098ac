"""train_tiny's run on a 4-bit base, then a check that the engine left the 4-bit base bit-identical.

    python tests/dist/qlora_train.py OUTPUT_DIR [key=value ...]
    deepspeed --num_gpus 2 tests/dist/qlora_train.py OUTPUT_DIR [key=value ...]

After training, every rank gathers the engine's packed 4-bit weights and quantization constants (under ZeRO-3 they
are partitioned) and compares them with a fresh 4-bit build of the same base; it writes
OUTPUT_DIR/base_check_rank{R}.json: {"num_quantized", "differing": [names], "num_partitioned" (by ZeRO-3),
"storage_dtype" (of the packed codes)}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from train_tiny import DEFAULTS, RandomDocuments

from longctx import trainer
from longctx.config import RunConfig, load_config
from longctx.model import build_model
from longctx.quant import is_quantized_linear

# LongQLoRA's shape of run: NF4 base, LoRA on all seven linears of the blocks, embeddings and norms trained.
QLORA = ["quant.type=nf4", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Packed codes and every quantization constant of each 4-bit linear, as bytes (collective under ZeRO-3)."""
    state = {}
    for name, module in model.named_modules():
        if not is_quantized_linear(module):
            continue
        with deepspeed.zero.GatheredParameters([module.weight]):
            state[f"{name}.weight"] = module.weight.data.clone().view(torch.uint8)
        for key, value in module.weight.quant_state.as_dict(packed=True).items():
            state[f"{name}.weight.{key}"] = value.clone()
    return state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_intermixed_args()
    cfg = load_config(RunConfig, None, DEFAULTS + QLORA + [f"train.output_dir={args.output_dir}"] + args.overrides)

    built = []
    build = trainer.build_model
    trainer.build_model = lambda *a, **k: built.append(build(*a, **k)) or built[-1]  # keep the trained model
    trainer.train(cfg, dataset=RandomDocuments(args.num_samples, cfg.train.seq_len, 96))

    trained = quantized_state(built[0])
    fresh = quantized_state(build_model(cfg))
    differing = sorted(k for k in fresh if k not in trained or not torch.equal(fresh[k], trained[k]))
    packed = [m.weight for m in built[0].modules() if is_quantized_linear(m)]
    report = {
        "num_quantized": len(packed),
        "differing": differing,
        "num_partitioned": sum(hasattr(p, "ds_id") for p in packed),  # ZeRO-3 took them over
        "storage_dtype": str(packed[0].dtype),
    }
    (Path(args.output_dir) / f"base_check_rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
