"""The model families users bring train, export and reload as they are: Llama-2 and Llama-3.1 style, Mistral (a
sliding window), Qwen2/Qwen2.5 (q/k/v bias, an embedding table padded beyond the tokenizer), Qwen3 (q_norm / k_norm)
and SmolLM2 style (9 heads over 3 kv heads, tied embeddings).

Each is a tiny random model with its family's config fields (2 layers, head_dim 8 or 16, 32 positions) in a base
directory with a 96-token tokenizer, trained under S²-Attn with LoRA on q/k/v/o + trainable embeddings and norms and
its RoPE extended x2 to 64 tokens (2 ranks, ZeRO-3, all runs in one launcher start: each start costs ~20-30 s), then
exported in both formats and reloaded by plain transformers / peft in a process that never imports longctx
(tests/dist/export_load_plain.py), whose logits must be the checkpoint's trained model's.

The sliding-window tests below need no launcher: S²-Attn on a Mistral model computes S²-Attn within the window, dense
attention keeps the window, and a group longer than the window is refused from the config.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longctx import attention, checkpoint, merge
from longctx.config import ConfigError, RunConfig, load_config
from longctx.errors import UserError
from longctx.export import export
from longctx.feasibility import check_run, run_problems
from longctx.model import build_model, trainable_modules

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tests" / "dist"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
sys.path.insert(0, str(DIST))
from test_export import free_port, write_word_tokenizer  # noqa: E402

# Longer than the base context (32 positions) and than Mistral's window (16): logits depend on the RoPE scaling and
# on the window. Ids below 96, the tokenizer's size (Qwen2's table has 128 rows).
TOKENS = [(7 * i + 3) % 96 for i in range(48)]
# fp32: the merged model is the same merge as the trained model's; the unmerged adapter adds B·A·x separately from
# W·x, which reorders fp32 sums. Measured: at most 6e-7 (merged: 0) on logits of size ~0.1-1.
FP32_ATOL = 1e-5
# 4 sequences = one global batch, trained on again and again: the loss falls at every step.
COMMON = ["train.max_steps=4", "train.lr=1e-2", "train.save_every=0", "attention.implementation=s2attn"]
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass
class Architecture:
    init: dict
    """The base's config.json fields (vocab_size 96 and max_position_embeddings 32 unless given)."""
    overrides: list[str]
    """The run's RoPE type and S²-Attn group size (train.seq_len is 64)."""
    rope_parameters: dict
    """What the exported config.json must say."""
    norms: set[str] = field(default_factory=set)
    """Norm modules beyond LLaMA's (input_layernorm, post_attention_layernorm, norm) that train in full."""


ARCHITECTURES = {
    "llama2": Architecture(
        dict(model_type="llama", rope_theta=10000.0, **SHAPE),
        ["rope.type=linear"],  # G = 64 / 4
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    # Llama-3.1's llama3 scaling, positions scaled down: factor 2 over 16 (its 8 over 8192), trained to 32 (131072).
    # Extended in its own type: the factor doubles, the bands stay.
    "llama3.1": Architecture(
        dict(
            model_type="llama",
            **(SHAPE | dict(hidden_size=64, intermediate_size=96)),  # head_dim 16
            rope_parameters=LLAMA3_SCALING | {"factor": 2.0, "original_max_position_embeddings": 16, "rope_theta": 5e5},
        ),
        ["rope.type=llama3"],
        LLAMA3_SCALING | {"factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    ),
    # A window of 16 binds on 64 tokens; G = 16 <= 16 honours it (docs/s2attn.md, "Sliding-window models").
    "mistral": Architecture(
        dict(model_type="mistral", sliding_window=16, rope_theta=10000.0, **SHAPE),
        ["rope.type=linear", "attention.group_size=16"],
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    # Qwen2.5: q/k/v bias, a table of 128 rows for a 96-token tokenizer, the window off as its config.json has it;
    # extended in YaRN, as Qwen documents for Qwen2.5.
    "qwen2": Architecture(
        dict(model_type="qwen2", vocab_size=128, rope_theta=1e6, use_sliding_window=False, sliding_window=32, **SHAPE),
        ["rope.type=yarn"],
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 1000000.0},
    ),
    "qwen3": Architecture(
        dict(model_type="qwen3", head_dim=16, rope_theta=1e6, **SHAPE),
        ["rope.type=linear"],
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        norms={"q_norm", "k_norm"},
    ),
    "smollm2": Architecture(
        dict(
            model_type="llama",
            **(SHAPE | dict(hidden_size=72, intermediate_size=96, num_attention_heads=9, num_key_value_heads=3)),
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
        ["rope.type=linear", "attention.group_size=32"],  # G = 64 / 2
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
    ),
}
# Config fields that say how the model computes, beyond RoPE: an export keeps them as the base has them.
KEPT_FIELDS = (
    "model_type", "sliding_window", "use_sliding_window", "layer_types", "attention_bias", "head_dim",
    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "vocab_size",
)  # fmt: skip


def init_override(arch: Architecture) -> str:
    return f"model.init={json.dumps({'vocab_size': 96, 'max_position_embeddings': 32} | arch.init)}"


def save_base(arch: Architecture, directory: Path) -> None:
    """The random base as a Hugging Face directory with the word tokenizer; biases random (transformers initialises
    them to zero), so that an export that dropped them would show in the logits."""
    model = build_model(load_config(RunConfig, None, [init_override(arch), "rope.type=none"]), for_training=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    write_word_tokenizer(directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """root/NAME/base (the base directory) and root/runs/NAME (its 4-step run) for every architecture."""
    root = tmp_path_factory.mktemp("architectures")
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(DIST / "train_configs.py")]
    command += [str(root / "runs"), "--num-samples", "4"]
    for name, arch in ARCHITECTURES.items():
        save_base(arch, root / name / "base")
        command += ["--run", name, "model.init={}", f"model.path={root / name / 'base'}", *COMMON, *arch.overrides]
    # One thread per rank: 2 ranks on 2 cores, torch's default thread pools make every step ~10x slower.
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def exports(runs) -> Path:
    """root/NAME/export/{merged,adapter}, and root/NAME/plain.{safetensors,json}: what plain transformers / peft
    computed from them (all architectures in one process: each start of Python + transformers costs seconds)."""
    jobs = []
    for name in ARCHITECTURES:
        out = runs / name / "export"
        export(runs / "runs" / name, out, format="both", dtype="fp32")
        jobs.append([str(out / "merged"), str(out / "adapter"), str(runs / name / "base"), str(runs / name / "plain")])
        jobs[-1].append(TOKENS)
    (runs / "jobs.json").write_text(json.dumps(jobs))
    loaded = subprocess.run(
        [sys.executable, str(DIST / "export_load_plain.py"), "--jobs", str(runs / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    return runs


def trained_checkpoint(runs: Path, name: str) -> Path:
    return checkpoint.complete_checkpoints(runs / "runs" / name)[-1]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_trains_lora_embeddings_and_every_norm(runs, name):
    metrics = (runs / "runs" / name / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses

    trained = load_file(trained_checkpoint(runs, name) / "trained.safetensors")
    leaves = {key.split(".lora_")[0].removesuffix(".weight").rsplit(".", 1)[-1] for key in trained}
    norms = {"input_layernorm", "post_attention_layernorm", "norm"} | ARCHITECTURES[name].norms
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"} | norms  # no head, no bias
    for layer in range(2):
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lora_b = trained[f"base_model.model.model.layers.{layer}.self_attn.{projection}.lora_B.default.weight"]
            assert lora_b.abs().max() > 0  # initialised to zero, so trained


@pytest.mark.distributed
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_exports_reload_in_plain_transformers_and_peft_with_the_trained_logits(exports, name):
    plain = load_file(exports / name / "plain.safetensors")
    facts = json.loads((exports / name / "plain.json").read_text())
    assert facts["longctx_imported"] is False
    model, _ = merge.load_trained_model(trained_checkpoint(exports, name))
    with torch.no_grad():
        expected = model(torch.tensor([TOKENS])).logits[0]  # (N, vocab)
    assert expected.shape == (len(TOKENS), ARCHITECTURES[name].init.get("vocab_size", 96))
    torch.testing.assert_close(plain["merged"], expected, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(plain["adapter"], expected, atol=FP32_ATOL, rtol=0)
    # The adapter's config.json (RoPE scaling) is what makes the adapter right: on the unscaled base it is not (by
    # 5.7e-4 at least, Qwen2's: with rope_theta 1e6 and head_dim 8 YaRN changes only its slowest frequencies).
    assert (plain["adapter_on_unscaled_base"] - expected).abs().max() > 10 * FP32_ATOL
    assert facts["merged_rope_type"] == ARCHITECTURES[name].rope_parameters["rope_type"]
    assert facts["merged_max_position_embeddings"] == 64
    assert facts["adapter_head_is_embedding"] == (name == "smollm2")  # tied: the head is the trained embedding


@pytest.mark.distributed
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_exported_config_has_the_runs_rope_and_the_models_own_fields(exports, name):
    arch, base = ARCHITECTURES[name], exports / name / "base"
    base_config = json.loads((base / "config.json").read_text())
    for kind in ("merged", "adapter"):
        directory = exports / name / "export" / kind
        config = json.loads((directory / "config.json").read_text())
        assert config["rope_parameters"] == arch.rope_parameters, kind
        assert config["max_position_embeddings"] == 64 and "s2attn" not in json.dumps(config)
        assert {k: config.get(k) for k in KEPT_FIELDS} == {k: base_config.get(k) for k in KEPT_FIELDS}, kind
        assert (directory / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    if name == "mistral":
        assert base_config["sliding_window"] == 16  # the window is kept: dense inference slides as the model did
    if name in ("llama2", "llama3.1", "qwen3", "smollm2"):
        assert base_config["attention_bias"] is False
    # transformers 5 loads a qwen2 directory's tokenizer as Qwen2Tokenizer (byte-level BPE rebuilt from the vocab),
    # which does not split the word tokenizer's words, in the base directory as in the export: files compared above.
    if name != "qwen2":
        assert json.loads((exports / name / "plain.json").read_text())["tokenizer_ids"] == [5, 7, 90]


@pytest.mark.distributed
def test_qwen2_keeps_its_qkv_biases_and_padded_table(exports):
    merged = load_file(exports / "qwen2" / "export" / "merged" / "model.safetensors")
    base = load_file(exports / "qwen2" / "base" / "model.safetensors")
    biases = [name for name in base if name.endswith(".bias")]
    assert len(biases) == 2 * 3  # q, k, v in each layer; o_proj has none
    for name in biases:
        assert torch.equal(merged[name], base[name]) and base[name].abs().max() > 0, name
    assert merged["model.embed_tokens.weight"].shape[0] == 128


@pytest.mark.distributed
def test_qwen3_adapter_carries_q_norm_and_k_norm(exports):
    adapter = exports / "qwen3" / "export" / "adapter"
    assert {"q_norm", "k_norm"} <= set(json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"])
    weights = load_file(adapter / "adapter_model.safetensors")
    base = load_file(exports / "qwen3" / "base" / "model.safetensors")
    for layer in range(2):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{norm}.weight"
            assert not torch.equal(weights[f"base_model.model.{name}"], base[name]), name  # trained


@pytest.mark.distributed
def test_tied_adapter_ties_the_head_to_the_trained_embedding(exports):
    adapter_config = json.loads((exports / "smollm2" / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["ensure_weight_tying"] is True
    assert "embed_tokens" in adapter_config["modules_to_save"]


def test_trainable_modules_catch_qwen3_head_norms():
    cfg = load_config(RunConfig, None, [init_override(ARCHITECTURES["qwen3"]), "rope.type=none"])
    model = build_model(cfg, for_training=False)
    names = {id(module): name for name, module in model.named_modules()}
    caught = {names[id(module)] for module in trainable_modules(model, ["norm"])}
    assert {f"model.layers.{i}.self_attn.{norm}" for i in range(2) for norm in ("q_norm", "k_norm")} <= caught


# ----------------------------------------------------------------------------------------------------------------
# Sliding windows (no launcher)
# ----------------------------------------------------------------------------------------------------------------

WINDOW = 8


def windowed_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Float64 attention from the definitions: S²-Attn's groups (docs/s2attn.md; G from the model's settings) and the
    model's sliding window as transformers defines it (query i sees key j iff i - j < window), both applied."""
    q, k, v = query.double(), key.double(), value.double()
    num_heads, seq_len = q.shape[1], q.shape[2]
    k, v = (x.repeat_interleave(num_heads // x.shape[1], dim=1) for x in (k, v))
    group_size, window = attention.group_size_for(module.config, seq_len), kwargs["sliding_window"]
    index = torch.arange(seq_len)
    offset = torch.where(torch.arange(num_heads) >= num_heads // 2, group_size // 2, 0)  # (H,)
    group = torch.div(index[None, :] + offset[:, None], group_size, rounding_mode="floor")  # (H, N)
    distance = index[:, None] - index[None, :]
    allowed = (distance >= 0) & (distance < window) & (group[:, :, None] == group[:, None, :])  # (H, N, N)
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(query.dtype).transpose(1, 2), None


def mistral(attn_implementation: str, window: int | None = WINDOW):
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    attention.register()
    AttentionInterface.register("windowed_reference", windowed_reference)
    config = AutoConfig.for_model("mistral", **SHAPE, vocab_size=96, max_position_embeddings=64, sliding_window=window)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits[0]


def test_s2attn_on_a_sliding_window_model_is_s2attn_within_the_window():
    input_ids = torch.tensor([TOKENS[:32]])  # 4 windows long
    s2attn, reference = mistral("s2attn"), mistral("windowed_reference")
    for model in (s2attn, reference):
        attention.configure(model, group_size=WINDOW)
    torch.testing.assert_close(logits(s2attn.train(), input_ids), logits(reference.train(), input_ids))

    # A group longer than the window would attend where the model never does: refused, naming the fix.
    attention.configure(s2attn, group_size=2 * WINDOW)
    with pytest.raises(UserError, match=f"^S²-Attn group size 16 .* set attention.group_size to at most {WINDOW}$"):
        logits(s2attn.train(), input_ids)


def test_dense_attention_of_a_sliding_window_model_keeps_its_window():
    """Eval mode and cached decoding of the S²-Attn model compute what transformers' sdpa computes with the window."""
    input_ids = torch.tensor([TOKENS[:32]])
    s2attn, sdpa = mistral("s2attn").eval(), mistral("sdpa").eval()
    expected = logits(sdpa, input_ids)
    torch.testing.assert_close(logits(s2attn, input_ids), expected)
    assert (logits(mistral("sdpa", window=None).eval(), input_ids) - expected).abs().max() > 1e-3  # the window binds
    # Padding at the end, and two packed documents (positions restarting): kept apart as transformers keeps them.
    padding = torch.tensor([[1] * 26 + [0] * 6])
    with torch.no_grad():
        padded = [model(input_ids, attention_mask=padding).logits[0, :26] for model in (s2attn, sdpa)]
        positions = torch.cat([torch.arange(12), torch.arange(20)])[None]
        # transformers isolates packed documents only without a cache
        packed = [model(input_ids, position_ids=positions, use_cache=False).logits[0] for model in (s2attn, sdpa)]
    torch.testing.assert_close(*padded)
    torch.testing.assert_close(*packed)

    # transformers renamed the KV cache argument and output field (past_key_values -> cache, the old one deprecated)
    cache_name = "cache" if "cache" in inspect.signature(sdpa.forward).parameters else "past_key_values"
    with torch.no_grad():  # a prefix of 20 tokens, then one token at a time through the cache
        outputs = {}
        for name, model in (("s2attn", s2attn), ("sdpa", sdpa)):
            output = model(input_ids[:, :20], use_cache=True)
            steps = [output.logits[0, -1]]
            for position in range(20, 32):
                cache = {cache_name: getattr(output, cache_name)}
                output = model(input_ids[:, position : position + 1], use_cache=True, **cache)
                steps.append(output.logits[0, -1])
            outputs[name] = torch.stack(steps)
    torch.testing.assert_close(outputs["s2attn"], outputs["sdpa"])
    torch.testing.assert_close(outputs["sdpa"], expected[19:])


def windowed_config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **SHAPE, vocab_size=96, max_position_embeddings=32, **fields)


def test_a_group_longer_than_the_window_is_refused_from_the_config():
    cfg = load_config(RunConfig, None, [init_override(ARCHITECTURES["mistral"]), "attention.group_size=32"])
    problems = run_problems(cfg, windowed_config("mistral", sliding_window=16))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "group size 32 is longer than the sliding window of model.init (16 tokens)" in problems[0]
    assert "set attention.group_size to at most 16" in problems[0]
    with pytest.raises(ConfigError, match="attention.group_size to at most 16"):
        check_run(cfg, windowed_config("mistral", sliding_window=16))

    fits = load_config(RunConfig, None, [init_override(ARCHITECTURES["mistral"]), "attention.group_size=16"])
    assert run_problems(fits, windowed_config("mistral", sliding_window=16)) == []
    dense = load_config(RunConfig, None, [init_override(ARCHITECTURES["mistral"]), "attention.implementation=sdpa"])
    assert run_problems(dense, windowed_config("mistral", sliding_window=4)) == []  # transformers applies it
    # ... but not once Ulysses splits the sequence: its dense core sees no window.
    split = load_config(RunConfig, None, [init_override(ARCHITECTURES["mistral"]), "attention.implementation=sdpa",
                                          "parallel.sequence_parallel_size=2"])  # fmt: skip
    (problem,) = run_problems(split, windowed_config("mistral", sliding_window=16))
    assert "beyond the sliding window of model.init (16 tokens)" in problem and "or no sequence parallelism" in problem
    # Qwen2 keeps sliding_window in config.json but slides only where use_sliding_window puts it (layers from
    # max_window_layers on).
    assert run_problems(cfg, windowed_config("qwen2", use_sliding_window=False, sliding_window=16)) == []
    sliding_qwen2 = windowed_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert "at most 16" in run_problems(cfg, sliding_qwen2)[0]
