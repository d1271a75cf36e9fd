"""``lsn compact STORE [--drop-shard-rows]``: drop the shard rows of a complete store's statistics.

A store keeps every finished shard's rows (``shards/<var>``) besides the totals summed from them: a
killed harvest resumes from them, ``lsn verify`` checks the totals against them, and resampling
analyses (``--bootstrap``, ``lsn convergence``) read them. For a large harvest, histograms above all,
they are most of the store. Without ``--drop-shard-rows`` this says what dropping them would free and
changes nothing; with it, under the store's lease:

1. the whole store is verified (:func:`harvester.verify.inspect`): the totals equal the sum of their
   shards bit for bit, every digest and checksum holds; any problem refuses, since the rows are the
   only copy the totals can be repaired from;
2. ``compacted`` is recorded in the attributes (:class:`harvester.store.Compacted`, with the sha256 of
   the checked totals), before anything is deleted: from then on no reader trusts a missing row;
3. the chunks of ``shards/<var>`` are deleted (their metadata, ``shards/done``, ``shards/tokens``,
   ``shards/digest``, the totals and the token shards stay).

A compact killed at any point leaves the totals as they were; once step 2 is done the store reads as
compacted, and running ``lsn compact --drop-shard-rows`` again deletes the rows left.
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass, field

from harvester import fs, lease
from harvester.errors import HarvestError
from harvester.store import Compacted, Store, StoreAttrs, read_attrs, totals_sha256

FLAG = "--drop-shard-rows"
_READERS = ("lsn analyze METHOD --bootstrap and lsn convergence read these rows, and lsn verify checks the totals "
            "against them (once they are dropped, against a digest of the totals recorded then); only a new "
            "harvest brings them back")


@dataclass
class Footprint:
    """What a store holds on disk: per statistic, its shard-row chunk files (path: bytes) and rows
    ((shard, group) pairs); the bytes of everything kept, by kind."""

    files: dict[str, dict[str, int]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(sum(files.values()) for files in self.files.values())

    @property
    def n_rows(self) -> int:
        return sum(self.rows.values())


def footprint(path: str, attrs: StoreAttrs) -> Footprint:
    """The store at ``path`` on disk, from one listing."""
    fsys, root = fs.filesystem(path)
    root = root.rstrip("/")
    out = Footprint(files={var: {} for var in attrs.settings.variables}, rows={var: 0 for var in attrs.settings.variables},
                    kept={"totals": 0, "shards": 0, "tokens": 0})
    rows = {var: set() for var in attrs.settings.variables}
    for full, info in fsys.find(root, detail=True).items():
        key = full[len(root) + 1:]
        parts = key.split("/")
        if len(parts) > 4 and parts[0] == "shards" and parts[1] in out.files and parts[2] == "c":
            out.files[parts[1]][full] = int(info["size"])
            rows[parts[1]].add((parts[3], parts[4]))
        else:
            kind = "shards" if parts[0] == "shards" else "tokens" if key.startswith("tokens/0") else "totals"
            out.kept[kind] += int(info["size"])
    out.rows = {var: len(pairs) for var, pairs in rows.items()}
    return out


def run(path: str, drop: bool = False) -> None:
    """``lsn compact STORE``: what dropping the shard rows frees (an error telling the flag that does it),
    or, with ``drop``, drop them."""
    attrs = _compactable(path)
    if not drop:
        return _plan(path, attrs, footprint(path, attrs))
    with lease.acquire(path, say=lambda text: print(f"lsn: {text}", file=sys.stderr)) as held:
        attrs = _compactable(path)  # again, now that no one else writes it
        found = footprint(path, attrs)
        if not found.n_rows:
            print(_nothing_to_drop(path, attrs))
            return
        if attrs.compacted is None:
            _check(path)
            held.check()  # still ours: nothing is written otherwise
            _record(path, found)
        else:
            print(f"store {path}: compacted on {attrs.compacted.date}; dropping the {found.n_rows} shard rows an "
                  "interrupted lsn compact left")
        _drop(path, found)


def _compactable(path: str) -> StoreAttrs:
    attrs = read_attrs(path)
    if attrs is None:
        raise HarvestError(f"no store at {path}")
    if attrs.version < 2:
        raise HarvestError(f"store {path} has format version 1 (no checksums or digests) and is read-only: lsn "
                           "compact cannot check its totals against its shard rows")
    if not attrs.complete:
        raise HarvestError(f"store {path} is not complete (its harvest did not finish): its shard rows are all it "
                           "has until the totals are summed from them; run the same lsn harvest again to finish it")
    return attrs


def _nothing_to_drop(path: str, attrs: StoreAttrs) -> str:
    if attrs.compacted is not None:
        return (f"store {path}: compacted on {attrs.compacted.date} (freed {size(attrs.compacted.freed_bytes)}); "
                "no shard rows are left: nothing to drop")
    return f"store {path}: it holds no shard rows (an imported store, or none were written): nothing to drop"


def _plan(path: str, attrs: StoreAttrs, found: Footprint) -> None:
    """What dropping the shard rows would free, and an error telling the flag that does it."""
    if not found.n_rows:
        print(_nothing_to_drop(path, attrs))
        return
    total = found.dropped + sum(found.kept.values())
    state = (f"compacted on {attrs.compacted.date}, with rows an interrupted lsn compact left" if attrs.compacted
             else f"complete ({attrs.totals.shards} finished shards)")
    print(f"store {path}: {state}; dropping its shard rows would free {size(found.dropped)} of {size(total)}:")
    _rows(found)
    kept = found.kept
    print(f"  kept: the totals, coordinates and metadata ({size(kept['totals'])}); shards/done, shards/tokens and "
          f"shards/digest ({size(kept['shards'])}); the token shards and manifests ({size(kept['tokens'])})")
    print(_READERS)
    raise HarvestError(f"nothing was changed: lsn compact {path} {FLAG} drops them"
                       + ("" if attrs.compacted else " (after checking the totals against them)"))


def _rows(found: Footprint, verb: str = "") -> None:
    width = max(len(v) for v in found.files) + len("shards/")
    for var, files in found.files.items():
        print(f"  {verb}{'shards/' + var:<{width}} {found.rows[var]:>7} rows {size(sum(files.values())):>12}")


def _check(path: str) -> None:
    """Refuse (one line) unless the whole store verifies: the totals against their shard rows above all."""
    from harvester.verify import inspect

    problems, checked = inspect(path)
    if problems:
        raise HarvestError(f"store {path} does not verify ({len(problems)} problem(s); the first: {problems[0].text}): "
                           "nothing was dropped, since the shard rows are the only copy the totals can be repaired "
                           f"from; lsn verify {path} lists every problem, and --repair then the same harvest fix them")
    print(f"{checked}: no problem found (the totals equal the sum of their shard rows)")


def _record(path: str, found: Footprint) -> None:
    """Record the compaction (and the checked totals' digest) before the first row goes."""
    store = Store(path)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    store.set_attrs(compacted=Compacted(date=date, variables=tuple(found.files), rows=found.n_rows,
                                        freed_bytes=found.dropped, totals_sha256=totals_sha256(store.root, store.attrs)))
    print(f"store {path}: recorded as compacted (its shard rows are no longer read), dropping them:")


def _drop(path: str, found: Footprint) -> None:
    """Delete the shard-row chunks ``found`` lists, statistic by statistic; one line each, then the total."""
    fsys, root = fs.filesystem(path)
    for var, files in found.files.items():
        top = f"{root.rstrip('/')}/shards/{var}/c"
        if files:
            fsys.rm(top, recursive=True)
    _rows(found, "dropped ")
    left = sum(found.kept.values())
    print(f"store {path}: freed {found.dropped:,} bytes ({size(found.dropped)}, {found.n_rows} shard rows); it now "
          f"takes {size(left)}: the totals and everything else are kept")


def size(n: int) -> str:
    """``n`` bytes, as ``1.5 GiB``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError
