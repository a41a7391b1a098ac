"""S²-Attn's far-end gap, and the variants that try to close it: one protocol, side by side (issue 19).

From the demo's base model (256 tokens), the demo's LongLoRA stage (launch/presets/tiny-cpu.yaml: 2 processes, ZeRO-3,
LoRA r = 8 on q/k/v/o + embeddings + norms, position interpolation 8× to 2048 tokens, G = 1024, 240 steps at lr 1e-3
cosine) runs once per variant with the same data, steps, seed and lr, changing only the attention in training:

- s2attn: plain S²-Attn (LongLoRA's; the demo);
- sinks: + the first 4 tokens of every sequence visible to every query (attention.sink_tokens=4);
- dense-heads: + 1 of the 6 heads dense (attention.dense_heads=1);
- dense-phase: + the last 10% of the steps (24) trained with dense attention (attention.dense_phase=0.1);
- dense: dense attention in training (attention.implementation=sdpa): not LongLoRA, the bound;
- combined: sinks + 1 dense head + the last 25% of the steps dense.

Each extended model is scored with dense attention on the same held-out tokens (EVAL_TOKENS per length of the demo's
2048-token held-out split): perplexity on windows of L and on sliding windows (stride L/4) at 256..2048, loss by
position (16 buckets over 2048), and the demo's RULER needle table. Training time per step and peak memory come from
each run's metrics.jsonl (steps 2.. of the loop, on this machine's 2 cores). Per variant and for dense attention,
each in a fresh process: forward + backward time and peak memory of the attention core at a LLaMA-7B head shape (32
heads of 128, N = 8192, float32) and of whole model steps (STEP_SHAPES: the demo's model at 2048, one LLaMA-2-7B
layer at 4096, frozen weights). A FLOP count gives the whole-step ratio at N = 32k for LLaMA-2-7B (a model, not a
measurement; `make gpu-check` measures it).

    .venv/bin/python benchmarks/s2attn_variants.py [--variants s2attn,dense,...] [--seeds 0] [--out ...]
    .venv/bin/python benchmarks/s2attn_variants.py --remeasure {core,steps,all}   # else kept from the JSON

Needs `make demo` first. Runs go to runs/s2attn_variants/<variant>-seed<k>/; a run whose final model exists is not
retrained and an evaluation that exists is not redone, so a rerun (e.g. with --seeds 1 for the headline rows) only
does what is missing, and the report covers every run present. Writes benchmarks/results/s2attn_variants.json.
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from longctx import demo
from longctx.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PRESET = demo.PRESETS / "tiny-cpu.yaml"
RUNS = REPO / "runs" / "s2attn_variants"
LENGTHS = [demo.BASE_CONTEXT * k for k in (1, 2, 4, 8)]
EVAL_TOKENS = demo.EVAL_TOKENS  # held-out tokens per length: the demo's sample, 16 windows of 2048
POSITION_WINDOWS = 16

# Each variant sets all three options: the preset itself trains the combination (since the second seed confirmed it).
PLAIN = demo.PLAIN_S2ATTN
VARIANTS: dict[str, list[str]] = {
    "s2attn": PLAIN,
    "sinks": [*PLAIN, "attention.sink_tokens=4"],
    "dense-heads": [*PLAIN, "attention.dense_heads=1"],
    "dense-phase": [*PLAIN, "attention.dense_phase=0.1"],
    "dense": [*PLAIN, "attention.implementation=sdpa"],
    # all three, with a longer dense phase: what the single variants (seed 0: 5-7% above the bound) left open
    "combined": ["attention.sink_tokens=4", "attention.dense_heads=1", "attention.dense_phase=0.25"],
}
# LLaMA-2-7B for the attention-core timing and the FLOP model; 2 of 32 heads dense is the demo's 1 of 6 scaled down
# to what fits the cost goal (<= 1.2x plain S²-Attn's step).
LLAMA7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "head_dim": 128}
LLAMA7B_VARIANTS = {
    "s2attn": {},
    "sinks": {"sink_tokens": 4},
    "dense-heads": {"num_dense_heads": 2},
    "sinks+dense-heads": {"sink_tokens": 4, "num_dense_heads": 2},  # the combination outside its dense phase
}


def demo_inputs(demo_dir: Path) -> dict[str, Path]:
    inputs = {
        "base": demo_dir / "base" / "final",
        "train": demo_dir / f"data-{LENGTHS[-1]}" / "train",
        "val": demo_dir / f"data-{LENGTHS[-1]}" / "val",
        "tokenizer": demo_dir / "tokenizer.model",
    }
    missing = [str(p) for p in (inputs["base"] / "config.json", inputs["val"] / "manifest.json") if not p.is_file()]
    if missing:
        raise UserError(f"the demo's outputs are missing ({', '.join(missing)}): run `make demo` first")
    return inputs


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def train(variant: str, seed: int, inputs: dict[str, Path]) -> float | None:
    """Train one run unless its final model exists; the wall time of this call's run (None: reused)."""
    out = RUNS / run_name(variant, seed)
    if (out / "final" / "config.json").is_file():
        return None
    overrides = [f"model.path={inputs['base']}", f"data.train={inputs['train']}", f"train.output_dir={out}"]
    overrides += [f"train.seed={seed}", *VARIANTS[variant]]
    print(f"\n=== s2attn_variants: train {run_name(variant, seed)} ===", flush=True)
    start = time.perf_counter()
    demo._run_cli(["train", "--config", str(PRESET), *overrides], num_procs=2)
    return time.perf_counter() - start


def training_figures(name: str, variant: str) -> dict:
    """Loss, step time and peak memory from metrics.jsonl.

    Seconds per step: the median step time (elapsed time between logged steps) of each phase of the run (S²-Attn
    steps, dense-phase steps), weighted by the phase's steps: robust to a moment of shared cores, and a dense phase
    counts for what it costs. The plain mean is reported beside it."""
    from longctx.config import RunConfig, load_config
    from longctx.trainer import dense_phase_start

    lines = [json.loads(line) for line in (RUNS / name / "metrics.jsonl").read_text().splitlines() if line]
    step_time = {
        b["step"]: (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
        for a, b in zip(lines, lines[1:], strict=False)
    }
    dense_from = dense_phase_start(load_config(RunConfig, PRESET, VARIANTS[variant]))
    phases = [[t for step, t in step_time.items() if step <= dense_from], [t for step, t in step_time.items()
              if step > dense_from]]  # fmt: skip
    weighted = sum(statistics.median(p) * len(p) for p in phases if p) / len(step_time)
    return {
        "steps": lines[-1]["step"],
        "final_loss": lines[-1]["loss"],
        "mean_loss_last_10_steps": statistics.mean(line["loss"] for line in lines[-10:]),
        "seconds_per_step": weighted,
        "seconds_per_step_mean": statistics.mean(step_time.values()),
        "dense_phase_seconds_per_step": statistics.median(phases[1]) if phases[1] else None,
        "peak_memory_gb": max(line["memory_gb"] for line in lines),
    }


def evaluate(name: str, inputs: dict[str, Path]) -> dict:
    """Perplexity (windows of L, sliding), loss by position and RULER of one extended model; cached in its run dir."""
    from longctx.evaluate import evaluate_perplexity
    from longctx.positions import PositionsArgs, evaluate_positions
    from longctx.ruler import RulerArgs, evaluate_ruler

    cache = RUNS / name / "evaluation.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    models = {name: str(RUNS / name / "final")}
    result: dict = {}
    for protocol, stride in demo.EVAL_PROTOCOLS.items():
        result[protocol] = {}
        for length in LENGTHS:
            report = evaluate_perplexity(
                models,
                inputs["val"],
                [length],
                RUNS / name / "eval" / protocol / str(length),
                stride=stride(length),
                batch_size=4,
                max_tokens=EVAL_TOKENS,
            )
            result[protocol][str(length)] = report["models"][name]["results"][length]["perplexity"]
    positions = evaluate_positions(
        PositionsArgs(models, str(inputs["val"]), LENGTHS[-1], RUNS / name / "eval" / "positions",
                      max_windows=POSITION_WINDOWS, batch_size=4)
    )  # fmt: skip
    result["positions"] = positions["models"][name]
    ruler_args = RulerArgs(
        models, LENGTHS, RUNS / name / "eval" / "ruler", str(inputs["tokenizer"]), haystack_text=str(inputs["val"])
    )
    ruler = evaluate_ruler(RulerArgs(**{**vars(ruler_args), **demo.DEMO_RULER}))
    result["ruler"] = ruler["models"][name]
    cache.write_text(json.dumps(result, indent=1))
    return result


def core_method(name: str, group_size: int):
    """The attention core of one variant (or dense attention) at LLaMA-7B's head shape: (q, k, v) -> output."""
    from longctx.attention import dense_attention, s2_attention

    if name == "dense":
        return lambda q, k, v: dense_attention(q, k, v)
    return lambda q, k, v: s2_attention(q, k, v, group_size, **LLAMA7B_VARIANTS[name])


def core_inputs(seq_len: int) -> list[torch.Tensor]:
    """q, k, v and the output's gradient, (1, H, N, D) laid out token-major as a model's projections make them."""
    torch.manual_seed(0)
    return [torch.randn(1, seq_len, LLAMA7B["heads"], LLAMA7B["head_dim"]).transpose(1, 2) for _ in range(4)]


def core_peak_mb(name: str, seq_len: int) -> float:
    """Peak resident memory (MiB) one forward + backward of the core adds over its inputs: run in a fresh process,
    whose high-water mark is reset (/proc/self/clear_refs) once the inputs exist, then read from VmHWM."""

    q, k, v, grad = core_inputs(seq_len)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    attend = core_method(name, seq_len // 4)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    base = _status_kb("VmRSS:")
    attend(q, k, v).backward(grad)
    return (_status_kb("VmHWM:") - base) / 1024


def core_seconds(name: str, seq_len: int, repeats: int) -> float:
    """Forward + backward seconds of the core, the fastest of `repeats`."""
    inputs = core_inputs(seq_len)
    attend, best = core_method(name, seq_len // 4), float("inf")
    for _ in range(repeats):
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
        start = time.perf_counter()
        attend(q, k, v).backward(inputs[3])
        best = min(best, time.perf_counter() - start)
    return best


def attention_core_times(seq_len: int, repeats: int) -> dict:
    """Forward + backward seconds (min over repeats) of the attention core at LLaMA-7B's head shape, per variant,
    and the peak memory each adds: a fresh process for each (the evaluations before leave this one's heap large)."""
    group_size = seq_len // 4
    names = [*LLAMA7B_VARIANTS, "dense"]
    times = {name: _fresh_process(core_seconds, name, seq_len, repeats) for name in names}
    peak = {name: _fresh_process(core_peak_mb, name, seq_len) for name in names}
    return {"seq_len": seq_len, "group_size": group_size, "seconds": times,
            "relative_to_s2attn": {name: t / times["s2attn"] for name, t in times.items()},
            "peak_mb_over_inputs": peak,
            "peak_relative_to_s2attn": {name: m / peak["s2attn"] for name, m in peak.items()},
            "peak_relative_to_dense": {name: m / peak["dense"] for name, m in peak.items()}}  # fmt: skip


# Model steps: (model config, N, G, dense heads of the variants, activation checkpointing, with the LM head and loss).
STEP_SHAPES = {
    # the demo's extended model as its LongLoRA stage trains it: N = 2048, G = 1024, 1 of 6 heads dense
    "demo": (dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=32, vocab_size=4096), 2048, 1024, 1, False, True),
    # one LLaMA-2-7B decoder layer, checkpointed as long-context training runs it: N = 4096, G = 1024, 2 of 32 dense
    "llama7b-layer": (dict(hidden_size=LLAMA7B["hidden"], intermediate_size=LLAMA7B["intermediate"],
                           num_hidden_layers=1, num_attention_heads=LLAMA7B["heads"],
                           num_key_value_heads=LLAMA7B["heads"], vocab_size=256), 4096, 1024, 2, True, False),
}  # fmt: skip


def model_step(shape: str, name: str, steps: int) -> dict:
    """Forward + backward of a model of `shape` with frozen random weights (LoRA's frozen base; gradients flow to the
    input embeddings), attention `name` (a LLAMA7B_VARIANTS key, or dense SDPA), in this fresh process: the
    fastest of `steps` steps and the peak resident memory over everything built before them (weights, inputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    from longctx import attention

    fields, seq_len, group_size, dense_heads, checkpointing, with_head = STEP_SHAPES[shape]
    attention.register()
    config = LlamaConfig(**fields, max_position_embeddings=seq_len, attention_dropout=0.0)
    torch.manual_seed(0)
    model_class = LlamaForCausalLM if with_head else LlamaModel
    model = model_class._from_config(config, attn_implementation="sdpa" if name == "dense" else "s2attn").train()
    if name != "dense":
        settings = LLAMA7B_VARIANTS[name]
        attention.configure(
            model,
            group_size=group_size,
            sink_tokens=settings.get("sink_tokens", 0),
            dense_heads=dense_heads if settings.get("num_dense_heads") else 0,
        )
    model.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embeds = torch.randn(1, seq_len, config.hidden_size).requires_grad_()
    labels = torch.randint(0, config.vocab_size, (1, seq_len))
    grad = torch.randn(1, seq_len, config.hidden_size)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    base = _status_kb("VmRSS:")
    times = []
    for _ in range(steps):
        embeds.grad = None
        start = time.perf_counter()
        if with_head:
            model(inputs_embeds=embeds, labels=labels).loss.backward()
        else:
            model(inputs_embeds=embeds).last_hidden_state.backward(grad)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mb_over_inputs": (_status_kb("VmHWM:") - base) / 1024}


def model_steps(shape: str, steps: int) -> dict:
    """`model_step` for plain S²-Attn, each variant and dense attention, one fresh process each."""
    names = [*LLAMA7B_VARIANTS, "dense"]
    fields, seq_len, group_size, dense_heads, checkpointing, with_head = STEP_SHAPES[shape]
    rows = {name: _fresh_process(model_step, shape, name, steps) for name in names}
    return {
        "seq_len": seq_len, "group_size": group_size, "dense_heads": dense_heads, "config": fields,
        "activation_checkpointing": checkpointing, "lm_head_and_loss": with_head, "steps": steps,
        "seconds": {name: row["seconds"] for name, row in rows.items()},
        "peak_mb_over_inputs": {name: row["peak_mb_over_inputs"] for name, row in rows.items()},
        "relative_to_s2attn": {name: row["seconds"] / rows["s2attn"]["seconds"] for name, row in rows.items()},
        "peak_relative_to_dense": {
            name: row["peak_mb_over_inputs"] / rows["dense"]["peak_mb_over_inputs"] for name, row in rows.items()
        },
    }  # fmt: skip


def _status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def _fresh_process(function, *args):
    """function(*args) in a new process. Every allocation above 128 KiB gets its own mapping, returned on free:
    else glibc's rising mmap threshold keeps freed blocks resident, and the high-water mark would depend on the
    order of allocations, not on the tensors alive."""
    import multiprocessing

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(function, args)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def step_flops_model(seq_len: int = 32_768, dense_phase: float = 0.1, combined_phase: float = 0.25) -> dict:
    """Training FLOPs per token of one LLaMA-2-7B layer (forward; backward is ~2× of each term alike), relative to
    plain S²-Attn at G = N/4: projections and MLP 2·(4·d² + 3·d·d_ff); attention 4·d × the keys a query reads on
    average (G/2 in a group, N/2 dense, + k sinks)."""
    d, ff, heads = LLAMA7B["hidden"], LLAMA7B["intermediate"], LLAMA7B["heads"]
    group = seq_len // 4
    linear = 2 * (4 * d * d + 3 * d * ff)

    def attention(keys_per_query: float) -> float:
        return 4 * d * keys_per_query

    plain = linear + attention(group / 2)
    dense = linear + attention(seq_len / 2)
    dense_heads = linear + attention(group / 2) * (heads - 2) / heads + attention(seq_len / 2) * 2 / heads
    rows = {
        "s2attn": plain,
        "sinks": linear + attention(group / 2 + 4),
        "dense-heads": dense_heads,
        "dense-phase": (1 - dense_phase) * plain + dense_phase * dense,
        "dense": dense,
        "combined": (1 - combined_phase) * (dense_heads + attention(4) * (heads - 2) / heads) + combined_phase * dense,
    }
    return {"seq_len": seq_len, "group_size": group, "relative_to_s2attn": {k: v / plain for k, v in rows.items()}}


def summarize(runs: dict[str, dict]) -> dict:
    """Per variant: the mean over its seeds of each headline figure, and the gap to the dense bound at 8×."""
    by_variant: dict[str, list[dict]] = {}
    for run in runs.values():
        by_variant.setdefault(run["variant"], []).append(run)
    target = str(LENGTHS[-1])
    summary = {}
    for variant, entries in by_variant.items():
        summary[variant] = {
            "seeds": [entry["seed"] for entry in entries],
            **{
                f"{protocol}_{n}": statistics.mean(e["evaluation"][protocol][n] for e in entries)
                for protocol in demo.EVAL_PROTOCOLS
                for n in map(str, LENGTHS)
            },  # fmt: skip
            "seconds_per_step": statistics.mean(e["training"]["seconds_per_step"] for e in entries),
            "peak_memory_gb": max(e["training"]["peak_memory_gb"] for e in entries),
        }
    if "dense" in summary:
        bound = summary["dense"][f"sliding_{target}"]
        for row in summary.values():
            row["sliding_8x_over_dense"] = row[f"sliding_{target}"] / bound
    if "s2attn" in summary:
        plain = summary["s2attn"]["seconds_per_step"]
        for row in summary.values():
            row["step_time_over_s2attn"] = row["seconds_per_step"] / plain
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds to run for these variants")
    parser.add_argument("--core-seq-len", type=int, default=8192, help="N of the LLaMA-7B attention-core timing")
    parser.add_argument("--core-repeats", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=2, help="steps per model-step measurement (fastest kept)")
    parser.add_argument(
        "--remeasure",
        choices=["core", "steps", "all"],
        help="measure the attention core, the model steps or both again (else kept from the JSON)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "s2attn_variants.json")
    args = parser.parse_args()
    try:
        inputs = demo_inputs(args.demo_dir)
        variants = args.variants.split(",")
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise UserError(f"unknown variants {unknown}: pick from {', '.join(VARIANTS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    wall = {}
    for seed in seeds:
        for variant in variants:
            wall[run_name(variant, seed)] = train(variant, seed, inputs)
    runs = {}
    for variant in VARIANTS:  # every run present, this call's and earlier ones
        for run_dir in sorted(RUNS.glob(f"{variant}-seed*")):
            if not (run_dir / "final" / "config.json").is_file():
                continue
            name = run_dir.name
            print(f"\n=== s2attn_variants: evaluate {name} ===", flush=True)
            runs[name] = {
                "variant": variant,
                "seed": int(name.rsplit("seed", 1)[1]),
                "overrides": VARIANTS[variant],
                "training": training_figures(name, variant),
                "evaluation": evaluate(name, inputs),
            }
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    core = previous.get("attention_core_llama7b_cpu")
    names = {*LLAMA7B_VARIANTS, "dense"}
    stale = core is None or core.get("seq_len") != args.core_seq_len or set(core["seconds"]) != names
    if args.remeasure in ("core", "all") or stale:
        print("\n=== s2attn_variants: attention core at LLaMA-7B's head shape ===", flush=True)
        core = attention_core_times(args.core_seq_len, args.core_repeats)
    steps = {}
    for shape in STEP_SHAPES:
        key = f"model_step_{shape}_cpu"
        steps[key] = previous.get(key)
        if args.remeasure in ("steps", "all") or steps[key] is None or set(steps[key]["seconds"]) != names:
            print(f"\n=== s2attn_variants: model step, {shape} ===", flush=True)
            steps[key] = model_steps(shape, args.step_repeats)
    result = {
        "what": "S²-Attn variants vs plain S²-Attn and dense training: the demo's base extended 8x (256 -> 2048), "
        "same data, steps, seed and lr; dense-attention evaluation on the same held-out tokens",
        "preset": str(PRESET.relative_to(REPO)),
        "variants": VARIANTS,
        "evaluation": {
            "lengths": LENGTHS,
            "max_tokens": EVAL_TOKENS,
            "position_windows": POSITION_WINDOWS,
            "ruler": demo.DEMO_RULER,
            "data": str(inputs["val"]),
        },  # fmt: skip
        "runs": runs,
        "summary": summarize(runs),
        "attention_core_llama7b_cpu": core,
        **steps,
        "step_flops_model_llama7b_32k": step_flops_model(),
        "train_wall_s_this_call": wall,
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": torch.get_num_threads(),
        },  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    target = str(LENGTHS[-1])
    print(f"\n{'variant':<12} {'seeds':<6}" + "".join(f"{'sl ' + n:>9}" for n in map(str, LENGTHS))
          + f"{'win ' + target:>10}{'vs dense':>10}{'s/step':>8}{'x plain':>8}")  # fmt: skip
    for variant, row in result["summary"].items():
        print(f"{variant:<12} {','.join(map(str, row['seeds'])):<6}"
              + "".join(f"{row[f'sliding_{n}']:>9.2f}" for n in map(str, LENGTHS))
              + f"{row[f'windows_{target}']:>10.2f}{row.get('sliding_8x_over_dense', float('nan')):>10.3f}"
              + f"{row['seconds_per_step']:>8.2f}{row.get('step_time_over_s2attn', float('nan')):>8.2f}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
