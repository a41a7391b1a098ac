"""`longctx prep | train | eval | export | plan | demo`: parse arguments, call the library, report errors.

Each command's arguments are declared here (cheap: no torch import); its work is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from longctx.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # `deepspeed --module longctx.cli` puts --local_rank=N before the command (the rank is read from LOCAL_RANK).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from data_prep.cli import add_prep_commands

    add_prep_commands(commands)
    _add_demo_command(commands)
    _add_train_command(commands)
    _add_eval_commands(commands)
    _add_export_command(commands)
    _add_plan_command(commands)
    return parser


def _add_demo_command(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole pipeline on this machine's CPU: data, base model, LongLoRA 8x, evaluation, export",
        description="Runs on the Python standard library's sources with no download; each stage resumes or is "
        "skipped when its output is complete.",
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="where the demo writes everything")
    demo.add_argument("--procs", type=int, default=2, help="processes of the LongLoRA stage (deepspeed launcher)")
    demo.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from longctx.demo import run_demo

    run_demo(args.out, num_procs=args.procs)
    return 0


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train",
        help="fine-tune a model (LongLoRA) on the DeepSpeed engine",
        description="Train from a YAML preset plus section.key=value overrides. Single process as is; several with "
        "`deepspeed --num_gpus N --module longctx.cli train ...`.",
    )
    train.add_argument("--config", help="YAML run preset, e.g. launch/presets/llama2-7b-32k.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-5")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
    train.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from longctx.config import RunConfig, describe, load_config

    if args.help_config:
        for key, default, doc in describe(RunConfig):
            print(f"{key} = {default}\n    {doc}")
        return 0
    cfg = load_config(RunConfig, args.config, args.overrides)
    from longctx.trainer import train

    train(cfg)
    return 0


def _add_eval_commands(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="evaluate models: perplexity against context length, passkey retrieval",
        description="Dense attention, bf16 on GPU. Several ranks: `deepspeed --num_gpus N --module longctx.cli eval`.",
    )
    kinds = evaluate.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    model_help = "NAME=DIR or DIR, repeatable: a Hugging Face model dir, a checkpoint (step_N) or a training run dir"

    ppl = kinds.add_parser(
        "ppl",
        help="perplexity at several context lengths on held-out shards (sliding window)",
        description="Every held-out token but the first is scored once; with stride S each token after the first "
        "window sees at least L - S + 1 tokens of context. Writes perplexity.json and perplexity.png to --out.",
    )
    ppl.add_argument("--model", action="append", required=True, help=model_help)
    ppl.add_argument("--data", required=True, help="held-out shard directory, e.g. <prep out>/val")
    ppl.add_argument("--lengths", required=True, help="context lengths, comma-separated, e.g. 256,512,1024,2048")
    ppl.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: each length)")
    ppl.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ppl.add_argument("--max-tokens", type=int, default=0, help="score only the first N held-out tokens (0: all)")
    ppl.add_argument("--out", required=True, help="output directory")
    ppl.set_defaults(run=_run_eval)

    passkey = kinds.add_parser(
        "passkey",
        help="passkey retrieval accuracy per context length and depth",
        description="A random 5-digit key hidden at each depth of filler text, asked back and greedily decoded. "
        "Writes passkey.json and a heat map per model to --out.",
    )
    passkey.add_argument("--model", action="append", required=True, help=model_help)
    passkey.add_argument("--tokenizer", default="", help="tokenizer (default: the first model's directory)")
    passkey.add_argument("--lengths", required=True, help="prompt lengths in tokens, e.g. 1024,2048,4096")
    passkey.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1], comma-separated")
    passkey.add_argument("--trials", type=int, default=5, help="random keys per (length, depth)")
    passkey.add_argument("--seed", type=int, default=0, help="seed of the keys")
    passkey.add_argument("--out", required=True, help="output directory")
    passkey.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from longctx.evaluate import run_passkey, run_ppl

    return run_ppl(args) if args.eval_command == "ppl" else run_passkey(args)


def _add_export_command(commands) -> None:
    export = commands.add_parser(
        "export",
        help="export a training checkpoint as a merged Hugging Face model and/or a PEFT adapter",
        description="Loads with plain transformers / peft (no longctx needed). Any ZeRO stage, any rank count. "
        "--format both writes OUT/merged and OUT/adapter.",
    )
    export.add_argument("checkpoint", help="a checkpoints/step_N dir, or a training run dir (its newest checkpoint)")
    export.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    export.add_argument("--format", choices=["merged", "adapter", "both"], default="merged", help="what to write")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weight dtype")
    export.add_argument("--tokenizer", default="", help="tokenizer (default: the run's model.path or data.train one)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own Python code (its config.json's auto_map) for this export; never taken from the "
        "checkpoint",
    )
    export.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from longctx.export import run_export

    return run_export(args)


def _add_plan_command(commands) -> None:
    plan = commands.add_parser(
        "plan",
        help="estimate per-GPU memory and step time of a run on a cluster, per ZeRO stage and SP degree",
        description="Reads the preset (and the model's config.json, never its weights). Prints per-GPU memory by "
        "part for ZeRO-2 / 3 / 3+offload at every sequence-parallel degree, the smallest that fits, and the step time.",
    )
    plan.add_argument("--config", required=True, help="YAML run preset or a preset name, e.g. llama2-7b-100k")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. memory.tiled_loss=true")
    plan.add_argument("--nodes", type=int, default=1, help="nodes")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (80 for 80 GB cards)")
    plan.add_argument("--host-memory-gb", type=float, default=1024.0, help="host memory per node in GiB")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the step time")
    plan.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU (A100 312, H100 989)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    from longctx.plan import run_plan

    return run_plan(args)


def quiet_libraries(debug: bool) -> None:
    """No library warning the user cannot act on in a normal run (--debug shows them all).

    Deprecations inside DeepSpeed, transformers, peft and torch; transformers' and bitsandbytes' advisory log lines
    (bitsandbytes names an optional CPU kernel package on every import); DeepSpeed's guess of the accelerator. The
    settings go through the environment too, so the ranks a launcher starts and the prep workers inherit them.
    """
    import logging
    import os
    import warnings

    if debug:
        os.environ["LONGCTX_DEBUG"] = "1"
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning under prep's and torch's workers
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("bitsandbytes", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args.debug)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"longctx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line; --debug shows where
        if args.debug:
            raise
        print(f"longctx: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
