"""Training-step throughput, MFU and memory of a real model shape, and the longest context whose step fits.

    # one configuration (prints one JSON row)
    .venv/bin/python benchmarks/train_step.py --shape llama2-7b --seq-len 32768 --attention s2attn --training lora
    # the whole sweep on a GPU -> results/train_step_<device>_<shape>.json + .png
    .venv/bin/python benchmarks/train_step.py --sweep --shape llama2-7b
    # the CPU sweep of the tiny shape (what tests/test_benchmark_train_step.py exercises)
    .venv/bin/python benchmarks/train_step.py --sweep --shape tiny
    # part of a sweep within a time budget (what benchmarks/gpu_check.py runs), and its plan alone (no model built)
    python3 benchmarks/train_step.py --sweep --shape llama2-7b --lengths 32768 8192 --trainings lora \
        --bisect-limit 0 --budget-s 150 [--dry-run]

The model is built from its config with random weights: on the meta device first, then materialized on the
target device (`to_empty`) and initialized (normal(0, 0.02) linear/embedding weights, unit norms, RoPE buffers
recomputed), so a 7B shape costs no download and no host copy. The training setup is that of a preset
(default launch/presets/llama2-7b-32k.yaml, built by `longctx.model.build_model`): LoRA on q/k/v/o plus
trainable embeddings and norms (`--training lora`) or every weight trainable (`--training full`), bf16 on GPU /
fp32 on CPU, activation checkpointing as the preset says, S²-Attn (G = N/4) or dense causal SDPA, the preset's
ZeRO stage through DeepSpeed on one rank with torch AdamW, as `longctx.trainer` runs it. A step is one
micro batch of one sequence of N random tokens: forward, loss, backward, optimizer step. The preset's memory
settings (tiled MLP, tiled loss) apply as in training; sequence parallelism has no switch here (one GPU).

Each configuration runs in a fresh process (after `--warmup` untimed steps, `--steps` timed ones), so peak
memory is that configuration's own and a CUDA out-of-memory cannot poison the next measurement.
`--memory-limit-gib` caps what that process may allocate on the GPU (torch's per-process memory fraction), so a
larger GPU can stand in for a smaller one in the search for the longest context. `--budget-s` bounds the sweep's
wall-clock time: a configuration is started only while at least as much time is left as the slowest one so far took
(`MIN_START_S` before any), the one running at the deadline is stopped, and each is recorded as "skipped" or
"timeout"; the bisection then reports the longest length that fitted so far ("cut_by_budget"). `--dry-run` builds
and validates every planned configuration's RunConfig (the child's own `run_config`), runs nothing, and exits 1
naming each problem.

FLOP counting (per training step, B sequences of N tokens, T = B·N; matmul of an m×k by k×n matrix = 2mkn):
  * linear layers, forward: 2 · P_linear · T, where P_linear counts the weights of every nn.Linear in the model
    (q/k/v/o, MLP, output head, and LoRA's A/B adapters when present; embedding lookups and norms count 0);
  * linear layers, input gradient: 2 · P_linear · T;
  * linear layers, weight gradient: 2 · P_linear_trainable · T, only for trainable weights (for LoRA only the
    adapters, about 0.06% of a 7B model's linear weights; full fine-tuning: all of them);
  * recompute under activation checkpointing: the forward of every decoder layer once more,
    2 · P_linear_layers · T (all linear weights but the output head) plus the attention forward;
  * attention, for the mask actually used: the two matmuls QKᵀ and PV cost 2 · 2 · d FLOPs per score entry
    and head, with N²/2 entries per head for dense causal attention and N·G/2 for S²-Attn (N/G causal groups
    of G×G/2; the shifted half of the heads has the same count); backward = 2 × forward; summed over heads and
    layers.
Achieved TFLOP/s = FLOPs per step / median step time; MFU = achieved / peak, with peak the dense bf16 tensor
rate of the device (H100 SXM and H200: 989 TFLOP/s, A100: 312) or `--peak-tflops`; none on CPU unless given.
Memory: torch.cuda.max_memory_allocated of the process (GPU), and the process's peak resident set (host).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longctx.plan import LLAMA2_SHAPES

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO / "launch/presets/llama2-7b-32k.yaml"

# Hugging Face config fields of the shapes (LLaMA-2's from longctx.plan, Meta's released config.json values).
_LLAMA2 = dict(model_type="llama", max_position_embeddings=4096, tie_word_embeddings=False)
SHAPES = {
    "llama2-7b": dict(_LLAMA2, **LLAMA2_SHAPES["7b"]),
    "llama2-13b": dict(_LLAMA2, **LLAMA2_SHAPES["13b"]),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}
GPU_LENGTHS = [8192, 16384, 32768, 65536, 102400, 131072, 196608, 262144]
TINY_LENGTHS = [256, 512, 1024, 2048]
# S²-Attn (G = N/4), S²-Attn with the reach presets' variants (below) and dense causal SDPA
ATTENTIONS = ("s2attn", "s2attn-reach", "sdpa")
DEFAULT_ATTENTIONS = ("s2attn", "sdpa")
# s2attn-reach: launch/presets/llama2-7b-32k-reach.yaml's variants outside its dense phase, 4 sinks and 1 of every
# 16 heads dense (2 of LLaMA-2-7B's 32; at least 1). The phase's steps are dense SDPA's, so that preset's mean step
# is 0.75 of an s2attn-reach step + 0.25 of a dense one.
REACH_SINK_TOKENS = 4
TRAININGS = ("lora", "full")  # LoRA + trainable embed/norm, or full fine-tuning
LABELS = {
    "s2attn": "S²-Attn",
    "s2attn-reach": "S²-Attn + sinks, dense heads",
    "sdpa": "dense",
    "lora": "LoRA+embed/norm",
    "full": "full FT",
}
# Dense bf16 tensor-core peak in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# --budget-s: no configuration starts with less time left than this (or than the slowest one so far took).
MIN_START_S = 30.0


@dataclass(frozen=True)
class Configuration:
    shape: str
    seq_len: int
    attention: str
    training: str
    preset: str
    ds_config: str | None
    warmup: int
    steps: int
    memory_limit_gib: float | None = None
    """Cap on this process's GPU memory (None: the whole device)."""


class BudgetSpent(Exception):
    """The sweep's --budget-s ran out before a configuration could start or finish."""


# ----------------------------------------------------------------------------------------------------------------
# FLOP counting (the rule in the module docstring)
# ----------------------------------------------------------------------------------------------------------------


def training_flops(
    *,
    batch: int,
    seq_len: int,
    linear_params: int,
    layer_linear_params: int,
    trainable_linear_params: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    group_size: int | None,
    checkpointing: bool,
    dense_heads: int = 0,
    sink_tokens: int = 0,
) -> dict[str, float]:
    """FLOPs of one training step by component; group_size None means dense causal attention. With S²-Attn's
    variants, each of the last dense_heads heads attends densely and the others also read sink_tokens sinks."""
    tokens = batch * seq_len
    dense_entries = seq_len * seq_len / 2  # per head
    if group_size is None:
        score_entries = dense_entries * num_heads
    else:
        grouped_entries = seq_len * group_size / 2 + seq_len * sink_tokens
        score_entries = grouped_entries * (num_heads - dense_heads) + dense_entries * dense_heads
    attention_forward = 2 * 2 * head_dim * score_entries * num_layers * batch  # QKᵀ and PV
    flops = {
        "linear_forward": 2 * linear_params * tokens,
        "linear_input_grad": 2 * linear_params * tokens,
        "linear_weight_grad": 2 * trainable_linear_params * tokens,
        "recompute": (2 * layer_linear_params * tokens + attention_forward) if checkpointing else 0,
        "attention_forward": attention_forward,
        "attention_backward": 2 * attention_forward,
    }
    flops["total"] = sum(flops.values())
    return flops


def linear_parameter_counts(model) -> tuple[int, int, int]:
    """(all, in decoder layers, trainable) weights of the model's nn.Linear modules, LoRA adapters included."""
    from torch import nn

    output_head = model.get_output_embeddings()
    total = layers = trainable = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        n = module.weight.numel()
        total += n
        layers += 0 if module is output_head else n
        trainable += n if module.weight.requires_grad else 0
    return total, layers, trainable


def peak_tflops_of(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device_name), None)


# ----------------------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# ----------------------------------------------------------------------------------------------------------------


def reach_dense_heads(shape: str) -> int:
    return max(1, SHAPES[shape]["num_attention_heads"] // 16)


def run_config(config: Configuration):
    """The preset's RunConfig with the model replaced by the shape and the measured switches applied."""
    from longctx.config import RunConfig, load_config

    shape = SHAPES[config.shape]
    reach = config.attention == "s2attn-reach"
    overrides = [
        "model.path=",
        f"model.init={json.dumps(shape)}",
        f"train.seq_len={config.seq_len}",
        "train.micro_batch_size=1",
        "train.gradient_accumulation_steps=1",
        "train.global_batch_size=1",
        f"attention.implementation={'s2attn' if reach else config.attention}",
        f"attention.sink_tokens={REACH_SINK_TOKENS if reach else 0}",
        f"attention.dense_heads={reach_dense_heads(config.shape) if reach else 0}",
        "attention.dense_phase=0",  # a step is one step: the phase's steps are dense SDPA's row
        "attention.group_size=0",  # G = N/4 at every N
        f"rope.original_context={shape['max_position_embeddings']}",
        "rope.factor=0",  # interpolate by N / the shape's context
        f"lora.enabled={config.training == 'lora'}",
    ]
    if config.ds_config:
        overrides.append(f"deepspeed.config={config.ds_config}")
    return load_config(RunConfig, config.preset, overrides)


def build_random_model(cfg, device):
    """build_model on the meta device, then materialized on `device` with fresh random weights."""
    import torch
    from torch import nn

    from longctx.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            elif type(module).__name__.endswith("RotaryEmbedding"):
                # inv_freq is a computed buffer, garbage after to_empty: take it from a fresh module.
                fresh = type(module)(module.config)
                for name, buffer in fresh.named_buffers(recurse=False):
                    getattr(module, name).copy_(buffer)
    return model


def measure(config: Configuration) -> dict:
    """Warm-up then timed training steps of one configuration; returns its result row."""
    import deepspeed
    import torch

    from longctx.distributed import init_distributed
    from longctx.ds_config import resolve_deepspeed_config
    from longctx.trainer import token_loss_sum

    cfg = run_config(config)
    init_distributed()
    ds_config = resolve_deepspeed_config(cfg, world_size=1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda and config.memory_limit_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.memory_limit_gib * 2**30 / total), device)
    model = build_random_model(cfg, device)
    linear_params, layer_linear_params, trainable_linear_params = linear_parameter_counts(model)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:  # as the trainer: torch AdamW unless the JSON names an optimizer
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=ds_config)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, cfg.train.seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "labels": input_ids}
    label_tokens = cfg.train.seq_len - 1

    def step() -> None:
        loss_sum = token_loss_sum(engine, batch, cfg.memory)
        engine.backward(loss_sum / label_tokens)
        engine.step()

    engine.train()
    for _ in range(config.warmup):
        step()
    times = []
    for _ in range(config.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()  # host-device sync: the step's kernels must finish inside the timing
        times.append(time.perf_counter() - start)

    hf_config = model.config
    group_size = cfg.group_size if config.attention != "sdpa" else None
    flops = training_flops(
        batch=1,
        seq_len=cfg.train.seq_len,
        linear_params=linear_params,
        layer_linear_params=layer_linear_params,
        trainable_linear_params=trainable_linear_params,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        head_dim=hf_config.hidden_size // hf_config.num_attention_heads,
        group_size=group_size,
        checkpointing=cfg.model.activation_checkpointing,
        dense_heads=cfg.attention.dense_heads,
        sink_tokens=cfg.attention.sink_tokens,
    )
    step_s = statistics.median(times) if times else None
    return {
        "seq_len": cfg.train.seq_len,
        "attention": config.attention,
        "group_size": group_size,
        "training": config.training,
        "status": "ok",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "activation_checkpointing": cfg.model.activation_checkpointing,
        "tiled_mlp": cfg.memory.tiled_mlp,
        "tiled_loss": cfg.memory.tiled_loss,
        "memory_limit_gib": config.memory_limit_gib,
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "linear_params": linear_params,
        "trainable_linear_params": trainable_linear_params,
        "flops_per_step": flops["total"],
        "flops": flops,
        "steps_timed": len(times),
        "step_s": step_s,
        "step_s_min": min(times) if times else None,
        "tokens_per_s": cfg.train.seq_len / step_s if step_s else None,
        "achieved_tflops": flops["total"] / step_s / 1e12 if step_s else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # ru_maxrss is KiB
    }


def measure_in_fresh_process(config: Configuration, timeout_s: float | None = None) -> dict:
    """measure() in a child process; a CUDA out-of-memory there comes back as status "oom", a child still running
    after timeout_s is killed and comes back as status "timeout"."""
    command = [sys.executable, __file__, "--child", json.dumps(config.__dict__)]
    base = {"seq_len": config.seq_len, "attention": config.attention, "training": config.training}
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return base | {"status": "timeout", "error": f"stopped after {timeout_s:.0f} s: the sweep's budget ran out"}
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return base | {"status": "failed", "error": tail[:500]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(spec: str) -> None:
    import torch

    config = Configuration(**json.loads(spec))
    try:
        row = measure(config)
    except torch.OutOfMemoryError:
        row = {"seq_len": config.seq_len, "attention": config.attention, "training": config.training, "status": "oom"}
    print(json.dumps(row), flush=True)
    os._exit(0)  # skip DeepSpeed's and the process group's slow teardown: the row is printed


# ----------------------------------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------------------------------


def longest_fitting(
    fits: Callable[[int], bool], *, known_fit: int, known_fail: int | None, granularity: int, limit: int
) -> tuple[int, list[tuple[int, bool]]]:
    """The longest multiple of granularity (<= limit) for which fits() holds, assuming fitting is monotone.

    known_fit: a length known to fit (0: none); known_fail: one known not to fit (None: unknown, the search
    doubles from known_fit up to limit first). Returns (longest, probes as (length, fitted) in probe order).
    """
    probes: list[tuple[int, bool]] = []

    def probe(n: int) -> bool:
        fitted = fits(n)
        probes.append((n, fitted))
        return fitted

    low, high = known_fit, known_fail
    while high is None:
        candidate = min(limit, max(granularity, 2 * low))
        if candidate <= low:
            return low, probes  # limit reached and fits
        if probe(candidate):
            low = candidate
        else:
            high = candidate
    high = min(high, limit + granularity)
    while high - low > granularity:
        middle = (low + high) // 2 // granularity * granularity
        if middle <= low:
            middle = low + granularity
        if probe(middle):
            low = middle
        else:
            high = middle
    return low, probes


class Budget:
    """Runs configurations within --budget-s (None: no limit), recording the ones it cannot run (module docstring)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.slowest_s = 0.0

    def run(self, config: Configuration) -> dict:
        start = time.monotonic()
        timeout_s = None if self.deadline is None else self.deadline - start
        if timeout_s is not None and timeout_s < max(MIN_START_S, self.slowest_s):
            return {
                "seq_len": config.seq_len,
                "attention": config.attention,
                "training": config.training,
                "status": "skipped",
                "error": f"not started: {max(timeout_s, 0):.0f} s of the sweep's budget left",
            }
        row = measure_in_fresh_process(config, timeout_s)
        row["wall_s"] = time.monotonic() - start  # process start, model build and engine set-up included
        self.slowest_s = max(self.slowest_s, row["wall_s"])
        return row


def sweep(args) -> dict:
    from _env import environment

    rows: list[dict] = []
    failed_from: dict[tuple[str, str], int] = {}  # (attention, training) -> first length that did not fit
    lengths = args.lengths or (TINY_LENGTHS if args.shape == "tiny" else GPU_LENGTHS)
    budget = Budget(args.budget_s)

    def configuration(seq_len: int, attention: str, training: str, warmup: int, steps: int) -> Configuration:
        return Configuration(
            args.shape, seq_len, attention, training, str(args.preset), args.ds_config, warmup, steps,
            args.memory_limit_gib,
        )  # fmt: skip

    for seq_len in lengths:
        for attention in args.attentions:
            for training in args.trainings:
                if failed_from.get((attention, training), seq_len + 1) < seq_len:
                    continue  # a shorter sequence did not fit already
                row = budget.run(configuration(seq_len, attention, training, args.warmup, args.steps))
                rows.append(row)
                print(summary_line(row), flush=True)
                if row["status"] in ("oom", "failed"):
                    failed_from[(attention, training)] = seq_len

    bisection = None
    if args.bisect_limit:
        bisection = bisect_longest(args, rows, failed_from, budget, configuration)
    env = environment()
    preset = Path(args.preset).resolve()
    peak = args.peak_tflops or peak_tflops_of(env["device_name"] if env["device"] == "cuda" else "")
    add_mfu(rows, peak)
    cfg = run_config(configuration(lengths[0], "s2attn", "lora", 0, 0))
    return {
        "benchmark": "training step: tokens/s, MFU and memory; S²-Attn vs dense, LoRA+embed/norm vs full FT",
        "label": f"{env['device'].upper()}, {args.shape} shape"
        + (" (not a GPU figure)" if env["device"] == "cpu" else ""),
        **env,
        "shape": args.shape,
        "shape_config": SHAPES[args.shape],
        "preset": str(preset.relative_to(REPO)) if preset.is_relative_to(REPO) else str(preset),
        "deepspeed_config": cfg.deepspeed.config,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "peak_tflops": peak,
        "flop_counting": __doc__.split("FLOP counting")[1].split("Memory:")[0].strip(),
        "rows": rows,
        "bisection": bisection,
    }


def bisect_longest(args, rows: list[dict], failed_from: dict, budget: Budget, configuration) -> dict:
    """The longest context for the preset's own setup: S²-Attn with LoRA + embed/norm; one step per probe."""
    probed: dict[int, dict] = {}  # seq_len -> its row, in probe order

    def fits(seq_len: int) -> bool:
        row = budget.run(configuration(seq_len, "s2attn", "lora", 0, 1))
        print(f"bisection probe N={seq_len}: {row['status']}", flush=True)
        if row["status"] in ("skipped", "timeout"):
            raise BudgetSpent(row["error"])
        probed[seq_len] = row
        return row["status"] == "ok"

    fitted = [r["seq_len"] for r in rows if (r["attention"], r["training"], r["status"]) == ("s2attn", "lora", "ok")]
    known_fit = max(fitted, default=0)
    cut_reason = None
    try:
        longest, probes = longest_fitting(
            fits,
            known_fit=known_fit,
            known_fail=failed_from.get(("s2attn", "lora")),
            granularity=args.granularity,
            limit=args.bisect_limit,
        )
    except BudgetSpent as spent:  # the longest length that fitted so far is a lower bound
        cut_reason = str(spent)
        probes = [(n, row["status"] == "ok") for n, row in probed.items()]
        longest = max([known_fit] + [n for n, fitted in probes if fitted])
    return {
        "configuration": "s2attn + lora",
        "granularity": args.granularity,
        "limit": args.bisect_limit,
        "longest_fitting_seq_len": longest,
        "reached_limit": longest >= args.bisect_limit - args.granularity + 1,
        "cut_by_budget": cut_reason is not None,
        "cut_reason": cut_reason,
        "probes": [
            {
                "seq_len": n,
                "fits": f,
                "status": probed[n]["status"],
                "peak_gpu_memory_gib": probed[n].get("peak_gpu_memory_gib"),
                "error": probed[n].get("error"),
            }
            for n, f in probes
        ],
    }


def plan(args) -> dict:
    """--dry-run: every configuration the sweep would run, its RunConfig built and checked as the child builds it,
    and the bisection's bounds; "problems" names each one that would fail (nothing is run, torch is not imported)."""
    from longctx.errors import UserError

    problems: list[str] = []

    def checked(seq_len: int, attention: str, training: str, warmup: int, steps: int) -> dict:
        config = Configuration(
            args.shape, seq_len, attention, training, str(args.preset), args.ds_config, warmup, steps,
            args.memory_limit_gib,
        )  # fmt: skip
        where = f"N={seq_len} {attention} {training}"
        try:
            cfg = run_config(config)
        except UserError as e:
            problems.append(f"{where}: {e}")
            return config.__dict__
        group_size = cfg.group_size if attention != "sdpa" else None  # checked against N by the config itself
        return config.__dict__ | {"group_size": group_size, "deepspeed_config": cfg.deepspeed.config}

    lengths = args.lengths or (TINY_LENGTHS if args.shape == "tiny" else GPU_LENGTHS)
    configurations = [
        checked(n, attention, training, args.warmup, args.steps)
        for n in lengths
        for attention in args.attentions
        for training in args.trainings
    ]
    bisection = None
    if args.bisect_limit:
        if args.bisect_limit < args.granularity:
            problems.append(f"--bisect-limit {args.bisect_limit} is below --granularity {args.granularity}")
        # Every probe is a multiple of the granularity: the smallest and the largest stand for the others.
        probes = [checked(n, "s2attn", "lora", 0, 1) for n in (args.granularity, args.bisect_limit)]
        bisection = {"limit": args.bisect_limit, "granularity": args.granularity, "probe_bounds": probes}
    return {
        "dry_run": True,
        "shape": args.shape,
        "preset": str(args.preset),
        "budget_s": args.budget_s,
        "configurations": configurations,
        "bisection": bisection,
        "problems": problems,
    }


def add_mfu(rows: list[dict], peak_tflops: float | None) -> None:
    for row in rows:
        achieved = row.get("achieved_tflops")
        row["mfu"] = achieved / peak_tflops if achieved is not None and peak_tflops else None


def summary_line(row: dict) -> str:
    head = f"N={row['seq_len']:>7} {row['attention']:>6} {row['training']:>4}"
    if row["status"] != "ok":
        return f"{head}  {row['status']} {row.get('error', '')}"
    memory = row["peak_gpu_memory_gib"] if row["peak_gpu_memory_gib"] is not None else row["host_peak_rss_gib"]
    return (
        f"{head}  {row['step_s']:.3f} s/step  {row['tokens_per_s']:>10.1f} tok/s  "
        f"{row['achieved_tflops']:.4f} TFLOP/s  {memory:.2f} GiB"
    )


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_gpu = report["device"] == "cuda"
    memory_key = "peak_gpu_memory_gib" if on_gpu else "host_peak_rss_gib"
    fig, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for attention in ATTENTIONS:
        for training in TRAININGS:
            ok = [
                r for r in report["rows"] if (r["attention"], r["training"], r["status"]) == (attention, training, "ok")
            ]
            if not ok:
                continue
            label = f"{LABELS[attention]}, {LABELS[training]}"
            lengths = [r["seq_len"] for r in ok]
            speed_axis.plot(lengths, [r["tokens_per_s"] for r in ok], marker="o", label=label)
            memory_axis.plot(lengths, [r[memory_key] for r in ok], marker="o", label=label)
    for axis, ylabel in (
        (speed_axis, "tokens/s"),
        (memory_axis, "peak GPU memory (GiB)" if on_gpu else "host peak RSS (GiB)"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length N")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"training step, {report['label']}: {report['device_name']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument(
        "--preset", type=Path, default=DEFAULT_PRESET, help="training setup (LoRA, checkpointing, ZeRO)"
    )
    parser.add_argument("--ds-config", help="DeepSpeed JSON instead of the preset's (e.g. ds_configs/stage2.json)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU (default: from the device name)")
    parser.add_argument("--sweep", action="store_true", help="all lengths × attention × training, then bisection")
    parser.add_argument("--lengths", type=int, nargs="+", help="sweep lengths (default per shape)")
    parser.add_argument("--bisect-limit", type=int, default=None, help="longest N the bisection tries (0: none)")
    parser.add_argument("--granularity", type=int, help="bisection step in tokens (default 8192, tiny: 256)")
    parser.add_argument("--seq-len", type=int, help="one configuration: sequence length")
    parser.add_argument("--attention", choices=ATTENTIONS, default="s2attn")
    parser.add_argument("--training", choices=TRAININGS, default="lora")
    parser.add_argument("--out", type=Path, help="JSON path (default results/train_step_<device>_<shape>.json)")
    parser.add_argument(
        "--attentions", nargs="+", choices=ATTENTIONS, default=list(DEFAULT_ATTENTIONS), help="sweep these"
    )
    parser.add_argument("--trainings", nargs="+", choices=TRAININGS, default=list(TRAININGS), help="sweep only these")
    parser.add_argument("--budget-s", type=float, help="sweep: wall-clock budget in seconds (see the docstring)")
    parser.add_argument("--memory-limit-gib", type=float, help="cap each configuration's GPU memory (e.g. 79.6)")
    parser.add_argument("--dry-run", action="store_true", help="sweep: check and print the plan, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
    tiny = args.shape == "tiny"
    args.granularity = args.granularity or (256 if tiny else 8192)
    if args.bisect_limit is None:
        args.bisect_limit = 4096 if tiny else 524288
    if args.sweep and args.dry_run:
        report = plan(args)
        print(json.dumps(report, indent=2))
        if args.out:
            write_json(report, args.out)
        sys.exit("\n".join(["train_step plan problems:", *report["problems"]]) if report["problems"] else 0)
    if args.sweep:
        report = sweep(args)
        out = args.out or RESULTS / f"train_step_{report['device']}_{args.shape}.json"
        write_json(report, out)
        write_plot(report, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return
    if not args.seq_len:
        parser.error("give --seq-len for one configuration, or --sweep")
    config = Configuration(
        args.shape,
        args.seq_len,
        args.attention,
        args.training,
        str(args.preset),
        args.ds_config,
        args.warmup,
        args.steps,
        args.memory_limit_gib,
    )
    row = measure_in_fresh_process(config)
    import torch

    add_mfu(
        [row], args.peak_tflops or (peak_tflops_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    )
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
