"""Corpus readers: stream documents, in a fixed order, from text directories, JSONL (.gz/.zst), parquet and
Hugging Face datasets saved with `save_to_disk`.

`iter_source(path, ...)` yields, per source item, either the document's text (a str, possibly empty) or a
`Skipped` record (a file that is not UTF-8). Yielding the skips in the stream, rather than counting them on the
side, lets the packer count them exactly once even when a resumed run replays the stream.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


@dataclass(frozen=True)
class Skipped:
    """A source item that was not read: `where` names it (file or file:line), `reason` says why."""

    where: str
    reason: str


def check_inputs(paths: list[str]) -> None:
    """Every input exists (before anything is written)."""
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"input {p} does not exist: check the path (a text directory, .jsonl[.gz|.zst], .parquet)")


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def iter_source(path: str | Path, *, glob: str = "**/*", text_field: str = "text", strict: bool = False):
    """Documents of one input, in a deterministic order (sorted file names; file order; row order)."""
    path = Path(path)
    if path.is_dir():
        if _is_hf_dataset(path):
            yield from _iter_hf_dataset(path, text_field)
        else:
            yield from _iter_text_dir(path, glob, strict)
    elif path.name.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(path, text_field, strict)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    elif path.is_file():
        yield from _iter_text_files([path], strict)
    else:
        raise UserError(f"input {path} does not exist: check the path (a text directory, .jsonl[.gz|.zst], .parquet)")


def _iter_text_dir(directory: Path, glob: str, strict: bool):
    files = sorted(p for p in directory.glob(glob) if p.is_file())
    yield from _iter_text_files(files, strict)


def _iter_text_files(files: list[Path], strict: bool):
    for file in files:
        raw = file.read_bytes()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise UserError(
                    f"{file} is not UTF-8 (byte {e.start}): convert it, or drop --strict to skip such files"
                ) from None
            yield Skipped(str(file), "not UTF-8")


def _open_jsonl(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _iter_jsonl(path: Path, text_field: str, strict: bool):
    with _open_jsonl(path) as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if strict:
                    raise UserError(
                        f"{path}:{line_number}: line is not UTF-8: fix it, or drop --strict to skip such lines"
                    ) from None
                yield Skipped(f"{path}:{line_number}", "not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(
                    f"{path}:{line_number}: no {text_field!r} field: set --text-field to the field holding the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not text: "
                    "set --text-field to a string field"
                )
            yield text


def _iter_parquet(path: Path, text_field: str):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a file that is not parquet
        raise UserError(f"{path} is not a readable parquet file ({e}): check the file") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path} has no column {text_field!r} (columns: {columns}): set --text-field to the text one")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield text or ""


def _iter_hf_dataset(path: Path, text_field: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for split in splits:
        if text_field not in split.column_names:
            raise UserError(
                f"dataset {path} has no column {text_field!r} (columns: {split.column_names}): "
                "set --text-field to the text column"
            )
        for batch in split.select_columns([text_field]).iter(batch_size=1024):
            for text in batch[text_field]:
                yield text or ""


def iter_corpus(paths: list[str], *, glob: str, text_field: str, strict: bool) -> Iterator[tuple[int, str | Skipped]]:
    """(input index, item) over every input in order."""
    for index, p in enumerate(paths):
        for item in iter_source(p, glob=glob, text_field=text_field, strict=strict):
            yield index, item
