"""Build the model a run trains: base weights, RoPE scaling, attention choice, and what is trainable.

The base comes from a local Hugging Face directory (`model.path`) or from a config with random weights
(`model.init`, seeded by train.seed). Position interpolation is written into `config.rope_parameters` (the
transformers-5 field; rope_theta is kept). Training attention is selected through transformers' own
`attn_implementation` hook; S²-Attn is registered by `longctx.attention`. LoRA comes from peft; embeddings and
norms are made trainable in place (as LongLoRA does), so their parameter names stay those of the base model.

Precision, one rule for every ZeRO stage: every trainable parameter (LoRA, embeddings, norms, or all weights) is held
in the run's dtype, the dtype of the base. ZeRO flattens the trainable parameters of a group into one buffer, which
takes one dtype (peft's default of fp32 adapters on a bf16 base is what made ZeRO-3 fail at start-up). Precision is
kept where it matters by DeepSpeed: the optimizer holds fp32 master weights and accumulates gradients in fp32
(`data_types.grad_accum_dtype`, see longctx.ds_config); the bf16 weights are their rounded copies.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from longctx.config import ConfigError, RunConfig
from longctx.errors import UserError

# Dense attention used for evaluation and whenever a model is loaded for inference.
EVAL_ATTENTION = "sdpa"


def resolve_dtype(cfg: RunConfig) -> torch.dtype:
    """model.dtype on this machine. auto: bfloat16 on a CUDA GPU with bf16 arithmetic (compute capability 8.0+,
    or ROCm), float16 on one without (V100, T4; DeepSpeed's fp16 with dynamic loss scaling, see longctx.ds_config),
    float32 on CPU. An explicit bfloat16 on a GPU without it is refused here, before the model loads."""
    if not torch.cuda.is_available():
        return torch.float32 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    # Without including_emulation=False, torch reports bf16 on a V100 too: it emulates it there, many times slower.
    has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if has_bf16 else torch.float16
    if cfg.model.dtype == "bfloat16" and not has_bf16:
        raise UserError(
            f"model.dtype=bfloat16 but this GPU ({torch.cuda.get_device_name()}) has no bfloat16 arithmetic: "
            "set model.dtype=float16 (fp16 with loss scaling) or model.dtype=auto"
        )
    return getattr(torch, cfg.model.dtype)


def load_hf_config(cfg: RunConfig):
    """The base model's Hugging Face config, before any scaling: from model.path or model.init."""
    from transformers import AutoConfig

    if not cfg.model.init:
        return AutoConfig.from_pretrained(
            _checked_model_dir(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code
        )
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    init = dict(cfg.model.init)
    model_type = init.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.5)
        raise UserError(
            f"model.init.model_type={model_type} is not a transformers model type"
            + (f" (closest: {', '.join(close)})" if close else "")
            + ": use e.g. llama, mistral or qwen2"
        )
    try:
        return AutoConfig.for_model(model_type, **init)
    except (ValueError, TypeError) as e:
        said = str(e).splitlines()[0][:150]
        raise UserError(f"model.init is not a valid {model_type} config ({said}): fix the model.init fields") from None


# The files of a Hub model that longctx reads: weights, configs, tokenizer and chat template (no .bin/.gguf/onnx/...).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(cfg: RunConfig) -> RunConfig:
    """cfg with model.path a local directory: a Hub id (`org/name`, when no such local directory exists) becomes its
    snapshot in the Hugging Face cache, downloaded when online; with HF_HUB_OFFLINE=1 only the cache is read.

    Called once where a run starts (the trainer, plan), so the saved config names the directory that was used.
    """
    path = cfg.model.path
    if not path or Path(path).is_dir() or not _HUB_ID.fullmatch(path):
        return cfg
    import dataclasses

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(path, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError:
        raise UserError(
            f"model.path={path} is neither a local directory nor in the Hugging Face cache, and the Hub cannot be "
            "reached (HF_HUB_OFFLINE or no network): download it first (huggingface-cli download "
            f"{path}) or point model.path at a model directory"
        ) from None
    except (RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.path={path} is neither a local directory nor a model on the Hugging Face Hub ({first}): check "
            "the name (and HF_TOKEN for a gated model), or point model.path at a model directory"
        ) from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=local))


def _checked_model_dir(path: str) -> Path:
    model_dir = Path(path)
    is_gguf = model_dir.suffix == ".gguf" or (model_dir.is_dir() and any(model_dir.glob("*.gguf")))
    if is_gguf and not (model_dir / "config.json").is_file():
        raise UserError(
            f"model.path={path} is a GGUF file, which longctx does not train: convert it to a Hugging Face directory "
            "first (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) and save_pretrained, as "
            "tools/real_model.py does) and point model.path at that"
        )
    if not model_dir.is_dir():
        raise UserError(
            f"model.path={path} is not a directory: give a local Hugging Face model directory (or a Hub id, org/name)"
        )
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"model.path={path} has no config.json: point it at a Hugging Face model directory")
    try:
        json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"model.path={path}: config.json is corrupt ({e}): re-download or re-export the model"
        ) from None
    return model_dir


# How a run's rope.type extends a model, by the model's own rope_type. Every result is one rope_type that plain
# transformers computes from the exported config.json, so the exported model is the model that was trained:
# - an unscaled model takes linear, dynamic or yarn, written over its rope_theta. So does a dynamic NTK model: dynamic
#   NTK leaves RoPE as it is up to max_position_embeddings, its trained context, so on every length up to the new one
#   it is the unscaled model (its NTK extrapolation beyond its context is what the new scaling takes over);
# - a linear model takes linear with the factors multiplied: interpolation on top of interpolation divides every
#   frequency by both, exactly;
# - a llama3 or yarn model takes its own type with its factor multiplied and the rest kept: that scheme at the longer
#   context. Nothing else is exact: both leave their highest frequencies unscaled at any factor, so position
#   interpolation on top (which divides those too) or another scheme has no form in one rope_type, and is refused.
ROPE_EXTENSIONS = {
    "default": ("linear", "dynamic", "yarn"),
    "dynamic": ("linear", "dynamic", "yarn"),
    "linear": ("linear",),
    "llama3": ("llama3",),
    "yarn": ("yarn",),
}
# What an unscaled (or dynamic) model's rope_parameters keep when a new scaling is written over them.
_UNSCALED_KEYS = ("rope_theta", "partial_rotary_factor")


@dataclass
class RopeScaling:
    """What a run does to the model's RoPE: the result of `resolve_rope`."""

    base_type: str
    """The model's own rope_type ("default": no scaling)."""
    original_context: int
    """The context the extension starts from: rope.original_context, or the model's trained context."""
    factor: float
    """The extension: rope.factor, or train.seq_len / original_context."""
    rope_parameters: dict | None
    """The extended model's rope_parameters; None where the run leaves the model's RoPE as it is."""
    max_position_embeddings: int
    """original_context x factor: the extended context (the model's own where nothing changes)."""
    problems: list[str]
    """Contradictions between the run and the model, each naming its fix; apply_rope_scaling refuses any."""


def trained_context(hf_config) -> tuple[int, str]:
    """(the context the model was trained to, where that number comes from in its config).

    max_position_embeddings, unless the model's llama3 / yarn scaling reaches further (original_max_position_embeddings
    x factor): Qwen2.5 with YaRN keeps max_position_embeddings=32768 and reaches 4 x 32768. Llama-3.1 (llama3 factor 8
    over 8192, max_position_embeddings 131072) is trained to 131072.
    """
    params = hf_config.rope_parameters or {}
    positions = hf_config.max_position_embeddings
    original, factor = params.get("original_max_position_embeddings"), params.get("factor")
    if _rope_type(params) in ("llama3", "yarn") and original and factor and original * factor > positions:
        return int(round(original * factor)), f"rope_parameters: original_max_position_embeddings {original} x {factor}"
    return positions, "max_position_embeddings"


def resolve_rope(cfg: RunConfig, hf_config) -> RopeScaling:
    """The run's RoPE settings against the model's config (before any scaling): what apply_rope_scaling writes, or
    the problems that stop it. Needs no weights, so `longctx plan` and the launcher can check a run up front."""
    rope, seq_len = cfg.rope, cfg.train.seq_len
    base = dict(hf_config.rope_parameters or {"rope_theta": getattr(hf_config, "rope_theta", 10000.0)})
    base_type = _rope_type(base)
    trained, source = trained_context(hf_config)
    original = rope.original_context or trained
    factor = rope.factor or seq_len / original
    scaling = RopeScaling(base_type, original, factor, None, hf_config.max_position_embeddings, [])
    if rope.type == "none":
        return scaling
    model = f"model.path={cfg.model.path}" if cfg.model.path else "model.init"
    if not rope.override_model:
        scaling.problems += _contradictions(cfg, model, trained, source)
    if factor <= 1.0:  # the model's context already covers train.seq_len: nothing to extend
        return scaling
    if base_type not in ROPE_EXTENSIONS:
        scaling.problems.append(
            f"{model} has RoPE scaling rope_type={base_type}, which longctx cannot extend (it extends unscaled, "
            "linear, dynamic, yarn and llama3 models): set rope.type=none to train with the model's own RoPE"
        )
    elif rope.type not in ROPE_EXTENSIONS[base_type]:
        scaling.problems.append(_inexact_composition(rope.type, base_type, base, factor, model))
    else:
        scaling.rope_parameters = _extended_rope_parameters(rope.type, base_type, base, original, factor)
        scaling.max_position_embeddings = int(round(original * factor))
    return scaling


def check_rope(cfg: RunConfig, hf_config) -> list[str]:
    """The problems with the run's RoPE settings for this model (empty: apply_rope_scaling will apply them)."""
    return resolve_rope(cfg, hf_config).problems


def apply_rope_scaling(hf_config, cfg: RunConfig) -> None:
    """Write the run's RoPE scaling (see resolve_rope) into hf_config: rope_parameters, max_position_embeddings."""
    scaling = resolve_rope(cfg, hf_config)
    if scaling.problems:
        raise ConfigError("; ".join(scaling.problems))
    if scaling.rope_parameters is not None:
        hf_config.rope_parameters = scaling.rope_parameters
        hf_config.max_position_embeddings = scaling.max_position_embeddings


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _contradictions(cfg: RunConfig, model: str, trained: int, source: str) -> list[str]:
    """A preset's rope.original_context / rope.factor that disagree with the model (LLaMA-2's 4096 on an 8192 model
    would interpolate twice as far as the run needs)."""
    rope, seq_len, problems = cfg.rope, cfg.train.seq_len, []
    if rope.original_context and rope.original_context != trained:
        problems.append(
            f"rope.original_context={rope.original_context} but {model} was trained to {trained} tokens ({source}): "
            "remove rope.original_context from the preset/overrides (it defaults to the model's), or set "
            "rope.override_model=true if the model's config.json is wrong"
        )
    original = rope.original_context or trained
    if rope.factor and not math.isclose(rope.factor, seq_len / original):
        problems.append(
            f"rope.factor={rope.factor:g} but train.seq_len={seq_len} / the original context {original} = "
            f"{seq_len / original:g}: remove rope.factor from the preset/overrides (it follows train.seq_len), or set "
            "rope.override_model=true to use it anyway"
        )
    return problems


def _extended_rope_parameters(kind: str, base_type: str, base: dict, original: int, factor: float) -> dict:
    """The rope_parameters of `kind` extending a `base_type` model by `factor` (a pair of ROPE_EXTENSIONS)."""
    if base_type in ("default", "dynamic"):
        params = {key: value for key, value in base.items() if key in _UNSCALED_KEYS}
        params.update(rope_type=kind, factor=float(factor))
        if kind == "yarn":  # YaRN places its frequency ramp by the context it extends from
            params["original_max_position_embeddings"] = original
        return params
    # The model's own scheme (legacy "type" dropped: rope_type is the one spelling transformers 5 writes).
    params = {key: value for key, value in base.items() if key != "type"}
    params["factor"] = float(base["factor"] * factor)
    return params


def _inexact_composition(kind: str, base_type: str, base: dict, factor: float, model: str) -> str:
    alternatives = " or ".join(f"rope.type={t}" for t in ROPE_EXTENSIONS[base_type])
    if base_type in ("default", "dynamic"):  # kind is llama3
        return (
            f"rope.type={kind} extends a model that already has llama3 scaling, and {model} has none: set "
            f"{alternatives}"
        )
    why = {
        "linear": "its frequencies are all divided by its factor, which only linear interpolation continues exactly",
        "llama3": "llama3 keeps the highest frequencies unscaled at any factor, so no other scaling composes with it",
        "yarn": "YaRN keeps the highest frequencies unscaled at any factor, so no other scaling composes with it",
    }[base_type]
    return (
        f"rope.type={kind} cannot be composed with the {base_type} RoPE scaling of {model} in one rope_type ({why}): "
        f"set {alternatives} (its factor {base['factor']:g} x {factor:g} = {base['factor'] * factor:g}, the rest of "
        "its rope_parameters kept), or rope.type=none to train with its RoPE as it is"
    )


def _training_attention(cfg: RunConfig, hf_config) -> str:
    """Register S²-Attn when asked and return the attn_implementation name for training."""
    implementation = cfg.attention.implementation
    if implementation == "flash":
        return "flash_attention_2"
    if implementation != "s2attn":
        return implementation
    from longctx import attention  # its group size is checked with the config (RunConfig.validate)

    attention.register(name="s2attn")
    return "s2attn"


def unloadable_model(path: str, error: Exception, *, how: str = "", alternative: str = "") -> UserError:
    """The one-line error for a model directory that transformers could not load (`how`: e.g. " in 4 bits")."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"model.path={path} could not be loaded{how} ({first_line}): check that the directory holds a complete "
        f"Hugging Face model (config.json + weights){alternative}"
    )


def build_model(cfg: RunConfig, *, for_training: bool = True) -> nn.Module:
    """The model of a run: base weights + RoPE scaling + attention; for training also LoRA and trainable parts.

    for_training=False gives the plain scaled base (dense attention, nothing trainable) on which a checkpoint's
    weights are loaded, see `longctx.merge.load_trained_model`; with quant.type set, its 4-bit linears
    dequantized into plain ones.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    hf_config = load_hf_config(cfg)
    apply_rope_scaling(hf_config, cfg)
    hf_config.use_cache = False
    attn_implementation = _training_attention(cfg, hf_config) if for_training else EVAL_ATTENTION
    dtype = resolve_dtype(cfg)
    if cfg.quant.enabled:  # the block linears in 4 bits (QLoRA), see longctx.quant
        from longctx import quant

        model = quant.load_quantized(
            cfg, hf_config, dtype=dtype, attn_implementation=attn_implementation, for_training=for_training
        )
        if not for_training:  # the base as the 4-bit run computes with it, in plain linears
            model = quant.dequantize_linears(model, dtype)
    elif cfg.model.init:
        torch.manual_seed(cfg.train.seed)  # every rank builds the same random weights
        model = AutoModelForCausalLM.from_config(
            hf_config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.model.path,
                config=hf_config,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise unloadable_model(cfg.model.path, e) from None
    if cfg.attention.implementation == "s2attn" and for_training:
        from longctx import attention

        attention.configure(
            model,
            group_size=cfg.group_size,
            backend=cfg.attention.backend,
            sink_tokens=cfg.attention.sink_tokens,
            dense_heads=cfg.attention.dense_heads,
        )
    if not for_training:
        model.requires_grad_(False)
        return model.eval()
    if cfg.memory.tiled_mlp:  # parameter names stay those of the plain model (see longctx.tiling.TiledMLP)
        from longctx.tiling import apply_tiled_mlp

        apply_tiled_mlp(model, cfg.memory.tiled_mlp_shards)
    if cfg.model.activation_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
        checkpointing = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if not cfg.lora.enabled:
        model.requires_grad_(True)
    else:
        model = add_lora(model, cfg)
    hold_trainable_in(model, dtype)
    return model.train()


def add_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap in peft LoRA on lora.target_modules, then make lora.trainable parts (embed, norm, lm_head) trainable."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # No fp32 adapters on a bf16 base: the trainable parameters share the run's dtype (see the module doc).
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise UserError(
            f"lora.target_modules={lora.target_modules} do not fit this model ({e}): fix the names"
        ) from None
    for module in trainable_modules(model, lora.trainable):
        module.requires_grad_(True)
    return peft_model


def hold_trainable_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every trainable floating-point parameter to `dtype` (the module doc's precision rule).

    Parameters already partitioned by ZeRO-3's zero.Init (`ds_id`) were created in the run's dtype and are skipped;
    frozen parameters (a 4-bit base's packed codes among them) are left as they are.
    """
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)


def trainable_modules(model: nn.Module, parts: list[str]) -> list[nn.Module]:
    """The modules trained in full next to LoRA: input embeddings, every norm layer, the output head."""
    modules: list[nn.Module] = []
    if "embed" in parts:
        modules.append(model.get_input_embeddings())
    if "norm" in parts:
        modules += [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    if "lm_head" in parts and model.get_output_embeddings() is not None:
        modules.append(model.get_output_embeddings())
    return modules


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Under ZeRO-3 use `ds_numel`, the full size of a partitioned tensor."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)  # packed 4-bit codes: count the weights they stand for
        n = quant_state.shape.numel() if quant_state is not None else getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
