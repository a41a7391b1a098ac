"""Atomic writes: every file and directory longctx writes appears under its final name only when complete.

A file is written to `<name>.partial` beside its target and renamed over it (`os.replace` is atomic within a
file system), so a reader, a resumed run or a kill -9 never sees half of one. A directory is built under
`<name>.tmp-<pid>` and moved into place the same way (`replace_dir`); an existing target is removed only after the
new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


def tmp_name(path: str | os.PathLike) -> Path:
    """The temporary name that a file is written under: beside it, the same in every run, so that a write a kill -9
    interrupted leaves one stale file that the next write of the same file replaces (not one per process)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def tmp_dir_name(path: str | os.PathLike) -> Path:
    """The temporary name that a directory is built under: beside it, unique to this process."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """`with open_atomic(p) as f: ...` writes p only if the block completes; on an exception p is untouched."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with open_atomic(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = True) -> None:
    with open_atomic(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """A matplotlib figure saved as PNG under its final name only when complete."""
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format="png", **savefig_kwargs)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished directory `tmp` to `out`; an existing `out` is removed only once the new one is in place."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` fill tmp; on success it becomes `out`, on an exception it is deleted and
    `out` is exactly as before (absent stays absent; an existing directory, replaced only with overwrite, stays)."""
    out = Path(out)
    tmp = tmp_dir_name(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} appeared while it was being written")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
