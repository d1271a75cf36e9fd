"""Kill and resume: a harvest killed with SIGKILL at any moment, run again, ends bit-identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from lsn.cli import main
from tests.helpers import assert_same_totals

CORPUS = "sample:docs=300,langs=en+ru+zh+ar,seed=5"
ARGS = ["--model", "tiny:llama", "--corpus", CORPUS, "--seq-len", "64", "--batch-size", "4",
        "--shard-tokens", "1024", "--no-progress"]


def done_indices(store: Path) -> list[int]:
    chunks = store / "shards" / "done" / "c"
    names = [p.name for p in chunks.iterdir()] if chunks.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit())  # not the temporary files of writes in progress


def done_shards(store: Path) -> int:
    return len(done_indices(store))


def start(store: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harvester", "harvest", "--store", str(store), *ARGS, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the harvest and everything it started (the embedded Ray instance too)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError("processes of the killed harvest are still running")


def kill_when(store: Path, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while done_shards(store) < at_least:
        assert proc.poll() is None, f"harvest ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "harvest made no progress"
        time.sleep(0.02)
    kill_group(proc)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    assert main(["harvest", "--store", str(store), *ARGS, "--actors", "2"]) == 0
    return store


@pytest.mark.ray
def test_sigkill_at_several_moments_then_resume(uninterrupted, tmp_path):
    store = tmp_path / "store"
    n_shards = zarr.open_group(str(uninterrupted), mode="r").attrs["lsn"]["meta"]["corpus"]["shards"]
    assert n_shards >= 40 and done_shards(uninterrupted) == n_shards

    proc = start(store, "--actors", "2")  # killed while starting: Ray, model, tokenizer, store skeleton
    time.sleep(3.0)
    kill_group(proc)

    proc = start(store, "--actors", "2")
    kill_when(store, proc, at_least=3)
    proc = start(store, "--actors", "2")
    kill_when(store, proc, at_least=n_shards // 2)
    finished = done_shards(store)
    assert 0 < finished < n_shards
    chunk_times = {p: p.stat().st_mtime_ns for p in (store / "shards" / "active" / "c").rglob("*") if p.is_file()}

    proc = start(store, "--actors", "2")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    assert done_shards(store) == n_shards
    assert_same_totals(store, uninterrupted)
    unchanged = sum(p.stat().st_mtime_ns == t for p, t in chunk_times.items())
    assert unchanged >= finished * 0.9, "finished shards were harvested again"


def test_torn_shard_is_rewritten(uninterrupted, tmp_path):
    """A shard whose data was written (here: garbage) but not marked done is re-run on resume."""
    import shutil

    import numpy as np

    store = tmp_path / "store"
    shutil.copytree(uninterrupted, store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    indices = done_indices(store)
    for index in (indices[1], indices[-7]):
        group = int(np.flatnonzero(root["shards/tokens"][index])[0])
        root["shards/active"][index, group] = 12345
        root["shards/act_sum"][index, group] = np.nan
        root["shards/done"][index] = 0
    root["active"][:] = 0
    attrs = root.attrs.asdict()["lsn"]
    root.attrs["lsn"] = {**attrs, "complete": False}
    assert main(["harvest", "--store", str(store), *ARGS, "--no-ray"]) == 0
    assert_same_totals(store, uninterrupted)


@pytest.mark.ray
def test_actor_killed_mid_shard_is_replaced(uninterrupted, tmp_path):
    """Fault injection: the actor running a shard writes garbage into it and dies by SIGKILL (as an
    out-of-memory kill would); a fresh actor re-runs the shard and the totals are unchanged."""
    store, marker = tmp_path / "store", tmp_path / "fault-happened"
    victim = done_indices(uninterrupted)[len(done_indices(uninterrupted)) // 2]
    env = {**os.environ, "LSN_FAULT_INJECT": f"{victim}:{marker}"}
    proc = subprocess.run([sys.executable, "-m", "harvester", "harvest", "--store", str(store), *ARGS,
                           "--actors", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists(), "the fault was not injected"
    died = [line for line in proc.stderr.splitlines() if "an actor died with shard(s)" in line]
    assert len(died) == 1 and str(victim) in died[0], proc.stderr
    assert_same_totals(store, uninterrupted)
