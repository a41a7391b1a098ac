"""How close is `longctx plan` to measured memory? CPU training steps of small LLaMA shapes, plan's estimate beside.

    .venv/bin/python benchmarks/plan_calibration.py            # -> results/plan_calibration.json
    .venv/bin/python benchmarks/plan_calibration.py --quick    # two configurations, for a smoke test

Each configuration (shape × seq_len × LoRA+embed/norm or full FT × ZeRO-2/3, plus the small shape with tiled
MLP and tiled loss) runs in a fresh process: one rank on
gloo, fp32 (what `model.dtype=auto` means on CPU), S²-Attn with G = N/4, activation checkpointing, built and
trained as `longctx.trainer` does (build_model, deepspeed.initialize with torch AdamW, token_loss_sum, backward,
step). One warm-up step creates the optimizer state, then one step is measured.

How memory is measured: the PyTorch profiler with profile_memory=True is on from before the model is built to the
end. The CPU allocator then reports every allocation and free with its running total of live tensor bytes
("Total Allocated" in the trace), so the peak is the exact peak of live tensor bytes, not a resident-set guess.
  * measured peak: the largest running total during the measured step;
  * measured static: the running total just before the measured step (weights, optimizer state, ZeRO buffers);
  * exact parts, from tensor sizes: parameter bytes (ZeRO-3: the partitions) and optimizer bytes (the fp32 master
    partitions + Adam moments held by the inner torch optimizer);
  * activation bytes per token: (peak at the longer N - peak at the shorter N) / (difference in tokens), which
    cancels everything that does not grow with N; plan's estimate of the same slope comes from its own numbers
    (meaningful when both lengths peak in the same phase, the logits or the layers' backward);
  * the shipped ds_configs' ZeRO buckets (sized for GPUs: 2 x 5e8 elements under ZeRO-2) are allocated at exactly
    their configured size and dwarf these small models, so the error is also given without them.
plan is asked for the same run on a 1-GPU "cluster" with 4-byte weights, and its reserve (CUDA context, a GPU
constant) is left out of the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longctx.config import RunConfig, load_config

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
SENTINEL_BYTES = 12347  # an allocation of this size marks the start of the measured step in the trace

SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=256,
                 tie_word_embeddings=False),
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8192, max_position_embeddings=256,
                  tie_word_embeddings=False),
}  # fmt: skip
LENGTHS = (1024, 4096)
TRAININGS = ("lora", "full")
ZERO = {"2": "ds_configs/stage2.json", "3": "ds_configs/stage3.json"}
LOSS_CHUNK = 512


def run_config(shape: str, seq_len: int, training: str, zero: str, memory: str):
    overrides = [
        f"model.init={json.dumps(SHAPES[shape])}",
        "model.dtype=float32",
        "model.activation_checkpointing=true",
        f"train.seq_len={seq_len}",
        "train.micro_batch_size=1",
        "train.gradient_accumulation_steps=1",
        "train.global_batch_size=1",
        "attention.implementation=s2attn",
        "attention.group_size=0",
        "rope.original_context=256",
        f"lora.enabled={training == 'lora'}",
        f"deepspeed.config={ZERO[zero]}",
    ]
    if memory == "tiled":  # longctx.tiling: tiled MLP (tiles of ~hidden tokens) and the loss in chunks
        overrides += ["memory.tiled_mlp=true", "memory.tiled_loss=true", f"memory.loss_chunk_tokens={LOSS_CHUNK}"]
    return load_config(RunConfig, None, overrides)


def measure(shape: str, seq_len: int, training: str, zero: str, memory: str) -> dict:
    """One configuration, in this process: the measured memory and plan's estimate side by side."""
    import deepspeed
    import torch
    from torch.profiler import ProfilerActivity, profile

    from longctx.distributed import init_distributed
    from longctx.ds_config import resolve_deepspeed_config
    from longctx.model import build_model
    from longctx.plan import Cluster, Strategy, estimate, model_shape, zero_settings
    from longctx.trainer import token_loss_sum

    cfg = run_config(shape, seq_len, training, zero, memory)
    init_distributed()
    ds_config = resolve_deepspeed_config(cfg, world_size=1)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, seq_len), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=ds_config)
        engine.train()
        for step in range(2):
            if step == 1:
                torch.empty(SENTINEL_BYTES, dtype=torch.uint8)  # allocated and freed: marks the measured step
            loss_sum = token_loss_sum(engine, batch, cfg.memory)
            engine.backward(loss_sum / (seq_len - 1))
            engine.step()
            del loss_sum
        parameter_bytes = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
        optimizer_bytes = _optimizer_bytes(engine.optimizer, model)
    static, peak = _static_and_peak(prof)

    plan_cluster = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=1e6, host_memory_gib=1e6)
    planned = estimate(cfg, model_shape(cfg), plan_cluster, Strategy(zero, 1), zero_settings(ds_config), param_bytes=4)
    gpu = planned.gpu
    plan_peak = planned.gpu_total - gpu["reserve"]
    return {
        "shape": shape,
        "seq_len": seq_len,
        "training": training,
        "zero": zero,
        "memory": memory,
        "measured_peak_bytes": peak,
        "measured_static_bytes": static,
        "measured_parameter_bytes": parameter_bytes,
        "measured_optimizer_bytes": optimizer_bytes,
        "plan_peak_bytes": plan_peak,
        "plan_parts_bytes": {k: v for k, v in gpu.items() if k != "reserve"},
        "plan_optimizer_bytes": gpu["optimizer"],
        "peak_error": plan_peak / peak - 1,
        # The shipped ds_configs' buckets (sized for GPUs) are allocated at exactly their configured size and
        # dwarf a small CPU model: the error of everything else is the informative figure.
        "peak_error_without_buckets": (plan_peak - gpu["ZeRO buckets"]) / (peak - gpu["ZeRO buckets"]) - 1,
    }


PROBE_SHAPES = [(256, 704, 8, 4), (256, 2048, 8, 4), (512, 704, 8, 8)]  # hidden, intermediate, heads, kv heads


def layer_probe() -> list[dict]:
    """One decoder layer (LoRA on q/k/v/o, S²-Attn, fp32) forward + backward at two lengths, plain and tiled MLP.

    The growth of the peak per token is the layer working set per token that plan's layer_working_set states; its
    input (a checkpoint in the full model) is allocated before the measurement and not counted.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from longctx.model import build_model
    from longctx.plan import layer_working_set, model_shape

    def peak(cfg, n: int) -> int:
        model = build_model(cfg)
        decoder = model.base_model.model.model  # peft → LlamaForCausalLM → LlamaModel
        layer = decoder.layers[0]
        x = torch.randn(1, n, cfg.model.init["hidden_size"], requires_grad=True)
        position_ids = torch.arange(n)[None]
        with torch.no_grad():
            position_embeddings = decoder.rotary_emb(x, position_ids)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = layer(x, position_embeddings=position_embeddings, position_ids=position_ids, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
        return max(a["Total Allocated"] for a in _memory_events(prof))

    rows = []
    for hidden, intermediate, heads, kv_heads in PROBE_SHAPES:
        for tiled in (False, True) if intermediate == 704 and hidden == 256 else (False,):
            init = dict(SHAPES["small"], hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                        num_attention_heads=heads, num_key_value_heads=kv_heads)  # fmt: skip
            lengths = (1024, 4096)
            peaks, planned = [], []
            for n in lengths:
                overrides = [f"model.init={json.dumps(init)}", "model.dtype=float32", f"train.seq_len={n}",
                             "model.activation_checkpointing=false", "rope.original_context=256",
                             f"memory.tiled_mlp={str(tiled).lower()}"]  # fmt: skip
                cfg = load_config(RunConfig, None, overrides)
                peaks.append(peak(cfg, n))
                planned.append(layer_working_set(model_shape(cfg), cfg, n, 1, 4))
            tokens = lengths[1] - lengths[0]
            measured = (peaks[1] - peaks[0]) / tokens
            plan = (planned[1] - planned[0]) / tokens
            rows.append({"hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
                         "tiled_mlp": tiled, "measured_bytes_per_token": measured, "plan_bytes_per_token": plan,
                         "error": plan / measured - 1})  # fmt: skip
    return rows


def _optimizer_bytes(zero_optimizer, model) -> int:
    """Bytes of the fp32 master partitions and the Adam moments, not counting storage shared with the weights."""
    import torch

    def storage(t) -> int:
        return t.untyped_storage().data_ptr()

    weights = {storage(getattr(p, "ds_tensor", p)) for p in model.parameters()}
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if masters is None:
        masters = zero_optimizer.single_partition_of_fp32_groups  # ZeRO-2
    states = [t for s in zero_optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    unique = {storage(t): t for t in [*masters, *states] if t.numel() > 1 and storage(t) not in weights}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _static_and_peak(prof) -> tuple[float, float]:
    """Running total of live CPU tensor bytes just before the measured step, and its maximum during that step."""
    memory = _memory_events(prof)
    start = next(i for i, a in enumerate(memory) if a["Bytes"] == SENTINEL_BYTES)
    static = memory[start]["Total Allocated"] - SENTINEL_BYTES
    peak = max(a["Total Allocated"] for a in memory[start + 2 :])
    return static, peak


def _memory_events(prof) -> list[dict]:
    """The CPU allocator's [memory] events of a profile, in order (Bytes, Total Allocated, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]


def measure_in_fresh_process(*configuration) -> dict:
    spec = json.dumps(configuration)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, cwd=REPO, env=env
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{spec} failed: {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def activation_slopes(rows: list[dict]) -> list[dict]:
    """Bytes per token that grow with N, measured and planned, from the shortest and longest N of each setup."""
    slopes = []

    def setup_of(row: dict) -> tuple:
        return row["shape"], row["training"], row["zero"], row["memory"]

    for setup in sorted({setup_of(r) for r in rows}):
        same = sorted((r for r in rows if setup_of(r) == setup), key=lambda r: r["seq_len"])
        if len(same) < 2:
            continue
        short, long = same[0], same[-1]
        tokens = long["seq_len"] - short["seq_len"]
        measured = (long["measured_peak_bytes"] - short["measured_peak_bytes"]) / tokens
        planned = (long["plan_peak_bytes"] - short["plan_peak_bytes"]) / tokens
        slopes.append(
            {
                "shape": setup[0],
                "training": setup[1],
                "zero": setup[2],
                "memory": setup[3],
                "measured_bytes_per_token": measured,
                "plan_bytes_per_token": planned,
                "error": planned / measured - 1,
            }
        )
    return slopes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, LoRA, ZeRO-3, two lengths")
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_calibration.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        row = layer_probe() if spec == ["layer_probe"] else measure(*spec)
        print(json.dumps(row), flush=True)
        os._exit(0)  # skip DeepSpeed's and the process group's slow teardown
    sys.path.insert(0, str(Path(__file__).parent))
    from _env import environment

    if args.quick:
        grid = [("tiny", n, "lora", "3", "plain") for n in (256, 1024)]
    else:
        grid = [(s, n, t, z, "plain") for s in SHAPES for t in TRAININGS for z in ZERO for n in LENGTHS]
        grid += [("small", n, "lora", z, "tiled") for z in ZERO for n in LENGTHS]
    rows, started = [], time.time()
    for configuration in grid:
        row = measure_in_fresh_process(*configuration)
        rows.append(row)
        print(
            f"{row['shape']:>5} N={row['seq_len']:>5} {row['training']:>4} ZeRO-{row['zero']} {row['memory']:>5}: "
            f"measured "
            f"{row['measured_peak_bytes'] / 2**20:8.1f} MiB, plan {row['plan_peak_bytes'] / 2**20:8.1f} MiB "
            f"({row['peak_error']:+.1%})",
            flush=True,
        )
    probes = [] if args.quick else measure_in_fresh_process("layer_probe")
    for probe in probes:
        print(f"layer probe {probe}", flush=True)
    slopes = activation_slopes(rows)
    errors = [abs(r["peak_error"]) for r in rows]
    errors_without_buckets = [r["peak_error_without_buckets"] for r in rows]
    report = {
        "benchmark": "longctx plan against measured CPU peaks (live tensor bytes from the allocator)",
        **environment(),
        "method": __doc__.split("How memory is measured:")[1].strip(),
        "shapes": {k: SHAPES[k] for k in sorted({r["shape"] for r in rows})},
        "rows": rows,
        "activation_slopes": slopes,
        "layer_probe": probes,
        "summary": {
            "configurations": len(rows),
            "peak_error_mean_abs": sum(errors) / len(errors),
            "peak_error_max_abs": max(errors),
            "peak_error_range": [min(r["peak_error"] for r in rows), max(r["peak_error"] for r in rows)],
            "peak_error_without_buckets_mean_abs": sum(map(abs, errors_without_buckets)) / len(rows),
            "peak_error_without_buckets_range": [min(errors_without_buckets), max(errors_without_buckets)],
            "activation_slope_error_range": [min(s["error"] for s in slopes), max(s["error"] for s in slopes)]
            if slopes
            else None,
            "optimizer_bytes_exact": all(r["measured_optimizer_bytes"] == r["plan_optimizer_bytes"] for r in rows),
            "wall_s": time.time() - started,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
