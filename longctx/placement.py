"""Models too large for one GPU, for evaluation: decoder layers split in contiguous groups over every visible GPU.

`balanced_device_map` computes the split from the model's config alone (weights on the meta device, no memory): the
embeddings with the first group, the final norm and head with the last, each group about the same number of bytes
(accelerate's infer_auto_device_map under an equal budget per GPU). `load_across_gpus` then loads a Hugging Face
directory straight onto that map, so no device ever holds more than its share, and transformers' hooks move the hidden
states from one GPU to the next. Dense attention and the evaluation dtype are as in `evaluate.load_eval_model`.
A longctx training checkpoint is evaluated this way once exported (`longctx export`), which writes such a directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from longctx.errors import UserError

DEVICE_MAPS = ("none", "balanced")
BUDGET_SLACK = 1.10  # per-device budget over an exact 1/N share: room for the layer that does not divide evenly


def balanced_device_map(config, devices: list[int | str], dtype: torch.dtype) -> dict[str, int | str]:
    """{module name: device} splitting the decoder layers of `config`'s model over `devices` in contiguous groups."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    total = compute_module_sizes(model, dtype=dtype)[""]
    largest_layer = max(size for name, size in compute_module_sizes(model, dtype=dtype).items() if name.count(".") == 2)
    budget = math.ceil(total / len(devices) * BUDGET_SLACK) + largest_layer
    device_map = infer_auto_device_map(
        model, max_memory={device: budget for device in devices}, no_split_module_classes=no_split, dtype=dtype
    )
    unplaced = sorted({str(d) for d in device_map.values()} - {str(d) for d in devices})
    assert not unplaced, f"modules left on {unplaced} although the budgets sum to more than the model"
    return device_map


def check_device_map(models: dict[str, str], device_map: str) -> None:
    """Refuse, before anything is loaded, what `balanced` cannot do: no GPU, or a training checkpoint."""
    from longctx.evaluate import resolve_model_dir

    if device_map == "none":
        return
    for path in models.values():
        if resolve_model_dir(path)[1]:
            raise UserError(
                f"--device-map {device_map} loads Hugging Face model directories; {path} is a training checkpoint: "
                "export it first (longctx export CHECKPOINT --out DIR) and evaluate DIR"
            )
    if not torch.cuda.is_available():
        raise UserError(f"--device-map {device_map} spreads a model over GPUs and none is visible: drop --device-map")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--device-map {device_map} drives every GPU from one process, but this is one of "
            f"{os.environ['WORLD_SIZE']} launched processes: run it without the deepspeed launcher"
        )


def load_for_eval(path: str | os.PathLike, device_map: str = "none"):
    """`evaluate.load_eval_model` (one device), or with device_map balanced `load_across_gpus` (every GPU)."""
    from longctx.evaluate import load_eval_model

    return load_across_gpus(path) if device_map == "balanced" else load_eval_model(path)


def load_across_gpus(path: str | os.PathLike, devices: list[int | str] | None = None, dtype: torch.dtype | None = None):
    """A Hugging Face model directory loaded for evaluation with its layers spread over `devices` (default: every
    visible GPU), dense attention, parameters in the evaluation dtype."""
    from transformers import AutoModelForCausalLM

    from longctx.evaluate import eval_dtype, eval_model_config, resolve_model_dir
    from longctx.model import EVAL_ATTENTION

    if devices is None:
        check_device_map({"model": str(path)}, "balanced")
        devices = list(range(torch.cuda.device_count()))
    model_dir, _ = resolve_model_dir(path)
    dtype = dtype or eval_dtype(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    device_map = balanced_device_map(eval_model_config(path), devices, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        Path(model_dir), dtype=dtype, device_map=device_map, attn_implementation=EVAL_ATTENTION, trust_remote_code=False
    )
    return model.eval()
