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
        help="evaluate models: perplexity, passkey, RULER tasks, loss by position, short-context retention",
        description="Dense attention, bf16 on GPU. Several ranks: `deepspeed --num_gpus N --module longctx.cli eval`.",
    )
    kinds = evaluate.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    model_help = "NAME=DIR or DIR, repeatable: a Hugging Face model dir, a checkpoint (step_N) or a training run dir"
    device_map_help = "balanced: spread each model's layers over every visible GPU (a model too large for one)"

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
    ppl.add_argument("--device-map", choices=["none", "balanced"], default="none", help=device_map_help)
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

    ruler = kinds.add_parser(
        "ruler",
        help="RULER's synthetic tasks (needles, variable tracking, common/frequent words) per length and depth",
        description="Prompts generated offline from --seed for the given tokenizer (its chat template applied when it "
        "has one), answered greedily, scored as RULER scores (string_match_all, in %%). Writes ruler.json, a heat map "
        "(depth x length) per task and model, and prints a table per model. Tasks and wording: docs/eval.md.",
    )
    ruler.add_argument("--model", action="append", required=True, help=model_help)
    ruler.add_argument("--tokenizer", default="", help="tokenizer (default: the first model's directory)")
    ruler.add_argument("--lengths", required=True, help="prompt lengths in tokens, e.g. 1024,2048,4096,8192")
    ruler.add_argument("--tasks", default="all", help="comma-separated task names or prefixes (niah*), or all")
    ruler.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="depths in [0, 1] of the first needle asked")
    ruler.add_argument("--samples", type=int, default=5, help="samples per (task, length, depth)")
    ruler.add_argument("--seed", type=int, default=0, help="seed of every sample's content")
    ruler.add_argument(
        "--haystack-text",
        default=None,
        help="corpus of the text haystacks: a text file, a directory of .txt/.md/.rst/.py, or held-out shards "
        "(default: the Python standard library's top-level modules)",
    )
    ruler.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has one")
    ruler.add_argument("--max-new-tokens", type=int, default=0, help="cap on answer tokens (0: RULER's per task)")
    ruler.add_argument("--device-map", choices=["none", "balanced"], default="none", help=device_map_help)
    ruler.add_argument("--out", required=True, help="output directory")
    ruler.set_defaults(run=_run_eval)

    positions = kinds.add_parser(
        "positions",
        help="loss by position in the context window (buckets of positions), on held-out shards",
        description="Non-overlapping windows of L + 1 held-out tokens, dense attention; prediction t reads t + 1 "
        "tokens. Its loss is averaged over windows and over --buckets equal ranges of positions. Writes "
        "positions.json and positions.png.",
    )
    positions.add_argument("--model", action="append", required=True, help=model_help)
    positions.add_argument("--data", required=True, help="held-out shard directory, e.g. <prep out>/val")
    positions.add_argument("--length", type=int, required=True, help="window length L in tokens")
    positions.add_argument("--buckets", type=int, default=16, help="ranges of positions the loss is averaged over")
    positions.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    positions.add_argument("--max-windows", type=int, default=0, help="score only the first N windows (0: all)")
    positions.add_argument("--device-map", choices=["none", "balanced"], default="none", help=device_map_help)
    positions.add_argument("--out", required=True, help="output directory")
    positions.set_defaults(run=_run_eval)

    retention = kinds.add_parser(
        "retention",
        help="short-context retention: perplexity at the base context on held-out domains, change from a baseline",
        description="Windows of --base-context tokens, every held-out token scored once, per domain and model; the "
        "change is each model's perplexity over the baseline's, minus 1. Writes retention.json.",
    )
    retention.add_argument("--model", action="append", required=True, help=model_help)
    retention.add_argument(
        "--data", action="append", required=True, help="NAME=DIR or DIR, repeatable: held-out shards of a domain"
    )
    retention.add_argument("--base-context", type=int, required=True, help="the base model's context, e.g. 4096")
    retention.add_argument("--baseline", default="", help="the model compared against (default: the first)")
    retention.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    retention.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens per domain")
    retention.add_argument("--device-map", choices=["none", "balanced"], default="none", help=device_map_help)
    retention.add_argument("--out", required=True, help="output directory")
    retention.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from longctx import evaluate

    if args.eval_command == "ppl":
        return evaluate.run_ppl(args)
    if args.eval_command == "passkey":
        return evaluate.run_passkey(args)
    models = evaluate.parse_model_specs(args.model)
    if args.eval_command == "ruler":
        from longctx.ruler import RulerArgs, evaluate_ruler, parse_tasks

        tasks = parse_tasks("*" if args.tasks == "all" else args.tasks)
        depths = evaluate.parse_float_list(args.depths, "--depths")
        lengths = evaluate.parse_int_list(args.lengths, "--lengths")
        evaluate_ruler(
            RulerArgs(
                models=models,
                lengths=lengths,
                out=args.out,
                tokenizer=args.tokenizer,
                tasks=tasks,
                depths=depths,
                samples=args.samples,
                seed=args.seed,
                haystack_text=args.haystack_text,
                chat_template=not args.no_chat_template,
                device_map=args.device_map,
                max_new_tokens=args.max_new_tokens,
            )
        )
    elif args.eval_command == "positions":
        from longctx.positions import PositionsArgs, evaluate_positions

        evaluate_positions(
            PositionsArgs(
                models=models,
                data=args.data,
                length=args.length,
                out=args.out,
                num_buckets=args.buckets,
                batch_size=args.batch_size,
                max_windows=args.max_windows,
                device_map=args.device_map,
            )
        )
    else:
        from longctx.positions import RetentionArgs, evaluate_retention, parse_data_specs

        evaluate_retention(
            RetentionArgs(
                models=models,
                data=parse_data_specs(args.data),
                base_context=args.base_context,
                out=args.out,
                baseline=args.baseline,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                device_map=args.device_map,
            )
        )
    return 0


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
