"""Sliding-window perplexity throughput: `longctx.evaluate.perplexity` against the usual full-logits recipe.

The baseline is the Hugging Face perplexity guide's loop (one window per forward, logits for every position, the
already-scored targets masked with -100, loss from `labels=`), run over the same windows with the same stride, so
both score the same tokens with the same contexts and must agree on the perplexity (checked). Ours asks the model
for the scored positions' logits only (`logits_to_keep`) and batches windows. Model: the demo's base architecture
(LLaMA, 4 layers, hidden 256, vocab 8192) with random weights, float32 on CPU (bfloat16 on GPU).

    .venv/bin/python benchmarks/eval_perplexity.py --lengths 256,1024,2048 --tokens 16384

Writes benchmarks/results/eval_perplexity.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.evaluate import perplexity, sliding_windows, write_json

REPO = Path(__file__).resolve().parent.parent


def demo_base_model(device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()


@torch.inference_mode()
def full_logits_perplexity(model, stream: torch.Tensor, context_length: int, stride: int) -> float:
    """The HF guide's recipe over our windows: full logits, earlier-scored targets masked, loss from labels."""
    device = next(model.parameters()).device
    nll_sum, num_scored_total = 0.0, 0
    for start, num_scored in sliding_windows(len(stream), context_length, stride):
        window = stream[start : start + context_length + 1].to(device)
        logits = model(input_ids=window[None, :-1]).logits[0]  # (L, vocab): every position
        targets = window[1:].clone()
        targets[: context_length - num_scored] = -100  # scored by an earlier window
        nll_sum += F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum").item()
        num_scored_total += num_scored
    return math.exp(nll_sum / num_scored_total)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,2048")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out stream length")
    parser.add_argument("--stride-ratio", type=float, default=0.25, help="S = L × this")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--result", default=str(REPO / "benchmarks" / "results" / "eval_perplexity.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = demo_base_model(device)
    stream = torch.randint(0, 8192, (args.tokens,), generator=torch.Generator().manual_seed(0))
    rows = []
    for context_length in [int(v) for v in args.lengths.split(",")]:
        stride = max(1, int(context_length * args.stride_ratio))
        ours, ours_seconds = timed(
            lambda length=context_length, stride=stride: perplexity(
                model, [stream], [length], stride=stride, batch_size=args.batch_size
            )
        )
        baseline, baseline_seconds = timed(
            lambda length=context_length, stride=stride: full_logits_perplexity(model, stream, length, stride)
        )
        ours_ppl = ours[context_length]["perplexity"]
        assert math.isclose(ours_ppl, baseline, rel_tol=1e-3), (ours_ppl, baseline)  # the same tokens and contexts
        row = {
            "context_length": context_length,
            "stride": stride,
            "scored_tokens": ours[context_length]["num_tokens"],
            "ours_seconds": ours_seconds,
            "baseline_seconds": baseline_seconds,
            "ours_tokens_per_second": ours[context_length]["num_tokens"] / ours_seconds,
            "baseline_tokens_per_second": ours[context_length]["num_tokens"] / baseline_seconds,
            "speedup": baseline_seconds / ours_seconds,
            "perplexity": ours_ppl,
        }
        print(json.dumps(row))
        rows.append(row)
    write_json(
        {
            "machine": {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "load_average_at_start": os.getloadavg(),
            },
            "model": "llama 4 layers, hidden 256, vocab 8192, random weights",
            "batch_size": args.batch_size,
            "rows": rows,
        },
        args.result,
    )


if __name__ == "__main__":
    main()
