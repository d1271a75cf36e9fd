"""Small helpers shared by tests."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import xarray as xr


HARVEST = ["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=20,langs=en+de", "--no-ray",
           "--seq-len", "64", "--shard-tokens", "512", "--no-progress"]
"""The small harvest the store tests (integrity, repair, metadata, edges) damage copies of."""


def harvest(store: Path) -> list[str]:
    return [*HARVEST, "--store", str(store)]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``: proves that nothing in a store changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_totals(a: Path, b: Path) -> None:
    """Bit-identical totals (floats included) in two stores."""
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert list(da.data_vars) == list(db.data_vars)
    for var in da.data_vars:
        np.testing.assert_array_equal(da[var].values, db[var].values, err_msg=var)


def assert_group_ends(pgid: int, what: str, timeout: float = 30) -> None:
    """Every process of the group ``pgid`` (one started with ``start_new_session``) exits in time."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"{what} outlived it"
        time.sleep(0.1)
