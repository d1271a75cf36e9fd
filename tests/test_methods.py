"""Every method, out of core on Dask, against the plain-loop references of tests/method_reference.py."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from analysis import methods
from harvester.errors import HarvestError
from tests import method_reference as ref


def flat(mask_layers, I):
    """Reference ``mask[k][l]`` -> per-language sorted flat indices."""
    return [np.array(sorted(l * I + i for l, layer in enumerate(lang) for i in layer), dtype=np.int64)
            for lang in mask_layers]


def counts_case(seed, K=4, L=3, I=40, tokens=None):
    """Counts with ties (identical neurons), all-zero neurons and one near-silent language."""
    rng = np.random.default_rng(seed)
    tokens = np.array(tokens or [1000, 700, 1300, 50][:K], dtype=np.int64)
    p = rng.beta(0.5, 2.0, size=(K, L, I))
    p[:, :, 3] = 0.0  # all-zero neurons
    p[:, 1, 7] = 0.0
    p[:, :, 5] = p[:, :, 4]  # identical probabilities: ties broken by flat index
    active = np.floor(p * tokens[:, None, None]).astype(np.int64)
    active[:, :, 6] = active[:, :, 4] * 0 + active[:, :, 4]
    if K > 2:
        active[1, :, 10:14] = tokens[1]  # neurons active on every token of one language
    return active, tokens


def lazy(a):
    return da.from_array(a, chunks=(1, 2, a.shape[2]) if a.ndim == 3 else (1, 2, a.shape[2], a.shape[3]))


def P_of(active, tokens):
    return lazy(active) / np.maximum(tokens, 1)[:, None, None].astype(np.float64)


@pytest.mark.parametrize("gather,bins", [(1 << 21, 4096), (7, 3), (50, 16)])
def test_kth_smallest_is_exact(gather, bins, monkeypatch):
    monkeypatch.setattr(methods, "_GATHER", gather)
    monkeypatch.setattr(methods, "_BINS", bins)
    active, tokens = counts_case(0)
    P = P_of(active, tokens)
    values = np.sort(P.compute().ravel())
    for r in (1, 2, 17, len(values) // 2, round(0.95 * len(values)), len(values)):
        assert methods.kth_smallest(P, r) == values[r - 1]
    with pytest.raises(HarvestError, match="outside"):
        methods.kth_smallest(P, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lape(seed):
    active, tokens = counts_case(seed)
    P = P_of(active, tokens)
    Pr = ref.probabilities(active, tokens)
    for args in [(0.01, 0.95, 0.95), (0.05, 0.9, 0.95), (0.2, 0.5, 0.7)]:
        want, tau, beta = ref.lape(Pr, *args)
        got = methods.lape(P, *args)
        assert (got["tau"], got["beta"]) == (tau, beta)
        for g, w in zip(got["selected"], flat(want, Pr.shape[1])):
            np.testing.assert_array_equal(g, w)


def test_lape_variant():
    active, tokens = counts_case(3)
    Pr = ref.probabilities(active, tokens)
    for rate in (0.01, 0.1):
        want, threshold = ref.lape_variant(Pr, rate)
        got = methods.lape_variant(P_of(active, tokens), rate)
        assert got["threshold"] == threshold
        for g, w in zip(got["selected"], flat(want, Pr.shape[1])):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_entropy_lambda_and_autosweep(K):
    active, tokens = counts_case(4, K=K)
    P, Pr = P_of(active, tokens), ref.probabilities(active, tokens)
    model = methods.EntropyLambda(P, top_rate=0.1)
    for lam in (0.0, 0.05, 0.3):
        want, appear = ref.entropy_lambda(Pr, lam, top_rate=0.1)
        assert model.appear(lam) == appear
        for g, w in zip(model.masks(lam), flat(want, Pr.shape[1])):
            np.testing.assert_array_equal(g, w)
    for lo, hi in [(0.0, 0.2), (0.0, 5.0), (0.3, 0.4)]:
        assert model.autosweep(lo, hi, 1e-3) == ref.autosweep(Pr, 0.1, lo, hi, 1e-3)


def test_autosweep_bisects():
    """A case where hi fails and lo holds, so the sweep bisects."""
    active, tokens = counts_case(5, K=2)
    active[:, :, 20:26] = tokens[:, None, None]  # shared neurons: chosen by a large λ, in both masks
    P, Pr = P_of(active, tokens), ref.probabilities(active, tokens)
    lam, appear = ref.autosweep(Pr, 0.1, 0.0, 50.0, 1e-3, bar_ratio=0.8)
    assert lam is not None and 0 < lam < 50
    assert methods.EntropyLambda(P, top_rate=0.1, bar_ratio=0.8).autosweep(0.0, 50.0, 1e-3) == (lam, appear)


@pytest.mark.parametrize("percentile_of", ["pooled", "own"])
def test_act_prob_90p_equals_the_plain_loop_exactly(percentile_of):
    rng = np.random.default_rng(6)
    K, L, I, B = 3, 4, 9, 6
    hist = rng.integers(0, 20, size=(K, L, I, B))
    hist[:, 0, 2] = 0  # an empty histogram
    hist[:, 1, 4, :-1] = 0  # everything in the last bin
    hist[0, 2, 1] = 0  # a language without tokens on one neuron
    hist[:, 3, 0] = [[7, 0, 0, 3, 0, 0]] * K  # P90 on an edge followed by empty bins
    tokens = hist.sum(axis=(2, 3))[:, 0] // I + 1
    want = ref.act_prob_90p(hist, tokens, percentile_of=percentile_of)
    for k, got in enumerate(methods.act_prob_90p_scores(lazy(hist), tokens, percentile_of=percentile_of)):
        np.testing.assert_array_equal(got, want[:, :, k])  # bit for bit
    for rate in (0.1, 0.3):
        got = methods.act_prob_90p(lazy(hist), tokens, rate=rate, percentile_of=percentile_of)
        for g, w in zip(got["selected"], flat(ref.act_prob_90p_mask(want, rate), I)):
            np.testing.assert_array_equal(g, w)


def test_act_prob_90p_is_exact_when_the_percentile_falls_on_a_bin_edge():
    """Raw activations whose pooled P90 lies between two bins: the histogram's selection is the raw data's."""
    rng = np.random.default_rng(11)
    K, L, I, n = 3, 2, 30, 200  # n tokens per language, 600 pooled: 540 below the edge, 60 above
    edges = np.linspace(-2.0, 3.0, 51)
    raw = np.empty((K, L, I, n))
    for l in range(L):
        for i in range(I):
            cut = edges[rng.integers(5, 45)]  # the neuron's P90 falls on this edge
            high = rng.multinomial(60, rng.dirichlet(np.ones(K)))  # each language's tokens above it
            for k in range(K):
                raw[k, l, i] = np.concatenate([rng.uniform(edges[0] - 1, cut, n - high[k]),
                                               rng.uniform(cut, edges[-1] + 1, high[k])])
    hist = np.zeros((K, L, I, len(edges) + 1), dtype=np.int64)
    for index in np.ndindex(K, L, I):
        hist[index] = np.bincount(np.searchsorted(edges, raw[index], side="right"), minlength=len(edges) + 1)
    tokens = np.full(K, n)
    threshold = np.quantile(raw.transpose(1, 2, 0, 3).reshape(L, I, K * n), 0.9, axis=-1)  # [L, I]
    exact = (raw > threshold[None, :, :, None]).sum(axis=-1) / n  # [K, L, I]
    for k, got in enumerate(methods.act_prob_90p_scores(lazy(hist), tokens)):
        np.testing.assert_array_equal(got, exact[k])
    got = methods.act_prob_90p(lazy(hist), tokens, rate=0.1)["selected"]
    for k in range(K):
        np.testing.assert_array_equal(got[k], np.sort(methods.largest(exact[k], round(0.1 * L * I))))


def test_act_prob_zero():
    active, tokens = counts_case(7)
    Pr = ref.probabilities(active, tokens)
    got = methods.act_prob_zero(P_of(active, tokens), rate=0.05)
    for g, w in zip(got["selected"], flat(ref.act_prob_zero_mask(Pr, 0.05), active.shape[2])):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("rule", ["reach", "within"])
@pytest.mark.parametrize("k", [0.0, 0.5, 0.9, 0.95, 1.0])
def test_coverage(k, rule):
    active, _ = counts_case(8)
    active[2, 0] = 0  # a layer with no activity keeps nothing
    got = methods.coverage(lazy(active), k, rule)
    for g, w in zip(got["selected"], flat(ref.coverage(active, k, rule), active.shape[2])):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("per_layer", [False, True])
def test_localizer(per_layer):
    rng = np.random.default_rng(9)
    L, U = 4, 10
    samples = [rng.normal(loc=g * 0.3, size=(n, L, U)) for g, n in enumerate([12, 9, 15])]  # 3 groups
    samples[0][:, 0, 0] = 1.0  # zero variance in A ...
    samples[1][:, 0, 0] = 1.0  # ... and B: t is undefined, never selected
    count = np.array([len(s) for s in samples])
    sums = np.stack([np.abs(s).sum(axis=0) for s in samples])
    sqsums = np.stack([(s ** 2).sum(axis=0) for s in samples])
    for a, b in [([0], [1]), ([0, 2], [1])]:
        want, t = ref.localizer(count, sums, sqsums, a, b, 10, per_layer)
        got = methods.localizer(count, da.from_array(sums, chunks=(1, 2, U)), da.from_array(sqsums, chunks=(1, 2, U)),
                                a, b, 10, per_layer)
        np.testing.assert_allclose(got["score"], t, rtol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(got["selected"][0], flat([want], U)[0])
    diff = methods.localizer(count, da.from_array(sums), da.from_array(sqsums), [0], [1], 10, statistic="mean-diff")
    np.testing.assert_allclose(diff["score"], ref.mean_difference(count[0], sums[0], count[1], sums[1]))


def test_random_control_keeps_counts_and_avoids_the_mask():
    active, tokens = counts_case(10)
    L, I = active.shape[1:]
    mask = methods.lape(P_of(active, tokens), top_rate=0.2)["selected"]
    first = methods.random_control(mask, L, I, seed=3)
    assert [a.tolist() for a in first] == [a.tolist() for a in methods.random_control(mask, L, I, seed=3)]
    assert any(a.tolist() != b.tolist() for a, b in zip(first, methods.random_control(mask, L, I, seed=4)) if a.size)
    for m, r in zip(mask, first):
        np.testing.assert_array_equal(np.bincount(m // I, minlength=L), np.bincount(r // I, minlength=L))
        assert not np.intersect1d(m, r).size and np.all(np.diff(r) > 0)


def test_one_language_and_a_language_with_nothing_selected():
    active, tokens = counts_case(11, K=1)
    Pr = ref.probabilities(active, tokens)
    want, tau, beta = ref.lape(Pr, top_rate=0.05)
    got = methods.lape(P_of(active, tokens), top_rate=0.05)
    assert (got["tau"], got["beta"]) == (tau, beta)
    np.testing.assert_array_equal(got["selected"][0], flat(want, active.shape[2])[0])
    active, tokens = counts_case(12)
    active[3] = 0  # a silent language: never above β, so its mask is empty
    got = methods.lape(P_of(active, tokens), top_rate=0.05)
    assert got["selected"][3].size == 0
    assert [g.tolist() for g in got["selected"]] == [w.tolist() for w in flat(ref.lape(ref.probabilities(active, tokens), 0.05)[0], active.shape[2])]
