"""Paths and fsspec URLs alike: a store (and its token shards) may live on local disk, a shared
filesystem, or an object store (``s3://bucket/run``, ``gs://...``; the protocol's fsspec package,
e.g. ``s3fs``, must be installed). Local paths keep atomic renames; elsewhere a write is one put.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path


def is_url(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str):
    """``(fsspec filesystem, path within it)``; a clear error when the protocol's package is missing."""
    import fsspec

    from harvester.errors import HarvestError

    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as err:
        raise HarvestError(f"cannot open {path}: {str(err).splitlines()[0]}") from None


def output_dir(path, what: str = "--out", make: bool = True) -> Path:
    """A local output directory, made when ``make``; checked first, so that a refused run leaves
    nothing behind: a file in its place or in its parents' is a one-line error."""
    from harvester.errors import FAULTS, HarvestError

    out = Path(path).expanduser()
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise HarvestError(f"{what} {out}: {blocking} is a file, not a directory")
    if make:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if err.errno in FAULTS:
                raise  # a full or read-only disk, no permission: the CLI names it and what to do
            raise HarvestError(f"{what} {out} cannot be made: {err.strerror or err}") from None
    return out


def output_file(path, what: str = "--out", make: bool = True) -> Path:
    """A local output file's path, its directory made when ``make``: a directory in its place is a
    one-line error."""
    from harvester.errors import HarvestError

    out = Path(path).expanduser()
    if out.is_dir():
        raise HarvestError(f"{what} {out} is a directory; give a file name")
    output_dir(out.parent, f"the directory of {what}", make)
    return out


def read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist."""
    fsys, p = filesystem(path)
    try:
        with fsys.open(p, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


@contextlib.contextmanager
def atomic_write(path: str):
    """A binary file handle whose content appears at ``path`` only when the block succeeds."""
    fsys, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    if not is_local(fsys):
        with fsys.open(p, "wb") as f:  # object stores: a put is atomic
            yield f
        return
    fsys.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{p.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fsys.open(tmp, "wb") as f:
            yield f
        fsys.mv(tmp, p)
    except OSError as err:  # a full or read-only disk: name the file asked for, not its temporary name
        if err.filename in (None, tmp):
            err.filename = str(path)
        raise
    finally:
        if fsys.exists(tmp):
            fsys.rm(tmp)


def protocol(fsys) -> str:
    """The filesystem's main protocol name (``file``, ``s3``, ...)."""
    return fsys.protocol if isinstance(fsys.protocol, str) else fsys.protocol[0]


def is_local(fsys) -> bool:
    return "file" in (fsys.protocol if isinstance(fsys.protocol, tuple) else (fsys.protocol,))


def open_read(path: str):
    fsys, p = filesystem(path)
    return fsys.open(p, "rb")
