"""The one-pass CPU statistics kernel (numba): each token's activation row is read once, from cache,
and added straight into the shard's float64/int64 accumulators.

The matrix-product path of :class:`harvester.stats.NeuronStats` reads the activation once per
statistic and writes temporaries of activation size; this kernel writes none. Every token is added in
float64, so its sums are as exact as a float64 loop over the float32 activations.
"""

from __future__ import annotations

import numba
import numpy as np

_NO_SUMS = np.zeros((0, 0, 0))  # a statistic not requested
_NO_COUNTS = np.zeros((0, 0, 0), np.int64)
_NO_HIST = np.zeros((0, 0, 0, 0), np.int64)
_NO_EDGES = np.zeros(0, np.float32)
_NO_RANGES = np.zeros((0, 0), np.float32)


@numba.njit(cache=True, nogil=True)
def _bin(edges, v, inv):
    """Number of edges ``<= v`` (``torch.bucketize(right=True)``); NaN goes to the last bin. With
    ``inv`` > 0 (evenly spaced edges, ``1 / spacing``) the bin is guessed from the value and then
    moved to the exact one by comparing with the edges themselves; otherwise a binary search."""
    n = edges.shape[0]
    if v != v:
        return n
    if inv > 0:
        f = (v - edges[0]) * inv
        j = 0 if f < 0 else (n if f >= n else int(f) + 1)
        while j > 0 and v < edges[j - 1]:
            j -= 1
        while j < n and edges[j] <= v:
            j += 1
        return j
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if v < edges[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


@numba.njit(cache=True, nogil=True)
def _floor_div(a, b):
    """``torch.div(a, b, rounding_mode="floor")`` of float32 scalars, in float32 (as NumPy's and Python's
    floor division: from ``fmod``, which is exact, so a quotient that rounds up to an integer is not
    taken for it)."""
    if b == 0:
        return a / b
    quotient = np.float32(a / b)
    floor = np.float32(np.floor(quotient))
    if floor != quotient:  # not an integer: no integer lies between it and the exact quotient (|q| < 2**24)
        return floor
    mod = np.float32(np.fmod(a, b))
    div = np.float32((a - mod) / b)
    if mod != 0 and (b < 0) != (mod < 0):
        div = np.float32(div - np.float32(1))
    if div == 0:
        return np.float32(np.copysign(np.float32(0), a / b))
    floor = np.float32(np.floor(div))
    if div - floor > 0.5:
        floor = np.float32(floor + np.float32(1))
    return floor


@numba.njit(cache=True, nogil=True)
def _range_bin(v, lo, width, inner):
    """The bin of ``v`` on a neuron's own range: ``floor((v - lo) / width) + 1`` clamped to
    ``0..inner+1`` (float32); NaN and +inf in the overflow bin ``inner + 1``, -inf in bin 0."""
    shifted = np.float32(v - lo)
    if shifted != shifted or shifted == np.inf:
        return inner + 1
    if shifted == -np.inf:
        return 0
    q = _floor_div(shifted, width)
    if q != q or q >= inner:
        return inner + 1
    if q < -1:
        return 0
    return int(q) + 1


@numba.njit(cache=True, nogil=True)
def _accumulate(x, slots, layer, active, nonzero, total, squares, absolute, hist, edges, inv, lo, width):
    """Add ``x [T, I]`` (float32) to row ``slots[t]`` (-1: skip) of each ``[S, L, I(, B)]``
    accumulator at ``layer``; accumulators of shape ``(0, 0, 0)`` are not requested. One simple loop
    per statistic over a row that sits in L1 keeps each loop vectorizable."""
    for t in range(x.shape[0]):
        s = slots[t]
        if s < 0:
            continue
        row = x[t]
        a = active[s, layer]
        for i in range(row.shape[0]):
            a[i] += row[i] > 0
        if nonzero.shape[0]:
            z = nonzero[s, layer]
            for i in range(row.shape[0]):
                z[i] += row[i] != 0
        if total.shape[0]:
            u = total[s, layer]
            for i in range(row.shape[0]):
                u[i] += row[i]
        if squares.shape[0]:
            q = squares[s, layer]
            for i in range(row.shape[0]):
                q[i] += np.float64(row[i]) * row[i]
        if absolute.shape[0]:
            b = absolute[s, layer]
            for i in range(row.shape[0]):
                b[i] += abs(row[i])
        if hist.shape[0] and lo.shape[0]:
            h, low, w, inner = hist[s, layer], lo[layer], width[layer], hist.shape[3] - 2
            for i in range(row.shape[0]):
                h[i, _range_bin(row[i], low[i], w[i], inner)] += 1
        elif hist.shape[0]:
            h = hist[s, layer]
            for i in range(row.shape[0]):
                h[i, _bin(edges, row[i], inv)] += 1


def accumulate(x: np.ndarray, slots: np.ndarray, layer: int, acc: dict[str, np.ndarray],
               edges: np.ndarray | None = None, inv: float = 0.0, lo: np.ndarray | None = None,
               width: np.ndarray | None = None) -> None:
    """Add one layer's activation ``x [T, I]`` (float32, C order) of tokens whose accumulator rows
    are ``slots [T]`` (int64, -1 = padding) to ``acc`` (``{stat: [S, L, I(, B)]}``, any subset of
    active/nonzero/sum/sqsum/abs/hist; active is required). ``edges``: float32 histogram edges, with
    ``inv = inverse_spacing(edges)``; or ``lo``, ``width``: float32 per-neuron ranges ``[L, I]`` of
    ``B - 2`` inner bins (:func:`_range_bin`)."""
    _accumulate(x, slots, layer, acc["active"], acc.get("nonzero", _NO_COUNTS), acc.get("sum", _NO_SUMS), acc.get("sqsum", _NO_SUMS),
                acc.get("abs", _NO_SUMS), acc.get("hist", _NO_HIST), _NO_EDGES if edges is None else edges, inv,
                _NO_RANGES if lo is None else lo, _NO_RANGES if width is None else width)


def inverse_spacing(edges: np.ndarray) -> float:
    """``1 / spacing`` when the edges are evenly spaced (to within rounding), else 0."""
    if edges.shape[0] < 2:
        return 0.0
    steps = np.diff(edges.astype(np.float64))
    step = (float(edges[-1]) - float(edges[0])) / (edges.shape[0] - 1)
    return 1.0 / step if np.allclose(steps, step, rtol=1e-3, atol=0) else 0.0
