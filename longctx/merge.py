"""A checkpoint's trained weights put back on its base: streamed into a Hugging Face directory, or built in memory.

A checkpoint holds what training changed (`trained.safetensors`: LoRA adapters, embeddings, norms, or every weight of
a full fine-tune, as fp32 master weights) and records its base (`base.json`). The model it stands for is the base as
training computed with it (loaded in the run's dtype; for a 4-bit run each block linear quantized to 4 bits and back,
exactly as bitsandbytes holds it) with the trained tensors replaced and each LoRA pair merged,
W + (alpha / r) · B A, in fp32.

`write_merged` produces that model tensor by tensor: each base tensor is read from model.path's safetensors,
transformed and appended to the output files, so host memory holds one tensor (plus the trained tensors) at a time,
whatever the size of the model: the end of a 70B run and `longctx export` need no more than a few GB on one rank.
`load_trained_model` builds the same model in memory (for evaluation), in the dtype asked for, without going through
fp32 when that is not the dtype asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx import checkpoint
from longctx.atomic import write_json_atomic
from longctx.config import RunConfig
from longctx.errors import UserError
from longctx.tensor_files import SafetensorsReader, ShardedWriter, TensorSpec

LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"


@dataclass
class TrainedWeights:
    """What a checkpoint changed, keyed by the names of the plain base model."""

    path: Path
    cfg: RunConfig
    dtype: torch.dtype
    """The dtype the run trained in (the base was held in it)."""
    replaced: dict[str, torch.Tensor]
    """Parameters trained in full (embeddings, norms; every weight of a full fine-tune): fp32 master weights."""
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name -> (A (r, in), B (out, r)) in fp32."""
    quantized: set[str]
    """Modules whose weight the run held in 4 bits."""
    quant_blocksize: int = 64

    @property
    def scaling(self) -> float:
        return self.cfg.lora.alpha / self.cfg.lora.r

    def as_trained(self, name: str, base: torch.Tensor, *, held: bool = False) -> torch.Tensor:
        """The tensor `name` of the trained model, from the base's tensor as stored (held=True: as the training model
        held it, i.e. already in the run's dtype and, for a 4-bit linear, dequantized): fp32 where training changed it
        (replaced, or LoRA merged), else as training held it."""
        if name in self.replaced:
            return self.replaced[name]
        module = name.removesuffix(".weight")
        tensor = base
        if not held:
            tensor = tensor.to(self.dtype)
            if name.endswith(".weight") and module in self.quantized:
                tensor = self._as_4bit_computes(tensor)
        if name.endswith(".weight") and module in self.lora:
            a, b = self.lora[module]
            # peft's merge: W + (B @ A) * scaling, added in fp32
            tensor = tensor.float() + (b @ a) * self.scaling
        return tensor

    def check_used_by(self, names: set[str]) -> None:
        """Refuse trained tensors that the base model has no place for, and LoRA targets the checkpoint has no adapter
        for (an edited config.yaml, another base)."""
        problems = sorted(set(self.replaced) - names) + sorted(m for m in self.lora if f"{m}.weight" not in names)
        if self.cfg.lora.enabled:
            targets = set(self.cfg.lora.target_modules)
            modules = {n.removesuffix(".weight") for n in names if n.endswith(".weight")}
            without = sorted(m for m in modules - set(self.lora) if m.rsplit(".", 1)[-1] in targets)
            problems += [f"no adapter for {m}" for m in without]
        if problems:
            raise UserError(
                f"checkpoint {self.path} does not match its own config.yaml or base ({', '.join(problems[:3])}): it "
                "was written by an incompatible longctx version, or its config.yaml or model.path changed; use the "
                "original ones"
            )

    def _as_4bit_computes(self, weight: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        quant = self.cfg.quant
        codes, state = bnb_functional.quantize_4bit(
            weight.contiguous(),
            blocksize=self.quant_blocksize,
            compress_statistics=quant.double_quant,
            quant_type=quant.type,
        )
        compute = self.dtype if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
        return bnb_functional.dequantize_4bit(codes, state).to(compute)


def read_checkpoint(ckpt_dir: str | os.PathLike, *, trust_remote_code: bool = False) -> TrainedWeights:
    """The trained weights of a complete checkpoint, checked against the base that model.path holds now.

    trust_remote_code comes from the caller (the command line or the running run's config), never from the
    checkpoint's config.yaml."""
    path = Path(ckpt_dir)
    if not (path / checkpoint.COMPLETE_MARKER).is_file():
        raise UserError(
            f"{path} is not a complete checkpoint (no {checkpoint.COMPLETE_MARKER} marker): pick a checkpoints/step_N"
        )
    cfg = checkpoint.load_run_config(path, trust_remote_code=trust_remote_code)
    checkpoint.check_base(path, cfg)
    record = checkpoint.read_base_record(path) or {}
    replaced, lora_a, lora_b = {}, {}, {}
    for name, tensor in checkpoint.load_trained(path).items():
        if name.endswith(LORA_A):
            lora_a[checkpoint.base_name(name.removesuffix(LORA_A))] = tensor
        elif name.endswith(LORA_B):
            lora_b[checkpoint.base_name(name.removesuffix(LORA_B))] = tensor
        else:
            replaced[checkpoint.base_name(name)] = tensor
    if lora_a.keys() != lora_b.keys():
        raise UserError(f"checkpoint {path} has LoRA A and B matrices that do not pair up: it is damaged")
    lora = {module: (lora_a[module], lora_b[module]) for module in lora_a}
    _check_lora_matches_config(path, cfg, lora)
    return TrainedWeights(
        path=path,
        cfg=cfg,
        dtype=training_dtype(path),
        replaced=replaced,
        lora=lora,
        quantized=set(record.get("quantized_linears", [])),
        quant_blocksize=record.get("quant_blocksize", 64),
    )


def _check_lora_matches_config(path: Path, cfg: RunConfig, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The adapters must be those config.yaml describes: the scaling alpha / r and the targets come from it."""
    targets = set(cfg.lora.target_modules) if cfg.lora.enabled else set()
    problems = sorted({module.rsplit(".", 1)[-1] for module in lora} - targets)
    problems = [f"LoRA on {leaf} not in lora.target_modules" for leaf in problems]
    ranks = sorted({a.shape[0] for a, _ in lora.values()} - {cfg.lora.r})
    problems += [f"LoRA rank {rank} where lora.r={cfg.lora.r}" for rank in ranks]
    if problems:
        raise UserError(
            f"checkpoint {path} does not match its own config.yaml ({'; '.join(problems[:3])}): it was written by an "
            "incompatible longctx version or its config.yaml was edited; use the longctx version and config that "
            "trained it"
        )


def training_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the run trained in (model.dtype=auto resolves per machine, so read the saved DeepSpeed JSON)."""
    ds_config = json.loads((Path(ckpt_dir) / "ds_config.json").read_text())
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds_config.get(key, {}).get("enabled") is True:
            return dtype
    return torch.float32


def scaled_config(cfg: RunConfig):
    """The base's Hugging Face config with the run's RoPE scaling."""
    from longctx.model import apply_rope_scaling, load_hf_config

    hf_config = load_hf_config(cfg)
    apply_rope_scaling(hf_config, cfg)
    return hf_config


def base_tensor_specs(cfg: RunConfig, hf_config) -> list[TensorSpec]:
    """Name, shape and dtype of every tensor a plain model of this config saves, from a model built on the meta
    device (no memory); tied weights appear once, under the input embedding's name."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    specs = [TensorSpec(name, tuple(p.shape), p.dtype) for name, p in model.named_parameters()]
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                full = f"{module_name}.{buffer_name}" if module_name else buffer_name
                specs.append(TensorSpec(full, tuple(buffer.shape), buffer.dtype))
    return specs


def base_tensors(cfg: RunConfig, dtype: torch.dtype) -> tuple[callable, str]:
    """(read(name) -> tensor, description) of the base's tensors as stored.

    model.path with safetensors: each tensor read from disk when asked for. Otherwise (model.init, a random init that
    is small by nature; or a model.path with only .bin files) the plain base is built in memory in `dtype`.
    """
    if cfg.model.path:
        reader = SafetensorsReader.of_directory(cfg.model.path)
        if reader is not None:
            return _reader_lookup(reader, cfg.model.path), f"streamed from {cfg.model.path}"
    from longctx.model import build_model

    plain = dataclasses.replace(
        cfg,
        quant=dataclasses.replace(cfg.quant, type="none"),
        model=dataclasses.replace(cfg.model, dtype=str(dtype).removeprefix("torch.")),
    )
    state = build_model(plain, for_training=False).state_dict()
    return state.__getitem__, "built in memory"


def _reader_lookup(reader: SafetensorsReader, path: str):
    def read(name: str) -> torch.Tensor:
        if name not in reader:
            raise UserError(
                f"model.path={path} has no tensor {name}, which its config.json's architecture needs: "
                "give a complete Hugging Face model directory"
            )
        return reader.read(name)

    return read


def merged_tensors(weights: TrainedWeights, specs: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor in its spec's dtype) of every tensor of the trained model, one at a time, in the specs' order.
    Base tensors are read only where training did not replace them."""
    weights.check_used_by({spec.name for spec in specs})
    read, _ = base_tensors(weights.cfg, weights.dtype)
    for spec in specs:
        name = spec.name
        tensor = weights.replaced[name] if name in weights.replaced else weights.as_trained(name, read(name))
        yield name, tensor.to(spec.dtype)


def write_merged(
    weights: TrainedWeights, directory: Path, dtype: torch.dtype, tokenizer=None, *, max_shard_bytes: int = 0
) -> None:
    """Write the trained model (LoRA merged, RoPE scaling in config.json) as a Hugging Face model into `directory`
    (which exists), streaming: one tensor in memory at a time."""
    hf_config = scaled_config(weights.cfg)
    specs = [
        dataclasses.replace(spec, dtype=dtype if spec.dtype.is_floating_point else spec.dtype)
        for spec in base_tensor_specs(weights.cfg, hf_config)
    ]
    with ShardedWriter(directory, specs, prefix="model", max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in merged_tensors(weights, specs):
            writer.write(name, tensor)
    clean_config(hf_config, weights.cfg, dtype).save_pretrained(str(directory))
    add_legacy_rope_keys(directory / "config.json")
    _write_generation_config(weights.cfg, hf_config, directory)
    save_tokenizer(tokenizer, directory, weights.cfg)


def save_tokenizer(tokenizer, directory: Path, cfg: RunConfig) -> None:
    """The tokenizer beside a written model, with the chat template the run was trained on when the tokenizer's
    files do not carry it (SFT shards rendered with a built-in or a .jinja template)."""
    if tokenizer is None:
        return
    tokenizer.save_hf(directory)
    from data_prep.chat_templates import trained_template, write_chat_template

    template = trained_template(cfg.data.train) if cfg.data.train else None
    if template is not None:
        write_chat_template(directory, template)


def write_final_model(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None, *, trust_remote_code: bool = False
) -> Path:
    """The end of a run: a checkpoint's trained model in the run's dtype as a HF directory, written atomically."""
    from longctx.atomic import atomic_dir

    weights = read_checkpoint(ckpt_dir, trust_remote_code=trust_remote_code)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_merged(weights, tmp, weights.dtype, tokenizer)
    return Path(out_dir)


def load_trained_model(
    ckpt_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, RunConfig]:
    """The trained model of a checkpoint in memory: dense attention, eval mode, parameters in `dtype` on `device`.

    The base is built in the run's dtype (as training held it) and each parameter is then set to its trained value
    and cast to `dtype` one at a time; buffers (RoPE's inv_freq) keep their fp32.
    """
    from longctx.model import EVAL_ATTENTION, build_model

    weights = read_checkpoint(ckpt_dir)
    cfg = weights.cfg
    dense = dataclasses.replace(
        cfg,
        attention=dataclasses.replace(cfg.attention, implementation=EVAL_ATTENTION),
        model=dataclasses.replace(
            cfg.model, activation_checkpointing=False, dtype=str(weights.dtype).removeprefix("torch.")
        ),
    )
    # As training held it: in the run's dtype; a 4-bit run's linears dequantized into plain ones (held=True below).
    model = build_model(dense, for_training=False)
    parameters = dict(model.named_parameters())
    weights.check_used_by(set(parameters))
    with torch.no_grad():
        for name, param in parameters.items():
            param.data = weights.as_trained(name, param.data, held=True).to(dtype)
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------------------------
# The config and side files of an inference model
# ----------------------------------------------------------------------------------------------------------------


def clean_config(hf_config, cfg: RunConfig, dtype: torch.dtype):
    """A copy of the model's config for inference: no S²-Attn settings, cache on, dtype, context = trained length."""
    from longctx import attention

    config = hf_config.__class__.from_dict(hf_config.to_dict())
    for target in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(target, attention._CONFIG_ATTRIBUTE):
            delattr(target, attention._CONFIG_ATTRIBUTE)
    config.use_cache = True
    config.dtype = dtype
    # Only where the frequencies do not read it: dynamic NTK computes from max_position_embeddings, and several
    # transformers 4.x releases take YaRN's factor as max_position_embeddings / original_max_position_embeddings, so
    # for those the value the run trained with is part of the model (train.seq_len unless rope.factor was overridden).
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type in ("default", "linear", "llama3"):
        config.max_position_embeddings = max(config.max_position_embeddings, cfg.train.seq_len)
    return config


def add_legacy_rope_keys(config_file: Path) -> None:
    """Also write the RoPE scaling as transformers 4.x wrote it (`rope_scaling` with `type`, and `rope_theta`).

    transformers 5 reads `rope_scaling` in preference to `rope_parameters` and takes `rope_theta` from the top
    level, so both spellings must say the same: `rope_scaling` is `rope_parameters` without rope_theta, for every
    rope_type (llama3's band factors, YaRN's original_max_position_embeddings and attention settings included). A
    legacy `type` inside `rope_parameters` (from a base whose config.json spelled rope_scaling the 4.x way, which
    transformers 5 keeps) is dropped there, so that `rope_type` alone names the type.
    """
    config = json.loads(config_file.read_text())
    rope_parameters = {key: value for key, value in (config.get("rope_parameters") or {}).items() if key != "type"}
    if rope_parameters:
        config["rope_parameters"] = rope_parameters
    if rope_parameters.get("rope_type", "default") != "default":
        scaling = {key: value for key, value in rope_parameters.items() if key != "rope_theta"}
        config["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
    if "rope_theta" in rope_parameters:
        config["rope_theta"] = rope_parameters["rope_theta"]
    write_json_atomic(config_file, config, indent=2)


def _write_generation_config(cfg: RunConfig, hf_config, directory: Path) -> None:
    """The base's generation_config.json when it has one, else the one transformers derives from the config."""
    from transformers import GenerationConfig

    source = Path(cfg.model.path) / "generation_config.json" if cfg.model.path else None
    if source is not None and source.is_file():
        shutil.copyfile(source, directory / "generation_config.json")
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(directory))
