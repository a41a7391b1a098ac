"""The on-disk shard format: the ONE module that writes and reads packed token sequences.

A shard set is a directory:

    manifest.json            format version, seq_len, dtype, vocab size, tokenizer identity, special ids,
                             counts, per-file sizes and sha256, the PrepConfig it was packed with
    shard-00000.tokens       raw tokens, C order, shape (num_sequences, seq_len), dtype uint16 or uint32
    shard-00000.docs.npy     document boundaries in CSR form (int64): the first num_sequences + 1 values are
                             offsets into the rest, which are the positions inside each sequence where a
                             document starts (a document continued from the previous sequence has none)
    shard-00000.mask         (supervised sets only, `longctx prep sft`) the loss mask: one bit per token, 1 where
                             the token is a training target (an assistant's answer), rows of ceil(seq_len / 8)
                             bytes, little bit order (np.packbits(..., bitorder="little")); absent in sets from
                             `prep pack`, where every token is a target

Every file appears under its final name only when complete (written under a `.partial` name, then renamed).
Only the last sequence of a set can be padded; `manifest["last_num_valid"]` says how many of its tokens are real.
A set with masks is format version 2 (MASKED_FORMAT_VERSION), so that a reader that knows nothing of masks refuses
it instead of training on the prompts; sets without masks stay version 1.

Checksums are verified lazily by the reader: the first time a shard is touched in a process, its files are hashed
and compared with the manifest (and the sizes of all files are checked at open), so corrupt data is never
returned; `ShardSet.verify()` hashes everything up front (what `longctx prep inspect` does).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from longctx.atomic import PARTIAL_SUFFIX, write_json_atomic
from longctx.errors import UserError

FORMAT_NAME = "longctx-shards"
FORMAT_VERSION = 1
MASKED_FORMAT_VERSION = 2  # the same layout plus a `.mask` file per shard
MANIFEST = "manifest.json"


def token_dtype_for(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32; a requested dtype too small is a user error."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise UserError(
            f"vocabulary of {vocab_size} tokens does not fit token dtype {requested}: use token dtype uint32 or auto"
        )
    return dtype


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_names(index: int) -> tuple[str, str]:
    return f"shard-{index:05d}.tokens", f"shard-{index:05d}.docs.npy"


def mask_name(index: int) -> str:
    return f"shard-{index:05d}.mask"


def mask_row_bytes(seq_len: int) -> int:
    return (seq_len + 7) // 8


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends fixed-length sequences (with their document starts) to a shard set; resumable at any `state()`.

    The shard being filled lives in `shard-XXXXX.tokens.partial`, appended to; its document starts stay in memory
    (and in `state()`). When it holds `sequences_per_shard` sequences it is hashed and renamed into place.
    `ShardWriter(..., state=old_state)` continues from an earlier `state()`, truncating the partial file to what
    that state had, so a killed run resumes to byte-identical output. With `with_mask`, every `add` also takes the
    loss mask of its sequences, appended to `shard-XXXXX.mask.partial` the same way.
    """

    def __init__(
        self,
        directory: Path,
        seq_len: int,
        dtype: np.dtype,
        sequences_per_shard: int,
        state=None,
        *,
        with_mask: bool = False,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.seq_len, self.dtype, self.sequences_per_shard = seq_len, np.dtype(dtype), sequences_per_shard
        self.with_mask = with_mask
        self.completed: list[dict[str, Any]] = []
        self.pending_counts: list[int] = []  # document starts per pending sequence
        self.pending_starts: list[int] = []
        if state:
            self.completed = list(state["completed"])
            self.pending_counts = list(state["pending_counts"])
            self.pending_starts = list(state["pending_starts"])
        self._recover_partial()
        self._open_partials()

    # -- resume ----------------------------------------------------------------------------------------------------

    def _partial_path(self) -> Path:
        return self.directory / (shard_names(len(self.completed))[0] + PARTIAL_SUFFIX)

    def _mask_partial_path(self) -> Path:
        return self.directory / (mask_name(len(self.completed)) + PARTIAL_SUFFIX)

    def _open_partials(self) -> None:
        self._file = open(self._partial_path(), "ab")
        self._mask_file = open(self._mask_partial_path(), "ab") if self.with_mask else None

    def _recover_partial(self) -> None:
        """Bring the directory back to exactly what the state describes; later files are rebuilt identically."""
        index = len(self.completed)
        partials = [(self._partial_path(), shard_names(index)[0], self.seq_len * self.dtype.itemsize)]
        if self.with_mask:
            partials.append((self._mask_partial_path(), mask_name(index), mask_row_bytes(self.seq_len)))
        for partial, final_name, row_bytes in partials:
            final = self.directory / final_name
            if not partial.exists() and final.exists():  # the shard was completed after the state was saved
                os.replace(final, partial)
            with open(partial, "ab") as f:
                f.truncate(len(self.pending_counts) * row_bytes)
        names = ("tokens", "docs", "mask")
        keep = {record[k] for record in self.completed for k in names if k in record} | {p.name for p, _, _ in partials}
        for path in self.directory.glob("shard-*"):
            if path.name not in keep:
                path.unlink()

    def state(self) -> dict[str, Any]:
        """Flush to disk and return what a resumed writer needs (JSON-serializable)."""
        for f in (self._file, self._mask_file):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        return {
            "completed": list(self.completed),
            "pending_counts": list(self.pending_counts),
            "pending_starts": list(self.pending_starts),
        }

    # -- writing ---------------------------------------------------------------------------------------------------

    def add(
        self, sequences: np.ndarray, doc_offsets: np.ndarray, doc_starts: np.ndarray, masks: np.ndarray | None = None
    ) -> None:
        """Append sequences (K, seq_len); starts of sequence k: doc_starts[doc_offsets[k] : doc_offsets[k + 1]];
        masks (K, seq_len) bool, True on training targets: given exactly when the writer is `with_mask`."""
        assert (masks is not None) == self.with_mask, "a masked writer takes masks, an unmasked one none"
        counts = np.diff(doc_offsets)
        k = 0
        while k < len(sequences):
            room = self.sequences_per_shard - len(self.pending_counts)
            take = min(room, len(sequences) - k)
            self._file.write(np.ascontiguousarray(sequences[k : k + take], dtype=self.dtype).tobytes())
            if masks is not None:
                bits = np.packbits(np.asarray(masks[k : k + take], dtype=bool), axis=1, bitorder="little")
                self._mask_file.write(bits.tobytes())
            self.pending_counts += counts[k : k + take].tolist()
            self.pending_starts += doc_starts[doc_offsets[k] : doc_offsets[k + take]].tolist()
            k += take
            if len(self.pending_counts) == self.sequences_per_shard:
                self._complete_shard()

    def _complete_shard(self) -> None:
        if not self.pending_counts:
            return
        self._file.close()
        index = len(self.completed)
        tokens_name, docs_name = shard_names(index)
        partial = self._partial_path()
        docs = np.concatenate(
            [np.concatenate([[0], np.cumsum(self.pending_counts)]), np.asarray(self.pending_starts)]
        ).astype(np.int64)
        docs_partial = self.directory / (docs_name + PARTIAL_SUFFIX)
        with open(docs_partial, "wb") as f:
            np.save(f, docs, allow_pickle=False)
        record = {
            "tokens": tokens_name,
            "docs": docs_name,
            "num_sequences": len(self.pending_counts),
            "tokens_bytes": partial.stat().st_size,
            "docs_bytes": docs_partial.stat().st_size,
            "tokens_sha256": sha256_file(partial),
            "docs_sha256": sha256_file(docs_partial),
        }
        if self.with_mask:
            self._mask_file.close()
            mask_partial = self._mask_partial_path()
            record.update(
                mask=mask_name(index), mask_bytes=mask_partial.stat().st_size, mask_sha256=sha256_file(mask_partial)
            )
            os.replace(mask_partial, self.directory / mask_name(index))
        os.replace(docs_partial, self.directory / docs_name)
        os.replace(partial, self.directory / tokens_name)  # the tokens file last: its name marks the shard complete
        self.completed.append(record)
        self.pending_counts, self.pending_starts = [], []
        self._open_partials()

    def finish(self, manifest_fields: dict[str, Any]) -> dict[str, Any]:
        """Complete the last shard and write the manifest (last of all: its presence marks a complete set)."""
        self._complete_shard()
        self.close()
        self._partial_path().unlink(missing_ok=True)
        if self.with_mask:
            self._mask_partial_path().unlink(missing_ok=True)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": MASKED_FORMAT_VERSION if self.with_mask else FORMAT_VERSION,
            "seq_len": self.seq_len,
            "dtype": self.dtype.name,
            "num_sequences": sum(r["num_sequences"] for r in self.completed),
            "shards": self.completed,
            **manifest_fields,
        }
        write_json_atomic(self.directory / MANIFEST, manifest)
        return manifest

    def close(self) -> None:
        self._file.close()
        if self._mask_file is not None:
            self._mask_file.close()


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


class ShardSet:
    """Read-only view of a shard set: `s[i]` is sequence i as a (seq_len,) view into a memory map (no copy)."""

    def __init__(self, directory: str | os.PathLike, *, verify: str = "lazy"):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(
                f"{self.directory} has no {MANIFEST}: it is not a finished shard set; run `longctx prep pack` "
                "(again, to resume) to produce it"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        version = self.manifest.get("format_version")
        if self.manifest.get("format") != FORMAT_NAME or version not in (FORMAT_VERSION, MASKED_FORMAT_VERSION):
            raise UserError(
                f"{manifest_path} is not a longctx shard manifest of format version {FORMAT_VERSION} or "
                f"{MASKED_FORMAT_VERSION}: re-pack the corpus with this version of `longctx prep pack` (or `prep sft`)"
            )
        self.seq_len = int(self.manifest["seq_len"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self._records = self.manifest["shards"]
        self.has_mask = version == MASKED_FORMAT_VERSION
        self._check_sizes()
        counts = [r["num_sequences"] for r in self._records]
        self._first_index = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._tokens: dict[int, np.memmap] = {}
        self._docs: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.memmap] = {}
        self._verified: set[int] = set()
        if verify == "all":
            self.verify()

    def _files(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        """(file name, manifest key prefix) of each file of shard record r."""
        return [(r["tokens"], "tokens"), (r["docs"], "docs")] + ([(r["mask"], "mask")] if self.has_mask else [])

    def _check_sizes(self) -> None:
        """Cheap check at open: every file exists with the size the manifest says (catches truncation)."""
        for r in self._records:
            expected = {
                "tokens": r["num_sequences"] * self.seq_len * self.dtype.itemsize,
                "docs": r["docs_bytes"],
                "mask": r["num_sequences"] * mask_row_bytes(self.seq_len),
            }
            for name, size in ((name, expected[kind]) for name, kind in self._files(r)):
                path = self.directory / name
                if not path.is_file() or path.stat().st_size != size:
                    raise UserError(
                        f"shard file {path} is missing or has the wrong size: the shard set is damaged; "
                        "re-run `longctx prep pack --overwrite`"
                    )

    def _verify_shard(self, shard: int) -> None:
        r = self._records[shard]
        for name, kind in self._files(r):
            if sha256_file(self.directory / name) != r[f"{kind}_sha256"]:
                raise UserError(
                    f"checksum mismatch in {self.directory / name}: the shard is corrupt; "
                    "re-run `longctx prep pack --overwrite` to rebuild it"
                )
        self._verified.add(shard)

    def verify(self, progress: bool = False) -> None:
        """Hash every file and compare with the manifest; UserError on the first mismatch. progress: a bar on
        stderr, in bytes (shown on a terminal only)."""
        bar = None
        if progress:
            from tqdm import tqdm

            total = sum(r["tokens_bytes"] + r["docs_bytes"] + r.get("mask_bytes", 0) for r in self._records)
            desc, tty = f"checking {self.directory}", os.isatty(2)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=not tty)
        for shard, r in enumerate(self._records):
            if shard not in self._verified:
                self._verify_shard(shard)
            if bar is not None:
                bar.update(r["tokens_bytes"] + r["docs_bytes"] + r.get("mask_bytes", 0))
        if bar is not None:
            bar.close()

    def _open_shard(self, shard: int) -> tuple[np.memmap, np.ndarray]:
        if shard not in self._tokens:
            if shard not in self._verified:
                self._verify_shard(shard)
            r = self._records[shard]
            self._tokens[shard] = np.memmap(
                self.directory / r["tokens"], dtype=self.dtype, mode="r", shape=(r["num_sequences"], self.seq_len)
            )
            self._docs[shard] = np.load(self.directory / r["docs"], allow_pickle=False)
            if self.has_mask:
                shape = (r["num_sequences"], mask_row_bytes(self.seq_len))
                self._masks[shard] = np.memmap(self.directory / r["mask"], dtype=np.uint8, mode="r", shape=shape)
        return self._tokens[shard], self._docs[shard]

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        shard = int(np.searchsorted(self._first_index, i, side="right") - 1)
        return shard, i - int(self._first_index[shard])

    def __len__(self) -> int:
        return int(self._first_index[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard, row = self._locate(i)
        return self._open_shard(shard)[0][row]

    def doc_starts(self, i: int) -> np.ndarray:
        """Offsets inside sequence i where a document starts (ascending)."""
        shard, row = self._locate(i)
        docs = self._open_shard(shard)[1]
        num_sequences = self._records[shard]["num_sequences"]
        return docs[num_sequences + 1 + docs[row] : num_sequences + 1 + docs[row + 1]]

    def loss_mask(self, i: int) -> np.ndarray | None:
        """(seq_len,) bool: True where token i is a training target; None for a set without masks (all are)."""
        if not self.has_mask:
            return None
        shard, row = self._locate(i)
        self._open_shard(shard)
        return np.unpackbits(self._masks[shard][row], count=self.seq_len, bitorder="little").astype(bool)

    def num_valid(self, i: int) -> int:
        """Tokens of sequence i before tail padding (seq_len except possibly for the last sequence)."""
        self._locate(i)  # range check
        if i % len(self) == len(self) - 1:
            return int(self.manifest["last_num_valid"])
        return self.seq_len

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def open_shards(directory: str | os.PathLike, *, verify: str = "lazy") -> ShardSet:
    """Open a finished shard set. verify='lazy' hashes each shard on first use; 'all' hashes everything now."""
    return ShardSet(directory, verify=verify)
