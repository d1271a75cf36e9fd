"""Percentiles read from the store's histograms, and the share of counts above them: one rule for the
analysis (``act_prob_90p``) and the interventions (``--mode p10|p90``).

Bins are the harvest's: bin 0 is ``x < e[0]``, bin ``j`` is ``e[j-1] <= x < e[j]``, the last bin is
``x >= e[-1]``. The ``percent`` percentile of ``n`` counts lies in the first bin whose cumulative count
reaches the rank ``percent/100 · n`` (compared in integers when ``percent`` is an integer, so a rank on
a bin edge is found exactly), at the fraction ``f`` of that bin's counts below it: inside the bin the
counts are taken as spread uniformly (the CDF is linear there). Everything else follows from ``f``:
the value is ``lo + f · (hi - lo)``, and the counts above it are those of the bins above plus
``1 - f`` of the bin's own. When the rank falls on the bin's upper edge, ``f = 1`` and both are exact.
"""

from __future__ import annotations

import numpy as np


def percentile_position(hist, percent) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the ``percent`` percentile of each histogram ``hist [..., B]`` lies: ``(j, g, inside)``.

    ``j`` the bin reaching the rank, ``inside`` its count, and ``g = 100 · cum[j] - percent · n`` the
    counts of the bin above the percentile, in hundredths (``1 - f = g / (100 · inside)``). Integer
    ``hist`` and ``percent`` give exact integers. An empty histogram gives ``j = 0``, ``g = inside = 0``.
    """
    hist = np.asarray(hist)
    cumulative = np.cumsum(hist, axis=-1)
    total = cumulative[..., -1:]
    reached = 100 * cumulative >= percent * total
    j = np.argmax(reached, axis=-1)[..., None]  # the first bin whose cumulative count reaches the rank
    g = 100 * np.take_along_axis(cumulative, j, -1) - percent * total
    inside = np.take_along_axis(hist, j, -1)
    return j[..., 0], g[..., 0], inside[..., 0]


def share_above(hist, j, g, inside) -> np.ndarray:
    """Counts of ``hist [..., B]`` above a percentile at ``(j, g, inside)`` (:func:`percentile_position`
    of this or another histogram over the same bins), times 100: the bins above ``j`` whole, and of bin
    ``j`` the share above the percentile, ``hist[j] / inside · g``. Float64, in this order of operations
    (the plain reference repeats it), so that a histogram against its own percentile gives exactly
    ``(100 - percent) · n`` whatever ``j``."""
    hist = np.asarray(hist)
    j = np.asarray(j)[..., None]
    bins = np.arange(hist.shape[-1])
    above = np.where(bins > j, hist, 0).sum(axis=-1).astype(np.float64)
    here = np.take_along_axis(hist, j, -1)[..., 0].astype(np.float64)
    inside = np.asarray(inside, dtype=np.float64)
    part = np.divide(here, inside, out=np.zeros_like(here), where=inside > 0)
    return 100 * above + part * np.asarray(g, dtype=np.float64)


def hist_quantile(hist, edges, percent) -> np.ndarray:
    """Per unit, the ``percent`` percentile of a histogram ``hist [..., B]`` over bins with ``edges [B-1]``
    (the same for every unit, or each unit's own, ``[..., B-1]``: :func:`bin_edges`).

    Linear inside a closed bin (:func:`percentile_position`); the open-ended first and last bins give
    their one edge. A unit with no counts gives NaN.
    """
    hist = np.asarray(hist)
    edges = np.asarray(edges, dtype=np.float64)
    j, g, inside = percentile_position(hist, percent)
    lo = np.concatenate([edges[..., :1], edges], axis=-1)
    hi = np.concatenate([edges, edges[..., -1:]], axis=-1)
    lo, hi = (np.take_along_axis(np.broadcast_to(e, hist.shape), j[..., None], -1)[..., 0] for e in (lo, hi))
    inside = inside.astype(np.float64)
    above = np.divide(np.asarray(g, dtype=np.float64), 100 * inside, out=np.zeros_like(inside), where=inside > 0)
    out = lo + np.clip(1 - above, 0, 1) * (hi - lo)
    return np.where(hist.sum(axis=-1) > 0, out, np.nan)


def bin_edges(ds) -> np.ndarray:
    """The inner edges of a store's histogram bins (Dataset ``ds``): ``[B-1]`` for fixed edges (the
    coordinate ``hist_lo`` is ``(-inf, e0, e1, ...)``), or ``[layer, neuron, B-1]`` on per-neuron ranges
    (``hist_range_lo + k · hist_range_width``, ``k = 0..B-2``; bins 0 and ``B-1`` are the open ends)."""
    if "hist_range_lo" not in ds.coords:
        return np.asarray(ds["hist_lo"].values[1:], dtype=np.float64)
    lo = np.asarray(ds["hist_range_lo"].values, dtype=np.float64)[..., None]
    width = np.asarray(ds["hist_range_width"].values, dtype=np.float64)[..., None]
    return lo + width * np.arange(ds.sizes["bin"] - 1)
