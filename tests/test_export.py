"""`longctx export`: exported models load with plain transformers / peft (checked in a process without longctx) and
give the training-time model's logits; RoPE scaling in config.json; adapter carries embed/norm; refusals."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from longctx import checkpoint, cli, merge
from longctx.config import RunConfig, load_config
from longctx.errors import UserError
from longctx.export import export
from longctx.model import build_model

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "tests" / "dist" / "train_tiny.py"
LOAD_SCRIPT = ROOT / "tests" / "dist" / "export_load_plain.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
sys.path.insert(0, str(TRAIN_SCRIPT.parent))
from train_tiny import TINY_LLAMA  # noqa: E402

# Longer than the base context (32 positions): logits depend on the RoPE scaling (train.seq_len=64, linear x2).
TOKENS = [(7 * i + 3) % 96 for i in range(48)]
# fp32 tolerance: the merged model is the same merge as the training-time model's; the unmerged adapter adds
# B·A·x separately from W·x, which reorders fp32 sums (differences ~1e-6 on logits of size ~1).
FP32_ATOL = 1e-5
TRAIN_STEPS = ["train.max_steps=2", "train.lr=1e-2"]


def write_word_tokenizer(directory: Path) -> None:
    """A 96-token word-level tokenizer (`w3`..`w95`), the size of the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 96)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


def free_port() -> int:
    """A TCP port free right now (other test sessions on this machine launch their own process groups)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_tiny_training(command: list[str], output_dir: Path, overrides: list[str]) -> Path:
    result = subprocess.run(
        [*command, str(TRAIN_SCRIPT), str(output_dir), *TRAIN_STEPS, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, base dir): 2 ranks, ZeRO-3, S²-Attn, LoRA + embed/norm, from a base directory with a tokenizer."""
    root = tmp_path_factory.mktemp("export_zero3")
    base = root / "base"
    build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False).save_pretrained(base)
    write_word_tokenizer(base)
    # S²-Attn settings as `longctx.attention.configure` stores them: an export must not carry them on.
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"s2attn": {"group_size": 16, "backend": "auto"}}))
    overrides = ["model.init={}", f"model.path={base}", "attention.implementation=s2attn"]
    launcher = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port())]
    return run_tiny_training(launcher, root / "run", overrides), base


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, base dir): one rank, ZeRO-2, a base with tied input/output embeddings and no tokenizer."""
    root = tmp_path_factory.mktemp("export_zero2")
    base = root / "base"
    tied = TINY_LLAMA.replace("vocab_size: 96", "vocab_size: 96, tie_word_embeddings: true")
    build_model(load_config(RunConfig, None, [tied, "rope.type=none"]), for_training=False).save_pretrained(base)
    overrides = ["model.init={}", f"model.path={base}", "deepspeed.config=ds_configs/stage2.json"]
    return run_tiny_training([sys.executable], root / "run", overrides), base


def edited_config(ckpt_dir: Path, changes: dict[str, object]) -> str:
    """The checkpoint's config.yaml with section.key values changed (or added)."""
    tree = yaml.safe_load((ckpt_dir / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    return yaml.safe_dump(tree)


def trained_logits(ckpt_dir: Path) -> torch.Tensor:
    model, _ = merge.load_trained_model(ckpt_dir)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0]  # (N, vocab)


@pytest.mark.distributed
def test_zero3_export_loads_without_longctx_and_matches_training_logits(zero3_run, tmp_path):
    run_dir, base = zero3_run
    out = tmp_path / "export"
    result = export(run_dir, out, format="both", dtype="fp32")  # the run dir: its newest complete checkpoint
    assert result.checkpoint == checkpoint.complete_checkpoints(run_dir)[-1]

    loaded = subprocess.run(
        [sys.executable, str(LOAD_SCRIPT), str(out / "merged"), str(out / "adapter"), str(base), str(tmp_path / "l")]
        + [str(t) for t in TOKENS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    facts = json.loads((tmp_path / "l.json").read_text())
    assert facts["longctx_imported"] is False
    plain = load_file(tmp_path / "l.safetensors")
    expected = trained_logits(result.checkpoint)
    torch.testing.assert_close(plain["merged"], expected, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(plain["adapter"], expected, atol=FP32_ATOL, rtol=0)
    # The adapter's config.json (RoPE scaling) is what makes the adapter right: on the unscaled base it is not.
    assert (plain["adapter_on_unscaled_base"] - expected).abs().max() > 1e-3

    assert facts["merged_rope_type"] == "linear" and facts["merged_max_position_embeddings"] == 64
    assert facts["merged_rope_parameters"]["factor"] == 2.0 and facts["merged_dtype"] == "torch.float32"
    assert facts["tokenizer_ids"] == [5, 7, 90]  # the tokenizer of model.path, found without --tokenizer

    for config_dir in (out / "merged", out / "adapter"):
        config = json.loads((config_dir / "config.json").read_text())
        assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
        assert config["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 2.0}
        assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 64
        assert "s2attn" not in json.dumps(config)


@pytest.mark.distributed
def test_zero3_adapter_carries_trained_lora_embedding_and_norms(zero3_run, tmp_path):
    run_dir, base = zero3_run
    adapter_dir = tmp_path / "adapter"
    export(run_dir, adapter_dir, format="adapter", dtype="fp32")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    assert {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"} <= set(
        adapter_config["modules_to_save"]
    )
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    initial = load_file(base / "model.safetensors")
    for layer in range(2):
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            assert weights[f"{prefix}.lora_A.weight"].shape == (8, 32)
            assert weights[f"{prefix}.lora_B.weight"].abs().max() > 0  # initialised to zero, so trained
    trained_in_full = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")
    ]
    for name in trained_in_full:
        assert not torch.equal(weights[f"base_model.model.{name}"], initial[name]), name
    assert not any("base_layer" in key or "mlp" in key for key in weights)  # frozen base weights stay out


def test_zero2_one_rank_export_in_bf16_through_the_cli(zero2_run, tmp_path, capsys):
    ckpt_dir = checkpoint.complete_checkpoints(zero2_run[0])[-1]
    tokenizer_dir = tmp_path / "tokenizer"
    write_word_tokenizer(tokenizer_dir)
    out = tmp_path / "merged"
    assert cli.main(["export", str(ckpt_dir), "--out", str(out), "--tokenizer", str(tokenizer_dir)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "merged" in summary and "bf16" in summary and "factor=2.0" in summary

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16 and merged.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        logits = merged(torch.tensor([TOKENS])).logits[0].float()
    expected = trained_logits(ckpt_dir)
    # bf16 weights: 8 mantissa bits, ~0.4% relative error per weight, logits off by a few hundredths at most.
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
    assert AutoTokenizer.from_pretrained(out)("w5 w7", add_special_tokens=False)["input_ids"] == [5, 7]


def test_zero2_tied_embeddings_adapter_with_plain_peft(zero2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir, base_dir = zero2_run
    adapter_dir = tmp_path / "adapter"
    result = export(run_dir, adapter_dir, format="adapter", dtype="fp32")
    base = AutoModelForCausalLM.from_pretrained(base_dir, config=AutoConfig.from_pretrained(adapter_dir))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    # The output head shares the trained embedding (not the base's), as it did in training.
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    base_embedding = load_file(base_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(head, embedding) and not torch.equal(embedding, base_embedding)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(logits, trained_logits(result.checkpoint), atol=FP32_ATOL, rtol=0)


def test_export_refusals(zero2_run, tmp_path, capsys):
    ckpt_dir = checkpoint.complete_checkpoints(zero2_run[0])[-1]
    tokenizer_dir = tmp_path / "tokenizer"
    write_word_tokenizer(tokenizer_dir)

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert cli.main(["export", str(ckpt_dir), "--out", str(existing), "--tokenizer", str(tokenizer_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "already exists" in error and "--overwrite" in error
    assert (existing / "keep.txt").read_text() == "mine"  # untouched
    export(ckpt_dir, existing, tokenizer=tokenizer_dir, overwrite=True)
    assert (existing / "config.json").is_file() and not (existing / "keep.txt").exists()
    assert not list(tmp_path.glob("existing.*"))  # no temporary or replaced directory left behind
    with pytest.raises(UserError, match="holds the checkpoint being exported"):
        export(ckpt_dir, zero2_run[0], tokenizer=tokenizer_dir, overwrite=True)

    incomplete = tmp_path / "run" / "checkpoints" / ckpt_dir.name
    shutil.copytree(ckpt_dir, incomplete)
    (incomplete / checkpoint.COMPLETE_MARKER).unlink()
    with pytest.raises(UserError, match="incomplete checkpoint.*COMPLETE"):
        export(incomplete, tmp_path / "a", tokenizer=tokenizer_dir)
    with pytest.raises(UserError, match="no complete checkpoint"):
        export(tmp_path / "run", tmp_path / "b", tokenizer=tokenizer_dir)

    (incomplete / checkpoint.COMPLETE_MARKER).write_text("{}")
    # Another LoRA rank (shapes differ); one LoRA target fewer (the checkpoint holds weights the config lacks); one
    # more (the config names adapters the checkpoint lacks).
    fewer, more = ["q_proj", "k_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    for change in ({"lora.r": 4}, {"lora.target_modules": fewer}, {"lora.target_modules": more}):
        (incomplete / "config.yaml").write_text(edited_config(ckpt_dir, change))
        with pytest.raises(UserError, match="does not match its own config.yaml"):
            export(incomplete, tmp_path / "b", tokenizer=tokenizer_dir)
    (incomplete / "config.yaml").write_text(edited_config(ckpt_dir, {"lora.rank": 8}))
    with pytest.raises(UserError, match="config.yaml this longctx version cannot read.*lora.rank"):
        export(incomplete, tmp_path / "b", tokenizer=tokenizer_dir)
    random_init = {"model.path": "", "model.init": yaml.safe_load(TINY_LLAMA.split("=", 1)[1])}
    (incomplete / "config.yaml").write_text(edited_config(ckpt_dir, random_init))
    with pytest.raises(UserError, match="random init.*--format merged"):
        export(incomplete, tmp_path / "c", format="adapter")

    with pytest.raises(UserError, match="no tokenizer found.*--tokenizer"):
        export(ckpt_dir, tmp_path / "d")
    assert not [p.name for p in tmp_path.iterdir() if p.name[0] in "abcd"]  # refused before writing anything


def test_tokenizer_is_the_one_the_training_shards_were_packed_with(tmp_path):
    from data_prep.pack import pack
    from longctx.config import PrepConfig, from_dict
    from longctx.export import resolve_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    write_word_tokenizer(tokenizer_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "doc.txt").write_text(" ".join(f"w{3 + i % 90}" for i in range(200)))
    prep = {"inputs": [str(corpus)], "tokenizer": str(tokenizer_dir), "seq_len": 16, "out": str(tmp_path / "data")}
    pack(from_dict(PrepConfig, prep), progress=False)
    cfg = load_config(RunConfig, None, [TINY_LLAMA, f"data.train={tmp_path / 'data' / 'train'}"])
    assert resolve_tokenizer(cfg, None).path == tokenizer_dir  # random-init model: the shards' tokenizer
    write_word_tokenizer(tmp_path / "other")
    assert resolve_tokenizer(cfg, tmp_path / "other").path == tmp_path / "other"  # --tokenizer comes first
