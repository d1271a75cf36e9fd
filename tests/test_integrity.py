"""Damage on disk is an error, never a number: a deleted chunk, a flipped byte, lost shard rows, an old store.

Each case is met as a user meets it: a real store harvested, a real file deleted or corrupted on disk,
then ``lsn analyze``, ``lsn summary`` and a resume of the same harvest, each of which must stop with
one line and a non-zero status.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from lsn.cli import main
from tests.helpers import HARVEST, harvest

def analyze(store: Path) -> list[str]:
    return ["analyze", "lape", "--store", str(store), "--out", str(store.parent / "m.npz")]


def summary(store: Path) -> list[str]:
    return ["summary", "--store", str(store)]


def fails_with_one_line(argv: list[str], capsys, *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0, f"{argv[0]} exited 0 on a damaged store"
    assert len(err.splitlines()) == 1 and err.startswith("lsn: error: "), err
    for word in words:
        assert word in err, err
    return err


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def mark_incomplete(store: Path) -> None:
    """As a harvest killed before its reduce leaves the store: shards done, totals not yet summed."""
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root.attrs["lsn"] = {**root.attrs.asdict()["lsn"], "complete": False}
    with pytest.warns(UserWarning, match="Consolidated metadata"):
        zarr.consolidate_metadata(str(store))


@pytest.mark.parametrize("command", [analyze, summary, harvest])
def test_deleted_totals_chunk(store, capsys, command):
    (store / "active" / "c" / "1" / "0" / "0").unlink()  # group de: P(active) would read as 0
    fails_with_one_line(command(store), capsys, "damaged", "chunk (1, 0, 0) of array 'active' is missing")


@pytest.mark.parametrize("command", [analyze, summary, harvest])
def test_deleted_tokens_chunk(store, capsys, command):
    (store / "tokens" / "c" / "0").unlink()  # P(active) would be active / max(0, 1)
    fails_with_one_line(command(store), capsys, "chunk (0,) of array 'tokens' is missing")


@pytest.mark.parametrize("array,command", [("active", analyze), ("active", summary), ("act_sum", summary),
                                           ("act_sum", harvest)])
def test_flipped_byte(store, capsys, array, command):
    flip_byte(store / array / "c" / "0" / "0" / "0")
    fails_with_one_line(command(store), capsys, f"chunk (0, 0, 0) of array '{array}' fails its crc32c checksum")


def test_coordinate_chunk_is_checked(store, capsys):
    flip_byte(store / "group" / "c" / "0")
    fails_with_one_line(analyze(store), capsys, "array 'group' fails its crc32c checksum")


def done_rows(store: Path, var: str) -> list[Path]:
    done = {p.name for p in (store / "shards" / "done" / "c").iterdir()}
    return sorted(p for p in (store / "shards" / var / "c").rglob("*") if p.is_file()
                  and p.relative_to(store / "shards" / var / "c").parts[0] in done)


@pytest.mark.parametrize("var", ["active", "tokens"])
def test_lost_rows_of_a_done_shard_on_resume(store, capsys, var):
    """A shard whose rows are gone but whose done marker survived is not summed as zeros."""
    lost = done_rows(store, var)[-1]
    shard = lost.relative_to(store / "shards" / var / "c").parts[0]
    lost.unlink()
    mark_incomplete(store)
    fails_with_one_line(harvest(store), capsys, f"of array 'shards/{var}' is missing", f"({shard},")
    assert not zarr.open_group(str(store), mode="r").attrs["lsn"]["complete"]


def test_flipped_byte_in_a_shard_row_on_resume(store, capsys):
    flip_byte(done_rows(store, "act_sum")[0])
    mark_incomplete(store)
    fails_with_one_line(harvest(store), capsys, "of array 'shards/act_sum' fails its crc32c checksum")


def test_totals_that_disagree_with_their_record(store, capsys):
    """A tokens chunk replaced by another valid one (right checksum, wrong numbers) is still refused."""
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root["tokens"][:] = root["tokens"][:] * 2
    fails_with_one_line(summary(store), capsys, "tokens totals differ from those recorded")


def test_every_array_carries_checksums_and_every_chunk(pristine):
    metas = list(pristine.glob("*/zarr.json")) + list(pristine.glob("shards/*/zarr.json"))
    assert len(metas) >= 10
    for meta in metas:
        node = json.loads(meta.read_text())
        if node["node_type"] == "array":
            assert [c["name"] for c in node["codecs"]][-1] == "crc32c", meta
    root = zarr.open_group(str(pristine), mode="r")
    assert root.attrs["lsn"]["format_version"] == 2
    groups, layer_chunks = root["active"].shape[0], root["active"].cdata_shape[1]
    assert len(list((pristine / "active" / "c").rglob("*"))) >= groups * layer_chunks


def test_undamaged_store_reads_cleanly(pristine, tmp_path, capsys):
    assert main(summary(pristine)) == 0
    assert capsys.readouterr().err == ""
    assert main(["analyze", "lape", "--store", str(pristine), "--out", str(tmp_path / "m.npz")]) == 0
    assert np.load(tmp_path / "m.npz", allow_pickle=False)


OLD_HARVEST = """
import sys
from zarr.codecs import ZstdCodec
import harvester.checked as checked
import harvester.store as store
store.FORMAT_VERSION = 1                     # as lsn wrote stores before checksums:
store._compressors = lambda: (ZstdCodec(),)  # no crc32c codec,
checked.checked = lambda zstore, label: zstore  # and no checked reads
from lsn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_format_1_store_opens_read_only(tmp_path, capsys):
    old = tmp_path / "old"
    proc = subprocess.run([sys.executable, "-c", OLD_HARVEST, *harvest(old)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert zarr.open_group(str(old), mode="r").attrs["lsn"]["format_version"] == 1
    assert main(summary(old)) == 0
    out = capsys.readouterr()
    assert "en " in out.out and out.err.count("\n") == 1 and "format version 1" in out.err
    assert main(["analyze", "lape", "--store", str(old), "--out", str(tmp_path / "m.npz")]) == 0
    capsys.readouterr()
    fails_with_one_line(harvest(old), capsys, "format version 1", "read-only")


def test_rows_copied_from_another_shard_on_resume(store, capsys):
    """A row chunk replaced by another shard's (a valid chunk: right checksum, wrong numbers)."""
    rows = [p for p in done_rows(store, "active") if p.relative_to(store / "shards" / "active" / "c").parts[1] == "0"]
    shutil.copyfile(rows[0], rows[1])
    shard = rows[1].relative_to(store / "shards" / "active" / "c").parts[0]
    mark_incomplete(store)
    fails_with_one_line(harvest(store), capsys, f"the rows of shard {shard} do not match the digest")


# -- lsn verify ----------------------------------------------------------------------------------------
def test_verify_undamaged_store(pristine, capsys):
    assert main(["verify", str(pristine)]) == 0
    out = capsys.readouterr()
    assert "no problem found" in out.out and "totals" in out.out and out.err == ""


def test_verify_lists_every_problem(store, capsys):
    shard_rows = done_rows(store, "act_sum")
    (store / "active" / "c" / "1" / "0" / "0").unlink()
    (store / "tokens" / "c" / "0").unlink()
    flip_byte(store / "act_sqsum" / "c" / "0" / "0" / "0")
    shard_rows[-1].unlink()
    lost = shard_rows[-1].relative_to(store / "shards" / "act_sum" / "c").parts
    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr()
    assert len(out.err.strip().splitlines()) == 1 and "4 problem(s)" in out.err
    lines = out.out.strip().splitlines()
    assert len(lines) == 4, lines
    for expected in ["array 'active' chunk (1, 0, 0): is missing", "array 'tokens' chunk (0,): is missing",
                     "array 'act_sqsum' chunk (0, 0, 0): fails its crc32c checksum",
                     f"array 'shards/act_sum' chunk ({', '.join(lost)}): is missing"]:
        assert sum(expected in line for line in lines) == 1, (expected, lines)


def test_verify_finds_numbers_that_disagree(store, capsys):
    """Chunks rewritten with valid checksums but wrong numbers: totals, and a shard's rows."""
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    active = root["active"][1]
    active[0, 0] = root["tokens"][1] + 1
    root["active"][1] = active
    row = done_rows(store, "act_sum")[0].relative_to(store / "shards" / "act_sum" / "c").parts
    index = tuple(int(p) for p in row[:2])
    root["shards/act_sum"][index] = root["shards/act_sum"][index] + 1.0
    assert main(["verify", str(store)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("array 'active' group 'de': 1 cells differ from the sum of its shards" in line for line in lines)
    assert any("array 'active' group 'de': 1 cells outside 0..tokens" in line for line in lines)
    assert any(f"shard {index[0]}: its rows do not match the digest" in line for line in lines)
    assert any("array 'act_sum' group" in line and "differ from the sum" in line for line in lines)
    assert len(lines) == 4, lines


def test_damage_found_on_a_dask_cluster(store, capsys):
    """The checked reads travel to dask.distributed workers, and their error comes back as one line."""
    (store / "active" / "c" / "1" / "0" / "0").unlink()
    fails_with_one_line([*analyze(store), "--local-cluster", "1"], capsys, "chunk (1, 0, 0) of array 'active' is missing")


def test_fsspec_store_is_checked_and_verified(tmp_path, capsys):
    """The same checks on a store given as an fsspec URL (file://, as s3:// goes)."""
    url = f"file://{tmp_path}/S"
    assert main([*HARVEST, "--store", url]) == 0
    assert main(["verify", url]) == 0
    flip_byte(tmp_path / "S" / "act_sum" / "c" / "1" / "0" / "0")
    (tmp_path / "S" / "tokens" / "c" / "0").unlink()
    capsys.readouterr()
    fails_with_one_line(summary(url), capsys, "chunk (0,) of array 'tokens' is missing")
    assert main(["verify", url]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("array 'act_sum' chunk (1, 0, 0): fails its crc32c checksum" in line for line in lines), lines
    assert any("array 'tokens' chunk (0,): is missing" in line for line in lines), lines


def test_lost_array_metadata_on_resume(store, capsys):
    (store / "shards" / "act_sum" / "zarr.json").unlink()
    mark_incomplete(store)
    fails_with_one_line(harvest(store), capsys, "array 'shards/act_sum' is missing")
    assert main(["verify", str(store)]) == 2
    assert "array 'shards/act_sum': its metadata (zarr.json) is missing" in capsys.readouterr().out
