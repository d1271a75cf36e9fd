"""One writer per store, as a user meets it: racing harvests, kills, stale and live leases, signals,
an fsspec store killed while it is created, and token shards of another harvest.

Real processes (``python -m harvester harvest --no-ray``), real kills, real stores on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
import zarr

from harvester import lease
from lsn.cli import main
from harvester.store import creating_marker, read_attrs
from tests.helpers import assert_group_ends, assert_same_totals, tree_digest

SMALL = "sample:docs=20,langs=en+de"
LARGE = "sample:docs=80,langs=en+de"  # ~80 shards: a few seconds of work to interrupt
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is fastest, and stays fast on busy cores
ARGS = ["--model", "tiny:llama", "--seq-len", "32", "--batch-size", "4", "--shard-tokens", "128", "--no-progress"]


def command(store, corpus, *extra) -> list[str]:
    return [sys.executable, "-m", "harvester", "harvest", "--store", str(store), "--corpus", corpus, *ARGS,
            "--no-ray", *extra]


def start(store, corpus, *extra) -> subprocess.Popen:
    return subprocess.Popen(command(store, corpus, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=ENV)


def run(store, corpus, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(store, corpus, *extra), capture_output=True, text=True, timeout=300, env=ENV)


def corpus_meta(store) -> dict:
    return zarr.open_group(str(store), mode="r").attrs["lsn"]["meta"]["corpus"]


def done_shards(store: Path) -> int:
    chunks = store / "shards" / "done" / "c"
    return sum(p.name.isdigit() for p in chunks.iterdir()) if chunks.is_dir() else 0


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.02) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the harvest ended too early: {proc.stderr.read()}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if "WARNING authentication_token_setup" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """``clean(corpus)``: the store of an uninterrupted, unshared harvest of ``corpus`` (made once)."""
    root = tmp_path_factory.mktemp("clean")

    @lru_cache(maxsize=None)
    def make(corpus: str) -> Path:
        store = root / f"s{len(os.listdir(root))}"
        proc = run(store, corpus)  # in a process like the others: same threads, same rounding
        assert proc.returncode == 0, proc.stderr
        return store

    return make


def assert_same_harvest(store: Path, reference: Path) -> None:
    """Same corpus (tokens per group, digest) and bit-identical totals."""
    got, want = corpus_meta(store), corpus_meta(reference)
    assert (got["tokens_per_group"], got["digest"], got["spec"]) == (want["tokens_per_group"], want["digest"], want["spec"])
    assert zarr.open_group(str(store), mode="r").attrs["lsn"]["complete"] is True
    assert_same_totals(store, reference)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(store: Path, gen: int, **record) -> Path:
    path = Path(lease.lease_dir(str(store))) / f"{gen:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path.write_text(json.dumps({"owner": "someone", "host": socket.gethostname(), "since": now, "heartbeat": now,
                                **record}))
    return path


# -- two writers -------------------------------------------------------------------------------
def test_racing_harvests_with_different_corpora(tmp_path, clean):
    """Two harvests started together into the same new path: one writes the store, the other is told
    who holds it and changes nothing; the store holds only the winner's corpus."""
    store = tmp_path / "store"
    first = start(store, f"{SMALL},seed=0")
    second = start(store, f"{SMALL},seed=1")
    results = [(p, p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    won = [r for r in results if r[1] == 0]
    lost = [r for r in results if r[1] != 0]
    assert len(won) == 1 and len(lost) == 1, [(r[1], r[2]) for r in results]
    assert lost[0][1] == 2
    line = one_line(lost[0][2])
    assert "is being written by another harvest" in line and f"host {socket.gethostname()}" in line
    assert f"pid {won[0][0].pid}" in line
    seed = 0 if won[0][0] is first else 1
    assert_same_harvest(store, clean(f"{SMALL},seed={seed}"))
    assert not Path(lease.lease_dir(str(store))).exists(), "the winner left its lease behind"


def test_live_lease_is_refused_and_nothing_changes(tmp_path, clean):
    store = tmp_path / "store"
    shutil.copytree(clean(SMALL), store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root.attrs["lsn"] = {**root.attrs.asdict()["lsn"], "complete": False}  # would be resumed
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = write_lease(store, 4, pid=sleeper.pid, pid_start=lease._process_start(sleeper.pid))
        for record in (path.read_text(), json.dumps({"owner": "x", "host": "node-7", "pid": 1, "since": time.time(),
                                                      "heartbeat": time.time() - 60})):
            path.write_text(record)
            before = tree_digest(store), tree_digest(path.parent)
            proc = run(store, SMALL)
            assert proc.returncode == 2
            line = one_line(proc.stderr)
            pid = json.loads(record)["pid"]
            assert "is being written by another harvest" in line and f"pid {pid}," in line and "since 20" in line
            assert (tree_digest(store), tree_digest(path.parent)) == before
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("record", ["dead pid", "old heartbeat"])
def test_stale_lease_is_taken_over(tmp_path, clean, record):
    store = tmp_path / "store"
    if record == "dead pid":
        write_lease(store, 2, pid=dead_pid())
    else:
        write_lease(store, 2, host="node-7", pid=1, heartbeat=time.time() - lease.STALE_AFTER - 60)
    proc = run(store, SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "took over the stale lease" in proc.stderr
    assert ("is gone" if record == "dead pid" else "no heartbeat for 11 minutes") in proc.stderr
    assert_same_harvest(store, clean(SMALL))
    assert not Path(lease.lease_dir(str(store))).exists()


def test_only_one_process_takes_over_a_stale_lease(tmp_path):
    """Six processes find the same stale lease at the same moment: exactly one takes it."""
    store = tmp_path / "store"
    write_lease(store, 0, pid=dead_pid())
    go = time.time() + 2.0
    code = ("import sys, time; from harvester import lease\n"
            f"time.sleep(max(0, {go} - time.time()))\n"
            "try:\n"
            f"    held = lease.acquire({str(store)!r})\n"
            "except lease.LeaseHeld:\n"
            "    print('refused'); sys.exit(0)\n"
            "print('took', held.gen); sys.stdout.flush(); time.sleep(3); held.release()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs == ["refused"] * 5 + ["took 1"], outputs


# -- crashes and signals ------------------------------------------------------------------------
def test_kill_9_of_the_owner_then_resume(tmp_path, clean):
    store = tmp_path / "store"
    proc = start(store, LARGE)
    wait_for(lambda: done_shards(store) >= 10, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = json.loads(next(Path(lease.lease_dir(str(store))).glob("*.json")).read_text())
    assert left["pid"] == proc.pid  # the lease of the dead owner is still there
    again = run(store, LARGE)
    assert again.returncode == 0, again.stderr
    assert f"took over the stale lease on store {store} (host {socket.gethostname()}, pid {proc.pid}" in again.stderr
    assert_same_harvest(store, clean(LARGE))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_gracefully_then_resume(tmp_path, clean, sig, code):
    store = tmp_path / "store"
    proc = start(store, LARGE)
    wait_for(lambda: done_shards(store) >= 10, proc)
    proc.send_signal(sig)  # to the harvest's own pid only
    rc, err = proc.wait(timeout=60), proc.stderr.read()
    assert rc == code, err  # what it printed, if it ever ends otherwise
    line = one_line(err)
    assert line.startswith(f"lsn: stopped by {sig.name};") and "run the same command again to resume" in line
    assert not Path(lease.lease_dir(str(store))).exists(), "the lease was not released"
    finished = done_shards(store)
    assert 10 <= finished < corpus_meta(clean(LARGE))["shards"]
    again = run(store, LARGE)
    assert again.returncode == 0, again.stderr
    assert_same_harvest(store, clean(LARGE))


@pytest.mark.ray
def test_sigterm_with_ray(tmp_path):
    """With the embedded Ray instance: 143, one line (no C stack dump), and Ray's processes are gone."""
    store = tmp_path / "store"
    cmd = [a for a in command(store, LARGE, "--actors", "2") if a != "--no-ray"]  # one actor would run in-process
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=ENV)
    wait_for(lambda: done_shards(store) >= 3, proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    line = one_line(proc.stderr.read())
    assert line.startswith("lsn: stopped by SIGTERM;")
    assert_group_ends(proc.pid, "Ray's processes")
    assert not Path(lease.lease_dir(str(store))).exists()


def test_fsspec_store_killed_while_created_then_resumed(tmp_path, clean):
    """A file:// store built in place, killed between its first file and its attributes: the next run
    recognises the half-made skeleton, rebuilds it and ends with the clean run's numbers."""
    store = tmp_path / "store"
    url = f"file://{store}"
    marker = Path(creating_marker(str(store)))
    proc = start(url, SMALL)
    wait_for(lambda: (store / "zarr.json").exists() or (store / "group").exists(), proc, poll=0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert marker.exists() and store.exists()
    assert read_attrs(url) is None  # half-made: no lsn attributes (before: "not an lsn-harvester store")
    again = run(url, SMALL)
    assert again.returncode == 0, again.stderr
    assert "rebuilding the skeleton of store" in again.stderr and "took over the stale lease" in again.stderr
    assert not marker.exists()
    assert_same_harvest(store, clean(SMALL))


# -- what a creator and a resume may touch -------------------------------------------------------
def test_creator_leaves_other_processes_partials_alone(tmp_path, clean):
    store = tmp_path / "store"
    tmp_path.mkdir(exist_ok=True)
    live, unmarked, dead = (tmp_path / f".store.partial-{n}" for n in ("live0001", "nomark01", "dead0001"))
    for d in (live, unmarked, dead):
        (d / "x").mkdir(parents=True)
    me = {"owner": "o", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": lease._process_start(os.getpid())}
    Path(f"{live}.json").write_text(json.dumps(me))
    Path(f"{dead}.json").write_text(json.dumps({**me, "pid": dead_pid(), "pid_start": None}))
    proc = run(store, SMALL)
    assert proc.returncode == 0, proc.stderr
    assert live.exists() and unmarked.exists() and Path(f"{live}.json").exists()
    assert not dead.exists() and not Path(f"{dead}.json").exists()
    assert_same_harvest(store, clean(SMALL))


def test_token_manifest_of_another_harvest_is_refused(tmp_path, clean, capsys):
    """A stream manifest copied from another harvest (another corpus, or other settings) is never reused."""
    other_corpus = clean(f"{SMALL},seed=1")
    other_settings = tmp_path / "other"
    assert main(["harvest", "--store", str(other_settings), "--corpus", SMALL, *ARGS, "--no-ray",
                 "--batch-size", "2"]) == 0
    for source, message in ((other_corpus, "was made from another corpus"),
                            (other_settings, "was made by another harvest")):
        store = tmp_path / f"store-{source.name}"
        shutil.copytree(clean(SMALL), store)
        root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
        root.attrs["lsn"] = {**root.attrs.asdict()["lsn"], "complete": False}
        root["shards/done"][0] = 0
        shutil.copy(source / "tokens" / "00000.json", store / "tokens" / "00000.json")
        before = tree_digest(store)
        capsys.readouterr()
        assert main(["harvest", "--store", str(store), "--corpus", SMALL, *ARGS, "--no-ray"]) == 2
        line = one_line(capsys.readouterr().err)
        assert message in line and "00000.json" in line
        assert tree_digest(store) == before


def test_owner_notices_a_lost_lease(tmp_path):
    """The heartbeat renews the owner's record; a higher generation (a takeover after the owner stalled
    for longer than the stale age) makes the owner stop instead of writing beside the new one."""
    store = str(tmp_path / "store")
    held = lease.acquire(store)
    try:
        record = Path(lease.lease_dir(store)) / f"{held.gen:08d}.json"
        first = json.loads(record.read_text())["heartbeat"]
        time.sleep(0.05)
        held.check()
        assert json.loads(record.read_text())["heartbeat"] > first
        write_lease(Path(store), held.gen + 1, host="node-7", pid=1)
        with pytest.raises(lease.HarvestError, match="lost the lease on store .*host node-7, pid 1,"):
            held.check()
    finally:
        held.release()
    assert (Path(lease.lease_dir(store)) / f"{held.gen + 1:08d}.json").exists()  # the new owner's, untouched


def test_unwritable_lease_place_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["harvest", "--store", str(tmp_path / "file" / "store"), "--corpus", SMALL, *ARGS, "--no-ray"])
    assert rc == 2
    assert "cannot take the lease on store" in one_line(capsys.readouterr().err)


# -- found in review ---------------------------------------------------------------------------
def test_a_store_reached_through_a_link_shares_its_lease(tmp_path):
    """Two spellings of one store (a symbolic link) are one store: one lease."""
    (tmp_path / "real" / "store").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "alias").symlink_to(tmp_path / "real" / "store")
    held = lease.acquire(str(tmp_path / "real" / "store"))
    try:
        with pytest.raises(lease.LeaseHeld, match=f"pid {os.getpid()}"):
            lease.acquire(str(tmp_path / "elsewhere" / "alias"))
    finally:
        held.release()


def test_an_interrupt_inside_acquire_leaves_no_lease_behind(tmp_path):
    """Ctrl-C after the lease file was made (here: while the takeover of a stale lease is reported)
    removes that file: the same process, or another, can take the lease at once."""
    store = tmp_path / "store"
    write_lease(store, 0, pid=2 ** 22 + 7)  # no such process: stale

    def interrupted(text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lease.acquire(str(store), say=interrupted)
    assert sorted(p.name for p in Path(lease.lease_dir(str(store))).iterdir()) == ["00000000.json"]
    lease.acquire(str(store)).release()


def test_a_higher_generation_that_backs_off_is_not_a_loss(tmp_path):
    """A process acting on an old listing may create a higher generation and remove it at once; the
    owner counts the lease as lost only when it sees a higher generation twice, a second apart."""
    import threading

    store = tmp_path / "store"
    held = lease.acquire(str(store))
    try:
        brief = write_lease(store, held.gen + 1, host="node-9", pid=1)
        threading.Timer(0.3, brief.unlink).start()
        held.check()  # sees it, looks again a second later: gone
        assert held.lost is None
        held.raise_if_lost()
    finally:
        held.release()
    assert not Path(lease.lease_dir(str(store))).exists()  # released: nothing left


def test_a_leftover_marker_never_costs_other_data(tmp_path):
    """A creation marker beside a directory that holds more than a skeleton (here a user's file): the
    harvest refuses in one line and removes nothing."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "precious.txt").write_text("keep me")
    Path(creating_marker(str(store))).write_text("{}")
    proc = run(f"file://{store}", SMALL)
    assert proc.returncode == 2
    assert "more than a half-made skeleton" in one_line(proc.stderr)
    assert (store / "precious.txt").read_text() == "keep me"


def test_a_damaged_token_manifest_is_one_line(tmp_path, clean, capsys):
    """A truncated stream manifest (a disk that filled up, a hand edit) stops the resume in one line
    that says what to delete; nothing in the store changes."""
    store = tmp_path / "store"
    shutil.copytree(clean(SMALL), store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root.attrs["lsn"] = {**root.attrs.asdict()["lsn"], "complete": False}
    root["shards/done"][0] = 0
    manifest = store / "tokens" / "00000.json"
    manifest.write_text(manifest.read_text()[:100])
    before = tree_digest(store)
    capsys.readouterr()
    assert main(["harvest", "--store", str(store), "--corpus", SMALL, *ARGS, "--no-ray"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "00000.json is damaged" in line and "delete it" in line
    assert tree_digest(store) == before
