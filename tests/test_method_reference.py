"""The method references themselves, on tiny cases whose answers are worked out by hand here."""

import math

import numpy as np
import pytest

from tests import method_reference as ref

LN2, LN3 = math.log(2), math.log(3)


# ---------------------------------------------------------------- probabilities


def test_probabilities_axis_order_and_empty_group():
    active = np.array([[[1, 2]], [[3, 0]], [[0, 0]]])  # [K=3, L=1, I=2]
    P = ref.probabilities(active, [4, 10, 0])
    assert P.shape == (1, 2, 3)  # [L, I, K]
    np.testing.assert_array_equal(P[0, 0], [0.25, 0.3, 0.0])
    np.testing.assert_array_equal(P[0, 1], [0.5, 0.0, 0.0])


def test_response_only_clips_at_zero_and_divides_by_at_least_one():
    full = np.array([[[8, 5]], [[4, 4]]])
    prompt = np.array([[[2, 7]], [[1, 4]]])
    P = ref.response_only(full, [10, 6], prompt, [4, 6])
    np.testing.assert_array_equal(P[0, :, 0], [6 / 6, 0.0])  # 5 - 7 clipped to 0
    np.testing.assert_array_equal(P[0, :, 1], [3 / 1, 0 / 1])  # no response tokens: denominator 1


# ---------------------------------------------------------------- LAPE

# P[l, i, :] for K = 3, L = 2, I = 3 (tokens 10 each):
# (0,0) .9 0 0 | (0,1) .5 .5 0 | (0,2) .1 .1 .1 | (1,0) 0 0 0 | (1,1) 0 .8 .2 | (1,2) .3 0 .6
LAPE_ACTIVE = np.array([
    [[9, 5, 1], [0, 0, 3]],
    [[0, 5, 1], [0, 8, 0]],
    [[0, 0, 1], [0, 2, 6]],
])
# sorted P (18 values): eight 0, three .1, .2, .3, .5, .5, .6, .8, .9
H_11 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))  # 0.5004
H_12 = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # 0.6365


def lape_P():
    return ref.probabilities(LAPE_ACTIVE, [10, 10, 10])


def test_lape_entropy_by_hand():
    H = ref.lape_entropy(lape_P(), tau=0.1)
    # (0,2) has no P > .1 (strict); (1,0) is all zero: both +inf
    expected = [[0.0, LN2, math.inf], [math.inf, H_11, H_12]]
    np.testing.assert_allclose(H, expected, rtol=1e-12)


def test_lape_example_two_bars():
    P = lape_P()
    # filter_rate .5: tau = 9th smallest = .1. H finite: (0,0) 0, (1,1) .500, (1,2) .637, (0,1) .693
    # top_rate .5: round(3) = 3 -> (0,0), (1,1), (1,2)
    mask, tau, beta = ref.lape(P, top_rate=0.5, filter_rate=0.5, bar_ratio=0.7)
    # bar .7: round(12.6) = 13th smallest = .3; P > .3: (0,0) k0; (1,1) k1; (1,2) k2 (.3 is not > .3)
    assert (tau, beta) == (0.1, 0.3)
    assert mask == [[[0], []], [[], [1]], [[], [2]]]
    # bar .5: beta = 9th smallest = .1; a neuron may belong to several languages
    mask, tau, beta = ref.lape(P, top_rate=0.5, filter_rate=0.5, bar_ratio=0.5)
    assert beta == 0.1
    assert mask == [[[0], [2]], [[], [1]], [[], [1, 2]]]


def test_lape_default_filter_keeps_only_the_sharpest():
    # defaults: round(.95 * 18) = 17th smallest = .8 = tau = beta; only (0,0) has P > .8
    mask, tau, beta = ref.lape(lape_P(), top_rate=0.5)
    assert tau == beta == 0.8
    # (0,0) has H = 0, then two +inf neurons fill the selection in flat order: (0,1), (0,2)
    assert mask == [[[0], []], [[], []], [[], []]]


def test_lape_ties_go_to_smaller_flat_index_and_empty_language():
    # K = 2, L = 2, I = 2: (0,0) .2 .6 | (0,1) .5 .5 | (1,0) .2 .6 | (1,1) .6 .2
    P = np.array([[[0.2, 0.6], [0.5, 0.5]], [[0.2, 0.6], [0.6, 0.2]]])
    # tau = 4th smallest of .2 .2 .2 .5 .5 .6 .6 .6 = .5, so (0,1) is +inf; the other three tie
    H = ref.lape_entropy(P, 0.5)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert H.tolist() == [[pytest.approx(h), math.inf], [pytest.approx(h), pytest.approx(h)]]
    assert H[0, 0] == H[1, 0] == H[1, 1]
    # two of the three tied: flat 0 and 2, not 3; beta = .5 -> both only in k = 1
    mask, _, beta = ref.lape(P, top_rate=0.5, filter_rate=0.5, bar_ratio=0.5)
    assert beta == 0.5
    assert mask == [[[], []], [[0], [0]]]  # language 0 selects nothing


def test_lape_all_zero_neuron_and_top_count_zero():
    P = np.array([[[0.5, 0.0], [0.0, 0.0]]])  # L = 1, I = 2, K = 2; neuron 1 never fires
    # tau = 2nd smallest of 0 0 0 .5 = 0
    assert ref.lape_entropy(P, 0.0).tolist() == [[0.0, math.inf]]
    # both selected (the +inf one too), but the zero neuron has no P > beta = 0
    mask, tau, beta = ref.lape(P, top_rate=1.0, filter_rate=0.5, bar_ratio=0.5)
    assert mask == [[[0]], [[]]]
    # default top_rate: round(.01 * 2) = 0 neurons
    assert ref.lape(P, filter_rate=0.5)[0] == [[[]], [[]]]


def test_lape_rank_zero_raises():
    P = np.array([[[0.5, 0.0], [0.0, 0.0]]])
    with pytest.raises(ValueError):
        ref.lape(P, filter_rate=0.1)  # round(.4) = 0: there is no 0-th smallest


def test_lape_variant_keeps_ties():
    P = np.array([[[0.2, 0.6], [0.5, 0.5]], [[0.2, 0.6], [0.6, 0.2]]])
    # m = round(.25 * 4) = 1; threshold = the smallest H; all three tied neurons kept
    mask, threshold = ref.lape_variant(P, rate=0.25, filter_rate=0.5, bar_ratio=0.5)
    assert threshold == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert mask == [[[], [1]], [[0], [0]]]
    # m = 4: threshold +inf keeps the filtered (0,1) too, which has no P > .5
    mask, threshold = ref.lape_variant(P, rate=1.0, filter_rate=0.5, bar_ratio=0.5)
    assert threshold == math.inf
    assert mask == [[[], [1]], [[0], [0]]]
    # LAPE's example: m = round(.34 * 6) = 2 -> H <= H_11: (0,0), (1,1)
    mask, threshold = ref.lape_variant(lape_P(), rate=0.34, filter_rate=0.5, bar_ratio=0.5)
    assert threshold == pytest.approx(H_11)
    assert mask == [[[0], []], [[], [1]], [[], [1]]]
    assert ref.lape_variant(lape_P(), rate=0.01)[0] == [[[], []]] * 3  # m = 0


# ---------------------------------------------------------------- entropy-λ


def test_entropy_lambda_scores_by_hand():
    P = np.array([[[0.6, 0.2], [0.0, 0.0], [0.3, 0.0]]])  # L = 1, I = 3, K = 2
    c2 = (1 + 1 / 2) / 2
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / LN2
    h2 = -(1e-12 * math.log(1e-12)) / LN2  # q = (1, 0) floored: nearly 0
    score = ref.entropy_lambda_scores(P, lam=0.5)
    assert score[0, 0] == pytest.approx(h0 - 0.5 * 0.6 / c2)
    assert score[0, 1] == pytest.approx(1.0)  # sum 0: q = 1/2 each, Ĥ = 1, max P = 0
    assert score[0, 2] == pytest.approx(h2 - 0.5 * 0.3 / c2, abs=1e-10)
    assert ref.harmonic_c(3) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_entropy_lambda_single_language():
    P = np.array([[[0.2], [0.7], [0.7]]])  # K = 1: Ĥ = 0, c_1 = 1, score = -λ P
    assert ref.entropy_lambda_scores(P, 1.0).tolist() == [[-0.2, -0.7, -0.7]]
    # select round(.34 * 3) = 1: tie between 1 and 2 goes to 1; bar .3: round(.9) = 1st smallest = .2
    mask, appear = ref.entropy_lambda(P, 1.0, top_rate=0.34, bar_ratio=0.3)
    assert mask == [[[1]]] and appear == [0, 1]
    # λ = 0: every score 0, neuron 0 selected, .2 is not > .2: selected but in no mask
    mask, appear = ref.entropy_lambda(P, 0.0, top_rate=0.34, bar_ratio=0.3)
    assert mask == [[[]]] and appear == [0, 0]


def test_appearances_by_hand():
    mask = [[[0, 1], [2]], [[1], [2]], [[1], []]]  # K = 3, L = 2, I = 3
    # (0,0) in 1 mask, (0,1) in 3, (1,2) in 2
    assert ref.appearances(mask, 2, 3) == [0, 1, 1, 1]


# A = (.1, 0) is specific, B = (.9, .9) shared. One neuron selected, beta = 2nd smallest = .1,
# so only B can enter a mask (then both). B wins when 1 - 1.2λ < Ĥ_A - λ·.1/.75, λ > .9375(1 - Ĥ_A).
SWEEP_P = np.array([[[0.1, 0.0], [0.9, 0.9]]])


def test_autosweep_hi_satisfies():
    assert ref.autosweep(SWEEP_P, top_rate=0.5, bar_ratio=0.5) == (0.2, [0, 0, 0])


def test_autosweep_lo_fails():
    P = np.array([[[0.5, 0.5], [0.4, 0.4]]])  # beta = .4; λ = 0 ties, neuron 0 is in both
    assert ref.autosweep(P, top_rate=0.5, bar_ratio=0.5) == (None, [0, 0, 1])


def test_autosweep_bisection():
    lam, appear = ref.autosweep(SWEEP_P, top_rate=0.5, hi=1.0, bar_ratio=0.5)
    # mids .5 .75 .875 ok, .9375 fails, then ok up to 959/1024 when hi - lo = 1/1024 < 1e-3
    assert lam == 959 / 1024 and appear == [0, 0, 0]
    # monotone: satisfied below the threshold, violated above it
    for x in np.linspace(0, 1, 41):
        shared = ref.entropy_lambda(SWEEP_P, x, top_rate=0.5, bar_ratio=0.5)[1][2]
        assert shared == (0 if x < 0.9375 else 1)
    assert ref.entropy_lambda(SWEEP_P, lam + 1e-3, top_rate=0.5, bar_ratio=0.5)[1] == [0, 0, 1]
    with pytest.raises(ValueError):
        ref.autosweep(SWEEP_P, lo=0.3, hi=0.2)


# ---------------------------------------------------------------- activation-probability thresholds


def test_act_prob_zero_mask_per_language_with_ties():
    P = np.zeros((2, 2, 2))
    P[:, :, 0] = [[0.1, 0.4], [0.4, 0.0]]
    P[:, :, 1] = [[0.3, 0.1], [0.2, 0.3]]
    # m = round(.5 * 4) = 2 per language
    assert ref.act_prob_zero_mask(P, rate=0.5) == [[[1], [0]], [[0], [1]]]


def test_histogram_percentile():
    assert ref.histogram_percentile([1] * 10) == (8, 0, 1)  # 9 of 10 reached at the end of bin 8
    assert ref.histogram_percentile([7, 7, 4, 2]) == (2, 0, 4)  # exactly 18 of 20: on an edge
    assert ref.histogram_percentile([19, 0, 1, 0]) == (0, 100, 19)  # one count of bin 0 above 18 of 20
    assert ref.histogram_percentile([0, 0, 0]) == (0, 0, 0)
    assert ref.histogram_percentile([1, 1], percent=50) == (0, 0, 1)


def test_act_prob_90p_from_a_hand_made_histogram():
    hist = np.array([  # [K=2, L=1, I=3, B=4]; bins: x < e0 | [e0, e1) | [e1, e2) | >= e2
        [[[5, 3, 1, 1], [10, 0, 0, 0], [9, 0, 1, 0]]],
        [[[2, 4, 3, 1], [0, 0, 2, 8], [10, 0, 0, 0]]],
    ])
    score = ref.act_prob_90p(hist, tokens=[10, 10])
    # pooled: [7 7 4 2] -> P90 on the upper edge of bin 2: the 2 tokens of bin 3, exactly;
    # [10 0 2 8] -> 2 of bin 3's 8 counts lie above, all language 1's; [19 0 1 0] -> 1 of bin 0's 19
    assert score[0, :, 0].tolist() == [0.1, 0.0, (100 + 9 / 19 * 100) / 1000]
    assert score[0, :, 1].tolist() == [0.1, 0.2, (0 + 10 / 19 * 100) / 1000]
    assert score[0].sum(axis=1) * 10 == pytest.approx([2, 2, 2])  # 10% of the 20 pooled tokens
    # m = round(.34 * 3) = 1: language 0 takes neuron 2, language 1 neuron 1
    assert ref.act_prob_90p_mask(score, rate=0.34) == [[[2]], [[1]]]
    own = ref.act_prob_90p(hist, tokens=[10, 10], percentile_of="own")
    assert own[0].tolist() == [[0.1, 0.1], [0.1, 0.1], [0.1, 0.1]]  # by construction: see README


# ---------------------------------------------------------------- coverage


def test_coverage_with_ties_and_empty_layer():
    active = np.array([
        [[3, 5, 3, 1], [0, 0, 0, 0]],
        [[0, 0, 4, 4], [1, 0, 0, 0]],
    ])  # [G=2, L=2, I=4]
    # k = .5, group 0 layer 0: order 1(5), 0(3), 2(3), 3(1); 5 < 6, 8 >= 6 -> {0, 1}
    # group 1 layer 0: target 4, neuron 2 alone reaches it (tie 2/3 -> 2)
    assert ref.coverage(active, k=0.5) == [[[0, 1], []], [[2], [0]]]
    # k = .95: 11.4 needs all four; 7.6 needs both 4s
    assert ref.coverage(active) == [[[0, 1, 2, 3], []], [[2, 3], [0]]]
    # k = 1 never adds zero-count neurons
    assert ref.coverage(active, k=1.0) == [[[0, 1, 2, 3], []], [[2, 3], [0]]]
    with pytest.raises(ValueError):
        ref.coverage(active, k=95)


# ---------------------------------------------------------------- localizer


def moments(samples_by_group):
    """count [K], sum and sqsum [K, L, U] from raw samples [n_k, L, U]."""
    count = np.array([len(s) for s in samples_by_group])
    return (count, np.stack([s.sum(axis=0) for s in samples_by_group]),
            np.stack([(s ** 2).sum(axis=0) for s in samples_by_group]))


def welch_from_raw(a, b):
    """Welch t from raw samples along axis 0, with NumPy's unbiased variances."""
    return (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))


def test_welch_t_matches_raw_samples():
    rng = np.random.default_rng(1)
    groups = [rng.normal(0.3, 1.0, (5, 2, 3)), rng.normal(0.0, 2.0, (4, 2, 3)), rng.normal(0.1, 0.5, (6, 2, 3))]
    count, s, ss = moments(groups)
    t = ref.welch_t(count[0], s[0], ss[0], count[1] + count[2], s[1] + s[2], ss[1] + ss[2])
    np.testing.assert_allclose(t, welch_from_raw(groups[0], np.concatenate(groups[1:])), rtol=1e-10)
    try:
        from scipy import stats
    except ImportError:
        return
    expected = stats.ttest_ind(groups[0], np.concatenate(groups[1:]), equal_var=False, axis=0).statistic
    np.testing.assert_allclose(t, expected, rtol=1e-10)


def test_welch_t_undefined_cases_are_nan():
    const = np.ones((3, 1, 1))
    count, s, ss = moments([const, 2 * const])
    assert np.isnan(ref.welch_t(count[0], s[0], ss[0], count[1], s[1], ss[1])).all()  # zero variances
    assert np.isnan(ref.welch_t(1, [1.0], [1.0], 3, [3.0], [5.0])).all()  # n < 2
    assert ref.mean_difference(count[0], s[0], count[1], s[1]).tolist() == [[-1.0]]


# base samples 0 1 2 3 split over groups 1 and 2 (condition B); group 0 (A) is base + d
D = np.array([[3.0, 1.0, 0.0, 2.0], [2.0, 5.0, -1.0, 4.0]])  # [L, U]


def localizer_moments():
    base = np.arange(4.0)[:, None, None] * np.ones((1, 2, 4))
    return moments([base + D, base[:2], base[2:]])


def test_localizer_t_by_hand():
    count, s, ss = localizer_moments()
    _, t = ref.localizer(count, s, ss, [0], [1, 2], top_percent=25)
    # both variances 5/3 with n = 4: t = d / sqrt(5/6)
    np.testing.assert_allclose(t, D / math.sqrt(5 / 6), rtol=1e-12)
    np.testing.assert_allclose(ref.mean_difference(4, s[0], 4, s[1] + s[2]), D)


def test_localizer_selection_global_and_per_layer():
    count, s, ss = localizer_moments()
    # 25% of 8 = 2: d = 5, 4
    assert ref.localizer(count, s, ss, [0], [1, 2], 25)[0] == [[], [1, 3]]
    # 50% = 4: 5, 4, 3, then the tie d = 2 at flat 3 (0,3) before flat 4 (1,0)
    assert ref.localizer(count, s, ss, [0], [1, 2], 50)[0] == [[0, 3], [1, 3]]
    assert ref.localizer(count, s, ss, [0], [1, 2], 62.5)[0] == [[0, 3], [0, 1, 3]]
    # per layer 50% = 2 of each layer
    assert ref.localizer(count, s, ss, [0], [1, 2], 50, per_layer=True)[0] == [[0, 3], [1, 3]]
    # the reverse contrast picks the most negative d
    assert ref.localizer(count, s, ss, [1, 2], [0], 12.5)[0] == [[], [2]]


def test_localizer_never_selects_nan():
    const = np.ones((3, 1, 2))
    count, s, ss = moments([const, const])
    mask, t = ref.localizer(count, s, ss, [0], [1], 100)
    assert np.isnan(t).all() and mask == [[]]


# ---------------------------------------------------------------- random control


def test_random_control_properties():
    mask = [[[0, 2], [], [1, 2, 3]], [[5], [0], []]]  # K = 2, L = 3, I = 6
    control = ref.random_control(mask, 3, 6, seed=7)
    assert control == ref.random_control(mask, 3, 6, seed=7)
    for lang, ctrl in zip(mask, control):
        for layer, c in zip(lang, ctrl):
            assert len(c) == len(layer) and c == sorted(set(c))
            assert not set(c) & set(layer) and all(0 <= i < 6 for i in c)
    draws = {tuple(ref.random_control(mask, 3, 6, seed)[0][0]) for seed in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError):
        ref.random_control([[[0, 1]]], 1, 3, seed=0)
