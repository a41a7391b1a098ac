"""Tokenizers for data prep: a sentencepiece `.model` file or a Hugging Face tokenizer directory, behind one class.

`load_tokenizer(path)` is what every stage calls; `Tokenizer.identity` (name + sha256 of the tokenizer files) is
written into the shard manifest so that training can refuse shards made with another tokenizer.
`train_sentencepiece` trains the demo's tokenizer: BPE with byte fallback and LLaMA's special ids.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from longctx.errors import UserError

# LLaMA's layout: <unk>=0, <s>=1, </s>=2; the pad id goes after them (LLaMA itself has none).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# The files that decide how text is encoded: the tokenizer's identity is their hash.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# Files a model directory carries beside them (the chat template, slow-tokenizer vocabularies): copied with it.
_HF_TOKENIZER_EXTRAS = ("chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
# Special tokens that mark chat turns, not documents. An instruct model's tokenizer may name them as its BOS/EOS
# (SmolLM2-Instruct: <|im_start|> / <|im_end|>); a corpus of plain documents must not be wrapped in them.
CHAT_TURN_TOKENS = frozenset(
    {
        "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>",
        "<end_of_turn>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
    }
)  # fmt: skip
# End-of-document tokens in chat models' vocabularies, by preference, for when their EOS is a chat-turn marker.
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Tokenizer(abc.ABC):
    """Encode/decode without special tokens; exposes vocab size, special ids and the identity of its files."""

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self.files = files
        self.identity = {"name": path.name, "sha256": _sha256_of_files(files)}

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def encode_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated in `dtype`, per-text lengths): what packing needs, token for token encode_batch."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        return flat, lengths

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token string of the vocabulary, or None when it has no such token."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    def document_delimiters(self, start: str = "auto", end: str = "auto") -> tuple[int | None, int | None]:
        """(id put before, id put after) each packed document; None: nothing.

        auto: the tokenizer's BOS and EOS, unless one is a chat-turn marker (an instruct model's <|im_start|> /
        <|im_end|>): then no start token, and the vocabulary's own end-of-document token (<|endoftext|>, ...) as
        the end. "none": nothing. Any other value is a token of the vocabulary.
        """
        return self._delimiter(start, self.bos_id, "start"), self._delimiter(end, self.eos_id, "end")

    def _delimiter(self, choice: str, default: int | None, which: str) -> int | None:
        if choice == "none":
            return None
        if choice != "auto":
            token_id = self.token_to_id(choice)
            if token_id is None:
                raise UserError(
                    f"prep.doc_{which}={choice!r} is not a token of {self.path.name}: give one of its special tokens, "
                    "auto or none"
                )
            return token_id
        if default is None or self.id_to_token(default) not in CHAT_TURN_TOKENS:
            return default
        if which == "start":
            return None
        return next((i for i in map(self.token_to_id, DOCUMENT_END_TOKENS) if i is not None), None)

    @abc.abstractmethod
    def save_hf(self, out_dir: str | os.PathLike) -> None:
        """Write a tokenizer that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads."""


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        super().__init__(model_file, [model_file])
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{model_file} is not a sentencepiece model ({e}): give a .model file") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = _or_none(self._sp.bos_id())
        self.eos_id = _or_none(self._sp.eos_id())
        self.pad_id = _or_none(self._sp.pad_id())
        self._chunk_cache = ChunkCache.for_model(model_file.read_bytes())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def encode_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if self._chunk_cache is None:
            return super().encode_flat(texts, dtype)
        return self._chunk_cache.encode_flat(texts, dtype)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        from transformers import LlamaTokenizer

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, out_dir / "tokenizer.model")
        # from_pretrained on a directory holding only tokenizer.model converts it (vocab + merges) to a fast
        # tokenizer that encodes exactly as the .model does; constructing LlamaTokenizer(vocab_file=...) does not.
        pad = self._sp.id_to_piece(self.pad_id) if self.pad_id is not None else None
        hf = LlamaTokenizer.from_pretrained(str(out_dir), pad_token=pad, legacy=False)
        hf.save_pretrained(str(out_dir))


class ChunkCache:
    """Exact sentencepiece BPE encoding through a cache of encoded chunks (what makes `prep pack` fast).

    The text is cut before every run of spaces that follows another character, the dummy-prefix space added in
    front; each chunk is encoded once (by sentencepiece, without the dummy prefix) and then looked up. This gives
    exactly sentencepiece's ids whenever no piece can span a cut, which `for_model` checks on the model itself:

    - BPE, identity normalization (no rules), no whitespace removal, whitespace escaped to "▁" as a prefix: the
      normalized text is the text with spaces turned into "▁" (LLaMA's and the demo tokenizer's settings);
    - no piece has a "▁" right after another character. A cut lies between a character other than " "/"▁"
      and "▁", so no piece covers a cut, no BPE merge crosses one, and merges on either side never interact
      (each side sees its own merges in the same score order). Byte fallback is per character, so local too.

    A model that fails a check returns None and is encoded by sentencepiece directly. Memory is bounded: at most
    MAX_ENTRIES chunks of at most MAX_CHUNK_CHARS characters are kept; after that, new chunks are still encoded
    exactly, just not kept.
    """

    MAX_ENTRIES = 1 << 19
    MAX_CHUNK_CHARS = 64

    def __init__(self, processor, add_dummy_prefix: bool):
        self._sp = processor  # the same model with add_dummy_prefix off: chunks carry their own leading space
        self._prefix = " " if add_dummy_prefix else ""
        self._chunks = re.compile("[ \u2581]*[^ \u2581]+|[ \u2581]+").findall
        self._cache: dict[str, bytes] = {}
        self._dtype: np.dtype | None = None

    @classmethod
    def for_model(cls, model_bytes: bytes) -> ChunkCache | None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        norm, trainer = proto.normalizer_spec, proto.trainer_spec
        if not (
            trainer.model_type == model_pb2.TrainerSpec.BPE
            and norm.name == "identity"
            and not norm.precompiled_charsmap
            and not norm.remove_extra_whitespaces
            and norm.escape_whitespaces
            and not trainer.treat_whitespace_as_suffix
        ):
            return None
        kinds = (model_pb2.ModelProto.SentencePiece.NORMAL, model_pb2.ModelProto.SentencePiece.USER_DEFINED,
                 model_pb2.ModelProto.SentencePiece.UNUSED)  # fmt: skip
        for piece in proto.pieces:
            text = piece.piece
            if piece.type in kinds and any(text[i] == "\u2581" != text[i - 1] for i in range(1, len(text))):
                return None
        add_dummy_prefix = norm.add_dummy_prefix
        norm.add_dummy_prefix = False
        return cls(spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), add_dummy_prefix)

    def encode_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        dtype = np.dtype(dtype)
        if dtype != self._dtype:
            self._cache.clear()
            self._dtype = dtype
        cache, prefix = self._cache, self._prefix
        docs = [self._chunks(prefix + text) if text else [] for text in texts]
        new = set().union(*docs).difference(cache)
        temporary: list[str] = []  # looked up for this batch only: too long to keep, or the cache is full
        if new:
            new = list(new)
            room = self.MAX_ENTRIES - len(cache)
            cache.update(zip(new, (np.array(ids, dtype).tobytes() for ids in self._sp.encode(new))))
            for chunk in new:
                if len(chunk) <= self.MAX_CHUNK_CHARS and room > 0:
                    room -= 1
                else:
                    temporary.append(chunk)
        encoded = [b"".join(map(cache.__getitem__, chunks)) for chunks in docs]
        for chunk in temporary:
            del cache[chunk]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) // dtype.itemsize
        return np.frombuffer(b"".join(encoded), dtype=dtype), lengths


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory read with the `tokenizers` library (tokenizer.json)."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as FastTokenizer

        files = [directory / name for name in _HF_TOKENIZER_FILES if (directory / name).is_file()]
        super().__init__(directory, files)
        self._tok = FastTokenizer.from_file(str(directory / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = _special_tokens(directory)
        self.bos_id = self._token_id(specials.get("bos_token"))
        self.eos_id = self._token_id(specials.get("eos_token"))
        self.pad_id = self._token_id(specials.get("pad_token"))

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: (ids (n,) int64, character offsets (n, 2) int64 of each token in the text). Special tokens
        written in the text (a chat template's `<|im_start|>`, `<s>`) are encoded as those tokens."""
        return [
            (np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
            for e in self._tok.encode_batch(texts, add_special_tokens=False)
        ]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        """Copy every tokenizer file of the directory, the chat template among them."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        extras = [self.path / name for name in _HF_TOKENIZER_EXTRAS if (self.path / name).is_file()]
        for path in self.files + extras:
            shutil.copyfile(path, out_dir / path.name)


def _special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json, then special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        for key, value in json.loads(path.read_text()).items():
            if key in ("bos_token", "eos_token", "pad_token") and value:
                found[key] = value["content"] if isinstance(value, dict) else value
    return found


def _or_none(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A sentencepiece `.model` file, or a HF tokenizer directory (tokenizer.json, else tokenizer.model)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer {path} does not exist: give a sentencepiece .model file or a tokenizer directory")
    if path.is_file():
        return SentencePieceTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    raise UserError(f"{path} holds neither tokenizer.json nor tokenizer.model: give a Hugging Face tokenizer directory")


# ----------------------------------------------------------------------------------------------------------------
# Which tokenizer goes with a model and its shards
# ----------------------------------------------------------------------------------------------------------------

# Text whose encoding tells tokenizers apart when their files differ (a HF re-save of a sentencepiece model).
TOKENIZER_PROBE = "def extend(context):\n    return context * 8  # long contexts, déjà vu, 東京 😀 1234567"


def model_tokenizer(model_path: str | os.PathLike | None) -> Tokenizer | None:
    """The tokenizer saved in a model directory, or None (no directory: a random init; or none saved there)."""
    path = Path(model_path) if model_path else None
    if path is None or not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        return None
    return load_tokenizer(path)


def packed_with(manifest: dict) -> Tokenizer | None:
    """The tokenizer a shard set was packed with, when it still exists where the manifest recorded it."""
    path = manifest.get("tokenizer", {}).get("path") or manifest.get("prep_config", {}).get("tokenizer", "")
    return load_tokenizer(path) if path and Path(path).exists() else None


def check_shards_tokenizer(model_path: str | os.PathLike | None, manifest: dict, shards_dir: str | os.PathLike) -> None:
    """Refuse shards packed with another tokenizer than the model's own (when the model directory has one).

    Identical files pass at once; different files (e.g. the same sentencepiece model re-saved in HF format) pass
    only if the tokenizer the shards were packed with still exists and encodes a probe text identically.
    """
    tokenizer = model_tokenizer(model_path)
    if tokenizer is None or tokenizer.identity["sha256"] == manifest["tokenizer"]["sha256"]:
        return
    other = packed_with(manifest)
    if other is not None:
        signature = lambda t: (t.vocab_size, t.bos_id, t.eos_id, t.encode(TOKENIZER_PROBE))
        if signature(other) == signature(tokenizer):
            return
    raise UserError(
        f"shards in {shards_dir} were packed with tokenizer {manifest['tokenizer']['name']}, not the one in "
        f"model.path={model_path}: re-pack them with `prep pack --tokenizer <model dir>`"
    )


def train_sentencepiece(
    inputs: Iterable[str],
    vocab_size: int,
    out_model_path: str | os.PathLike,
    *,
    max_sentences: int = 200_000,
    seed: int = 0,
    num_threads: int | None = None,
) -> Path:
    """Train a LLaMA-style sentencepiece BPE model (byte fallback; unk=0, bos=1, eos=2, pad=3) on documents.

    `inputs` yields documents; their lines are the training sentences, of which a deterministic sample of at most
    `max_sentences` is used (enough for a small vocabulary, and quick). Whitespace is kept as is, so code survives.
    """
    import sentencepiece as spm

    if not 16 <= vocab_size <= 1_000_000:
        raise UserError(f"vocab size {vocab_size} is out of range: use e.g. 8000 (at least 16 for byte fallback)")
    rng = random.Random(seed)
    sample: list[str] = []  # reservoir sample: memory stays bounded for any corpus size
    num_seen = 0
    for doc in inputs:
        for line in doc.splitlines():
            if not line.strip():
                continue
            num_seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(num_seen)
                if j < max_sentences:
                    sample[j] = line
    if not sample:
        raise UserError("the tokenizer corpus has no text: give files with text in them")
    out_model_path = Path(out_model_path)
    if out_model_path.suffix != ".model":
        raise UserError(f"tokenizer output {out_model_path} must end in .model: e.g. --out tok.model")
    out_model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_model_path.parent) as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                character_coverage=0.9995,
                split_digits=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                max_sentence_length=16384,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise UserError(f"sentencepiece training failed: {e}; try a smaller --vocab-size or more text") from None
        os.replace(prefix + ".model", out_model_path)
    return out_model_path
