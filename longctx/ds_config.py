"""The DeepSpeed JSON of a run: the ONE module that reads, validates and fills it (trainer, plan and quant use it).

The JSON (deepspeed.config) holds the engine's own settings: ZeRO stage, buckets, offload, an optimizer. The values
the run owns (batch sizes, clipping, precision, the optimizer's hyperparameters) are "auto" there and filled from the
RunConfig; a hard-coded value that contradicts the run is refused, as is a scheduler section (the run owns the
schedule). The checks run in two phases:

- `validate(cfg, errors)`, when a run is configured (`load_config` calls it through `RunConfig.validate_files`, so
  `longctx train`, `longctx plan` and launch/slurm.sbatch stop before any process builds anything): every check that
  needs only the config and the JSON, each problem appended to `errors` and reported with the config's own.
- `resolve_deepspeed_config(cfg, world_size)`, at the start of training, before the model is built: the same checks
  with model.dtype resolved on this machine, then the batch arithmetic over the launched ranks, then the final dict
  handed to `deepspeed.initialize` and saved in every checkpoint as ds_config.json.

Precision. bf16 and fp16 runs accumulate gradients in fp32 (`data_types.grad_accum_dtype`, filled when the JSON does
not set it): without it DeepSpeed accumulates the micro-batch gradients in the 16-bit model dtype, which loses the
small contributions of long accumulations. ZeRO-1/2/3 take any model / accumulation dtype pair
(`DeepSpeedEngine._do_optimizer_sanity_check`); without ZeRO (stage 0) DeepSpeed refuses a pair that differs
("unsupported mix"), so there it is neither filled nor allowed. fp16 runs (GPUs without bf16, e.g. V100) get
DeepSpeed's dynamic loss scaling, written out in the fp16 section so that the saved JSON says what ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longctx.errors import UserError

if TYPE_CHECKING:
    from longctx.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO / "ds_configs"

# Sections the filling writes into: each must be a JSON object when present.
OBJECT_SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "data_types")
# The names DeepSpeed's DtypeEnum accepts for grad_accum_dtype, by the dtype they mean.
DTYPE_NAMES = {
    "float32": ("fp32", "float32", "float", "torch.float32"),
    "bfloat16": ("bf16", "bfloat16", "torch.bfloat16"),
    "float16": ("fp16", "float16", "half", "torch.float16"),
}
# DeepSpeed's dynamic loss scaling (its defaults), filled into the fp16 section of fp16 runs.
FP16_LOSS_SCALING = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def locate(name: str | os.PathLike) -> Path:
    """The file deepspeed.config names: as given (relative to the working directory), else, for a relative path
    that is not there, the same path in the longctx checkout, where the shipped ds_configs/ live (so that presets
    work from any directory)."""
    path = Path(name)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        return REPO / path
    return path


def read(name: str | os.PathLike) -> dict[str, Any]:
    """The JSON deepspeed.config names, as a dict; a missing, unreadable or malformed file is a one-line UserError."""
    path = locate(name)
    if not path.is_file():
        raise UserError(f"deepspeed.config={name} does not exist: use ds_configs/stage2.json, stage3.json or your own")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed.config={name} is not valid JSON (line {e.lineno}): fix its syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"deepspeed.config={name} is not a text file: give a DeepSpeed JSON file") from None
    if not isinstance(ds, dict):
        raise UserError(
            f"deepspeed.config={name} holds a JSON {type(ds).__name__}, not an object: write its settings as "
            '{"zero_optimization": {"stage": 3}, ...} (see ds_configs/stage3.json)'
        )
    return ds


def zero_stage(cfg: RunConfig) -> int:
    """The ZeRO stage of cfg's deepspeed.config; an unreadable JSON is the reading's UserError.

    Only training asks (quant picks the container of the packed 4-bit codes by it); export and evaluation do not need
    the stage, and the relative deepspeed.config path may not resolve where they run (the checkpoint keeps the
    resolved JSON as ds_config.json)."""
    return _stage(read(cfg.deepspeed.config))


def _stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ----------------------------------------------------------------------------------------------------------------
# Validation: what the config and the JSON alone decide
# ----------------------------------------------------------------------------------------------------------------


def validate(cfg: RunConfig, errors: list[str]) -> None:
    """Append every problem of cfg's DeepSpeed JSON that the config alone can tell (no world size, no device).

    A model.dtype=auto run's precision depends on the GPU that runs it: those checks wait for
    `resolve_deepspeed_config`, as do the batch values derived from the world size.
    """
    try:
        ds = read(cfg.deepspeed.config)
    except UserError as e:
        errors.append(str(e))
        return
    malformed = _malformed(ds, cfg.deepspeed.config)
    if malformed:  # the other checks would trip over the same sections
        errors.extend(malformed)
        return
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    errors.extend(_rule_problems(cfg, ds, dtype))
    train = cfg.train
    # The JSON values the config fixes by itself: a global batch given explicitly, an accumulation given explicitly
    # (or 1, when neither is given); the rest depends on the number of data-parallel ranks.
    accum = train.gradient_accumulation_steps or (None if train.global_batch_size else 1)
    _fill(ds, _owned(cfg, ds, dtype, train.global_batch_size or None, accum), cfg.deepspeed.config, errors)


def _malformed(ds: dict[str, Any], name: str) -> list[str]:
    """Sections the filling writes into that are not JSON objects, and a ZeRO stage DeepSpeed does not have."""
    problems = []
    for section in OBJECT_SECTIONS:
        if section in ds and not isinstance(ds[section], dict):
            problems.append(
                f'deepspeed.config={name}: "{section}" is {json.dumps(ds[section])}, not a JSON object: '
                f'write it as "{section}": {{...}} (see ds_configs/stage3.json)'
            )
    if isinstance(ds.get("optimizer"), dict) and not isinstance(ds["optimizer"].get("params", {}), dict):
        problems.append(f'deepspeed.config={name}: "optimizer.params" must be a JSON object: write "params": {{...}}')
    stage = ds["zero_optimization"].get("stage", 0) if isinstance(ds.get("zero_optimization"), dict) else 0
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.config={name} has zero_optimization.stage={stage!r}: use 0, 1, 2 or 3")
    return problems


def _rule_problems(cfg: RunConfig, ds: dict[str, Any], dtype: str | None) -> list[str]:
    """What a well-formed JSON may not do in this run (dtype None: model.dtype=auto, not resolved yet)."""
    problems = []
    if "scheduler" in ds:
        problems.append(
            f"deepspeed.config={cfg.deepspeed.config} has a scheduler section, but the run owns the schedule "
            "(train.warmup_steps, train.schedule): remove the scheduler section"
        )
    checkpointing = ds.get("checkpoint") if isinstance(ds.get("checkpoint"), dict) else {}
    if checkpointing.get("load_universal") or checkpointing.get("use_node_local_storage"):
        problems.append(
            f"deepspeed.config={cfg.deepspeed.config} sets checkpoint.load_universal or use_node_local_storage: "
            "longctx resumes only its own checkpoints, read without unpickling code; remove that setting"
        )
    problem = sequence_parallel_problem(ds, cfg.parallel.sequence_parallel_size)
    if problem:
        problems.append(problem)
    return problems + _precision_problems(ds, dtype, cfg.deepspeed.config)


def sequence_parallel_problem(ds: dict[str, Any], sequence_parallel_size: int) -> str | None:
    """ZeRO-3 reduces sequence-parallel gradients right only on its reduce-scatter path (see
    parallel.gradient_sum_factor, whose arithmetic assumes it)."""
    zero = ds.get("zero_optimization", {})
    if sequence_parallel_size > 1 and zero.get("stage", 0) == 3 and not zero.get("reduce_scatter", True):
        return (
            "ZeRO-3 with parallel.sequence_parallel_size > 1 needs zero_optimization.reduce_scatter=true in "
            "deepspeed.config (DeepSpeed's other path scales gradients differently): remove reduce_scatter=false"
        )
    return None


def _precision_problems(ds: dict[str, Any], dtype: str | None, name: str) -> list[str]:
    """A grad_accum_dtype DeepSpeed would refuse: an unknown name, or (without ZeRO) one other than the model's."""
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    if accum is None:
        return []
    accum_dtype = next((dt for dt, names in DTYPE_NAMES.items() if accum in names), None)
    if accum_dtype is None:
        return [f"deepspeed.config={name} has data_types.grad_accum_dtype={accum!r}: use fp32 (or bf16 / fp16)"]
    if dtype is not None and _stage(ds) == 0 and accum_dtype != dtype:
        return [
            f"deepspeed.config={name} accumulates gradients in {accum} (data_types.grad_accum_dtype) for a "
            f"{dtype} model without ZeRO, which DeepSpeed refuses: use ZeRO (zero_optimization.stage 1-3) "
            "or remove grad_accum_dtype"
        ]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Filling: the final JSON of a run on world_size ranks
# ----------------------------------------------------------------------------------------------------------------


def resolve_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The final DeepSpeed config dict of this run on world_size ranks; contradictions are one-line UserErrors."""
    from longctx.model import resolve_dtype

    name = cfg.deepspeed.config
    ds = read(name)
    dtype = str(resolve_dtype(cfg)).removeprefix("torch.")  # this machine's GPU decides model.dtype=auto
    problems = _malformed(ds, name) or _rule_problems(cfg, ds, dtype)
    if problems:
        raise UserError("; ".join(problems))
    global_batch, accum = batch_sizes(cfg, world_size)
    _fill(ds, _owned(cfg, ds, dtype, global_batch, accum), name, problems)
    if problems:
        raise UserError("; ".join(problems))
    if dtype in ("bfloat16", "float16") and _stage(ds) > 0:
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if dtype == "float16":
        for key, value in FP16_LOSS_SCALING.items():
            ds["fp16"].setdefault(key, value)
    sequence_parallel = cfg.parallel.sequence_parallel_size
    if sequence_parallel > 1:
        ds["sequence_parallel_size"] = sequence_parallel  # read by zero.Init when loading under ZeRO-3
    return ds


def batch_sizes(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(global batch, accumulation steps) on world_size ranks; a 0 is derived from the other and the micro batch."""
    train = cfg.train
    sequence_parallel = cfg.parallel.sequence_parallel_size
    if world_size % sequence_parallel:
        raise UserError(
            f"world size {world_size} is not a multiple of parallel.sequence_parallel_size={sequence_parallel}: "
            "launch a multiple of it"
        )
    data_parallel = world_size // sequence_parallel
    micro, accum, global_batch = train.micro_batch_size, train.gradient_accumulation_steps, train.global_batch_size
    if not accum and not global_batch:
        accum = 1
    if not accum:
        if global_batch % (micro * data_parallel):
            raise UserError(
                f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size={micro} × "
                f"{data_parallel} data-parallel ranks: change the global batch or the micro batch"
            )
        accum = global_batch // (micro * data_parallel)
    if not global_batch:
        global_batch = micro * accum * data_parallel
    if global_batch != micro * accum * data_parallel:
        raise UserError(
            f"train.global_batch_size={global_batch} != train.micro_batch_size={micro} × "
            f"train.gradient_accumulation_steps={accum} × {data_parallel} data-parallel ranks: "
            "set train.gradient_accumulation_steps=0 to derive it, or fix one of the three"
        )
    return global_batch, accum


def _owned(
    cfg: RunConfig, ds: dict[str, Any], dtype: str | None, global_batch: int | None, accum: int | None
) -> dict[tuple[str, ...], tuple[Any, str]]:
    """The JSON values the run decides, {key path: (value, the config key that decides it)}; a value None (not
    known yet: the world size or the device decides it) is left out."""
    train = cfg.train
    owned = {
        ("train_batch_size",): (global_batch, "train.global_batch_size"),
        ("train_micro_batch_size_per_gpu",): (train.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps",): (accum, "train.gradient_accumulation_steps"),
        ("gradient_clipping",): (train.grad_clip, "train.grad_clip"),
        ("bf16", "enabled"): (None if dtype is None else dtype == "bfloat16", "model.dtype"),
        ("fp16", "enabled"): (None if dtype is None else dtype == "float16", "model.dtype"),
    }
    if "optimizer" in ds:
        owned |= {
            ("optimizer", "params", "lr"): (train.lr, "train.lr"),
            ("optimizer", "params", "betas"): (list(train.adam_betas), "train.adam_betas"),
            ("optimizer", "params", "weight_decay"): (train.weight_decay, "train.weight_decay"),
        }
    return {keys: (value, owner) for keys, (value, owner) in owned.items() if value is not None}


def _fill(ds: dict[str, Any], owned: dict[tuple[str, ...], tuple[Any, str]], name: str, problems: list[str]) -> None:
    """Write the owned values into ds; a hard-coded value that differs is a problem naming both fixes."""
    for keys, (value, owner) in owned.items():
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            problems.append(
                f"deepspeed.config={name} hard-codes {'.'.join(keys)}={current} but the run has {value} "
                f'(from {owner}): set it to "auto" in the JSON, or change {owner}'
            )
        node[keys[-1]] = value
