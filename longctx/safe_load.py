"""Reading a checkpoint someone handed you without running its code.

What longctx writes itself is safetensors (the trained weights), JSON and YAML (read with `yaml.safe_load`). What
DeepSpeed writes for resume (`*_model_states.pt`, `*_optim_states.pt`) and the per-rank trainer state are torch
pickles: they are read with `torch.load(weights_only=True)`, which rebuilds tensors, containers and primitive values
only, plus the few DeepSpeed types those files hold (`DEEPSPEED_CHECKPOINT_TYPES`). A file that needs anything
else, e.g. a planted object whose `__reduce__` calls `os.system`, is refused with its path and the global it names,
unless the run sets `train.trust_checkpoint_pickles=true` (for a checkpoint you wrote yourself).

DeepSpeed's engine reads its files through `engine.checkpoint_engine.load`, which `use_safe_loading` replaces. Its
`zero_to_fp32` script is never run by longctx: export and eval read `trained.safetensors`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from longctx.errors import UserError

TRUST_FIX = "train.trust_checkpoint_pickles=true"


def deepspeed_checkpoint_types() -> list[type]:
    """The classes DeepSpeed's checkpoint files hold (measured on ZeRO-2 and ZeRO-3, fp32 and bf16, LoRA and full)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu", *, trust_pickles: bool = False) -> Any:
    """torch.load of a checkpoint file with no code run: weights only, plus DeepSpeed's own types.

    A file that needs other globals is refused (a UserError naming the file and the global) unless trust_pickles;
    a truncated or corrupt file is a UserError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing: the checkpoint is incomplete; resume from another one")
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickles:
            return torch.load(path, map_location=map_location, weights_only=False)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"the Python global {found.group(1)}" if found else "Python objects beyond tensors"
        raise UserError(
            f"{path} asks to load {what}, which could run code: longctx does not unpickle it. If you wrote this "
            f"checkpoint yourself, resume with {TRUST_FIX}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        said = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} cannot be read ({said}): the file is truncated or corrupt; resume from another checkpoint"
        ) from None


def use_safe_loading(engine, *, trust_pickles: bool = False) -> None:
    """Make a DeepSpeed engine read its checkpoint files through `load_torch_file`."""

    def load(path: str, map_location=None) -> Any:
        return load_torch_file(path, map_location=map_location or "cpu", trust_pickles=trust_pickles)

    engine.checkpoint_engine.load = load
