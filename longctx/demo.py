"""`longctx demo`: the pipeline end to end on this machine's CPU, with no download.

1. data: a sentencepiece tokenizer trained on the Python standard library's sources, which are then packed into
   shards twice (256 and 2048 tokens per sequence; the same documents are held out in both);
2. base: a small LLaMA-architecture model pretrained from random weights at 256 tokens (2 processes);
3. extend: the LongLoRA stage through the `deepspeed` launcher on 2 processes: ZeRO-3, S²-Attn, LoRA + embeddings
   + norms, position interpolation 8× to 2048 tokens;
4. eval: perplexity of base and extended model at 1×, 2×, 4× and 8× the base context with dense attention, on the
   held-out split, scored two ways (see EVAL_PROTOCOLS): tables, `report.json`, `report_sliding.json` and
   `perplexity.png`; a RULER needle task at the same lengths (`eval/ruler/`) and short-context retention, perplexity at
   256 tokens on held-out sources and on English prose (`eval/retention/`);
5. export: the extended model as a standalone Hugging Face model in `export/`.

Each stage is skipped when its output is complete, and resumes when it was interrupted, so a rerun is cheap.
The base model's rope_theta is 1000 rather than LLaMA's 10000: with head dimension 32 and a 256-token context that
makes the slowest RoPE frequency turn through about the angle LLaMA-2's turns over its 4096 tokens (0.4 rad), so
the miniature extrapolates (and fails to) the way the real model does.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

DEMO_VOCAB_SIZE = 4096
DEMO_MAX_SENTENCES = 60_000  # lines sampled to train the tokenizer: plenty for 4096 pieces, and quick


def stdlib_inputs() -> list[str]:
    """The standard library's source tree, without site-packages (installed packages are not the stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(root.iterdir()) if p.name != "site-packages" and (p.is_dir() or p.suffix == ".py")]


def prepare_demo_data(
    out_dir: str | os.PathLike, *, seq_len: int = 4096, val_fraction: float = 0.05, progress: bool = True
) -> tuple[Path, Path, Path]:
    """Tokenizer + packed shards of the stdlib sources under out_dir; returns (tokenizer, train dir, val dir).

    Both steps are skipped when their output is already there (the pack step resumes if it was interrupted).
    """
    from data_prep.pack import pack
    from data_prep.sources import Skipped, iter_corpus
    from data_prep.tokenizer import train_sentencepiece
    from longctx.config import PrepConfig, from_dict

    out_dir = Path(out_dir)
    inputs = stdlib_inputs()
    tokenizer_path = out_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        docs = (
            item
            for _, item in iter_corpus(inputs, glob="**/*.py", text_field="text", strict=False)
            if not isinstance(item, Skipped)
        )
        train_sentencepiece(docs, DEMO_VOCAB_SIZE, tokenizer_path, max_sentences=DEMO_MAX_SENTENCES)
    config = from_dict(
        PrepConfig,
        {
            "inputs": inputs,
            "glob": "**/*.py",
            "tokenizer": str(tokenizer_path),
            "seq_len": seq_len,
            "out": str(out_dir / f"data-{seq_len}"),
            "val_fraction": val_fraction,
            "sequences_per_shard": 256,
        },
    )
    summary = pack(config, progress=progress)
    if progress:
        from data_prep.pack import format_summary

        state = "already packed" if summary["already_complete"] else "packed"
        print(f"demo data {state} in {config.out}:\n{format_summary(summary)}")
    data = out_dir / f"data-{seq_len}"
    return tokenizer_path, data / "train", data / "val"


BASE_CONTEXT = 256
EXTENSION = 8
EVAL_TOKENS = 32_768  # held-out tokens scored per length: a stable figure, quick on 2 cores
# Two ways to score a context length L with dense attention, on the same held-out tokens:
# - windows (report.json, the headline): consecutive windows of L tokens, every token scored from those before it
#   in its window, so each position 0..L-1 counts alike. This is what LongLoRA's eval.py reports (windows of L
#   taken every 256 tokens, the loss averaged over the whole window).
# - sliding (report_sliding.json): windows every L/4 tokens, only each window's last L/4 tokens scored, each from
#   at least 3L/4 tokens before it: the stricter test of the far end of the context.
EVAL_PROTOCOLS = {"windows": lambda length: length, "sliding": lambda length: length // 4}
PROTOCOL_LABELS = {"windows": "windows of L", "sliding": "sliding, stride L/4"}
PRESETS = Path(__file__).resolve().parent.parent / "launch" / "presets"
# Overrides that turn the extend stage's preset (tiny-cpu.yaml, which trains the S²-Attn variants) back into the
# paper's plain S²-Attn: for the comparisons that measure plain S²-Attn.
PLAIN_S2ATTN = ["attention.sink_tokens=0", "attention.dense_heads=0", "attention.dense_phase=0"]
# RULER in the demo: a 3M-parameter model trained on Python sources follows no English instruction, so the one task it
# can do at all is copying a number out of a Python haystack (its own held-out sources): niah_single_2, the needle at
# the start, middle and end, one sample per cell (cut samples, not lengths), answers cut at 12 tokens (a 7-digit
# number and the words around it; the model never ends an answer by itself).
DEMO_RULER = {"tasks": ["niah_single_2"], "depths": [0.0, 0.5, 1.0], "samples": 1, "max_new_tokens": 12}
# The second domain of the retention check: English prose the models never saw (the licence texts Debian ships).
PROSE_DIR = Path("/usr/share/common-licenses")
RETENTION_TOKENS = 16_384  # held-out tokens per domain: 64 windows of 256, a few seconds per model


def prepare_prose(out_dir: Path, tokenizer: Path) -> Path | None:
    """PROSE_DIR packed with the demo tokenizer (all of it held out from the models), or None where it is absent."""
    from data_prep.pack import pack
    from longctx.config import PrepConfig, from_dict

    if not PROSE_DIR.is_dir():
        print(f"no {PROSE_DIR} on this machine: retention is measured on the held-out sources only")
        return None
    config = {"inputs": [str(PROSE_DIR)], "tokenizer": str(tokenizer), "seq_len": BASE_CONTEXT, "dedup": True}
    pack(from_dict(PrepConfig, {**config, "out": str(out_dir / "data-prose"), "num_workers": 1}), progress=False)
    return out_dir / "data-prose" / "train"


def run_demo(out_dir: str | os.PathLike, *, num_procs: int = 2) -> dict:
    """All five stages (see the module doc); returns the report written to out_dir/report.json."""
    import json
    import time

    from longctx.evaluate import evaluate_perplexity
    from longctx.export import export

    out_dir = Path(out_dir)
    target = BASE_CONTEXT * EXTENSION
    timings: dict[str, float] = {}

    def stage(name: str) -> None:
        timings[name] = time.time()
        print(f"\n=== demo: {name} ===", flush=True)

    stage("data")
    tokenizer, short_train, _ = prepare_demo_data(out_dir, seq_len=BASE_CONTEXT)
    _, long_train, long_val = prepare_demo_data(out_dir, seq_len=target)

    stage("base")
    base_run, ext_run = out_dir / "base", out_dir / "extended"
    if not (base_run / "final" / "config.json").is_file():
        _run_cli(
            [
                "train",
                "--config",
                str(PRESETS / "tiny-cpu-base.yaml"),
                f"data.train={short_train}",
                f"train.output_dir={base_run}",
            ],
            num_procs=num_procs,
        )
    stage("extend")
    if not (ext_run / "final" / "config.json").is_file():
        _run_cli(
            [
                "train",
                "--config",
                str(PRESETS / "tiny-cpu.yaml"),
                f"model.path={base_run / 'final'}",
                f"data.train={long_train}",
                f"train.output_dir={ext_run}",
            ],
            num_procs=num_procs,
        )

    stage("eval")
    lengths = [BASE_CONTEXT * k for k in (1, 2, 4, 8)]
    models = {"base": str(base_run / "final"), "extended": str(ext_run / "final")}
    reports = {}
    for protocol, stride in EVAL_PROTOCOLS.items():
        results = {
            length: evaluate_perplexity(
                models,
                long_val,
                [length],
                out_dir / "eval" / protocol / str(length),
                stride=stride(length),
                batch_size=4,
                max_tokens=EVAL_TOKENS,
            )["models"]
            for length in lengths
        }
        reports[protocol] = {
            name: {str(n): results[n][name]["results"][n]["perplexity"] for n in lengths} for name in models
        }
    from longctx.evaluate import plot_perplexity, write_json

    report = reports["windows"]
    write_json(report, out_dir / "report.json")
    write_json(reports["sliding"], out_dir / "report_sliding.json")
    plot_perplexity(
        {
            f"{name} ({PROTOCOL_LABELS[protocol]})": {int(n): p for n, p in by_len.items()}
            for protocol, by_model in reports.items()
            for name, by_len in by_model.items()
        },
        out_dir / "perplexity.png",
        title=f"demo: {BASE_CONTEXT} → {target} tokens, dense attention",
    )

    ruler, retention = evaluate_suite(models, lengths, tokenizer, long_val, out_dir)

    stage("export")
    result = export(
        ext_run, out_dir / "export", format="merged", dtype="fp32", tokenizer=str(tokenizer), overwrite=True
    )
    timings["end"] = time.time()

    names = list(timings)
    print("\n=== demo: summary ===")
    for protocol, by_model in reports.items():
        print(f"perplexity (held-out stdlib sources, dense attention, {PROTOCOL_LABELS[protocol]}):")
        print(f"{'context':>8} " + " ".join(f"{name:>10}" for name in by_model))
        for n in lengths:
            print(f"{n:>8} " + " ".join(f"{by_model[name][str(n)]:>10.2f}" for name in by_model))
    print(format_suite(ruler, retention, lengths))
    print("stage times: " + ", ".join(f"{a} {timings[b] - timings[a]:.0f}s" for a, b in zip(names, names[1:])))
    print(f"wrote {out_dir / 'report.json'} (windows of L), {out_dir / 'report_sliding.json'} (stride L/4), ", end="")
    print(f"{out_dir / 'perplexity.png'}, {out_dir / 'eval' / 'ruler'}, {out_dir / 'eval' / 'retention'}, ", end="")
    print(f"exported model {result.out}")
    print(json.dumps(report))
    return report


def evaluate_suite(models: dict[str, str], lengths: list[int], tokenizer: Path, heldout: Path, out_dir: Path):
    """The eval stage's RULER table and retention check (DEMO_RULER, PROSE_DIR): (ruler report, retention report)."""
    from longctx.positions import RetentionArgs, evaluate_retention
    from longctx.ruler import RulerArgs, evaluate_ruler

    # The needles hide in held-out sources the models never trained on (decoded from the shards).
    ruler_args = RulerArgs(models, lengths, out_dir / "eval" / "ruler", str(tokenizer), haystack_text=str(heldout))
    ruler = evaluate_ruler(RulerArgs(**{**vars(ruler_args), **DEMO_RULER}))
    prose = prepare_prose(out_dir, tokenizer)
    domains = {"sources": str(heldout), **({"prose": str(prose)} if prose else {})}
    retention_out = out_dir / "eval" / "retention"
    retention = evaluate_retention(
        RetentionArgs(models, domains, BASE_CONTEXT, retention_out, batch_size=4, max_tokens=RETENTION_TOKENS)
    )
    return ruler, retention


def format_suite(ruler: dict, retention: dict, lengths: list[int]) -> str:
    from longctx.positions import format_retention_table
    from longctx.ruler import format_table

    depths = len(DEMO_RULER["depths"])
    tables = [format_table(f"{name} (needle in held-out sources, {depths} depths)", result, lengths)
              for name, result in ruler["models"].items()]  # fmt: skip
    return "\n".join([*tables, format_retention_table(retention)])


def _run_cli(args: list[str], num_procs: int = 1) -> None:
    """One `longctx` command in a child process (through the deepspeed launcher when num_procs > 1)."""
    import socket
    import subprocess
    import sys

    from longctx.errors import UserError

    if num_procs > 1:
        launcher = Path(sys.executable).with_name("deepspeed")
        # A free rendezvous port, so that a demo never collides with another launcher run on this machine.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [
            str(launcher),
            "--num_gpus",
            str(num_procs),
            "--master_port",
            str(port),
            "--module",
            "longctx.cli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "longctx.cli", *args]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"demo stage failed: {' '.join(args[:3])} (its error is above); rerun `make demo` to resume")
