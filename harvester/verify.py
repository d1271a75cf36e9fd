"""``lsn verify``: a store checked in depth, one line per problem; ``--repair`` makes a damaged store
resumable.

Every chunk's crc32c, every chunk of a written array present, every finished shard's rows present and
equal to the digest written with them, the totals equal to the sum of their shards (bit for bit, in the
reduce's order), ``0 <= active <= tokens``, and every stream's token manifest readable. The store is
read chunk by chunk (one row or one group's totals in memory at a time).

A store ``lsn compact`` compacted has no shard rows: its totals are checked against the digest recorded
when they were checked against them, ``shards/done``, ``shards/tokens`` and ``shards/digest`` as before,
and it cannot be repaired (:func:`harvester.store.require_shard_rows`).

Repair marks the damaged shards unfinished, clears stale totals and removes the damaged chunks (a shard's
re-harvest, or the next reduce, writes them again), so that running the same harvest again re-harvests
exactly those shards and leaves a store equal to an undamaged run's.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harvester import fs, lease
from harvester.errors import HarvestError
from harvester.stats import VARIABLES, ranges_sha256
from harvester.store import (ShardDigest, Store, StoreAttrs, Totals, _zarr, read_attrs, read_hist_ranges,
                             require_shard_rows, tokens_dir, totals_sha256, zarr_store)
from harvester.windows import SHARDS_PER_STREAM, read_manifest


@dataclass(frozen=True)
class Problem:
    """One problem found, and what fixes it (a shard's re-harvest, the next reduce, or nothing lsn does)."""

    text: str
    shard: int | None = None
    """The shard whose re-harvest fixes it."""
    totals: bool = False
    """Fixed by the next reduce (the totals, or their record)."""
    key: str | None = None
    """A damaged chunk (its key in the store), removed by repair: rewritten by the harvest or the reduce."""

    @property
    def repairable(self) -> bool:
        return self.shard is not None or self.totals


def run(path: str, repair: bool = False) -> None:
    """``lsn verify STORE [--repair]``: one line per problem on stdout, an error if there is any (after a
    repair: if any is beyond repair)."""
    if repair:
        return _repair(path)
    problems, checked = inspect(path)
    for p in problems:
        print(f"{path}: {p.text}")
    if problems:
        step = (f"lsn verify --repair {path} marks the damaged shards for the same harvest to redo"
                if all(p.repairable for p in problems) else "some are beyond repair: harvest into a new --store")
        if read_attrs(path).compacted is not None:
            step = "lsn compact dropped its shard rows, which a repair needs: harvest into a new --store"
        raise HarvestError(f"store {path} is damaged: {len(problems)} problem(s), listed above; {step}")
    print(f"{checked}: no problem found")


def verify(path: str | Path) -> tuple[list[str], str]:
    """Check a store in depth. Returns one line per problem, and a line saying what was checked."""
    problems, checked = inspect(path)
    return [p.text for p in problems], checked


def inspect(path: str | Path) -> tuple[list[Problem], str]:
    """Every problem of the store at ``path`` with what fixes it, and a line saying what was checked."""
    from harvester.checked import checked

    attrs = read_attrs(path)
    if attrs is None:
        raise HarvestError(f"no store at {path}")
    if attrs.version < 2:
        raise HarvestError(f"store {path} has format version 1: it has no checksums or digests to verify")
    fsys, root_path = fs.filesystem(str(path))
    files = {f[len(root_path.rstrip("/")) + 1:]: f for f in fsys.find(root_path)}
    variables = attrs.settings.variables  # write_shard's order
    coords = ["group", "layer", "neuron", *(_hist_coords(attrs) if "hist" in variables else [])]
    expected = [*coords, "tokens", *variables, "shards/done", "shards/tokens", "shards/digest",
                *(f"shards/{v}" for v in variables)]
    gone = [Problem(f"array '{name}': its metadata (zarr.json) is missing") for name in expected
            if f"{name}/zarr.json" not in files]
    if gone:
        return gone, f"store {path}: arrays"
    root = _zarr().open_group(store=checked(zarr_store(path, read_only=True), str(path)), mode="r",
                              use_consolidated=False)
    foreign = _attrs_against_arrays(root, attrs, files)
    if foreign:  # what the attributes say cannot be trusted to check the rest by
        return foreign, f"store {path}: attributes against arrays"
    files, leftovers = _without_dropped(files, attrs)
    problems = _bad_checksums(fsys, files) + _bad_manifests(path, files)
    done = _done_shards(root, files)
    problems += _unplanned(path, files, done)
    if attrs.complete:
        for name, _ in root.arrays():
            problems += _missing_chunks(root[name], name, files)
    rows = [] if attrs.compacted else variables  # the shard rows checked: none once compacted
    shards, missing = _shard_tokens(root, done, files, rows)
    if attrs.compacted:
        problems += missing + _check_compacted(root, attrs)
    else:
        problems += missing + _check_rows(root, shards, variables, attrs.corpus.groups, attrs.complete)
    if attrs.complete:
        problems += _check_record(root, attrs, shards)
    n_chunks = sum(1 for key in files if _chunk_of(key))
    return problems, (f"store {path}: {n_chunks} chunks, {len(done)} finished shards"
                      + (", totals" if attrs.complete else " (harvest not finished: no totals)")
                      + (_compacted_note(path, attrs, leftovers) if attrs.compacted else ""))


def _without_dropped(files: dict[str, str], attrs: StoreAttrs) -> tuple[dict[str, str], int]:
    """A compacted store's files without the shard-row chunks lsn compact drops (those still there are the
    leftovers of an interrupted compact, never read), and how many those are."""
    if attrs.compacted is None:
        return files, 0
    dropped = tuple(f"shards/{var}/c/" for var in attrs.compacted.variables)
    kept = {key: full for key, full in files.items() if not key.startswith(dropped)}
    return kept, len(files) - len(kept)


def _compacted_note(path, attrs: StoreAttrs, leftovers: int) -> str:
    note = (f" (shard rows dropped by lsn compact on {attrs.compacted.date}: the totals are checked against the "
            "digest recorded then")
    if leftovers:
        note += f"; {leftovers} chunks of them an interrupted compact left: lsn compact {path} --drop-shard-rows drops them"
    return note + ")"


def _check_compacted(root, attrs: StoreAttrs) -> list[Problem]:
    """A compacted store's totals: ``0 <= active <= tokens``, and the digest recorded when lsn compact
    checked them against their shard rows (a chunk that is bad or missing is reported by the listing)."""
    tokens = _read(root["tokens"], slice(None))
    problems = []
    for g, name in enumerate(attrs.corpus.groups):
        for var in attrs.settings.variables:
            total = _read(root[var], g)
            if total is not None:
                problems += _compare_total(var, name, total, total, None if tokens is None else int(tokens[g]))
    try:
        digest = totals_sha256(root, attrs)
    except HarvestError:
        return problems
    if digest != attrs.compacted.totals_sha256:
        problems.append(Problem("totals: differ from the digest recorded when lsn compact checked them against their "
                                "shard rows", totals=True))
    return problems


def _attrs_against_arrays(root, attrs: StoreAttrs, files: dict[str, str]) -> list[Problem]:
    """The attributes describe these arrays: the same statistics, groups, layers, neurons and bins (an
    edited ``zarr.json`` is beyond repair: re-harvesting by it would rewrite good data)."""
    variables, lines = attrs.settings.variables, []
    for prefix in ("", "shards/"):
        for var in VARIABLES.values():
            if (var not in variables) and f"{prefix}{var}/zarr.json" in files:
                lines.append(f"array '{prefix}{var}' exists, but the attributes' settings.stats do not list it")
    groups = [str(g) for g in (_read(root["group"], slice(None)) if "group/c/0" in files else [])]
    if groups and groups != list(attrs.corpus.groups):
        lines.append(f"attributes: meta.corpus.groups {list(attrs.corpus.groups)[:4]} differ from the 'group' "
                     f"coordinate {groups[:4]}")
    shape = tuple(root[variables[0]].shape[1:3])
    if shape != (attrs.model.layers, attrs.model.width):
        lines.append(f"attributes: the model's layers x width {attrs.model.layers} x {attrs.model.width} differ "
                     f"from the arrays' {shape[0]} x {shape[1]}")
    if "hist" in variables:
        lines += _hist_bins(root, attrs)
    return [Problem(line) for line in lines]


def _hist_coords(attrs: StoreAttrs) -> list[str]:
    """The coordinates that say what a store's histogram bins are: fixed edges, or per-neuron ranges."""
    return ["hist_range_lo", "hist_range_width"] if attrs.settings.hist_ranges else ["hist_lo", "hist_hi"]


def _hist_bins(root, attrs: StoreAttrs) -> list[str]:
    """The histogram's bins are those the attributes describe: as many as the edges say, or the per-neuron
    ranges' inner bins plus two, with the ranges the fingerprint's digest names."""
    bins, record = root["hist"].shape[-1], attrs.settings.hist_ranges
    if record is None:
        edges = len(attrs.settings.hist_edges)
        return [] if bins == edges + 1 else [f"attributes: {edges} histogram edges for {bins} bins"]
    lines = [] if bins == record.bins + 2 else [f"attributes: {record.bins} inner histogram bins (+2) for {bins} bins"]
    try:
        ranges = read_hist_ranges(root)
    except HarvestError as err:
        return [*lines, f"per-neuron histogram ranges: {err}"]
    if ranges_sha256(*ranges) != record.ranges_sha256:
        lines.append("arrays 'hist_range_lo', 'hist_range_width': the per-neuron histogram ranges differ from those "
                     f"the harvest computed from {record.store} (their sha256 in the attributes)")
    return lines


def _unplanned(path, files: dict[str, str], done: list[int]) -> list[Problem]:
    """Shards marked done that their stream's plan (its manifest) does not have: copied in from elsewhere."""
    planned, streams = set(), set()
    for key in (k for k in files if re.fullmatch(r"tokens/\d+\.json", k)):
        try:
            manifest = read_manifest(f"{tokens_dir(path)}/{key.rpartition('/')[2]}")
        except HarvestError:
            continue  # reported by _bad_manifests
        streams.add(int(key.rpartition("/")[2][:-len(".json")]))
        planned.update(int(info["index"]) for info in manifest["shards"])
    return [Problem(f"shard {i}: marked done, but stream {i // SHARDS_PER_STREAM}'s plan has no such shard", shard=i)
            for i in done if i // SHARDS_PER_STREAM in streams and i not in planned]


def _chunk_of(key: str):
    from harvester.checked import chunk_of

    return chunk_of(key) if not key.startswith("tokens/0") else None  # not the token shards (Parquet)


def _problem(text: str, array: str, index: tuple, key: str | None = None) -> Problem:
    """A problem of chunk ``index`` of ``array``: a shard's rows are redone by its re-harvest, the totals by
    the next reduce; the coordinates by nothing lsn does."""
    if array.startswith("shards/"):
        return Problem(text, shard=index[0], key=key)
    if array == "tokens" or array in VARIABLES.values():
        return Problem(text, totals=True, key=key)
    return Problem(text, key=key)


def _bad_checksums(fsys, files: dict[str, str]) -> list[Problem]:
    from harvester.checked import checksum_ok

    bad = []
    for key, full in sorted(files.items()):
        where = _chunk_of(key)
        if where and not checksum_ok(fsys.cat_file(full)):
            bad.append(_problem(f"array '{where[0]}' chunk {where[1]}: fails its crc32c checksum", *where, key=key))
    return bad


def _bad_manifests(path, files: dict[str, str]) -> list[Problem]:
    """Stream manifests that cannot be read (the harvest refuses them; it does not rebuild them)."""
    bad = []
    for key in sorted(k for k in files if re.fullmatch(r"tokens/\d+\.json", k)):
        try:
            read_manifest(f"{tokens_dir(path)}/{key.rpartition('/')[2]}")
        except HarvestError as err:
            bad.append(Problem(str(err)))
    return bad


def _missing_chunks(array, name: str, files: dict[str, str], prefix: tuple = ()) -> list[Problem]:
    """Chunks of ``array`` (those under ``prefix``) that were written and are gone."""
    import itertools

    grid = [range(n) for n in array.cdata_shape[len(prefix):]]
    return [_problem(f"array '{name}' chunk {prefix + idx}: is missing", name, prefix + idx)
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


def _shard_tokens(root, done: list[int], files: dict[str, str], variables: list[str]) -> tuple[dict, list[Problem]]:
    """Each done shard's tokens row (None where unreadable), and its missing chunks: tokens, digest, and
    the rows of its groups with tokens."""
    tokens, problems = {}, []
    for index in done:
        problems += _missing_chunks(root["shards/tokens"], "shards/tokens", files, (index,))
        problems += _missing_chunks(root["shards/digest"], "shards/digest", files, (index,))
        tokens[index] = _read(root["shards/tokens"], index)
        for g in np.flatnonzero(tokens[index] > 0) if tokens[index] is not None else []:
            for var in variables:
                problems += _missing_chunks(root[f"shards/{var}"], f"shards/{var}", files, (index, int(g)))
    return tokens, problems


def _check_rows(root, shards: dict, variables: list[str], groups: list[str], totals: bool) -> list[Problem]:
    """Every done shard's rows (groups with tokens) read once, in the reduce's order (group, variable,
    shard): each shard's digest recomputed as ``write_shard`` made it and, with ``totals``, each group's
    totals compared with the sum of its shards (bit for bit) and ``0 <= active <= tokens``."""
    readable = {s: t for s, t in shards.items() if t is not None}
    digests = {s: ShardDigest() for s in readable}
    tokens = _read(root["tokens"], slice(None)) if totals else None
    problems = []
    for g, name in enumerate(groups):
        for var in variables:
            total = _read(root[var], g) if totals and len(readable) == len(shards) else None
            expected = None if total is None else np.zeros_like(total)
            for s in (s for s, t in readable.items() if t[g] > 0):
                row = _read(root[f"shards/{var}"], (s, g))
                if row is None:  # bad or missing: reported by the listing already
                    digests[s] = expected = None
                    continue
                if digests[s] is not None:
                    digests[s].add(row)
                if expected is not None:
                    expected += row
            if expected is not None:
                problems += _compare_total(var, name, total, expected, None if tokens is None else int(tokens[g]))
    for s, digest in digests.items():
        stored = _read(root["shards/digest"], s)
        if digest is not None and stored is not None:
            if digest.digest(readable[s]) != bytes(stored):
                problems.append(Problem(f"shard {s}: its rows do not match the digest written with them", shard=s))
    return problems


def _compare_total(var: str, name: str, total, expected, tokens: int | None) -> list[Problem]:
    problems = []
    differ = int(np.sum(~((total == expected) | (np.isnan(total) & np.isnan(expected)))))
    if differ:
        problems.append(f"array '{var}' group '{name}': {differ} cells differ from the sum of its shards")
    if var in ("active", "nonzero") and tokens is not None and ((total < 0) | (total > tokens)).any():
        problems.append(f"array '{var}' group '{name}': {int(((total < 0) | (total > tokens)).sum())} cells "
                        f"outside 0..tokens ({tokens})")
    return [Problem(line, totals=True) for line in problems]


def _check_record(root, attrs: StoreAttrs, shards: dict) -> list[Problem]:
    """The totals were reduced from the shards marked done, and the tokens equal their sum and the record."""
    lines = []
    record = attrs.totals
    if record is None or record.shards_sha256 != Totals.of(list(shards), []).shards_sha256:
        lines.append(f"totals: reduced from {record and record.shards} shards, but {len(shards)} are marked done "
                     "(not the same shards)")
    groups = attrs.corpus.groups
    tokens = _read(root["tokens"], slice(None))
    if tokens is not None and all(t is not None for t in shards.values()):
        summed = np.sum([t for t in shards.values()], axis=0, dtype=np.int64) if shards else np.zeros(len(groups), np.int64)
        for g in np.flatnonzero(tokens != summed):
            lines.append(f"array 'tokens' group '{groups[g]}': {tokens[g]}, but its shards sum to {summed[g]}")
    if tokens is not None and record is not None and tuple(int(n) for n in tokens) != tuple(record.tokens):
        lines.append("array 'tokens': differs from the tokens recorded when the totals were reduced")
    return [Problem(line, totals=True) for line in lines]


# -- repair ----------------------------------------------------------------------------------------
def _repair(path: str) -> None:
    """``lsn verify --repair``: under the store's lease, verify, then (if all damage is repairable) clear
    stale totals, mark the damaged shards unfinished and remove the damaged chunks, in that order, so
    that a repair killed at any point leaves a store that verify still flags or that is consistent."""
    try:
        if read_attrs(path) is None:
            raise HarvestError(f"no store at {path}")
    except HarvestError as err:
        raise HarvestError(f"{err}; lsn verify --repair cannot fix this: harvest into a new --store") from None
    with lease.acquire(path, say=lambda text: print(f"lsn: {text}", file=sys.stderr)) as held:
        require_shard_rows(read_attrs(path), path, "lsn verify --repair")  # under the lease: no compact runs
        problems, checked = inspect(path)
        for p in problems:
            print(f"{path}: {p.text}" + ("" if p.repairable else " (beyond repair)"))
        beyond = [p for p in problems if not p.repairable]
        if beyond:
            raise HarvestError(f"store {path} has {len(beyond)} problem(s) lsn verify --repair cannot fix (marked "
                               "above); nothing was changed: harvest into a new --store")
        if problems:
            held.check()  # still ours: nothing is written otherwise
            shards = _apply(Store(path), problems)
            print(f"{path}: repaired; run the same lsn harvest again (--store {path}) to re-harvest "
                  f"{len(shards)} shard(s) and sum the totals")
            return
        print(f"{checked}: no problem found; nothing to repair")
        if not read_attrs(path).complete:
            print(f"{path}: harvest not finished: run the same lsn harvest again (--store {path}) to finish it")


def _apply(store: Store, problems: list[Problem]) -> list[int]:
    """The writes of a repair, in a kill-safe order; one line per action. Returns the shards marked."""
    shards: dict[int, str] = {}
    for p in problems:
        if p.shard is not None:
            shards.setdefault(p.shard, p.text)
    if (shards or any(p.totals for p in problems)) and (store.complete or store.attrs.totals is not None):
        reason = next((p.text for p in problems if p.totals), f"shards {sorted(shards)} are redone")
        store.set_attrs(complete=False, totals=None)  # first: no reader takes the totals from here on
        print(f"{store.path}: totals: cleared (store marked not complete, totals record dropped; {reason})")
    done = store.array("shards/done")
    for index, reason in sorted(shards.items()):
        done[index] = 0  # before its chunks go: a shard never counts as finished without them
        print(f"{store.path}: shard {index}: marked unfinished ({reason})")
    fsys, root_path = fs.filesystem(store.path)
    for p in problems:
        if p.key is not None and not p.key.startswith("shards/done/"):  # a done chunk was just rewritten
            fsys.rm(f"{root_path.rstrip('/')}/{p.key}")
            array, index = _chunk_of(p.key)
            by = "the next reduce" if p.totals else f"shard {p.shard}'s re-harvest"
            print(f"{store.path}: array '{array}' chunk {index}: removed (damaged; {by} writes it again)")
    return sorted(shards)
