"""DLN (distribution-aware language neurons, EMNLP 2026), as docs/METHODS.md section "DLN" steps 3-5
define it after the study's code (mjkmain/Distribution-aware-language-neurons, ``src/method/overlap.py``
and ``select_neurons.py``).

Input: Dask ``hist [K, L, I, B]`` (language, layer, neuron, bin; under- and overflow bins included) in the
store's chunks. One pass over it, a block of layers and all neurons of every language at a time, gives
each neuron's pairwise overlaps ``S[k, k'] = Σ_b min(pmf_k, pmf_k')`` for ``k < k'`` (float64, kept as
float32): ``[L, I, K(K-1)/2]``, 84 bytes a neuron for 7 languages (38 MB at Llama-3-8B's 32 × 14,336),
held in memory; the histograms never are. The bipartitions and the threshold then run on those.

The bin edges do not enter: the overlap compares bin by bin, whatever the bins are.
"""

from __future__ import annotations

import contextlib
import sys
from itertools import combinations

import numpy as np

from harvester.errors import HarvestError

DEFAULT_PCT = 1.0
"""The study's default bottom percentile P (``select_neurons.py --pct``)."""

MAX_LANGUAGES = 12
"""Every neuron is scored on each of its ``2^(K-1) - 1`` bipartitions (2047 for 12 languages)."""

_BLOCK_BYTES = 1 << 22  # float64 pmf values of all languages at once (4 MiB: in cache, 2-3x faster than 64)


def bipartitions(K: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The non-trivial ``(A, B)`` with ``|A| <= K // 2``, by size then ``combinations`` order; of an even
    split only those with language 0 in ``A`` (each bipartition once: 63 for 7 languages)."""
    out = []
    for size in range(1, K // 2 + 1):
        for A in combinations(range(K), size):
            if 2 * size == K and 0 not in A:
                continue
            out.append((A, tuple(k for k in range(K) if k not in A)))
    return out


def pairs(K: int) -> list[tuple[int, int]]:
    """The language pairs ``k < k'`` in row order (``torch.triu_indices(K, K, 1)``'s)."""
    return [(a, b) for a in range(K) for b in range(a + 1, K)]


def _overlap_block(*blocks: np.ndarray) -> np.ndarray:
    """``[l, i, K(K-1)/2]`` float32 overlaps of one block of each language's histograms ``[l, i, B]``."""
    K = len(blocks)
    l, n, B = blocks[0].shape
    out = np.empty((l, n, K * (K - 1) // 2), dtype=np.float32)
    step = max(1, _BLOCK_BYTES // max(8 * K * l * B, 1))  # neurons at a time
    language_pairs = pairs(K)
    for start in range(0, n, step):
        cut = slice(start, start + step)
        pmf = []
        for block in blocks:
            h = np.asarray(block[:, cut], dtype=np.float64)
            pmf.append(h / np.maximum(h.sum(axis=-1, keepdims=True), 1e-12))
        for p, (a, b) in enumerate(language_pairs):
            out[:, cut, p] = np.minimum(pmf[a], pmf[b]).sum(axis=-1)
    return out


def overlaps(hist) -> np.ndarray:
    """Every neuron's pairwise overlaps ``[L, I, K(K-1)/2]`` (float32), in one pass over ``hist``."""
    import dask.array as da
    from dask.diagnostics import ProgressBar

    from analysis.methods import _compute

    K = hist.shape[0]
    rows = [hist[k].rechunk({2: -1}) for k in range(K)]
    chunks = rows[0].chunks[:2] + ((K * (K - 1) // 2,),)
    lazy = da.map_blocks(_overlap_block, *rows, chunks=chunks, dtype=np.float32)
    bar = ProgressBar(minimum=2.0, dt=0.5, out=sys.stderr) if sys.stderr.isatty() else contextlib.nullcontext()
    with bar:  # on a terminal, once it takes 2 s (Dask's local schedulers)
        (values,) = _compute(lazy)
    return np.asarray(values, dtype=np.float32)


def best_bipartition(S: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, the first bipartition (index into :func:`bipartitions`) of least cost ``max_{k∈A,
    k'∈B} S[k, k']``, and that cost (float32). ``S``: ``[..., K(K-1)/2]`` as :func:`overlaps` gives."""
    index = {pair: p for p, pair in enumerate(pairs(K))}
    best = np.full(S.shape[:-1], np.inf, dtype=np.float32)
    choice = np.zeros(S.shape[:-1], dtype=np.int64)
    for p, (A, B) in enumerate(bipartitions(K)):
        cross = [index[min(a, b), max(a, b)] for a in A for b in B]
        cost = S[..., cross].max(axis=-1)
        better = cost < best  # strictly: the first of equal costs stays (argmin's first index)
        best = np.where(better, cost, best)
        choice = np.where(better, p, choice)
    return choice, best


def threshold(S: np.ndarray, pct: float) -> tuple[float, int, int]:
    """``(τ, n, r)``: τ the ``r``-th smallest of the ``n`` pairwise overlaps of all neurons,
    ``r = max(1, int(n · pct / 100))`` (the study's ``kthvalue``)."""
    values = S.reshape(-1)
    n = values.size
    if n == 0:
        raise HarvestError("no pairwise overlap to take a threshold of (no neurons)")
    r = max(1, int(n * pct / 100.0))  # at most n for pct <= 100
    return float(np.partition(values, r - 1)[r - 1]), n, r


def dln(hist, pct: float = DEFAULT_PCT) -> dict:
    """DLN: neurons whose languages split in two sides that overlap as little as the bottom P percent of overlaps.

    ``hist`` Dask ``[K, L, I, B]``. ``{"selected": [per language, sorted flat indices], "chosen": every
    selected flat index, "side": its bipartition (index into "parts", :func:`bipartitions`), "tau", "n" (the
    pairwise overlaps), "rank"}``: a selected neuron is in the list of every language of its side ``A``."""
    K, L, I = hist.shape[:3]
    if K < 2:
        raise HarvestError(f"DLN splits a neuron's languages in two; it needs at least 2 languages, got {K}")
    if K > MAX_LANGUAGES:
        raise HarvestError(f"DLN scores every neuron on each of its 2^(K-1) - 1 bipartitions; {K} languages "
                           f"make {2 ** (K - 1) - 1}: choose at most {MAX_LANGUAGES} with --langs")
    if not 0 <= pct <= 100:
        raise HarvestError(f"--pct must lie in [0, 100], got {pct}")
    S = overlaps(hist).reshape(L * I, -1)
    tau, n, rank = threshold(S, pct)
    choice, cost = best_bipartition(S, K)
    chosen = np.flatnonzero(cost <= np.float32(tau))
    parts = bipartitions(K)
    side = choice[chosen]
    selected = [chosen[np.isin(side, [p for p, (A, _) in enumerate(parts) if k in A])].astype(np.int64)
                for k in range(K)]
    return {"selected": selected, "side": side, "chosen": chosen, "parts": parts, "tau": tau, "n": n,
            "rank": rank}


def populations(result: dict, names: list[str]) -> dict:
    """SLN and MLN counts per language, their totals, the count of each side ``A`` (``de+fr``), and of the
    neurons whose split halves an even number of languages (``even``: listed under language 0's side), from
    :func:`dln`'s result."""
    parts = result["parts"]
    out = {"sln": {name: 0 for name in names}, "mln": {name: 0 for name in names}, "sln_total": 0, "mln_total": 0,
           "sides": {}, "even": 0}
    for p, count in zip(*np.unique(result["side"], return_counts=True)):
        A, kind = parts[int(p)][0], "sln" if len(parts[int(p)][0]) == 1 else "mln"
        for k in A:
            out[kind][names[k]] += int(count)
        out[f"{kind}_total"] += int(count)
        out["even"] += int(count) if 2 * len(A) == len(names) else 0  # neither side the smaller
        out["sides"]["+".join(names[k] for k in A)] = int(count)
    return out
