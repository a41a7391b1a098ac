"""Load exported models with plain transformers / peft only (never longctx) and write their logits on given tokens.

    python tests/dist/export_load_plain.py MERGED_DIR ADAPTER_DIR BASE_DIR OUT_PREFIX TOKEN [TOKEN ...]
    python tests/dist/export_load_plain.py --jobs JOBS.json

Writes OUT_PREFIX.safetensors (logits of: the merged model; the adapter on the base loaded with the adapter's
config.json; the adapter on the base with its own, unscaled config) and OUT_PREFIX.json (what was loaded: RoPE
type and factor the models applied, the tokenizer's ids of a probe text, whether the adapter model's output head
is its input embedding, whether longctx was imported). --jobs: a JSON list of [MERGED_DIR, ADAPTER_DIR, BASE_DIR,
OUT_PREFIX, [TOKEN, ...]], done one after another in this one process (each start of Python + transformers costs
seconds).
"""

from __future__ import annotations

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

TOKENIZER_PROBE = "w5 w7 w90"


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits.float()[0]  # (N, vocab)


def load_and_write(merged_dir: str, adapter_dir: str, base_dir: str, out_prefix: str, tokens: list[int]) -> None:
    input_ids = torch.tensor([tokens])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    scaled_base = AutoModelForCausalLM.from_pretrained(base_dir, config=AutoConfig.from_pretrained(adapter_dir))
    adapter = PeftModel.from_pretrained(scaled_base, adapter_dir)
    unscaled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    save_file(
        {
            "merged": logits(merged, input_ids),
            "adapter": logits(adapter, input_ids),
            "adapter_on_unscaled_base": logits(unscaled, input_ids),
        },
        out_prefix + ".safetensors",
    )
    rotary = merged.model.rotary_emb
    head, embedding = adapter.get_output_embeddings().weight, adapter.get_input_embeddings().weight
    facts = {
        "merged_rope_type": rotary.rope_type,
        "merged_rope_parameters": merged.config.rope_parameters,
        "merged_max_position_embeddings": merged.config.max_position_embeddings,
        "merged_dtype": str(next(merged.parameters()).dtype),
        "tokenizer_ids": AutoTokenizer.from_pretrained(merged_dir)(TOKENIZER_PROBE, add_special_tokens=False)[
            "input_ids"
        ],
        "adapter_head_is_embedding": head.data_ptr() == embedding.data_ptr() or torch.equal(head, embedding),
        "longctx_imported": any(name == "longctx" or name.startswith("longctx.") for name in sys.modules),
    }
    with open(out_prefix + ".json", "w") as f:
        json.dump(facts, f)


def main() -> None:
    if sys.argv[1] == "--jobs":
        with open(sys.argv[2]) as f:
            jobs = json.load(f)
    else:
        merged_dir, adapter_dir, base_dir, out_prefix, *tokens = sys.argv[1:]
        jobs = [[merged_dir, adapter_dir, base_dir, out_prefix, tokens]]
    for merged_dir, adapter_dir, base_dir, out_prefix, tokens in jobs:
        load_and_write(merged_dir, adapter_dir, base_dir, out_prefix, [int(t) for t in tokens])


if __name__ == "__main__":
    main()
