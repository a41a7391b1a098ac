"""Which tokens delimit packed documents: an instruct model's tokenizer names chat-turn markers as its BOS/EOS
(SmolLM2-Instruct: <|im_start|> / <|im_end|>), which must not wrap plain documents; its <|endoftext|> ends them.
Also: every tokenizer file, the chat template among them, travels with the tokenizer; manifests name it by path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_prep.pack import pack
from data_prep.tokenizer import load_tokenizer
from longctx.config import PrepConfig, from_dict
from longctx.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from prep_fixtures import WORDS, read_documents, synthetic_docs, write_text_dir  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def chat_tokenizer(directory: Path, bos: str = "<|im_start|>", eos: str = "<|im_end|>") -> Path:
    """A word-level HF tokenizer over the fixture corpus's words, with an instruct model's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for doc in synthetic_docs(40) for w in doc.split()} | set(WORDS))
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token=bos, eos_token=eos)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def pack_with(tmp_path: Path, tokenizer: Path, name: str, **options) -> Path:
    corpus = tmp_path / "text"
    if not corpus.is_dir():
        write_text_dir(corpus, synthetic_docs(40))
    config = {"inputs": [str(corpus)], "tokenizer": str(tokenizer), "out": str(tmp_path / name), "seq_len": 64}
    pack(from_dict(PrepConfig, {**config, "num_workers": 1, **options}), progress=False)
    return tmp_path / name / "train"


def test_chat_turn_markers_do_not_wrap_documents(tmp_path):
    tokenizer_dir = chat_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tokenizer_dir)
    endoftext, im_start, im_end = (tok.token_to_id(t) for t in SPECIALS[:3])
    assert tok.document_delimiters() == (None, endoftext)

    shards = pack_with(tmp_path, tokenizer_dir, "auto")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["special_ids"]["bos"] is None and manifest["special_ids"]["eos"] == endoftext
    assert manifest["tokenizer"]["path"] == str(tokenizer_dir.resolve())  # found again from any directory
    docs = read_documents(shards, strip_specials=False)
    assert all(doc[-1] == endoftext for doc in docs[:-1]) and not any(im_start in d or im_end in d for d in docs)

    explicit = pack_with(tmp_path, tokenizer_dir, "explicit", doc_start="<|im_start|>", doc_end="<|im_end|>")
    docs = read_documents(explicit, strip_specials=False)
    assert docs[0][0] == im_start and docs[0][-1] == im_end  # asked for: the user's choice wins
    with pytest.raises(UserError, match=r"prep.doc_end='<\|eot_id\|>' is not a token of tok"):
        pack_with(tmp_path, tokenizer_dir, "missing", doc_end="<|eot_id|>")
    assert not (tmp_path / "missing").exists()


def test_a_base_tokenizer_keeps_its_bos_and_eos(tmp_path):
    tokenizer_dir = chat_tokenizer(tmp_path / "tok", bos="<|endoftext|>", eos="<|endoftext|>")
    endoftext = load_tokenizer(tokenizer_dir).token_to_id("<|endoftext|>")
    docs = read_documents(pack_with(tmp_path, tokenizer_dir, "base"), strip_specials=False)
    assert docs[0][0] == endoftext and docs[0][-1] == endoftext


def test_the_chat_template_travels_with_the_tokenizer(tmp_path):
    tokenizer_dir = chat_tokenizer(tmp_path / "tok")
    assert (tokenizer_dir / "chat_template.jinja").is_file()
    load_tokenizer(tokenizer_dir).save_hf(tmp_path / "copy")
    from transformers import AutoTokenizer

    copy = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert copy.chat_template == CHAT_TEMPLATE
    rendered = copy.apply_chat_template([{"role": "user", "content": "the long context"}], tokenize=False)
    assert rendered == "<|im_start|>user\nthe long context<|im_end|>\n"
