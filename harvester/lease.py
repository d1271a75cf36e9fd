"""One writer per store: a lease taken before anything is written, held while harvesting.

The lease of store ``DIR/NAME`` (a path or an fsspec URL) lives beside it, in ``DIR/.NAME.lease/``,
so it exists before the store does and works wherever the store does. It holds numbered generation
files ``{gen:08d}.json`` (owner id, host, pid, process start time, since, heartbeat). The highest
generation is the lease:

- taking it = creating the next generation file *only if absent* (``os.link`` of a complete file on
  local disks, fsspec ``open(..., "xb")`` on object stores that implement it atomically); of two
  processes that saw the same state, exactly one creates that file;
- the taker then lists again and keeps the lease only if no generation is higher and none below is
  still live, so a slow process acting on an old view backs off instead of sharing the store;
- a generation is stale when its process is gone (same host: the pid is dead, or reused by another
  process) or its heartbeat is older than ``STALE_AFTER`` seconds (another host); a stale lease is
  taken over by creating the next generation, which is race-free for the same reason;
- the owner refreshes its heartbeat every ``HEARTBEAT`` seconds from a daemon thread, and notices
  when a higher generation appeared (it lost the lease);
- releasing deletes the owner's generation file (and the directory once empty).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
import uuid

from harvester import fs
from harvester.errors import FAULTS, HarvestError

STALE_AFTER = 600.0
"""Seconds without a heartbeat after which a lease of another host is stale (10 minutes)."""
HEARTBEAT = 30.0
"""Seconds between the owner's heartbeats."""
_ATOMIC_CREATE = {"file", "local", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
"""fsspec protocols whose ``open(..., "xb")`` creates a file only if absent, atomically (s3fs >= 2025.7,
gcsfs, adlfs: conditional writes; local disks use ``os.link``)."""
_warned: set[str] = set()


def lease_dir(store: str) -> str:
    """``DIR/.NAME.lease`` for the store ``DIR/NAME`` (same filesystem, usable before the store exists)."""
    local = str(store)[len("file://"):] if str(store).startswith("file://") else None
    if not fs.is_url(str(store)) or local:
        path = os.path.realpath(local or store)  # one lease however the store is reached (links, file:// URLs)
        return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lease")
    path = str(store).rstrip("/")
    parent, _, name = path.rpartition("/")
    if not name or not parent or parent.endswith((":/", "://")):
        raise HarvestError(f"store {store} has no parent directory to hold its lease; use a sub-directory")
    return f"{parent}/.{name}.lease"


class LeaseHeld(HarvestError):
    """Another live harvest holds the store's lease."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _process_start(pid) in (None, start)


def _machine() -> str | None:
    """This boot of this machine and this pid namespace: containers that share a host name and a
    filesystem are told apart, so a pid is only looked up where it means something."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f"{f.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _here(info: dict) -> bool:
    """Whether ``info`` names a process whose pid can be looked up from here."""
    return (info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
            and info.get("machine", _machine()) == _machine())


def process_gone(info: dict) -> bool:
    """True when ``info`` names a process on this host that no longer runs."""
    return _here(info) and not _pid_alive(info["pid"], info.get("pid_start"))


def stale_reason(info: dict, now: float | None = None) -> str | None:
    """Why the lease record ``info`` no longer binds anyone (None while it does)."""
    if info.get("released"):
        return "released"
    if _here(info):
        if not _pid_alive(info["pid"], info.get("pid_start")):
            return f"process {info['pid']} on this host is gone"
        return None
    age = (now or _now()) - float(info.get("heartbeat", 0))
    if age > STALE_AFTER:
        return f"no heartbeat for {age / 60:.0f} minutes"
    return None


def describe(info: dict) -> str:
    since = info.get("since")
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"since {_iso(since) if isinstance(since, (int, float)) else '?'}")


class Lease:
    """The lease on one store, held by this process until :meth:`release`."""

    def __init__(self, store: str, gen: int, info: dict):
        self.store, self.gen, self.info = store, gen, info
        self.dir = lease_dir(store)
        self.lost: dict | None = None
        self._higher_seen = False
        self._lock = threading.Lock()  # a heartbeat write never lands after release() deleted the file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lsn-lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def owner(self) -> str:
        return self.info["owner"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - a failed heartbeat must not end the harvest by itself
                print(f"lsn: warning: lease heartbeat on {self.store} failed: {err}", file=sys.stderr)

    def refresh(self) -> None:
        """Write a new heartbeat, unless the lease was lost: its file is gone, or a higher generation
        was seen on two looks in a row (a process acting on an old listing creates one and backs off
        at once)."""
        with self._lock:
            if self._stop.is_set():
                return
            gens = _generations(self.dir)
            higher = [g for g in gens if g > self.gen]
            if self.gen not in gens or (higher and self._higher_seen):
                self.lost = _read(self.dir, higher[-1]) or {} if higher else {}
                return
            self._higher_seen = bool(higher)
            self.info["heartbeat"] = _now()
            fs.write_text(_file(self.dir, self.gen), json.dumps(self.info))

    def raise_if_lost(self) -> None:
        """Raise if a heartbeat found the lease taken over (no I/O: cheap in a dispatch loop)."""
        if self.lost is not None:
            raise HarvestError(f"lost the lease on store {self.store} to another harvest "
                               f"({describe(self.lost)}); this harvest stops")

    def check(self) -> None:
        """Look now (twice, a second apart, if a higher generation shows) and raise if the lease was lost."""
        for _ in range(2):
            if self.lost is None:
                self.refresh()
            if self.lost is not None or not self._higher_seen:
                break
            time.sleep(1.0)
        self.raise_if_lost()

    def release(self) -> None:
        self._stop.set()
        with self._lock:  # waits for a heartbeat being written; none starts after this
            if self.lost is None:
                fsys, p = fs.filesystem(self.dir)
                try:
                    _remove(self.dir, self.gen)
                    if fs.is_local(fsys) and not _generations(self.dir):
                        os.rmdir(p)
                except OSError:
                    pass  # the directory is shared; another harvest may already be taking it
        self._thread.join(timeout=5)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _file(directory: str, gen: int) -> str:
    return f"{directory}/{gen:08d}.json"


def _generations(directory: str) -> list[int]:
    fsys, p = fs.filesystem(directory)
    try:
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fsys.ls(p, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _read(directory: str, gen: int) -> dict | None:
    """The generation's record; None if it is gone. An unreadable record counts as live for its age."""
    path = _file(directory, gen)
    try:
        text = fs.read_text(path)
    except OSError:
        text = None
    if text is None:
        return None
    try:
        info = json.loads(text)
        if isinstance(info, dict):
            return info
    except ValueError:
        pass
    fsys, p = fs.filesystem(path)
    try:
        modified = fsys.modified(p).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        modified = _now()
    return {"host": "?", "pid": "?", "heartbeat": modified, "since": modified}


def create_exclusive(path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if nothing is there; False if something is. Atomic on local
    disks (a complete temporary file hard-linked into place) and where fsspec's ``xb`` is."""
    fsys, p = fs.filesystem(path)
    parent = p.rsplit("/", 1)[0]
    if fs.is_local(fsys):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{p.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)
            return True
        except FileExistsError:  # on NFS a retried link that did succeed says so too: its count tells
            return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)
    protocol = fs.protocol(fsys)
    if protocol not in _ATOMIC_CREATE and protocol not in _warned:
        _warned.add(protocol)
        print(f"lsn: warning: {protocol}:// has no create-if-absent write lsn knows to be atomic; the store lease "
              "there is best effort (two harvests started at the same moment may both write)", file=sys.stderr)
    try:
        with fsys.open(p, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no "xb" at all: look, then write
        if fsys.exists(p):
            return False
        fsys.pipe_file(p, data)
        return True


def owner_record(owner: str | None = None) -> dict:
    """Who this process is: owner id, host, pid (and its start time), since, heartbeat."""
    owner = owner or uuid.uuid4().hex
    t = _now()
    return {"owner": owner, "host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "since": t, "heartbeat": t}


def acquire(store: str, say=None) -> Lease:
    """Take the lease on ``store`` or raise :class:`LeaseHeld` naming its live owner.

    ``say(text)`` reports a takeover of a stale lease."""
    directory = lease_dir(store)
    info = owner_record()
    for _ in range(20):
        gens = _generations(directory)
        top = _read(directory, gens[-1]) if gens else None
        if gens and top is None:
            continue  # released just now: look again
        reason = stale_reason(top) if top is not None else None
        if top is not None and reason is None:
            raise LeaseHeld(_held_message(store, top))
        gen = gens[-1] + 1 if gens else 0
        try:
            created = create_exclusive(_file(directory, gen), json.dumps(info).encode())
        except OSError as err:  # a read-only or full disk, missing permissions
            if err.errno in FAULTS:
                raise  # the CLI names the file and what to do
            raise HarvestError(f"cannot take the lease on store {store} ({directory}): "
                               f"{err.strerror or err}") from None
        if not created:
            continue  # another process took this generation first: look at it
        try:
            if not _still_ours(directory, gen):
                _remove(directory, gen)
                continue
            if top is not None and reason != "released" and say:
                say(f"took over the stale lease on store {store} ({describe(top)}: {reason})")
            for old in (g for g in _generations(directory) if g < gen):
                _remove(directory, old)
            return Lease(store, gen, info)
        except BaseException:  # a signal or an error after the file was made: it must not bind anyone
            _remove(directory, gen)
            raise
    raise HarvestError(f"could not take the lease on store {store}: other harvests keep taking it")


def _still_ours(directory: str, gen: int) -> bool:
    """No higher generation, and none below that still binds its owner."""
    for other in _generations(directory):
        if other > gen:
            return False
        if other < gen:
            info = _read(directory, other)
            if info is not None and stale_reason(info) is None:
                return False
    return True


def _remove(directory: str, gen: int) -> None:
    fsys, p = fs.filesystem(_file(directory, gen))
    try:
        fsys.rm(p)
    except FileNotFoundError:
        pass


def _held_message(store: str, info: dict) -> str:
    beat = info.get("heartbeat")
    age = f", last heartbeat {max(0, _now() - beat):.0f} s ago" if isinstance(beat, (int, float)) else ""
    return (f"store {store} is being written by another harvest ({describe(info)}{age}); "
            "wait for it to finish, or stop it and run this command again to resume")
