"""Safetensors files read and written one tensor at a time, so host memory never holds a whole model.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape and byte
offsets into the data), then the tensors' raw bytes. Writing: when every tensor's name, dtype and shape are known in
advance (a base model's metadata, the full shapes of ZeRO-partitioned parameters), the header goes first and each
tensor's bytes are appended as the tensor is produced. Reading: each tensor's bytes are read with plain file reads
(not a memory map, whose touched pages would stay in the process's resident memory for the whole file).

Sets larger than `max_shard_bytes` are split into `<prefix>-0000k-of-0000n.safetensors` plus
`<prefix>.safetensors.index.json`, the layout `transformers` reads for `model`.

`fingerprint` identifies a model directory's weights cheaply (a few MB read per file), so a checkpoint that holds only
what training changed can check that it is being put back on the base it was trained from.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.errors import UserError

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be: its name, full shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int, prefix: str) -> list[tuple[str, list[TensorSpec]]]:
    """(file name, its tensors) in order: a new file starts when the next tensor would pass max_shard_bytes."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [(f"{prefix}.safetensors", groups[0])]
    return [(f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors", group) for i, group in enumerate(groups)]


class ShardedWriter:
    """Write tensors, in the order of `specs`, into safetensors shards under `directory`.

    Each `write(name, tensor)` appends that tensor's bytes at once; `close()` checks that every planned tensor was
    written and writes the index (several shards). Use as a context manager; on an exception the partial files stay
    for the caller's temporary directory to be removed.
    """

    def __init__(
        self, directory: str | os.PathLike, specs: list[TensorSpec], *, prefix: str = "model", max_shard_bytes: int = 0
    ):
        self.directory = Path(directory)
        self.shards = plan_shards(specs, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, prefix)
        self.prefix = prefix
        self.order = [(file_name, spec) for file_name, group in self.shards for spec in group]
        self.position = 0
        self.file = None
        self.file_name = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self.file is not None:
            self.file.close()
        if kind is None:
            self.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file_name, spec = self.order[self.position]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise AssertionError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} written where {spec} was planned")
        if file_name != self.file_name:
            self._open(file_name)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.position += 1

    def close(self) -> list[str]:
        """Finish; returns the file names written."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.position != len(self.order):
            raise AssertionError(f"{len(self.order) - self.position} planned tensors were never written")
        if len(self.shards) > 1:
            weight_map = {spec.name: file_name for file_name, spec in self.order}
            total = sum(spec.nbytes for _, spec in self.order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [file_name for file_name, _ in self.shards]

    def _open(self, file_name: str) -> None:
        if self.file is not None:
            self.file.close()
        group = next(group for name, group in self.shards if name == file_name)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for spec in group:
            header[spec.name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.file = open(self.directory / file_name, "wb")  # noqa: SIM115  (closed in close/_open/__exit__)
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.file_name = file_name


class SafetensorsReader:
    """The tensors of one or more safetensors files, each read on demand with plain reads."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, int, TensorSpec]] = {}
        for path in files:
            for name, (start, spec) in _read_header(path).items():
                self.entries[name] = (path, start, spec)

    @classmethod
    def of_directory(cls, directory: str | os.PathLike, prefix: str = "model") -> SafetensorsReader | None:
        """The `<prefix>` tensors of a directory (single file or index), or None when it has none."""
        directory = Path(directory)
        index = directory / f"{prefix}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls([directory / name for name in sorted(set(weight_map.values()))])
        single = directory / f"{prefix}.safetensors"
        return cls([single]) if single.is_file() else None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> TensorSpec:
        return self.entries[name][2]

    def read(self, name: str) -> torch.Tensor:
        path, start, spec = self.entries[name]
        buffer = bytearray(spec.nbytes)
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(buffer) != spec.nbytes:
                raise UserError(f"{path} is truncated (tensor {name} runs past its end): re-download or re-export it")
        if not buffer:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return torch.frombuffer(buffer, dtype=spec.dtype).reshape(spec.shape)

    def read_all(self) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in self.entries}


def _read_header(path: Path) -> dict[str, tuple[int, TensorSpec]]:
    """{name: (absolute byte offset of its data, spec)} of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}): re-download or re-export it") from None
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spec = TensorSpec(name, tuple(entry["shape"]), CODE_DTYPES[entry["dtype"]])
        entries[name] = (8 + length + entry["data_offsets"][0], spec)
    return entries


# ----------------------------------------------------------------------------------------------------------------
# Checking a model directory's weights before anything is built from them
# ----------------------------------------------------------------------------------------------------------------


def check_safetensors_file(path: Path) -> None:
    """A readable header, and exactly as many data bytes as the header's tensors end at (catches truncation)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.path.getsize(path):
                raise ValueError(f"its header claims {length} bytes")
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError) as e:
        said = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable safetensors file ({said}): re-download or re-export it") from None
    expected, size = 8 + length + max(ends, default=0), path.stat().st_size
    if size < expected:
        raise UserError(
            f"{path} is truncated ({size:,} of {expected:,} bytes; an interrupted copy or download leaves this): "
            "copy, download or write it again"
        )


def check_model_weights(directory: str | os.PathLike) -> None:
    """A Hugging Face model directory has its weights, whole: the safetensors file or every file its index names,
    each with a readable header and all its bytes; or PyTorch .bin files (transformers reads them weights-only)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map): re-download the model") from None
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise UserError(
                f"{directory} lacks {len(missing)} weight file(s) its index names, e.g. {missing[0]}: the download "
                "is incomplete; download the model again"
            )
        files = [directory / name for name in names]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif any(directory.glob("pytorch_model*.bin")):
        return
    else:
        raise UserError(
            f"{directory} has config.json but no weights (model.safetensors, its index, or pytorch_model.bin): "
            "download the weights too, or point at a complete model directory"
        )
    for path in files:
        check_safetensors_file(path)


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint of a model directory
# ----------------------------------------------------------------------------------------------------------------

_SAMPLE_BYTES = 64 * 1024
_SAMPLES_PER_FILE = 32


def fingerprint(directory: str | os.PathLike) -> dict:
    """{file name: "size:sha256"} of config.json and every weight file of a model directory.

    A weight file's hash covers its size, its first and last 64 KiB (the safetensors header with every tensor's
    name, shape and offset) and 32 evenly spaced 64 KiB samples of its data: two different trainings of one
    architecture differ in every sample, and the whole costs ~2 MB of reads per file, whatever its size.
    """
    directory = Path(directory)
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    )
    result = {}
    for path in files:
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            if path.name == "config.json" or size <= (_SAMPLES_PER_FILE + 2) * _SAMPLE_BYTES:
                digest.update(f.read())
            else:
                offsets = [0, size - _SAMPLE_BYTES]
                offsets += [size * (i + 1) // (_SAMPLES_PER_FILE + 1) for i in range(_SAMPLES_PER_FILE)]
                for offset in offsets:
                    f.seek(offset)
                    digest.update(f.read(_SAMPLE_BYTES))
        result[path.name] = f"{size}:{digest.hexdigest()}"
    return result
