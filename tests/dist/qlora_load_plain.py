"""Load an exported model with plain transformers only (never longctx) and write its logits on given tokens.

    python tests/dist/qlora_load_plain.py MODEL_DIR OUT_PREFIX TOKEN [TOKEN ...]

Writes OUT_PREFIX.safetensors ({"logits": (N, vocab)}) and OUT_PREFIX.json (modules imported: longctx, bitsandbytes;
the linear layer class of the first block; whether the model considers itself quantized).
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, out_prefix, *tokens = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[int(t) for t in tokens]])).logits.float()[0]
    save_file({"logits": logits.contiguous()}, out_prefix + ".safetensors")
    facts = {
        "longctx_imported": any(name == "longctx" or name.startswith("longctx.") for name in sys.modules),
        "bitsandbytes_imported": "bitsandbytes" in sys.modules,
        "q_proj_class": type(model.model.layers[0].self_attn.q_proj).__name__,
        "is_quantized": bool(getattr(model, "is_quantized", False)),
    }
    with open(out_prefix + ".json", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()
