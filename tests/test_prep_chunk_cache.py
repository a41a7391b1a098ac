"""The chunk cache that makes `prep pack` fast must give exactly sentencepiece's ids, or stay off."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from prep_fixtures import synthetic_docs
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from data_prep.sources import Skipped, iter_corpus
from data_prep.tokenizer import ChunkCache, load_tokenizer, train_sentencepiece
from longctx.demo import stdlib_inputs

EDGE_CASES = [
    "",
    " ",
    "   ",
    "a",
    " a",
    "  a  ",
    "trailing   ",
    "x\u2581y",  # a literal "▁" in the text is the same symbol as an escaped space
    "\u2581",
    "\u2581 \u2581",
    " \u2581x",
    "x \u2581\u2581 y",
    "tab\there\n\n    indented",
    "unseen ☃ and 😀: byte fallback",
    "ideographic\u3000space",
]


def stdlib_documents(max_chars: int) -> list[str]:
    """The stdlib's sources as prep reads them (the demo corpus), up to max_chars."""
    docs, total = [], 0
    for _, item in iter_corpus(stdlib_inputs(), glob="**/*.py", text_field="text", strict=False):
        if isinstance(item, Skipped):
            continue
        docs.append(item)
        total += len(item)
        if total >= max_chars:
            break
    return docs


@pytest.fixture(scope="module")
def corpus():
    return stdlib_documents(3_000_000)


@pytest.fixture(scope="module")
def stdlib_tokenizer(corpus, tmp_path_factory):
    return train_sentencepiece(corpus, 2000, tmp_path_factory.mktemp("tok") / "stdlib.model", max_sentences=30_000)


def assert_exact(tok, texts, dtype):
    flat, lengths = tok.encode_flat(texts, dtype)
    expected = tok.encode_batch(texts)  # sentencepiece itself
    assert flat.dtype == dtype
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert flat.tolist() == list(itertools.chain.from_iterable(expected))


def test_cached_encoding_equals_sentencepiece_on_the_stdlib(stdlib_tokenizer, corpus):
    tok = load_tokenizer(stdlib_tokenizer)
    assert tok._chunk_cache is not None, "the demo tokenizer's settings qualify for the cache"
    texts = EDGE_CASES + corpus
    for dtype in (np.dtype(np.uint16), np.dtype(np.uint32)):
        assert_exact(tok, texts, dtype)
        assert_exact(tok, texts[::-1], dtype)  # second pass: mostly cache hits
    assert 0 < len(tok._chunk_cache._cache) <= ChunkCache.MAX_ENTRIES


def test_a_full_cache_stays_exact_and_bounded(stdlib_tokenizer, corpus, monkeypatch):
    monkeypatch.setattr(ChunkCache, "MAX_ENTRIES", 50)
    monkeypatch.setattr(ChunkCache, "MAX_CHUNK_CHARS", 4)
    tok = load_tokenizer(stdlib_tokenizer)
    for start in range(0, 40, 10):  # batches after the cache filled up
        assert_exact(tok, corpus[start : start + 10], np.dtype(np.uint16))
    cache = tok._chunk_cache._cache
    assert len(cache) <= 50 and all(len(chunk) <= 4 for chunk in cache)


def _model_proto(path) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def test_models_whose_pieces_can_span_a_cut_are_encoded_without_the_cache(tmp_path):
    docs = synthetic_docs(60, seed=1) + ["in the long context window of the model " * 50]
    # Pieces across whitespace ("of▁the"): cutting before spaces would change the ids, so the cache must stay off.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(tmp_path / "span"), vocab_size=700, model_type="bpe",
        byte_fallback=True, split_by_whitespace=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    model = tmp_path / "span.model"
    proto = _model_proto(model)
    assert any("\u2581" in p.piece[1:].lstrip("\u2581") for p in proto.pieces), "the corpus gave spanning pieces"
    assert ChunkCache.for_model(model.read_bytes()) is None
    tok = load_tokenizer(model)
    assert tok._chunk_cache is None
    assert_exact(tok, EDGE_CASES + docs, np.dtype(np.uint16))

    # The check is what keeps this exact: forced on, the cache gives other ids for this model.
    proto.normalizer_spec.add_dummy_prefix = False
    forced = ChunkCache(spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), add_dummy_prefix=True)
    flat, _ = forced.encode_flat(docs, np.uint16)
    assert flat.tolist() != list(itertools.chain.from_iterable(tok.encode_batch(docs)))


def test_normalizing_models_are_encoded_without_the_cache(tmp_path):
    docs = synthetic_docs(30, seed=2)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(tmp_path / "nfkc"), vocab_size=500, model_type="bpe",
        byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    # (default normalization: nmt_nfkc, with extra whitespace removed)
    model = tmp_path / "nfkc.model"
    assert ChunkCache.for_model(model.read_bytes()) is None
    assert_exact(load_tokenizer(model), EDGE_CASES + docs, np.dtype(np.uint16))
