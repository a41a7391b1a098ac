"""Forward + backward time and peak memory of S²-Attn against dense causal SDPA on the same inputs.

    .venv/bin/python benchmarks/attention.py            # CPU: N = 2k..32k, small heads -> results/attention_cpu.json
    .venv/bin/python benchmarks/attention.py --device cuda   # GPU: LLaMA-2-7B heads, bf16, N = 8k..128k

G = N / 4 (LongLoRA's ratio). Methods: `dense` (SDPA is_causal), `s2` (S²-Attn, plain positions: the training case
without document isolation) and `s2_packed` (S²-Attn with packed documents isolated: position ids restarting at each
document, segment ids derived from them; the keyed path). Peak memory on CPU is the growth of the process' peak RSS
(VmHWM, reset just before) during one forward + backward in a fresh process per method (CPU torch has no allocator
statistics); on CUDA it is torch.cuda.max_memory_allocated above the inputs. Times are the minimum (and median) over
rounds that run the three methods one after the other on the same inputs.

CPU runs default to one thread: on a small shared machine, OpenMP barriers in every parallel memory op wait for
descheduled threads (a 4 MB copy measured 0.5 ms on one thread, 12 ms on two), which swamps what is measured.
Inputs are stored token-major and viewed as (B, H, N, D), the layout transformers hands to attention functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from longctx.attention import dense_attention, s2_attention, segment_ids_from_position_ids

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "s2", "s2_packed")
CPU_SHAPE = dict(batch=1, num_heads=8, num_kv_heads=8, head_dim=16, dtype="float32")
GPU_SHAPE = dict(batch=1, num_heads=32, num_kv_heads=32, head_dim=128, dtype="bfloat16")  # LLaMA-2-7B
CPU_LENGTHS = [2048, 4096, 8192, 16384, 32768]
GPU_LENGTHS = [8192, 16384, 32768, 65536, 131072]


def make_inputs(seq_len: int, shape: dict, device: str):
    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, shape["dtype"])

    def tensor(heads):  # stored token-major and viewed as (B, H, N, D), as transformers' attention modules do
        x = torch.randn(shape["batch"], seq_len, heads, shape["head_dim"], generator=generator)
        return x.to(device=device, dtype=dtype).transpose(1, 2).detach().requires_grad_()

    q, k, v = tensor(shape["num_heads"]), tensor(shape["num_kv_heads"]), tensor(shape["num_kv_heads"])
    # Packed documents of 1/16 .. 1/2 of N, restarting positions at each start.
    lengths, remaining, doc_generator = [], seq_len, torch.Generator().manual_seed(1)
    while remaining:
        length = min(remaining, int(torch.randint(seq_len // 16, seq_len // 2, (1,), generator=doc_generator)))
        lengths.append(length)
        remaining -= length
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].expand(shape["batch"], -1).to(device)
    return q, k, v, position_ids


def step_fn(method: str, seq_len: int, q, k, v, position_ids):
    group_size = seq_len // 4
    segment_ids = segment_ids_from_position_ids(position_ids)
    grad = torch.randn_like(q)

    def step():
        for x in (q, k, v):
            x.grad = None
        if method == "dense":
            out = dense_attention(q, k, v)
        elif method == "s2":
            out = s2_attention(q, k, v, group_size)
        else:
            out = s2_attention(q, k, v, group_size, position_ids=position_ids, segment_ids=segment_ids)
        out.backward(grad)

    return step


def peak_memory_mib(method: str, seq_len: int, shape: dict, device: str) -> float:
    """Peak extra memory of one forward + backward, in MiB, measured in this process."""
    q, k, v, position_ids = make_inputs(seq_len, shape, device)
    step = step_fn(method, seq_len, q, k, v, position_ids)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, dropping import-time peaks.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmHWM")
    step()
    return (_status_kib("VmHWM") - baseline) / 2**10


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_in_fresh_process(method: str, seq_len: int, args) -> float:
    """CPU peak RSS only grows, so each measurement gets its own process, in which every allocation above 128 KiB
    is its own mapping, returned on free (else glibc's rising mmap threshold keeps freed blocks resident, and the
    high-water mark depends on the order of allocations, not on the tensors alive)."""
    command = [sys.executable, __file__, "--device", "cpu", "--single", method, str(seq_len)]
    command += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


def time_methods(seq_len: int, shape: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """fwd+bwd seconds of every method, interleaved round by round so that load changes hit all of them alike."""
    q, k, v, position_ids = make_inputs(seq_len, shape, device)
    steps = {method: step_fn(method, seq_len, q, k, v, position_ids) for method in METHODS}
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for method, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()  # host-device sync: the step's kernels must finish inside the timing
            times[method].append(time.perf_counter() - start)
    return times


def main() -> None:
    from _env import git_commit  # benchmarks/ is on sys.path when a benchmark runs as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default per device)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up step per method")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see the module docstring)")
    parser.add_argument("--out", type=Path, help="JSON path (default results/attention_<device>.json)")
    parser.add_argument("--single", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE

    if args.single:  # child process of a CPU run: one memory measurement
        print(peak_memory_mib(args.single[0], int(args.single[1]), shape, "cpu"))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device")

    rows = []
    for seq_len in args.lengths or (GPU_LENGTHS if args.device == "cuda" else CPU_LENGTHS):
        row = {"seq_len": seq_len, "group_size": seq_len // 4}
        times = time_methods(seq_len, shape, args.device, args.repeats)
        for method in METHODS:
            if args.device == "cuda":
                torch.cuda.empty_cache()
                peak = peak_memory_mib(method, seq_len, shape, "cuda")
            else:
                peak = peak_memory_in_fresh_process(method, seq_len, args)
            # The minimum is what the code costs; the median shows how much other load on the machine added.
            row[f"{method}_ms"] = round(min(times[method]) * 1000, 2)
            row[f"{method}_median_ms"] = round(statistics.median(times[method]) * 1000, 2)
            row[f"{method}_peak_mib"] = round(peak, 1)
        for method in METHODS[1:]:
            row[f"{method}_time_ratio"] = round(row[f"{method}_ms"] / row["dense_ms"], 3)
        rows.append(row)
        print(
            f"N={seq_len:>6}  G={seq_len // 4:>5}  dense {row['dense_ms']:>9.1f} ms {row['dense_peak_mib']:>7.1f} MiB"
            f"  s2 {row['s2_ms']:>9.1f} ms {row['s2_peak_mib']:>7.1f} MiB  ratio {row['s2_time_ratio']:.3f}"
            f"  s2_packed {row['s2_packed_ms']:>9.1f} ms ratio {row['s2_packed_time_ratio']:.3f}",
            flush=True,
        )

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    report = {
        "benchmark": "attention fwd+bwd: S²-Attn (G = N/4) vs dense causal SDPA",
        "device": args.device,
        "device_name": device_name,
        "threads": args.threads if args.device == "cpu" else None,
        "cpu_count": os.cpu_count(),
        "shape": shape,
        "repeats": args.repeats,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git_commit": git_commit(),
        "memory": "peak RSS (VmHWM, reset before the step) growth in a fresh process"
        if args.device == "cpu"
        else "max_memory_allocated - inputs",
        "rows": rows,
    }
    out = args.out or RESULTS / f"attention_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
