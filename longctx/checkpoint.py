"""Checkpoints of a training run: save, find the newest complete one, resume, and load the trained model.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/                DeepSpeed checkpoint (engine.save_checkpoint, any ZeRO stage): what resume needs
        zero_pp_rank_*_...pt      model / optimizer partitions, one set per rank; a LoRA run leaves its frozen base
                                  out (resume, export and evaluation rebuild it from model.path / model.init)
        trained.safetensors       the fp32 master weights of every trainable parameter, consolidated over the ranks
                                  (LoRA, embeddings, norms; or all weights); what export, eval and the final model read
        base.json                 which base the run trained on: model.path's fingerprint (or the model.init), and
                                  the base linears held in 4 bits
        trainer_state_rank*.pt    per rank: sampler state, RNG states
        config.yaml               the resolved RunConfig
        ds_config.json            the resolved DeepSpeed JSON
        COMPLETE                  written last; a directory without it is never resumed from

Everything is first written to `step_N.tmp/`; rank 0 writes COMPLETE and renames the directory once every rank
has finished, so an interrupted write (kill -9, node failure) leaves only a `.tmp` directory that is ignored and
cleaned up by the next save.

Size: a LoRA checkpoint holds the trainable parameters only, 16 bytes per trainable parameter (the fp32 master weight
and Adam's two fp32 moments in the DeepSpeed state, and the 4-byte consolidated copy), whatever the size of the base.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from longctx.atomic import replace_dir, write_text_atomic
from longctx.config import RunConfig, from_dict, save_config
from longctx.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINED_PREFIX = "trained"  # trained.safetensors, or trained-0000k-of-0000n.safetensors + index when large
BASE_RECORD = "base.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory counts only with its COMPLETE marker)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_resume_checkpoint(cfg: RunConfig) -> Path | None:
    """The checkpoint train.resume asks for: auto = newest complete one in output_dir (or None), none, or a path."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(cfg.train.output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(
            f"train.resume={resume} is not a complete checkpoint (no {COMPLETE_MARKER} marker): "
            "give a checkpoints/step_N directory of a finished save, or train.resume=auto"
        )
    return path


# What a resumed run may change: how long it runs and how it logs and saves. Anything else (model, data, batch,
# optimizer) would silently continue a different run from this one's weights and optimizer state.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.resume",
    "train.trust_checkpoint_pickles",
    "model.trust_remote_code",
    "train.output_dir",
    "data.val",
}


def check_resumable(path: Path, cfg: RunConfig) -> None:
    """Refuse to resume from a checkpoint whose run had other settings than cfg (beyond RESUMABLE_CHANGES)."""
    from longctx.config import to_dict

    saved, current = _flatten(to_dict(load_run_config(path))), _flatten(to_dict(cfg))
    changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    changed = [key for key in changed if key not in RESUMABLE_CHANGES]
    if changed:
        shown = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:3])
        raise UserError(
            f"train.output_dir={cfg.train.output_dir} holds checkpoints of a different run ({shown}): "
            "use another train.output_dir, or train.resume=none to start over there"
        )
    check_base(path, cfg)


def check_complete(path: Path, world_size: int) -> None:
    """Every file a resume on `world_size` ranks reads is there and whole, before any process group or model exists:
    the trained weights (safetensors header and size), DeepSpeed's model and optimizer states, each rank's trainer
    state. (The pickled states are read weights-only, see longctx/safe_load.py; their damage shows when read.)"""
    from longctx.tensor_files import check_safetensors_file

    trained = sorted(path.glob(f"{TRAINED_PREFIX}*.safetensors"))
    if not trained:
        raise UserError(
            f"checkpoint {path} has no {TRAINED_PREFIX}.safetensors: it was written by an earlier longctx version "
            "or is damaged; resume from another checkpoint, or start over with train.resume=none"
        )
    for file in trained:
        check_safetensors_file(file)
    needed = {
        "DeepSpeed model states (*model_states.pt)": list(path.glob("*model_states.pt")),
        "DeepSpeed optimizer states (*optim_states.pt)": list(path.glob("*optim_states.pt")),
    }
    for what, found in needed.items():
        if not found:
            raise UserError(f"checkpoint {path} has no {what}: it is damaged; resume from another checkpoint")
    for rank in range(world_size):
        state_file = path / f"trainer_state_rank{rank}.pt"
        if not state_file.is_file():
            raise UserError(
                f"checkpoint {path} has no {state_file.name}: it was written by a different number of ranks; "
                "resume with the same world size (or start fresh with train.resume=none)"
            )
    for file in path.glob("*.pt"):
        if file.stat().st_size == 0:
            raise UserError(f"{file} is empty: the checkpoint is damaged; resume from another checkpoint")


def base_record(cfg: RunConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """What identifies the base of a run: model.path's fingerprint (or the model.init and seed), plus the names of
    the base linears held in 4 bits (taken from the built model), which a 4-bit run's export must reproduce."""
    from longctx.tensor_files import fingerprint

    if cfg.model.path:
        record: dict[str, Any] = {"path": str(Path(cfg.model.path).resolve())}
        record["fingerprint"] = fingerprint(cfg.model.path)
    else:
        record = {"init": cfg.model.init, "seed": cfg.train.seed}
    if cfg.quant.enabled and model is not None:
        from longctx.quant import is_quantized_linear

        quantized = [(name, module) for name, module in model.named_modules() if is_quantized_linear(module)]
        record["quantized_linears"] = [base_name(name) for name, _ in quantized]
        record["quant_blocksize"] = quantized[0][1].weight.blocksize if quantized else 64
    return record


def read_base_record(path: str | os.PathLike) -> dict[str, Any] | None:
    record = Path(path) / BASE_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def check_base(path: str | os.PathLike, cfg: RunConfig) -> None:
    """Refuse a checkpoint whose recorded base weights differ from what cfg's model.path holds now.

    A LoRA checkpoint carries no frozen weights: resume and export take them from model.path, so a model.path that
    now holds other weights (another download, a re-export) would silently give another model.
    """
    record = read_base_record(path)
    if record is None or "fingerprint" not in record or not cfg.model.path:
        return
    if not Path(cfg.model.path).is_dir():
        raise UserError(
            f"model.path={cfg.model.path}, the base of checkpoint {path}, is not a directory: the checkpoint holds "
            "only what training changed; point model.path at the base model it was trained from"
        )
    from longctx.tensor_files import fingerprint

    now, recorded = fingerprint(cfg.model.path), record["fingerprint"]
    if now != recorded:
        differing = ", ".join(sorted(k for k in now.keys() | recorded.keys() if now.get(k) != recorded.get(k))[:3])
        raise UserError(
            f"model.path={cfg.model.path} is not the base checkpoint {path} was trained from ({differing} differ "
            "from its base.json): point model.path at the original base model"
        )


def base_name(name: str) -> str:
    """A training-model parameter or module name as the plain base model names it (peft's wrapper removed)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "init":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_checkpoint(
    engine, step: int, cfg: RunConfig, ds_config: dict[str, Any], trainer_state: dict[str, Any], base: dict[str, Any]
) -> Path:
    """Collective: every rank calls it. Writes step_N.tmp, then rank 0 marks it COMPLETE and renames it.

    `base` is `base_record(cfg, model)`, written as base.json.
    """
    root = Path(cfg.train.output_dir) / CHECKPOINTS_DIR
    name = step_dir_name(step)
    tmp_tag = name + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # leftovers of an interrupted save of the same step
    dist.barrier()
    # A LoRA run's frozen base is not saved: resume and export rebuild it, bit for bit, from model.path/model.init.
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=cfg.lora.enabled)
    save_trained(engine.module, root / tmp_tag, rank)
    state = {**trainer_state, "rng": _rng_state()}
    torch.save(state, root / tmp_tag / f"trainer_state_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        write_text_atomic(root / tmp_tag / BASE_RECORD, json.dumps(base, indent=2))
        _finalize(root / tmp_tag, root / name, step, cfg, ds_config)
    dist.barrier()
    return root / name


def save_trained(model: torch.nn.Module, directory: Path, rank: int) -> None:
    """Collective: write the fp32 master weights of model's trainable parameters as trained*.safetensors (rank 0).

    Under ZeRO each one is gathered from the optimizer's fp32 partitions (DeepSpeed's safe_get_full_fp32_param, a
    collective over the data-parallel ranks) and written at once, so rank 0 holds one parameter at a time.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from longctx.tensor_files import ShardedWriter, TensorSpec

    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    specs = [TensorSpec(name, tuple(getattr(p, "ds_shape", p.shape)), torch.float32) for name, p in params]
    writer = ShardedWriter(directory, specs, prefix=TRAINED_PREFIX) if rank == 0 else None
    for (name, param), spec in zip(params, specs):
        full = safe_get_full_fp32_param(param)
        if full is None:  # no ZeRO optimizer behind it: the parameter itself is the master weight
            full = param.detach()
        if writer is not None:
            writer.write(name, full.float().reshape(spec.shape))
    if writer is not None:
        writer.close()


def load_trained(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trainable parameters of a checkpoint as written by `save_trained`: {training-model name: fp32 tensor}."""
    from longctx.tensor_files import SafetensorsReader

    reader = SafetensorsReader.of_directory(path, prefix=TRAINED_PREFIX)
    if reader is None:
        raise UserError(
            f"checkpoint {path} has no {TRAINED_PREFIX}.safetensors: it was written by an earlier longctx version; "
            "export or evaluate it with that version"
        )
    return reader.read_all()


def _finalize(tmp_dir: Path, final_dir: Path, step: int, cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    save_config(cfg, tmp_dir / "config.yaml")
    write_text_atomic(tmp_dir / "ds_config.json", json.dumps(ds_config, indent=2))
    write_text_atomic(tmp_dir / COMPLETE_MARKER, json.dumps({"step": step}))
    replace_dir(tmp_dir, final_dir)  # a complete checkpoint of the same step from an earlier run is replaced


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Rank 0: delete all but the newest keep_last complete checkpoints, and what interrupted saves left."""
    found = complete_checkpoints(output_dir)
    for old in found[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(output_dir) / CHECKPOINTS_DIR
    for leftover in [*root.glob("step_*.tmp"), *root.glob("step_*.old-*")]:  # interrupted saves and replacements
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(engine, path: Path, *, trust_pickles: bool = False) -> dict[str, Any]:
    """Collective: restore the engine (weights, optimizer, scheduler) and return this rank's trainer state.

    Every file is read without running code from it (longctx/safe_load.py); trust_pickles lifts that for files
    holding other Python objects (train.trust_checkpoint_pickles).
    """
    from longctx.safe_load import load_torch_file, use_safe_loading

    base_excluded = load_run_config(path).lora.enabled  # see save_checkpoint: the engine already holds the base
    use_safe_loading(engine, trust_pickles=trust_pickles)
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=not base_excluded)
    # check_complete saw every rank's file before the run started
    state = load_torch_file(path / f"trainer_state_rank{dist.get_rank()}.pt", trust_pickles=trust_pickles)
    _set_rng_state(state.pop("rng"))
    return state


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def load_run_config(path: str | os.PathLike, *, trust_remote_code: bool = False) -> RunConfig:
    """The resolved RunConfig saved with a checkpoint.

    model.trust_remote_code is the caller's (the current command line or preset), never the file's: a checkpoint
    someone hands you cannot turn custom code on.
    """
    import dataclasses

    config_file = Path(path) / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.yaml: give a checkpoints/step_N directory written by longctx train")
    try:
        tree = yaml.safe_load(config_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"{config_file} is not readable YAML ({str(e).splitlines()[0]}): the checkpoint is damaged"
        ) from None
    if not isinstance(tree, dict):
        raise UserError(f"{config_file} does not hold a run config: the checkpoint is damaged")
    cfg = from_dict(RunConfig, tree)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, trust_remote_code=trust_remote_code))
