"""``lsn compact``, as a user meets it: a real store harvested, its shard rows dropped (or only planned), then
every reader of the totals gives the same bytes; what needs the rows says so in one line; a damaged store
keeps its rows; a compact killed (kill -9) while it deletes, or racing a harvest or another compact (real
processes), leaves a store that reads the same totals and that a second compact finishes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import zarr

from harvester.errors import HarvestError
from harvester.store import Store, StoreAttrs, read_attrs, require_shard_rows
from lsn.cli import main
from tests.helpers import HARVEST, assert_same_totals, harvest, tree_digest
from tests.test_integrity import flip_byte, mark_incomplete
from tests.test_store_meta import edit_on_disk, lsn, wait_for_lease

DROP = "--drop-shard-rows"
KEPT = ("done", "tokens", "digest")


def row_files(store: Path, var: str | None = None) -> list[Path]:
    """The chunk files of the statistics' shard rows (``shards/<var>/c/...``)."""
    variables = [var] if var else read_attrs(store).settings.variables
    return sorted(p for v in variables for p in (store / "shards" / v / "c").rglob("*") if p.is_file())


def one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("lsn: error: "), (rc, err)
    return err


def readings(store: Path, out: Path, capsys, hist: bool = False) -> dict[str, bytes]:
    """What the readers of the totals make of ``store``: masks of methods reading ``active`` and ``tokens``
    (lape, act-prob-zero, coverage) and, with ``hist``, the histograms (act-prob-90p), as file bytes; and
    ``lsn summary``'s output (``act_sum`` too)."""
    runs = {"lape": ["--top-rate", "0.1"], "act-prob-zero": ["--rate", "0.05"], "coverage": [],
            **({"act-prob-90p": ["--percentile-of", "own", "--rate", "0.05"]} if hist else {})}
    got = {}
    for method, extra in runs.items():
        assert main(["analyze", method, "--store", str(store), "--out", str(out / f"{method}.npz"), *extra]) == 0
        got[method] = (out / f"{method}.npz").read_bytes()
    capsys.readouterr()
    assert main(["summary", "--store", str(store)]) == 0
    got["summary"] = capsys.readouterr().out.encode()
    return got


# -- the plan, and the compaction ----------------------------------------------------------------
def test_without_the_flag_nothing_changes_and_the_flag_is_named(store, capsys):
    before = tree_digest(store)
    rc = main(["compact", str(store)])
    out = capsys.readouterr()
    assert rc == 2 and out.err.strip() == (f"lsn: error: nothing was changed: lsn compact {store} {DROP} drops them "
                                           "(after checking the totals against them)")
    assert tree_digest(store) == before
    lines = out.out.splitlines()
    done = len(list((store / "shards" / "done" / "c").iterdir()))
    assert lines[0].startswith(f"store {store}: complete ({done} finished shards); dropping its shard rows would free")
    for line, var in zip(lines[1:4], ["active", "act_sum", "act_sqsum"]):
        files = row_files(store, var)
        rows = {f.relative_to(store / "shards" / var / "c").parts[:2] for f in files}
        assert line.split() == [f"shards/{var}", str(len(rows)), "rows", *_size(sum(f.stat().st_size for f in files))]
    assert lines[4].startswith("  kept: the totals, coordinates and metadata (")
    assert "--bootstrap and lsn convergence read these rows, and lsn verify checks the totals against them" in lines[5]


def _size(n: int) -> list[str]:
    from harvester.compact import size

    return size(n).split()


def test_compact_drops_the_rows_and_every_reading_of_the_totals_is_the_same(store, tmp_path, capsys):
    before = readings(store, tmp_path, capsys)
    files = row_files(store)
    freed = sum(f.stat().st_size for f in files)
    kept = {p: p.read_bytes() for a in KEPT for p in (store / "shards" / a / "c").rglob("*") if p.is_file()}
    tokens = {p: p.read_bytes() for p in (store / "tokens").rglob("*")
              if p.is_file() and p.relative_to(store / "tokens").parts[0].startswith("0")}
    assert any(p.suffix == ".json" for p in tokens) and any(p.suffix == ".parquet" for p in tokens)
    assert main(["compact", str(store), DROP]) == 0
    out = capsys.readouterr().out
    assert f"store {store}: freed {freed:,} bytes" in out and f"{len(files)} shard rows" in out
    assert "no problem found (the totals equal the sum of their shard rows)" in out
    assert row_files(store) == [] and all((store / "shards" / v / "zarr.json").exists() for v in ("active", "act_sum"))
    assert {p: p.read_bytes() for p in kept} == kept and {p: p.read_bytes() for p in tokens} == tokens
    compacted = read_attrs(store).compacted
    assert (compacted.variables, compacted.rows, compacted.freed_bytes) == (("active", "act_sum", "act_sqsum"),
                                                                           len(files), freed)
    assert readings(store, tmp_path, capsys) == before  # the same mask bytes, the same summary
    # verify checks what is left, and says the rows were dropped
    assert main(["verify", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("digest recorded then): no problem found") and "dropped by lsn compact" in out
    # a resumed harvest finds it complete, as before, prints its summary and writes nothing
    unchanged = tree_digest(store)
    assert main(harvest(store)) == 0
    assert capsys.readouterr().out.encode() == before["summary"] and tree_digest(store) == unchanged


def test_compacting_again_drops_nothing(store, capsys):
    assert main(["compact", str(store), DROP]) == 0
    capsys.readouterr()
    before = tree_digest(store)
    for argv in (["compact", str(store)], ["compact", str(store), DROP]):
        assert main(argv) == 0
        assert "no shard rows are left: nothing to drop" in capsys.readouterr().out
    assert tree_digest(store) == before


def test_what_needs_the_rows_says_so_in_one_line(store, pristine, capsys):
    assert main(["compact", str(store), DROP]) == 0
    capsys.readouterr()
    before = tree_digest(store)
    err = one_line_error(capsys, main(["verify", "--repair", str(store)]))
    assert err.startswith(f"lsn: error: lsn verify --repair needs the shard rows of store {store}, but lsn compact "
                          "dropped them on ") and "harvest again into a new --store" in err
    with pytest.raises(HarvestError, match="summing the totals needs the shard rows"):
        Store(store).reduce([0])
    with pytest.raises(HarvestError, match=r"^lsn analyze lape --bootstrap needs the shard rows of store .*"):
        require_shard_rows(read_attrs(store), store, "lsn analyze lape --bootstrap")
    require_shard_rows(read_attrs(pristine), pristine, "anything")  # an uncompacted store passes
    assert tree_digest(store) == before


def test_the_attributes_record_it_and_only_a_complete_store_has_it(store, capsys):
    assert read_attrs(store).compacted is None and "compacted" not in read_attrs(store).to_dict()
    assert main(["compact", str(store), DROP]) == 0
    attrs = read_attrs(store)
    assert StoreAttrs.from_dict(attrs.to_dict(), store) == attrs
    assert set(attrs.to_dict()["compacted"]) == {"date", "variables", "rows", "freed_bytes", "totals_sha256"}
    edit_on_disk(store, lambda lsn: lsn.update(complete=False))
    capsys.readouterr()
    err = one_line_error(capsys, main(["summary", "--store", str(store)]))
    assert err.endswith("malformed metadata: compacted: is set, but the store is not complete (only a complete "
                        "store is compacted)")


# -- refusals --------------------------------------------------------------------------------------
def test_an_incomplete_store_is_refused(store, tmp_path, capsys):
    mark_incomplete(store)
    before = tree_digest(store)
    for argv in (["compact", str(store)], ["compact", str(store), DROP]):
        err = one_line_error(capsys, main(argv))
        assert err == (f"lsn: error: store {store} is not complete (its harvest did not finish): its shard rows are "
                       "all it has until the totals are summed from them; run the same lsn harvest again to finish it")
    assert tree_digest(store) == before
    assert one_line_error(capsys, main(["compact", str(tmp_path / "none")])) == f"lsn: error: no store at {tmp_path / 'none'}"


@pytest.mark.parametrize("damage", ["flipped byte", "wrong numbers", "lost row"])
def test_damage_keeps_the_rows_the_totals_are_repaired_from(store, pristine, capsys, damage):
    """Totals that do not verify against their shards (a flipped byte; a chunk rewritten with a valid
    checksum but other numbers), or a lost shard row: nothing is dropped; after verify --repair and the
    same harvest, the compact goes through."""
    if damage == "flipped byte":
        flip_byte(store / "act_sum" / "c" / "1" / "0" / "0")
        first = "array 'act_sum' chunk (1, 0, 0): fails its crc32c checksum"
    elif damage == "wrong numbers":
        root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
        root["act_sum"][0, 1, 2] = root["act_sum"][0, 1, 2] + 1.0
        first = "array 'act_sum' group 'en': 1 cells differ from the sum of its shards"
    else:
        lost = row_files(store, "act_sqsum")[-1]
        lost.unlink()
        first = "array 'shards/act_sqsum' chunk"
    before = tree_digest(store)
    err = one_line_error(capsys, main(["compact", str(store), DROP]))
    assert err.startswith(f"lsn: error: store {store} does not verify (") and first in err, err
    assert "nothing was dropped, since the shard rows are the only copy the totals can be repaired from" in err
    assert tree_digest(store) == before and read_attrs(store).compacted is None
    assert main(["verify", "--repair", str(store)]) == 0
    assert main(harvest(store)) == 0
    assert main(["compact", str(store), DROP]) == 0
    assert_same_totals(store, pristine)


def test_verify_of_a_compacted_store_finds_damage_to_what_is_left(store, capsys):
    assert main(["compact", str(store), DROP]) == 0
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root["act_sqsum"][1, 0, 5] = root["act_sqsum"][1, 0, 5] * 2 + 1.0  # a valid chunk, other numbers
    flip_byte(store / "shards" / "tokens" / "c" / "0" / "0")
    capsys.readouterr()
    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2, lines
    assert any(line.endswith("totals: differ from the digest recorded when lsn compact checked them against their "
                              "shard rows") for line in lines), lines
    assert any(line.endswith("array 'shards/tokens' chunk (0, 0): fails its crc32c checksum") for line in lines), lines
    assert out.err.strip().endswith("lsn compact dropped its shard rows, which a repair needs: harvest into a new --store")


def test_an_imported_store_has_no_rows_to_drop(tmp_path, capsys):
    from analysis.importers import import_published
    from tests.test_import import write_rucaibox

    write_rucaibox(tmp_path / "src")
    import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    before = tree_digest(tmp_path / "store")
    for argv in (["compact", str(tmp_path / "store")], ["compact", str(tmp_path / "store"), DROP]):
        assert main(argv) == 0
        assert "it holds no shard rows (an imported store, or none were written): nothing to drop" in capsys.readouterr().out
    assert tree_digest(tmp_path / "store") == before


def test_a_store_given_as_a_url(pristine, tmp_path, capsys):
    shutil.copytree(pristine, tmp_path / "S")
    url = f"file://{tmp_path}/S"
    before = readings(tmp_path / "S", tmp_path, capsys)
    assert main(["compact", url]) == 2
    assert main(["compact", url, DROP]) == 0
    assert row_files(tmp_path / "S") == [] and read_attrs(url).compacted is not None
    assert main(["verify", url]) == 0
    assert readings(tmp_path / "S", tmp_path, capsys) == before
    assert not (tmp_path / ".S.lease").exists()


# -- real processes: a race, and kill -9 -----------------------------------------------------------
def start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(lsn(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("first", ["compact", "harvest"])
def test_a_compact_racing_a_harvest_or_a_compact_is_refused(store, pristine, first):
    """The first process is stopped (SIGSTOP) holding the store's lease; a compact (and a harvest) started
    then is refused in one line and changes nothing; the first, continued, finishes alone."""
    running = start("compact", str(store), DROP) if first == "compact" else start(*harvest(store))
    try:
        wait_for_lease(store, running)
        running.send_signal(signal.SIGSTOP)
        assert list((store.parent / ".S.lease").glob("[0-9]*.json")), "it released its lease before it was stopped"
        before = tree_digest(store)
        for argv in (["compact", str(store), DROP], harvest(store)):
            refused = subprocess.run(lsn(*argv), capture_output=True, text=True, timeout=300)
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.strip().startswith(f"lsn: error: store {store} is being written by another"), \
                refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert tree_digest(store) == before
    finally:
        running.send_signal(signal.SIGCONT)
    out, err = running.communicate(timeout=300)
    assert running.returncode == 0, err
    assert (read_attrs(store).compacted is not None) == (first == "compact")
    assert_same_totals(store, pristine)


MEDIUM = [*HARVEST[:HARVEST.index("--shard-tokens")], "--shard-tokens", "64", "--no-progress",
          "--stats", "active,sum,sqsum,hist", "--hist-edges=-1:2:8"]
"""A store of many small shards (many row chunks: a deletion that takes a while), with histograms."""


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """The medium store, never changed: tests compact copies."""
    root = tmp_path_factory.mktemp("medium")
    assert main([*MEDIUM, "--store", str(root / "S")]) == 0
    return root / "S"


def kill_when(store: Path, argv: list[str], when) -> tuple[int, int]:
    """Run ``lsn ARGV`` and stop it (SIGSTOP, then kill -9) as soon as ``when()`` holds; returns the shard-row
    chunk files there were before it ran and those left once it was killed."""
    before = len(row_files(store))
    proc = start(*argv)
    try:
        deadline = time.monotonic() + 120
        while not when():
            assert proc.poll() is None, f"it finished before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGSTOP)
        left = len(row_files(store))
    finally:
        proc.kill()
        proc.wait()
    return before, left


def deleting(store: Path):
    """Once the first statistic's rows are gone (the others go after it, statistic by statistic)."""
    return lambda: not (store / "shards" / "active" / "c").exists()


@pytest.mark.slow
def test_kill_9_while_checking_leaves_the_store_as_it_was(medium, tmp_path, capsys):
    store = tmp_path / "S"
    shutil.copytree(medium, store)
    before = tree_digest(store)
    lease = store.parent / ".S.lease"
    kill_when(store, ["compact", str(store), DROP], lambda: list(lease.glob("[0-9]*.json")))
    assert tree_digest(store) == before  # killed holding the lease, before anything was written
    assert main(["compact", str(store), DROP]) == 0  # takes over the dead process's lease
    assert "took over the stale lease" in capsys.readouterr().err and row_files(store) == []


@pytest.mark.slow
def test_kill_9_while_deleting_then_a_second_compact_finishes(medium, tmp_path, capsys):
    """Killed once the compaction is recorded, with shard rows half deleted: the totals read the same (the
    same mask bytes, summary), verify passes and notes the leftovers, a resumed harvest finds the store
    complete, and a second compact drops what is left."""
    ours = tmp_path / "S"
    shutil.copytree(medium, ours)
    want = readings(ours, tmp_path, capsys, hist=True)
    mid = False
    for attempt in range(3):  # until the kill lands in the middle of the deletion
        store = tmp_path / f"try{attempt}" / "S"
        shutil.copytree(medium, store)
        total, left = kill_when(store, ["compact", str(store), DROP], deleting(store))
        mid = 0 < left < total
        if mid:
            break
    assert mid, f"the deletion ({total} files) was never caught in the middle ({left} left)"
    assert read_attrs(store).compacted is not None
    assert_same_totals(store, medium)
    shutil.rmtree(ours)
    store.rename(ours)  # readings name the store's path: the same path as before
    (store.parent / ".S.lease").rename(ours.parent / ".S.lease")  # the dead process's lease, with it
    store = ours
    assert readings(store, tmp_path, capsys, hist=True) == want
    assert main(["verify", str(store)]) == 0
    assert f"{left} chunks of them an interrupted compact left: lsn compact {store} {DROP} drops them" \
        in capsys.readouterr().out
    assert main(["compact", str(store)]) == 2
    assert "with rows an interrupted lsn compact left" in capsys.readouterr().out
    unchanged = tree_digest(store)
    assert main([*MEDIUM, "--store", str(store)]) == 0  # complete: a resumed harvest writes nothing
    assert capsys.readouterr().out.encode() == want["summary"] and tree_digest(store) == unchanged
    assert main(["compact", str(store), DROP]) == 0
    out = capsys.readouterr().out
    assert "dropping the" in out and "an interrupted lsn compact left" in out and row_files(store) == []
    assert main(["verify", str(store)]) == 0
    assert "interrupted" not in capsys.readouterr().out
    assert readings(store, tmp_path, capsys, hist=True) == want


@pytest.mark.slow
def test_an_intervention_reads_a_compacted_store_the_same(medium, tmp_path, capsys):
    store = tmp_path / "S"
    shutil.copytree(medium, store)
    mask = tmp_path / "lape.npz"
    assert main(["analyze", "lape", "--store", str(store), "--out", str(mask), "--top-rate", "0.1"]) == 0
    outputs = {}
    for when in ("before", "after"):
        if when == "after":
            assert main(["compact", str(store), DROP]) == 0
        out = tmp_path / "iv"
        assert main(["intervene", "ppl", "--model", "tiny:llama", "--corpus", "sample:docs=2,langs=en+de", "--no-ray",
                     "--no-progress", "--mask", str(mask), "--mode", "p90", "--store", str(store), "--out", str(out)]) == 0
        outputs[when] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix != ".png"}
        shutil.rmtree(out)
    assert outputs["before"] == outputs["after"] and "ppl.csv" in outputs["after"]
