"""Counts recomputed from a store's shard rows instead of its totals.

A harvest keeps every shard's rows (``shards/<var> [shard, group, layer, neuron(, bin)]``) besides the
totals reduced from them. :func:`shard_plan` finds the shards the totals were summed from (checked
against the digest of their indices that the reduce recorded) and :func:`weighted` gives the same
languages as a :class:`analysis.data.Counts`, with each shard counted a chosen number of times per
store group: ``weights[s, g]``, 0 to leave it out, 2 to count it twice. Every method then reads them
as it reads the totals. A bootstrap resample draws each group's shards with replacement (their
multiplicities are the weights); a prefix of the plan (weights 1 for a group's first ``k`` shards) is
what the harvest had summed after them. With every weight 1 the counts are the totals (integer
statistics exactly; float sums up to the order of summation, which follows the reduce's).

While a harvest still runs, :func:`partial_plan` and :func:`partial_counts` give the same over the shards
marked done so far, PARTIAL and unchecked (there are no totals yet): ``lsn harvest --report-every``'s look.

A shard is one chunk row per group, so ``--shard-tokens`` sets the granularity: a group of ``n``
tokens has about ``n / shard_tokens`` shards to resample or to grow a prefix by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from harvester.errors import HarvestError


@dataclass(frozen=True)
class ShardPlan:
    """The shards a store's totals were reduced from, in plan order (ascending index: stream by
    stream, each stream's shards in order)."""

    indices: np.ndarray
    """int64 ``[S]``: the shards' indices in the store."""
    tokens: np.ndarray
    """int64 ``[S, G]``: each shard's tokens per store group."""

    def rows(self, group: int) -> np.ndarray:
        """Positions (into :attr:`indices`) of the shards that hold tokens of store group ``group``: the
        rows the reduce summed for it, in plan order."""
        return np.flatnonzero(self.tokens[:, group] > 0)

    def ones(self) -> np.ndarray:
        """Weights ``[S, G]`` that count every shard once (the totals)."""
        return (self.tokens > 0).astype(np.int64)


def _finished(path: str) -> list[int]:
    """Indices of the shards whose ``done`` chunk says 1 (listing the chunk files: the dimension has
    room for far more shards than are written)."""
    from harvester import fs

    fsys, root = fs.filesystem(path)
    prefix = f"{root.rstrip('/')}/shards/done/c"
    names = [f.rpartition("/")[2] for f in (fsys.find(prefix) if fsys.exists(prefix) else [])]
    listed = sorted(int(n) for n in names if n.isdigit())
    done = _shard_array(path, "done")
    return [i for i in listed if int(done[i]) == 1]


def require_shard_rows(path: str, attrs, what: str) -> None:
    """The one place that decides whether the store at ``path`` still keeps the shard rows its totals were
    summed from (every reader of shard rows goes through :func:`shard_plan`, which calls it first): not an
    import, and not compacted (``what`` names the command that needs them)."""
    from harvester import store

    store.require_shard_rows(attrs, path, what)
    totals = attrs.totals
    if totals is None or totals.shards == 0:
        raise HarvestError(f"store {path} keeps no shard rows (its totals were imported or written without "
                           "shards): resampling and prefixes need a harvested store")


def shard_plan(path: str, attrs, what: str = "resampling or growing the shards") -> ShardPlan:
    """The shards the totals of the finished store at ``path`` were summed from; an error when the store
    keeps none (an import) or its finished shards are not those (the store was changed since)."""
    require_shard_rows(path, attrs, what)
    totals = attrs.totals
    indices = _finished(path)
    if hashlib.sha256(json.dumps(indices).encode()).hexdigest() != totals.shards_sha256:
        raise HarvestError(f"store {path}: its finished shards ({len(indices)}) are not those its totals were "
                           f"summed from ({totals.shards}); lsn verify {path} lists every problem")
    plan = _plan(path, indices, len(totals.tokens))
    if tuple(int(n) for n in plan.tokens.sum(axis=0)) != tuple(totals.tokens):
        raise HarvestError(f"store {path}: its shards' tokens do not sum to its totals; lsn verify {path} "
                           "lists every problem")
    return plan


def _plan(path: str, indices: list[int], n_groups: int) -> ShardPlan:
    """The plan of the shards ``indices`` (in that order), their tokens read from the store."""
    array = _shard_array(path, "tokens")
    tokens = [np.asarray(array[i], np.int64) for i in indices]
    return ShardPlan(np.asarray(indices, np.int64),
                     np.stack(tokens) if tokens else np.zeros((0, n_groups), np.int64))


def partial_plan(path: str, n_groups: int) -> ShardPlan:
    """The shards of the store at ``path`` marked done so far, while its harvest may still run: PARTIAL,
    not checked against any totals (there are none yet), for a look at the data harvested so far
    (``lsn harvest --report-every``), never for results. A shard counts only once its ``done`` chunk says
    1, which a worker writes after the shard's rows and digest."""
    return _plan(path, _finished(path), n_groups)


def partial_counts(path: str, langs: list[str] | None = None, by: str | None = None):
    """PARTIAL counts of a store whose harvest may still run: its languages (as :func:`analysis.data.open_counts`
    chooses them) over the shards finished so far (:func:`partial_plan`), read from the shard rows;
    nothing is written."""
    from analysis.data import open_counts

    counts = open_counts(path, langs, by=by, unfinished=True)
    plan = partial_plan(path, len(counts.attrs.corpus.groups))
    return weighted(counts, plan, plan.ones())


def _summed_block(block, array=None, terms=(), block_info=None):
    """One chunk of :func:`weighted_rows`: the chunk's slice of every ``(shard, group, weight)`` row of
    ``array``, summed in the order of ``terms`` (``block`` only gives its shape and dtype)."""
    where = tuple(slice(lo, hi) for lo, hi in block_info[None]["array-location"])
    total = np.zeros(block.shape, block.dtype)
    for shard, group, weight in terms:
        row = np.asarray(array[(shard, group, *where)]).astype(block.dtype, copy=False)
        total += row if weight == 1 else row * weight
    return total


def _shard_array(path: str, name: str):
    """The store's array ``shards/<name>``, every chunk read checked."""
    from harvester.checked import checked
    from harvester.store import _zarr, zarr_store

    try:
        return _zarr().open_array(store=checked(zarr_store(path, read_only=True), path), path=f"shards/{name}",
                                  mode="r")
    except FileNotFoundError:
        raise HarvestError(f"store {path} has no shard rows of '{name}'") from None


def weighted_rows(path: str, name: str, plan: ShardPlan, weights: np.ndarray, groups: list[int]):
    """Dask ``[L, I(, B)]``: the rows of statistic ``name`` of the store groups ``groups``, each shard
    ``s`` counted ``weights[s, g]`` times, summed in plan order (group by group, as the reduce does;
    integer rows in int64). One task per chunk reads its slice of every row: the graph does not grow
    with the shards."""
    import dask.array as da
    from dask.base import tokenize

    array = _shard_array(path, name)
    terms = tuple((int(plan.indices[s]), int(g), int(weights[s, g])) for g in groups for s in plan.rows(g)
                  if weights[s, g])
    dtype = np.dtype(np.int64) if array.dtype.kind in "iu" else array.dtype
    zeros = da.zeros(array.shape[2:], dtype=dtype, chunks=array.chunks[2:])
    if not terms:
        return zeros
    return zeros.map_blocks(_summed_block, array=array, terms=terms, dtype=dtype,
                            name=f"shards-{name}-{tokenize(path, terms)}")


def check_recomputable(counts) -> None:
    """Refuse languages that are not sums of store groups (full minus prompt, imported from two runs)."""
    if any(counts.subtracted):
        raise HarvestError("full-minus-prompt languages (imported from two runs) cannot be recomputed from "
                           "shards; name groups harvested in one store")


def weighted(counts, plan: ShardPlan, weights: np.ndarray):
    """``counts`` (its languages and groups) recomputed with each shard ``s`` counted ``weights[s, g]``
    times for store group ``g`` (``int [S, G]``)."""
    import dask.array as da

    check_recomputable(counts)
    weights = np.asarray(weights, np.int64)
    if weights.shape != plan.tokens.shape or (weights < 0).any():
        raise ValueError(f"weights must be non-negative [shards, groups] {plan.tokens.shape}, got {weights.shape}")
    tokens = np.array([sum(int(weights[:, g] @ plan.tokens[:, g]) for g in idx) for idx in counts.index], np.int64)
    numer = da.stack([weighted_rows(counts.store, "active", plan, weights, idx) for idx in counts.index])
    return replace(counts, numer=numer, denom=np.maximum(tokens, 1), tokens=tokens,
                   shards=(plan, weights))
