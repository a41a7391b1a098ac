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

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.checkpoint import load_trained_model
from longctx.config import RunConfig
from longctx.errors import UserError

FORMATS = ("merged", "adapter", "both")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEFT_ADAPTER_NAME = "default"

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
    cfg = _load_run_config(ckpt_dir)
    kinds = ["adapter", "merged"] if format == "both" else [format]
    if "adapter" in kinds:
        _check_adapter_possible(cfg)
    tok = resolve_tokenizer(cfg, tokenizer)
    _check_tokenizer(tok, cfg, needed="merged" in kinds)

    _progress(f"loading {ckpt_dir} (consolidating its ZeRO partitions)")
    model, _ = load_trained_model(ckpt_dir, merge_lora=False)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export in a process of the same id
    tmp.mkdir(parents=True)
    try:
        written = {}
        for kind in kinds:
            target = tmp / kind if format == "both" else tmp
            final = out / kind if format == "both" else out
            _progress(f"writing the {kind} model")
            if kind == "adapter":
                _write_adapter(model, cfg, target, DTYPES[dtype], final, tok)
            else:  # merging replaces the LoRA layers in place, so the adapter (if asked) is written first
                model = _write_merged(model, cfg, target, DTYPES[dtype], tok)
            written[kind] = final
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _load_run_config(ckpt_dir: Path) -> RunConfig:
    from longctx.checkpoint import load_run_config
    from longctx.config import ConfigError

    try:
        return load_run_config(ckpt_dir)
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
    from data_prep.tokenizer import load_tokenizer
    from longctx.trainer import model_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    tokenizer = model_tokenizer(cfg)
    if tokenizer is not None:
        return tokenizer
    if cfg.data.train and Path(cfg.data.train).is_dir():
        from longctx.shards import open_shards

        packed_with = open_shards(cfg.data.train).manifest.get("prep_config", {}).get("tokenizer", "")
        if packed_with and Path(packed_with).exists():
            return load_tokenizer(packed_with)
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


def _trained_module_names(model, cfg: RunConfig) -> list[str]:
    """Leaf names (embed_tokens, input_layernorm, norm, ...) of the modules trained in full next to LoRA."""
    from longctx.model import trainable_modules

    base = model.get_base_model()
    wanted = {id(m) for m in trainable_modules(base, cfg.lora.trainable)}
    return sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if id(m) in wanted})


def _write_adapter(model, cfg: RunConfig, out: Path, dtype: torch.dtype, final_dir: Path, tokenizer) -> None:
    """adapter_config.json + adapter_model.safetensors (LoRA and modules_to_save) + the scaled base config.json."""
    from safetensors.torch import save_file

    peft_config = copy.deepcopy(model.peft_config[PEFT_ADAPTER_NAME])
    peft_config.base_model_name_or_path = str(Path(cfg.model.path).resolve())
    peft_config.modules_to_save = _trained_module_names(model, cfg)
    peft_config.inference_mode = True
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "embed_tokens" in peft_config.modules_to_save:
        peft_config.ensure_weight_tying = True  # peft then ties lm_head to the trained embedding copy
    module_prefixes = tuple(
        f"{name}." for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in peft_config.modules_to_save
    )
    tensors = {}
    for name, param in model.state_dict().items():
        if "lora_" in name:  # peft saves LoRA weights without the adapter name: lora_A.default.weight -> lora_A.weight
            key = name.replace(f".{PEFT_ADAPTER_NAME}.", ".")
        elif name.startswith(module_prefixes):  # modules_to_save weights are saved under the module's own name
            key = name
        else:
            continue
        tensors[key] = param.detach().to(dtype).contiguous()
    if tied and peft_config.ensure_weight_tying:  # peft's file carries the tied head too, equal to the embedding
        names = {id(module): name for name, module in model.named_modules()}
        embedding, head = (names[id(m)] for m in (model.get_input_embeddings(), model.get_output_embeddings()))
        tensors[f"{head}.weight"] = tensors[f"{embedding}.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    base_config = _clean_config(model.get_base_model().config, cfg, dtype)
    base_config.save_pretrained(str(out))
    _add_legacy_rope_keys(out / "config.json")
    readme = ADAPTER_README.format(adapter_dir=final_dir, base=peft_config.base_model_name_or_path)
    if cfg.quant.enabled:
        readme += QUANTIZED_BASE_README.format(quant=cfg.quant)
    (out / "README.md").write_text(readme)
    if tokenizer is not None:
        tokenizer.save_hf(out)


def _write_merged(model, cfg: RunConfig, out: Path, dtype: torch.dtype, tokenizer) -> torch.nn.Module:
    """LoRA merged into the base; saved in `dtype` with a clean config and the tokenizer. Returns the merged model."""
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    model.config = _clean_config(model.config, cfg, dtype)
    model = model.to(dtype)
    model.save_pretrained(str(out))
    _add_legacy_rope_keys(out / "config.json")
    tokenizer.save_hf(out)
    return model


def _clean_config(hf_config, cfg: RunConfig, dtype: torch.dtype):
    """A copy of the model's config for inference: no S²-Attn settings, cache on, dtype, context = trained length."""
    from longctx import attention

    config = hf_config.__class__.from_dict(hf_config.to_dict())
    for target in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(target, attention._CONFIG_ATTRIBUTE):
            delattr(target, attention._CONFIG_ATTRIBUTE)
    config.use_cache = True
    config.dtype = dtype
    config.max_position_embeddings = max(config.max_position_embeddings, cfg.train.seq_len)
    return config


def _add_legacy_rope_keys(config_file: Path) -> None:
    """Also write the RoPE scaling as transformers 4.x wrote it (`rope_scaling` with `type`, and `rope_theta`).

    transformers 5 reads `rope_scaling` in preference to `rope_parameters` and takes `rope_theta` from the top
    level, so both spellings must say the same.
    """
    config = json.loads(config_file.read_text())
    rope_parameters = config.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        scaling = {key: value for key, value in rope_parameters.items() if key != "rope_theta"}
        config["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
    if "rope_theta" in rope_parameters:
        config["rope_theta"] = rope_parameters["rope_theta"]
    _write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp dir to out; an existing out (allowed by --overwrite) is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    )
    print(result.summary())
    return 0
