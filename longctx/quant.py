"""A 4-bit frozen base (QLoRA, as LongQLoRA trains it): loading through bitsandbytes, ZeRO rules, dequantization.

The base is quantized while transformers loads it (`BitsAndBytesConfig`): every linear layer of the blocks becomes a
bitsandbytes `Linear4bit` holding packed NF4/FP4 codes plus per-block scales, while the embeddings, norms and the
output head stay in the model dtype. LoRA then wraps the 4-bit linears; only LoRA, embeddings and norms train.

Under ZeRO-3 the packed codes are stored by default in a float container of the model dtype
(`bnb_4bit_quant_storage`: the same bytes, reinterpreted), the layout FSDP/ZeRO-3 QLoRA setups use; uint8 was also
seen to partition and train identically on gloo. transformers never loads a quantized model inside
`deepspeed.zero.Init`; the engine partitions the packed weights afterwards. A float container must be the model dtype,
because a bf16/fp16 engine casts every float parameter to that dtype, which would rewrite the packed bytes.

A trained 4-bit run is exported and evaluated through `dequantize_linears`: each 4-bit linear becomes a plain
`nn.Linear` holding exactly the weights the 4-bit layer computed with, so merging LoRA into it gives a plain model
with the training-time function (no second rounding to 4 bits, no bitsandbytes needed to run it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from longctx import ds_config
from longctx.config import RunConfig
from longctx.errors import UserError

# The linear layers of a LLaMA block: LongQLoRA puts LoRA on all of them (the base holds them in 4 bits).
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def storage_dtype(cfg: RunConfig, model_dtype: torch.dtype, stage: int | None) -> torch.dtype:
    """Container dtype of the packed 4-bit codes: quant.storage_dtype, auto = model dtype under ZeRO-3, else uint8."""
    if cfg.quant.storage_dtype != "auto":
        return getattr(torch, cfg.quant.storage_dtype)
    return model_dtype if stage == 3 else torch.uint8


def check_combination(cfg: RunConfig, model_dtype: torch.dtype, stage: int | None) -> None:
    """Refuse a float container other than the model dtype: DeepSpeed's bf16/fp16 engine casts every float parameter
    to the model dtype (engine._cast_module_mixed_precision), which rewrites the packed bytes."""
    storage = storage_dtype(cfg, model_dtype, stage)
    dtype_name = str(model_dtype).removeprefix("torch.")
    if model_dtype in (torch.bfloat16, torch.float16) and storage.is_floating_point and storage != model_dtype:
        raise UserError(
            f"quant.storage_dtype={cfg.quant.storage_dtype} differs from the model dtype {dtype_name}, and DeepSpeed "
            f"casts float parameters to the model dtype, which would corrupt the packed 4-bit weights: "
            f"use quant.storage_dtype=auto (= {dtype_name} under ZeRO-3, uint8 under ZeRO-2)"
        )


def bnb_config(cfg: RunConfig, model_dtype: torch.dtype, stage: int | None):
    """The transformers BitsAndBytesConfig of quant.*; the output head is left unquantized (transformers' default)."""
    try:
        import bitsandbytes  # noqa: F401  (fail here, with the fix, rather than deep inside transformers)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError(
            f"quant.type={cfg.quant.type} needs bitsandbytes, which is not installed: pip install -e '.[qlora]'"
        ) from None
    quant = cfg.quant
    compute = model_dtype if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage_dtype(cfg, model_dtype, stage),
    )


def load_quantized(
    cfg: RunConfig, hf_config, *, dtype: torch.dtype, attn_implementation: str, for_training: bool
) -> nn.Module:
    """The base with its block linears in 4 bits: model.path quantized while loading, or a random init (model.init,
    seeded by train.seed) saved to a temporary directory and loaded from there the same way.

    For training on a GPU each rank loads straight onto its GPU, quantizing tensor by tensor there (host memory never
    holds the 16-bit model; under ZeRO-3 the engine then partitions the 4-bit weights). Otherwise (export, eval) the
    model is quantized on the CPU, where it is dequantized next.
    """
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    # Only training needs the stage (it picks the container of the packed codes, see storage_dtype). Export and eval
    # dequantize at once, to the same weights in any container, and may run where deepspeed.config does not resolve.
    stage = ds_config.zero_stage(cfg) if for_training else None
    check_combination(cfg, dtype, stage)
    quantization_config = bnb_config(cfg, dtype, stage)
    load = dict(
        config=hf_config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if for_training and torch.cuda.is_available():
        load["device_map"] = {"": torch.cuda.current_device()}
    if cfg.model.path:
        from safetensors import SafetensorError

        from longctx.model import unloadable_model

        try:
            return AutoModelForCausalLM.from_pretrained(cfg.model.path, **load)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise unloadable_model(
                cfg.model.path, e, how=" in 4 bits", alternative=", or set quant.type=none"
            ) from None
    torch.manual_seed(cfg.train.seed)  # every rank builds the same random weights
    full = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="longctx-init-") as tmp:
        # Written by hand: save_pretrained writes nothing on ranks other than 0, and every rank loads its own copy.
        full.config.to_json_file(Path(tmp) / "config.json")
        safetensors.torch.save_model(full, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        del full
        return AutoModelForCausalLM.from_pretrained(tmp, **load)


def is_quantized_linear(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a 4-bit linear multiplies with, in its compute dtype: codes × block scales, (out, in)."""
    import bitsandbytes.functional as bnb_functional

    quant_state = linear.weight.quant_state
    # On CPU an inference-mode forward repacks the codes for bitsandbytes' CPU kernel; this reads the training
    # layout, which a freshly loaded model has.
    assert not getattr(quant_state, "packing_format_for_cpu", False), "dequantize before any inference forward"
    return bnb_functional.dequantize_4bit(linear.weight.data, quant_state).to(linear.compute_dtype or torch.float32)


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every 4-bit linear by an `nn.Linear` in `dtype` holding its dequantized weight; drop the model's
    quantization record, so that it saves and loads as a plain transformers model."""
    targets = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent, linear = model.get_submodule(parent_name), model.get_submodule(name)
        plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(dequantized_weight(linear))
            if linear.bias is not None:
                plain.bias.copy_(linear.bias)
        plain.requires_grad_(False)
        setattr(parent, child_name, plain)
    model.hf_quantizer.remove_quantization_config(model)
    return model
