"""`longctx eval ppl | passkey` end to end on tiny saved models, and its one-line errors for bad input."""

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import tiny_llama

from longctx.cli import main
from longctx.evaluate import load_eval_model, perplexity


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    """transformers' weight-loading bars would share stderr with the one-line errors under test."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama saved as a Hugging Face directory, with a small sentencepiece tokenizer beside it."""
    from data_prep.tokenizer import load_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("model")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "bisect.py")]
    texts.append("The grass is green. The sky is blue. The sun is yellow. What is the pass key? 0123456789")
    train_sentencepiece(texts, 512, root / "tok.model", num_threads=1)
    tokenizer = load_tokenizer(root / "tok.model")
    model = tiny_llama(max_position_embeddings=256)
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.save_pretrained(root / "llama")
    shutil.copyfile(root / "tok.model", root / "llama" / "tokenizer.model")  # found by default beside the model
    return root / "llama"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A held-out shard set of 3 sequences of 40 tokens, the last padded after 25: a stream of 105 tokens."""
    from longctx.shards import ShardWriter

    directory = tmp_path_factory.mktemp("val")
    sequences = np.random.default_rng(0).integers(4, 512, size=(3, 40))
    sequences[2, 25:] = 3  # padding
    writer = ShardWriter(directory, seq_len=40, dtype=np.uint16, sequences_per_shard=2)
    writer.add(sequences, doc_offsets=np.array([0, 1, 1, 2]), doc_starts=np.array([0, 7]))
    writer.finish({"last_num_valid": 25, "vocab_size": 512})
    return directory, torch.from_numpy(np.concatenate([sequences[0], sequences[1], sequences[2, :25]]))


def run_cli(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("longctx: error: ")
    for fragment in fragments:
        assert fragment in err


def test_ppl_end_to_end(model_dir, heldout, tmp_path, capsys):
    shard_dir, stream = heldout
    out = tmp_path / "ppl"
    argv = ["ppl", "--model", f"base={model_dir}", "--model", f"again={model_dir}", "--data", shard_dir]
    code, stdout, err = run_cli(capsys, *argv, "--lengths", "32,16,32", "--stride", 8, "--batch-size", 2, "--out", out)
    assert code == 0, err
    report = json.loads((out / "perplexity.json").read_text())
    assert report["num_stream_tokens"] == 105 and report["lengths"] == [16, 32]  # sorted, each once
    assert report["stride"] == {"16": 8, "32": 8}
    expected = perplexity(load_eval_model(model_dir), [stream], [16, 32], stride=8)
    for name in ("base", "again"):
        for length in (16, 32):
            got = report["models"][name]["results"][str(length)]
            assert got["num_tokens"] == 104
            assert got["perplexity"] == pytest.approx(expected[length]["perplexity"], rel=1e-5)
    assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    table = stdout.splitlines()
    assert table[0].split() == ["model", "16", "32"] and table[1].split()[0] == "base"
    assert float(table[1].split()[1]) == pytest.approx(expected[16]["perplexity"], abs=1e-3)


def test_ppl_lengths_beyond_the_heldout_data_give_one_line_error(model_dir, heldout, tmp_path, capsys):
    argv = ["ppl", "--model", model_dir, "--data", heldout[0], "--lengths", "16,105", "--out", tmp_path]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "has 105 tokens, fewer than the longest length 105 + 1", "evaluate shorter")
    code, _, err = run_cli(capsys, *argv[:-4], "--lengths", "64", "--max-tokens", 50, "--out", tmp_path)
    assert_one_line_error(code, err, "has 50 tokens, fewer than the longest length 64 + 1")


def test_passkey_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "passkey"
    argv = ["passkey", "--model", f"tiny={model_dir}", "--lengths", "300,400", "--depths", "0,0.5,1"]
    code, stdout, err = run_cli(capsys, *argv, "--trials", 2, "--seed", 3, "--out", out)
    assert code == 0, err
    report = json.loads((out / "passkey.json").read_text())
    result = report["models"]["tiny"]
    assert result["lengths"] == [300, 400] and result["depths"] == [0, 0.5, 1] and result["trials"] == 2
    assert len(result["accuracy"]) == 2 and all(len(row) == 3 for row in result["accuracy"])
    assert result["accuracy"] == [[0.0] * 3] * 2  # a random model does not find the key
    assert (out / "passkey_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "tiny: passkey accuracy" in stdout
    assert "warning: tiny: context length 400 exceeds the 256 positions" in err


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["ppl", "--lengths", "16,x"], ["--lengths '16,x' must be comma-separated whole numbers"]),
        (["ppl", "--lengths", "0,16"], ["must list positive numbers"]),
        (["ppl", "--lengths", "16,32", "--stride", "17"], ["stride 17 must be between 1 and the shortest length 16"]),
        (["ppl", "--lengths", "16", "--data", "{tmp}/missing"], ["missing is not a directory: give held-out shards"]),
        (["passkey", "--lengths", "300", "--depths", "0,1.5"], ["depths [0.0, 1.5] must lie in [0, 1]"]),
        (["passkey", "--lengths", "300", "--trials", "0"], ["trials 0 must be >= 1"]),
        (["passkey", "--lengths", "50"], ["passkey length 50 is too short for the prompt: use lengths >= "]),
    ],
)
def test_bad_arguments_give_one_line_errors(model_dir, tmp_path, capsys, argv, fragments):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "ppl" and "--data" not in argv:
        argv += ["--data", str(tmp_path)]
    code, _, err = run_cli(capsys, *argv, "--model", model_dir, "--out", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)


def test_bad_model_directories_give_one_line_errors(model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "passkey", "--model", tmp_path / "nowhere", "--lengths", 300, "--out", tmp_path)
    assert_one_line_error(code, err, "nowhere is not a directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys, "passkey", "--model", tmp_path / "empty", "--tokenizer", model_dir, "--lengths", 300, "--out", tmp_path
    )
    assert_one_line_error(code, err, "has neither config.json", "nor config.yaml")
    code, _, err = run_cli(capsys, "passkey", "--model", tmp_path / "empty", "--lengths", 300, "--out", tmp_path)
    assert_one_line_error(code, err, "holds no tokenizer: give --tokenizer")
    code, _, err = run_cli(
        capsys, "passkey", "--model", f"a={model_dir}", "--model", f"a={model_dir}", "--lengths", 300, "--out", tmp_path
    )
    assert_one_line_error(code, err, "--model name 'a' is given twice")


def test_learned_positions_past_their_table_give_one_line_error(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=512, n_embd=16, n_layer=1, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    argv = ["passkey", "--model", tmp_path / "gpt2", "--tokenizer", model_dir, "--lengths", 300, "--out", tmp_path]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "learned position embeddings for 128 positions", "evaluate lengths <= 128")


def test_tokens_beyond_the_models_vocabulary_give_one_line_errors(model_dir, heldout, tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "small_vocab")  # 259 token embeddings; the tokenizer and data have 512
    argv = ["--model", tmp_path / "small_vocab", "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, "ppl", *argv, "--data", heldout[0], "--lengths", 16)
    assert_one_line_error(code, err, "reach id", "has 259 token embeddings: evaluate on shards packed with the model")
    code, _, err = run_cli(capsys, "passkey", *argv, "--tokenizer", model_dir, "--lengths", 300)
    assert_one_line_error(code, err, "the tokenizer has 512 tokens but small_vocab has 259", "give the model's own")


def test_training_checkpoint_evaluates_like_its_exported_model(tmp_path, capsys):
    """A run directory (its newest checkpoint), a checkpoint and the run's final HF model give the same perplexity,
    with the run's RoPE scaling: 32 base positions × factor 2 reach 64 without a warning, 128 with one."""
    import subprocess
    import sys

    from longctx.shards import ShardWriter

    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parent.parent
    train = [sys.executable, "tests/dist/train_tiny.py", str(run_dir), "train.max_steps=2", "train.lr=1e-2"]
    done = subprocess.run(train, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    writer = ShardWriter(tmp_path / "val", seq_len=64, dtype=np.uint16, sequences_per_shard=4)
    writer.add(np.random.default_rng(0).integers(0, 96, size=(3, 64)), np.arange(4), np.zeros(3, dtype=np.int64))
    writer.finish({"last_num_valid": 64, "vocab_size": 96})
    models = {"run": run_dir, "step": run_dir / "checkpoints" / "step_00000002", "final": run_dir / "final"}
    argv = [arg for name, path in models.items() for arg in ("--model", f"{name}={path}")]
    code, _, err = run_cli(capsys, "ppl", *argv, "--data", tmp_path / "val", "--lengths", "32,64", "--out", tmp_path)
    assert code == 0 and "warning" not in err, err
    results = json.loads((tmp_path / "perplexity.json").read_text())["models"]
    for length in ("32", "64"):
        ppl = [results[name]["results"][length]["perplexity"] for name in models]
        assert ppl[0] == ppl[1] == pytest.approx(ppl[2], rel=1e-5)
    code, _, err = run_cli(capsys, "ppl", *argv[:2], "--data", tmp_path / "val", "--lengths", "128", "--out", tmp_path)
    assert code == 0 and "warning: run: context length 128 exceeds the 64 positions" in err
