"""What `longctx train` refuses before building anything, from the config and the model's config.json alone; and
plan weighs configurations with the same rules."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from longctx.config import ConfigError, RunConfig, load_config
from longctx.errors import UserError
from longctx.feasibility import check_run, run_problems
from longctx.model import load_hf_config


def llama(**fields):
    return AutoConfig.for_model("llama", num_attention_heads=9, num_key_value_heads=3, hidden_size=72, **fields)


def test_a_trainable_model_has_no_problems():
    cfg = load_config(RunConfig, None, ["model.init={model_type: llama}", "train.seq_len=8192"])
    assert run_problems(cfg, llama(max_position_embeddings=4096)) == []


def test_every_problem_is_reported_together_in_one_line():
    cfg = load_config(
        RunConfig,
        None,
        [
            "model.init={model_type: llama}",
            "train.seq_len=8192",
            "rope.original_context=2048",  # the model says 4096
            "parallel.sequence_parallel_size=2",  # 9 heads do not split over 2 ranks
        ],
    )
    with pytest.raises(ConfigError) as e:
        check_run(cfg, llama(max_position_embeddings=4096))
    message = str(e.value)
    assert "\n" not in message and "rope.original_context=2048" in message
    assert "9 attention heads do not divide over parallel.sequence_parallel_size=2" in message


def test_a_model_without_rotary_embeddings_is_refused():
    cfg = load_config(RunConfig, None, ["model.init={model_type: gpt2}", "train.seq_len=2048"])
    problems = run_problems(cfg, AutoConfig.for_model("gpt2"))
    assert len(problems) == 1 and "gpt2 model without rotary position embeddings" in problems[0]


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_padding_is_not(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")))
    fast.save_pretrained(str(tmp_path))
    config = llama(vocab_size=96, max_position_embeddings=4096)
    config.save_pretrained(tmp_path)
    cfg = load_config(RunConfig, None, [f"model.path={tmp_path}", "train.seq_len=8192"])
    problems = run_problems(cfg, load_hf_config(cfg))
    assert len(problems) == 1 and "has 100 tokens but the model's embedding table only 96" in problems[0]
    config.vocab_size = 128  # padded beyond the tokenizer (Qwen2.5): fine
    config.save_pretrained(tmp_path)
    assert run_problems(cfg, load_hf_config(cfg)) == []


def test_a_gguf_model_path_names_the_conversion(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for path in (tmp_path, tmp_path / "model.gguf"):
        cfg = load_config(RunConfig, None, [f"model.path={path}"])
        with pytest.raises(UserError, match="is a GGUF file, which longctx does not train: convert it"):
            load_hf_config(cfg)
