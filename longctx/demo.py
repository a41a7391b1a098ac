"""`longctx demo`: the pipeline end to end on this machine, with no download.

Data stage (`prepare_demo_data`): train a small sentencepiece tokenizer on the Python standard library's
sources, then pack those sources into shards with a validation split. Later stages (training, evaluation)
call it and use the directories it returns.
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
            "out": str(out_dir / "data"),
            "val_fraction": val_fraction,
            "sequences_per_shard": 256,
        },
    )
    summary = pack(config, progress=progress)
    if progress:
        from data_prep.pack import format_summary

        state = "already packed" if summary["already_complete"] else "packed"
        print(f"demo data {state} in {config.out}:\n{format_summary(summary)}")
    return tokenizer_path, out_dir / "data" / "train", out_dir / "data" / "val"
