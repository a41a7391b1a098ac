"""`longctx prep pack`: tokenize a corpus on all cores and pack it into fixed-length sequences (LongLoRA's scheme).

The pipeline streams the corpus in *windows* (at most `window_docs` documents / 16M characters):

    read window (main), handing text to a pool of tokenizer processes as it is read (two windows in flight)
    → drop empty / duplicate / too short / too long documents → assign each document to train or validation
    (by a seeded draw, so no document is in both) → repeat by input weight → shuffle within the window
    → BOS + tokens + EOS per document, concatenated and cut into sequences of exactly seq_len tokens → shards

Memory holds about two windows whatever the corpus size (the optional exact-dedup set adds 8 bytes per document).
Every window boundary is a resume point: the shard writers flush and a small state file records how many source
items were consumed, the unfinished sequence of each split and the counters. A run killed at any point (kill -9)
and run again continues from the last window and produces byte-identical output, because every step is
deterministic for a given config and seed.

Output directory: `train/` (and `val/` when val_fraction > 0) shard sets, `prep.json` (config + tokenizer
identity, written first), `prep_config.yaml` (the PrepConfig, loadable with `load_config`) and `summary.json`
(written last, with the manifests: its presence marks a complete run).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.sources import Skipped, check_inputs, iter_corpus
from data_prep.tokenizer import load_tokenizer
from longctx.atomic import open_atomic, write_json_atomic
from longctx.config import PrepConfig, save_config, to_dict
from longctx.errors import UserError
from longctx.shards import ShardWriter, token_dtype_for

WINDOW_MAX_CHARS = 16 << 20
TASK_CHARS = 256 << 10  # characters per tokenizer task: big enough to amortize IPC, small enough to balance
PREP_FILE, STATE_FILE, SUMMARY_FILE, CONFIG_FILE = "prep.json", ".prep_state.json", "summary.json", "prep_config.yaml"
HIST_BINS_PER_OCTAVE = 16  # document-length histogram resolution (percentiles are exact to ~4%)
# Options that do not change the output: they may differ between a run and its resume.
_NOT_IN_FINGERPRINT = ("out", "num_workers")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer workers
# ----------------------------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(texts: list[str], with_hashes: bool, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(all ids concatenated, in the shard dtype, per-document lengths, per-document content hashes or None)."""
    flat, lengths = _worker_tokenizer.encode_flat(texts, np.dtype(dtype))
    hashes = None
    if with_hashes:
        hashes = np.array([_content_hash(t) for t in texts], dtype=np.uint64)
    return flat, lengths, hashes


def _content_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------------------------------------------
# Windows of documents
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Window:
    index: int
    input_index: list[int] = field(default_factory=list)  # per document: which input it came from
    num_items: int = 0  # source items consumed, skipped ones included (the resume position)
    skipped: list[Skipped] = field(default_factory=list)
    num_chars: int = 0
    results: list = field(default_factory=list)  # pending tokenizer results, in document order


def _submitted_windows(pool, items, first_index: int, window_docs: int, with_hashes: bool, dtype: np.dtype):
    """Read windows of documents, handing each TASK_CHARS of text to the pool as soon as it is read, so that
    reading overlaps tokenizing; yields windows whose `results` are still pending."""
    window, task, task_chars = Window(first_index), [], 0

    def submit():
        nonlocal task, task_chars
        if task:
            window.results.append(pool.apply_async(_encode, (task, with_hashes, dtype.name)))
        task, task_chars = [], 0

    for input_index, item in items:
        window.num_items += 1
        if isinstance(item, Skipped):
            window.skipped.append(item)
            continue
        task.append(item)
        task_chars += len(item)
        window.input_index.append(input_index)
        window.num_chars += len(item)
        if task_chars >= TASK_CHARS:
            submit()
        if len(window.input_index) >= window_docs or window.num_chars >= WINDOW_MAX_CHARS:
            submit()
            yield window
            window = Window(window.index + 1)
    submit()
    if window.num_items:
        yield window


def _tokenized_windows(windows, with_hashes: bool):
    """(window, flat ids, lengths, hashes) in order; the next window is read (and queued) before one is collected."""
    in_flight: deque = deque()

    def collect():
        window = in_flight.popleft()
        parts = [r.get() for r in window.results]
        window.results = []
        flat = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint16)
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        hashes = np.concatenate([p[2] for p in parts]) if parts and with_hashes else None
        return window, flat, lengths, hashes

    for window in windows:
        in_flight.append(window)
        if len(in_flight) == 2:
            yield collect()
    while in_flight:
        yield collect()


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------


class SequencePacker:
    """Concatenates documents and cuts the stream into seq_len sequences; the unfinished tail is carried over."""

    def __init__(self, writer: ShardWriter, seq_len: int, dtype: np.dtype, carry=None, carry_starts=None):
        self.writer, self.seq_len, self.dtype = writer, seq_len, dtype
        self.carry = np.asarray(carry if carry is not None else [], dtype=dtype)
        self.carry_starts = np.asarray(carry_starts if carry_starts is not None else [], dtype=np.int64)
        self.num_sequences = sum(r["num_sequences"] for r in writer.completed) + len(writer.pending_counts)

    def add(self, docs: list[np.ndarray]) -> None:
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        starts = len(self.carry) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        stream = np.concatenate([self.carry, *docs]).astype(self.dtype, copy=False)
        all_starts = np.concatenate([self.carry_starts, starts])
        num_full = len(stream) // self.seq_len
        cut = num_full * self.seq_len
        full = all_starts < cut
        if num_full:
            starts_in_full = all_starts[full]
            # sequence k's document starts are starts_in_full[offsets[k]:offsets[k + 1]]
            offsets = np.searchsorted(starts_in_full // self.seq_len, np.arange(num_full + 1), side="left")
            self.writer.add(stream[:cut].reshape(num_full, self.seq_len), offsets, starts_in_full % self.seq_len)
            self.num_sequences += num_full
        self.carry = stream[cut:].copy()
        self.carry_starts = all_starts[~full] - cut

    def finish_tail(self, tail: str, pad_id: int) -> tuple[int, int]:
        """Drop or pad the last incomplete sequence; returns (valid tokens in the last sequence, tail tokens)."""
        num_tail = len(self.carry)
        if num_tail and tail == "pad":
            padded = np.full((1, self.seq_len), pad_id, dtype=self.dtype)
            padded[0, :num_tail] = self.carry
            self.writer.add(padded, np.array([0, len(self.carry_starts)]), self.carry_starts)
            self.num_sequences += 1
            return num_tail, num_tail
        return self.seq_len, num_tail


def _histogram_bin(num_tokens: int) -> int:
    return int(math.log2(num_tokens) * HIST_BINS_PER_OCTAVE)


def _percentiles(histogram: list[int]) -> dict[str, int]:
    counts = np.asarray(histogram, dtype=np.int64)
    total = counts.sum()
    if not total:
        return {}
    cumulative = np.cumsum(counts)
    result = {}
    for p in (0, 10, 50, 90, 99, 100):
        b = int(np.searchsorted(cumulative, max(1, math.ceil(total * p / 100)), side="left"))
        result[f"p{p}"] = int(round(2 ** ((b + 0.5) / HIST_BINS_PER_OCTAVE)))
    return result


def _new_stats() -> dict[str, Any]:
    return {
        "source_items": 0,
        "documents_read": 0,
        "tokens_read": 0,
        "skipped_not_utf8": 0,
        "empty_documents": 0,
        "duplicate_documents": 0,
        "duplicate_tokens": 0,
        "too_short_documents": 0,
        "too_short_tokens": 0,
        "too_long_documents": 0,
        "too_long_tokens": 0,
        "length_histogram": [0] * (64 * HIST_BINS_PER_OCTAVE),
        "splits": {},
    }


def _new_split_stats() -> dict[str, int]:
    return {"documents": 0, "document_tokens": 0, "special_tokens": 0}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _fingerprint(config: PrepConfig, tokenizer_identity: dict) -> str:
    options = {k: v for k, v in to_dict(config).items() if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"options": options, "tokenizer": tokenizer_identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _remove_outputs(out: Path, existed: bool = True) -> None:
    """Remove what `prep pack` writes in out, and out itself when this run created it."""
    for name in ("train", "val"):
        shutil.rmtree(out / name, ignore_errors=True)
    for path in out.glob(".prep_*"):
        path.unlink()
    for name in (PREP_FILE, SUMMARY_FILE, CONFIG_FILE):
        (out / name).unlink(missing_ok=True)
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _prepare_out_dir(out: Path, fingerprint: str, overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete'; refuses a directory holding other output unless overwrite."""
    prep_file = out / PREP_FILE
    if prep_file.is_file():
        old = json.loads(prep_file.read_text())
        if old.get("fingerprint") != fingerprint:
            if not overwrite:
                raise UserError(
                    f"{out} holds shards packed with different options or tokenizer: "
                    "use another --out, or --overwrite to replace them"
                )
            _remove_outputs(out)
            return "fresh"
        if overwrite:
            _remove_outputs(out)
            return "fresh"
        if (out / SUMMARY_FILE).is_file() and not (out / STATE_FILE).is_file():
            return "complete"
        return "resume"
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty and is no `prep pack` output: choose an empty or new --out")
        _remove_outputs(out)
    return "fresh"


def pack(config: PrepConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a prep pack; returns the summary (with `already_complete` True when there was nothing to do)."""
    if not config.inputs:
        raise UserError("no inputs: give at least one --input PATH")
    if not config.out:
        raise UserError("no output directory: give --out DIR")
    check_inputs(config.inputs)
    # Recorded by absolute path, so that `prep inspect`, training and export find it from any directory.
    config = dataclasses.replace(config, tokenizer=str(Path(config.tokenizer).resolve()))
    tokenizer = load_tokenizer(config.tokenizer)
    dtype = token_dtype_for(tokenizer.vocab_size, config.token_dtype)
    document_delimiters(config, tokenizer)  # a token that does not exist is an error before anything is written
    out = Path(config.out)
    fingerprint = _fingerprint(config, tokenizer.identity)
    status = _prepare_out_dir(out, fingerprint, overwrite)
    if status == "complete":
        summary = json.loads((out / SUMMARY_FILE).read_text())
        summary["already_complete"] = True
        return summary
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if status == "fresh":
        save_config(config, out / CONFIG_FILE)
        record = {"fingerprint": fingerprint, "tokenizer": tokenizer.identity, "config": to_dict(config)}
        write_json_atomic(out / PREP_FILE, record)
    state = None
    if status == "resume" and (out / STATE_FILE).is_file():
        state = json.loads((out / STATE_FILE).read_text())
    try:
        summary = _run(config, tokenizer, dtype, out, state, progress)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            _remove_outputs(out, existed)
            raise UserError(f"no space left writing to {out}: free disk space or choose another --out") from None
        raise
    except UserError:
        _remove_outputs(out, existed)  # bad input: leave no half-written output behind
        raise
    summary["already_complete"] = False
    return summary


def document_delimiters(config: PrepConfig, tokenizer) -> tuple[int | None, int | None]:
    """(id before, id after) each document, None for none: prep.doc_start / doc_end, switched by add_bos / add_eos."""
    for wanted, choice, which in ((config.add_bos, config.doc_start, "BOS"), (config.add_eos, config.doc_end, "EOS")):
        if wanted and choice == "auto" and (tokenizer.bos_id if which == "BOS" else tokenizer.eos_id) is None:
            raise UserError(
                f"the tokenizer has no {which} token: use --no-{which.lower()}, name a token with "
                f"--doc-{'start' if which == 'BOS' else 'end'}, or use a tokenizer that has one"
            )
    start_id, end_id = tokenizer.document_delimiters(config.doc_start, config.doc_end)
    return (start_id if config.add_bos else None), (end_id if config.add_eos else None)


def _run(config: PrepConfig, tokenizer, dtype: np.dtype, out: Path, state, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    split_names = ["train", "val"] if config.val_fraction > 0 else ["train"]
    stats = state["stats"] if state else _new_stats()
    packers: dict[str, SequencePacker] = {}
    for name in split_names:
        split_state = state["splits"][name] if state else None
        writer_state = split_state["writer"] if split_state else None
        writer = ShardWriter(out / name, config.seq_len, dtype, config.sequences_per_shard, writer_state)
        packers[name] = SequencePacker(
            writer,
            config.seq_len,
            dtype,
            split_state["carry"] if split_state else None,
            split_state["carry_starts"] if split_state else None,
        )
        stats["splits"].setdefault(name, _new_split_stats())
    seen_hashes: set[int] = set()
    if state and config.dedup:
        seen_hashes = set(np.load(out / state["dedup_file"], allow_pickle=False).tolist())
    weights = config.weights or [1.0] * len(config.inputs)
    start_id, end_id = document_delimiters(config, tokenizer)
    bos = np.array([] if start_id is None else [start_id], dtype=dtype)
    eos = np.array([] if end_id is None else [end_id], dtype=dtype)
    pad_id = next(i for i in (tokenizer.pad_id, end_id, tokenizer.eos_id, 0) if i is not None)

    items = iter_corpus(config.inputs, glob=config.glob, text_field=config.text_field, strict=config.strict)
    items = itertools.islice(items, stats["source_items"], None)  # resume: skip what earlier runs consumed
    first_window = state["next_window"] if state else 0
    num_workers = config.num_workers or os.cpu_count() or 1
    started = time.perf_counter()
    tokens_this_run = 0
    bar = tqdm(unit=" docs", disable=not progress, initial=stats["documents_read"], dynamic_ncols=True)
    context = multiprocessing.get_context("spawn")  # workers start clean: no forked locks or threads
    with context.Pool(num_workers, initializer=_init_worker, initargs=(config.tokenizer,)) as pool:
        windows = _submitted_windows(pool, items, first_window, config.window_docs, config.dedup, dtype)
        for window, flat, lengths, hashes in _tokenized_windows(windows, config.dedup):
            docs = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
            by_split = _select_documents(config, window, docs, lengths, hashes, seen_hashes, weights, stats)
            for name, selected in by_split.items():
                split_stats = stats["splits"][name]
                split_stats["documents"] += len(selected)
                split_stats["document_tokens"] += int(sum(len(d) for d in selected))
                split_stats["special_tokens"] += len(selected) * (len(bos) + len(eos))
                packers[name].add([np.concatenate([bos, d, eos]) for d in selected])
            stats["source_items"] += window.num_items
            tokens_this_run += int(lengths.sum())
            _save_state(out, window.index + 1, stats, packers, seen_hashes if config.dedup else None)
            bar.update(len(lengths))
            bar.set_postfix_str(f"{tokens_this_run / (time.perf_counter() - started):,.0f} tok/s")
    bar.close()
    if not stats["documents_read"]:
        raise UserError(f"the corpus is empty: {config.inputs} hold no documents; check the paths and --glob")

    manifests = {}
    for name, packer in packers.items():
        last_num_valid, num_tail = packer.finish_tail(config.tail, pad_id)
        stats["splits"][name]["tail_tokens_" + ("padded" if config.tail == "pad" else "dropped")] = num_tail
        if config.tail == "pad":
            stats["splits"][name]["padding_tokens"] = config.seq_len - num_tail if num_tail else 0
        if packer.num_sequences == 0 and name == "train":
            raise UserError(
                f"the corpus packs into 0 sequences of {config.seq_len} tokens: "
                "lower --seq-len, loosen the length filters, or use --tail pad"
            )
        manifests[name] = packer.writer.finish(
            {
                "split": name,
                "vocab_size": tokenizer.vocab_size,
                "tokenizer": {**tokenizer.identity, "path": config.tokenizer},
                # bos / eos: the ids each document starts / ends with here (None: none), see doc_start / doc_end
                "special_ids": {"bos": start_id, "eos": end_id, "pad": tokenizer.pad_id},
                "add_bos": config.add_bos,
                "add_eos": config.add_eos,
                "pad_value": pad_id,
                "last_num_valid": last_num_valid if packer.num_sequences else 0,
                "num_documents": stats["splits"][name]["documents"],
                "prep_config": to_dict(config),
            }
        )
        stats["splits"][name]["sequences"] = manifests[name]["num_sequences"]
        stats["splits"][name]["shards"] = len(manifests[name]["shards"])
    summary = _summary(stats, config)
    write_json_atomic(out / SUMMARY_FILE, summary)  # timing is left out so that reruns are byte-identical
    (out / STATE_FILE).unlink()
    for path in out.glob(".prep_dedup-*"):
        path.unlink()
    elapsed = time.perf_counter() - started
    summary["timing"] = {"seconds": elapsed, "tokens_per_second": tokens_this_run / max(elapsed, 1e-9)}
    return summary


def _select_documents(config, window, docs, lengths, hashes, seen_hashes, weights, stats) -> dict[str, list]:
    """Filter, assign to a split, repeat by weight and shuffle the documents of one window (deterministic)."""
    rng = np.random.default_rng([config.seed, window.index])
    split_draw = rng.random(len(docs))  # drawn for every document so the draw does not depend on the filters
    weight_draw = rng.random(len(docs))
    selected: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    stats["skipped_not_utf8"] += len(window.skipped)
    for i, doc in enumerate(docs):
        n = int(lengths[i])
        if n == 0:
            stats["empty_documents"] += 1
            continue
        stats["documents_read"] += 1
        stats["tokens_read"] += n
        stats["length_histogram"][_histogram_bin(n)] += 1
        if hashes is not None:
            h = int(hashes[i])
            if h in seen_hashes:
                stats["duplicate_documents"] += 1
                stats["duplicate_tokens"] += n
                continue
            seen_hashes.add(h)
        if n < config.min_doc_tokens:
            stats["too_short_documents"] += 1
            stats["too_short_tokens"] += n
            continue
        if config.max_doc_tokens and n > config.max_doc_tokens:
            stats["too_long_documents"] += 1
            stats["too_long_tokens"] += n
            continue
        weight = weights[window.input_index[i]]
        copies = int(weight) + int(weight_draw[i] < weight - int(weight))
        split = "val" if split_draw[i] < config.val_fraction else "train"
        selected[split] += [doc] * copies
    result = {}
    for name, split_docs in selected.items():
        if name == "val" and config.val_fraction <= 0:
            continue
        order = rng.permutation(len(split_docs)) if config.shuffle else range(len(split_docs))
        result[name] = [split_docs[k] for k in order]
    return result


def _save_state(out: Path, next_window: int, stats, packers, seen_hashes) -> None:
    state: dict[str, Any] = {"next_window": next_window, "stats": stats, "splits": {}}
    for name, packer in packers.items():
        state["splits"][name] = {
            "writer": packer.writer.state(),
            "carry": packer.carry.tolist(),
            "carry_starts": packer.carry_starts.tolist(),
        }
    # includes a `.partial` left by a run killed before its rename, which the write below may replace and rename
    old_dedup = list(out.glob(".prep_dedup-*"))
    if seen_hashes is not None:
        # a new file per window: the state must never point at hashes of a window it does not include
        state["dedup_file"] = f".prep_dedup-{next_window:08d}.npy"
        with open_atomic(out / state["dedup_file"], "wb") as f:
            np.save(f, np.fromiter(seen_hashes, dtype=np.uint64, count=len(seen_hashes)), allow_pickle=False)
    write_json_atomic(out / STATE_FILE, state, indent=None)  # compact: it holds token lists
    for path in old_dedup:
        if path.name != state.get("dedup_file"):
            path.unlink(missing_ok=True)


def _summary(stats: dict[str, Any], config: PrepConfig) -> dict[str, Any]:
    summary = {k: v for k, v in stats.items() if k != "length_histogram"}
    summary["document_length_percentiles"] = _percentiles(stats["length_histogram"])
    summary["filtered_documents"] = (
        stats["duplicate_documents"] + stats["too_short_documents"] + stats["too_long_documents"]
    )
    summary["seq_len"] = config.seq_len
    summary["tail"] = config.tail
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The final table `prep pack` prints."""
    rows = [
        ("documents read", summary["documents_read"]),
        ("tokens read", summary["tokens_read"]),
        ("empty documents (skipped)", summary["empty_documents"]),
        ("files/lines not UTF-8 (skipped)", summary["skipped_not_utf8"]),
        ("duplicates (filtered)", f"{summary['duplicate_documents']} docs / {summary['duplicate_tokens']} tokens"),
        ("too short (filtered)", f"{summary['too_short_documents']} docs / {summary['too_short_tokens']} tokens"),
        ("too long (filtered)", f"{summary['too_long_documents']} docs / {summary['too_long_tokens']} tokens"),
    ]
    for name, split in summary["splits"].items():
        tail_key = next(k for k in split if k.startswith("tail_tokens_"))
        rows += [
            (f"{name}: documents packed", split["documents"]),
            (f"{name}: tokens packed (+BOS/EOS)", f"{split['document_tokens']} (+{split['special_tokens']})"),
            (f"{name}: sequences x {summary['seq_len']}", split["sequences"]),
            (f"{name}: tail tokens {tail_key.removeprefix('tail_tokens_')}", split[tail_key]),
        ]
        if "padding_tokens" in split:
            rows.append((f"{name}: padding tokens (masked in the loss)", split["padding_tokens"]))
    pct = summary["document_length_percentiles"]
    if pct:
        rows.append(("document tokens p0/p10/p50/p90/p99/p100 (≈)", "/".join(str(v) for v in pct.values())))
    if "timing" in summary:
        t = summary["timing"]
        rows.append(("time, throughput", f"{t['seconds']:.1f} s, {t['tokens_per_second']:,.0f} tokens/s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
