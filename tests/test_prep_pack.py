"""`prep pack`: round trip, boundaries, split, determinism, resume after kill -9, rerun/overwrite, summary."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prep_fixtures import read_documents, synthetic_docs, write_text_dir

from data_prep.pack import pack
from data_prep.tokenizer import load_tokenizer, train_sentencepiece
from longctx.config import PrepConfig, from_dict
from longctx.errors import UserError
from longctx.shards import open_shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_text_dir(root / "text", synthetic_docs(60))
    tokenizer = train_sentencepiece(docs, 500, root / "tok.model")
    return root / "text", docs, tokenizer


def _config(corpus_dir, tokenizer, out, **options):
    base = {"inputs": [str(corpus_dir)], "tokenizer": str(tokenizer), "out": str(out), "seq_len": 128}
    base.update(num_workers=1, sequences_per_shard=8, window_docs=16)
    return from_dict(PrepConfig, {**base, **options})


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_round_trip_equals_tokenizer_output_in_order(corpus, tmp_path):
    corpus_dir, docs, tok_path = corpus
    summary = pack(_config(corpus_dir, tok_path, tmp_path, shuffle=False, tail="pad"), progress=False)
    tokenizer = load_tokenizer(tok_path)
    expected = [tokenizer.encode(d) for d in docs]
    assert read_documents(tmp_path / "train") == expected
    split = summary["splits"]["train"]
    assert summary["documents_read"] == split["documents"] == len(docs)
    assert split["document_tokens"] == summary["tokens_read"] == sum(map(len, expected))
    shards = open_shards(tmp_path / "train")
    assert len(shards) == split["sequences"] and shards.manifest["dtype"] == "uint16"
    last = len(shards) - 1
    assert shards.num_valid(last) == split["tail_tokens_padded"] > 0
    assert split["padding_tokens"] == 128 - split["tail_tokens_padded"]
    assert (shards[last][shards.num_valid(last) :] == tokenizer.pad_id).all()


def test_boundaries_mark_bos_and_tail_drop_is_counted(corpus, tmp_path):
    corpus_dir, docs, tok_path = corpus
    summary = pack(_config(corpus_dir, tok_path, tmp_path, seed=3), progress=False)
    shards = open_shards(tmp_path / "train")
    num_starts = 0
    for i in range(len(shards)):
        starts = shards.doc_starts(i)
        num_starts += len(starts)
        assert (shards[i][starts] == 1).all()  # every recorded start holds BOS...
        bos_positions = np.flatnonzero(shards[i] == 1)
        assert bos_positions.tolist() == starts.tolist()  # ...and every BOS is recorded
    split = summary["splits"]["train"]
    total = split["document_tokens"] + split["special_tokens"]
    assert total == split["sequences"] * 128 + split["tail_tokens_dropped"]
    assert num_starts <= split["documents"]  # documents whose start fell in the dropped tail have no start


def test_validation_split_is_disjoint_by_document_and_loses_nothing(corpus, tmp_path):
    corpus_dir, docs, tok_path = corpus
    summary = pack(_config(corpus_dir, tok_path, tmp_path, val_fraction=0.3, tail="pad"), progress=False)
    train, val = read_documents(tmp_path / "train"), read_documents(tmp_path / "val")
    assert len(val) == summary["splits"]["val"]["documents"] > 0 and len(train) > len(val)
    tokenizer = load_tokenizer(tok_path)
    expected = sorted(tuple(tokenizer.encode(d)) for d in docs)
    assert sorted(map(tuple, train + val)) == expected
    assert not set(map(tuple, train)) & set(map(tuple, val))
    assert open_shards(tmp_path / "val").manifest["split"] == "val"


def test_deterministic_for_a_seed(corpus, tmp_path):
    corpus_dir, _, tok_path = corpus
    pack(_config(corpus_dir, tok_path, tmp_path / "a", val_fraction=0.2, num_workers=2), progress=False)
    pack(_config(corpus_dir, tok_path, tmp_path / "b", val_fraction=0.2), progress=False)
    pack(_config(corpus_dir, tok_path, tmp_path / "c", val_fraction=0.2, seed=1), progress=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a.keys() == b.keys()
    for name in a:
        if name not in ("prep.json", "prep_config.yaml") and not name.endswith("manifest.json"):
            assert a[name] == b[name], name  # worker count changes nothing but the recorded options
    assert a["train/shard-00000.tokens"] != c["train/shard-00000.tokens"]


def test_rerun_is_a_no_op_and_other_options_are_refused(corpus, tmp_path):
    corpus_dir, _, tok_path = corpus
    first = pack(_config(corpus_dir, tok_path, tmp_path), progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = pack(_config(corpus_dir, tok_path, tmp_path), progress=False)
    assert again["already_complete"] and not first["already_complete"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    with pytest.raises(UserError, match="different options.*--overwrite"):
        pack(_config(corpus_dir, tok_path, tmp_path, seq_len=64), progress=False)
    replaced = pack(_config(corpus_dir, tok_path, tmp_path, seq_len=64), overwrite=True, progress=False)
    assert not replaced["already_complete"] and open_shards(tmp_path / "train").manifest["seq_len"] == 64


def test_filters_dedup_weights_and_summary_json(corpus, tmp_path):
    corpus_dir, docs, tok_path = corpus
    dup_dir = write_text_dir(tmp_path / "dups", docs[:5]) and tmp_path / "dups"
    tokenizer = load_tokenizer(tok_path)
    lengths = sorted(len(tokenizer.encode(d)) for d in docs)
    lo, hi = lengths[10], lengths[-10]
    out = tmp_path / "out"
    config = _config(corpus_dir, tok_path, out, dedup=True, min_doc_tokens=lo, max_doc_tokens=hi, tail="pad")
    config.inputs.append(str(dup_dir))
    config.weights = [2.0, 1.0]
    summary = pack(from_dict(PrepConfig, config.__dict__), progress=False)
    assert summary["duplicate_documents"] == 5
    num_short = sum(n < lo for n in lengths)
    num_long = sum(n > hi for n in lengths)
    assert summary["too_short_documents"] == num_short and summary["too_long_documents"] == num_long
    kept = len(docs) - num_short - num_long
    assert summary["splits"]["train"]["documents"] == 2 * kept  # weight 2.0: every document twice
    assert len(read_documents(out / "train")) == 2 * kept
    saved = json.loads((out / "summary.json").read_text())
    assert saved["filtered_documents"] == 5 + num_short + num_long
    assert set(saved["document_length_percentiles"]) == {"p0", "p10", "p50", "p90", "p99", "p100"}


def test_kill_minus_9_then_rerun_is_byte_identical(corpus, tmp_path):
    corpus_dir, _, tok_path = corpus
    big = write_text_dir(tmp_path / "big", synthetic_docs(400, seed=7))
    assert big
    options = dict(val_fraction=0.1, window_docs=4, sequences_per_shard=4, dedup=True)
    pack(_config(tmp_path / "big", tok_path, tmp_path / "whole", **options), progress=False)

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "longctx.cli", "prep", "pack", "--quiet", "--input", str(tmp_path / "big")]
    argv += ["--tokenizer", str(tok_path), "--out", str(out), "--seq-len", "128", "--num-workers", "1"]
    argv += ["--val-fraction", "0.1", "--window-docs", "4", "--sequences-per-shard", "4", "--dedup"]
    process = subprocess.Popen(argv)
    state_file = out / ".prep_state.json"
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if state_file.exists() and len(list((out / "train").glob("shard-*.tokens"))) >= 3:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the packer finished before it could be killed: make the corpus bigger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()
    assert subprocess.run(argv).returncode == 0
    assert _files(out).keys() == _files(tmp_path / "whole").keys()
    for name, data in _files(tmp_path / "whole").items():
        if name not in ("prep.json", "prep_config.yaml") and not name.endswith("manifest.json"):
            assert _files(out)[name] == data, name
    whole_manifest = json.loads((tmp_path / "whole" / "train" / "manifest.json").read_text())
    killed_manifest = json.loads((out / "train" / "manifest.json").read_text())
    whole_manifest["prep_config"].pop("out"), killed_manifest["prep_config"].pop("out")
    assert whole_manifest == killed_manifest


class Killed(Exception):
    pass


def test_rerun_after_a_kill_between_dedup_write_and_rename(corpus, tmp_path, monkeypatch):
    """A run killed with the next window's `.prep_dedup-*.npy.partial` on disk resumes to the uninterrupted output."""
    corpus_dir, _, tok_path = corpus
    options = dict(window_docs=8, sequences_per_shard=4, dedup=True)
    pack(_config(corpus_dir, tok_path, tmp_path / "whole", **options), progress=False)
    renames, replace = [], os.replace

    def replace_then_die_before_the_second_dedup_rename(src, dst):
        if Path(src).name.startswith(".prep_dedup-"):
            renames.append(src)
            if len(renames) == 2:
                shutil.copy(src, tmp_path / "partial")  # a kill leaves it; the exception's cleanup would not
                raise Killed
        replace(src, dst)

    monkeypatch.setattr("longctx.atomic.os.replace", replace_then_die_before_the_second_dedup_rename)
    with pytest.raises(Killed):
        pack(_config(corpus_dir, tok_path, tmp_path / "killed", **options), progress=False)
    monkeypatch.undo()
    shutil.copy(tmp_path / "partial", renames[-1])
    assert Path(renames[-1]).exists() and (tmp_path / "killed" / ".prep_state.json").exists()
    pack(_config(corpus_dir, tok_path, tmp_path / "killed", **options), progress=False)
    whole, killed = _files(tmp_path / "whole"), _files(tmp_path / "killed")
    assert killed.keys() == whole.keys()
    for name, data in whole.items():
        if name not in ("prep.json", "prep_config.yaml") and not name.endswith("manifest.json"):
            assert killed[name] == data, name


def test_cli_summary_rerun_and_saved_config_reproduce_the_run(corpus, tmp_path, capsys):
    from longctx.cli import main

    corpus_dir, _, tok_path = corpus
    argv = ["prep", "pack", "--quiet", "--input", str(corpus_dir), "--tokenizer", str(tok_path), "--out"]
    argv += [str(tmp_path), "--seq-len", "128", "--num-workers", "1", "--val-fraction", "0.2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {k.strip(): v.strip() for k, v in (line.strip().split("  ", 1) for line in table.splitlines()[1:])}
    assert rows["train: sequences x 128"] == str(summary["splits"]["train"]["sequences"])
    assert "tokens/s" in table and "val: documents packed" in table
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["prep", "pack", "--quiet", "--config", str(tmp_path / "prep_config.yaml")]) == 0
    assert "already complete" in capsys.readouterr().out


def test_length_percentiles_are_close():
    from data_prep.pack import HIST_BINS_PER_OCTAVE, _histogram_bin, _percentiles

    lengths = np.random.default_rng(0).integers(1, 100_000, size=5000)
    histogram = [0] * (64 * HIST_BINS_PER_OCTAVE)
    for n in lengths:
        histogram[_histogram_bin(int(n))] += 1
    pct = _percentiles(histogram)
    for p in (10, 50, 90):
        exact = np.percentile(lengths, p)
        assert abs(pct[f"p{p}"] - exact) / exact < 0.05, (p, pct, exact)
    assert pct["p100"] >= lengths.max() * 0.97
