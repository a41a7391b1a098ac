"""`longctx export`: a training checkpoint as models that load with plain transformers / peft (no longctx import).

Two formats, from any checkpoint (ZeRO-2 or ZeRO-3, any number of ranks; consolidated here, no zero_to_fp32 step):

- merged: a standalone Hugging Face model directory: LoRA merged into the base, the trained embedding and norm
  weights included, the tokenizer beside it, and the run's RoPE scaling in config.json (`rope_parameters`, plus the
  older `rope_scaling` / `rope_theta` keys that loaders written for transformers 4.x read), with
  max_position_embeddings the trained length and no trace of S²-Attn (a training-only attention).
- adapter: a PEFT LoRA adapter whose `modules_to_save` carry the trained embedding and norm weights (peft's own
  convention, so `PeftModel.from_pretrained(base, adapter_dir)` restores them), plus `config.json`: the base
  model's config with the run's RoPE scaling, which the base must be loaded with (see `ADAPTER_README`).

`--format both` writes `<out>/merged` and `<out>/adapter`. Everything is written to `<out>.tmp-*` and renamed.

A 4-bit run (quant.type nf4/fp4) is exported from its base dequantized (`longctx.quant.dequantize_linears`): the
merged model holds exactly the weights the 4-bit layers computed with, so it needs no bitsandbytes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.atomic import atomic_dir
from longctx.config import RunConfig
from longctx.errors import UserError
from longctx.merge import TrainedWeights, add_legacy_rope_keys, clean_config, read_checkpoint, write_merged

FORMATS = ("merged", "adapter", "both")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEFT_PREFIX = "base_model.model."  # peft's names of the wrapped model's modules

ADAPTER_README = """\
# LoRA adapter exported by longctx

The base model must be loaded with this run's RoPE scaling, which `config.json` here holds (the base model's config
with `rope_parameters` / `max_position_embeddings` of the extended context). The adapter's `modules_to_save`
carry the trained embedding and norm weights; plain peft restores them.

```python
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained("{adapter_dir}")
base = AutoModelForCausalLM.from_pretrained("{base}", config=config)
model = PeftModel.from_pretrained(base, "{adapter_dir}")  # model.merge_and_unload() gives a plain model
```
"""

QUANTIZED_BASE_README = """
This adapter was trained on the base quantized to 4 bits ({quant.type}, double quantization {quant.double_quant}).
To reproduce the training-time model exactly, load the base the same way, adding to `from_pretrained`:
`quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{quant.type}",
bnb_4bit_use_double_quant={quant.double_quant})`. The merged export needs none of this: it holds the dequantized
4-bit weights with LoRA merged in.
"""


@dataclass
class ExportResult:
    """What `export` wrote: one directory per format, and the facts the summary line reports."""

    checkpoint: Path
    out: Path
    written: dict[str, Path]
    dtype: str
    rope: dict
    max_position_embeddings: int
    tokenizer: str

    def summary(self) -> str:
        parts = [f"{kind} {path} ({_size_mb(path):.2f} MB)" for kind, path in self.written.items()]
        rope = ", ".join(f"{k}={v}" for k, v in self.rope.items() if k != "rope_theta") or "none"
        return (
            f"exported {self.checkpoint}: {'; '.join(parts)} | dtype {self.dtype} | rope scaling {rope} | "
            f"max positions {self.max_position_embeddings} | tokenizer {self.tokenizer or 'none'}"
        )


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "merged",
    dtype: str = "bf16",
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export a checkpoint (a checkpoints/step_N dir, or a run dir: its newest complete checkpoint) to `out`."""
    if format not in FORMATS:
        raise UserError(f"--format {format} is unknown: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is unknown: use one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"export target {out} already exists: pass --overwrite to replace it, or pick another --out")
    ckpt_dir = resolve_checkpoint(checkpoint)
    if out.resolve() in (ckpt_dir.resolve(), *ckpt_dir.resolve().parents):
        raise UserError(f"--out {out} holds the checkpoint being exported: pick another --out")
    cfg = _load_run_config(ckpt_dir, trust_remote_code)
    kinds = ["adapter", "merged"] if format == "both" else [format]
    if "adapter" in kinds:
        _check_adapter_possible(cfg)
    tok = resolve_tokenizer(cfg, tokenizer)
    _check_tokenizer(tok, cfg, needed="merged" in kinds)

    weights = read_checkpoint(ckpt_dir, trust_remote_code=trust_remote_code)
    _progress(f"read the trained weights of {ckpt_dir}")
    written = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for kind in kinds:
            target = tmp / kind if format == "both" else tmp
            final = out / kind if format == "both" else out
            target.mkdir(parents=True, exist_ok=True)
            _progress(f"writing the {kind} model")
            if kind == "adapter":
                _write_adapter(weights, target, DTYPES[dtype], final, tok)
            else:  # streamed from the base tensor by tensor, LoRA merged
                write_merged(weights, target, DTYPES[dtype], tok)
            written[kind] = final
    config = json.loads((written[kinds[-1]] / "config.json").read_text())
    return ExportResult(
        checkpoint=ckpt_dir,
        out=out,
        written=written,
        dtype=dtype,
        rope=config.get("rope_parameters") or {},
        max_position_embeddings=config["max_position_embeddings"],
        tokenizer=str(tok.path) if tok is not None else "",
    )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoints/step_N directory: `path` itself, or the newest complete checkpoint of a run dir."""
    from longctx.checkpoint import COMPLETE_MARKER
    from longctx.evaluate import resolve_model_dir

    if not Path(path).is_dir():
        raise UserError(f"checkpoint {path} is not a directory: give a checkpoints/step_N dir or a training run dir")
    ckpt_dir, is_checkpoint = resolve_model_dir(path)
    if not is_checkpoint:
        raise UserError(
            f"{path} is a Hugging Face model, not a training checkpoint: give a checkpoints/step_N dir or a run dir"
        )
    if not (ckpt_dir / COMPLETE_MARKER).is_file():
        raise UserError(
            f"{ckpt_dir} is an incomplete checkpoint (no {COMPLETE_MARKER} marker, its save was interrupted): "
            "export an earlier checkpoints/step_N, or the run dir (its newest complete checkpoint)"
        )
    return ckpt_dir


def _load_run_config(ckpt_dir: Path, trust_remote_code: bool) -> RunConfig:
    from longctx.checkpoint import load_run_config
    from longctx.config import ConfigError

    try:
        return load_run_config(ckpt_dir, trust_remote_code=trust_remote_code)
    except ConfigError as e:
        raise UserError(
            f"checkpoint {ckpt_dir} has a config.yaml this longctx version cannot read ({e}): "
            "export it with the longctx version that trained it"
        ) from None


def _check_adapter_possible(cfg: RunConfig) -> None:
    if not cfg.lora.enabled:
        raise UserError("this run trained all weights (lora.enabled=false), so it has no adapter: use --format merged")
    if not cfg.model.path:
        raise UserError(
            "this run's base is a random init (model.init), which an adapter cannot name as its base: "
            "use --format merged"
        )


def resolve_tokenizer(cfg: RunConfig, explicit: str | os.PathLike | None):
    """--tokenizer, else the one in model.path, else the one the training shards were packed with; or None."""
    from data_prep.tokenizer import load_tokenizer, model_tokenizer, packed_with

    if explicit:
        return load_tokenizer(explicit)
    tokenizer = model_tokenizer(cfg.model.path)
    if tokenizer is not None:
        return tokenizer
    if cfg.data.train and Path(cfg.data.train).is_dir():
        from longctx.shards import open_shards

        return packed_with(open_shards(cfg.data.train).manifest)
    return None


def _check_tokenizer(tokenizer, cfg: RunConfig, *, needed: bool) -> None:
    from longctx.model import load_hf_config

    if tokenizer is None:
        if needed:
            raise UserError(
                "no tokenizer found for the merged model (none in model.path, none recorded for data.train): "
                "pass the tokenizer the run was trained with as --tokenizer PATH"
            )
        return
    vocab_size = load_hf_config(cfg).vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only {vocab_size}: "
            "pass the tokenizer the run was trained with as --tokenizer"
        )


def _write_adapter(weights: TrainedWeights, out: Path, dtype: torch.dtype, final_dir: Path, tokenizer) -> None:
    """adapter_config.json + adapter_model.safetensors (LoRA and modules_to_save) + the scaled base config.json.

    peft's conventions: LoRA weights are saved without the adapter name (lora_A.default.weight -> lora_A.weight),
    and modules_to_save weights under the module's own name; their leaf names (embed_tokens, input_layernorm, ...)
    go in modules_to_save.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from longctx.merge import save_tokenizer, scaled_config

    cfg, lora = weights.cfg, weights.cfg.lora
    hf_config = scaled_config(cfg)
    modules_to_save = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in weights.replaced})
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(Path(cfg.model.path).resolve()),
        modules_to_save=modules_to_save or None,
        inference_mode=True,
    )
    tensors = {}
    for module, (a, b) in weights.lora.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
    for name, tensor in weights.replaced.items():
        tensors[f"{PEFT_PREFIX}{name}"] = tensor.to(dtype).contiguous()
    embedding, head = _embedding_names(cfg, hf_config)
    if getattr(hf_config, "tie_word_embeddings", False) and f"{embedding}.weight" in weights.replaced:
        peft_config.ensure_weight_tying = True  # peft then ties the head to the trained embedding copy
        tensors[f"{PEFT_PREFIX}{head}.weight"] = tensors[f"{PEFT_PREFIX}{embedding}.weight"].clone()
    peft_config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    clean_config(hf_config, cfg, dtype).save_pretrained(str(out))
    add_legacy_rope_keys(out / "config.json")
    readme = ADAPTER_README.format(adapter_dir=final_dir, base=peft_config.base_model_name_or_path)
    if cfg.quant.enabled:
        readme += QUANTIZED_BASE_README.format(quant=cfg.quant)
    (out / "README.md").write_text(readme)
    save_tokenizer(tokenizer, out, cfg)


def _embedding_names(cfg: RunConfig, hf_config) -> tuple[str, str]:
    """Module names of the input embedding and the output head, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]


def _progress(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run_export(args) -> int:
    """`longctx export`."""
    result = export(
        args.checkpoint,
        args.out,
        format=args.format,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(result.summary())
    return 0
