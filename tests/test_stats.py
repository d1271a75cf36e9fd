"""The statistics kernel against a plain-NumPy loop over tokens."""

import numpy as np
import pytest
import torch

from harvester.errors import HarvestError
from harvester.stats import NeuronStats, StatsSpec, parse_edges, parse_stats

EDGES = parse_edges("-1:2:12")


def reference(passes, n_groups, n_layers, width, edges):
    """Plain loops: every non-padding token of every pass, in float64."""
    tokens = np.zeros(n_groups, dtype=np.int64)
    active = np.zeros((n_groups, n_layers, width), dtype=np.int64)
    nonzero = np.zeros((n_groups, n_layers, width), dtype=np.int64)
    act_sum = np.zeros((n_groups, n_layers, width))
    act_sqsum = np.zeros((n_groups, n_layers, width))
    abs_sum = np.zeros((n_groups, n_layers, width))
    hist = np.zeros((n_groups, n_layers, width, len(edges) + 1), dtype=np.int64)
    for groups, acts in passes:
        for t, g in enumerate(groups):
            if g < 0:
                continue
            tokens[g] += 1
            for layer in range(n_layers):
                for i in range(width):
                    x = float(acts[layer][t, i])
                    active[g, layer, i] += x > 0
                    nonzero[g, layer, i] += x != 0
                    act_sum[g, layer, i] += x
                    act_sqsum[g, layer, i] += x * x
                    abs_sum[g, layer, i] += abs(x)
                    hist[g, layer, i, np.searchsorted(edges, x, side="right")] += 1
    return tokens, active, act_sum, act_sqsum, abs_sum, hist, nonzero


def make_passes(rng, n_groups, n_layers, width, sizes):
    passes = []
    for size in sizes:
        groups = rng.integers(-1, n_groups, size=size)
        acts = []
        for _ in range(n_layers):
            a = rng.normal(size=(size, width)).astype(np.float32)
            a[rng.random((size, width)) < 0.1] = 0.0  # exact zeros are not active
            a[0, 0] = 1.0  # a value exactly on an edge goes to the bin above it
            acts.append(a)
        passes.append((groups, acts))
    return passes


def _run(kernel, passes, spec, L, I, layout=lambda a: a):
    stats = NeuronStats(spec, L, I, kernel=kernel)
    for groups, acts in passes:
        stats.begin(torch.from_numpy(groups))
        for layer, a in enumerate(acts):
            stats.update(layer, layout(torch.from_numpy(a)))
    return stats.result()


@pytest.mark.parametrize("kernel", ["numba", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stats_match_plain_loops(dtype, kernel):
    rng = np.random.default_rng(0)
    G, L, I = 4, 2, 7
    passes = make_passes(rng, G, L, I, sizes=[13, 1, 29, 8])
    if dtype != torch.float32:  # compare against exactly the values the kernel sees
        passes = [(g, [torch.from_numpy(a).to(dtype).float().numpy() for a in acts]) for g, acts in passes]
    spec = StatsSpec(("active", "nonzero", "sum", "sqsum", "abs", "hist"), EDGES)
    result = _run(kernel, passes, spec, L, I, layout=lambda a: a.to(dtype).reshape(1, -1, I))
    tokens, active, act_sum, act_sqsum, abs_sum, hist, nonzero = reference(passes, G, L, I, np.array(EDGES))
    assert sorted(result) == [g for g in range(G) if tokens[g] > 0]
    for g, values in result.items():
        assert values["tokens"] == tokens[g]
        np.testing.assert_array_equal(values["active"], active[g])
        np.testing.assert_array_equal(values["nonzero"], nonzero[g])
        assert (active[g] < nonzero[g]).any()  # negative values count as non-zero, not as active
        np.testing.assert_array_equal(values["hist"], hist[g])
        # the numba kernel adds each token in float64, as the reference does
        rtol, atol = (1e-12, 1e-12) if kernel == "numba" else (1e-6, 1e-6)
        np.testing.assert_allclose(values["act_sum"], act_sum[g], rtol=rtol, atol=atol)
        np.testing.assert_allclose(values["act_sqsum"], act_sqsum[g], rtol=rtol)
        np.testing.assert_allclose(values["act_abssum"], abs_sum[g], rtol=rtol)


def _assert_same(a, b, rtol):
    assert sorted(a) == sorted(b)
    for g in a:
        assert a[g]["tokens"] == b[g]["tokens"]
        for name in a[g]:
            if name in ("active", "nonzero", "hist"):
                np.testing.assert_array_equal(a[g][name], b[g][name], err_msg=name)
            elif name != "tokens":
                np.testing.assert_allclose(a[g][name], b[g][name], rtol=rtol, atol=1e-4, err_msg=name)


def test_kernels_agree_at_scale_with_groups_that_appear_later():
    """The two CPU paths on bigger passes: 6 groups that first appear in later passes (the
    accumulators grow), long runs of one group, padding, values on the edges."""
    rng = np.random.default_rng(1)
    L, I = 3, 300
    passes = []
    for k, size in enumerate([257, 64, 500]):
        groups = np.repeat(rng.integers(-1, 2 + 2 * k, size=size // 16 + 1), 16)[:size]
        acts = [np.round(rng.normal(size=(size, I)), 1).astype(np.float32) for _ in range(L)]
        passes.append((groups, acts))
    spec = StatsSpec(("active", "nonzero", "sum", "sqsum", "abs", "hist"), parse_edges("-1:1:20"))
    _assert_same(_run("numba", passes, spec, L, I), _run("matmul", passes, spec, L, I), rtol=1e-5)


@pytest.mark.parametrize("edges", [(-1.0, -0.1, 0.0, 0.05, 1.0, 3.0), (0.5,), parse_edges("-2:2:400")],
                         ids=["uneven", "one-edge", "fine"])
def test_kernel_histogram_edges(edges):
    """Uneven edges (binary search), a single edge, and a fine even grid, with values on an edge and
    one float32 step either side of it (the guessed bin is corrected against the edges)."""
    rng = np.random.default_rng(3)
    a = np.round(rng.normal(size=(200, 40)), 2).astype(np.float32)
    on = np.asarray(edges, np.float32)[rng.integers(0, len(edges), size=(200, 5))]
    a[:, :5] = on  # on an edge, and one float32 step below and above it
    a[:, 5:10] = np.nextafter(on, np.float32(-np.inf))
    a[:, 10:15] = np.nextafter(on, np.float32(np.inf))
    passes = [(rng.integers(-1, 3, size=200), [a])]
    spec = StatsSpec(("active", "hist"), tuple(edges))
    got = _run("numba", passes, spec, 1, 40)
    ref = reference(passes, 3, 1, 40, np.asarray(edges, np.float32))[5]
    for g in got:
        np.testing.assert_array_equal(got[g]["hist"], ref[g])


def test_kernel_on_non_finite_and_non_contiguous_input():
    """NaN and infinities fall in the same bins on both paths (NaN and +inf in the last, -inf in the
    first), and a transposed (non-contiguous) activation is read correctly."""
    L, I = 1, 5
    a = np.array([[np.nan, np.inf, -np.inf, 0.0, 1.0], [2.0, -0.5, np.nan, 4.0, -1.0]], np.float32)
    passes = [(np.array([0, 1]), [a])]
    spec = StatsSpec(("active", "hist"), EDGES)
    got = _run("numba", passes, spec, L, I)
    ref = _run("matmul", passes, spec, L, I)
    _assert_same(got, ref, rtol=0)
    assert got[0]["hist"][0, 0, -1] == 1 and got[0]["hist"][0, 1, -1] == 1 and got[0]["hist"][0, 2, 0] == 1
    both = [(np.array([0, 1, -1, 1]), [np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)])]
    transposed = [(g, [np.ascontiguousarray(a.T).T for a in acts]) for g, acts in both]  # same values, F order
    spec = StatsSpec(("active", "sum"))
    _assert_same(_run("numba", transposed, spec, 1, 6), _run("numba", both, spec, 1, 6), rtol=0)
    assert not torch.from_numpy(transposed[0][1][0]).is_contiguous()


@pytest.mark.parametrize("kernel", ["numba", "matmul"])
def test_every_negative_group_id_is_padding(kernel):
    rng = np.random.default_rng(4)
    passes = [(np.array([0, 3, -2, -7, 3, -1]), [rng.normal(size=(6, 5)).astype(np.float32)])]
    got = _run(kernel, passes, StatsSpec(("active", "sum")), 1, 5)
    tokens, active, act_sum = reference(passes, 4, 1, 5, np.array(EDGES))[:3]
    assert sorted(got) == [0, 3]
    for g in got:
        assert got[g]["tokens"] == tokens[g]
        np.testing.assert_array_equal(got[g]["active"], active[g])
        np.testing.assert_allclose(got[g]["act_sum"], act_sum[g], rtol=1e-6)


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("LSN_STATS_KERNEL", raising=False)
    assert NeuronStats(StatsSpec(), 1, 3).kernel == "numba"  # auto on CPU: numba
    assert NeuronStats(StatsSpec(), 1, 3, kernel="matmul").kernel == "matmul"
    assert NeuronStats(StatsSpec(), 1, 3, device="meta").kernel == "matmul"  # not a CPU device
    with pytest.raises(HarvestError, match="unknown statistics kernel"):
        NeuronStats(StatsSpec(), 1, 3, kernel="fast")
    monkeypatch.setenv("LSN_STATS_KERNEL", "matmul")
    assert NeuronStats(StatsSpec(), 1, 3).kernel == "matmul"
    assert NeuronStats(StatsSpec(), 1, 3, kernel="numba").kernel == "numba"  # explicit wins
    monkeypatch.setenv("LSN_STATS_KERNEL", "fast")
    with pytest.raises(HarvestError, match="LSN_STATS_KERNEL must be one of"):
        NeuronStats(StatsSpec(), 1, 3)


@pytest.mark.parametrize("kernel", ["numba", "matmul"])
def test_padding_only_pass_counts_nothing(kernel):
    stats = NeuronStats(StatsSpec(), 1, 3, kernel=kernel)
    stats.begin(torch.full((5,), -1))
    stats.update(0, torch.ones(5, 3))
    assert stats.result() == {}


def test_shape_mismatch_is_an_error():
    stats = NeuronStats(StatsSpec(), 1, 3)
    stats.begin(torch.zeros(4, dtype=torch.long))
    with pytest.raises(HarvestError, match="does not match"):
        stats.update(0, torch.ones(4, 5))


def test_parse_stats_and_edges():
    assert parse_stats("sum") == ("active", "sum")
    assert parse_stats("hist,sqsum,active") == ("active", "sqsum", "hist")
    with pytest.raises(HarvestError, match="unknown statistic"):
        parse_stats("active,mean")
    edges = parse_edges("-1:4:100")
    assert len(edges) == 101 and 0.0 in edges and edges[0] == -1 and edges[-1] == 4
    for bad in ("1:0:4", "0:1:0", "a:b"):
        with pytest.raises(HarvestError):
            parse_edges(bad)
