"""`longctx train` on real shards, as the demo chains it: a full fine-tune of a random-init model at a short
context writes a Hugging Face model (with its tokenizer) that a LongLoRA run with S²-Attn and PI extends.
Plus the shard checks: vocabulary and tokenizer must be the model's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data_prep.pack import pack
from data_prep.tokenizer import train_sentencepiece
from longctx.config import PrepConfig, RunConfig, from_dict, load_config
from longctx.errors import UserError
from longctx.trainer import load_train_dataset

sys.path.insert(0, str(Path(__file__).parent))
from prep_fixtures import synthetic_docs, write_text_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 500
BASE = [
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    f"num_attention_heads: 4, num_key_value_heads: 2, vocab_size: {VOCAB}, max_position_embeddings: 64}}",
    "model.activation_checkpointing=false",
    "rope.type=none",
    "attention.implementation=sdpa",
    "lora.enabled=false",
    "train.seq_len=64",
    "train.global_batch_size=2",
    "train.max_steps=3",
    "train.lr=1e-3",
    "train.warmup_steps=1",
    "train.save_every=0",
    "deepspeed.config=ds_configs/stage2.json",
]


def pack_shards(corpus: Path, tokenizer: Path, seq_len: int, out: Path) -> Path:
    config = {"inputs": [str(corpus / "text")], "tokenizer": str(tokenizer), "out": str(out), "seq_len": seq_len}
    pack(from_dict(PrepConfig, {**config, "num_workers": 1}), progress=False)
    return out / "train"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_text_dir(root / "text", synthetic_docs(60))
    train_sentencepiece(docs, VOCAB, root / "tok.model")
    # Same vocabulary size, other pieces: a different tokenizer that only the identity check can tell apart.
    train_sentencepiece(synthetic_docs(60, seed=1, max_words=100), VOCAB, root / "other.model")
    return root


def longctx_train(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "longctx.cli", "train", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_base_then_longlora_stage_on_real_shards(corpus, tmp_path):
    shards64 = pack_shards(corpus, corpus / "tok.model", 64, tmp_path / "shards64")
    base = longctx_train(*BASE, f"data.train={shards64}", f"train.output_dir={tmp_path / 'base'}")
    assert base.returncode == 0, base.stderr[-3000:]
    final = tmp_path / "base" / "final"
    assert AutoConfig.from_pretrained(final).max_position_embeddings == 64
    assert AutoTokenizer.from_pretrained(final).vocab_size == VOCAB
    assert "done: step 3" in base.stdout
    # Quiet by default: no library warning, deprecation or DeepSpeed chatter a user cannot act on.
    noise = re.findall(r".*(?:Warning|WARNING|deprecated|built successfully).*", base.stdout + base.stderr)
    assert not noise, noise

    shards128 = pack_shards(corpus, corpus / "tok.model", 128, tmp_path / "shards128")
    extended = longctx_train(
        f"model.path={final}",
        "rope.type=linear",
        "attention.implementation=s2attn",
        "attention.group_size=32",
        "train.seq_len=128",
        "train.global_batch_size=2",
        "train.max_steps=2",
        "train.lr=1e-3",
        "train.warmup_steps=1",
        f"data.train={shards128}",
        f"train.output_dir={tmp_path / 'extended'}",
    )
    assert extended.returncode == 0, extended.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "extended" / "final")
    assert model.config.rope_parameters["factor"] == 2.0 and model.config.max_position_embeddings == 128
    assert (tmp_path / "extended" / "final" / "tokenizer.json").is_file()


def test_shards_must_match_the_models_vocabulary_and_tokenizer(corpus, tmp_path):
    shards64 = pack_shards(corpus, corpus / "tok.model", 64, tmp_path / "shards64")
    cfg = load_config(RunConfig, None, [*BASE, f"data.train={shards64}"])
    with pytest.raises(UserError, match=f"vocabulary of {VOCAB} tokens but the model has 400"):
        load_train_dataset(cfg, AutoConfig.for_model("llama", vocab_size=400))
    # A table larger than the tokenizer is padding (Qwen2.5's 151,936 rows for 151,665 tokens): accepted.
    assert len(load_train_dataset(cfg, AutoConfig.for_model("llama", vocab_size=VOCAB + 100))) > 0

    # A model directory holding the tokenizer (re-saved in HF format: other files, same encoding) is accepted...
    from data_prep.tokenizer import load_tokenizer

    model_dir = tmp_path / "model"
    tiny = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **tiny)).save_pretrained(model_dir)
    load_tokenizer(corpus / "tok.model").save_hf(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    cfg = load_config(RunConfig, None, [f"model.path={model_dir}", "train.seq_len=64", f"data.train={shards64}"])
    assert len(load_train_dataset(cfg, hf_config)) > 0
    # ...shards packed with another tokenizer of the same size are refused.
    other_shards = pack_shards(corpus, corpus / "other.model", 64, tmp_path / "other")
    cfg = load_config(RunConfig, None, [f"model.path={model_dir}", "train.seq_len=64", f"data.train={other_shards}"])
    with pytest.raises(
        UserError, match="packed with tokenizer other.model, not the one in model.path=.*: re-pack them"
    ) as e:
        load_train_dataset(cfg, hf_config)
    assert "\n" not in str(e.value)


def test_a_library_error_at_start_up_is_one_line_naming_the_stage(corpus, tmp_path):
    # A value DeepSpeed's own config parser refuses (pydantic prints a multi-line report): the user sees one line
    # that names the stage, DeepSpeed's first line and what to check.
    shards64 = pack_shards(corpus, corpus / "tok.model", 64, tmp_path / "shards64")
    ds = json.loads((ROOT / "ds_configs" / "stage3.json").read_text())
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = "lots"
    (tmp_path / "bad.json").write_text(json.dumps(ds))
    run = [*BASE, f"data.train={shards64}", f"train.output_dir={tmp_path / 'run'}"]
    result = longctx_train(*run, f"deepspeed.config={tmp_path / 'bad.json'}")
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("longctx: error: building the ZeRO-3 engine (deepspeed.initialize) failed (ValidationError")
    assert f"check deepspeed.config={tmp_path / 'bad.json'}" in error and "Traceback" not in result.stderr
