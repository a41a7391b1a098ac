"""Evaluation spread over 2 ranks (gloo, CPU) gives what one rank gives: perplexity sums, passkey counts, per-position
loss sums and RULER answers; the all-reduce they use returns only once gloo has let go of its buffer (so a rank may
exit right after it)."""

import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_evaluate import ByteTokenizer, tiny_llama

from longctx.cli import main
from longctx.evaluate import extract_passkey, passkey_accuracy, perplexity
from longctx.parallel import all_reduce_
from longctx.shards import ShardWriter

LENGTHS = [8, 16]
STRIDE = 6
PASSKEY_LENGTHS, PASSKEY_DEPTHS, PASSKEY_TRIALS = [400, 500], [0.0, 0.5, 1.0], 3


def streams():
    # 13 and 9 windows at L=8: an odd count, so the two ranks get unequal shares.
    return [torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(n)) for n in (80, 57)]


def half_right_generator(tokenizer):
    """Answers the key when its last digit is even, a wrong number otherwise: accuracies between 0 and 1."""

    def generate(prompt_ids, max_new_tokens):
        key = extract_passkey(tokenizer.decode(prompt_ids).split("The pass key is ")[1])
        return tokenizer.encode(f" {key if int(key[-1]) % 2 == 0 else '11111'}.")

    return generate


def evaluate_all():
    from test_ruler import ByteTokenizer as RulerTokenizer

    from longctx import ruler
    from longctx.positions import position_nll

    tokenizer = ByteTokenizer()
    # 3 RULER samples (an odd count: unequal shares), answered by a random tiny model: whatever it says, the
    # gathered answers must be one rank's, in order
    fmt = ruler.PromptFormat(RulerTokenizer(), None)
    samples = ruler.generate_samples([ruler.TASKS["niah_single_1"]], [480], [0.0, 0.5, 1.0], 1, fmt, seed=3)
    answers = ruler.answer_samples(tiny_llama(), RulerTokenizer(), samples, {2}, max_new_tokens=4)
    sums, windows = position_nll(tiny_llama(), streams()[0], 8, batch_size=2)
    return {
        "ppl": perplexity(tiny_llama(), streams(), LENGTHS, stride=STRIDE, batch_size=2),
        "passkey": passkey_accuracy(
            half_right_generator(tokenizer), tokenizer, PASSKEY_LENGTHS, PASSKEY_DEPTHS, num_trials=PASSKEY_TRIALS
        ),
        "positions": {"sums": sums.tolist(), "windows": windows},
        "ruler": [{k: v for k, v in answer.items() if k != "seconds"} for answer in answers],
    }


def _worker(rank, world_size, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = evaluate_all()
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(tmp_path):
    out_file = tmp_path / "two_ranks.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out_file)), nprocs=2, join=True)
    two_ranks = json.loads(out_file.read_text())
    one_rank = json.loads(json.dumps(evaluate_all()))  # same key types (str) as the file
    for length in map(str, LENGTHS):
        assert two_ranks["ppl"][length]["num_tokens"] == one_rank["ppl"][length]["num_tokens"] == 79 + 56
        assert two_ranks["ppl"][length]["mean_nll"] == pytest.approx(one_rank["ppl"][length]["mean_nll"], rel=1e-6)
    assert two_ranks["passkey"] == one_rank["passkey"]
    # eval positions: 9 windows of 8 + 1 tokens in 80, shared 5 / 4, sums all-reduced
    assert two_ranks["positions"]["windows"] == one_rank["positions"]["windows"] == 9
    assert two_ranks["positions"]["sums"] == pytest.approx(one_rank["positions"]["sums"], rel=1e-9)
    # eval ruler: the ranks answer 2 and 1 samples; gathered, they are the one-rank answers in order
    assert two_ranks["ruler"] == one_rank["ruler"] and [a["depth"] for a in one_rank["ruler"]] == [1.0, 0.5, 0.0]
    accuracies = [a for row in one_rank["passkey"]["accuracy"] for a in row]
    assert 0 < sum(accuracies) < len(accuracies)  # a mix of right and wrong answers, so the reduction is exercised


@pytest.mark.distributed
def test_cli_under_the_deepspeed_launcher_equals_one_process(tmp_path):
    """`deepspeed --num_gpus 2 --module longctx.cli eval ppl` (gloo on CPU) writes what the plain CLI writes."""
    tiny_llama(max_position_embeddings=64).save_pretrained(tmp_path / "model")
    writer = ShardWriter(tmp_path / "val", seq_len=64, dtype=np.uint16, sequences_per_shard=4)
    sequences = np.random.default_rng(0).integers(4, 259, size=(5, 64))
    writer.add(sequences, doc_offsets=np.arange(6), doc_starts=np.zeros(5, dtype=np.int64))
    writer.finish({"last_num_valid": 64, "vocab_size": 259})
    argv = ["eval", "ppl", "--model", f"tiny={tmp_path / 'model'}", "--data", str(tmp_path / "val")]
    argv += ["--lengths", "32,128", "--stride", "24", "--batch-size", "3"]
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port())]
    command = launcher + ["--module", "longctx.cli"] + argv + ["--out", str(tmp_path / "two")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    results = {
        ranks: json.loads((tmp_path / ranks / "perplexity.json").read_text())["models"]["tiny"]["results"]
        for ranks in ("two", "one")
    }
    for length in ("32", "128"):
        assert results["two"][length]["num_tokens"] == results["one"][length]["num_tokens"] == 5 * 64 - 1
        assert results["two"][length]["perplexity"] == pytest.approx(results["one"][length]["perplexity"], rel=1e-6)


RELEASE_ROUNDS = 400


def _release_worker(rank, world_size, port, out_file):
    """Counts the all-reduces after which a tensor the helper made (its private buffer) is still alive."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    made, clone = [], torch.Tensor.clone

    def recording_clone(self, *args, **kwargs):
        copy = clone(self, *args, **kwargs)
        made.append(weakref.ref(copy))
        return copy

    torch.Tensor.clone = recording_clone
    try:
        held, wrong, cloned = 0, 0, 0
        for i in range(RELEASE_ROUNDS):
            tensor = torch.full((4,), float(rank + i))
            all_reduce_(tensor)
            wrong += not torch.equal(tensor, torch.full((4,), float(2 * i + 1)))
            held += any(ref() is not None for ref in made)
            cloned += len(made)
            made.clear()
        if rank == 0:
            Path(out_file).write_text(json.dumps({"held": held, "wrong": wrong, "cloned": cloned}))
    finally:
        torch.Tensor.clone = clone
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_returns_after_gloo_has_released_its_buffer(tmp_path):
    """Gloo's worker frees the buffer just after the collective completes; freed at exit, it aborts the process."""
    out_file = tmp_path / "release.json"
    mp.spawn(_release_worker, args=(2, _free_port(), str(out_file)), nprocs=2, join=True)
    result = json.loads(out_file.read_text())
    assert result["cloned"] >= RELEASE_ROUNDS  # the collective ran on tensors the recording saw
    assert result["wrong"] == 0
    assert result["held"] == 0
