"""The shard format: writer/reader round trip, resume of a writer, checksum and size checks, token dtype."""

import numpy as np
import pytest

from longctx.errors import UserError
from longctx.shards import ShardWriter, open_shards, token_dtype_for


def _write(directory, sequences, starts_per_seq, per_shard=3, dtype=np.uint16, last_num_valid=None):
    writer = ShardWriter(directory, sequences.shape[1], dtype, per_shard)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in starts_per_seq])])
    writer.add(sequences, offsets, np.concatenate([np.asarray(s, dtype=np.int64) for s in starts_per_seq]))
    return writer.finish({"last_num_valid": last_num_valid or sequences.shape[1]})


def _example(num=7, seq_len=16, seed=0):
    rng = np.random.default_rng(seed)
    sequences = rng.integers(0, 60000, size=(num, seq_len)).astype(np.uint16)
    starts = [sorted(set(rng.integers(0, seq_len, size=int(rng.integers(0, 4))).tolist())) for _ in range(num)]
    return sequences, starts


def test_round_trip_sequences_and_boundaries(tmp_path):
    sequences, starts = _example()
    manifest = _write(tmp_path, sequences, starts, last_num_valid=5)
    assert manifest["num_sequences"] == 7 and len(manifest["shards"]) == 3  # 3 + 3 + 1
    shards = open_shards(tmp_path, verify="all")
    assert len(shards) == 7
    for i in range(7):
        np.testing.assert_array_equal(shards[i], sequences[i])
        assert shards.doc_starts(i).tolist() == starts[i]
        assert shards.num_valid(i) == (5 if i == 6 else 16)
    assert isinstance(shards[0].base, np.memmap) or isinstance(shards[0], np.memmap)  # a view, not a copy
    assert not list(tmp_path.glob("*.partial"))


def test_resumed_writer_reproduces_the_uninterrupted_output(tmp_path):
    sequences, starts = _example(num=11)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in starts])])
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in starts])
    _write(tmp_path / "whole", sequences, starts)

    writer = ShardWriter(tmp_path / "resumed", 16, np.uint16, 3)
    writer.add(sequences[:4], offsets[:5], flat[: offsets[4]])
    state = writer.state()
    # work after the saved state that a kill -9 throws away: completes shard 1 and starts shard 2
    writer.add(sequences[4:8], offsets[4:9] - offsets[4], flat[offsets[4] : offsets[8]])
    writer.close()
    assert (tmp_path / "resumed" / "shard-00001.tokens").exists()  # completed after the state: must be reopened
    (tmp_path / "resumed" / "shard-00002.tokens.partial").write_bytes(b"half a sequence")
    resumed = ShardWriter(tmp_path / "resumed", 16, np.uint16, 3, state)
    resumed.add(sequences[4:], offsets[4:] - offsets[4], flat[offsets[4] :])
    resumed.finish({"last_num_valid": 16})
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_corrupt_shard_is_detected_on_verify_and_on_read(tmp_path):
    sequences, starts = _example()
    _write(tmp_path, sequences, starts)
    path = tmp_path / "shard-00001.tokens"
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    shards = open_shards(tmp_path)  # sizes are fine: the flip is found when the shard is first read
    np.testing.assert_array_equal(shards[0], sequences[0])
    with pytest.raises(UserError, match="checksum mismatch in .*shard-00001.tokens"):
        shards[3]
    with pytest.raises(UserError, match="checksum mismatch"):
        open_shards(tmp_path, verify="all")


def test_truncated_shard_is_refused_at_open(tmp_path):
    sequences, starts = _example()
    _write(tmp_path, sequences, starts)
    path = tmp_path / "shard-00000.tokens"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="wrong size"):
        open_shards(tmp_path)


def test_unfinished_set_is_refused(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        open_shards(tmp_path)


def test_token_dtype():
    assert token_dtype_for(32000) == np.uint16
    assert token_dtype_for(65535) == np.uint16
    assert token_dtype_for(128256) == np.uint32
    with pytest.raises(UserError, match="does not fit token dtype uint16: use token dtype uint32"):
        token_dtype_for(128256, "uint16")
