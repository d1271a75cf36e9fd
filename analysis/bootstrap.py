"""Bootstrap stability of a mask (``lsn analyze METHOD --bootstrap N [--seed S] [--stable F]``).

A harvest keeps every shard's rows, so a resample of the corpus is a choice of weights over the
shards (:mod:`analysis.shards`): resample ``b`` counts each shard as often as it was drawn. The
drawing protocol (:func:`draw_weights`), fixed so that the same seed gives the same masks:

- one ``numpy.random.default_rng(seed)`` draws the N resamples in turn, ``b = 0 .. N-1``;
- within a resample, the store's groups in store order: group ``g``'s ``n`` shards (``plan.rows(g)``,
  in plan order) are drawn ``n`` of ``n`` with replacement, ``rng.integers(0, n, size=n)``, and each
  shard's weight is how often it was drawn (stratified by group: every group keeps its own number of
  shards);
- groups that hold exactly the same shards (an EC40 direction's source and target sides, a prompt
  and its response: one stream carries both) share one draw, made at the first of them: a resampled
  target side keeps its source sentences, and each pair of sides is resampled as it was harvested,
  together. Groups whose shards differ (each language its own stream) are drawn independently;
- every store group is drawn, whichever languages the analysis takes, so the draws do not depend on
  ``--langs`` or ``--by``. A pooled language sums its groups' resampled rows.

Each resample's counts are the method's input as the totals are: the method runs unchanged on them
(on Dask, on the command's scheduler), and its mask is compared with the full-data mask.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from analysis.masks import Bootstrap, Mask
from harvester.errors import HarvestError

HOLD_BYTES = 512 << 20
"""A resample's activation counts (``K·L·I``, int32 where its tokens allow, else int64) are held in memory (``persist``) up to this size when
its method reads them in several passes (LAPE's quantile search): read once from the shard rows
instead of once per pass. Above it they are summed from the rows again at each pass."""


def check_options(resamples: int | None, stable: float, seed: int = 0) -> None:
    """``--bootstrap N``, ``--stable F`` and ``--seed S``, each refused in one line."""
    if resamples is not None and resamples < 1:
        raise HarvestError(f"--bootstrap must be 1 or more resamples, got {resamples}")
    if seed < 0:
        raise HarvestError(f"--seed must be 0 or more (numpy.random.default_rng), got {seed}")
    if not 0 < stable <= 1:
        raise HarvestError(f"--stable must lie in (0, 1], got {stable}")


def prepare(counts):
    """The store's shard plan, checked before any work: an error for a store without shard rows or for
    full-minus-prompt languages; a one-line warning for groups of a single shard."""
    from analysis.shards import check_recomputable, shard_plan

    check_recomputable(counts)
    plan = shard_plan(counts.store, counts.attrs, "--bootstrap")
    groups = [str(g) for g in counts.dataset["group"].values]
    single = sorted({groups[g] for idx in counts.index for g in idx if plan.rows(g).size == 1})
    if single:
        print(f"lsn: warning: {', '.join(single)} {'has' if len(single) == 1 else 'have'} a single shard: every "
              "resample of it is the full data (harvest with a smaller --shard-tokens for more shards)",
              file=sys.stderr)
    return plan


def draw_weights(plan, rng) -> np.ndarray:
    """One resample's weights ``[S, G]``: each store group's shards drawn with replacement, as many as it
    has, in store-group order; groups with exactly the same shards share the first one's draw."""
    weights = np.zeros(plan.tokens.shape, np.int64)
    drawn: dict[bytes, np.ndarray] = {}
    for g in range(plan.tokens.shape[1]):
        rows = plan.rows(g)
        if not rows.size:
            continue
        key = rows.tobytes()
        if key not in drawn:
            drawn[key] = np.bincount(rng.integers(0, rows.size, size=rows.size), minlength=rows.size)
        weights[rows, g] = drawn[key]
    return weights


def draws(plan, resamples: int, seed: int):
    """The weights of resamples ``0 .. N-1``, drawn in that order from ``default_rng(seed)``, one at a time
    as they are used (never all N at once: ``S·G`` each)."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield draw_weights(plan, rng)


def resampled(counts, plan, weights, hold: bool):
    """``counts`` recomputed from the shards with ``weights``; ``hold``: the activation counts computed
    once and kept (in memory, or on the cluster's workers) for the method's passes."""
    from analysis.shards import weighted

    again = weighted(counts, plan, weights)
    if not hold:
        return again
    numer = again.numer.astype(np.int32) if int(again.tokens.max()) < 2**31 else again.numer  # active <= tokens
    return replace(again, numer=numer.persist())


def stability(options, counts, plan, full: Mask) -> Bootstrap:
    """Run ``options``' method on ``options.bootstrap`` resamples of ``counts``: how often each unit is
    selected per language, and each resample's Jaccard to the ``full``-data mask."""
    from tqdm.auto import tqdm

    N, K = options.bootstrap, len(full.languages)
    hold = options.HOLD_ACTIVE and 8 * int(np.prod(counts.numer.shape)) <= HOLD_BYTES
    units = [np.zeros(0, np.int64) for _ in range(K)]
    times = [np.zeros(0, np.int64) for _ in range(K)]
    jaccard = np.zeros((N, K), np.float64)
    bar = tqdm(draws(plan, N, options.seed), total=N, desc=f"bootstrap {options.METHOD}", unit="resample",
               disable=options.no_progress, file=sys.stderr)
    for b, weights in enumerate(bar):
        mask = options.select(resampled(counts, plan, weights, hold))
        mask = mask if mask is not None else replace(full, selected=[np.zeros(0, np.int64)] * K, bootstrap=None)
        jaccard[b] = full.jaccard(mask)
        for k, sel in enumerate(mask.selected):
            units[k], times[k] = _tally(units[k], times[k], sel)
    groups = [str(g) for g in counts.dataset["group"].values]
    shards = {groups[g]: int(plan.rows(g).size) for idx in counts.index for g in idx}
    return Bootstrap(N, options.seed, options.stable, units, times, jaccard, shards)


def _tally(units: np.ndarray, times: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(units, times)`` with one more resample's ``selected`` counted (all sorted, unique): memory grows
    with the units ever selected, not with N."""
    merged, where = np.unique(np.concatenate([units, selected]), return_inverse=True)
    counted = np.bincount(where, weights=np.concatenate([times, np.ones(selected.size, np.int64)]),
                          minlength=merged.size)
    return merged.astype(np.int64), counted.astype(np.int64)


def summary(mask: Mask) -> list[str]:
    """One line per language: the Jaccard to the full-data mask (mean, 5-95 % band) and the stable count."""
    boot = mask.bootstrap
    head = (f"bootstrap: {boot.resamples} resamples (seed {boot.seed}); stable: selected in at least {boot.need} "
            f"of {boot.resamples} (--stable {boot.stable:g})")
    lines = [head]
    for lang, full, stable, (mean, lo, hi) in zip(mask.languages, mask.selected, boot.stable_selected(),
                                                  boot.band()):
        lines.append(f"  {lang}: Jaccard to the full-data mask {mean:.3f} (5-95%: {lo:.3f}-{hi:.3f}); "
                     f"stable {stable.size}, full {full.size}")
    return lines
