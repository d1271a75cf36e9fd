"""What the store's integrity costs: shards of Llama-3-8B shape written with ``Store.write_shard`` and
read back (as the reduce reads them), with the crc32c codec and without it.

Each shard holds one group's ``active`` (int64), ``act_sum`` and ``act_sqsum`` (float64) over 32
layers x 14,336 neurons (11 MiB raw), from a seeded generator (counts out of 1M tokens, normal sums).
Both variants compute the shard's sha256 digest in ``write_shard``; its cost is timed on its own.

    .venv/bin/python benchmarks/checksum_cost.py            # 16 shards per variant, ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvester import store as store_module  # noqa: E402
from harvester.store import ShardDigest, Store, StoreAttrs  # noqa: E402


def shard(rng, layers: int, width: int) -> dict:
    return {0: {"tokens": 1 << 20, "active": rng.integers(0, 1 << 20, (layers, width), dtype=np.int64),
                "act_sum": rng.normal(size=(layers, width)) * 1e4,
                "act_sqsum": rng.normal(size=(layers, width)) ** 2 * 1e4}}


def run(path: Path, layers: int, width: int, n: int, crc: bool) -> tuple[list[float], list[float]]:
    """Seconds per shard written, and per shard read back (every row; with crc32c through the checked store)."""
    from zarr.codecs import ZstdCodec

    saved = store_module._compressors
    if not crc:
        store_module._compressors = lambda: (ZstdCodec(),)
    try:
        fingerprint = {"model": {}, "tokenizer": {}, "corpus": {"spec": "synthetic", "groups": ["g"]},
                       "settings": {"stats": ["active", "sum", "sqsum"]}}
        store = Store.create(path, StoreAttrs.new(fingerprint, layers=layers, width=width, specs=["synthetic"]),
                             n_shards=n)
    finally:
        store_module._compressors = saved
    rng = np.random.default_rng(0)
    results = [shard(rng, layers, width) for _ in range(n)]
    writes, reads = [], []
    for i, result in enumerate(results):
        t = time.perf_counter()
        store.write_shard(i, result)
        writes.append(time.perf_counter() - t)
    root = store.root if crc else store_module._zarr().open_group(  # unchecked: no checksums to check
        store=store_module.zarr_store(path, read_only=True), mode="r", use_consolidated=False)
    for i in range(n):
        t = time.perf_counter()
        for var in store.variables:
            root[f"shards/{var}"][i, 0]
        reads.append(time.perf_counter() - t)
    return writes, reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for crc in (False, True, False, True):  # interleaved: the machine's load changes over a run
            w, r = run(Path(tmp) / f"s-{crc}-{time.time_ns()}", args.layers, args.width, args.shards, crc)
            print(f"crc32c={'on ' if crc else 'off'}  write_shard median {statistics.median(w) * 1e3:7.1f} ms"
                  f"  read median {statistics.median(r) * 1e3:7.1f} ms  (per shard of "
                  f"{3 * args.layers * args.width * 8 / 2**20:.1f} MiB raw)", flush=True)
    data = np.random.default_rng(1).normal(size=(3, args.layers, args.width))
    t = time.perf_counter()
    digest = ShardDigest()
    for row in data:
        digest.add(row)
    digest.digest([1 << 20])
    print(f"sha256 digest of one shard's rows: {(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
