"""`longctx eval ruler | positions | retention` end to end on tiny saved models, checked against direct computations,
and their one-line errors for bad input, after which nothing has been created."""

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_evaluate import tiny_llama

from longctx import ruler
from longctx.cli import main
from longctx.evaluate import load_eval_model, perplexity


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on two when the cores are shared (measured 25x on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny llamas (different weights) saved as Hugging Face directories, a small sentencepiece tokenizer beside."""
    from data_prep.tokenizer import load_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("models")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "bisect.py")]
    texts.append(ruler.ENCODING_PROBE + "\nWhat is the special magic number for bold-acorn mentioned? 0123456789")
    train_sentencepiece(texts, 512, root / "tok.model", num_threads=1)
    vocab_size = load_tokenizer(root / "tok.model").vocab_size
    for seed in (0, 1):
        model = tiny_llama(max_position_embeddings=256, seed=seed)
        model.resize_token_embeddings(vocab_size)
        model.save_pretrained(root / f"llama{seed}")
        shutil.copyfile(root / "tok.model", root / f"llama{seed}" / "tokenizer.model")
    return root / "llama0", root / "llama1"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Held-out shards of 4 sequences of 40 tokens, the last padded after 25: a stream of 145 tokens."""
    from longctx.shards import ShardWriter

    directory = tmp_path_factory.mktemp("val")
    sequences = np.random.default_rng(0).integers(4, 512, size=(4, 40))
    sequences[3, 25:] = 3  # padding
    writer = ShardWriter(directory, seq_len=40, dtype=np.uint16, sequences_per_shard=2)
    writer.add(sequences, doc_offsets=np.array([0, 1, 2, 2, 3]), doc_starts=np.array([0, 7, 3, 0]))
    writer.finish({"last_num_valid": 25, "vocab_size": 512})
    return directory, torch.from_numpy(np.concatenate([*sequences[:3], sequences[3, :25]]))


def run_cli(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("longctx: error: "), err
    for fragment in fragments:
        assert fragment in err


def test_ruler_end_to_end(models, tmp_path, capsys):
    out = tmp_path / "ruler"
    argv = ["ruler", "--model", f"a={models[0]}", "--model", f"b={models[1]}", "--lengths", "1300,1000"]
    argv += ["--tasks", "niah_single_1,vt,fwe", "--depths", "1,0", "--samples", 1, "--seed", 3, "--out", out]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    report = json.loads((out / "ruler.json").read_text())
    assert report["lengths"] == [1000, 1300] and report["depths"] == [0, 1] and report["chat_template"] is False
    assert report["max_new_tokens"] == "each task's" and report["samples_per_cell"] == 1
    assert list(report["models"]) == ["a", "b"] and list(report["tasks"]) == ["niah_single_1", "vt", "fwe"]
    for name in ("a", "b"):
        result = report["models"][name]
        answers = result["answers"]
        assert len(answers) == 2 * (2 + 2 + 1)  # lengths x (depths for niah and vt, one row for fwe)
        for answer in answers:
            assert answer["score"] == ruler.string_match_all(answer["answer"], answer["outputs"])
            assert answer["prompt_tokens"] <= answer["length"]
        niah = result["tasks"]["niah_single_1"]
        assert niah["depths"] == [0, 1] and len(niah["score"]) == 2 and all(len(row) == 2 for row in niah["score"])
        assert result["tasks"]["fwe"]["depths"] == [None] and len(result["tasks"]["fwe"]["score"]) == 1
        cell = [a["score"] for a in answers if a["task"] == "vt" and a["length"] == 1300 and a["depth"] == 0]
        assert result["tasks"]["vt"]["score"][0][1] == pytest.approx(100 * sum(cell), abs=0.01)
        for task in ("niah_single_1", "vt", "fwe"):
            assert (out / f"ruler_{name}_{task}.png").read_bytes()[:4] == b"\x89PNG"
    prompts_a = [(a["task"], a["length"], a["depth"], a["outputs"]) for a in report["models"]["a"]["answers"]]
    assert prompts_a == [(a["task"], a["length"], a["depth"], a["outputs"]) for a in report["models"]["b"]["answers"]]
    assert "a: RULER score" in stdout and "b: RULER score" in stdout and "average" in stdout
    # the same seed again: the same samples and, the model being deterministic, the same answers
    code, _, err = run_cli(capsys, *argv[:-1], tmp_path / "again")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "ruler.json").read_text())
    strip = [{k: v for k, v in a.items() if k != "seconds"} for a in report["models"]["a"]["answers"]]
    assert strip == [{k: v for k, v in a.items() if k != "seconds"} for a in again["models"]["a"]["answers"]]


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--lengths", "400", "--depths", "0,1.5"], ["depths [0.0, 1.5] must lie in [0, 1]"]),
        (["--lengths", "400", "--samples", "0"], ["samples 0 must be >= 1"]),
        (["--lengths", "400", "--tasks", "niah,qa"], ["unknown task 'niah': choose among niah_single_1"]),
        (["--lengths", "60", "--tasks", "vt"], ["length 60 is too short for task vt: its prompt needs"]),
        (["--lengths", "x"], ["--lengths 'x' must be comma-separated whole numbers"]),
        (["--lengths", "400", "--max-new-tokens", "-1"], ["max new tokens -1 must be >= 0"]),
        (["--lengths", "400", "--haystack-text", "{tmp}/none"], ["haystack text", "none does not exist"]),
    ],
)
def test_ruler_bad_arguments_give_one_line_errors_and_create_nothing(models, tmp_path, capsys, argv, fragments):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--tasks" not in argv:
        argv += ["--tasks", "niah_single_2"]
    code, _, err = run_cli(capsys, "ruler", "--model", models[0], *argv, "--out", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_ruler_refuses_a_model_that_cannot_end_an_answer_and_an_output_file(models, tmp_path, capsys):
    no_eos = tmp_path / "no_eos"
    shutil.copytree(models[0], no_eos)
    config = json.loads((no_eos / "config.json").read_text())
    (no_eos / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    (no_eos / "generation_config.json").unlink(missing_ok=True)
    argv = ["ruler", "--model", no_eos, "--lengths", 300, "--tasks", "niah_single_1", "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "names no end-of-sequence token", 'generation_config.json {"eos_token_id"')
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, *argv[:-1], tmp_path / "file")
    assert_one_line_error(code, err, "is a file: give a directory")


def direct_position_nll(model, stream, length):
    """Per-position NLL summed over the non-overlapping windows, one plain forward per window."""
    sums, count = torch.zeros(length, dtype=torch.float64), 0
    for start in range(0, len(stream) - length, length):
        window = stream[start : start + length + 1]
        with torch.no_grad():
            logits = model(input_ids=window[None, :-1]).logits[0]
        sums += F.cross_entropy(logits.float(), window[1:], reduction="none").double()
        count += 1
    return sums, count


def test_positions_end_to_end(models, heldout, tmp_path, capsys):
    shard_dir, stream = heldout
    out = tmp_path / "positions"
    argv = ["positions", "--model", f"a={models[0]}", "--model", f"b={models[1]}", "--data", shard_dir]
    code, stdout, err = run_cli(capsys, *argv, "--length", 16, "--buckets", 3, "--batch-size", 4, "--out", out)
    assert code == 0, err
    report = json.loads((out / "positions.json").read_text())
    assert report["length"] == 16 and report["num_buckets"] == 3
    for name, path in zip(("a", "b"), models):
        sums, count = direct_position_nll(load_eval_model(path), stream, 16)
        result = report["models"][name]
        assert result["num_windows"] == count == 9  # 145 tokens: windows of 17 every 16
        bounds = [(b["start"], b["end"]) for b in result["buckets"]]
        assert bounds == [(0, 5), (5, 11), (11, 16)]
        for bucket in result["buckets"]:
            expected = float(sums[bucket["start"] : bucket["end"]].mean()) / count
            assert bucket["mean_nll"] == pytest.approx(expected, rel=1e-5)
            assert bucket["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert (out / "positions.png").read_bytes()[:4] == b"\x89PNG"
    assert stdout.splitlines()[0].split() == ["positions", "a", "b"]
    code, _, err = run_cli(capsys, *argv, "--length", 16, "--max-windows", 2, "--out", tmp_path / "two")
    assert (
        code == 0 and json.loads((tmp_path / "two" / "positions.json").read_text())["models"]["a"]["num_windows"] == 2
    )


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--length", "145"], ["has 145 tokens, fewer than the length 145 + 1"]),
        (["--length", "16", "--buckets", "17"], ["buckets 17 must be between 1 and the length 16"]),
    ],
)
def test_positions_bad_arguments_give_one_line_errors(models, heldout, tmp_path, capsys, argv, fragments):
    code, _, err = run_cli(
        capsys, "positions", "--model", models[0], "--data", heldout[0], *argv, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "o").exists()


def test_retention_end_to_end(models, heldout, tmp_path, capsys):
    shard_dir, stream = heldout
    out = tmp_path / "retention"
    argv = ["retention", "--model", f"base={models[0]}", "--model", f"ext={models[1]}", "--model", f"same={models[0]}"]
    argv += ["--data", f"code={shard_dir}", "--data", f"prose={shard_dir}", "--base-context", 32, "--max-tokens", 100]
    code, stdout, err = run_cli(capsys, *argv, "--baseline", "base", "--out", out)
    assert code == 0, err
    report = json.loads((out / "retention.json").read_text())
    assert report["baseline"] == "base" and report["base_context"] == 32 and list(report["data"]) == ["code", "prose"]
    expected = {name: perplexity(load_eval_model(path), [stream[:100]], [32])[32]["perplexity"]
                for name, path in (("base", models[0]), ("ext", models[1]))}  # fmt: skip
    for domain in ("code", "prose"):
        got = {name: report["models"][name]["domains"][domain] for name in ("base", "ext", "same")}
        assert got["base"]["perplexity"] == pytest.approx(expected["base"], rel=1e-5)
        assert got["ext"]["perplexity"] == pytest.approx(expected["ext"], rel=1e-5)
        assert got["base"]["change"] == 0 and got["same"]["change"] == pytest.approx(0, abs=1e-9)
        assert got["ext"]["change"] == pytest.approx(expected["ext"] / expected["base"] - 1, rel=1e-5)
    assert "change from base" in stdout and stdout.splitlines()[2].split()[0] == "base"
    code, _, err = run_cli(capsys, *argv, "--baseline", "nobody", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--baseline 'nobody' is not one of the models (base, ext, same)")
    code, _, err = run_cli(capsys, *argv[:5], "--data", shard_dir, "--base-context", 200, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "has 145 tokens, fewer than the base context 200 + 1")
    assert not (tmp_path / "x").exists()


def test_named_directory_options_share_one_parser(tmp_path):
    """--model and --data: NAME=DIR or DIR (named after it; a `val` split after its parent), names unique, DIRs real."""
    from longctx.errors import UserError
    from longctx.evaluate import parse_model_specs
    from longctx.positions import parse_data_specs

    (tmp_path / "prep" / "val").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    val, base = str(tmp_path / "prep" / "val"), str(tmp_path / "base")
    assert parse_data_specs([val + "/", f"prose={base}"]) == {"prep": val + "/", "prose": base}
    assert parse_model_specs([base, f"val={val}"]) == {"base": base, "val": val}
    assert parse_model_specs([val]) == {"val": val}  # models are named after the directory itself
    for parse, option, twice, missing in (
        (parse_data_specs, "--data", [val, f"prep={base}"], "data /nowhere is not a directory: give held-out shards"),
        (parse_model_specs, "--model", [base, f"base={val}"], "model /nowhere is not a directory: give a Hugging Face"),
    ):
        with pytest.raises(UserError, match=f"{option} name 'prep|base' is given twice"):
            parse(twice)
        with pytest.raises(UserError, match=missing):
            parse(["/nowhere"])
        with pytest.raises(UserError, match=f"{option} '=x' is not NAME=DIR or DIR"):
            parse(["=x"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("command", ["ppl", "retention", "positions"])
def test_device_map_without_gpus_is_one_line_and_creates_nothing(models, heldout, tmp_path, capsys, command):
    shard_dir, _ = heldout
    argv = {"ppl": ["--lengths", 16], "retention": ["--base-context", 16], "positions": ["--length", 16]}[command]
    code, _, err = run_cli(
        capsys, command, "--model", models[0], "--data", shard_dir, *argv, "--device-map", "balanced",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(code, err, "none is visible: drop --device-map")
    assert not (tmp_path / "o").exists()
