"""Checkpoints that hold only what trains, put back on their base: safetensors written and read one tensor at a time,
the base fingerprint that resume and export check, and the streamed final model against the in-memory one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from longctx import checkpoint, merge
from longctx.config import RunConfig, load_config
from longctx.errors import UserError
from longctx.model import build_model
from longctx.tensor_files import SafetensorsReader, ShardedWriter, TensorSpec, fingerprint

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "tests" / "dist" / "train_tiny.py"
sys.path.insert(0, str(TRAIN_SCRIPT.parent))
from train_tiny import TINY_LLAMA  # noqa: E402

TOKENS = [(7 * i + 3) % 96 for i in range(48)]


def test_sharded_writer_and_reader_round_trip_every_dtype(tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 5).to(torch.bfloat16),
        "b.weight": torch.randn(7, dtype=torch.float32),
        "c.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.flag": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5, dtype=torch.float16),
        "f.empty": torch.zeros(0, 4),
    }
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with ShardedWriter(tmp_path, specs, prefix="model", max_shard_bytes=40) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith("-of-" + f"{len(files):05d}.safetensors")
    loaded = {}
    for name in files:  # each shard is a valid safetensors file for the reference reader
        loaded |= load_file(str(tmp_path / name))
    reader = SafetensorsReader.of_directory(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype, name
        assert torch.equal(reader.read(name), tensor) and reader.read(name).dtype == tensor.dtype, name

    with pytest.raises(AssertionError, match="planned"):  # out of order
        with ShardedWriter(tmp_path / "x", specs[:2]) as writer:
            writer.write("b.weight", tensors["b.weight"])
    (tmp_path / "x").mkdir()
    with pytest.raises(AssertionError, match="never written"):
        with ShardedWriter(tmp_path / "x", specs[:2]) as writer:
            writer.write("a.weight", tensors["a.weight"])

    (tmp_path / "t").mkdir()
    with ShardedWriter(tmp_path / "t", specs[:1]) as writer:
        writer.write("a.weight", tensors["a.weight"])
    single = tmp_path / "t" / "model.safetensors"
    single.write_bytes(single.read_bytes()[:-4])
    with pytest.raises(UserError, match="truncated"):
        SafetensorsReader.of_directory(tmp_path / "t").read("a.weight")


def other_base():
    """The tiny base's architecture with other random weights."""
    return build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none", "train.seed=7"]), for_training=False)


def test_fingerprint_follows_the_weights_not_the_directory(tmp_path):
    base = tmp_path / "base"
    build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False).save_pretrained(base)
    shutil.copytree(base, tmp_path / "copy")
    assert fingerprint(base) == fingerprint(tmp_path / "copy")
    assert set(fingerprint(base)) == {"config.json", "model.safetensors"}
    retrained = build_model(
        load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none", "train.seed=7"]), for_training=False
    )
    retrained.save_pretrained(tmp_path / "copy")  # same architecture, same sizes, other weights
    changed = fingerprint(tmp_path / "copy")
    assert changed["config.json"] == fingerprint(base)["config.json"]
    assert changed["model.safetensors"] != fingerprint(base)["model.safetensors"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, base dir) of a 1-rank ZeRO-3 LoRA + embed/norm run with S²-Attn from a base directory."""
    root = tmp_path_factory.mktemp("merge")
    base = root / "base"
    build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False).save_pretrained(base)
    overrides = ["model.init={}", f"model.path={base}", "attention.implementation=s2attn", "train.max_steps=2"]
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), str(root / "run"), *overrides, "train.lr=1e-2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return checkpoint.complete_checkpoints(root / "run")[-1], base


def test_lora_checkpoint_holds_only_what_trains_and_records_its_base(lora_run):
    ckpt, base = lora_run
    trained = load_file(str(ckpt / "trained.safetensors"))
    assert all("lora_" in n or "embed_tokens" in n or "norm" in n for n in trained), sorted(trained)
    assert {t.dtype for t in trained.values()} == {torch.float32}
    record = json.loads((ckpt / "base.json").read_text())
    assert record["fingerprint"] == fingerprint(base) and record["path"] == str(base.resolve())
    # The DeepSpeed files hold no frozen weight: a few times the trainable size, not the base's.
    base_bytes = (base / "model.safetensors").stat().st_size
    trained_bytes = (ckpt / "trained.safetensors").stat().st_size
    deepspeed_bytes = sum(f.stat().st_size for f in ckpt.glob("*.pt"))
    assert trained_bytes < base_bytes / 2 and deepspeed_bytes < 6 * trained_bytes, (base_bytes, deepspeed_bytes)


def test_streamed_model_equals_the_in_memory_one_in_any_number_of_shards(lora_run, tmp_path):
    ckpt, _ = lora_run
    weights = merge.read_checkpoint(ckpt)
    for name, shard_bytes in (("one", 0), ("many", 4096)):
        (tmp_path / name).mkdir()
        merge.write_merged(weights, tmp_path / name, torch.float32, max_shard_bytes=shard_bytes)
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    in_memory, _ = merge.load_trained_model(ckpt)
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        expected = in_memory(tokens).logits
        for name in ("one", "many"):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
            assert loaded.config.rope_parameters["rope_type"] == "linear"
            assert torch.equal(loaded(tokens).logits, expected), name


def test_a_base_whose_weights_changed_is_refused_by_resume_and_export(lora_run, tmp_path):
    ckpt, base = lora_run
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    other = build_model(
        load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none", "train.seed=7"]), for_training=False
    )
    other.save_pretrained(moved)
    cfg = load_config(RunConfig, None, [f"model.path={moved}"])
    with pytest.raises(UserError, match=r"is not the base checkpoint .* was trained from \(model.safetensors differ"):
        checkpoint.check_base(ckpt, cfg)
    edited = tmp_path / "ckpt"
    shutil.copytree(ckpt, edited)
    config = (edited / "config.yaml").read_text().replace(str(base), str(moved))
    (edited / "config.yaml").write_text(config)
    with pytest.raises(UserError, match="is not the base checkpoint"):
        merge.read_checkpoint(edited)
    shutil.rmtree(moved)
    with pytest.raises(UserError, match="is not a directory: the checkpoint holds only what training changed"):
        merge.read_checkpoint(edited)
