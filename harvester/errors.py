"""The one exception type the CLI turns into a clear one-line error, and the one line of a real
filesystem fault (a full disk, a read-only filesystem, missing permissions) met anywhere."""

from __future__ import annotations

import contextlib
import errno
import os
import re


class HarvestError(Exception):
    """A user-facing error: bad input, an incompatible store, an unsupported model.

    The CLI prints ``lsn: error: <message>`` and exits non-zero, without a traceback.
    """


FAULTS = {errno.ENOSPC: "out of space", errno.EDQUOT: "over the disk quota", errno.EROFS: "read-only filesystem",
          errno.EACCES: "no permission", errno.EPERM: "not permitted", errno.EIO: "input/output error"}
"""The faults of the filesystem itself, not of the input: each becomes one line naming the file and what
to do. Other ``OSError``\\ s (a missing input, a file where a directory belongs) are the callers' to name."""
_WRITING = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# how an OSError raised in a Ray actor's constructor survives: as the last line of its traceback's text
_RAY_TEXT = re.compile(r"^\w*Error: \[Errno (\d+)\] ([^\n]*?)(?:: '([^'\n]*)')?$", re.M)


def fault_of(err: BaseException) -> OSError | None:
    """The filesystem fault behind ``err``: itself, or the first along its causes (``raise ... from``,
    an error raised while handling it, Ray's ``cause`` of an error raised in a task or an actor's method);
    None when there is none. Of an error in a Ray actor's constructor only the text survives."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FAULTS:
            return err
        if type(err).__module__.startswith("ray.") and getattr(err, "cause", None) is None:
            found = [m for m in _RAY_TEXT.finditer(str(err)) if int(m[1]) in FAULTS]
            if found:
                return OSError(int(found[-1][1]), found[-1][2], found[-1][3])
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def explain(err: OSError, places: list[tuple[str, str]] = (), resumable: bool = False) -> str:
    """One line: ``<fault> writing|reading FILE: <strerror>; <next step>``.

    ``places`` are ``(flag, path)`` of the command, what it writes first: the flag to change is the one
    whose path holds the file, and an error that names no file (a write or close that failed) is
    placed in the first. ``resumable``: finished work is kept for the same command run again."""
    path = _named(err, places)
    where = f" {os.fspath(path)}" if path is not None else ""
    verb = _verb(err, path)
    flag = next((f for f, p in places if path is not None and _inside(path, p)), None)
    again = "run the same command again" + (" (finished shards are kept)" if resumable else "")
    other = f"choose a writable {flag}" if flag else "choose a writable location"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        step = f"free space, then {again}"
    elif err.errno == errno.EROFS:
        step = f"{other}, or remount its filesystem read-write and {again}"
    elif err.errno == errno.EIO:
        step = f"check the device (the kernel log says more), then {again}"
    elif verb == "reading":
        step = f"make it readable by this user{f', or pass another {flag}' if flag else ''}"
    else:
        target = path if path is not None and os.path.isdir(path) else os.path.dirname(os.fspath(path or "")) or "."
        step = f"fix the permissions of {target} and {again}, or {other}"
    return f"{FAULTS[err.errno]} {verb}{where}: {err.strerror or os.strerror(err.errno)}; {step}"


@contextlib.contextmanager
def naming_files(*places: str):
    """A filesystem fault raised in the block that names no file is given the one its traceback shows
    under ``places`` (as :func:`explain` would find it), while the traceback is at hand: an error of a
    Ray task or actor reaches the driver without it."""
    try:
        yield
    except OSError as err:
        if err.errno in FAULTS and err.filename is None:
            err.filename = os.fspath(_named(err, [("", p) for p in places]))
        raise


def _named(err: OSError, places: list[tuple[str, str]]):
    """The file ``err`` names; else (a write or close that failed: zarr's, numpy's, pandas' writers) the
    ``path`` of the innermost frame of its traceback that has one inside the command's places; else the
    first place."""
    if err.filename is not None:
        return err.filename
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        path = frame.f_locals.get("path")
        if isinstance(path, (str, os.PathLike)) and any(_inside(path, p) for _, p in places):
            return path
    return places[0][1] if places else None


def _verb(err: OSError, path) -> str:
    """Writing for a full or read-only disk; reading for a file or directory this user cannot read."""
    if err.errno == errno.EIO:
        return "accessing"
    if err.errno in _WRITING or path is None:
        return "writing"
    if os.path.exists(path) and not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        return "reading"
    return "writing"


def _inside(path, place: str) -> bool:
    """Whether ``path`` is ``place``, under it, or under a hidden sibling of it made while writing it
    (``.NAME.partial-*``, ``.NAME.lease``, ``.NAME.tmp-*``)."""
    path, place = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(place))
    first = os.path.relpath(path, os.path.dirname(place)).split(os.sep)[0]
    name = os.path.basename(place)
    return first == name or first.startswith(f".{name}.")
