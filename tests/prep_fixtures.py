"""Small synthetic corpora and a tiny trained tokenizer shared by the data-prep tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longctx.shards import open_shards

WORDS = (
    "the of and to in is was for on that with as by at from long context window attention rope lora shard "
    "packing token sequence model train eval déjà vu naïve 東京 😀 def return class import"
).split()


def synthetic_docs(num_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 400) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        n = int(rng.integers(min_words, max_words))
        words = rng.choice(WORDS, size=n)
        docs.append(f"doc {i}: " + " ".join(words) + ("\n" if i % 3 else "\n\n  indented\tline\n"))
    return docs


def write_text_dir(directory: Path, docs: list[str]) -> list[str]:
    """One file per document; returns the documents in the order the reader visits them (sorted names)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return docs


def read_documents(shard_dir: Path, *, strip_specials: bool = True) -> list[list[int]]:
    """Reassemble the documents of a shard set in stream order, from the recorded document starts."""
    shards = open_shards(shard_dir)
    manifest = shards.manifest
    docs: list[list[int]] = []
    for i in range(len(shards)):
        tokens = shards[i][: shards.num_valid(i)].tolist()
        starts = shards.doc_starts(i).tolist()
        if not starts or starts[0] != 0:  # the sequence opens inside the previous document
            assert docs, "first sequence must start with a document"
            docs[-1] += tokens[: starts[0] if starts else len(tokens)]
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(tokens)
            docs.append(tokens[start:end])
    if strip_specials:
        bos, eos = manifest["special_ids"]["bos"], manifest["special_ids"]["eos"]
        for doc in docs:
            if bos is not None:
                assert doc[0] == bos
                del doc[0]
            if eos is not None and doc and doc[-1] == eos:
                del doc[-1]
    return docs
