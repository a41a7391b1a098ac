"""Packing throughput and memory: `longctx prep pack` vs `datasets.map(batched, num_proc=N)` + group_texts.

Both pipelines start from the same JSONL corpus (the Python standard library's sources, repeated up to
--corpus-mb; or, with --corpus distinct, every distinct .py file on the machine once) and end with fixed-length
sequences of --seq-len tokens, using the same sentencepiece tokenizer (BOS + tokens + EOS per document in both).
longctx encodes through its chunk cache, which gives sentencepiece's ids exactly (--verify-exact checks that on
the whole corpus). The baseline runs twice: with sentencepiece itself, and as run_clm.py does, with the HF
AutoTokenizer converted from the same model.
Each runs in its own process tree; wall time covers the whole pipeline (the baseline's JSON → Arrow load
included, as a user would run it), and peak RSS is the largest sum of RSS over the process tree, sampled
every 50 ms. CPU seconds (the whole tree's) are reported too: other work on a shared machine skews wall time.

    .venv/bin/python benchmarks/prep_throughput.py --corpus-mb 1024
    .venv/bin/python benchmarks/prep_throughput.py --corpus distinct --baseline autotokenizer --verify-exact \
        --result benchmarks/results/prep_throughput_distinct.json

Writes benchmarks/results/prep_throughput.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent

BASELINE = r"""
import time
started = time.perf_counter()  # the pipeline's time: process start to grouped sequences (counting excluded)
import sys
import datasets
from data_prep.tokenizer import load_tokenizer

corpus, tokenizer_path, seq_len, num_proc, cache = sys.argv[1:6]
seq_len, num_proc = int(seq_len), int(num_proc)
tok = load_tokenizer(tokenizer_path)
bos, eos = tok.bos_id, tok.eos_id
if sys.argv[6] == "autotokenizer":  # what run_clm.py does: the model's HF tokenizer (the same vocabulary)
    from transformers import AutoTokenizer

    encode = AutoTokenizer.from_pretrained(sys.argv[7])
    encode_batch = lambda texts: encode(texts, add_special_tokens=False)["input_ids"]
else:  # exactly the encoder longctx uses
    encode_batch = tok.encode_batch

def tokenize(batch):
    return {"input_ids": [[bos] + ids + [eos] for ids in encode_batch(batch["text"])]}

def group_texts(batch):  # the run_clm.py recipe: concatenate, drop the remainder, cut into blocks
    concatenated = [t for ids in batch["input_ids"] for t in ids]
    total = len(concatenated) // seq_len * seq_len
    return {"input_ids": [concatenated[i : i + seq_len] for i in range(0, total, seq_len)]}

ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
grouped = ds.map(group_texts, batched=True, num_proc=num_proc)
seconds = time.perf_counter() - started
num_tokens = sum(len(x) for batch in ds.iter(batch_size=10000) for x in batch["input_ids"])
print("BASELINE_TOKENS", num_tokens, "SEQUENCES", len(grouped), "SECONDS", seconds)
"""


def _read_sources(roots: list[Path]) -> list[str]:
    texts, seen = [], set()
    for root in roots:
        for f in sorted([root] if root.suffix == ".py" else root.rglob("*.py")):
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip() and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


def build_corpus(path: Path, target_bytes: int, kind: str) -> int:
    """JSONL of Python sources up to target_bytes.

    "stdlib": the standard library's sources repeated (each copy gets a distinct first line). "distinct": every
    distinct .py file of the standard library and of this interpreter's site-packages once, no repetition, for
    encoders whose speed depends on how often text recurs (the chunk cache of `prep pack`).
    """
    if path.exists() and (path.stat().st_size >= target_bytes or kind == "distinct"):
        return path.stat().st_size
    sys.path.insert(0, str(REPO))
    from longctx.demo import stdlib_inputs

    roots = [Path(p) for p in stdlib_inputs()]
    if kind == "distinct":
        roots += [Path(p) for p in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})]
    texts = _read_sources(roots)
    tmp = path.with_name(path.name + ".partial")
    written, copy = 0, 0
    with open(tmp, "w") as out:
        while written < target_bytes:
            for text in texts:
                line = json.dumps({"text": f"# copy {copy}\n{text}" if kind == "stdlib" else text}) + "\n"
                out.write(line)
                written += len(line)
                if written >= target_bytes:
                    break
            copy += 1
            if kind == "distinct":
                break
    os.replace(tmp, path)
    return path.stat().st_size


def verify_exact(corpus: Path, tokenizer: Path) -> dict:
    """Every document's ids from `prep pack`'s encoder (the chunk cache) against sentencepiece's own, in batches."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    docs = tokens = 0
    with open(corpus) as f:
        while batch := [json.loads(line)["text"] for line in itertools.islice(f, 2000)]:
            flat, _ = tok.encode_flat(batch, np.dtype(np.uint32))
            expected = np.fromiter(itertools.chain.from_iterable(tok.encode_batch(batch)), dtype=np.uint32)
            if not np.array_equal(flat, expected):
                raise SystemExit(f"the chunk cache differs from sentencepiece in documents {docs}..{docs + len(batch)}")
            docs, tokens = docs + len(batch), tokens + len(expected)
    return {"documents": docs, "tokens": tokens, "chunk_cache": tok._chunk_cache is not None}


def run_measured(argv: list[str], env=None) -> dict:
    """Run a command; wall time, CPU time of the whole tree, and peak RSS summed over the tree (sampled)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(process.pid)
    peak = 0
    load_samples = []  # 1-minute load average, once a second: how much other work competed for the cores
    while process.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        if time.perf_counter() - started >= len(load_samples):
            load_samples.append(os.getloadavg()[0])
        time.sleep(0.05)
    output = process.stdout.read()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # counts every waited-for descendant
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    if process.returncode:
        raise SystemExit(f"{argv[:4]} failed ({process.returncode}):\n{output[-3000:]}")
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "cpu_utilization": cpu / wall,  # cores kept busy on average; os.cpu_count() is the ceiling
        "mean_load_average": sum(load_samples) / max(len(load_samples), 1),
        "peak_rss_mb": peak / 2**20,
        "output": output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default="/tmp/longctx-prep-bench")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--corpus",
        choices=["stdlib", "distinct"],
        default="stdlib",
        help="stdlib: the stdlib's sources repeated to --corpus-mb; distinct: every distinct .py file of the stdlib "
        "and site-packages once (capped at --corpus-mb), no repetition",
    )
    parser.add_argument(
        "--verify-exact",
        action="store_true",
        help="also check, document by document, that prep pack's encoder gives sentencepiece's ids on the corpus",
    )
    parser.add_argument(
        "--baseline",
        choices=["both", "same-encoder", "autotokenizer"],
        default="both",
        help="which baseline(s) to run: the same sentencepiece encoder, the run_clm.py-style AutoTokenizer, or both",
    )
    parser.add_argument("--result", default=str(REPO / "benchmarks" / "results" / "prep_throughput.json"))
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"{args.corpus}-{args.corpus_mb}mb.jsonl"
    corpus_bytes = build_corpus(corpus, args.corpus_mb << 20, args.corpus)
    tokenizer = work / "tokenizer.model"
    if not tokenizer.exists():
        sys.path.insert(0, str(REPO))
        from data_prep.sources import Skipped, iter_corpus
        from data_prep.tokenizer import train_sentencepiece
        from longctx.demo import DEMO_MAX_SENTENCES, DEMO_VOCAB_SIZE, stdlib_inputs

        docs = (x for _, x in iter_corpus(stdlib_inputs(), glob="**/*.py", text_field="text", strict=False))
        train_sentencepiece(
            (d for d in docs if not isinstance(d, Skipped)),
            DEMO_VOCAB_SIZE,
            tokenizer,
            max_sentences=DEMO_MAX_SENTENCES,
        )
    print(f"corpus {corpus} ({corpus_bytes / 2**20:.0f} MiB), load average {os.getloadavg()}")

    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    longctx = str(Path(sys.executable).parent / "longctx")
    ours = run_measured(
        [
            longctx,
            "prep",
            "pack",
            "--quiet",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--seq-len",
            str(args.seq_len),
            "--out",
            str(out),
            "--num-workers",
            str(args.num_proc),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    ours_tokens = summary["tokens_read"] + summary["splits"]["train"]["special_tokens"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_start": os.getloadavg()},
        "corpus": args.corpus,
        "corpus_mib": corpus_bytes / 2**20,
        "seq_len": args.seq_len,
        "num_proc": args.num_proc,
        "ours": {
            "seconds": ours["seconds"],
            "tokens": ours_tokens,
            "tokens_per_second": ours_tokens / ours["seconds"],
            "cpu_seconds": ours["cpu_seconds"],
            "tokens_per_cpu_second": ours_tokens / ours["cpu_seconds"],
            "cpu_utilization": ours["cpu_utilization"],
            "mean_load_average": ours["mean_load_average"],
            "peak_rss_mb": ours["peak_rss_mb"],
            "sequences": summary["splits"]["train"]["sequences"],
        },
    }
    print(f"ours: {result['ours']}")
    if not args.skip_baseline:
        hf_dir = work / "hf-tokenizer"
        sys.path.insert(0, str(REPO))
        from data_prep.tokenizer import load_tokenizer

        load_tokenizer(tokenizer).save_hf(hf_dir)
        encoders = ("same-encoder", "autotokenizer") if args.baseline == "both" else (args.baseline,)
        for encoder in encoders:
            cache = work / "hf-cache"
            shutil.rmtree(cache, ignore_errors=True)
            argv = [str(corpus), str(tokenizer), str(args.seq_len), str(args.num_proc), str(cache), encoder]
            baseline = run_measured([sys.executable, "-c", BASELINE, *argv, str(hf_dir)])
            shutil.rmtree(cache, ignore_errors=True)
            words = baseline["output"].split("BASELINE_TOKENS")[1].split()
            base_tokens, base_sequences, base_seconds = int(words[0]), int(words[2]), float(words[4])
            if encoder == "same-encoder":
                assert base_tokens == ours_tokens, (base_tokens, ours_tokens)  # the same work on both sides
            entry = {
                "seconds": base_seconds,
                "tokens": base_tokens,
                "tokens_per_second": base_tokens / base_seconds,
                "cpu_seconds": baseline["cpu_seconds"],
                "tokens_per_cpu_second": base_tokens / baseline["cpu_seconds"],
                "cpu_utilization": baseline["cpu_utilization"],  # over the whole run; `seconds` excludes counting
                "mean_load_average": baseline["mean_load_average"],
                "peak_rss_mb": baseline["peak_rss_mb"],
                "sequences": base_sequences,
                "token_count_difference": base_tokens - ours_tokens,  # HF's conversion differs on rare inputs
            }
            entry["speedup"] = result["ours"]["tokens_per_second"] / entry["tokens_per_second"]
            entry["speedup_per_cpu_second"] = result["ours"]["tokens_per_cpu_second"] / entry["tokens_per_cpu_second"]
            result[f"baseline_{encoder}"] = entry
            print(f"baseline ({encoder}): {entry}")
            print(f"speedup: {entry['speedup']:.2f}x wall, {entry['speedup_per_cpu_second']:.2f}x per CPU second")
    if args.verify_exact:
        result["verify_exact"] = verify_exact(corpus, tokenizer)
        print(f"exact: {result['verify_exact']}")
    result["machine"]["load_average_at_end"] = os.getloadavg()  # other work on the machine skews both sides
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.result + ".partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.result)
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
