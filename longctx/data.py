"""Training data: a dataset over packed shards (memory-mapped) and a resumable distributed sampler.

`PackedDataset` refuses shards that do not match the run (seq_len, vocab size, tokenizer identity): training on
them would silently waste the run. Shard checksums are verified lazily, the first time each shard is read in a
process (see longctx/shards.py), so a corrupt shard stops training with an error instead of being trained on.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from longctx.errors import UserError
from longctx.shards import open_shards

IGNORE_INDEX = -100  # labels that the loss skips (tail padding, and prompts in supervised shards)


class PackedDataset(torch.utils.data.Dataset):
    """`ds[i]` = {input_ids, labels, position_ids}, each (seq_len,) int64; labels are -100 on tail padding and, in
    supervised shards (`longctx prep sft`), wherever the stored loss mask is 0 (prompts, padding).

    position_ids run 0..N-1, or restart at 0 at every document start when `isolate_documents` (the attention then
    keeps documents apart by the same restarts; see the S²-Attn definition in DESIGN.md).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        seq_len: int | None = None,
        vocab_size: int | None = None,
        tokenizer_identity: dict[str, Any] | None = None,
        isolate_documents: bool = False,
    ):
        self.shards = open_shards(directory)
        self.manifest = self.shards.manifest
        self.isolate_documents = isolate_documents
        m = self.manifest
        if seq_len is not None and m["seq_len"] != seq_len:
            raise UserError(
                f"shards in {directory} hold sequences of {m['seq_len']} tokens but the run trains on {seq_len}: "
                f"set train.seq_len={m['seq_len']} or re-pack with --seq-len {seq_len}"
            )
        # An embedding table larger than the tokenizer is padding (Qwen2.5: 151,936 rows for 151,665 tokens).
        if vocab_size is not None and m["vocab_size"] > vocab_size:
            raise UserError(
                f"shards in {directory} use a vocabulary of {m['vocab_size']} tokens but the model has {vocab_size}: "
                "pack with the model's own tokenizer (or set the model's vocab size to match)"
            )
        if tokenizer_identity is not None and tokenizer_identity.get("sha256") != m["tokenizer"]["sha256"]:
            raise UserError(
                f"shards in {directory} were packed with tokenizer {m['tokenizer']['name']} "
                f"(sha256 {m['tokenizer']['sha256'][:12]}), not the run's {tokenizer_identity.get('name')}: "
                "re-pack with the model's tokenizer"
            )
        if m.get("sft", {}).get("packing") == "pack" and not isolate_documents:
            raise UserError(
                f"shards in {directory} pack several conversations per sequence, which would attend to each other: "
                "set attention.isolate_documents=true (or re-pack with `prep sft --packing pad`)"
            )

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = self.shards[i]
        seq_len = len(tokens)
        input_ids = torch.from_numpy(tokens.astype(np.int64))  # astype copies out of the read-only memmap
        labels = input_ids.clone()
        num_valid = self.shards.num_valid(i)
        labels[num_valid:] = IGNORE_INDEX
        mask = self.shards.loss_mask(i)
        if mask is not None:
            labels[torch.from_numpy(~mask)] = IGNORE_INDEX
        if self.isolate_documents:
            position_ids = _positions_restarting_at(self.shards.doc_starts(i), seq_len)
        else:
            position_ids = torch.arange(seq_len, dtype=torch.int64)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _positions_restarting_at(doc_starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """0, 1, ... restarting at 0 at each document start; a document continued from the previous sequence
    counts from 0 at the sequence start (its earlier tokens are not in this sequence)."""
    positions = np.arange(seq_len, dtype=np.int64)
    segment_start = np.zeros(seq_len, dtype=np.int64)
    segment_start[doc_starts] = doc_starts
    np.maximum.accumulate(segment_start, out=segment_start)
    return torch.from_numpy(positions - segment_start)


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    """Disjoint, equal-sized index streams per data-parallel rank; deterministic per (seed, epoch); resumable.

    Iterating yields the rest of the current epoch for this rank, then moves to the next epoch (so a fresh
    `iter()` per epoch works, as with torch's DistributedSampler). The remainder that does not divide evenly
    among ranks is dropped each epoch (a different remainder each epoch when shuffling).
    `state_dict()` is {epoch, consumed} (samples of this epoch already yielded to this rank); after
    `load_state_dict`, iteration continues with exactly the next sample. A DataLoader prefetches ahead of the
    loop, so a trainer should save {epoch, consumed: samples its steps actually used} rather than this live count.
    """

    def __init__(self, num_samples: int, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if num_samples < num_replicas:
            raise UserError(
                f"{num_samples} sequences cannot be split over {num_replicas} data-parallel ranks: "
                "pack more data (or shorter sequences) or use fewer ranks"
            )
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = num_samples // num_replicas
        self.epoch, self.consumed = 0, 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for one epoch: a strided slice of the epoch's (shuffled) order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[: self.per_rank * self.num_replicas][self.rank :: self.num_replicas]

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        while self.consumed < len(indices):
            index = int(indices[self.consumed])
            self.consumed += 1
            yield index
        self.epoch, self.consumed = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
