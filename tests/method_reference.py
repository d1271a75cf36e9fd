"""Plain reference implementations of the neuron-selection methods in docs/METHODS.md.

The ground truth for the out-of-core analysis: explicit loops over in-memory NumPy arrays,
following the published definitions step by step (the step numbers in comments are docs/METHODS.md's).
Nothing here is fast; everything here should be obviously right.

Conventions (the documented behaviour the analysis must reproduce):
- Inputs are group-first like the store: ``active [K, L, I]``, ``tokens [K]``,
  ``hist [K, L, I, B]``, moments ``[K, L, U]``.
- ``P`` is an array of shape ``[L, I, K]`` indexed ``P[l, i, k]``, exactly as docs/METHODS.md writes it.
- All arithmetic is float64. ``round`` is Python's (half to even) applied to the float64 product,
  e.g. ``round(filter_rate * N)``; "the r-th smallest" is ``sorted(values)[r - 1]`` and a rank
  outside ``1..len(values)`` raises ``ValueError``.
- Ties on a score go to the smaller flat index ``l * I + i`` (``l * U + u`` for localizer units).
- A mask is ``mask[k][l]``: a list over groups of lists over layers of sorted ``int`` neuron
  indices; a group with nothing selected has an empty list in every layer.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------- probabilities


def probabilities(active, tokens):
    """``P[l, i, k] = active[k, l, i] / tokens[k]``; a group with 0 tokens has P = 0 (denominator max(tokens, 1))."""
    active = np.asarray(active)
    K, L, I = active.shape
    P = np.zeros((L, I, K), dtype=np.float64)
    for k in range(K):
        denominator = max(int(tokens[k]), 1)
        for l in range(L):
            for i in range(I):
                P[l, i, k] = int(active[k, l, i]) / denominator
    return P  # [layer, neuron, group]


def response_only(active_full, tokens_full, active_prompt, tokens_prompt):
    """``P = max(active_full - active_prompt, 0) / max(tokens_full - tokens_prompt, 1)``, as ``[L, I, K]``."""
    active_full, active_prompt = np.asarray(active_full), np.asarray(active_prompt)
    K, L, I = active_full.shape
    P = np.zeros((L, I, K), dtype=np.float64)
    for k in range(K):
        denominator = max(int(tokens_full[k]) - int(tokens_prompt[k]), 1)
        for l in range(L):
            for i in range(I):
                P[l, i, k] = max(int(active_full[k, l, i]) - int(active_prompt[k, l, i]), 0) / denominator
    return P


# ---------------------------------------------------------------- shared helpers


def kth_smallest(values, r: int) -> float:
    """``sorted(values)[r - 1]``; r outside 1..len(values) raises (e.g. round(filter_rate·N) = 0)."""
    values = [float(v) for v in np.asarray(values).ravel()]
    if not 1 <= r <= len(values):
        raise ValueError(f"rank {r} is outside 1..{len(values)}")
    return sorted(values)[r - 1]


def smallest_flat(score, count: int) -> list[int]:
    """Flat indices ``l*I + i`` of the ``count`` smallest scores of ``score [L, I]``, ties by flat index."""
    flat = [float(v) for v in np.asarray(score).ravel()]
    if not 0 <= count <= len(flat):
        raise ValueError(f"cannot select {count} of {len(flat)} neurons")
    return sorted(range(len(flat)), key=lambda f: (flat[f], f))[:count]


def largest_flat(score, count: int) -> list[int]:
    """Flat indices of the ``count`` largest scores, ties by flat index; NaN is never selected."""
    flat = [float(v) for v in np.asarray(score).ravel()]
    if count < 0:
        raise ValueError(f"cannot select {count} neurons")
    candidates = [f for f in range(len(flat)) if not math.isnan(flat[f])]
    return sorted(candidates, key=lambda f: (-flat[f], f))[:count]


def membership_mask(P, selected_flat, beta: float) -> list[list[list[int]]]:
    """LAPE step 5-6: a selected neuron belongs to every k with ``P[l, i, k] > beta``; sorted per layer."""
    L, I, K = P.shape
    mask = [[[] for _ in range(L)] for _ in range(K)]
    for f in selected_flat:
        l, i = divmod(f, I)
        for k in range(K):
            if P[l, i, k] > beta:
                mask[k][l].append(i)
    return [[sorted(layer) for layer in lang] for lang in mask]


def appearances(mask, L: int, I: int) -> list[int]:
    """Entropy-λ step 6: ``appear[c]`` = pairs (l, i) in exactly c masks, for pairs in at least one."""
    K = len(mask)
    appear = [0] * (K + 1)
    for l in range(L):
        for i in range(I):
            c = sum(1 for k in range(K) if i in mask[k][l])
            if c >= 1:
                appear[c] += 1
    return appear


# ---------------------------------------------------------------- LAPE (Tang et al. 2024)


def lape_entropy(P, tau: float):
    """LAPE steps 1-3: natural-log entropy of P normalised over languages; +inf without any P > tau."""
    L, I, K = P.shape
    H = np.zeros((L, I), dtype=np.float64)
    for l in range(L):
        for i in range(I):
            total = sum(P[l, i, k] for k in range(K))
            h = 0.0
            for k in range(K):
                q = P[l, i, k] / total if total > 0 else 0.0  # step 1: q = 0 where the sum is 0
                if q > 0:  # step 2: 0·ln 0 = 0
                    h -= q * math.log(q)
            if not any(P[l, i, k] > tau for k in range(K)):  # step 3: filtered neurons
                h = math.inf
            H[l, i] = h
    return H  # [layer, neuron]


def lape(P, top_rate=0.01, filter_rate=0.95, bar_ratio=0.95):
    """LAPE masks. Returns ``(mask, tau, beta)``.

    An all-zero neuron has q = 0, so H = 0 before step 3 and +inf after it (no P > tau >= 0).
    If fewer than round(top_rate·L·I) neurons have a finite H, +inf neurons fill the selection in
    flat-index order (as a top-k would); they then join only languages with P > beta.
    """
    L, I, K = P.shape
    N = L * I * K
    tau = kth_smallest(P, round(filter_rate * N))  # step 3
    H = lape_entropy(P, tau)  # steps 1-3
    selected = smallest_flat(H, round(top_rate * L * I))  # step 4
    beta = kth_smallest(P, round(bar_ratio * N))  # step 5
    return membership_mask(P, selected, beta), tau, beta  # step 6


def lape_variant(P, rate=0.01, filter_rate=0.95, bar_ratio=0.95):
    """Mondal et al.'s LAPE variant. Returns ``(mask, threshold)``.

    Reading: LAPE with step 4 replaced. The entropy is LAPE's H (steps 1-3, τ filter and +inf
    included); every neuron with ``H <= threshold`` is kept, where threshold is the m-th smallest H,
    ``m = round(rate·L·I)`` (ties included, so more than m may be kept; a +inf threshold keeps every
    filtered neuron too). Languages are assigned by LAPE step 5 (β). m = 0 keeps nothing
    (threshold None).
    """
    L, I, K = P.shape
    N = L * I * K
    tau = kth_smallest(P, round(filter_rate * N))
    H = lape_entropy(P, tau)
    m = round(rate * L * I)
    if m == 0:
        return [[[] for _ in range(L)] for _ in range(K)], None
    threshold = kth_smallest(H, m)
    selected = [l * I + i for l in range(L) for i in range(I) if H[l, i] <= threshold]
    beta = kth_smallest(P, round(bar_ratio * N))
    return membership_mask(P, selected, beta), threshold


# ---------------------------------------------------------------- entropy-λ (Zhang et al. 2025)


def harmonic_c(K: int) -> float:
    """``c_K = (Σ_{j=1..K} 1/j) / K``."""
    return sum(1.0 / j for j in range(1, K + 1)) / K


def entropy_lambda_scores(P, lam: float):
    """Steps 1-3: ``score = Ĥ - λ · max_k P / c_K``; Ĥ = 0 when K = 1 (ln K = 0)."""
    L, I, K = P.shape
    c_K = harmonic_c(K)
    score = np.zeros((L, I), dtype=np.float64)
    for l in range(L):
        for i in range(I):
            p = [float(P[l, i, k]) for k in range(K)]
            total = sum(p)
            q = [v / total for v in p] if total > 0 else [1.0 / K] * K  # step 1
            q = [max(v, 1e-12) for v in q]  # step 2: floor, then renormalise
            q = [v / sum(q) for v in q]
            h = -sum(v * math.log(v + 1e-30) for v in q) / math.log(K) if K > 1 else 0.0
            score[l, i] = h - lam * max(p) / c_K  # step 3
    return score  # [layer, neuron]


def entropy_lambda(P, lam, top_rate=0.01, bar_ratio=0.95):
    """Entropy-λ masks. Returns ``(mask, appear)``; a selected neuron may belong to no language."""
    L, I, K = P.shape
    score = entropy_lambda_scores(P, lam)
    selected = smallest_flat(score, round(top_rate * L * I))  # step 4: no pre-filter
    beta = kth_smallest(P, round(bar_ratio * L * I * K))  # step 5
    mask = membership_mask(P, selected, beta)
    return mask, appearances(mask, L, I)  # step 6


def autosweep(P, top_rate=0.01, lo=0.0, hi=0.2, eps=1e-3, bar_ratio=0.95):
    """Step 7: the largest λ in [lo, hi] with ``appear[K] = 0``. Returns ``(lam, appear at lam)``.

    When lo already fails, returns ``(None, appear at lo)``.
    """
    if lo > hi:
        raise ValueError(f"lo = {lo} > hi = {hi}")
    K = P.shape[2]

    def run(lam):
        _, appear = entropy_lambda(P, lam, top_rate, bar_ratio)
        return appear[K] == 0, appear

    ok, appear = run(hi)
    if ok:
        return hi, appear
    ok, appear_lo = run(lo)
    if not ok:
        return None, appear_lo
    best, best_appear = lo, appear_lo  # "or lo if none did"
    steps = 0
    while hi - lo > eps and steps < 64:
        steps += 1
        mid = (lo + hi) / 2
        ok, appear = run(mid)
        if ok:
            best, best_appear = mid, appear
            lo = mid
        else:
            hi = mid
    return best, best_appear


# ---------------------------------------------------------------- activation-probability thresholds (Mondal et al. 2025)


def top_per_language(score, rate=0.00125):
    """Each language k keeps its ``m = round(rate·L·I)`` largest ``score[l, i, k]`` (ties by flat index, zeros included)."""
    L, I, K = score.shape
    m = round(rate * L * I)
    mask = []
    for k in range(K):
        layers = [[] for _ in range(L)]
        for f in largest_flat(score[:, :, k], m):
            l, i = divmod(f, I)
            layers[l].append(i)
        mask.append([sorted(layer) for layer in layers])
    return mask


def act_prob_zero_mask(P, rate=0.00125):
    """``act_prob_zero = P``: each language's top m neurons by P."""
    return top_per_language(P, rate)


def histogram_percentile(counts, percent=90):
    """Where the percentile of a histogram lies: ``(j, g, inside)``, ``j`` the smallest bin with
    ``100 · Σ_{j' <= j} counts[j'] >= percent · total`` (in integers), ``inside = counts[j]`` and
    ``g = 100 · cum[j] - percent · total``: the bin's counts above the percentile, in hundredths, when
    they are spread uniformly over the bin. An empty histogram gives ``(0, 0, 0)``."""
    counts = [int(c) for c in counts]
    total = sum(counts)
    cumulative = 0
    for j, c in enumerate(counts):
        cumulative += c
        if 100 * cumulative >= percent * total:
            return j, 100 * cumulative - percent * total, c
    raise AssertionError("unreachable: the last bin holds the whole total")


def act_prob_90p(hist, tokens, percent=90, percentile_of="pooled", pool=None):
    """Share of each language's tokens above the neuron's 90th percentile, interpolated inside its bin.

    ``hist [K, L, I, B]`` (bin 0: x < e[0]; bin j: e[j-1] <= x < e[j]; last bin: x >= e[-1]). The
    percentile is that of all K groups pooled (``Σ_k hist[k, l, i, :]``) or, with ``own``, of
    language k's histogram; it lies in bin ``j`` (``histogram_percentile``), and of that bin the share
    ``g / (100 · inside)`` lies above it. Language k's tokens above it: its bins above ``j`` whole, and
    the same share of its tokens in bin ``j``:
    ``score[l, i, k] = (100 · above + hist[k, l, i, j] / inside · g) / (100 · max(tokens[k], 1))``
    (float64, in this order). Returns ``score [L, I, K]``. ``pool [L, I, B]``: the histograms the pooled
    percentile is taken of, when they are not those of the K languages (every group of a store).
    """
    hist = np.asarray(hist)
    K, L, I, B = hist.shape
    score = np.zeros((L, I, K), dtype=np.float64)
    for l in range(L):
        for i in range(I):
            pooled = [sum(int(hist[k, l, i, j]) for k in range(K)) if pool is None else int(pool[l, i, j])
                      for j in range(B)]
            for k in range(K):
                own = [int(hist[k, l, i, j]) for j in range(B)]
                j_star, g, inside = histogram_percentile(pooled if percentile_of == "pooled" else own, percent)
                above = sum(own[j_star + 1:])
                part = own[j_star] / inside if inside > 0 else 0.0
                score[l, i, k] = (100 * above + part * g) / (100 * max(int(tokens[k]), 1))
    return score


def act_prob_90p_mask(score, rate=0.00125):
    """Each language's top m neurons by ``act_prob_90p``."""
    return top_per_language(score, rate)


# ---------------------------------------------------------------- coverage (Tan et al. 2024)


def coverage(active, k=0.95, rule="reach"):
    """Per group and layer, the shortest prefix of neurons by count (largest first, ties by index)
    whose cumulative count reaches ``k · total`` (float64 ``cumulative >= k * total``); with
    ``rule="within"`` (the Aya study's ``cumsum / total <= threshold``) every neuron of that order whose
    cumulative count, its own included, divided by the total is at most ``k``.

    A layer whose total is 0 keeps nothing: the empty prefix already reaches 0. ``k`` must lie in [0, 1].
    """
    if not 0 <= k <= 1:
        raise ValueError(f"k = {k} is outside [0, 1]")
    active = np.asarray(active)
    G, L, I = active.shape
    mask = []
    for g in range(G):
        layers = []
        for l in range(L):
            counts = [int(c) for c in active[g, l]]
            total = sum(counts)
            target = k * total
            order = sorted(range(I), key=lambda i: (-counts[i], i))
            kept, cumulative = [], 0
            for i in order:
                if rule == "within":
                    if total == 0 or (cumulative + counts[i]) / total > k:
                        break
                elif cumulative >= target:
                    break
                kept.append(i)
                cumulative += counts[i]
            layers.append(sorted(kept))
        mask.append(layers)
    return mask


# ---------------------------------------------------------------- localizer (AlKhamissi et al. 2024)


def _mean_var(n, s, ss):
    """Mean and unbiased variance from count, sum and sum of squares; variance clipped at 0 (rounding)."""
    mean = s / n
    var = max((ss - s * s / n) / (n - 1), 0.0)
    return mean, var


def welch_t(count_a, sum_a, sqsum_a, count_b, sum_b, sqsum_b):
    """Welch's t per unit from moments: ``(μA − μB) / sqrt(s²A/nA + s²B/nB)``, unbiased variances.

    Counts are scalars (samples per condition); moments are arrays of any shape. t is NaN where
    a condition has fewer than 2 samples or the denominator is 0 (both variances 0): never selected.
    """
    sum_a, sqsum_a = np.asarray(sum_a, dtype=np.float64), np.asarray(sqsum_a, dtype=np.float64)
    sum_b, sqsum_b = np.asarray(sum_b, dtype=np.float64), np.asarray(sqsum_b, dtype=np.float64)
    na, nb = int(count_a), int(count_b)
    t = np.full(sum_a.shape, np.nan)
    if na < 2 or nb < 2:
        return t
    for idx in np.ndindex(sum_a.shape):
        mean_a, var_a = _mean_var(na, float(sum_a[idx]), float(sqsum_a[idx]))
        mean_b, var_b = _mean_var(nb, float(sum_b[idx]), float(sqsum_b[idx]))
        denominator = math.sqrt(var_a / na + var_b / nb)
        if denominator > 0:
            t[idx] = (mean_a - mean_b) / denominator
    return t


def mean_difference(count_a, sum_a, count_b, sum_b):
    """``μA − μB`` per unit; NaN when a condition has no samples."""
    sum_a, sum_b = np.asarray(sum_a, dtype=np.float64), np.asarray(sum_b, dtype=np.float64)
    na, nb = int(count_a), int(count_b)
    out = np.full(sum_a.shape, np.nan)
    if na < 1 or nb < 1:
        return out
    for idx in np.ndindex(sum_a.shape):
        out[idx] = float(sum_a[idx]) / na - float(sum_b[idx]) / nb
    return out


def pool_groups(count, sum_, sqsum, groups):
    """Condition moments: the samples of the listed groups pooled (counts and moments summed)."""
    n = sum(int(count[g]) for g in groups)
    s = sum(np.asarray(sum_[g], dtype=np.float64) for g in groups)
    ss = sum(np.asarray(sqsum[g], dtype=np.float64) for g in groups)
    return n, s, ss


def localizer(count, sum_, sqsum, groups_a, groups_b, top_percent, per_layer=False):
    """Top ``top_percent`` % of units by Welch t of A (groups_a pooled) vs B. Returns ``(mask[l], t [L, U])``.

    ``count [K]`` samples per group, ``sum_``/``sqsum [K, L, U]`` (of the absolute activation).
    Selects ``round(top_percent * n / 100)`` units with the largest t, n = L·U (global) or U (per
    layer), ties by flat index, NaN never selected (fewer are kept if fewer t are defined). The mask
    is one list over layers of sorted unit indices (one contrast, not one per group).
    """
    n_a, s_a, ss_a = pool_groups(count, sum_, sqsum, groups_a)
    n_b, s_b, ss_b = pool_groups(count, sum_, sqsum, groups_b)
    t = welch_t(n_a, s_a, ss_a, n_b, s_b, ss_b)
    L, U = t.shape
    mask = [[] for _ in range(L)]
    if per_layer:
        for l in range(L):
            mask[l] = sorted(largest_flat(t[l], round(top_percent * U / 100)))
    else:
        for f in largest_flat(t, round(top_percent * L * U / 100)):
            l, u = divmod(f, U)
            mask[l].append(u)
        mask = [sorted(layer) for layer in mask]
    return mask, t


# ---------------------------------------------------------------- random control


def random_control(mask, L, I, seed):
    """Same count per language and layer, drawn uniformly without replacement from the neurons
    not in that language's layer mask, with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    out = []
    for lang in mask:
        layers = []
        for l in range(L):
            taken = set(int(i) for i in lang[l])
            free = [i for i in range(I) if i not in taken]
            if len(taken) > len(free):
                raise ValueError(f"layer {l}: cannot draw {len(taken)} of {len(free)} free neurons")
            layers.append(sorted(int(i) for i in rng.choice(free, size=len(taken), replace=False)))
        out.append(layers)
    return out
