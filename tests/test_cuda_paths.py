"""Branches that only run on a CUDA machine, exercised here on the CPU: torch.cuda is made to report a GPU and the
arguments the code hands to transformers are checked the way transformers checks them, so the next CUDA-only mistake
shows up in `make test` rather than on the first GPU run."""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes  # noqa: F401  (imported before torch.cuda is faked: it picks its backend at import)
import pytest
import torch
from transformers import AutoModelForCausalLM

from longctx import trainer
from longctx.config import RunConfig, load_config
from longctx.model import build_model

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_tiny import TINY_LLAMA  # noqa: E402

ZERO3 = {
    "train_batch_size": 2,
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3},
}


class Loaded(BaseException):
    """Raised by the stand-in for from_pretrained once it has checked its arguments (nothing catches it)."""


@pytest.fixture
def one_gpu(monkeypatch):
    """torch.cuda says: one bf16-capable GPU, device 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[dict]:
    """Record each from_pretrained call, with whether ZeRO-3 was announced to transformers at that moment, and
    validate its device_map exactly as transformers does before loading anything."""
    from transformers.integrations.accelerate import check_and_set_device_map
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    calls = []

    def recorder(path, **kwargs):
        calls.append(
            {
                "device_map": kwargs.get("device_map"),
                "zero3": is_deepspeed_zero3_enabled(),
                "quantized": kwargs.get("quantization_config") is not None,
            }
        )
        check_and_set_device_map(kwargs.get("device_map"))  # raises "DeepSpeed Zero-3 is not compatible with ..."
        raise Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recorder)
    return calls


@pytest.fixture
def base_dir(tmp_path) -> Path:
    base = tmp_path / "base"
    build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False).save_pretrained(base)
    return base


def test_4bit_base_under_zero3_quantizes_onto_its_gpu_without_zero3_announced(one_gpu, from_pretrained_calls, base_dir):
    # llama2-70b-32k-qlora's path: ZeRO-3, model.path, NF4, each rank quantizing straight onto its GPU.
    cfg = load_config(
        RunConfig, None, [f"model.path={base_dir}", "quant.type=nf4", "model.dtype=bfloat16", "train.seq_len=64"]
    )
    with pytest.raises(Loaded), trainer.partitioned_loading(cfg, ZERO3):
        build_model(cfg)
    assert from_pretrained_calls == [{"device_map": {"": 0}, "zero3": False, "quantized": True}]


def test_plain_base_under_zero3_loads_partitioned_with_no_device_map(one_gpu, from_pretrained_calls, base_dir):
    cfg = load_config(RunConfig, None, [f"model.path={base_dir}", "model.dtype=bfloat16", "train.seq_len=64"])
    with pytest.raises(Loaded), trainer.partitioned_loading(cfg, ZERO3):
        build_model(cfg)
    assert from_pretrained_calls == [{"device_map": None, "zero3": True, "quantized": False}]
