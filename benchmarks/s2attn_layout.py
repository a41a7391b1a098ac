"""Whole-model forward + backward with S²-Attn's layout built once per forward pass, against a baseline attention
module that builds it in every layer (and again in the activation-checkpoint recompute); SDPA backend.

    .venv/bin/python benchmarks/s2attn_layout.py --before 520bbec    # CPU -> results/s2attn_layout_cpu.json

--before names the git revision whose longctx/attention.py is the baseline (read with `git show`, nothing in the
checkout changes); "after" is this tree's longctx/attention.py. A LLaMA of 8 layers, hidden 256, 8 heads, batch 1,
activation checkpointing (non-reentrant, as longctx trains), G = N / 4, for plain positions and for packed documents
(position ids restarting at each document, documents isolated). Both versions run the same weights and inputs,
step by step in turn (the order flipping every round) so that other load on the shared machine hits both alike.
Reported per step: the whole forward + backward, and the time spent inside the attention function (its calls in the
forward and in the recompute: layout and SDPA, not the attention's backward), which the layout's cost is a larger
share of; each as median and minimum over the timed steps, and the ratio of the medians. Also the layout builds per
step and the time of one layout build (segment ids and run layout) of this tree on its own.

CPU runs default to one thread, as benchmarks/attention.py does (its docstring says why).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx import attention

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MODEL = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)
VERSIONS = ("before", "after")
IMPLEMENTATION = {"before": "s2attn_before", "after": "s2attn_after"}
attention_seconds = dict.fromkeys(VERSIONS, 0.0)  # time inside each version's attention function, summed


def load_before(revision: str, directory: Path):
    """The baseline attention module: longctx/attention.py as of `revision`, imported under its own name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:longctx/attention.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = directory / "attention_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def register_timed(version: str, module) -> None:
    """Register `module`'s attention function, timed into attention_seconds[version], with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return module.s2attn_forward(*args, **kwargs)
        finally:
            attention_seconds[version] += time.perf_counter() - start

    AttentionInterface.register(IMPLEMENTATION[version], timed)
    AttentionMaskInterface.register(IMPLEMENTATION[version], module.s2attn_mask)


def build_model(version: str, seq_len: int):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), attn_implementation=IMPLEMENTATION[version])
    attention.configure(model, group_size=seq_len // 4, backend="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batch(seq_len: int, packed: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, MODEL["vocab_size"], (1, seq_len), generator=generator)
    if not packed:
        return {"input_ids": input_ids, "labels": input_ids}
    # Documents of 1/16 .. 1/2 of N, as in benchmarks/attention.py.
    lengths, remaining = [], seq_len
    while remaining:
        length = min(remaining, int(torch.randint(seq_len // 16, seq_len // 2, (1,), generator=generator)))
        lengths.append(length)
        remaining -= length
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": input_ids, "labels": input_ids, "position_ids": position_ids}


def step(version: str, model, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Seconds of one forward + backward, and of that inside the attention function; the batch's tensors are new in
    each step, as in training."""
    batch = {name: tensor.clone() for name, tensor in batch.items()}
    model.zero_grad(set_to_none=True)
    attention_seconds[version] = 0.0
    start = time.perf_counter()
    model(**batch).loss.backward()
    return time.perf_counter() - start, attention_seconds[version]


def count_builds(version: str, module, model, batch) -> int:
    """Run layouts built in one step by `module`'s attention."""
    calls = []
    original = module._run_layout
    module._run_layout = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        step(version, model, batch)
    finally:
        module._run_layout = original
    return len(calls)


def layout_build_ms(seq_len: int, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """One build of this tree's segment ids and run layout, as the first layer of a forward pass does it."""
    position_ids = batch.get("position_ids", torch.arange(seq_len)[None])
    offsets = (0, seq_len // 8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        segment_ids = attention.document_segment_ids(position_ids)
        attention._build_layout(position_ids, segment_ids, seq_len // 4, offsets, (1, seq_len), "cpu", "sdpa")
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(modules: dict, seq_len: int, packed: bool, repeats: int) -> dict:
    models = {version: build_model(version, seq_len) for version in VERSIONS}
    batch = make_batch(seq_len, packed)
    # The counting steps are also the warm-up steps.
    builds = {version: count_builds(version, modules[version], models[version], batch) for version in VERSIONS}
    times: dict[str, list[tuple[float, float]]] = {version: [] for version in VERSIONS}
    for round_index in range(repeats):
        for version in VERSIONS if round_index % 2 == 0 else VERSIONS[::-1]:
            times[version].append(step(version, models[version], batch))
    row = {"seq_len": seq_len, "group_size": seq_len // 4, "positions": "packed" if packed else "plain"}
    for version in VERSIONS:
        for index, what in enumerate(("step", "attention")):
            seconds = [t[index] for t in times[version]]
            row[f"{version}_{what}_median_ms"] = round(statistics.median(seconds) * 1000, 1)
            row[f"{version}_{what}_min_ms"] = round(min(seconds) * 1000, 1)
        row[f"{version}_layout_builds_per_step"] = builds[version]
    for what in ("step", "attention"):
        row[f"{what}_ratio_after_over_before"] = round(
            row[f"after_{what}_median_ms"] / row[f"before_{what}_median_ms"], 4
        )
    row["layout_build_ms"] = round(layout_build_ms(seq_len, batch, 5), 2)
    return row


def summary(row: dict) -> str:
    parts = [f"N={row['seq_len']:>5} {row['positions']:>6}"]
    for what in ("step", "attention"):
        before, after = row[f"before_{what}_median_ms"], row[f"after_{what}_median_ms"]
        parts.append(f"{what} {before:.1f} -> {after:.1f} ms ({row[f'{what}_ratio_after_over_before']:.3f})")
    builds = f"{row['before_layout_builds_per_step']} -> {row['after_layout_builds_per_step']}"
    parts.append(f"builds {builds}, one build {row['layout_build_ms']:.1f} ms")
    return "  ".join(parts)


def main() -> None:
    from _env import environment  # benchmarks/ is on sys.path when a benchmark runs as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision whose longctx/attention.py is the baseline")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per version after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see benchmarks/attention.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "s2attn_layout_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before_commit = subprocess.run(
        ["git", "rev-parse", args.before], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    # Whether "after" is uncommitted work on top of the recorded commit.
    after_dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "longctx/attention.py"], cwd=ROOT).returncode

    with tempfile.TemporaryDirectory() as directory:
        modules = {"before": load_before(args.before, Path(directory)), "after": attention}
        for version, module in modules.items():
            register_timed(version, module)
        rows = []
        for seq_len in args.lengths:
            for packed in (False, True):
                row = measure(modules, seq_len, packed, args.repeats)
                rows.append(row)
                print(summary(row), flush=True)

    report = {
        "benchmark": "whole-model fwd+bwd, S²-Attn SDPA backend: layout built once per forward vs in every layer",
        **environment(),
        "before_commit": before_commit,
        "after": "this tree's longctx/attention.py" + (" (uncommitted, on top of git_commit)" if after_dirty else ""),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "model": {**MODEL, "batch": 1, "activation_checkpointing": "non-reentrant", "group_size": "N / 4"},
        "repeats": args.repeats,
        "timing": "median (and min) over steps run in turn, before and after; ratios = after / before medians; "
        "attention = time inside the attention function per step (forward and recompute calls, not its backward)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
