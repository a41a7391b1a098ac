"""Corpus readers (text dirs with a glob, JSONL .gz/.zst, parquet, HF save_to_disk) and the tokenizers."""

import gzip
import json

import pytest
import zstandard
from prep_fixtures import read_documents, synthetic_docs, write_text_dir

from data_prep.pack import pack
from data_prep.sources import Skipped, iter_source
from data_prep.tokenizer import load_tokenizer, train_sentencepiece
from longctx.config import PrepConfig, from_dict

DOCS = synthetic_docs(12, seed=4)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_sentencepiece(synthetic_docs(40), 400, tmp_path_factory.mktemp("tok") / "tok.model")


def test_text_dir_is_recursive_sorted_and_globbed(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "deep" / "x.py").write_text("second")
    (tmp_path / "a.py").write_text("first")
    (tmp_path / "notes.md").write_text("not python")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe")
    items = list(iter_source(tmp_path, glob="**/*.py"))
    assert items[:2] == ["first", "second"]  # a.py, b/deep/x.py, bad.py
    assert isinstance(items[2], Skipped) and items[2].where.endswith("bad.py")
    assert len(list(iter_source(tmp_path))) == 4


def test_jsonl_gz_zst_parquet_and_hf_dataset_read_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    (tmp_path / "c.jsonl").write_text(lines)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "hf"))
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet", "hf"):
        assert list(iter_source(tmp_path / name, text_field="body")) == DOCS, name


def test_sentencepiece_tokenizer_is_llama_like_and_exports_to_hf(tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 400)
    assert tok.identity["sha256"] and tok.identity["name"] == "tok.model"
    text = "def f(x):\n    return x  # ☃ snowman, unseen: byte fallback\n"
    ids = tok.encode(text)
    assert 1 not in ids and 2 not in ids  # no specials added
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "long context"]) == [ids, tok.encode("long context")]

    tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.encode(text, add_special_tokens=False) == ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    reloaded = load_tokenizer(tmp_path / "hf")  # a HF tokenizer directory works as a prep tokenizer too
    assert reloaded.encode(text) == ids and reloaded.vocab_size == 400
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (1, 2, 3)


def test_pack_reads_mixed_sources_in_order(tokenizer_path, tmp_path):
    write_text_dir(tmp_path / "text", DOCS[:4])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[4:]))
    config = from_dict(
        PrepConfig,
        {
            "inputs": [str(tmp_path / "text"), str(tmp_path / "c.jsonl")],
            "tokenizer": str(tokenizer_path),
            "out": str(tmp_path / "out"),
            "seq_len": 32,
            "shuffle": False,
            "tail": "pad",
            "num_workers": 1,
        },
    )
    pack(config, progress=False)
    tok = load_tokenizer(tokenizer_path)
    assert read_documents(tmp_path / "out" / "train") == [tok.encode(d) for d in DOCS]


def test_prep_tokenizer_command(tmp_path, capsys):
    from longctx.cli import main

    write_text_dir(tmp_path / "c", synthetic_docs(30))
    (tmp_path / "c" / "skip.bin").write_bytes(b"\xff\x00\xfe")
    out = tmp_path / "t.model"
    assert main(["prep", "tokenizer", "--input", str(tmp_path / "c"), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "vocab 300, bos=1 eos=2 pad=3" in capsys.readouterr().out
    assert load_tokenizer(out).decode(load_tokenizer(out).encode("naïve 東京")) == "naïve 東京"
    code = main(["prep", "tokenizer", "--input", str(tmp_path / "c"), "--vocab-size", "300", "--out", str(tmp_path)])
    assert code == 2 and "must end in .model" in capsys.readouterr().err
