"""RULER-style tasks on a real model, on this machine's CPU: SmolLM2-135M-Instruct (native context 8192, chat template)
at 1k, 2k, 4k, 8k and 16k tokens, the last twice its context.

    .venv/bin/python benchmarks/ruler_real_model.py [--out benchmarks/results/ruler_real_model.json]

A 16k-token prompt takes minutes of this 135M model's forward on 2 cores, so the suite is cut by task rather than by
length (PARTS below): needle retrieval in real text (needle at the start, middle and end of the haystack) and variable
tracking at every length; multi-key retrieval, common and frequent words up to 8k. One sample per cell: read a cell as
pass / fail, and a row as where the model stops finding things. Prompts are the same on every run (seed 0). Torch
runs on one thread: on 2 cores shared with other work a 1k-token forward took 6.6 s on one thread against 15.3 s on
two. The recorded run took 90 minutes, on 2 cores shared with two other engineers' jobs (load ~4): the 16k prompts
alone took 6 to 16 minutes each; the per-answer seconds are in the results.
The text haystack is the Python standard library's top-level modules (the default `--haystack-text`).
Writes the scores, every answer, the device, versions and seconds to --out. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _env import environment  # noqa: E402
from real_model import real_model_dir  # noqa: E402

from longctx.ruler import RulerArgs, evaluate_ruler  # noqa: E402

LENGTHS = [1024, 2048, 4096, 8192, 16384]
SEED = 0
# (tasks, lengths, depths): each part one `eval ruler` run, one sample per (task, length, depth).
PARTS = [
    (["niah_single_2"], LENGTHS, [0.0, 0.5, 1.0]),
    (["vt"], LENGTHS, [0.0]),
    (["niah_multikey_1"], LENGTHS[:4], [0.5]),
    (["cwe", "fwe"], LENGTHS[:4], [0.5]),
]
THREADS = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ruler_real_model.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    model_dir = real_model_dir()
    started = time.perf_counter()
    tasks: dict[str, dict] = {}
    answers: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ruler-") as tmp:
        for index, (names, lengths, depths) in enumerate(PARTS):
            part_started = time.perf_counter()
            run = RulerArgs(
                models={"smollm2-135m-instruct": str(model_dir)},
                lengths=lengths,
                out=Path(tmp) / str(index),
                tasks=names,
                depths=depths,
                samples=1,
                seed=SEED,
            )
            report = evaluate_ruler(run)
            result = report["models"]["smollm2-135m-instruct"]
            for name, task_result in result["tasks"].items():
                tasks[name] = {"lengths": lengths, **task_result}
            answers += result["answers"]
            print(f"part {index} ({', '.join(names)}): {time.perf_counter() - part_started:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    table = format_table(tasks)
    print(table)
    result = {
        "model": "SmolLM2-135M-Instruct (tools/real_model.py), native context 8192, chat template applied",
        "environment": environment(),
        "seed": SEED,
        "torch_threads": THREADS,
        "samples_per_cell": 1,
        "parts": [{"tasks": t, "lengths": n, "depths": d} for t, n, d in PARTS],
        "haystack_text": report["haystack_text"],
        "seconds": round(seconds, 1),
        "tasks": tasks,
        "table": table,
        "answers": answers,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{seconds / 60:.1f} min; wrote {args.out}")


def format_table(tasks: dict[str, dict]) -> str:
    """A row per task and depth, lengths as columns: score in percent; '–' where not run."""
    lines = [
        "| task | depth | " + " | ".join(f"{n // 1024}k" for n in LENGTHS) + " |",
        "|---" * (len(LENGTHS) + 2) + "|",
    ]
    for name, result in tasks.items():
        for depth, scores in zip(result["depths"], result["score"]):
            by_length = dict(zip(result["lengths"], scores))
            cells = [f"{by_length[n]:.0f}" if n in by_length else "–" for n in LENGTHS]
            lines.append(f"| {name} | {'–' if depth is None else depth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
