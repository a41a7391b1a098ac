"""Each bad input of `prep pack` / `prep inspect`: a one-line error naming the fix, exit 2, no half-written output."""

import errno
import gzip
import json

import pytest
from prep_fixtures import synthetic_docs, write_text_dir

from data_prep.tokenizer import train_sentencepiece
from longctx.cli import main
from longctx.shards import ShardWriter


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(synthetic_docs(40), 400, root / "tok.model")


def _pack(capsys, tokenizer, inputs, out, *extra):
    argv = ["prep", "pack", "--quiet", "--input", *map(str, inputs), "--tokenizer", str(tokenizer)]
    argv += ["--out", str(out), "--seq-len", "64", "--num-workers", "1", *extra]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longctx: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _no_output(out):
    return not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_missing_input_path(capsys, tokenizer, tmp_path):
    code, _, err = _pack(capsys, tokenizer, [tmp_path / "nope"], tmp_path / "out")
    _assert_one_line_error(code, err, "nope does not exist", "check the path")
    assert _no_output(tmp_path / "out")


def test_empty_corpus(capsys, tokenizer, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("")
    code, _, err = _pack(capsys, tokenizer, [tmp_path / "c"], tmp_path / "out")
    _assert_one_line_error(code, err, "corpus is empty")
    assert _no_output(tmp_path / "out")


def test_non_utf8_file_skipped_and_counted_or_an_error_under_strict(capsys, tokenizer, tmp_path):
    write_text_dir(tmp_path / "c", synthetic_docs(20))
    (tmp_path / "c" / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "c" / "zero.txt").write_text("")
    code, out, _ = _pack(capsys, tokenizer, [tmp_path / "c"], tmp_path / "out")
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_not_utf8"] == 1 and summary["empty_documents"] == 1 and summary["documents_read"] == 20
    assert "not UTF-8 (skipped)" in out
    code, _, err = _pack(capsys, tokenizer, [tmp_path / "c"], tmp_path / "strict", "--strict")
    _assert_one_line_error(code, err, "latin1.txt is not UTF-8", "drop --strict")
    assert _no_output(tmp_path / "strict")


def test_bad_json_line_names_file_and_line(capsys, tokenizer, tmp_path):
    path = tmp_path / "c.jsonl.gz"
    lines = [json.dumps({"text": d}) for d in synthetic_docs(5)] + ["{not json"]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    code, _, err = _pack(capsys, tokenizer, [path], tmp_path / "out")
    _assert_one_line_error(code, err, "c.jsonl.gz:6: not valid JSON", "fix or remove that line")
    assert _no_output(tmp_path / "out")


def test_missing_text_field(capsys, tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    code, _, err = _pack(capsys, tokenizer, [path], tmp_path / "out")
    _assert_one_line_error(code, err, "c.jsonl:1: no 'text' field", "--text-field")
    code, _, _ = _pack(capsys, tokenizer, [path], tmp_path / "out2", "--text-field", "content", "--tail", "pad")
    assert code == 0


@pytest.mark.parametrize("seq_len, fragment", [("1", "too small"), ("100000000", "absurdly large")])
def test_bad_seq_len(capsys, tokenizer, tmp_path, seq_len, fragment):
    write_text_dir(tmp_path / "c", synthetic_docs(3))
    code, _, err = _pack(capsys, tokenizer, [tmp_path / "c"], tmp_path / "out", "--seq-len", seq_len)
    _assert_one_line_error(code, err, fragment)
    assert _no_output(tmp_path / "out")


def test_vocab_too_large_for_token_dtype(capsys, tmp_path):
    # a sentencepiece model with > 65535 pieces takes minutes to train; a tokenizer.json is quick to write
    vocab = {f"t{i}": i for i in range(70000)}
    tokenizer_json = {
        "version": "1.0",
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
        "pre_tokenizer": {"type": "Whitespace"},
    }
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    write_text_dir(tmp_path / "c", ["t1 t2 t69999 " * 40])
    argv = ["--token-dtype", "uint16", "--no-bos", "--no-eos"]
    code, _, err = _pack(capsys, tmp_path / "tok", [tmp_path / "c"], tmp_path / "out", *argv)
    _assert_one_line_error(code, err, "70000 tokens does not fit token dtype uint16", "uint32")
    assert _no_output(tmp_path / "out")
    code, _, _ = _pack(capsys, tmp_path / "tok", [tmp_path / "c"], tmp_path / "ok", "--no-bos", "--no-eos")
    assert code == 0
    assert json.loads((tmp_path / "ok" / "train" / "manifest.json").read_text())["dtype"] == "uint32"


def test_full_disk_removes_partial_files(capsys, tokenizer, tmp_path, monkeypatch):
    write_text_dir(tmp_path / "c", synthetic_docs(30))

    def disk_full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "add", disk_full)  # our own writer, standing in for a full file system
    code, _, err = _pack(capsys, tokenizer, [tmp_path / "c"], tmp_path / "out")
    _assert_one_line_error(code, err, "no space left", "free disk space")
    assert _no_output(tmp_path / "out")


def test_checksum_mismatch_on_inspect(capsys, tokenizer, tmp_path):
    write_text_dir(tmp_path / "c", synthetic_docs(30))
    code, _, _ = _pack(capsys, tokenizer, [tmp_path / "c"], tmp_path / "out", "--sequences-per-shard", "4")
    assert code == 0
    assert main(["prep", "inspect", str(tmp_path / "out")]) == 0
    assert "all checksums verified" in capsys.readouterr().out
    shard = tmp_path / "out" / "train" / "shard-00001.tokens"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x10
    shard.write_bytes(bytes(data))
    code = main(["prep", "inspect", str(tmp_path / "out")])
    _assert_one_line_error(code, capsys.readouterr().err, "checksum mismatch", "shard-00001.tokens", "--overwrite")
