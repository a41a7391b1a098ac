"""The training reader: PackedDataset tensors and refusals; the resumable distributed sampler."""

import numpy as np
import pytest
import torch

from longctx.data import PackedDataset, ResumableDistributedSampler
from longctx.errors import UserError
from longctx.shards import ShardWriter

TOKENIZER = {"name": "tok.model", "sha256": "ab" * 32}


def _shard_set(directory, last_num_valid=10):
    rng = np.random.default_rng(0)
    sequences = rng.integers(4, 500, size=(5, 16)).astype(np.uint16)
    starts = [[0, 5], [], [3], [0, 7, 8], [2]]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in starts])])
    writer = ShardWriter(directory, 16, np.uint16, 2)
    writer.add(sequences, offsets, np.array([x for s in starts for x in s], dtype=np.int64))
    writer.finish({"vocab_size": 500, "tokenizer": TOKENIZER, "last_num_valid": last_num_valid})
    return sequences, starts


def test_items_are_int64_tensors_with_masked_padding(tmp_path):
    sequences, _ = _shard_set(tmp_path)
    ds = PackedDataset(tmp_path, seq_len=16, vocab_size=500, tokenizer_identity=TOKENIZER)
    assert len(ds) == 5 and ds.manifest["seq_len"] == 16
    for i in range(5):
        item = ds[i]
        assert all(t.dtype == torch.int64 and t.shape == (16,) for t in item.values())
        assert item["input_ids"].tolist() == sequences[i].tolist()
        assert item["position_ids"].tolist() == list(range(16))
    last = ds[4]["labels"]
    assert last[:10].tolist() == sequences[4][:10].tolist() and (last[10:] == -100).all()
    assert (ds[3]["labels"] == ds[3]["input_ids"]).all()


def test_positions_restart_at_document_starts_when_isolated(tmp_path):
    _, starts = _shard_set(tmp_path)
    ds = PackedDataset(tmp_path, isolate_documents=True)
    assert ds[0]["position_ids"].tolist() == list(range(5)) + list(range(11))
    assert ds[1]["position_ids"].tolist() == list(range(16))  # one document continued from sequence 0
    assert ds[2]["position_ids"].tolist() == [0, 1, 2] + list(range(13))
    assert ds[3]["position_ids"].tolist() == list(range(7)) + [0] + list(range(8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 32}, "sequences of 16 tokens but the run trains on 32: set train.seq_len=16"),
        ({"vocab_size": 400}, "vocabulary of 500 tokens but the model has 400"),  # a larger table is padding
        ({"tokenizer_identity": {"name": "other", "sha256": "cd" * 32}}, "packed with tokenizer tok.model"),
    ],
)
def test_mismatched_shards_are_refused(tmp_path, kwargs, message):
    _shard_set(tmp_path)
    with pytest.raises(UserError, match=message):
        PackedDataset(tmp_path, **kwargs)


def test_corrupt_shard_stops_reading(tmp_path):
    _shard_set(tmp_path)
    path = tmp_path / "shard-00001.tokens"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    ds = PackedDataset(tmp_path)
    ds[0]
    with pytest.raises(UserError, match="checksum mismatch"):
        ds[2]


def test_sampler_partitions_disjoint_equal_and_deterministic():
    samplers = [ResumableDistributedSampler(103, num_replicas=4, rank=r, seed=5) for r in range(4)]
    epoch0 = [list(s) for s in samplers]
    assert all(len(x) == 25 == len(s) for x, s in zip(epoch0, samplers))
    flat = [i for x in epoch0 for i in x]
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))
    epoch1 = [list(s) for s in samplers]  # the next iteration is the next epoch: a new order
    assert epoch1 != epoch0 and len({i for x in epoch1 for i in x}) == 100
    again = ResumableDistributedSampler(103, num_replicas=4, rank=2, seed=5)
    assert list(again) == epoch0[2] and list(again) == epoch1[2]
    assert list(ResumableDistributedSampler(103, num_replicas=4, rank=2, seed=6)) != epoch0[2]
    ordered = ResumableDistributedSampler(10, num_replicas=3, rank=1, seed=0, shuffle=False)
    assert list(ordered) == [1, 4, 7]


def test_sampler_resumes_with_exactly_the_next_sample():
    reference = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    expected = list(reference) + list(reference)[:10]  # epoch 0, then the start of epoch 1
    assert len(expected) == 35

    sampler = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    it = iter(sampler)
    seen = [next(it) for _ in range(17)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "consumed": 17}
    resumed = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=3)
    resumed.load_state_dict(state)
    seen += list(resumed)
    assert resumed.state_dict() == {"epoch": 1, "consumed": 0}
    seen += list(iter(resumed))[:10]
    assert seen == expected


def test_sampler_refuses_too_few_samples():
    with pytest.raises(UserError, match="cannot be split over 4 data-parallel ranks"):
        ResumableDistributedSampler(3, num_replicas=4, rank=0, seed=0)
