"""`longctx plan`: will a run fit on a cluster, in which ZeRO stage and sequence-parallel degree, and how fast is it?

Per GPU, the estimate adds up the parts below (bytes; b = bytes per weight, 2 for bf16; W = world size = nodes ×
GPUs per node; P = sequence-parallel degree; n = seq_len / P tokens per GPU; micro batch B). ZeRO shards over all W
ranks (DeepSpeed's Ulysses/ALST makes the sequence-parallel ranks part of ZeRO's data-parallel group).

- weights: b per parameter; 4-bit base linears (quant.type nf4/fp4) 0.5 byte plus their block constants (one
  fp32 absmax per 64 weights; double quantization: one byte per 64 plus one fp32 per 64 × 256). ZeRO-2: whole on
  every GPU. ZeRO-3: 1/W of them, plus the tensors below the persistence threshold (kept whole), plus the gathered
  working set (the largest decoder layer, and as much again prefetched, at most stage3_prefetch_bucket_size).
  ZeRO-3 + offload: the partition lives on the host.
- gradients: b per trainable parameter, partitioned (1/W), plus the full-size gradient of the largest trainable
  tensor before it is reduced. Offload: on the host (fp32).
- optimizer: fp32 master copy + two Adam moments = 12 bytes per trainable parameter, 1/W. Offload: on the host.
  (So full fine-tuning without ZeRO would cost 2 + 2 + 12 = 16 bytes per parameter.)
- activation checkpoints: the input of every decoder layer, L × B × n × hidden × b, plus RoPE's cos/sin once.
  Host when memory.offload_activations (two layers' worth stay on the GPU in flight). Without activation
  checkpointing: every layer's saved activations instead (the layer working set below, L times).
- layer working set: the tensors one decoder layer saves for its backward (recomputed under checkpointing) plus the
  gradients alive during that backward; attention memory-efficient (flash / SDPA, O(N·G) for S²-Attn: no N×N
  scores), eager attention adds the H/P × N × N scores. Tiled MLP: its intermediate exists for one tile only.
- logits: B × n × vocab × (b for the model's logits + 4 for their fp32 copy + 4 for log-softmax + 4 for its
  gradient); tiled loss: memory.loss_chunk_tokens tokens at a time instead of n.
- ZeRO buckets: ZeRO-2: reduce_bucket_size elements of b bytes, twice with overlap_comm; ZeRO-3: one bucket.
- all-to-all: Ulysses (P > 1): the send and receive buffers of the one all-to-all in flight.
- reserve: CUDA context, NCCL and allocator slack, a stated constant.

Peak = what lives throughout (weights, gradients, optimizer, checkpoints, all-to-all, ZeRO-3's bucket, reserve)
+ max(logits, layer working set [+ ZeRO-2's buckets, which are allocated at the first gradient, after the logits
are freed]): the checkpoints are all alive when the loss is computed and while the last layers run backward.

Host memory per node: the offloaded partitions of its GPUs (bf16 weights, fp32 gradients, fp32 master + moments),
offloaded checkpoints, a per-process overhead, and at load time (ZeRO-2, which loads without zero.Init) one whole
copy of the model per GPU.

Step time: the FLOP count of benchmarks/train_step.py (README, "How FLOPs are counted": linear forward, input and
weight gradients, recompute, attention over N²/2 score entries per head when dense and N·G/2 under S²-Attn, backward
2× forward) over global_batch_size sequences, divided by W × peak × MFU.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longctx import ds_config
from longctx.config import RunConfig, load_config
from longctx.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO / "launch" / "presets"
SHIPPED_DS_CONFIGS = {"2": "stage2.json", "3": "stage3.json", "3+offload": "stage3_offload.json"}
GIB = 2**30

# Meta's released config.json values, for presets whose model.path is not on this machine.
LLAMA2_SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip
# Other models' released config.json (the fields plan and longctx.feasibility read), by what their directory names
# contain. Qwen2.5-7B's says max_position_embeddings 131072 though it was pre-trained to 32768 (Qwen2.5-7B-Instruct's
# says 32768): 131072 is its YaRN reach, which its preset states with rope.original_context.
KNOWN_CONFIGS: dict[tuple[str, ...], dict[str, Any]] = {
    ("llama-3.1-8b", "llama3.1-8b"): dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    ("qwen2.5-7b",): dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28,
    ),
}  # fmt: skip

# Stated constants (the legend prints them).
GPU_RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL buffers, caching-allocator slack
HOST_BYTES_PER_PROCESS = 3 * GIB  # Python, torch, DeepSpeed and CUDA runtime of one rank on the host
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "persistence_threshold": 1e5}
NF4_BLOCK, DOUBLE_QUANT_BLOCK = 64, 256
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------------------
# Inputs: model shape, cluster, strategy
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-family decoder: what the estimate needs of a Hugging Face config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of a decoder layer."""
        h, kv, i = self.hidden_size, self.kv_dim, self.intermediate_size
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def shape_from_hf_config(fields: dict[str, Any], source: str) -> ModelShape:
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in fields]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: plan needs a LLaMA-family config (hidden_size, ...)")
    heads = int(fields["num_attention_heads"])
    return ModelShape(
        hidden_size=int(fields["hidden_size"]),
        intermediate_size=int(fields.get("intermediate_size", 4 * fields["hidden_size"])),
        num_hidden_layers=int(fields["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(fields.get("num_key_value_heads") or heads),
        vocab_size=int(fields["vocab_size"]),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
        source=source,
    )


def model_shape(cfg: RunConfig) -> ModelShape:
    """The shape from model.init, or model.path's config.json (no weights read), or a known model by name."""
    if cfg.model.init:
        return shape_from_hf_config(cfg.model.init, "model.init")
    config_file = Path(cfg.model.path) / "config.json"
    if config_file.is_file():
        try:
            return shape_from_hf_config(json.loads(config_file.read_text()), str(config_file))
        except json.JSONDecodeError:
            raise UserError(f"{config_file} is not valid JSON: re-download or re-export the model") from None
    fields, source = known_config(cfg.model.path)
    return shape_from_hf_config(fields, source)


def known_config(model_path: str) -> tuple[dict[str, Any], str]:
    """(released config.json fields, where they come from) of a model known by its directory's name."""
    name = Path(model_path).name.lower()
    if "llama-2" in name or "llama2" in name:
        for size, fields in LLAMA2_SHAPES.items():
            if f"-{size}" in name:
                released = dict(model_type="llama", max_position_embeddings=4096, **fields)
                return released, f"LLaMA-2-{size.upper()} shape (model.path not on this machine)"
    for names, fields in KNOWN_CONFIGS.items():
        if any(known in name for known in names):
            return fields, f"{names[0]} config.json as released (model.path not on this machine)"
    raise UserError(
        f"model.path={model_path} has no config.json here and is not a known model name (LLaMA-2 7B/13B/70B, "
        "Llama-3.1-8B, Qwen2.5-7B): point model.path at a model directory (only its config.json is read) or set "
        "model.init"
    )


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    host_memory_gib: float
    peak_tflops: float = 312.0
    mfu: float = 0.4

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        problems = []
        if self.nodes < 1 or self.gpus_per_node < 1:
            problems.append(f"--nodes={self.nodes} and --gpus-per-node={self.gpus_per_node} must be >= 1")
        if self.gpu_memory_gib <= 0:
            problems.append(f"--gpu-memory-gb={self.gpu_memory_gib:g} must be > 0, e.g. 80 for an 80 GB GPU")
        if self.host_memory_gib <= 0:
            problems.append(f"--host-memory-gb={self.host_memory_gib:g} must be > 0, e.g. 1024 for 1 TB per node")
        if not 0 < self.mfu <= 1:
            problems.append(f"--mfu={self.mfu:g} must be in (0, 1], e.g. 0.4")
        if self.peak_tflops <= 0:
            problems.append(f"--peak-tflops={self.peak_tflops:g} must be > 0, e.g. 312 (A100) or 989 (H100)")
        if problems:
            raise UserError("; ".join(problems))


@dataclass(frozen=True)
class Strategy:
    zero: str  # "2", "3" or "3+offload"
    sequence_parallel: int

    @property
    def label(self) -> str:
        return f"ZeRO-{self.zero} SP={self.sequence_parallel}"


@dataclass(frozen=True)
class ZeroSettings:
    """What the estimate reads from a DeepSpeed JSON."""

    stage: int
    offload: bool
    reduce_bucket_size: float
    overlap_comm: bool
    prefetch_bucket_size: float
    persistence_threshold: float

    @property
    def key(self) -> str:
        return "3+offload" if self.offload else str(self.stage)


def zero_settings(ds: dict[str, Any]) -> ZeroSettings:
    zero = ds.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_param", "offload_optimizer"))
    return ZeroSettings(
        stage=int(zero.get("stage", 0)),
        offload=offload,
        reduce_bucket_size=float(zero.get("reduce_bucket_size", DEEPSPEED_DEFAULTS["reduce_bucket_size"])),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        prefetch_bucket_size=float(
            zero.get("stage3_prefetch_bucket_size", DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"])
        ),
        persistence_threshold=float(
            zero.get("stage3_param_persistence_threshold", DEEPSPEED_DEFAULTS["persistence_threshold"])
        ),
    )


def zero_settings_by_strategy(cfg: RunConfig) -> tuple[dict[str, ZeroSettings], str]:
    """ZeRO settings for "2", "3", "3+offload": the preset's own JSON for its stage, the shipped ones for the rest."""
    preset = zero_settings(ds_config.read(cfg.deepspeed.config))
    if preset.stage not in (2, 3):
        raise UserError(f"deepspeed.config={cfg.deepspeed.config} has ZeRO stage {preset.stage}: plan covers 2 and 3")
    settings = {
        key: zero_settings(ds_config.read(ds_config.SHIPPED_DIR / name)) for key, name in SHIPPED_DS_CONFIGS.items()
    }
    settings[preset.key] = preset
    return settings, preset.key


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorGroup:
    """`count` parameter tensors of `numel` elements each."""

    name: str
    numel: int
    count: int
    trainable: bool
    quantized: bool = False


def parameter_inventory(shape: ModelShape, cfg: RunConfig) -> list[TensorGroup]:
    """Every parameter tensor of the model, grouped: what trains (LoRA + embed/norm, or all) and what is 4-bit."""
    lora, layers, h = cfg.lora, shape.num_hidden_layers, shape.hidden_size
    full_ft = not lora.enabled
    quantized = cfg.quant.enabled
    linears = shape.linear_shapes()
    unknown = sorted(set(lora.target_modules) - set(linears)) if lora.enabled else []
    if unknown:
        raise UserError(f"lora.target_modules {unknown} are not LLaMA linears: plan knows {', '.join(linears)}")
    groups = [TensorGroup("embed_tokens", shape.vocab_size * h, 1, full_ft or "embed" in lora.trainable)]
    for name, (fan_in, fan_out) in linears.items():
        groups.append(TensorGroup(name, fan_in * fan_out, layers, full_ft, quantized))
        if lora.enabled and name in lora.target_modules:
            groups.append(TensorGroup(f"{name}.lora_A", fan_in * lora.r, layers, True))
            groups.append(TensorGroup(f"{name}.lora_B", lora.r * fan_out, layers, True))
    groups.append(TensorGroup("norms", h, 2 * layers + 1, full_ft or "norm" in lora.trainable))
    if not shape.tie_word_embeddings:
        groups.append(TensorGroup("lm_head", shape.vocab_size * h, 1, full_ft or "lm_head" in lora.trainable))
    return groups


def quantized_bytes_per_weight(cfg: RunConfig) -> float:
    """4-bit data plus its block constants (bitsandbytes: blocks of 64; double quantization re-quantizes them)."""
    if cfg.quant.double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


# ----------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    strategy: Strategy
    gpu: dict[str, float]  # bytes per GPU by part
    host: dict[str, float]  # bytes per node by part
    gpu_total: float
    host_total: float
    fits_gpu: bool
    fits_host: bool
    batch_ok: bool
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host and self.batch_ok


def weight_bytes(cfg: RunConfig, groups: list[TensorGroup], param_bytes: int) -> float:
    per_quantized = quantized_bytes_per_weight(cfg)
    return sum(g.numel * g.count * (per_quantized if g.quantized else param_bytes) for g in groups)


def layer_working_set(shape: ModelShape, cfg: RunConfig, tokens: int, sp: int, param_bytes: int) -> float:
    """Bytes alive while one decoder layer runs backward: its saved forward tensors plus the live gradients.

    tokens: local tokens per GPU (micro batch × n). Terms count tensors of `tokens` rows; the attention core sees
    all N tokens for H/P heads after the all-to-all, which is the same number of elements.
    """
    h, kv, i, b = shape.hidden_size, shape.kv_dim, shape.intermediate_size, param_bytes
    kv_local = max(kv, shape.head_dim * sp)  # Ulysses replicates kv heads when P exceeds their count
    # Per token, from one decoder layer's forward + backward measured on CPU (benchmarks/plan_calibration.py, layer
    # probe: the peak grows by exactly 6 × intermediate and by ~10 × hidden + 2 × kv width elements per token):
    # the two RMSNorms keep 8 × hidden bytes each in any dtype (fp32 upcast or fp32 normalised x, and the output);
    # q, k, v, RoPE, S²-Attn and o_proj ~6 × hidden + 2 × kv width; the MLP six intermediate-sized tensors at its
    # peak (four saved, two gradients).
    norms = 2 * 8 * h
    attention = 6 * h + 2 * kv_local
    mlp_rows = tokens
    if cfg.memory.tiled_mlp:  # longctx.tiling.TiledMLP: ceil(n / hidden) tiles of each sequence by default
        n = tokens // cfg.train.micro_batch_size
        mlp_rows = math.ceil(tokens / (cfg.memory.tiled_mlp_shards or max(1, math.ceil(n / h))))
        attention += 3 * h  # the tiles' outputs, their concatenation and its gradient (measured the same way)
    working = tokens * (norms + attention * b) + mlp_rows * 6 * i * b
    if cfg.attention.implementation == "eager":  # the (heads/P) × N × N scores and their softmax
        n_global = tokens * sp
        working += 2 * (shape.num_attention_heads // sp) * n_global * n_global * b
    return working


def logits_bytes(cfg: RunConfig, shape: ModelShape, tokens: int, param_bytes: int) -> float:
    rows = min(cfg.memory.loss_chunk_tokens, tokens) if cfg.memory.tiled_loss else tokens
    fp32_copy = 4 if param_bytes < 4 else 0  # .float() of fp32 logits is no copy
    return rows * shape.vocab_size * (param_bytes + fp32_copy + 4 + 4)


def estimate(
    cfg: RunConfig,
    shape: ModelShape,
    cluster: Cluster,
    strategy: Strategy,
    zero: ZeroSettings,
    *,
    param_bytes: int = 2,
) -> Estimate:
    """Per-GPU and per-node host memory of one strategy (the module docstring states the accounting)."""
    world, sp = cluster.world_size, strategy.sequence_parallel
    groups = parameter_inventory(shape, cfg)
    offload = strategy.zero == "3+offload"
    stage3 = strategy.zero != "2"
    micro = cfg.train.micro_batch_size
    tokens = micro * cfg.train.seq_len // sp  # rows per GPU
    trainable = sum(g.numel * g.count for g in groups if g.trainable)
    largest_trainable = max((g.numel for g in groups if g.trainable), default=0)
    all_weights = weight_bytes(cfg, groups, param_bytes)
    gpu: dict[str, float] = {}

    if stage3:
        persistent = [g for g in groups if g.numel < zero.persistence_threshold]
        layer_groups = [g for g in groups if g.count == shape.num_hidden_layers]
        layer_bytes = weight_bytes(
            cfg, [TensorGroup(g.name, g.numel, 1, g.trainable, g.quantized) for g in layer_groups], param_bytes
        )
        largest_tensor = max(g.numel for g in groups)  # embed / lm_head are gathered whole too
        gathered = max(layer_bytes, largest_tensor * param_bytes)
        gathered += min(zero.prefetch_bucket_size * param_bytes, layer_bytes)
        gpu["weights"] = (0 if offload else all_weights / world) + weight_bytes(cfg, persistent, param_bytes) + gathered
    else:
        gpu["weights"] = all_weights
    largest_gradient = largest_trainable * param_bytes
    gpu["gradients"] = largest_gradient + (0 if offload else trainable * param_bytes / world)
    gpu["optimizer"] = 0 if offload else 12 * trainable / world  # fp32 master + two Adam moments

    checkpoints = shape.num_hidden_layers * tokens * shape.hidden_size * param_bytes
    checkpoints += 2 * tokens // micro * shape.head_dim * param_bytes  # RoPE cos and sin, shared by every layer
    layer = layer_working_set(shape, cfg, tokens, sp, param_bytes)
    if not cfg.model.activation_checkpointing:
        checkpoints = shape.num_hidden_layers * layer
    offloaded_checkpoints = 0.0
    if cfg.memory.offload_activations and cfg.model.activation_checkpointing:
        offloaded_checkpoints = checkpoints
        checkpoints = 2 * tokens * shape.hidden_size * param_bytes
    gpu["activation checkpoints"] = checkpoints
    gpu["layer working set"] = layer
    gpu["logits"] = logits_bytes(cfg, shape, tokens, param_bytes)

    gpu["ZeRO buckets"] = zero.reduce_bucket_size * param_bytes * (2 if zero.overlap_comm and not stage3 else 1)
    # Ulysses: one all-to-all in flight at a time, its send and receive buffers of q (or the output) size
    gpu["all-to-all"] = 2 * tokens * shape.hidden_size * param_bytes if sp > 1 else 0.0
    gpu["reserve"] = GPU_RESERVE_BYTES
    gpu_total = peak_of(gpu, zero_stage=2 if not stage3 else 3)

    host: dict[str, float] = {}
    ranks = cluster.gpus_per_node
    if offload:
        host["offloaded weights"] = ranks * all_weights / world
        host["offloaded gradients + optimizer"] = ranks * 16 * trainable / world  # fp32 grads + master + moments
    if offloaded_checkpoints:
        host["offloaded checkpoints"] = ranks * offloaded_checkpoints
    host["processes"] = ranks * HOST_BYTES_PER_PROCESS
    steady = sum(host.values())
    host_total = steady
    if not stage3:  # ZeRO-2 loads without zero.Init: every rank holds the whole model on the host first
        host["model load (transient)"] = ranks * all_weights
        host_total = max(steady, ranks * all_weights + ranks * HOST_BYTES_PER_PROCESS)

    data_parallel = world // sp
    batch_ok = cfg.train.global_batch_size % (micro * data_parallel) == 0 if cfg.train.global_batch_size else True
    notes = [] if batch_ok else [f"global batch {cfg.train.global_batch_size} not divisible by {micro}×{data_parallel}"]
    return Estimate(
        strategy=strategy,
        gpu=gpu,
        host=host,
        gpu_total=gpu_total,
        host_total=host_total,
        fits_gpu=gpu_total <= cluster.gpu_memory_gib * GIB,
        fits_host=host_total <= cluster.host_memory_gib * GIB,
        batch_ok=batch_ok,
        notes=notes,
    )


def peak_of(gpu: dict[str, float], zero_stage: int) -> float:
    """The peak of the parts: the logits phase or the layers' backward phase, on top of what lives throughout.

    ZeRO-2 allocates its reduce buckets at the first gradient, when the logits are gone (measured on CPU); ZeRO-3
    allocates its bucket at start-up.
    """
    phases = ("layer working set", "logits") + (("ZeRO buckets",) if zero_stage == 2 else ())
    throughout = sum(v for k, v in gpu.items() if k not in phases)
    backward = gpu["layer working set"] + (gpu["ZeRO buckets"] if zero_stage == 2 else 0)
    return throughout + max(gpu["logits"], backward)


def sequence_parallel_degrees(shape: ModelShape, cfg: RunConfig, world_size: int) -> list[int]:
    """The Ulysses degrees P that divide the world and that longctx.parallel.check_model accepts."""
    return [p for p in range(1, world_size + 1) if world_size % p == 0 and not sequence_parallel_problem(shape, cfg, p)]


def sequence_parallel_problem(shape: ModelShape, cfg: RunConfig, size: int) -> str:
    """Why P = size cannot split this model and sequence ("" if it can): the trainer's own rules
    (longctx.feasibility.sequence_parallel_problems)."""
    from longctx.feasibility import sequence_parallel_problems

    problems = sequence_parallel_problems(
        shape.num_attention_heads, shape.num_key_value_heads, cfg.train.seq_len, cfg.attention.implementation, size
    )
    return "; ".join(problems)


def check_trainable(cfg: RunConfig) -> None:
    """What `longctx train` would refuse before building anything (longctx.feasibility.check_run), on the model's
    config.json, or on the released one of a model known by name (`known_config`) when it is not on this machine."""
    from transformers import AutoConfig

    from longctx.feasibility import check_run
    from longctx.model import load_hf_config

    if cfg.model.init or (Path(cfg.model.path) / "config.json").is_file():
        hf_config = load_hf_config(cfg)
    else:
        fields = dict(known_config(cfg.model.path)[0])
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    check_run(cfg, hf_config)


def check_sequence_parallel(cfg: RunConfig, shape: ModelShape, cluster: Cluster) -> None:
    sp = cfg.parallel.sequence_parallel_size
    problem = sequence_parallel_problem(shape, cfg, sp)
    if problem:
        raise UserError(f"parallel.sequence_parallel_size={sp}: {problem}")
    if cluster.world_size % sp:
        raise UserError(
            f"parallel.sequence_parallel_size={sp} does not divide {cluster.world_size} GPUs "
            f"({cluster.nodes} nodes × {cluster.gpus_per_node}): pick a divisor of the GPU count"
        )


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and step time (the rule of benchmarks/train_step.py)
# ----------------------------------------------------------------------------------------------------------------


def training_flops_per_sequence(shape: ModelShape, cfg: RunConfig) -> dict[str, float]:
    groups = parameter_inventory(shape, cfg)
    linear = [g for g in groups if g.name not in ("embed_tokens", "norms")]
    linear_params = sum(g.numel * g.count for g in linear)
    layer_linear_params = linear_params - sum(g.numel for g in linear if g.name == "lm_head")
    trainable_linear = sum(g.numel * g.count for g in linear if g.trainable)
    n = cfg.train.seq_len
    attention_forward = 4 * shape.head_dim * score_entries(cfg, shape.num_attention_heads) * shape.num_hidden_layers
    flops = {
        "linear_forward": 2 * linear_params * n,
        "linear_input_grad": 2 * linear_params * n,
        "linear_weight_grad": 2 * trainable_linear * n,
        "recompute": (2 * layer_linear_params * n + attention_forward) if cfg.model.activation_checkpointing else 0,
        "attention_forward": attention_forward,
        "attention_backward": 2 * attention_forward,
    }
    flops["total"] = sum(flops.values())
    return flops


def score_entries(cfg: RunConfig, num_heads: int) -> float:
    """Attention scores a training step computes per sequence, summed over heads, averaged over the run's steps.

    Causal: N²/2 per dense head, N·G/2 per S²-Attn head, plus N·k with k sinks; attention.dense_heads of the heads
    dense; attention.dense_phase of the steps dense in every head."""
    n, attn = cfg.train.seq_len, cfg.attention
    dense = n * n / 2 * num_heads
    if attn.implementation != "s2attn":
        return dense
    dense_heads = min(attn.dense_heads, num_heads)
    grouped = (n * cfg.group_size / 2 + n * attn.sink_tokens) * (num_heads - dense_heads) + n * n / 2 * dense_heads
    return (1 - attn.dense_phase) * grouped + attn.dense_phase * dense


@dataclass
class Plan:
    shape: ModelShape
    cluster: Cluster
    estimates: list[Estimate]
    recommended: Estimate | None
    preset_strategy: Strategy
    fewest_nodes: int | None
    flops_per_sequence: dict[str, float]
    step_seconds: float
    tokens_per_second_per_gpu: float


def plan_run(cfg: RunConfig, cluster: Cluster, *, max_nodes: int = 128) -> Plan:
    """Every (ZeRO stage, SP degree) on the cluster, the first that fits, and the fewest nodes that fit at all.

    "First" means the fewest GPUs per sequence (the all-to-alls of sequence parallelism sit on every layer's
    critical path), then the least sharded ZeRO stage (2, then 3, then 3 with offload).
    """
    cluster.check()
    shape = model_shape(cfg)
    check_trainable(cfg)
    check_sequence_parallel(cfg, shape, cluster)
    settings, preset_zero = zero_settings_by_strategy(cfg)

    def estimates_for(c: Cluster) -> list[Estimate]:
        return [
            estimate(cfg, shape, c, Strategy(zero, sp), settings[zero])
            for sp in sequence_parallel_degrees(shape, cfg, c.world_size)
            for zero in SHIPPED_DS_CONFIGS
        ]

    estimates = estimates_for(cluster)
    recommended = next((e for e in estimates if e.fits), None)
    fewest_nodes = next(
        (k for k in range(1, max_nodes + 1) if any(e.fits for e in estimates_for(_with_nodes(cluster, k)))), None
    )
    flops = training_flops_per_sequence(shape, cfg)
    achieved = cluster.world_size * cluster.peak_tflops * 1e12 * cluster.mfu
    step_seconds = cfg.train.global_batch_size * flops["total"] / achieved
    return Plan(
        shape=shape,
        cluster=cluster,
        estimates=estimates,
        recommended=recommended,
        preset_strategy=Strategy(preset_zero, cfg.parallel.sequence_parallel_size),
        fewest_nodes=fewest_nodes,
        flops_per_sequence=flops,
        step_seconds=step_seconds,
        tokens_per_second_per_gpu=cfg.train.global_batch_size * cfg.train.seq_len / step_seconds / cluster.world_size,
    )


def _with_nodes(cluster: Cluster, nodes: int) -> Cluster:
    return Cluster(nodes, cluster.gpus_per_node, cluster.gpu_memory_gib, cluster.host_memory_gib,
                   cluster.peak_tflops, cluster.mfu)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------

GPU_COLUMNS = [
    ("weights", "weights"),
    ("gradients", "grads"),
    ("optimizer", "optim"),
    ("activation checkpoints", "ckpts"),
    ("layer working set", "layer"),
    ("logits", "logits"),
    ("ZeRO buckets", "bucket"),
    ("all-to-all", "a2a"),
]


def format_table(cfg: RunConfig, plan: Plan) -> str:
    c, s = plan.cluster, plan.shape
    lines = [
        f"model: {s.num_hidden_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads "
        f"({s.num_key_value_heads} kv), vocab {s.vocab_size} [{s.source}]; seq_len {cfg.train.seq_len}, "
        f"micro batch {cfg.train.micro_batch_size}, {_training_label(cfg)}, {cfg.attention.implementation}"
        + (f" G={cfg.group_size}" if cfg.attention.implementation == "s2attn" else "")
        + "".join(
            f" {name}={getattr(cfg.attention, name)}"
            for name in ("sink_tokens", "dense_heads", "dense_phase")
            if getattr(cfg.attention, name)
        )
        + f", {_memory_label(cfg)}",
        f"cluster: {c.nodes} node(s) × {c.gpus_per_node} GPUs = {c.world_size} GPUs of {c.gpu_memory_gib:g} GiB, "
        f"host {c.host_memory_gib:g} GiB per node",
        "",
        "per-GPU memory in GiB (peak = the parts, with the logits or the layer (+ ZeRO-2's buckets), whichever is "
        f"larger; + {GPU_RESERVE_BYTES / GIB:g} reserve):",
    ]
    header = ["strategy", *[short for _, short in GPU_COLUMNS], "peak GPU", "host/node", "fits"]
    rows = []
    for e in plan.estimates:
        marks = []
        if e.strategy == plan.preset_strategy:
            marks.append("preset")
        if plan.recommended is not None and e.strategy == plan.recommended.strategy:
            marks.append("smallest")
        verdict = "yes" if e.fits else "no (" + ", ".join(_why_not(e)) + ")"
        rows.append(
            [
                e.strategy.label,
                *[f"{e.gpu[key] / GIB:.1f}" for key, _ in GPU_COLUMNS],
                f"{e.gpu_total / GIB:.1f}",
                f"{e.host_total / GIB:.0f}",
                verdict + ("  <- " + ", ".join(marks) if marks else ""),
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(str(v).rjust(w) if 0 < i < len(r) - 1 else str(v).ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip())  # fmt: skip
    lines.append("")
    if plan.recommended is None:
        lines.append("smallest configuration that fits: none on this cluster (the fits column says why)")
    else:
        lines.append(f"smallest configuration that fits: {plan.recommended.strategy.label} "
                     f"(peak {plan.recommended.gpu_total / GIB:.1f} GiB per GPU)")  # fmt: skip
    lines.append(
        "fewest nodes of this kind that fit: "
        + (str(plan.fewest_nodes) if plan.fewest_nodes is not None else "more than 128")
    )
    total = plan.flops_per_sequence["total"]
    lines.append(
        f"step time: {plan.step_seconds:.1f} s per optimizer step ({cfg.train.global_batch_size} sequences × "
        f"{total:.3g} FLOP) at MFU {c.mfu:g} of {c.peak_tflops:g} TFLOP/s per GPU; "
        f"{plan.tokens_per_second_per_gpu:.0f} tokens/s per GPU; {cfg.train.max_steps} steps ≈ "
        f"{plan.step_seconds * cfg.train.max_steps / 3600:.1f} h"
    )
    lines += ["", *LEGEND]
    return "\n".join(lines)


LEGEND = [
    "legend: weights bf16 (4-bit base: 0.5 B + block constants); grads b per trainable param (1/W) + the largest",
    "  trainable tensor's full gradient; optim 12 B per trainable param (fp32 master + 2 Adam moments, 1/W);",
    "  ckpts = layers × n × hidden × b (n = seq_len/SP); layer = one layer's recompute + backward, flash/SDPA",
    "  attention (no N×N scores); logits = n × vocab × (b + 4 + 4 + 4) or a loss chunk when tiled; bucket = ZeRO",
    "  reduce buckets (from the ds_config); a2a = Ulysses all-to-all buffers; ZeRO shards over all GPUs; ZeRO-3 adds",
    f"  the gathered layer + prefetch; host = offloaded state + {HOST_BYTES_PER_PROCESS / GIB:g} GiB per process",
    "  (+ a whole model per GPU while ZeRO-2 loads). Calibration: benchmarks/results/plan_calibration.json.",
]


def _why_not(e: Estimate) -> list[str]:
    reasons = []
    if not e.fits_gpu:
        reasons.append("GPU")
    if not e.fits_host:
        reasons.append("host")
    if not e.batch_ok:
        reasons.append("batch")
    return reasons


def _training_label(cfg: RunConfig) -> str:
    what = f"LoRA r={cfg.lora.r} + {'/'.join(cfg.lora.trainable) or 'nothing else'}" if cfg.lora.enabled else "full FT"
    return what + (f", {cfg.quant.type} base" if cfg.quant.enabled else "")


def _memory_label(cfg: RunConfig) -> str:
    m = cfg.memory
    on = [name for name, flag in (("tiled MLP", m.tiled_mlp), ("tiled loss", m.tiled_loss),
                                  ("offloaded checkpoints", m.offload_activations)) if flag]  # fmt: skip
    checkpointing = "activation checkpointing" if cfg.model.activation_checkpointing else "no checkpointing"
    return ", ".join([checkpointing, *on])


def plan_as_dict(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    def gib(parts: dict[str, float]) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in parts.items()}

    return {
        "model": asdict(plan.shape),
        "cluster": asdict(plan.cluster) | {"world_size": plan.cluster.world_size},
        "seq_len": cfg.train.seq_len,
        "estimates": [
            {
                "zero": e.strategy.zero,
                "sequence_parallel": e.strategy.sequence_parallel,
                "gpu_gib": gib(e.gpu),
                "gpu_peak_gib": round(e.gpu_total / GIB, 3),
                "host_gib_per_node": gib(e.host),
                "host_peak_gib_per_node": round(e.host_total / GIB, 3),
                "fits": e.fits,
                "fits_gpu": e.fits_gpu,
                "fits_host": e.fits_host,
                "batch_ok": e.batch_ok,
            }
            for e in plan.estimates
        ],
        "smallest_fitting": None
        if plan.recommended is None
        else {"zero": plan.recommended.strategy.zero, "sequence_parallel": plan.recommended.strategy.sequence_parallel},
        "preset": {"zero": plan.preset_strategy.zero, "sequence_parallel": plan.preset_strategy.sequence_parallel},
        "fewest_nodes": plan.fewest_nodes,
        "flops_per_sequence": plan.flops_per_sequence,
        "step_seconds": plan.step_seconds,
        "tokens_per_second_per_gpu": plan.tokens_per_second_per_gpu,
        "assumptions": " ".join(line.strip() for line in LEGEND).removeprefix("legend: "),
    }


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def resolve_preset(name: str) -> Path:
    """A YAML path, or the name of a shipped preset (launch/presets/<name>.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = PRESETS_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    import difflib

    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(Path(name).stem, names, n=3, cutoff=0.3) or names[:3]
    raise UserError(
        f"{name} is neither a YAML file nor a shipped preset: give a YAML path or a preset name such as "
        f"{', '.join(close)} (all in launch/presets/)"
    )


def run_plan(args) -> int:
    cfg = load_config(RunConfig, resolve_preset(args.config), args.overrides)
    cluster = Cluster(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory_gb,
        host_memory_gib=args.host_memory_gb,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
    )
    plan = plan_run(cfg, cluster)
    print(json.dumps(plan_as_dict(cfg, plan), indent=2) if args.json else format_table(cfg, plan))
    return 0
