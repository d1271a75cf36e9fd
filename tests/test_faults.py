"""Real filesystem faults (issue 15, item 7): a full disk, a read-only filesystem, a directory or file
this user may not touch, a damaged mask, a signal, each met by a real ``lsn`` process, end in one line
that names the file and the next step, exit 2 (130/143 for a signal), no traceback; the harvest resumes
once the cause is fixed and ends with a clean run's numbers.

The faults are made, not mocked: a small tmpfs in a private mount namespace (``unshare -m``), a
read-only bind mount there, root without its capabilities to override file modes (``setpriv``),
``/dev/full``. Where the machine cannot make one, its tests are skipped, saying why.
"""

from __future__ import annotations

import io
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from lsn.cli import main
from tests.helpers import assert_group_ends, assert_same_totals

HARVEST = ["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=20,langs=en+de", "--seq-len", "64",
           "--shard-tokens", "512", "--no-progress"]
SHARDS = 6  # of that harvest
LSN = [sys.executable, "-m", "harvester"]
RAY_NOISE = "WARNING authentication_token_setup"  # Ray's own line at start, not lsn's


def _env() -> dict:
    """This session's environment (its model cache, offline), and the same threads in every process: the
    same rounding."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _works(script: str) -> bool:
    try:
        return subprocess.run(["sh", "-c", script], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _probe_mounts() -> bool:
    """A private mount namespace with a tmpfs and a read-only bind mount in it (root, CAP_SYS_ADMIN)."""
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as d:
        return _works(f"unshare -m sh -c 'mount -t tmpfs -o size=8k tmpfs {d} && mount --bind {d} {d} "
                      f"&& mount -o remount,bind,ro {d} && ! touch {d}/x 2>/dev/null'")


def _probe_unprivileged() -> list[str] | None:
    """The command prefix that runs a process for which file modes hold: none for a normal user; for root,
    ``setpriv`` dropping the capabilities that override them; None when neither can be had."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if not shutil.which("setpriv"):
        return None
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o500)
        return prefix if _works(f"{shlex.join(prefix)} sh -c '! touch {d}/x 2>/dev/null'") else None


MOUNTS = _probe_mounts()
UNPRIVILEGED = _probe_unprivileged()
needs_mounts = pytest.mark.skipif(not MOUNTS, reason="needs a private mount namespace with tmpfs and read-only "
                                  "bind mounts (unshare -m as root with CAP_SYS_ADMIN)")
needs_modes = pytest.mark.skipif(UNPRIVILEGED is None, reason="needs a process for which file modes hold: a "
                                 "normal user, or root able to drop CAP_DAC_OVERRIDE with setpriv")


def lsn(*argv, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *LSN, *map(str, argv)], capture_output=True, text=True, timeout=600, env=_env())


def lsn_in_namespace(setup: str, *argv, after: str = ":") -> subprocess.CompletedProcess:
    """``lsn ARGV`` in a private mount namespace made by the shell commands ``setup``; ``after`` runs
    there once lsn exited (its mounts vanish with it); the exit status is lsn's."""
    script = f"set -e; {setup}; set +e; {shlex.join([*LSN, *map(str, argv)])}; rc=$?; {after}; exit $rc"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env=_env())


def one_line(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """The exit status, and stderr exactly one line (Ray's start-up note aside), holding every word."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if RAY_NOISE not in line]
    assert len(lines) == 1, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def tmpfs(mnt: Path, size: int, free: int | None = None) -> str:
    """Shell commands: a tmpfs of ``size`` bytes at ``mnt``, filled up to ``free`` bytes when given."""
    mount = f"mount -t tmpfs -o size={size} tmpfs {mnt}"
    if free is None:
        return mount
    return f"{mount} && dd if=/dev/zero of={mnt}/fill bs=4096 count={(size - free) // 4096} 2>/dev/null"


def footprint(path: Path) -> int:
    """Bytes a tree takes on a tmpfs (whole pages per file)."""
    return sum(math.ceil(p.stat().st_size / 4096) * 4096 for p in path.rglob("*") if p.is_file())


def done_shards(store: Path) -> int:
    """Shards marked done: one chunk each, written last (the array's capacity is millions: not read whole)."""
    done = zarr.open_group(str(store), mode="r")["shards/done"]
    chunks = store / "shards" / "done" / "c"
    return sum(bool(done[int(p.name)]) for p in chunks.iterdir()) if chunks.is_dir() else 0


def left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The store of an uninterrupted harvest, in a process like the others."""
    store = tmp_path_factory.mktemp("clean") / "S"
    proc = lsn(*HARVEST, "--no-ray", "--store", store)
    assert proc.returncode == 0, proc.stderr
    return store


@pytest.fixture(scope="module")
def mask(clean) -> Path:
    path = clean.parent / "lape.npz"
    assert main(["analyze", "lape", "--store", str(clean), "--out", str(path), "--top-rate", "0.2"]) == 0
    return path


# -- a full disk ---------------------------------------------------------------------------------------
@needs_mounts
def test_full_disk_mid_harvest_then_resume_elsewhere(clean, tmp_path):
    """The harvest fills a tmpfs part way; the store, moved where there is room, resumes to a clean run's
    totals and verifies without a problem."""
    mnt, roomy = tmp_path / "small", tmp_path / "roomy"
    mnt.mkdir()
    roomy.mkdir()
    size = footprint(clean) * 7 // 10 // 4096 * 4096
    proc = lsn_in_namespace(tmpfs(mnt, size), *HARVEST, "--no-ray", "--store", mnt / "S",
                            after=f"cp -a {mnt}/. {roomy}/")
    line = one_line(proc, "out of space writing", "No space left on device",
                    "; free space, then run the same command again (finished shards are kept)")
    assert re.search(rf"writing {re.escape(str(mnt))}/(S|\.S\.\S+)/\S+: ", line), line
    assert 0 < done_shards(roomy / "S") < SHARDS, "the disk did not fill mid-run: size the tmpfs again"
    again = lsn(*HARVEST, "--no-ray", "--store", roomy / "S")
    assert again.returncode == 0, again.stderr
    check = lsn("verify", roomy / "S")
    assert check.returncode == 0 and "no problem found" in check.stdout, check.stdout + check.stderr
    assert_same_totals(clean, roomy / "S")


@needs_mounts
def test_full_disk_writing_a_mask_leaves_nothing(clean, tmp_path):
    mnt = tmp_path / "m"
    mnt.mkdir()
    proc = lsn_in_namespace(tmpfs(mnt, 64 << 10, free=0), "analyze", "lape", "--store", clean, "--out", mnt / "m.npz",
                            after=f"ls -A {mnt} > {tmp_path}/left")
    one_line(proc, f"out of space writing {mnt}/m.npz: No space left on device; free space, then run the same "
             "command again")
    assert (tmp_path / "left").read_text().split() == ["fill"]  # no mask, no temporary file


@needs_mounts
def test_full_disk_writing_report_plots_leaves_whole_files(mask, tmp_path):
    """Room for the CSV tables, not for the first PNG: the tables are whole, no PNG or report.md appears."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    proc = lsn_in_namespace(tmpfs(mnt, 64 << 10, free=5 * 4096), "report", "--mask", mask, "--out", mnt / "rep",
                            after=f"cp -a {mnt}/rep {tmp_path}/rep")
    one_line(proc, f"out of space writing {mnt}/rep/counts.png: No space left on device; free space")
    assert left(tmp_path / "rep") == ["appear.csv", "counts.csv", "overlap.csv", "overlap_jaccard.csv"]
    assert (tmp_path / "rep" / "counts.csv").read_text().startswith("language,layer_0")


@needs_mounts
def test_full_disk_writing_ppl_tables(mask, tmp_path):
    mnt = tmp_path / "m"
    mnt.mkdir()
    proc = lsn_in_namespace(tmpfs(mnt, 64 << 10, free=0), "intervene", "ppl", "--model", "tiny:llama",
                            "--mask", mask, "--corpus", "sample:docs=2,langs=en+de", "--controls", "0",
                            "--out", mnt / "o", "--no-ray", "--no-progress", after=f"ls -A {mnt}/o > {tmp_path}/left")
    one_line(proc, f"out of space writing {mnt}/o/ppl.csv: No space left on device; free space")
    assert (tmp_path / "left").read_text().split() == []  # no table, no temporary file


@pytest.mark.ray
def test_a_write_to_a_full_device_in_a_ray_actor():
    """Ray hands an actor's error to the driver wrapped: a method's as RayTaskError (the OSError its
    ``cause``), a constructor's as ActorDiedError (only its text); both are found and read alike."""
    ray = pytest.importorskip("ray")
    from harvester.driver import ray_init
    from harvester.errors import explain, fault_of

    started = ray_init(None)
    try:
        actor = ray.remote(max_restarts=0, num_cpus=0)(FullDeviceWriter)
        for at_start in (False, True):
            with pytest.raises(Exception) as caught:
                ray.get(actor.remote(at_start).write.remote())
            fault = fault_of(caught.value)
            assert fault is not None, caught.value
            assert explain(fault, [("--out", "/dev/full")]) == (
                "out of space writing /dev/full: No space left on device; free space, then run the same command "
                "again")
    finally:
        if started:
            ray.shutdown()


class FullDeviceWriter:
    """Writes to ``/dev/full`` (every write there fails with ENOSPC), in its constructor or in a method."""

    def __init__(self, at_start: bool):
        if at_start:
            self.write()

    def write(self) -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"x")


@pytest.mark.ray
@needs_mounts
def test_full_disk_mid_harvest_with_ray(tmp_path):
    """The same line from a Ray actor or task as without Ray: the file named, the same next step."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = lsn_in_namespace(tmpfs(mnt, 200 << 10), *HARVEST, "--store", mnt / "S")
    line = one_line(proc, "out of space writing", "; free space, then run the same command again (finished "
                    "shards are kept)")
    assert re.search(rf"writing {re.escape(str(mnt))}/(S|\.S\.\S+)/\S+: No space left on device;", line), line


# -- a read-only filesystem ------------------------------------------------------------------------------
@needs_mounts
def test_read_only_filesystem(clean, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    bind = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}"
    one_line(lsn_in_namespace(bind, *HARVEST, "--no-ray", "--store", ro / "S"),
             f"read-only filesystem writing {ro}/.S.lease: Read-only file system; choose a writable --store, or "
             "remount its filesystem read-write and run the same command again (finished shards are kept)")
    one_line(lsn_in_namespace(bind, "analyze", "lape", "--store", clean, "--out", ro / "m.npz"),
             f"read-only filesystem writing {ro}/m.npz: Read-only file system; choose a writable --out")
    assert left(ro) == []


# -- no permission ---------------------------------------------------------------------------------------
@needs_modes
def test_no_permission_to_write_then_fixed(clean, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_line(lsn(*HARVEST, "--no-ray", "--store", locked / "S", prefix=UNPRIVILEGED),
                    f"no permission writing {locked}/.S.lease: Permission denied; fix the permissions of {locked} "
                    "and run the same command again (finished shards are kept), or choose a writable --store")
    assert left(locked) == [], line
    locked.chmod(0o700)
    again = lsn(*HARVEST, "--no-ray", "--store", locked / "S", prefix=UNPRIVILEGED)
    assert again.returncode == 0, again.stderr
    assert_same_totals(clean, locked / "S")


@needs_modes
def test_no_permission_to_read_a_mask(mask, tmp_path):
    hidden = tmp_path / "hidden.npz"
    shutil.copy(mask, hidden)
    hidden.chmod(0)
    one_line(lsn("report", "--mask", hidden, "--out", tmp_path / "r", prefix=UNPRIVILEGED),
             f"no permission reading {hidden}: Permission denied; make it readable by this user, or pass another "
             "--mask")
    assert not (tmp_path / "r").exists()


# -- a damaged mask file ---------------------------------------------------------------------------------
def _rewrite_meta(path: Path, edit) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays = edit(arrays)
    np.savez(path, **arrays)


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "BadZipFile"),
    "empty": (lambda p: p.write_bytes(b""), "EOFError"),
    "garbage": (lambda p: p.write_bytes(b"\x00garbage" * 64), "not a NumPy .npz archive"),
    "a flipped byte": (lambda p: p.write_bytes(_flip(p.read_bytes())), "BadZipFile: Bad CRC-32|error: Error -3"),
    "meta not JSON": (lambda p: _rewrite_meta(p, lambda a: {**a, "meta": np.array("{'format': lsn")}),
                      "JSONDecodeError"),
    "meta not a string": (lambda p: _rewrite_meta(p, lambda a: {**a, "meta": np.arange(3)}), "is not an lsn mask file"),
    "no selections": (lambda p: _rewrite_meta(p, lambda a: {"meta": a["meta"]}), "KeyError"),
}


def _flip(data: bytes) -> bytes:
    """One bit flipped in the middle of the first member's compressed bytes (its metadata)."""
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    at = info.header_offset
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
    out = bytearray(data)
    out[start + info.compress_size // 2] ^= 0x10
    return bytes(out)


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_mask_is_one_line_for_every_reader(mask, tmp_path, capsys, damage):
    bad = tmp_path / "bad.npz"
    shutil.copy(mask, bad)
    spoil, reason = DAMAGE[damage]
    spoil(bad)
    out = tmp_path / "out"
    for argv in (["report", "--mask", bad, "--out", out],
                 ["analyze", "random", "--mask", bad, "--out", out / "r.npz"],
                 ["mask", "export", bad, out / "m.pt"],
                 ["intervene", "ppl", "--model", "tiny:llama", "--mask", bad, "--corpus", "sample:docs=2,langs=en",
                  "--out", out, "--no-ray"],
                 ["finetune", "--model", "tiny:llama", "--mask", bad, "--lang", "en", "--task", "clm",
                  "--data", "sample:docs=2,langs=en", "--out", out, "--no-ray"]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        line = one_line(subprocess.CompletedProcess(argv, 2, "", err), f"lsn: error: {bad} is not an lsn mask "
                        "file, or it is damaged (", "); write it again (lsn analyze), or pass another mask")
        assert re.search(reason, line), line
        assert not out.exists()


# -- signals to long runs --------------------------------------------------------------------------------
def _handles(pid: int, sig: int) -> bool:
    """Whether the process has its own handler for ``sig`` (lsn's graceful stop is installed)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def _stop(argv, sig, after: float) -> subprocess.Popen:
    proc = subprocess.Popen([*LSN, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=_env())
    deadline = time.time() + 60
    while not _handles(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(after)  # somewhere inside the run: each moment must stop cleanly
    assert proc.poll() is None, f"it ended before the signal: {proc.communicate()}"
    proc.send_signal(sig)
    return proc


def _stopped_cleanly(proc: subprocess.Popen, sig) -> None:
    _, err = proc.communicate(timeout=120)
    one_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err),
             f"lsn: stopped by {sig.name}; finished work is kept", code=128 + sig)
    assert_group_ends(proc.pid, "a process it started (Dask's workers)")


@pytest.mark.parametrize("sig, after, cluster", [(signal.SIGINT, 0.5, []), (signal.SIGTERM, 1.5, []),
                                                 (signal.SIGTERM, 0.3, ["--local-cluster", "1"])])
def test_signal_stops_analyze(clean, tmp_path, sig, after, cluster):
    """Threaded, and while a Dask LocalCluster starts (a stop mid-computation on one is clean too, but
    Dask's workers log their cancelled tasks on stderr)."""
    proc = _stop(["analyze", "lape", "--store", clean, "--out", tmp_path / "m.npz", *cluster], sig, after)
    _stopped_cleanly(proc, sig)
    assert left(tmp_path) == []  # no mask, no temporary file


@pytest.mark.parametrize("sig, after", [(signal.SIGINT, 2.0), (signal.SIGTERM, 4.0)])
def test_signal_stops_intervene(mask, tmp_path, sig, after):
    out = tmp_path / "o"
    proc = _stop(["intervene", "ppl", "--model", "tiny:llama", "--mask", mask, "--corpus", "sample:docs=8,langs=en+de",
                  "--out", out, "--no-ray", "--no-progress"], sig, after)
    _stopped_cleanly(proc, sig)
    assert not out.exists() or not [p for p in out.iterdir() if ".tmp-" in p.name]

