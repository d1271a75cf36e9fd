"""``lsn verify --repair``, as a user meets it: a real store harvested, real files damaged on disk, the
repair, then the same ``lsn harvest`` again, which must leave every array equal to an undamaged run's
(bit for bit) having re-harvested only the damaged shards.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from lsn.cli import main
from tests.helpers import tree_digest
from tests.helpers import HARVEST
from tests.test_integrity import flip_byte

ARRAYS = ["tokens", "active", "act_sum", "act_sqsum", "group", "layer", "neuron", "shards/done", "shards/tokens",
          "shards/digest", "shards/active", "shards/act_sum", "shards/act_sqsum"]


def chunk(store: Path, array: str, *index: int) -> Path:
    return store.joinpath(array, "c", *(str(i) for i in index))


def shard_files(store: Path) -> dict[int, list[Path]]:
    """Every chunk file of each shard's rows, tokens, digest and done marker."""
    out: dict[int, list[Path]] = {}
    for path in sorted((store / "shards").glob("*/c/**/*")):
        if path.is_file():  # shards/ARRAY/c/SHARD/...
            out.setdefault(int(path.relative_to(store / "shards").parts[2]), []).append(path)
    return out


def mtimes(files: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in files}


def assert_same_store(got: Path, want: Path, same_attrs: bool = True) -> None:
    """Every array equal, bit for bit: the same chunks written, each holding the same values (so the whole
    arrays are equal, fill included, without reading the shard dimension's unwritten capacity); with
    ``same_attrs`` the attributes too (not for a store made anew, whose ``created`` differs)."""
    a, b = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    if same_attrs:
        assert a.attrs.asdict() == b.attrs.asdict()
    for name in ARRAYS:
        files = {p.relative_to(got / name) for p in (got / name / "c").rglob("*") if p.is_file()}
        assert files == {p.relative_to(want / name) for p in (want / name / "c").rglob("*") if p.is_file()}, name
        for f in files:
            index = tuple(int(i) for i in f.parts[1:])
            x, y = a[name].blocks[index], b[name].blocks[index]
            bits = (lambda v: v) if x.dtype.hasobject else (lambda v: v.view(np.uint8))  # floats: bit for bit
            assert x.dtype == y.dtype and np.array_equal(bits(x), bits(y)), (name, index)


def repair(store: Path, capsys) -> list[str]:
    assert main(["verify", "--repair", str(store)]) == 0
    out = capsys.readouterr()
    assert "error" not in out.err, out.err  # a note may say it took over a dead repair's lease
    return out.out.strip().splitlines()


def reharvest_and_compare(store: Path, pristine: Path, damaged: set[int], capsys) -> None:
    """verify reports no problem, the harvest redoes only the shards ``damaged`` and the store equals
    the undamaged one."""
    assert main(["verify", str(store)]) == 0
    assert "harvest not finished" in capsys.readouterr().out
    untouched = mtimes([p for s, files in shard_files(store).items() if s not in damaged for p in files])
    redone = {s: files for s, files in shard_files(pristine).items() if s in damaged}
    started = time.time_ns()
    assert main([*HARVEST, "--store", str(store)]) == 0
    assert mtimes(list(untouched)) == untouched, "an undamaged shard was harvested again"
    for s, files in redone.items():
        assert all(store.joinpath(p.relative_to(pristine)).stat().st_mtime_ns >= started for p in files), s
    assert_same_store(store, pristine)
    capsys.readouterr()


def swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


DAMAGE = {  # name: (damage, shards it damages)
    "flipped shard row": (lambda s: flip_byte(chunk(s, "shards/act_sum", 1, 0, 0, 0)), {1}),
    "deleted shard row": (lambda s: chunk(s, "shards/active", 1048577, 1, 0, 0).unlink(), {1048577}),
    "flipped totals": (lambda s: flip_byte(chunk(s, "act_sqsum", 0, 0, 0)), set()),
    "deleted digest": (lambda s: chunk(s, "shards/digest", 2, 0).unlink(), {2}),
    "swapped rows": (lambda s: swap(chunk(s, "shards/active", 0, 0, 0, 0), chunk(s, "shards/active", 1, 0, 0, 0)),
                     {0, 1}),
    "flipped done": (lambda s: flip_byte(chunk(s, "shards/done", 1048578)), {1048578}),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_repair_then_harvest_equals_a_clean_run(store, pristine, capsys, kind):
    damage, shards = DAMAGE[kind]
    damage(store)
    assert main(["verify", str(store)]) == 2
    assert f"lsn verify --repair {store} marks the damaged shards" in capsys.readouterr().err
    lines = repair(store, capsys)
    assert sorted(int(line.split("shard ")[1].split(":")[0]) for line in lines if ": marked unfinished (" in line
                  ) == sorted(shards), lines
    assert any("totals: cleared" in line for line in lines), lines
    assert lines[-1].endswith("and sum the totals") and "run the same lsn harvest again" in lines[-1]
    assert main(["verify", "--repair", str(store)]) == 0  # idempotent: a second repair finds nothing to do
    assert "nothing to repair" in capsys.readouterr().out
    reharvest_and_compare(store, pristine, shards, capsys)


def test_repair_of_an_undamaged_store_changes_nothing(store, capsys):
    before = tree_digest(store)
    lines = repair(store, capsys)
    assert lines == [line for line in lines if "no problem found; nothing to repair" in line] and len(lines) == 1
    assert tree_digest(store) == before
    assert not list(store.parent.glob(".S.lease*")), "the lease was left behind"


HOLD = ("import sys, time; from harvester import lease\n"
        "held = lease.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)\n")


def test_repair_refused_while_a_harvest_holds_the_lease(store, capsys):
    chunk(store, "shards/active", 1, 0, 0, 0).unlink()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_digest(store)
        assert main(["verify", "--repair", str(store)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is being written by another harvest" in err, err
        assert f"pid {holder.pid}," in err
        assert tree_digest(store) == before
    finally:
        holder.kill()
        holder.wait()


BEYOND = {
    "lost array metadata": lambda s: (s / "shards" / "act_sum" / "zarr.json").unlink(),
    "lost coordinate metadata": lambda s: (s / "neuron" / "zarr.json").unlink(),
    "flipped coordinate": lambda s: flip_byte(chunk(s, "layer", 0)),
    "damaged token manifest": lambda s: (s / "tokens" / "00001.json").write_text('{"shards": [tru'),
}


@pytest.mark.parametrize("kind", list(BEYOND))
def test_damage_beyond_repair_is_refused_and_nothing_changes(store, capsys, kind):
    flip_byte(chunk(store, "shards/act_sum", 1, 0, 0, 0))  # repairable damage beside it is left alone too
    BEYOND[kind](store)
    before = tree_digest(store)
    assert main(["verify", str(store)]) == 2
    assert "beyond repair: harvest into a new --store" in capsys.readouterr().err
    assert main(["verify", "--repair", str(store)]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lsn: error: ") and "harvest into a new --store" in err, err
    assert sum(line.endswith("(beyond repair)") for line in out.out.splitlines()) == 1, out.out
    assert tree_digest(store) == before


def test_unreadable_root_attributes_are_refused(store, capsys):
    (store / "zarr.json").write_text("{not json")
    before = tree_digest(store)
    assert main(["verify", "--repair", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read store" in err and "harvest into a new --store" in err, err
    assert tree_digest(store) == before


KILLED = """
import os, signal, sys
import harvester.verify as verify
from lsn.cli import main
count, after = 0, int(sys.argv[1])

def print_then_die(*args, **kwargs):  # each action prints its line once its write is done
    global count
    __builtins__.print(*args, **kwargs)
    if any(w in str(args[0]) for w in ("cleared", "marked unfinished", "removed")):
        count += 1
        if count == after:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

verify.print = print_then_die
sys.exit(main(["verify", "--repair", sys.argv[2]]))
"""


@pytest.mark.parametrize("after", [1, 2, 3, 4])
def test_repair_killed_after_any_write(store, pristine, capsys, after):
    """kill -9 after each write of a repair: verify still flags the store, or it is consistent; the repair
    run again finishes it, and the harvest then equals a clean run."""
    flip_byte(chunk(store, "act_sum", 1, 0, 0))
    flip_byte(chunk(store, "shards/active", 1, 0, 0, 0))
    chunk(store, "shards/digest", 1048577, 0).unlink()  # 5 writes: totals, 2 shards, 2 chunks removed
    proc = subprocess.run([sys.executable, "-c", KILLED, str(after), str(store)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert main(["verify", str(store)]) == 2  # the shards not yet marked, or the chunks not yet removed
    capsys.readouterr()
    lines = repair(store, capsys)
    assert lines[-1].endswith("and sum the totals"), lines
    reharvest_and_compare(store, pristine, {1, 1048577}, capsys)
    assert json.loads((store / "zarr.json").read_text())["attributes"]["lsn"]["complete"] is True


def test_verify_cost_benchmark_runs():
    """benchmarks/verify_cost.py end to end at a tiny shape (no timing is checked)."""
    run = subprocess.run([sys.executable, "benchmarks/verify_cost.py", "--layers", "2", "--width", "64", "--groups",
                          "3"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert any("3 finished shards, totals: no problem found" in line for line in lines), lines
    assert re.fullmatch(r"verify: [\d.]+ s, [\d.]+ GiB peak RSS, \d+ chunks, [\d.]+ GB read, store [\d.]+ GB",
                        lines[-1])
