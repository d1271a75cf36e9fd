"""The published neuron-selection methods, exactly as docs/METHODS.md defines them, out of core.

Inputs are Dask arrays ``[K, L, I]`` (language, layer, neuron) read chunk by chunk from the store.
What is large (``P`` over all languages, layers and neurons: 183M values for a Llama-3-70B-shaped
store of 80 groups) is never held in memory: per-neuron scores are reduced over languages one
language at a time (``[L, I]``, 2.3M values for 70B, is small; the sums run in language order, as
the reference's), and the global quantiles ``τ`` and ``β`` are found
exactly by histogram refinement (:func:`kth_smallest`). Top-k selections then run in memory on the
per-neuron scores, with ties going to the smaller flat index ``l * I + i``.

Conventions where the papers are silent are those of ``tests/method_reference.py`` (the plain-loop
reference every method is tested against): ``round`` is Python's; the r-th smallest is
``sorted(values)[r-1]`` and a rank outside ``1..N`` is an error; entropy-λ's Ĥ is 0 when K = 1; a
group with 0 tokens has P = 0.
"""

from __future__ import annotations

import math

import numpy as np

from harvester.errors import HarvestError

_GATHER = 1 << 21  # values gathered into memory at the end of a quantile search (16 MiB)
_BINS = 4096


def _compute(*arrays):
    import dask

    return dask.compute(*arrays)


# -- exact order statistics --------------------------------------------------------------------
def kth_smallest(x, r: int) -> float:
    """``sorted(x.ravel())[r - 1]``, exactly, reading ``x`` (a Dask array) a few times, never whole.

    Each pass histograms the values of the current bracket ``[lo, hi)`` into 4096 bins and narrows the
    bracket to the bin holding rank ``r``; when a bracket holds at most 2M values they are gathered
    and sorted, and when all its values are equal, that value is the answer.
    """
    import dask.array as da

    n = int(np.prod(x.shape))
    if not 1 <= r <= n:
        raise HarvestError(f"rank {r} is outside 1..{n}: the rate gives no value to take")
    lo = hi = None
    closed = True  # the bracket [lo, hi] (last bin) or [lo, hi)
    for _ in range(64):
        if lo is None:
            inside, count = x, n
        else:
            cond = (x >= lo) & ((x <= hi) if closed else (x < hi))
            inside, count = x[cond], da.count_nonzero(cond)
        count, vmin, vmax = _compute(count, inside.min(), inside.max())
        if float(vmin) == float(vmax):
            return float(vmin)
        if int(count) <= _GATHER:
            (values,) = _compute(inside)
            return float(np.sort(np.asarray(values, dtype=np.float64).ravel())[r - 1])
        edges = np.linspace(float(vmin), float(vmax), _BINS + 1)
        (hist,) = _compute(da.histogram(inside, bins=edges)[0])
        cumulative = np.cumsum(hist)
        j = int(np.searchsorted(cumulative, r))  # the first bin whose cumulative count reaches r
        r -= int(cumulative[j - 1]) if j > 0 else 0
        lo, hi, closed = float(edges[j]), float(edges[j + 1]), j == _BINS - 1
    raise HarvestError("quantile search did not converge")  # pragma: no cover: 64 passes of 4096 bins


def smallest(score: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` smallest of ``score`` (ties: smaller flat index first)."""
    flat = np.asarray(score, dtype=np.float64).ravel()
    if not 0 <= count <= flat.size:
        raise HarvestError(f"cannot select {count} of {flat.size} units")
    return np.argsort(flat, kind="stable")[:count]


def largest(score: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` largest (ties: smaller flat index first); NaN never selected."""
    flat = np.asarray(score, dtype=np.float64).ravel()
    valid = np.flatnonzero(~np.isnan(flat))
    order = valid[np.argsort(-flat[valid], kind="stable")]
    return order[:max(count, 0)]


def _rows(P):
    """Each language's ``P[k]`` (``[L, I]``, small) in turn: reductions over languages run as plain
    loops in language order, in the same order as the reference, holding a few ``[L, I]`` arrays."""
    for k in range(P.shape[0]):
        (row,) = _compute(P[k])
        yield np.asarray(row, dtype=np.float64)


def _membership(P, selected: np.ndarray, beta: float) -> list[np.ndarray]:
    """LAPE step 5: language k gets the selected neurons with ``P > β`` (sorted flat indices)."""
    K, L, I = P.shape
    selected = np.sort(selected)
    if selected.size == 0:
        return [np.zeros(0, np.int64) for _ in range(K)]
    (values,) = _compute(P.reshape(K, L * I)[:, selected])
    return [selected[values[k] > beta].astype(np.int64) for k in range(K)]


# -- LAPE ------------------------------------------------------------------------------------
def lape_entropy(P, tau: float) -> np.ndarray:
    """LAPE steps 1-3: ``H [L, I]`` (natural log; +inf without any ``P > τ``). Two passes over the store."""
    total, above = None, None
    for row in _rows(P):
        total = row.copy() if total is None else total + row
        above = row > tau if above is None else above | (row > tau)
    H = np.zeros_like(total)
    with np.errstate(divide="ignore", invalid="ignore"):
        for row in _rows(P):
            q = np.where(total > 0, row / total, 0.0)  # step 1
            H -= np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)  # step 2: 0 ln 0 = 0
    return np.where(above, H, np.inf)  # step 3


def lape(P, top_rate: float = 0.01, filter_rate: float = 0.95, bar_ratio: float = 0.95) -> dict:
    """LAPE (Tang et al. 2024): per language, the lowest-entropy neurons among the most active.

    ``{"selected": [per-language flat indices], "tau", "beta"}``."""
    K, L, I = P.shape
    N = K * L * I
    tau = kth_smallest(P, round(filter_rate * N))  # step 3
    beta = tau if round(bar_ratio * N) == round(filter_rate * N) else kth_smallest(P, round(bar_ratio * N))
    H = lape_entropy(P, tau)
    chosen = smallest(H, round(top_rate * L * I))  # step 4
    return {"selected": _membership(P, chosen, beta), "tau": tau, "beta": beta}  # steps 5-6


def lape_variant(P, rate: float = 0.01, filter_rate: float = 0.95, bar_ratio: float = 0.95) -> dict:
    """Mondal et al.'s LAPE variant: every neuron with entropy at most the m-th smallest (ties included)."""
    K, L, I = P.shape
    N = K * L * I
    tau = kth_smallest(P, round(filter_rate * N))
    H = lape_entropy(P, tau)
    m = round(rate * L * I)
    if m == 0:
        return {"selected": [np.zeros(0, np.int64) for _ in range(K)], "threshold": None, "tau": tau}
    threshold = float(np.sort(H.ravel())[m - 1])
    chosen = np.flatnonzero(H.ravel() <= threshold)
    beta = kth_smallest(P, round(bar_ratio * N))
    return {"selected": _membership(P, chosen, beta), "threshold": threshold, "tau": tau, "beta": beta}


# -- entropy-λ -------------------------------------------------------------------------------
def harmonic_c(K: int) -> float:
    return sum(1.0 / j for j in range(1, K + 1)) / K


class EntropyLambda:
    """Entropy-λ (Zhang et al. 2025): low-entropy neurons, a threshold λ on the normalised entropy.

    Everything that does not depend on λ is computed once: Ĥ, ``max_k P`` and, per neuron, how many languages have
    ``P > β`` (which is all ``appear`` needs)."""

    def __init__(self, P, top_rate: float = 0.01, bar_ratio: float = 0.95):
        K, L, I = P.shape
        self.P, self.K, self.top_rate = P, K, top_rate
        self.beta = kth_smallest(P, round(bar_ratio * K * L * I))  # step 5
        self.H, self.maxP, self.n_langs = self._scores(P, K)
        self.count = round(top_rate * L * I)

    def _scores(self, P, K: int):
        """Ĥ, ``max_k P`` and the number of languages with ``P > β``, in three passes over the store."""
        total = maxP = n_langs = None
        for row in _rows(P):
            total = row.copy() if total is None else total + row
            maxP = row.copy() if maxP is None else np.maximum(maxP, row)
            n_langs = (row > self.beta).astype(np.int64) if n_langs is None else n_langs + (row > self.beta)
        with np.errstate(divide="ignore", invalid="ignore"):
            floor_sum = np.zeros_like(total)
            for row in _rows(P):
                floor_sum += np.maximum(np.where(total > 0, row / total, 1.0 / K), 1e-12)  # steps 1-2
            acc = np.zeros_like(total)
            for row in _rows(P):
                q = np.maximum(np.where(total > 0, row / total, 1.0 / K), 1e-12) / floor_sum
                acc += q * np.log(q + 1e-30)
        H = -acc / math.log(K) if K > 1 else np.zeros_like(total)
        return H, maxP, n_langs

    def chosen(self, lam: float) -> np.ndarray:
        score = self.H - lam * self.maxP / harmonic_c(self.K)  # step 3
        return smallest(score, self.count)  # step 4

    def appear(self, lam: float) -> list[int]:
        langs = self.n_langs.ravel()[self.chosen(lam)]
        appear = np.bincount(langs, minlength=self.K + 1).tolist()[:self.K + 1]
        appear[0] = 0
        return appear

    def masks(self, lam: float) -> list[np.ndarray]:
        return _membership(self.P, self.chosen(lam), self.beta)

    def autosweep(self, lo: float = 0.0, hi: float = 0.2, eps: float = 1e-3) -> tuple[float | None, list[int]]:
        """Entropy-λ with λ found: the largest λ in [lo, hi] with no neuron shared by all languages.

        Step 7: ``appear[K] = 0``; ``(None, appear at lo)`` if none."""
        if lo > hi:
            raise HarvestError(f"--lo {lo} is above --hi {hi}")
        K = self.K
        appear = self.appear(hi)
        if appear[K] == 0:
            return hi, appear
        appear_lo = self.appear(lo)
        if appear_lo[K] != 0:
            return None, appear_lo
        best, best_appear = lo, appear_lo
        for _ in range(64):
            if not hi - lo > eps:
                break
            mid = (lo + hi) / 2
            appear = self.appear(mid)
            if appear[K] == 0:
                best, best_appear, lo = mid, appear, mid
            else:
                hi = mid
        return best, best_appear


# -- activation-probability thresholds ---------------------------------------------------------
def _top(row: np.ndarray, m: int) -> np.ndarray:
    """One language's ``m`` largest scores over all layers (ties by flat index, zeros included), sorted."""
    return np.sort(largest(row, m)).astype(np.int64)


def act_prob_zero(P, rate: float = 0.00125) -> dict:
    """Per language, the neurons most often active (> 0): its top ``round(rate * L * I)``."""
    _, L, I = P.shape
    m = round(rate * L * I)
    return {"selected": [_top(row, m) for row in _rows(P)]}


def _pooled_position(pooled, percent):
    """``[l, i, 3]``: :func:`analysis.histogram.percentile_position` of each pooled histogram, stacked."""
    from analysis.histogram import percentile_position

    return np.stack(percentile_position(pooled, percent), axis=-1).astype(np.int64)


def _share_block(h, position, percent, tokens):
    """One block of a language's score: its share of tokens above the percentile (``position`` the
    pooled one, or None: the language's own)."""
    from analysis.histogram import percentile_position, share_above

    j, g, inside = percentile_position(h, percent) if position is None else np.moveaxis(position, -1, 0)
    return share_above(h, j, g, inside) / (100 * max(int(tokens), 1))


PERCENTILE_OF = ("pooled", "own", "batch-mean")


def act_prob_90p_scores(hist, tokens: np.ndarray, percent: int = 90, percentile_of: str = "pooled", pool=None):
    """Each language's ``act_prob_90p`` score ``[L, I]`` in turn (float64), one pass over its histograms.
    ``pool``: Dask ``[L, I, B]``, the histograms the pooled percentile is taken of (every harvested group;
    without it, the languages of ``hist``)."""
    import dask.array as da

    if percentile_of not in ("pooled", "own"):
        raise HarvestError(f"a histogram's --percentile-of is pooled or own, not '{percentile_of}'")
    hist = hist.rechunk({3: -1})  # a percentile needs each histogram whole
    chunks = hist.chunks[1:3] + ((3,),)
    position = None
    if percentile_of == "pooled":  # [L, I, 3], small: read once, then one pass per language
        pool = hist.sum(axis=0) if pool is None else pool.rechunk(hist.chunks[1:])
        (position,) = _compute(pool.map_blocks(_pooled_position, percent, chunks=chunks, dtype=np.int64))
        position = da.from_array(position, chunks=chunks)
    for k in range(hist.shape[0]):
        if position is None:
            score = hist[k].map_blocks(_share_block, None, percent, tokens[k], drop_axis=2, dtype=np.float64)
        else:
            score = da.map_blocks(_share_block, hist[k], position, percent, tokens[k], drop_axis=2, dtype=np.float64)
        (score,) = _compute(score)
        yield np.asarray(score, dtype=np.float64)


def act_prob_90p(hist, tokens: np.ndarray, percent: int = 90, rate: float = 0.00125,
                 percentile_of: str = "pooled", pool=None) -> dict:
    """Per language, the neurons most often above a percentile of their activations (histogram, interpolated).

    Score: the share of each language's tokens above the neuron's ``percent`` percentile, of all
    harvested groups pooled (``pooled``) or of the language's own tokens (``own``). The percentile is
    interpolated linearly inside the bin that holds it (:mod:`analysis.histogram`), and of that bin
    the language's tokens above it count ``1 - f``, its fraction of the bin above the percentile; a
    percentile on a bin edge gives the exact share. With ``own`` every neuron with tokens then scores
    exactly ``1 - percent/100``, so the ranking is the ties' (by flat index): see README. Each
    language keeps its top ``round(rate * L * I)``. ``hist`` is Dask ``[K, L, I, B]``; ``pool`` the pooled
    histograms ``[L, I, B]`` of every harvested group (without it, of the languages in ``hist``)."""
    _, L, I, _ = hist.shape
    m = round(rate * L * I)
    scores = act_prob_90p_scores(hist, tokens, percent, percentile_of, pool)
    return {"selected": [_top(score, m) for score in scores]}


def act_prob_90p_batch_mean(above, tokens: np.ndarray, rate: float = 0.00125) -> dict:
    """Per language, the neurons most often above its own mean batch percentile (Mondal et al.'s code).

    Score: ``above / tokens``, the share of the language's tokens whose activation exceeds the language's
    mean over batches of per-batch percentiles (a harvest with ``--thresholds-from`` a ``batch_quantile``
    store counts ``above``). Each language keeps its top ``round(rate * L * I)``, ties by flat index.
    ``above`` is Dask int64 ``[K, L, I]``."""
    _, L, I = above.shape
    m = round(rate * L * I)
    selected = []
    for k in range(above.shape[0]):
        (count,) = _compute(above[k])
        selected.append(_top(np.asarray(count, dtype=np.float64) / max(int(tokens[k]), 1), m))
    return {"selected": selected}


# -- coverage --------------------------------------------------------------------------------
COVERAGE_RULES = ("reach", "within")
"""Where a coverage prefix ends: ``reach``, the shortest prefix whose cumulative count reaches ``k`` of
the layer's total (Tan et al.'s ``get_ns_masks.py``: ``cumsum >= target``, that neuron included);
``within``, every neuron whose cumulative share, its own count included, is at most ``k`` (the Aya
study's ``cumsum / total <= threshold``): one neuron fewer unless a prefix hits ``k`` exactly."""


def _coverage_block(block, k, rule):
    out = np.zeros(block.shape, dtype=bool)
    for g in range(block.shape[0]):
        for l in range(block.shape[1]):
            counts = block[g, l].astype(np.int64)
            order = np.lexsort((np.arange(counts.size), -counts))  # largest first, ties by index
            cumulative = np.cumsum(counts[order])
            total = int(cumulative[-1]) if cumulative.size else 0
            if rule == "within":  # float64 share as the reference divides; a zero total keeps nothing
                n_keep = int(np.sum(cumulative / total <= k)) if total else 0
            else:
                n_keep = int(np.argmax(np.concatenate([[0], cumulative]) >= k * total))  # shortest prefix reaching it
            out[g, l, order[:n_keep]] = True
    return out


def coverage(active, k: float = 0.95, rule: str = "reach") -> dict:
    """Per group and layer, the fewest most-active neurons whose counts reach a share k of the layer's total."""
    if not 0 <= k <= 1:
        raise HarvestError(f"--coverage {k} must lie in [0, 1]")
    if rule not in COVERAGE_RULES:
        raise HarvestError(f"--rule must be one of {', '.join(COVERAGE_RULES)}, not '{rule}'")
    K, L, I = active.shape
    blocks = active.rechunk((1, active.chunks[1], I)).map_blocks(_coverage_block, k, rule, dtype=bool)
    selected = []
    for g in range(K):
        (dense,) = _compute(blocks[g])
        selected.append(np.flatnonzero(dense.ravel()).astype(np.int64))
    return {"selected": selected}


# -- localizer -------------------------------------------------------------------------------
def welch_t(n_a: int, s_a, ss_a, n_b: int, s_b, ss_b) -> np.ndarray:
    """Welch's t from moments (unbiased variances, clipped at 0); NaN with n < 2 or a zero denominator."""
    s_a, ss_a, s_b, ss_b = (np.asarray(v, dtype=np.float64) for v in (s_a, ss_a, s_b, ss_b))
    if n_a < 2 or n_b < 2:
        return np.full(s_a.shape, np.nan)
    mean_a, mean_b = s_a / n_a, s_b / n_b
    var_a = np.maximum((ss_a - s_a * s_a / n_a) / (n_a - 1), 0.0)
    var_b = np.maximum((ss_b - s_b * s_b / n_b) / (n_b - 1), 0.0)
    denominator = np.sqrt(var_a / n_a + var_b / n_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (mean_a - mean_b) / denominator, np.nan)


def unit_count(percent: float, n: int, rule: str = "round") -> int:
    """How many of ``n`` units ``percent`` % is: ``round(percent * n / 100)``, or the localizer reference's
    ``int((percent / 100) * n)`` (truncated, in its order of operations)."""
    if rule == "int":
        return int((percent / 100) * n)
    if rule == "round":
        return round(percent * n / 100)
    raise HarvestError(f"unknown count rule '{rule}'; choose round or int")


def largest_with_ties(score: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of every unit whose score is among the ``count`` largest distinct scores (the
    reference's dense rank from ``np.unique``): all ties are in, so more than ``count`` may be; NaN never."""
    flat = np.asarray(score, dtype=np.float64).ravel()
    valid = ~np.isnan(flat)
    distinct = np.unique(flat[valid])
    if count <= 0 or not distinct.size:
        return np.zeros(0, np.int64)
    return np.flatnonzero(valid & (flat >= distinct[-min(count, distinct.size)]))


def top_units(score: np.ndarray, count: int, ties: str = "index") -> np.ndarray:
    """The ``count`` largest (``ties="index"``: ties to the smaller flat index) or every unit tied with
    them (``ties="all"``)."""
    if ties == "index":
        return largest(score, count)
    if ties == "all":
        return largest_with_ties(score, count)
    raise HarvestError(f"unknown tie rule '{ties}'; choose index or all")


def localizer(count: np.ndarray, sums, sqsums, a: list[int], b: list[int], top_percent: float,
              per_layer: bool = False, statistic: str = "t", rule: str = "round", ties: str = "index") -> dict:
    """Localizer: the units most selective for condition A over B (Welch t or mean difference).

    Units whose statistic (Welch ``t``, or ``mean-diff``) of A (groups ``a`` pooled) over B is in the top
    ``top_percent`` %, globally or per layer: :func:`unit_count` by ``rule``, :func:`top_units` by ``ties``.
    ``sums``/``sqsums`` Dask ``[K, L, U]``. ``count`` in the result is the number asked for before ties."""
    n_a, n_b = int(sum(count[g] for g in a)), int(sum(count[g] for g in b))
    s_a, ss_a, s_b, ss_b = _compute(sums[a].sum(axis=0), sqsums[a].sum(axis=0),
                                    sums[b].sum(axis=0), sqsums[b].sum(axis=0))
    if statistic == "t":
        score = welch_t(n_a, s_a, ss_a, n_b, s_b, ss_b)
    elif statistic == "mean-diff":
        score = s_a / n_a - s_b / n_b if n_a and n_b else np.full(s_a.shape, np.nan)
    else:
        raise HarvestError(f"unknown localizer statistic '{statistic}'; choose t or mean-diff")
    L, U = score.shape
    if per_layer:
        k = unit_count(top_percent, U, rule)
        chosen = np.concatenate([top_units(score[l], k, ties) + l * U for l in range(L)])
        k *= L
    else:
        k = unit_count(top_percent, L * U, rule)
        chosen = top_units(score, k, ties)
    return {"selected": [np.sort(chosen).astype(np.int64)], "score": score, "n_a": n_a, "n_b": n_b, "count": k}


# -- random controls -------------------------------------------------------------------------
def random_control(mask_selected: list[np.ndarray], n_layers: int, width: int, seed: int,
                   scope: str = "layer", generator: str = "default", sizes: list[int] | None = None) -> list[np.ndarray]:
    """Random control: per language, as many random neurons as a mask has, outside it.

    ``scope="layer"``: per layer, as many as the mask has in that layer, from the layer's neurons not in it;
    ``"global"``: ``sizes[k]`` (default: the mask's size) from all neurons not in language ``k``'s mask, as
    the localizer reference's ``random_mask.py`` does. Uniform, without replacement, with
    ``numpy.random.default_rng(seed)`` or (``generator="legacy"``) ``numpy.random.seed(seed)``'s generator,
    the reference's, so that its seeds draw the same units."""
    if seed < 0:
        raise HarvestError(f"--seed must be 0 or more, got {seed}")
    if generator not in ("default", "legacy"):
        raise HarvestError(f"unknown generator '{generator}'; choose default or legacy")
    rng = np.random.RandomState(seed) if generator == "legacy" else np.random.default_rng(seed)
    if scope == "global":
        sizes = sizes if sizes is not None else [len(sel) for sel in mask_selected]
        return [_draw(rng, np.arange(n_layers * width), sel, n, "all layers") for sel, n in zip(mask_selected, sizes)]
    if scope != "layer":
        raise HarvestError(f"unknown scope '{scope}'; choose layer or global")
    out = []
    for sel in mask_selected:
        layer_of = sel // width
        drawn = [_draw(rng, np.arange(width), sel[layer_of == layer] - layer * width,
                       int(np.sum(layer_of == layer)), f"layer {layer}") + layer * width for layer in range(n_layers)]
        out.append(np.concatenate(drawn).astype(np.int64) if drawn else np.zeros(0, np.int64))
    return out


def _draw(rng, units: np.ndarray, taken: np.ndarray, n: int, where: str) -> np.ndarray:
    """``n`` of ``units`` not in ``taken`` (ascending, as the reference lists them), sorted."""
    free = np.setdiff1d(units, taken, assume_unique=True)
    if n > free.size:
        raise HarvestError(f"{where}: cannot draw {n} of {free.size} free neurons")
    return np.sort(rng.choice(free, size=n, replace=False)).astype(np.int64)
