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
                    act_sum[g, layer, i] += x
                    act_sqsum[g, layer, i] += x * x
                    abs_sum[g, layer, i] += abs(x)
                    hist[g, layer, i, np.searchsorted(edges, x, side="right")] += 1
    return tokens, active, act_sum, act_sqsum, abs_sum, hist


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_match_plain_loops(dtype):
    rng = np.random.default_rng(0)
    G, L, I = 4, 2, 7
    passes = make_passes(rng, G, L, I, sizes=[13, 1, 29, 8])
    if dtype != torch.float32:  # compare against exactly the values the kernel sees
        passes = [(g, [torch.from_numpy(a).to(dtype).float().numpy() for a in acts]) for g, acts in passes]
    stats = NeuronStats(StatsSpec(("active", "sum", "sqsum", "abs", "hist"), EDGES), L, I)
    for groups, acts in passes:
        stats.begin(torch.from_numpy(groups))
        for layer, a in enumerate(acts):
            stats.update(layer, torch.from_numpy(a).to(dtype).reshape(1, -1, I))
    tokens, active, act_sum, act_sqsum, abs_sum, hist = reference(passes, G, L, I, np.array(EDGES))
    result = stats.result()
    assert sorted(result) == [g for g in range(G) if tokens[g] > 0]
    for g, values in result.items():
        assert values["tokens"] == tokens[g]
        np.testing.assert_array_equal(values["active"], active[g])
        np.testing.assert_array_equal(values["hist"], hist[g])
        np.testing.assert_allclose(values["act_sum"], act_sum[g], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(values["act_sqsum"], act_sqsum[g], rtol=1e-6)
        np.testing.assert_allclose(values["act_abssum"], abs_sum[g], rtol=1e-6)


def test_padding_only_pass_counts_nothing():
    stats = NeuronStats(StatsSpec(), 1, 3)
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
