"""``lsn harvest``, ``lsn summary``, ``lsn verify`` and ``lsn compact``: their options and what each runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harvester.config import HarvestOptions
from harvester.options import Command


def harvest(options: HarvestOptions, on_shard=None) -> None:
    """``on_shard()``: called after each shard this run finishes; ``--report-every``'s partial reports come from
    analysis/, which lsn's CLI passes here (:func:`analysis.cli.harvest_reporting`)."""
    from harvester.driver import harvest as run_harvest
    from harvester.summary import report_batches, report_losses, summarize

    store = run_harvest(options.config(), on_shard)
    print(summarize(str(store.path)))
    report_batches(str(store.path), store.attrs)
    report_losses(store.attrs)


@dataclass(kw_only=True)
class SummaryOptions:
    """``lsn summary``."""

    store: str
    """Zarr store directory or fsspec URL"""


def summary(options: SummaryOptions) -> None:
    from harvester.store import open_finished
    from harvester.summary import report_batches, report_losses, summarize

    print(summarize(options.store))
    attrs = open_finished(options.store)
    report_batches(options.store, attrs, fail=False)
    report_losses(attrs, fail=False)


@dataclass(kw_only=True)
class VerifyOptions:
    """``lsn verify STORE``."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("store",)
    store: str
    """Zarr store directory or fsspec URL"""
    repair: bool = False
    """mark exactly the damaged shards unfinished and clear stale totals, so that running the same harvest
    again re-harvests only those shards"""


def verify(options: VerifyOptions) -> None:
    from harvester.verify import run

    run(options.store, repair=options.repair)


@dataclass(kw_only=True)
class CompactOptions:
    """``lsn compact STORE``."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("store",)
    store: str
    """Zarr store directory or fsspec URL (a complete store)"""
    drop_shard_rows: bool = False
    """drop the shard rows of the statistics, after checking the totals against them (without it, only
    say what that would free); --bootstrap, lsn convergence and verify --repair need them, only a new
    harvest brings them back"""


def compact(options: CompactOptions) -> None:
    from harvester.compact import run

    run(options.store, drop=options.drop_shard_rows)


COMMANDS = {
    "harvest": Command("harvest per-neuron statistics into a Zarr store (resumable)", HarvestOptions, harvest),
    "summary": Command("per-group summary of a store", SummaryOptions, summary),
    "verify": Command("check a store in depth: every chunk's checksum, every finished shard's rows and digest, "
                      "the totals against their shards (one line per problem)", VerifyOptions, verify),
    "compact": Command("drop a complete store's shard rows (most of its bytes), keeping its totals; without "
                       "--drop-shard-rows, say what that would free", CompactOptions, compact),
}
