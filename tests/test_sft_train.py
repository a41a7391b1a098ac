"""Training on `prep sft` shards: a tiny end-to-end run through the CLI whose loss counts only answer tokens, the
supervised tokens/s in its log, and the two SFT presets (LongAlpaca, LongQLoRA) against their recipes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from prep_fixtures import synthetic_docs

from data_prep.sft import prepare_sft
from data_prep.tokenizer import load_tokenizer, train_sentencepiece
from longctx.config import RunConfig, SFTConfig, from_dict, load_config
from longctx.data import IGNORE_INDEX, PackedDataset, ResumableDistributedSampler

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN, GROUP = 128, 32
RUN = [
    "attention.implementation=s2attn",
    f"attention.group_size={GROUP}",
    "attention.isolate_documents=true",
    "rope.type=none",
    "model.activation_checkpointing=false",
    f"train.seq_len={SEQ_LEN}",
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
    "train.max_steps=2",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "train.save_every=0",
    "deepspeed.config=ds_configs/stage2.json",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, shards dir, model dir): a tiny random LLaMA with a LLaMA-style tokenizer, LongAlpaca-style records in
    the llama-2 template packed at 128 tokens, and 2 S²-Attn steps (LoRA + embed/norm) through `longctx train`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("sft_train")
    tokenizer_model = train_sentencepiece(synthetic_docs(60) + ["[INST] [/INST]"], 500, root / "tok.model")
    model_dir = root / "model"
    load_tokenizer(tokenizer_model).save_hf(model_dir)
    config = LlamaConfig(
        vocab_size=500,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,
    )  # fmt: skip  (peaked logits: token losses differ)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    words = synthetic_docs(24, seed=1, max_words=30)
    records = [{"instruction": f"{w} What is word {i}?", "output": w.split()[i % 4 + 2]} for i, w in enumerate(words)]
    (root / "data.json").write_text(json.dumps(records))
    sft = {"inputs": [str(root / "data.json")], "tokenizer": str(model_dir), "template": "llama-2"}
    prepare_sft(from_dict(SFTConfig, {**sft, "out": str(root / "shards"), "seq_len": SEQ_LEN}), progress=False)
    overrides = [f"model.path={model_dir}", f"data.train={root / 'shards' / 'train'}", *RUN]
    command = [sys.executable, "-m", "longctx.cli", "train", *overrides, f"train.output_dir={root / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", root / "shards" / "train", model_dir, result.stdout


def test_the_loss_counts_only_answer_tokens_and_the_log_reports_supervised_tokens(trained):
    from transformers import AutoModelForCausalLM

    from longctx import attention

    run_dir, shards, model_dir, stdout = trained
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    for s in steps:
        assert 0 < s["supervised_tokens_per_s"] < s["tokens_per_s"] / 5  # short answers, long prompts
    assert "supervised) |" in stdout and "supervised tok/s" in stdout
    # Step 1 by hand: its two sequences (the sampler's first, seed 42), the base model (LoRA starts at zero) under
    # S²-Attn with isolated conversations, cross-entropy over the answer tokens only, token-weighted.
    dataset = PackedDataset(shards, isolate_documents=True)
    indices = list(ResumableDistributedSampler(len(dataset), num_replicas=1, rank=0, seed=42).epoch_indices(0)[:2])
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="s2attn")
    attention.configure(model, group_size=GROUP)
    model.train()
    answer_sum, all_sum, answer_count, all_count = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for i in indices:
            item = dataset[i]
            logits = model(input_ids=item["input_ids"][None], position_ids=item["position_ids"][None]).logits[0]
            losses = F.cross_entropy(logits[:-1].double(), item["input_ids"][1:], reduction="none")
            answer = item["labels"][1:] != IGNORE_INDEX
            answer_sum += losses[answer].sum().item()
            answer_count += int(answer.sum())
            all_sum += losses.sum().item()
            all_count += len(losses)
    assert 0 < answer_count < all_count / 5
    assert math.isclose(steps[0]["loss"], answer_sum / answer_count, rel_tol=1e-5), (steps[0]["loss"], answer_sum)
    assert abs(steps[0]["loss"] / (all_sum / all_count) - 1) > 0.02  # every token's loss would differ


def test_the_final_model_and_its_exports_carry_the_builtin_template_they_were_trained_on(trained, tmp_path):
    """The base tokenizer has no chat template and the run trained on llama-2's: final/ and both export formats
    carry it, so plain transformers prompts the model as it was trained."""
    from transformers import AutoTokenizer

    from data_prep.chat_templates import BUILTIN_TEMPLATES
    from longctx.export import export

    run_dir, _, model_dir, _ = trained
    assert AutoTokenizer.from_pretrained(model_dir).chat_template is None
    export(run_dir, tmp_path / "both", format="both", dtype="fp32")
    messages = [{"role": "user", "content": "What is word 3?"}]
    for directory in (run_dir / "final", tmp_path / "both" / "merged", tmp_path / "both" / "adapter"):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert tokenizer.chat_template == BUILTIN_TEMPLATES["llama-2"], directory
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "[INST]" in prompt and prompt.rstrip().endswith("[/INST]"), prompt


def test_packed_sft_shards_without_isolation_are_refused_before_training(trained, tmp_path):
    run_dir, shards, model_dir, _ = trained
    overrides = [f"model.path={model_dir}", f"data.train={shards}", *RUN, "attention.isolate_documents=false"]
    command = [sys.executable, "-m", "longctx.cli", "train", *overrides, f"train.output_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pack several conversations per sequence" in result.stderr
    assert "set attention.isolate_documents=true" in result.stderr


def preset(name: str) -> RunConfig:
    return load_config(RunConfig, ROOT / "launch" / "presets" / f"{name}.yaml")


def test_longalpaca_preset_follows_longloras_sft_command(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = preset("llama2-7b-32k-sft")
    assert cfg.train.seq_len == 32768 and cfg.group_size == 8192 and cfg.attention.isolate_documents
    assert (cfg.train.lr, cfg.train.global_batch_size, cfg.train.warmup_steps, cfg.train.schedule) == (
        2e-5, 64, 20, "constant",
    )  # fmt: skip
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.trainable) == (8, 16, ["embed", "norm"])
    assert cfg.deepspeed.config == "ds_configs/stage2.json" and cfg.train.weight_decay == 0.0


def test_longqlora_sft_preset_follows_its_released_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = preset("llama2-13b-32k-sft-qlora")
    assert (cfg.quant.type, cfg.quant.double_quant) == ("nf4", True) and cfg.attention.isolate_documents
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, len(cfg.lora.target_modules)) == (64, 16, 0.05, 7)
    assert (cfg.train.lr, cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.grad_clip) == (
        1e-4,
        16,
        1700,
        0.3,
    )
    assert cfg.train.warmup_steps == 20 and cfg.train.schedule == "constant" and cfg.group_size * 4 == cfg.train.seq_len
