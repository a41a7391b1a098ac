"""One typed config tree: the single source of truth for a prep run and for a training run.

A config is built in one way: dataclass defaults, then a YAML preset, then `section.key=value` overrides
(in that order). Unknown keys, values of the wrong type and bad combinations are all reported together as
one `ConfigError` whose message names each problem and its fix. The resolved tree is saved next to every
output (shards, checkpoints) so that a run can be reproduced from what it wrote.

Two roots share the machinery: `PrepConfig` (what `longctx prep pack` did) and `RunConfig` (train / eval).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from longctx.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used: unknown key, wrong type, or a bad combination of values."""


# ----------------------------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PrepConfig:
    """Options of `longctx prep pack`; saved in the shard manifest so a prep run can be reproduced."""

    inputs: list[str] = field(default_factory=list)
    """Corpus paths: text directories, .jsonl/.jsonl.gz/.jsonl.zst, .parquet, or a `save_to_disk` dataset dir."""
    weights: list[float] = field(default_factory=list)
    """Mixing weight per input (empty: 1.0 each). A weight of 2.0 packs that input's documents twice."""
    tokenizer: str = ""
    """A sentencepiece .model file, or a Hugging Face tokenizer directory."""
    seq_len: int = 8192
    """Tokens per packed sequence."""
    out: str = ""
    """Output directory for shards + manifest."""
    glob: str = "**/*"
    """Which files of a text directory to read (relative glob, recursive with **)."""
    text_field: str = "text"
    """Field (JSONL) or column (parquet, HF dataset) holding the document text."""
    add_bos: bool = True
    """Put a document-start token (doc_start) before each document."""
    add_eos: bool = True
    """Put a document-end token (doc_end) after each document."""
    doc_start: str = "auto"
    """Document-start token. auto: the tokenizer's BOS, unless it is a chat-turn marker (an instruct model's
    <|im_start|>), then none; none; or a token of the vocabulary."""
    doc_end: str = "auto"
    """Document-end token. auto: the tokenizer's EOS, unless it is a chat-turn marker (<|im_end|>, <|eot_id|>), then
    the vocabulary's end-of-text token (<|endoftext|>, <|end_of_text|>, ...); none; or a token of the vocabulary."""
    min_doc_tokens: int = 0
    """Drop documents shorter than this many tokens (long-context corpora keep only long documents)."""
    max_doc_tokens: int = 0
    """Drop documents longer than this many tokens (0: no limit)."""
    dedup: bool = False
    """Drop exact duplicate documents (by content hash), keeping the first."""
    val_fraction: float = 0.0
    """Fraction of documents (not sequences) put in the validation split."""
    seed: int = 0
    """Seed of the document shuffle and the train/validation assignment."""
    shuffle: bool = True
    """Shuffle documents (deterministically, by seed) before packing."""
    tail: Literal["drop", "pad"] = "drop"
    """What to do with the last, incomplete sequence of each split: drop it or pad it (padding is masked)."""
    sequences_per_shard: int = 1024
    """Sequences per shard file."""
    num_workers: int = 0
    """Tokenizer processes (0: one per core)."""
    strict: bool = False
    """Stop on a file that is not UTF-8 (default: skip it and count it)."""
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token dtype on disk. auto: uint16 when the vocabulary fits (<= 65535 ids), else uint32."""
    window_docs: int = 4096
    """Documents shuffled together (at most 16M characters); each window is also a resume point."""

    def validate(self, errors: list[str]) -> None:
        if self.seq_len < 2:
            errors.append(f"prep.seq_len={self.seq_len} is too small: use at least 2 tokens per sequence")
        elif self.seq_len > 16_777_216:
            errors.append(f"prep.seq_len={self.seq_len} is absurdly large: use at most 16777216 (16M) tokens")
        if self.weights and len(self.weights) != len(self.inputs):
            errors.append(
                f"prep.weights has {len(self.weights)} values for {len(self.inputs)} inputs: give one weight per input"
            )
        if any(w <= 0 for w in self.weights):
            errors.append("prep.weights must all be > 0: drop an input instead of giving it weight 0")
        if not 0.0 <= self.val_fraction < 1.0:
            errors.append(f"prep.val_fraction={self.val_fraction} is outside [0, 1): e.g. 0.01 for 1% of documents")
        if self.min_doc_tokens < 0 or self.max_doc_tokens < 0:
            errors.append("prep.min_doc_tokens and prep.max_doc_tokens must be >= 0 (0 for max: no limit)")
        if self.max_doc_tokens and self.min_doc_tokens > self.max_doc_tokens:
            errors.append(
                f"prep.min_doc_tokens={self.min_doc_tokens} > prep.max_doc_tokens={self.max_doc_tokens}: "
                "raise the maximum or lower the minimum"
            )
        if self.sequences_per_shard < 1:
            errors.append("prep.sequences_per_shard must be >= 1")
        if self.num_workers < 0:
            errors.append("prep.num_workers must be >= 0 (0: one per core)")
        if self.window_docs < 1:
            errors.append(f"prep.window_docs={self.window_docs} must be >= 1, e.g. 4096")


@dataclass
class SFTConfig:
    """Options of `longctx prep sft` (instruction data → masked, packed shards); saved with its shards."""

    inputs: list[str] = field(default_factory=list)
    """Instruction data: .jsonl, .json (a list of records), .parquet, or a `save_to_disk` dataset directory. Each
    record is Alpaca (instruction, input, output), ShareGPT (conversations of from/value) or OpenAI (messages of
    role/content)."""
    tokenizer: str = ""
    """The model's Hugging Face directory (tokenizer.json; its chat template, if any)."""
    template: str = "model"
    """Chat template. model: the tokenizer's own; llama-2 (LongLoRA's [INST] format), alpaca, vicuna (LongQLoRA's):
    built in, for base models without one; or a .jinja file."""
    seq_len: int = 8192
    """Tokens per packed sequence."""
    out: str = ""
    """Output directory for shards + manifest."""
    loss_on: Literal["all", "last"] = "all"
    """Which assistant turns are trained on: all of them, or the last one only; everything else is masked."""
    packing: Literal["pack", "pad"] = "pack"
    """pack: several conversations per sequence, each its own document (train with attention.isolate_documents);
    pad: one conversation per sequence, padded."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """A conversation longer than seq_len: truncate its context (the middle of what precedes the last answer; the
    answer is kept whole) or drop it. Both are counted."""
    val_fraction: float = 0.0
    """Fraction of conversations put in the validation split."""
    seed: int = 0
    """Seed of the shuffle and the train/validation assignment."""
    shuffle: bool = True
    """Shuffle the sequences (deterministically, by seed) within each window."""
    sequences_per_shard: int = 1024
    """Sequences per shard file."""
    window_records: int = 1024
    """Records packed together (conversations are packed best-fit within a window); each window is a resume point."""
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token dtype on disk. auto: uint16 when the vocabulary fits (<= 65535 ids), else uint32."""

    def validate(self, errors: list[str]) -> None:
        if self.seq_len < 2:
            errors.append(f"sft.seq_len={self.seq_len} is too small: use at least 2 tokens per sequence")
        if not 0.0 <= self.val_fraction < 1.0:
            errors.append(f"sft.val_fraction={self.val_fraction} is outside [0, 1): e.g. 0.01 for 1% of conversations")
        if self.sequences_per_shard < 1:
            errors.append("sft.sequences_per_shard must be >= 1")
        if self.window_records < 1:
            errors.append(f"sft.window_records={self.window_records} must be >= 1, e.g. 1024")


# ----------------------------------------------------------------------------------------------------------------
# Training / evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The base model: a local Hugging Face directory, or an architecture built with random weights."""

    path: str = ""
    """Local Hugging Face model directory (config.json + safetensors). Empty: build from `init`."""
    init: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields of a model built with random weights, e.g. {model_type: llama, hidden_size: 256}."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter / compute dtype. auto: bfloat16 on a GPU that has it, float16 on one that does not (V100: DeepSpeed's
    fp16 with dynamic loss scaling), float32 on CPU."""
    trust_remote_code: bool = False
    """Allow a model directory to run its own Python code (off unless you trust the directory)."""
    activation_checkpointing: bool = True
    """Recompute each block's activations in the backward pass instead of storing them."""

    def validate(self, errors: list[str]) -> None:
        if not self.path and not self.init:
            errors.append("model: neither model.path nor model.init is set: give a model directory or an init config")
        if self.path and self.init:
            errors.append("model.path and model.init are both set: use a directory OR a random-init config, not both")
        if self.init and "model_type" not in self.init:
            errors.append("model.init has no model_type: add e.g. model.init.model_type=llama")


@dataclass
class RopeConfig:
    """RoPE position scaling (position interpolation and its variants), resolved against the model's own config.json
    by `longctx.model.resolve_rope`: the model's trained context and RoPE scaling win over numbers in a preset."""

    type: Literal["linear", "dynamic", "yarn", "llama3", "none"] = "linear"
    """How train.seq_len is reached. On a model without RoPE scaling: linear (position interpolation, LongLoRA),
    dynamic (dynamic NTK: RoPE unchanged up to train.seq_len, NTK-scaled beyond), yarn (YaRN). On a model that has RoPE
    scaling already: its own type, factor multiplied (linear: exactly interpolation on top of it; yarn, llama3: that
    scheme at the longer context). none: RoPE left as the model has it."""
    original_context: int = 0
    """The context the model was trained to. 0: from its config.json (max_position_embeddings, or the reach of its
    RoPE scaling when larger); any other value must agree with that unless rope.override_model is set."""
    factor: float = 0.0
    """How far the context is extended. 0: train.seq_len / original_context; any other value must equal that unless
    rope.override_model is set."""
    override_model: bool = False
    """Use rope.original_context / rope.factor where they contradict the model's config.json (a config.json that
    understates the model's context, e.g. max_position_embeddings 4096 with linear scaling to 16384)."""

    def validate(self, errors: list[str]) -> None:
        if self.original_context < 0:
            errors.append(f"rope.original_context={self.original_context} is negative: use 0 (the model's context)")
        if self.factor < 0:
            errors.append(f"rope.factor={self.factor} is negative: use 0 (automatic) or a factor >= 1")
        if 0 < self.factor < 1:
            errors.append(f"rope.factor={self.factor} < 1 would shrink the context: use a factor >= 1")
        if self.override_model and not (self.original_context or self.factor):
            errors.append(
                "rope.override_model=true overrides nothing: set rope.original_context or rope.factor, or drop it"
            )


@dataclass
class AttentionConfig:
    """Attention while training; evaluation and inference always use dense causal attention."""

    implementation: Literal["s2attn", "sdpa", "eager", "flash"] = "s2attn"
    """s2attn: shifted sparse attention (LongLoRA); sdpa / eager / flash: dense attention."""
    group_size: int = 0
    """S²-Attn group size G in tokens (even). 0: group_size_ratio × train.seq_len."""
    group_size_ratio: float = 0.25
    """G as a fraction of the sequence length when group_size is 0 (LongLoRA: 1/4)."""
    backend: Literal["auto", "sdpa", "flash"] = "auto"
    """Kernel behind S²-Attn. auto: flash-attn varlen when installed on GPU, else PyTorch SDPA."""
    isolate_documents: bool = False
    """Tokens attend only within their own document of a packed sequence (position ids restart per document)."""
    sink_tokens: int = 0
    """S²-Attn variant (docs/s2attn.md, "Variants that reach further"): every token also attends to the first k
    tokens of its document (sinks, as StreamingLLM / SinkLoRA). 0: plain S²-Attn. At most G/2."""
    dense_heads: int = 0
    """S²-Attn variant: the last this many heads of every layer attend densely (no groups) in training. 0: none."""
    dense_phase: float = 0.0
    """S²-Attn variant: the last this fraction of train.max_steps trains with dense attention. 0: none."""

    def validate(self, errors: list[str]) -> None:
        if self.group_size < 0 or self.group_size % 2:
            errors.append(f"attention.group_size={self.group_size} must be even and >= 0 (0: use group_size_ratio)")
        if not 0 < self.group_size_ratio <= 1:
            errors.append(f"attention.group_size_ratio={self.group_size_ratio} must be in (0, 1], e.g. 0.25")
        if self.sink_tokens < 0 or self.dense_heads < 0:
            errors.append(
                f"attention.sink_tokens={self.sink_tokens} and attention.dense_heads={self.dense_heads} must be >= 0"
            )
        if not 0 <= self.dense_phase <= 1:
            errors.append(f"attention.dense_phase={self.dense_phase} must be in [0, 1], e.g. 0.1 (the last 10%)")
        if self.implementation != "s2attn" and (self.sink_tokens or self.dense_heads or self.dense_phase):
            errors.append(
                f"attention.sink_tokens, dense_heads and dense_phase change S²-Attn, but attention.implementation="
                f"{self.implementation}: set them to 0 or use attention.implementation=s2attn"
            )

    @property
    def variant(self) -> bool:
        """Whether an S²-Attn variant is on (sinks, dense heads or a dense phase)."""
        return bool(self.sink_tokens or self.dense_heads or self.dense_phase)


@dataclass
class LoraConfig:
    """What trains: LoRA adapters plus fully trainable extra modules, or everything (enabled=false)."""

    enabled: bool = True
    """LoRA on the target modules; false: full fine-tuning of every weight."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get LoRA adapters."""
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])
    """Modules trained in full next to LoRA: embed (input embeddings), norm (every norm), lm_head."""

    def validate(self, errors: list[str]) -> None:
        if self.r < 1:
            errors.append(f"lora.r={self.r} must be >= 1")
        if not 0 <= self.dropout < 1:
            errors.append(f"lora.dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.trainable) - {"embed", "norm", "lm_head"})
        if unknown:
            errors.append(f"lora.trainable has unknown parts {unknown}: choose from embed, norm, lm_head")


@dataclass
class DataConfig:
    """Packed shards written by `longctx prep pack`."""

    train: str = ""
    """Directory of the training shards."""
    val: str = ""
    """Directory of the held-out shards (evaluation)."""


@dataclass
class TrainConfig:
    """The optimisation: batch, schedule, logging, checkpoints."""

    seq_len: int = 8192
    """Tokens per training sequence (the target context)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    gradient_accumulation_steps: int = 0
    """Micro batches per optimizer step (0: derived from global_batch_size)."""
    global_batch_size: int = 64
    """Sequences per optimizer step over all data-parallel ranks (0: derived from the other two)."""
    max_steps: int = 1000
    """Optimizer steps."""
    lr: float = 2e-5
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (LongLoRA) or cosine decay to min_lr_ratio × lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (LongLoRA: 0.9, 0.95)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0: off)."""
    seed: int = 42
    """Seed of initialisation, dropout and the data order."""
    log_every: int = 1
    """Steps between log lines."""
    save_every: int = 100
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    output_dir: str = "runs/train"
    """Where checkpoints, logs and the resolved config go."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; none: start fresh; or a checkpoint path."""
    trust_checkpoint_pickles: bool = False
    """Resume from a checkpoint whose DeepSpeed files hold Python objects beyond the few types DeepSpeed stores.
    Unpickling them can run arbitrary code: only for a checkpoint you wrote yourself. Off: such a file is refused."""

    def validate(self, errors: list[str]) -> None:
        if self.seq_len < 2:
            errors.append(f"train.seq_len={self.seq_len} is too small: use at least 2")
        if self.micro_batch_size < 1:
            errors.append(f"train.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.max_steps < 1:
            errors.append(f"train.max_steps={self.max_steps} must be >= 1")
        if self.lr <= 0:
            errors.append(f"train.lr={self.lr} must be > 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            errors.append(f"train.adam_betas={self.adam_betas} must be two values in [0, 1), e.g. [0.9, 0.95]")
        if self.keep_last < 1:
            errors.append(f"train.keep_last={self.keep_last} must be >= 1")
        if self.gradient_accumulation_steps < 0 or self.global_batch_size < 0:
            errors.append("train.gradient_accumulation_steps and train.global_batch_size must be >= 0 (0: derived)")
        if self.warmup_steps < 0 or self.save_every < 0:
            errors.append("train.warmup_steps and train.save_every must be >= 0 (save_every=0: only at the end)")
        if self.log_every < 1:
            errors.append(f"train.log_every={self.log_every} must be >= 1")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine. Values the run owns ("auto" in the JSON) are filled from this config tree."""

    config: str = "ds_configs/stage3.json"
    """DeepSpeed JSON (ds_configs/stage2.json, stage3.json, stage3_offload.json, or your own). A relative path missing
    from the working directory is looked up in the longctx checkout (the shipped ds_configs/)."""


@dataclass
class ParallelConfig:
    """How ranks are arranged beyond plain data parallelism."""

    sequence_parallel_size: int = 1
    """Ranks that share one sequence (DeepSpeed Ulysses); world size = data-parallel × this."""
    sequence_parallel_mode: Literal["ulysses", "halo"] = "ulysses"
    """ulysses: all-to-all over heads (any attention, heads must divide). halo: S²-Attn's own split, each rank a
    chunk of a multiple of G tokens exchanging G/2 tokens per layer with its neighbour (no document isolation)."""

    def validate(self, errors: list[str]) -> None:
        if self.sequence_parallel_size < 1:
            errors.append(f"parallel.sequence_parallel_size={self.sequence_parallel_size} must be >= 1")


@dataclass
class MemoryConfig:
    """Activation-memory savers for very long sequences (each off by default; numerics are unchanged)."""

    tiled_mlp: bool = False
    """Run each MLP over the sequence in tiles, recomputing them in backward, so its N x intermediate activations
    never exist at once (DeepSpeed ALST's TiledMLP)."""
    tiled_mlp_shards: int = 0
    """Tiles per MLP call. 0: ceil(local sequence / hidden size)."""
    tiled_loss: bool = False
    """Compute logits and cross-entropy in chunks of `loss_chunk_tokens`, so the full-sequence fp32 logits
    never exist at once."""
    loss_chunk_tokens: int = 8192
    """Tokens per chunk of the tiled loss."""
    offload_activations: bool = False
    """Keep activation checkpoints in host memory instead of on the GPU (needs model.activation_checkpointing)."""

    def validate(self, errors: list[str]) -> None:
        if self.tiled_mlp_shards < 0:
            errors.append(f"memory.tiled_mlp_shards={self.tiled_mlp_shards} must be >= 0 (0: automatic)")
        if self.loss_chunk_tokens < 1:
            errors.append(f"memory.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 1")


@dataclass
class QuantConfig:
    """A 4-bit frozen base (QLoRA / LongQLoRA) via bitsandbytes; LoRA, embeddings and norms stay full precision."""

    type: Literal["none", "nf4", "fp4"] = "none"
    """4-bit data type of the frozen base linears. none: no quantization."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the 4-bit weights are dequantized to for matmuls. auto: the model's dtype."""
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    """Container dtype of the packed 4-bit weights. auto: uint8 under ZeRO-2, the model dtype under ZeRO-3 (the
    layout ZeRO-3/FSDP QLoRA setups use; uint8 was also seen to partition correctly). A float container other than
    the model dtype is refused in bf16/fp16 runs: DeepSpeed would cast it and corrupt the codes."""

    @property
    def enabled(self) -> bool:
        return self.type != "none"


@dataclass
class RunConfig:
    """A training (and evaluation) run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def validate(self, errors: list[str]) -> None:
        attn, train = self.attention, self.train
        if attn.implementation == "s2attn" and attn.group_size and attn.group_size > train.seq_len:
            errors.append(
                f"attention.group_size={attn.group_size} exceeds train.seq_len={train.seq_len}: "
                "pick a group size <= seq_len (LongLoRA: seq_len / 4)"
            )
        elif attn.implementation == "s2attn" and train.seq_len % self.group_size:
            errors.append(
                f"train.seq_len={train.seq_len} is not a multiple of the S²-Attn group size {self.group_size}: "
                "pick attention.group_size (or group_size_ratio) so that it divides the sequence length"
            )
        if attn.implementation == "s2attn" and attn.sink_tokens > self.group_size // 2:
            errors.append(
                f"attention.sink_tokens={attn.sink_tokens} exceeds half the S²-Attn group size "
                f"({self.group_size // 2}): a few tokens are enough (StreamingLLM: 4), or use a larger group"
            )
        if self.quant.enabled and not self.lora.enabled:
            errors.append(
                f"quant.type={self.quant.type} freezes the base in 4 bits, so it cannot be fine-tuned in full: "
                "set lora.enabled=true (QLoRA), or quant.type=none for full fine-tuning"
            )
        sp = self.parallel.sequence_parallel_size
        if sp > 1 and train.seq_len % sp:
            errors.append(
                f"train.seq_len={train.seq_len} is not a multiple of parallel.sequence_parallel_size={sp}: "
                "pick a sequence length that divides evenly"
            )
        if sp > 1 and self.parallel.sequence_parallel_mode == "halo":
            if attn.implementation != "s2attn" or attn.isolate_documents or attn.variant:
                errors.append(
                    "parallel.sequence_parallel_mode=halo computes plain S²-Attn without document isolation only: set "
                    "attention.implementation=s2attn, attention.isolate_documents=false and no sink_tokens, "
                    "dense_heads or dense_phase, or use the ulysses mode"
                )
            elif (self.train.seq_len // sp) % self.group_size:
                errors.append(
                    f"parallel.sequence_parallel_mode=halo needs train.seq_len / {sp} = {self.train.seq_len // sp} "
                    f"tokens per rank to be a multiple of the S²-Attn group size {self.group_size}: use fewer "
                    "sequence-parallel ranks, a smaller attention.group_size, or the ulysses mode"
                )
        if sp > 1 and attn.implementation not in ("s2attn", "sdpa"):
            errors.append(
                f"attention.implementation={attn.implementation} has no sequence-parallel version "
                f"(parallel.sequence_parallel_size={sp}): use s2attn or sdpa"
            )
        if self.memory.offload_activations and not self.model.activation_checkpointing:
            errors.append(
                "memory.offload_activations=true offloads activation checkpoints, but model.activation_checkpointing "
                "is false: set model.activation_checkpointing=true"
            )

    def validate_files(self, errors: list[str]) -> None:
        """Check the DeepSpeed JSON that deepspeed.config names against this config (longctx.ds_config.validate).

        `load_config` runs this for a run being configured; `from_dict` does not, because a checkpoint's saved config
        must load (for export, eval, resume) where its JSON is gone: the checkpoint keeps the resolved JSON itself.
        """
        from longctx import ds_config

        ds_config.validate(self, errors)

    @property
    def group_size(self) -> int:
        """The S²-Attn group size in tokens for train.seq_len (even, at least 2)."""
        if self.attention.group_size:
            return self.attention.group_size
        g = int(self.train.seq_len * self.attention.group_size_ratio)
        return max(2, g - g % 2)


# ----------------------------------------------------------------------------------------------------------------
# Machinery: build, override, validate, save
# ----------------------------------------------------------------------------------------------------------------

C = TypeVar("C")


def load_config(cls: type[C], preset: str | os.PathLike | None = None, overrides: list[str] | None = None) -> C:
    """Defaults, then the YAML preset, then `section.key=value` overrides; validated, the files the config names
    included (a root's `validate_files`, e.g. the DeepSpeed JSON); errors reported together."""
    errors: list[str] = []
    tree: dict[str, Any] = {}
    if preset is not None:
        tree = _read_yaml(Path(preset))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r} is not key=value: write e.g. train.lr=1e-5")
            continue
        _set_dotted(tree, key.strip().split("."), _parse_scalar(raw))
    config = _build(cls, tree, "", errors)
    if not errors:
        validate(config, errors)
        if hasattr(config, "validate_files"):
            config.validate_files(errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def from_dict(cls: type[C], tree: dict[str, Any]) -> C:
    """Build and validate a config from a plain dict (e.g. a saved resolved config)."""
    errors: list[str] = []
    config = _build(cls, tree, "", errors)
    if not errors:
        validate(config, errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def validate(config: Any, errors: list[str]) -> None:
    """Run every section's `validate`, children first, then the root's cross-section checks."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, errors)
    if hasattr(config, "validate"):
        config.validate(errors)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from longctx.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) of every field: what `--help-config` prints."""
    hints, docs, rows = typing.get_type_hints(cls), _field_docs(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            rows += [(f"{f.name}.{key}", default, doc) for key, default, doc in describe(hint)]
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f.name, repr(default), docs.get(f.name, "")))
    return rows


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give the path of a YAML preset (see launch/presets/)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}: fix its syntax") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (e.g. 'train: {{lr: 2e-5}}')")
    return tree


def _parse_scalar(raw: str) -> Any:
    """A CLI value: parsed as YAML so that 1e-5, true, [a, b] and {k: v} work; a bare word stays a string."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.get(k)
        if not isinstance(node, dict):
            node = tree[k] = {}
        tree = node
    tree[keys[-1]] = value


def _build(cls: type, tree: Any, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(tree, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
        tree = {}
    for key in tree:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            hint = (
                f": did you mean {prefix}{near[0]}?" if near else f": {prefix.rstrip('.')} has {shown} (--help-config)"
            )
            errors.append(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, tree[name], f"{prefix}{name}.", errors)
        else:
            kwargs[name] = _coerce(tree[name], hint, f"{prefix}{name}", errors)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, errors: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}={value!r} is not allowed: choose one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, errors)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            errors.append(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
            return []
        return [_coerce(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}={value!r} must be a mapping, e.g. {key}={{a: 1}}")
            return {}
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}={value!r} must be true or false")
        return False
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{key}={value!r} must be a whole number")
        return 0
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{key}={value!r} must be a number, e.g. 2e-5")
        return 0.0
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}={value!r} must be a string")
        return ""
    return value


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) from the class source."""
    import ast
    import inspect

    try:
        node = ast.parse(inspect.getsource(cls)).body[0]
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = getattr(node, "body", [])
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[stmt.target.id] = str(nxt.value.value).strip()
    return docs
