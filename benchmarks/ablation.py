"""LongLoRA's key ablation in miniature, on CPU: what must train for context extension to work.

From the demo's base model (256 tokens), the demo's LongLoRA stage (launch/presets/tiny-cpu.yaml: 2 processes,
ZeRO-3, plain S²-Attn, position interpolation 8× to 2048 tokens) runs three times with the same data, steps, seed,
schedule and learning rate, changing only what trains:

- lora: LoRA on q/k/v/o alone (`lora.trainable=[]`);
- lora+embed+norm: LoRA plus fully trainable input embeddings and norms (the preset, LongLoRA's recipe);
- full-ft: every weight (`lora.enabled=false`).

Then the base model and the three are scored with the demo's evaluation (dense attention, held-out split, stride
L/4, demo.EVAL_TOKENS tokens per length) at 256, 512, 1024 and 2048 tokens. The paper's figures (LLaMA2-7B extended
to 32k, proof-pile perplexity at 32k; LongLoRA arXiv 2309.12307, Table 2): LoRA 11.44, LoRA + embed + norm 8.12,
full fine-tuning 8.08.

    .venv/bin/python benchmarks/ablation.py [--demo-dir runs/demo] [--steps N] [--out benchmarks/results]

Needs `make demo` first. Runs go to runs/ablation/<variant>/; a variant whose final model exists is not retrained,
and a length whose evaluation of the same models exists is not re-scored, so a rerun only does what is missing.
Writes <out>/ablation.json and <out>/ablation.png. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from longctx import demo
from longctx.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PRESET = demo.PRESETS / "tiny-cpu.yaml"
RUNS = REPO / "runs" / "ablation"
LENGTHS = [demo.BASE_CONTEXT * k for k in (1, 2, 4, 8)]

# What trains in each variant: the only config keys that differ between the three runs.
VARIANTS: dict[str, list[str]] = {
    "lora": ["lora.trainable=[]"],
    "lora+embed+norm": [],
    "full-ft": ["lora.enabled=false"],
}
PAPER_PPL_32K = {"lora": 11.44, "lora+embed+norm": 8.12, "full-ft": 8.08}  # LLaMA2-7B, 4k → 32k, proof-pile


def demo_inputs(demo_dir: Path) -> dict[str, Path]:
    """The demo outputs the ablation starts from; a one-line error naming `make demo` when one is missing."""
    inputs = {
        "base": demo_dir / "base" / "final",
        "train": demo_dir / f"data-{LENGTHS[-1]}" / "train",
        "val": demo_dir / f"data-{LENGTHS[-1]}" / "val",
    }
    missing = [
        str(path)
        for path in [inputs["base"] / "config.json", inputs["train"] / "manifest.json", inputs["val"] / "manifest.json"]
        if not path.is_file()
    ]
    if missing:
        raise UserError(f"the demo's outputs are missing ({', '.join(missing)}): run `make demo` first")
    return inputs


def variant_overrides(name: str, inputs: dict[str, Path], steps: int | None) -> list[str]:
    common = [f"model.path={inputs['base']}", f"data.train={inputs['train']}", f"train.output_dir={RUNS / name}"]
    common += demo.PLAIN_S2ATTN  # the paper's ablation is of plain S²-Attn
    return common + ([f"train.max_steps={steps}"] if steps else []) + VARIANTS[name]


def train_variant(name: str, overrides: list[str]) -> float | None:
    """Train one variant unless its final model exists; returns the wall time of this call's run (None: skipped)."""
    if (RUNS / name / "final" / "config.json").is_file():
        print(f"ablation: {name} is complete in {RUNS / name}, not retrained", flush=True)
        return None
    print(f"\n=== ablation: train {name} ===", flush=True)
    start = time.perf_counter()
    demo._run_cli(["train", "--config", str(PRESET), *overrides], num_procs=2)
    return time.perf_counter() - start


def trainable_parameters(overrides: list[str]) -> tuple[int, int]:
    """(trainable, total) parameters of the variant's training model, built on CPU exactly as the run builds it."""
    from longctx.config import RunConfig, load_config
    from longctx.model import build_model, count_parameters

    return count_parameters(build_model(load_config(RunConfig, PRESET, overrides)))


def training_summary(name: str) -> dict:
    """Final loss, mean loss of the last 10 steps and training-loop time, from the run's metrics.jsonl."""
    lines = [json.loads(line) for line in (RUNS / name / "metrics.jsonl").read_text().splitlines() if line]
    last_ten = [line["loss"] for line in lines[-10:]]
    return {
        "steps": lines[-1]["step"],
        "final_loss": lines[-1]["loss"],
        "mean_loss_last_10_steps": sum(last_ten) / len(last_ten),
        "first_loss": lines[0]["loss"],
        "train_loop_s": lines[-1]["elapsed_s"],  # the loop of the last (re)start only, without launcher start-up
    }


def evaluate_length(models: dict[str, str], val_dir: Path, length: int) -> dict[str, float]:
    """{model: perplexity} at one length, the demo's way; reused when the same models were scored before."""
    from longctx.evaluate import evaluate_perplexity

    out_dir = RUNS / "eval" / str(length)
    previous = out_dir / "perplexity.json"
    if previous.is_file():
        report = json.loads(previous.read_text())
        if {name: entry["path"] for name, entry in report["models"].items()} == models:
            print(f"ablation: perplexity at {length} already in {previous}, not re-scored", flush=True)
            return {name: entry["results"][str(length)]["perplexity"] for name, entry in report["models"].items()}
    report = evaluate_perplexity(
        models, val_dir, [length], out_dir, stride=length // 4, batch_size=4, max_tokens=demo.EVAL_TOKENS
    )
    return {name: entry["results"][length]["perplexity"] for name, entry in report["models"].items()}


def plot(perplexities: dict[str, dict[int, float]], path: Path) -> None:
    """Left: perplexity against context length per model; right: bars at the target length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longctx.evaluate import _save_figure

    target = LENGTHS[-1]
    lengths = sorted(perplexities["base"])  # the lengths scored so far
    fig, (lines_ax, bars_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_length in perplexities.items():
        lines_ax.plot(lengths, [by_length[n] for n in lengths], marker="o", label=name)
    lines_ax.set_xscale("log", base=2)
    lines_ax.set_xticks(lengths, [str(n) for n in lengths])
    lines_ax.minorticks_off()
    lines_ax.set_yscale("log")
    lines_ax.set_xlabel("context length (tokens)")
    lines_ax.set_ylabel("perplexity (held-out, stride L/4)")
    lines_ax.set_title(f"{demo.BASE_CONTEXT} → {target} tokens: what trains")
    lines_ax.grid(True, which="both", alpha=0.3)
    lines_ax.legend()

    extended = [name for name in perplexities if name != "base"]
    values = [perplexities[name][target] for name in extended]
    bars = bars_ax.bar(extended, values, color=["tab:orange", "tab:green", "tab:red"][: len(extended)])
    bars_ax.bar_label(bars, fmt="%.2f")
    bars_ax.set_ylabel(f"perplexity at {target}")
    paper = ", ".join(f"{name} {ppl}" for name, ppl in PAPER_PPL_32K.items())
    bars_ax.set_title(f"at {target} (base: {perplexities['base'][target]:.1f})\npaper, 7B at 32k: {paper}", fontsize=9)
    _save_figure(fig, path)
    plt.close(fig)


def write_report(perplexities, overrides, wall_s, inputs, out: Path) -> None:
    """ablation.json and ablation.png from the lengths scored so far ({model: {length: perplexity}})."""
    from longctx.config import RunConfig, load_config, to_dict
    from longctx.evaluate import write_json

    lengths = sorted(perplexities["base"])
    variants = {}
    for name in VARIANTS:
        cfg = load_config(RunConfig, PRESET, overrides[name])
        num_trainable, num_total = trainable_parameters(overrides[name])
        variants[name] = {
            "config_overrides": VARIANTS[name],
            "lora": to_dict(cfg.lora),
            "lr": cfg.train.lr,
            "trainable_parameters": num_trainable,
            "total_parameters": num_total,
            "perplexity": {str(n): perplexities[name][n] for n in lengths},
            **training_summary(name),
            "train_wall_s": wall_s[name],  # launcher to final model, this call; null when the run was reused
            "output_dir": str(RUNS / name),
            "paper_ppl_32k": PAPER_PPL_32K[name],
        }
    cfg = load_config(RunConfig, PRESET, overrides["lora+embed+norm"])
    result = {
        "what": "LongLoRA ablation in miniature: extend the demo's base model 8x with LoRA alone, "
        "LoRA + embeddings + norms, full fine-tuning; same data, steps, seed, schedule and lr",
        "paper": "LongLoRA arXiv 2309.12307 Table 2: LLaMA2-7B 4k -> 32k, proof-pile perplexity at 32k",
        "preset": str(PRESET.relative_to(REPO)),
        "shared": {
            "steps": cfg.train.max_steps,
            "global_batch_size": cfg.train.global_batch_size,
            "seq_len": cfg.train.seq_len,
            "lr": cfg.train.lr,
            "schedule": cfg.train.schedule,
            "seed": cfg.train.seed,
            "rope": to_dict(cfg.rope),
            "attention": to_dict(cfg.attention),
            "deepspeed": cfg.deepspeed.config,
            "num_processes": 2,
        },
        "evaluation": {
            "data": str(inputs["val"]),
            "lengths": lengths,
            "stride": "L/4",
            "max_tokens": demo.EVAL_TOKENS,
            "attention": "dense (sdpa), float32",
        },
        "base": {"path": str(inputs["base"]), "perplexity": {str(n): perplexities["base"][n] for n in lengths}},
        "variants": variants,
        "host": {"platform": platform.platform(), "python": platform.python_version()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "ablation.json")
    plot(perplexities, out / "ablation.png")

    print(f"\n{'perplexity':<16}" + "".join(f"{n:>9}" for n in lengths) + f"{'trainable':>12}{'final loss':>12}")
    for name in perplexities:
        row = f"{name:<16}" + "".join(f"{perplexities[name][n]:>9.2f}" for n in lengths)
        if name in variants:
            row += f"{variants[name]['trainable_parameters']:>12,}{variants[name]['final_loss']:>12.3f}"
        print(row)
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.png'}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="runs/demo", help="the output of `make demo` (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default: the preset's)")
    parser.add_argument("--out", default="benchmarks/results", help="where ablation.json and ablation.png go")
    args = parser.parse_args()
    try:
        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps {args.steps} must be >= 1 (or left out for the preset's step count)")
        inputs = demo_inputs(Path(args.demo_dir))
        overrides = {name: variant_overrides(name, inputs, args.steps) for name in VARIANTS}
        wall_s = {name: train_variant(name, overrides[name]) for name in VARIANTS}
        models = {"base": str(inputs["base"]), **{name: str(RUNS / name / "final") for name in VARIANTS}}
        perplexities: dict[str, dict[int, float]] = {name: {} for name in models}
        # The target length first, and the report rewritten after each length: the headline figure lands early.
        for length in [LENGTHS[-1], *LENGTHS[:-1]]:
            for name, ppl in evaluate_length(models, inputs["val"], length).items():
                perplexities[name][length] = ppl
            write_report(perplexities, overrides, wall_s, inputs, Path(args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
