"""benchmarks/train_step.py on CPU with the tiny shape: the sweep's JSON and PNG, FLOP counting, the bisection."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def train_step(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(SCRIPT.parent))  # the script imports its sibling _env
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch_module.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    """One tiny CPU sweep at N=128: S²-Attn and dense × LoRA and full FT, each in its own process."""
    out = tmp_path_factory.mktemp("train_step") / "sweep.json"
    command = [sys.executable, str(SCRIPT), "--sweep", "--shape", "tiny", "--lengths", "128"]
    command += ["--warmup", "0", "--steps", "1", "--bisect-limit", "0", "--ds-config", "ds_configs/stage2.json"]
    command += ["--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), out


def hand_counted_linear_params(lora: bool) -> tuple[int, int]:
    """(all, trainable) nn.Linear weights of the tiny shape, from its numbers: h=64, I=176, 2 layers, V=512."""
    hidden, intermediate, layers, vocab, rank = 64, 176, 2, 512, 8  # r=8: the llama2-7b-32k preset's LoRA rank
    attention = 4 * hidden * hidden  # q, k, v, o (as many KV heads as heads)
    mlp = 3 * hidden * intermediate  # gate, up, down
    base = layers * (attention + mlp) + hidden * vocab  # + output head
    adapters = layers * 4 * rank * (hidden + hidden)  # A (r×h) and B (h×r) on q, k, v, o
    return (base + adapters, adapters) if lora else (base, base)


def test_sweep_runs_all_four_configurations_and_writes_every_field(sweep_report):
    report, out = sweep_report
    for key in ("device", "device_name", "driver", "versions", "git_commit", "shape_config", "flop_counting", "rows"):
        assert key in report
    assert report["device"] == "cpu" and "CPU" in report["label"]
    assert {"torch", "cuda", "deepspeed", "transformers"} <= set(report["versions"])
    combos = {(row["attention"], row["training"]) for row in report["rows"]}
    assert combos == {("s2attn", "lora"), ("s2attn", "full"), ("sdpa", "lora"), ("sdpa", "full")}
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert row["seq_len"] == 128 and row["zero_stage"] == 2 and row["dtype"] == "float32"
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(128 / row["step_s"])
        assert row["achieved_tflops"] == pytest.approx(row["flops_per_step"] / row["step_s"] / 1e12)
        assert row["mfu"] is None  # no peak FLOP/s known for a CPU without --peak-tflops
        assert row["peak_gpu_memory_gib"] is None and row["host_peak_rss_gib"] > 0.05
        assert row["group_size"] == (32 if row["attention"] == "s2attn" else None)
    by_combo = {(row["attention"], row["training"]): row for row in report["rows"]}
    assert by_combo["s2attn", "full"]["trainable_params"] == by_combo["s2attn", "full"]["total_params"]
    assert by_combo["s2attn", "lora"]["trainable_params"] < by_combo["s2attn", "full"]["trainable_params"] / 3


def test_flops_match_a_hand_computation(sweep_report):
    report, _ = sweep_report
    seq_len, layers, heads, head_dim = 128, 2, 4, 16
    for row in report["rows"]:
        linear, trainable = hand_counted_linear_params(lora=row["training"] == "lora")
        assert (row["linear_params"], row["trainable_linear_params"]) == (linear, trainable)
        layer_linear = linear - 64 * 512  # all but the output head are recomputed under checkpointing
        score_entries = seq_len * seq_len / 2 if row["attention"] == "sdpa" else seq_len * 32 / 2
        attention_forward = 4 * head_dim * score_entries * heads * layers
        expected = (
            2 * linear * seq_len  # forward
            + 2 * linear * seq_len  # input gradient
            + 2 * trainable * seq_len  # weight gradient
            + 2 * layer_linear * seq_len  # recompute (the preset checkpoints activations)
            + attention_forward * 4  # forward, backward (2×) and recompute
        )
        assert row["activation_checkpointing"] is True
        assert row["flops_per_step"] == pytest.approx(expected, rel=1e-12)


def test_plot_is_written(sweep_report):
    _, out = sweep_report
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_training_flops_without_checkpointing_has_no_recompute(train_step):
    flops = train_step.training_flops(
        batch=2,
        seq_len=1000,
        linear_params=10,
        layer_linear_params=8,
        trainable_linear_params=1,
        num_layers=3,
        num_heads=4,
        head_dim=5,
        group_size=None,
        checkpointing=False,
    )
    tokens = 2000
    attention_forward = 4 * 5 * (1000 * 1000 / 2) * 4 * 3 * 2
    assert flops["recompute"] == 0
    assert flops["total"] == 2 * 10 * tokens * 2 + 2 * 1 * tokens + 3 * attention_forward


def test_training_flops_of_the_variants_count_dense_heads_and_sinks(train_step):
    common = dict(batch=1, seq_len=1000, linear_params=0, layer_linear_params=0, trainable_linear_params=0,
                  num_layers=2, num_heads=8, head_dim=4, checkpointing=False)  # fmt: skip
    grouped = (1000 * 250 / 2 + 1000 * 3) * 6  # 6 grouped heads of G = 250, each query reading 3 sinks more
    dense = 1000 * 1000 / 2 * 2  # 2 dense heads
    flops = train_step.training_flops(group_size=250, dense_heads=2, sink_tokens=3, **common)
    assert flops["attention_forward"] == 4 * 4 * (grouped + dense) * 2
    plain = train_step.training_flops(group_size=250, **common)
    assert plain["attention_forward"] == 4 * 4 * 1000 * 250 / 2 * 8 * 2


def test_reach_rows_train_the_reach_presets_variants_and_plain_rows_none(train_step):
    def config(attention):
        return train_step.Configuration(
            "llama2-7b", 32768, attention, "lora", str(train_step.REPO / "launch/presets/llama2-7b-32k-reach.yaml"),
            None, 0, 1,
        )  # fmt: skip

    reach, plain = (
        train_step.run_config(config("s2attn-reach")).attention,
        train_step.run_config(config("s2attn")).attention,
    )
    assert (reach.implementation, reach.sink_tokens, reach.dense_heads, reach.dense_phase) == ("s2attn", 4, 2, 0)
    assert (plain.implementation, plain.sink_tokens, plain.dense_heads, plain.dense_phase) == ("s2attn", 0, 0, 0)


def test_peak_tflops_from_device_name(train_step):
    assert train_step.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert train_step.peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert train_step.peak_tflops_of("x86_64") is None


@pytest.mark.parametrize("true_limit", [0, 8191, 8192, 100_000, 131_072, 600_000])
def test_bisection_finds_the_longest_fitting_length(train_step, true_limit):
    fits = lambda n: n <= true_limit  # noqa: E731
    longest, probes = train_step.longest_fitting(fits, known_fit=0, known_fail=None, granularity=1024, limit=524_288)
    assert longest == min(true_limit // 1024 * 1024, 524_288)
    assert all(fitted == fits(n) for n, fitted in probes)
    assert len(probes) <= 2 * 20  # doubling then halving: logarithmic, not a scan


def test_bisection_starts_from_the_sweep_bounds(train_step):
    seen = []

    def fits(n):
        seen.append(n)
        return n <= 150_000

    longest, probes = train_step.longest_fitting(
        fits, known_fit=131_072, known_fail=196_608, granularity=8192, limit=524_288
    )
    assert longest == 147_456  # 18 × 8192
    assert all(131_072 < n < 196_608 for n in seen) and len(probes) == len(seen) <= 3


def test_bisection_probes_only_multiples_of_the_granularity(train_step):
    longest, probes = train_step.longest_fitting(
        lambda n: n <= 8000, known_fit=3000, known_fail=10_000, granularity=3000, limit=30_000
    )
    assert longest == 6000 and [n for n, _ in probes] == [6000, 9000]
