"""``lsn verify``: a store checked in depth, one line per problem.

Every chunk's crc32c, every chunk of a written array present, every finished shard's rows present and
equal to the digest written with them, the totals equal to the sum of their shards (bit for bit, in the
reduce's order) and ``0 <= active <= tokens``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from harvester import fs
from harvester.errors import HarvestError
from harvester.stats import VARIABLES
from harvester.store import _zarr, read_attrs, totals_record, zarr_store


def run(path: str, repair: bool = False) -> None:
    """``lsn verify STORE [--repair]``: one line per problem on stdout, an error if there is any."""
    if repair:
        raise HarvestError("lsn verify --repair is not built yet")
    problems, checked = verify(path)
    for line in problems:
        print(f"{path}: {line}")
    if problems:
        raise HarvestError(f"store {path} is damaged: {len(problems)} problem(s), listed above")
    print(f"{checked}: no problem found")


def verify(path: str | Path) -> tuple[list[str], str]:
    """Check a store in depth: every chunk's checksum, every chunk of a written array present, every done
    shard's rows present and matching their digest, the totals equal to the sum of their shards and
    ``0 <= active <= tokens``. Returns one line per problem, and a line saying what was checked."""
    from harvester.checked import checked

    attrs = read_attrs(path)
    if attrs is None:
        raise HarvestError(f"no store at {path}")
    if attrs.get("format_version", 1) < 2:
        raise HarvestError(f"store {path} has format version 1: it has no checksums or digests to verify")
    fsys, root_path = fs.filesystem(str(path))
    files = {f[len(root_path.rstrip("/")) + 1:]: f for f in fsys.find(root_path)}
    variables = [VARIABLES[s] for s in attrs["fingerprint"]["settings"]["stats"]]  # write_shard's order
    expected = ["tokens", *variables, "shards/done", "shards/tokens", "shards/digest",
                *(f"shards/{v}" for v in variables)]
    gone = [f"array '{name}': its metadata (zarr.json) is missing" for name in expected
            if f"{name}/zarr.json" not in files]
    if gone:
        return gone, f"store {path}: arrays"
    problems = _bad_checksums(fsys, files)
    root = _zarr().open_group(store=checked(zarr_store(path, read_only=True), str(path)), mode="r",
                              use_consolidated=False)
    done = _done_shards(root, files)
    if attrs.get("complete"):
        for name, _ in root.arrays():
            problems += _missing_chunks(root[name], name, files)
    for index in done:
        problems += _check_shard(root, index, files, variables)
    if attrs.get("complete"):
        problems += _check_totals(root, attrs, done, variables)
    n_chunks = sum(1 for key in files if _chunk_of(key))
    return problems, (f"store {path}: {n_chunks} chunks, {len(done)} finished shards"
                      + (", totals" if attrs.get("complete") else " (harvest not finished: no totals)"))


def _chunk_of(key: str):
    from harvester.checked import chunk_of

    return chunk_of(key) if not key.startswith("tokens/0") else None  # not the token shards (Parquet)


def _bad_checksums(fsys, files: dict[str, str]) -> list[str]:
    from harvester.checked import checksum_ok

    bad = []
    for key, full in sorted(files.items()):
        where = _chunk_of(key)
        if where and not checksum_ok(fsys.cat_file(full)):
            bad.append(f"array '{where[0]}' chunk {where[1]}: fails its crc32c checksum")
    return bad


def _missing_chunks(array, name: str, files: dict[str, str], prefix: tuple = ()) -> list[str]:
    """Chunks of ``array`` (those under ``prefix``) that were written and are gone."""
    import itertools

    grid = [range(n) for n in array.cdata_shape[len(prefix):]]
    return [f"array '{name}' chunk {prefix + idx}: is missing"
            for idx in itertools.product(*grid)
            if f"{name}/c/{'/'.join(str(i) for i in prefix + idx)}" not in files]


def _read(array, selection):
    """A checked read; None where the chunk is bad or missing (reported by the listing already)."""
    try:
        return array[selection]
    except HarvestError:
        return None


def _done_shards(root, files: dict[str, str]) -> list[int]:
    keys = [k for k in files if k.startswith("shards/done/c/") and k.rpartition("/")[2].isdigit()]
    indices = sorted(int(k.rpartition("/")[2]) for k in keys)
    return [i for i in indices if _read(root["shards/done"], i) == 1]


def _check_shard(root, index: int, files: dict[str, str], variables: list[str]) -> list[str]:
    """A done shard: its tokens, digest and rows (groups with tokens) present, the rows matching the digest."""
    problems = _missing_chunks(root["shards/tokens"], "shards/tokens", files, (index,))
    problems += _missing_chunks(root["shards/digest"], "shards/digest", files, (index,))
    tokens = _read(root["shards/tokens"], index)
    if tokens is None:
        return problems
    digest = hashlib.sha256()
    for g in np.flatnonzero(tokens > 0):
        for var in variables:
            missing = _missing_chunks(root[f"shards/{var}"], f"shards/{var}", files, (index, int(g)))
            row = _read(root[f"shards/{var}"], (index, int(g)))
            problems += missing
            if missing or row is None:
                digest = None
            elif digest is not None:
                digest.update(np.ascontiguousarray(row).tobytes())
    stored = _read(root["shards/digest"], index)
    if digest is not None and stored is not None:
        digest.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
        if digest.digest() != bytes(stored):
            problems.append(f"shard {index}: its rows do not match the digest written with them")
    return problems


def _check_totals(root, attrs: dict, done: list[int], variables: list[str]) -> list[str]:
    """The totals: reduced from the shards marked done, equal to their sum (in shard order, as the reduce
    sums: bit for bit), and ``0 <= active <= tokens``."""
    problems = []
    record = attrs.get("totals") or {}
    if record.get("shards_sha256") != totals_record(done, [])["shards_sha256"]:
        problems.append(f"totals: reduced from {record.get('shards')} shards, but {len(done)} are marked done "
                        "(not the same shards)")
    groups = attrs["meta"]["corpus"]["groups"]
    rows = {i: _read(root["shards/tokens"], i) for i in done}
    readable = [i for i in done if rows[i] is not None]
    shard_tokens = np.stack([rows[i] for i in readable]) if readable else np.zeros((0, len(groups)), np.int64)
    tokens = _read(root["tokens"], slice(None))
    if tokens is not None:
        for g in np.flatnonzero(tokens != shard_tokens.sum(axis=0)):
            problems.append(f"array 'tokens' group '{groups[g]}': {tokens[g]}, but its shards sum to "
                            f"{shard_tokens[:, g].sum()}")
        if record.get("tokens") is not None and [int(n) for n in tokens] != record["tokens"]:
            problems.append("array 'tokens': differs from the tokens recorded when the totals were reduced")
    for var in variables:
        for g, name in enumerate(groups):
            problems += _check_total(root, var, g, name, [i for i, n in zip(readable, shard_tokens[:, g]) if n > 0],
                                     None if tokens is None else int(tokens[g]))
    return problems


def _check_total(root, var: str, g: int, name: str, shards: list[int], tokens: int | None) -> list[str]:
    total = _read(root[var], g)
    if total is None:
        return []
    expected = np.zeros_like(total)
    for s in shards:
        row = _read(root[f"shards/{var}"], (s, g))
        if row is None:
            return []  # a bad or missing row, reported already
        expected += row
    problems = []
    differ = int(np.sum(~((total == expected) | (np.isnan(total) & np.isnan(expected)))))
    if differ:
        problems.append(f"array '{var}' group '{name}': {differ} cells differ from the sum of its shards")
    if var == "active" and tokens is not None and ((total < 0) | (total > tokens)).any():
        problems.append(f"array 'active' group '{name}': {int(((total < 0) | (total > tokens)).sum())} cells "
                        f"outside 0..tokens ({tokens})")
    return problems
