"""Counts recomputed from shard rows (analysis.shards): against the totals and a plain NumPy sum of the
rows read straight from the store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from analysis.data import open_counts
from analysis.shards import shard_plan, weighted
from harvester.errors import HarvestError
from lsn.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def hist_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("shards") / "S"
    assert main(["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=24,langs=en+de+fr", "--no-ray",
                 "--seq-len", "64", "--shard-tokens", "256", "--no-progress", "--stats", "active,sum,hist",
                 "--hist-edges", "-1:2:6", "--store", str(store)]) == 0
    return store


def _rows(store, name):
    return zarr.open_group(str(store), mode="r")[f"shards/{name}"]


def test_plan_is_the_reduced_shards(hist_store):
    counts = open_counts(str(hist_store))
    plan = shard_plan(counts.store, counts.attrs)
    assert len(plan.indices) == counts.attrs.totals.shards > 3
    assert list(plan.tokens.sum(axis=0)) == list(counts.attrs.totals.tokens)
    assert all(np.diff(plan.indices) > 0)


def test_all_ones_are_the_totals(hist_store):
    counts = open_counts(str(hist_store))
    plan = shard_plan(counts.store, counts.attrs)
    again = weighted(counts, plan, plan.ones())
    np.testing.assert_array_equal(again.numer.compute(), counts.numer.compute())
    np.testing.assert_array_equal(again.tokens, counts.tokens)
    np.testing.assert_array_equal(again.variable("hist").compute(), counts.variable("hist").compute())
    np.testing.assert_allclose(again.variable("act_sum").compute(), counts.variable("act_sum").compute(),
                               rtol=1e-12)


def test_weights_against_plain_sum(hist_store):
    counts = open_counts(str(hist_store), ["en", "both=de+fr"])
    plan = shard_plan(counts.store, counts.attrs)
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 3, size=plan.tokens.shape)
    again = weighted(counts, plan, weights)
    for name, got in (("active", again.numer.compute()), ("hist", again.variable("hist").compute())):
        rows = _rows(hist_store, name)
        for k, idx in enumerate(counts.index):
            expect = np.zeros(rows.shape[2:], np.int64)
            for g in idx:
                for s, index in enumerate(plan.indices):
                    if plan.tokens[s, g] > 0:
                        expect += weights[s, g] * rows[int(index), g].astype(np.int64)
            np.testing.assert_array_equal(got[k], expect, err_msg=name)
    for k, idx in enumerate(counts.index):
        assert again.tokens[k] == sum(int(weights[s, g] * plan.tokens[s, g]) for g in idx
                                      for s in range(len(plan.indices)))


def test_a_changed_plan_is_refused(hist_store, tmp_path):
    copy = tmp_path / "S"
    shutil.copytree(hist_store, copy)
    counts = open_counts(str(copy))
    plan = shard_plan(counts.store, counts.attrs)
    done = _rows_rw(copy)
    done[int(plan.indices[-1])] = 0
    with pytest.raises(HarvestError, match="not those its totals were summed from"):
        shard_plan(counts.store, counts.attrs)


def _rows_rw(store):
    from harvester.store import Store

    return Store(str(store)).array("shards/done")
