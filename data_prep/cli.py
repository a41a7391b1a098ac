"""`longctx prep tokenizer | pack | sft | inspect`: argument declarations (cheap), handlers (imported lazily)."""

from __future__ import annotations

import argparse


def add_prep_commands(commands) -> None:
    prep = commands.add_parser("prep", help="prepare data: train a tokenizer, pack a corpus into shards, inspect")
    sub = prep.add_subparsers(dest="prep_command", required=True, metavar="STEP")

    tok = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (byte fallback, LLaMA ids)")
    tok.add_argument("--input", nargs="+", required=True, metavar="PATH", help="corpus inputs (as for pack)")
    tok.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, e.g. 8000")
    tok.add_argument("--out", required=True, metavar="FILE.model", help="where to write the sentencepiece model")
    tok.add_argument("--glob", default="**/*", help="files of a text directory to read (default: all)")
    tok.add_argument("--text-field", default="text", help="JSONL field / parquet column with the text")
    tok.add_argument("--max-sentences", type=int, default=200_000, help="lines sampled for training")
    tok.set_defaults(run=_run_tokenizer)

    pack = sub.add_parser(
        "pack",
        help="tokenize a corpus and pack it into fixed-length token shards",
        description="Options not given come from --config (a YAML PrepConfig, e.g. a previous run's "
        "prep_config.yaml), then from the defaults.",
    )
    pack.add_argument("--config", metavar="YAML", help="PrepConfig preset to start from")
    pack.add_argument("--input", nargs="+", dest="inputs", metavar="PATH", help="text dir, .jsonl[.gz|.zst], .parquet")
    pack.add_argument("--weights", nargs="+", type=float, metavar="W", help="mixing weight per input")
    pack.add_argument("--tokenizer", metavar="PATH", help="sentencepiece .model or HF tokenizer directory")
    pack.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sequence")
    pack.add_argument("--out", metavar="DIR", help="output directory")
    pack.add_argument("--glob", help="files of a text directory to read, e.g. '**/*.py'")
    pack.add_argument("--text-field", dest="text_field", help="JSONL field / parquet column with the text")
    pack.add_argument("--no-bos", dest="add_bos", action="store_const", const=False, help="no BOS per document")
    pack.add_argument("--no-eos", dest="add_eos", action="store_const", const=False, help="no EOS per document")
    pack.add_argument("--doc-start", dest="doc_start", metavar="TOKEN", help="token before each document (auto, none)")
    pack.add_argument("--doc-end", dest="doc_end", metavar="TOKEN", help="token after each document (auto, none)")
    pack.add_argument("--min-doc-tokens", type=int, dest="min_doc_tokens", help="drop shorter documents")
    pack.add_argument("--max-doc-tokens", type=int, dest="max_doc_tokens", help="drop longer documents (0: no limit)")
    pack.add_argument("--dedup", action="store_const", const=True, help="drop exact duplicate documents")
    pack.add_argument("--val-fraction", type=float, dest="val_fraction", help="fraction of documents for validation")
    pack.add_argument("--seed", type=int, help="seed of the shuffle and the split")
    pack.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False, help="keep corpus order")
    pack.add_argument("--tail", choices=["drop", "pad"], help="last incomplete sequence: drop (default) or pad")
    pack.add_argument("--sequences-per-shard", type=int, dest="sequences_per_shard", help="sequences per shard file")
    pack.add_argument("--num-workers", type=int, dest="num_workers", help="tokenizer processes (0: one per core)")
    pack.add_argument("--window-docs", type=int, dest="window_docs", help="documents per shuffle/resume window")
    pack.add_argument("--token-dtype", choices=["auto", "uint16", "uint32"], dest="token_dtype")
    pack.add_argument("--strict", action="store_const", const=True, help="stop on a file that is not UTF-8")
    pack.add_argument("--overwrite", action="store_true", help="replace output packed with other options")
    pack.add_argument("--quiet", action="store_true", help="no progress bar")
    pack.set_defaults(run=_run_pack)

    sft = sub.add_parser(
        "sft",
        help="render instruction data with a chat template, mask the prompts, pack conversations into shards",
        description="Reads Alpaca (instruction/input/output), ShareGPT (conversations) and OpenAI (messages) records "
        "from .jsonl, .json, .parquet or a dataset saved with save_to_disk. Options not given come from --config (a "
        "YAML SFTConfig, e.g. a previous run's prep_config.yaml), then from the defaults.",
    )
    sft.add_argument("--config", metavar="YAML", help="SFTConfig preset to start from")
    sft.add_argument("--input", nargs="+", dest="inputs", metavar="PATH", help=".jsonl, .json, .parquet, dataset dir")
    sft.add_argument("--tokenizer", metavar="DIR", help="the model's Hugging Face directory (tokenizer.json)")
    sft.add_argument(
        "--template", help="chat template: model (the tokenizer's own, default), llama-2, alpaca, vicuna, or a .jinja"
    )
    sft.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sequence")
    sft.add_argument("--out", metavar="DIR", help="output directory")
    sft.add_argument("--loss-on", choices=["all", "last"], dest="loss_on", help="assistant turns trained on")
    sft.add_argument(
        "--packing", choices=["pack", "pad"], help="pack: conversations share sequences, isolated; pad: one each"
    )
    sft.add_argument(
        "--overlong", choices=["truncate", "drop"], help="over seq_len: truncate the context (answer kept) or drop"
    )
    sft.add_argument("--val-fraction", type=float, dest="val_fraction", help="fraction of conversations for validation")
    sft.add_argument("--seed", type=int, help="seed of the shuffle and the split")
    sft.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False, help="keep the input order")
    sft.add_argument("--sequences-per-shard", type=int, dest="sequences_per_shard", help="sequences per shard file")
    sft.add_argument("--window-records", type=int, dest="window_records", help="records per packing/resume window")
    sft.add_argument("--token-dtype", choices=["auto", "uint16", "uint32"], dest="token_dtype")
    sft.add_argument("--overwrite", action="store_true", help="replace output prepared with other options")
    sft.add_argument("--quiet", action="store_true", help="no progress bar")
    sft.set_defaults(run=_run_sft)

    inspect = sub.add_parser("inspect", help="print a shard set's manifest, verify checksums, decode a sample")
    inspect.add_argument("dir", help="a shard set (e.g. OUT/train) or a pack output directory")
    inspect.add_argument("--tokenizer", metavar="PATH", help="tokenizer to decode with (default: from the manifest)")
    inspect.add_argument("--sample", type=int, default=0, help="index of the sequence to decode")
    inspect.add_argument("--chars", type=int, default=400, help="characters of the decoded sample to print")
    inspect.set_defaults(run=_run_inspect)


_PACK_FIELDS = (
    "inputs weights tokenizer seq_len out glob text_field add_bos add_eos doc_start doc_end min_doc_tokens "
    "max_doc_tokens dedup val_fraction seed shuffle tail sequences_per_shard num_workers window_docs token_dtype strict"
).split()


_SFT_FIELDS = (
    "inputs tokenizer template seq_len out loss_on packing overlong val_fraction seed shuffle sequences_per_shard "
    "window_records token_dtype"
).split()


def _run_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.sources import Skipped, check_inputs, iter_corpus
    from data_prep.tokenizer import load_tokenizer, train_sentencepiece

    check_inputs(args.input)
    docs = (
        item
        for _, item in iter_corpus(args.input, glob=args.glob, text_field=args.text_field, strict=False)
        if not isinstance(item, Skipped)
    )
    path = train_sentencepiece(docs, args.vocab_size, args.out, max_sentences=args.max_sentences)
    tok = load_tokenizer(path)
    print(f"wrote {path}: vocab {tok.vocab_size}, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}")
    return 0


def _run_pack(args: argparse.Namespace) -> int:
    from data_prep.pack import format_summary, pack
    from longctx.config import PrepConfig, from_dict, load_config, to_dict

    base = to_dict(load_config(PrepConfig, args.config))
    given = {name: getattr(args, name) for name in _PACK_FIELDS if getattr(args, name) is not None}
    config = from_dict(PrepConfig, {**base, **given})
    summary = pack(config, overwrite=args.overwrite, progress=not args.quiet)
    if summary["already_complete"]:
        print(f"{config.out}: already complete (same options); nothing to do. Use --overwrite to pack again.")
        return 0
    print(f"packed into {config.out}:")
    print(format_summary(summary))
    return 0


def _run_sft(args: argparse.Namespace) -> int:
    from data_prep.sft import format_summary, prepare_sft
    from longctx.config import SFTConfig, from_dict, load_config, to_dict

    base = to_dict(load_config(SFTConfig, args.config))
    given = {name: getattr(args, name) for name in _SFT_FIELDS if getattr(args, name) is not None}
    config = from_dict(SFTConfig, {**base, **given})
    summary = prepare_sft(config, overwrite=args.overwrite, progress=not args.quiet)
    if summary["already_complete"]:
        print(f"{config.out}: already complete (same options); nothing to do. Use --overwrite to prepare again.")
        return 0
    print(f"prepared into {config.out}:")
    print(format_summary(summary))
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from data_prep.tokenizer import load_tokenizer
    from longctx.config import PrepConfig, from_dict
    from longctx.errors import UserError
    from longctx.shards import MANIFEST, open_shards

    directory = Path(args.dir)
    if not (directory / MANIFEST).is_file() and (directory / "train" / MANIFEST).is_file():
        directories = [d for d in (directory / "train", directory / "val") if (d / MANIFEST).is_file()]
    else:
        directories = [directory]
    for d in directories:
        shards = open_shards(d, verify="all")  # hashes every file; a mismatch is a UserError
        manifest = dict(shards.manifest)
        files = manifest.pop("shards")
        print(f"== {d}")
        print(json.dumps(manifest, indent=1))
        print(f"{len(files)} shard files, {len(shards)} sequences: all checksums verified")
        if not len(shards):
            continue
        if not 0 <= args.sample < len(shards):
            raise UserError(f"--sample {args.sample} is out of range: {d} has {len(shards)} sequences")
        tokenizer_path = args.tokenizer or manifest["tokenizer"].get("path")
        tokenizer_path = tokenizer_path or from_dict(PrepConfig, manifest["prep_config"]).tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.identity["sha256"] != manifest["tokenizer"]["sha256"]:
            raise UserError(
                f"tokenizer {tokenizer_path} is not the one these shards were packed with: give --tokenizer"
            )
        tokens = shards[args.sample][: shards.num_valid(args.sample)]
        print(f"sequence {args.sample}: document starts at {shards.doc_starts(args.sample).tolist()[:20]}")
        print(repr(tokenizer.decode(tokens)[: args.chars]))
        mask = shards.loss_mask(args.sample)
        if mask is not None:  # supervised shards: what the loss is computed on
            edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
            answers = [tokenizer.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]
            line = f"trained on {int(mask.sum())} of {len(tokens)} tokens, {len(answers)} spans: {answers[:5]!r}"
            print(line[: args.chars])
    return 0
