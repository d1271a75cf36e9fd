"""Backends named as ``module:Class``, and the test-only null backend the pipeline benchmark runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from harvester.backends import backend_class
from harvester.config import HarvestConfig
from harvester.driver import harvest
from harvester.errors import HarvestError
from harvester.stats import StatsSpec
from harvester.windows import read_manifest
from tests.null_backend import NullBackend

NULL = "tests.null_backend:NullBackend"


def test_backend_by_import_path():
    assert backend_class(NULL) is NullBackend
    assert backend_class("hf").__name__ == "HFBackend"


@pytest.mark.parametrize("name, message", [
    ("nope", "unknown backend 'nope'"),
    ("no.such.module:Backend", "cannot load backend 'no.such.module:Backend'"),
    ("tests.null_backend:Missing", "cannot load backend 'tests.null_backend:Missing'"),
    ("json:loads", "is not a harvester.backends.base.Backend"),
    ("harvester.errors:HarvestError", "is not a harvester.backends.base.Backend"),
])
def test_bad_backend_names(name, message):
    with pytest.raises(HarvestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        backend_class(name)


def test_null_backend_harvest_counts_every_token(tmp_path, text_corpus):
    """The whole harvest path with the null backend: the store is complete, each group's ``tokens``
    is the number of tokens its stream's manifest lists, and the statistics have the model's shape."""
    store = tmp_path / "store"
    cfg = HarvestConfig(model="tiny:llama", corpus=f"text:{text_corpus}", store=str(store), backend=NULL,
                        seq_len=64, shard_tokens=256, use_ray=False, progress=False)
    harvest(cfg)
    ds = xr.open_zarr(store)
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["lsn"]
    assert attrs["complete"] and attrs["fingerprint"]["settings"]["backend"] == NULL
    for s, group in enumerate(ds.group.values):
        manifest = read_manifest(f"{store}/tokens/{s:05d}.json")
        expected = sum(sum(info["tokens"].values()) for info in manifest["shards"])
        assert int(ds.tokens.sel(group=group)) == expected > 0
        assert len(manifest["shards"]) > 1  # several shards per stream: the reduction adds them
    assert ds.active.shape == (3, 3, 128) and ds.active.dtype == np.int64
    payload = NullBackend("tiny:llama")._values(StatsSpec())  # each shard returns the same arrays
    shards = len(read_manifest(f"{store}/tokens/00000.json")["shards"])
    np.testing.assert_array_equal(ds.active.isel(group=0).values, payload["active"] * shards)
