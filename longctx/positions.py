"""Loss by position in the context window (`longctx eval positions`), and short-context retention (`longctx eval
retention`): the two measurements that say where a context extension gains and what it costs.

Per-position loss: non-overlapping windows of L + 1 held-out tokens; with dense attention, prediction t of a window
reads its tokens 0..t and is scored against token t + 1. Its NLL is averaged over the windows, then over buckets of
positions (16 equal ranges of 0..L-1 by default). A model that uses its whole context keeps the loss falling (or flat)
to the last bucket; one that does not reach that far rises where its reach ends.

Retention: perplexity at the base model's context on held-out data of one or more domains (windows of that length,
every token scored once), for every model, with the change from a baseline model: an extension that costs
short-context quality shows it here, beside the long-context figures.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from longctx.errors import UserError
from longctx.evaluate import (
    LOSS_SLICE_TOKENS,
    _all_reduce_sum,
    _rank_and_world,
    check_context_reach,
    eval_model_config,
    init_distributed_from_env,
    load_heldout_stream,
    parse_named_dirs,
    perplexity,
)
from longctx.placement import check_device_map, load_for_eval

# ----------------------------------------------------------------------------------------------------------------
# Per-position loss
# ----------------------------------------------------------------------------------------------------------------


def bucket_bounds(length: int, num_buckets: int) -> list[tuple[int, int]]:
    """num_buckets ranges [start, end) of prediction positions 0..length-1, as equal as whole numbers allow."""
    edges = [round(i * length / num_buckets) for i in range(num_buckets + 1)]
    return list(zip(edges[:-1], edges[1:]))


@torch.inference_mode()
def position_nll(model, stream: torch.Tensor, length: int, *, batch_size: int = 1, progress: bool = False):
    """(sum of NLL per prediction position (length,), number of windows) over the non-overlapping windows of
    length + 1 tokens of `stream`; ranks share the windows and the sums are all-reduced."""
    from tqdm.auto import tqdm

    rank, world_size = _rank_and_world()
    device = next(model.parameters()).device
    starts = list(range(0, len(stream) - length, length))[rank::world_size]
    sums = torch.zeros(length, dtype=torch.float64, device=device)
    for first in tqdm(range(0, len(starts), batch_size), desc=f"positions L={length}", disable=not progress or rank):
        batch = starts[first : first + batch_size]
        tokens = torch.stack([stream[s : s + length + 1] for s in batch]).to(device)  # (B, L + 1)
        logits = model(input_ids=tokens[:, :-1]).logits  # (B, L, vocab), on the last device of a split model
        tokens = tokens.to(logits.device)
        for i in range(0, length, LOSS_SLICE_TOKENS):  # float32 a slice at a time (see evaluate._score_windows)
            chunk = logits[:, i : i + LOSS_SLICE_TOKENS].float().transpose(1, 2)
            nll = F.cross_entropy(chunk, tokens[:, i + 1 : i + 1 + LOSS_SLICE_TOKENS], reduction="none")
            sums[i : i + LOSS_SLICE_TOKENS] += nll.sum(0, dtype=torch.float64).to(device)
    count = torch.tensor([len(starts)], dtype=torch.float64, device=device)
    _all_reduce_sum(sums)
    _all_reduce_sum(count)
    return sums.cpu(), int(count.item())  # host sync: once per model


def bucketize(sums: torch.Tensor, num_windows: int, num_buckets: int) -> list[dict[str, float]]:
    buckets = []
    for start, end in bucket_bounds(len(sums), num_buckets):
        mean_nll = float(sums[start:end].sum()) / ((end - start) * num_windows)
        buckets.append({"start": start, "end": end, "mean_nll": mean_nll, "perplexity": math.exp(mean_nll)})
    return buckets


@dataclass
class PositionsArgs:
    """What `longctx eval positions` was asked (cli.py builds it from argv)."""

    models: dict[str, str]
    data: str
    """Held-out shard directory, packed with the models' tokenizer."""
    length: int
    out: Path
    num_buckets: int = 16
    batch_size: int = 1
    max_windows: int = 0
    """Score only the first N windows (0: every window the held-out data holds)."""
    device_map: str = "none"
    """none: each model on one device; balanced: its layers spread over every visible GPU (longctx.placement)."""


def _check_models_on_stream(models: dict[str, str], stream: torch.Tensor, data: str, lengths: list[int]) -> None:
    for name, path in models.items():
        config = eval_model_config(path)
        check_context_reach(config, lengths, name)
        if int(stream.max()) >= config.vocab_size:
            raise UserError(
                f"held-out tokens in {data} reach id {int(stream.max())} but {name} has {config.vocab_size} token "
                "embeddings: evaluate on shards packed with the model's tokenizer"
            )


def evaluate_positions(args: PositionsArgs) -> dict[str, Any]:
    """Per-position loss of each model. Rank 0 prints a table and writes positions.json (returned) and positions.png
    to args.out; every argument, model and the data are checked before anything is loaded or written."""
    if args.length < 2:
        raise UserError(f"length {args.length} must be >= 2")
    if not 1 <= args.num_buckets <= args.length:
        raise UserError(f"buckets {args.num_buckets} must be between 1 and the length {args.length}")
    if args.batch_size < 1 or args.max_windows < 0:
        raise UserError("batch size must be >= 1 and max windows >= 0 (0: every window)")
    if not Path(args.data).is_dir():
        raise UserError(f"data {args.data} is not a directory: give held-out shards, e.g. <prep out>/val")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"output {args.out} is a file: give a directory for the results")
    check_device_map(args.models, args.device_map)
    init_distributed_from_env()
    max_tokens = args.max_windows * args.length + 1 if args.max_windows else 0
    stream = load_heldout_stream(args.data, max_tokens)
    if len(stream) < args.length + 1:
        raise UserError(
            f"the held-out data in {args.data} has {len(stream)} tokens, fewer than the length {args.length} + 1: "
            "evaluate a shorter length or hold out more data (prep.val_fraction)"
        )
    _check_models_on_stream(args.models, stream, args.data, [args.length])
    results = {}
    for name, path in args.models.items():
        started = time.perf_counter()
        model = load_for_eval(path, args.device_map)
        sums, num_windows = position_nll(model, stream, args.length, batch_size=args.batch_size, progress=True)
        mean_nll = float(sums.sum()) / (args.length * num_windows)
        results[name] = {
            "path": str(path),
            "num_windows": num_windows,
            "mean_nll": mean_nll,
            "perplexity": math.exp(mean_nll),
            "buckets": bucketize(sums, num_windows, args.num_buckets),
            "seconds": round(time.perf_counter() - started, 1),
        }
        del model
    report = {"data": str(args.data), "length": args.length, "num_buckets": args.num_buckets, "models": results}
    if _rank_and_world()[0] == 0:
        from longctx.atomic import write_json_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "positions.json", report, sort_keys=False)
        plot_positions(results, out / "positions.png", f"Loss by position, windows of {args.length} tokens")
        print(format_positions_table(results))
        print(f"{num_windows} windows of {args.length} tokens per model; wrote {out / 'positions.json'}, positions.png")
    return report


def format_positions_table(results: dict[str, dict]) -> str:
    """Buckets as rows, models as columns: perplexity of the predictions at those positions."""
    names = list(results)
    buckets = next(iter(results.values()))["buckets"]
    lines = [f"{'positions':>13}" + "".join(f"{name:>14}" for name in names)]
    for i, bucket in enumerate(buckets):
        cells = "".join(f"{results[name]['buckets'][i]['perplexity']:>14.3f}" for name in names)
        lines.append(f"{bucket['start']:>6}-{bucket['end'] - 1:<6}" + cells)
    return "\n".join(lines)


def plot_positions(results: dict[str, dict], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longctx.atomic import save_figure_atomic

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, result in results.items():
        middles = [(b["start"] + b["end"] - 1) / 2 for b in result["buckets"]]
        ax.plot(middles, [b["perplexity"] for b in result["buckets"]], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("position in the window (tokens of context - 1)")
    ax.set_ylabel("perplexity of the predictions there")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Short-context retention
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RetentionArgs:
    """What `longctx eval retention` was asked (cli.py builds it from argv)."""

    models: dict[str, str]
    data: dict[str, str]
    """domain name -> held-out shard directory (packed with the models' tokenizer)."""
    base_context: int
    out: Path
    baseline: str = ""
    """The model the others are compared with (default: the first)."""
    batch_size: int = 1
    max_tokens: int = 0
    """Score only the first N held-out tokens of each domain (0: all)."""
    device_map: str = "none"
    """none: each model on one device; balanced: its layers spread over every visible GPU (longctx.placement)."""


def parse_data_specs(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named after the directory, or its parent for a `val` split) -> {name: dir}."""
    return parse_named_dirs(
        specs,
        "--data",
        lambda directory: directory.parent.name if directory.name == "val" else directory.name,
        "give held-out shards, e.g. <prep out>/val",
        example="--data code=runs/prep/val",
    )


def evaluate_retention(args: RetentionArgs) -> dict[str, Any]:
    """Perplexity at the base context of every model on every domain, and its change from the baseline model.

    Rank 0 prints a table and writes retention.json (returned) to args.out; everything is checked first."""
    baseline = args.baseline or next(iter(args.models))
    if baseline not in args.models:
        raise UserError(
            f"--baseline {baseline!r} is not one of the models ({', '.join(args.models)}): name one of them"
        )
    if args.base_context < 1 or args.batch_size < 1 or args.max_tokens < 0:
        raise UserError("--base-context and --batch-size must be >= 1, --max-tokens >= 0 (0: every held-out token)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"output {args.out} is a file: give a directory for the results")
    check_device_map(args.models, args.device_map)
    init_distributed_from_env()
    streams = {}
    for domain, path in args.data.items():
        streams[domain] = load_heldout_stream(path, args.max_tokens)
        if len(streams[domain]) < args.base_context + 1:
            raise UserError(
                f"the held-out data {domain} ({path}) has {len(streams[domain])} tokens, fewer than the base context "
                f"{args.base_context} + 1: hold out more data there"
            )
        _check_models_on_stream(args.models, streams[domain], path, [args.base_context])
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in args.models}
    for name, path in args.models.items():
        model = load_for_eval(path, args.device_map)
        for domain, stream in streams.items():
            scored = perplexity(model, [stream], [args.base_context], batch_size=args.batch_size, progress=True)
            results[name][domain] = scored[args.base_context]
        del model
    for name in args.models:
        for domain in streams:
            reference = results[baseline][domain]["perplexity"]
            results[name][domain]["change"] = results[name][domain]["perplexity"] / reference - 1
    report = {
        "base_context": args.base_context,
        "baseline": baseline,
        "data": dict(args.data),
        "models": {name: {"path": str(args.models[name]), "domains": results[name]} for name in args.models},
    }
    if _rank_and_world()[0] == 0:
        from longctx.atomic import write_json_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "retention.json", report, sort_keys=False)
        print(format_retention_table(report))
        print(f"wrote {out / 'retention.json'}")
    return report


def format_retention_table(report: dict[str, Any]) -> str:
    """Models as rows, domains as columns: perplexity at the base context (change from the baseline)."""
    models = report["models"]
    domains = list(report["data"])
    width = max(len("model"), *(len(name) for name in models))
    lines = [
        f"perplexity at {report['base_context']} tokens (change from {report['baseline']})",
        "model".ljust(width) + "".join(f"{domain:>22}" for domain in domains),
    ]
    for name, result in models.items():
        cells = "".join(
            f"{result['domains'][d]['perplexity']:>13.3f} ({100 * result['domains'][d]['change']:+5.1f}%)"
            for d in domains
        )
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)
