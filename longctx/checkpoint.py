"""Checkpoints of a training run: save, find the newest complete one, resume, and load the trained model.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/                DeepSpeed checkpoint (engine.save_checkpoint, any ZeRO stage)
        zero_pp_rank_*_...pt      model / optimizer partitions, one set per rank
        trainer_state_rank*.pt    per rank: sampler state, RNG states
        config.yaml               the resolved RunConfig
        ds_config.json            the resolved DeepSpeed JSON
        COMPLETE                  written last; a directory without it is never resumed from

Everything is first written to `step_N.tmp/`; rank 0 writes COMPLETE and renames the directory once every rank
has finished, so an interrupted write (kill -9, node failure) leaves only a `.tmp` directory that is ignored and
cleaned up by the next save.
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

from longctx.config import RunConfig, from_dict, save_config
from longctx.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
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


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "init":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_checkpoint(
    engine, step: int, cfg: RunConfig, ds_config: dict[str, Any], trainer_state: dict[str, Any]
) -> Path:
    """Collective: every rank calls it. Writes step_N.tmp, then rank 0 marks it COMPLETE and renames it."""
    root = Path(cfg.train.output_dir) / CHECKPOINTS_DIR
    name = step_dir_name(step)
    tmp_tag = name + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # leftovers of an interrupted save of the same step
    dist.barrier()
    # A 4-bit run's frozen base is not saved: resume and export rebuild it, bit for bit, from model.path/model.init.
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=cfg.quant.enabled)
    state = {**trainer_state, "rng": _rng_state()}
    torch.save(state, root / tmp_tag / f"trainer_state_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        _finalize(root / tmp_tag, root / name, step, cfg, ds_config)
    dist.barrier()
    return root / name


def _finalize(tmp_dir: Path, final_dir: Path, step: int, cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    save_config(cfg, tmp_dir / "config.yaml")
    _write_atomic(tmp_dir / "ds_config.json", json.dumps(ds_config, indent=2))
    _write_atomic(tmp_dir / COMPLETE_MARKER, json.dumps({"step": step}))
    if final_dir.exists():  # a complete checkpoint of the same step from an earlier run: replace it
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Rank 0: delete all but the newest keep_last complete checkpoints, and any interrupted `.tmp` saves."""
    found = complete_checkpoints(output_dir)
    for old in found[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in (Path(output_dir) / CHECKPOINTS_DIR).glob("step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Collective: restore the engine (weights, optimizer, scheduler) and return this rank's trainer state."""
    base_excluded = load_run_config(path).quant.enabled  # see save_checkpoint: the engine already holds the base
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=not base_excluded)
    state_file = path / f"trainer_state_rank{dist.get_rank()}.pt"
    if not state_file.is_file():
        raise UserError(
            f"checkpoint {path} has no {state_file.name}: it was written by a different number of ranks; "
            "resume with the same world size (or start fresh with train.resume=none)"
        )
    state = torch.load(state_file, weights_only=True)
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The resolved RunConfig saved with a checkpoint."""
    config_file = Path(path) / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.yaml: give a checkpoints/step_N directory written by longctx train")
    return from_dict(RunConfig, yaml.safe_load(config_file.read_text()))


def load_trained_model(ckpt_dir: str | os.PathLike, *, merge_lora: bool = True) -> tuple[torch.nn.Module, RunConfig]:
    """The trained model of a checkpoint (any ZeRO stage, any rank count) on CPU in fp32, eval mode.

    LoRA is merged unless merge_lora=False (export keeps the peft wrapper to write an adapter). Attention is dense
    (evaluation never uses S²-Attn); RoPE scaling is that of the run.
    """
    import dataclasses

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from longctx.model import EVAL_ATTENTION, add_lora, build_model

    path = Path(ckpt_dir)
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker): pick a checkpoints/step_N")
    cfg = load_run_config(path)
    # Rebuild the training structure (peft wrapper included) with dense attention, so that names match.
    dense_cfg = dataclasses.replace(
        cfg,
        attention=dataclasses.replace(cfg.attention, implementation=EVAL_ATTENTION),
        model=dataclasses.replace(cfg.model, activation_checkpointing=False, dtype="float32"),
    )
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    if cfg.quant.enabled:
        # The frozen 4-bit base is rebuilt from model.path / model.init in the run's dtype (the same codes and scales
        # as in training) and dequantized into plain linears; the checkpoint supplies only what trained.
        trained_in = dataclasses.replace(cfg.model, dtype=_training_dtype(path))
        model = build_model(dataclasses.replace(dense_cfg, model=trained_in), for_training=False).float()
        model = add_lora(model, cfg)  # a 4-bit run always trains LoRA (the config refuses full fine-tuning)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state_dict = {name: tensor for name, tensor in state_dict.items() if name in trained}
    else:
        model = build_model(dense_cfg, for_training=True)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a shape mismatch, e.g. another lora.r
        missing, unexpected = [str(e).strip().splitlines()[-1].strip()], []
    if cfg.quant.enabled:
        missing = [name for name in missing if name in trained]
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise UserError(
            f"checkpoint {path} does not match its own config.yaml (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}): it was written by an incompatible longctx version or its "
            "config.yaml was edited; use the longctx version and config that trained it"
        )
    if cfg.lora.enabled and merge_lora:
        model = model.merge_and_unload()
    model.requires_grad_(False)
    return model.eval(), cfg


def _training_dtype(path: Path) -> str:
    """The dtype the run trained in (model.dtype=auto resolves per machine, so read the saved DeepSpeed JSON)."""
    ds_config = json.loads((path / "ds_config.json").read_text())
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if ds_config.get(key, {}).get("enabled") is True:
            return dtype
    return "float32"


def write_final_model(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Save a checkpoint's trained model (LoRA merged, RoPE scaling in config.json) as a HF directory, atomically.

    `tokenizer` (a data_prep.tokenizer.Tokenizer), when given, is saved beside it in Hugging Face format. The
    weights are saved in the run's dtype (bf16 on GPU, fp32 on CPU); `longctx export` writes any other.
    """
    from longctx.model import resolve_dtype

    model, cfg = load_trained_model(ckpt_dir)
    model.to(resolve_dtype(cfg))
    model.config.use_cache = True
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_hf(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
