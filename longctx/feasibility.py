"""Whether a run can be built, from its config and the model's config.json alone (no weights, no process group).

`longctx train` runs `check_run` before any process builds anything, and `longctx plan` weighs every configuration
with the same rules (`sequence_parallel_problems`), so plan never approves what train refuses. The checks that need
only the config itself (e.g. S²-Attn's group size against train.seq_len) live in `RunConfig.validate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from longctx.config import ConfigError

if TYPE_CHECKING:
    from longctx.config import RunConfig

# attn_implementation names that have a sequence-parallel (Ulysses) version.
SEQUENCE_PARALLEL_ATTENTION = ("s2attn", "sdpa")


def sequence_parallel_problems(
    num_heads: int, num_kv_heads: int, seq_len: int, implementation: str, size: int
) -> list[str]:
    """Why Ulysses cannot split this model and sequence over `size` ranks (empty: it can).

    Each rank gets H/P whole heads; kv heads are split, or replicated when P is a multiple of them. S²-Attn takes any
    slice of heads (a rank's heads are shifted by their global index), so it adds no rule of its own.
    """
    if size == 1:
        return []
    problems = []
    if implementation not in SEQUENCE_PARALLEL_ATTENTION:
        problems.append(
            f"attention.implementation={implementation} has no sequence-parallel version: use s2attn or sdpa"
        )
    if num_heads % size:
        problems.append(
            f"the model's {num_heads} attention heads do not divide over parallel.sequence_parallel_size={size}: "
            "pick a degree that divides the head count"
        )
    if num_kv_heads % size and size % num_kv_heads:
        problems.append(
            f"the model's {num_kv_heads} key/value heads and parallel.sequence_parallel_size={size} do not divide "
            "one another (Ulysses splits or replicates kv heads): pick a degree that divides the kv heads or a "
            "multiple of them"
        )
    if seq_len % size:
        problems.append(
            f"train.seq_len={seq_len} is not a multiple of parallel.sequence_parallel_size={size}: "
            "pick a sequence length that divides evenly"
        )
    return problems


def run_problems(cfg: RunConfig, hf_config) -> list[str]:
    """Every reason cfg cannot train this model (`hf_config`: its config.json, before RoPE scaling)."""
    from longctx.model import check_rope

    text_config = hf_config.get_text_config()
    where = f"model.path={cfg.model.path}" if cfg.model.path else "model.init"
    if not _uses_rope(text_config):
        return [
            f"{where} is a {text_config.model_type} model without rotary position embeddings, which longctx cannot "
            "extend (position interpolation and S²-Attn are for RoPE models): use a LLaMA-family model"
        ]
    problems = check_rope(cfg, hf_config)
    if cfg.attention.implementation == "s2attn" and not _has_attention_interface(hf_config):
        problems.append(
            f"{where} is a {text_config.model_type} model whose attention does not go through transformers' "
            "AttentionInterface, so S²-Attn cannot be selected for it: use attention.implementation=sdpa, or a "
            "LLaMA-family model"
        )
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    if cfg.attention.implementation == "s2attn" and cfg.attention.dense_heads > heads:
        problems.append(
            f"attention.dense_heads={cfg.attention.dense_heads} exceeds the {heads} attention heads of {where}: "
            f"pick at most {heads}"
        )
    if cfg.parallel.sequence_parallel_size > 1 and cfg.parallel.sequence_parallel_mode == "ulysses":
        problems += sequence_parallel_problems(
            heads, kv_heads, cfg.train.seq_len, cfg.attention.implementation, cfg.parallel.sequence_parallel_size
        )
    problems += _sliding_window_problems(cfg, text_config, where)
    problems += _tokenizer_problems(cfg, text_config)
    return problems


def check_run(cfg: RunConfig, hf_config) -> None:
    """One ConfigError naming every problem `run_problems` finds."""
    problems = run_problems(cfg, hf_config)
    if problems:
        raise ConfigError("; ".join(problems))


def _has_attention_interface(hf_config) -> bool:
    """Whether transformers' class for this config computes attention through the AttentionInterface registry."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(hf_config)]
    except KeyError:  # a remote-code model: its class is not known before it is loaded
        return True
    return bool(getattr(model_class, "_supports_attention_backend", False))


def _uses_rope(text_config) -> bool:
    return bool(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_theta", None))


def sliding_window(text_config) -> int | None:
    """The model's attention window in tokens (query i sees key j iff i - j < window), or None when it has none.

    Mistral slides every layer; Qwen2/Qwen3 keep `sliding_window` in config.json but slide only the layers their
    `layer_types` name (none unless use_sliding_window, in which case transformers already set it to None).
    """
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _sliding_window_problems(cfg: RunConfig, text_config, where: str) -> list[str]:
    """S²-Attn honours a sliding window by construction when G <= window: a token never sees one more than G - 1
    back (docs/s2attn.md, "Sliding-window models"). A longer group would attend where the model never does. Dense
    training honours it through transformers, except split by Ulysses, whose dense core sees no window."""
    window = sliding_window(text_config)
    if window is None or window >= cfg.train.seq_len:
        return []
    implementation, sp = cfg.attention.implementation, cfg.parallel.sequence_parallel_size
    if implementation == "s2attn" and cfg.attention.variant:
        return [
            f"attention.sink_tokens, dense_heads and dense_phase attend beyond the sliding window of {where} "
            f"({window} tokens), which S²-Attn's variants do not apply: set them to 0 (plain S²-Attn with "
            f"attention.group_size at most {window} honours the window)"
        ]
    if implementation == "s2attn" and cfg.group_size > window:
        return [
            f"the S²-Attn group size {cfg.group_size} is longer than the sliding window of {where} ({window} tokens), "
            f"so groups would attend beyond the window: set attention.group_size to at most {window} (a divisor of "
            f"train.seq_len={cfg.train.seq_len})"
        ]
    if implementation != "s2attn" and sp > 1:
        return [
            f"attention.implementation={implementation} split over parallel.sequence_parallel_size={sp} attends over "
            f"the whole sequence, beyond the sliding window of {where} ({window} tokens): use "
            f"attention.implementation=s2attn with attention.group_size at most {window}, or no sequence parallelism"
        ]
    return []


def _tokenizer_problems(cfg: RunConfig, text_config) -> list[str]:
    """A tokenizer saved with the model must fit its embedding table (a padded table larger than it is fine)."""
    from data_prep.tokenizer import model_tokenizer

    tokenizer = model_tokenizer(cfg.model.path) if cfg.model.path and Path(cfg.model.path).is_dir() else None
    if tokenizer is None or tokenizer.vocab_size <= text_config.vocab_size:
        return []
    return [
        f"the tokenizer in model.path={cfg.model.path} has {tokenizer.vocab_size} tokens but the model's embedding "
        f"table only {text_config.vocab_size}: the directory mixes two models; use the tokenizer the model was "
        "trained with"
    ]
