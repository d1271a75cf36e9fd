"""Bootstrap stability at scale: ``lsn analyze lape --bootstrap N`` on a Llama-3-70B-shaped store with shard rows.

``analysis_scale.py``'s store holds totals only (no shard rows), which a bootstrap cannot resample. This
script writes one as a harvest does: ``Store.create(..., n_shards=K * S)``, ``S`` shards per group written
through ``Store.write_shard`` (each shard one group's ``active`` counts: ``Binomial(tokens / S, p)`` with
``p`` from ``analysis_scale.Generator``, the same per group for all its shards), then ``Store.reduce``.
Default 80 layers x 28,672 neurons x 8 groups (the reduced store of ``analysis_scale.py``) x 8 shards per
group: 64 shard rows of 18 MB raw.

Then, each in a fresh interpreter, ``lsn analyze lape`` without and with ``--bootstrap N`` (default 100),
on Dask's threaded scheduler; each prints its wall time and peak RSS (``ru_maxrss``: imports, opening the
store, the full-data mask, the resamples), checked against the 1 GiB target. The last line:
``bootstrap: N resamples of LAPE in X s (Y s per resample; full-data LAPE Z s), peak RSS W GiB``.

    .venv/bin/python benchmarks/bootstrap_scale.py                    # 70B shape: ~1 GB of disk
    .venv/bin/python benchmarks/bootstrap_scale.py --resamples 10     # the per-resample time, sooner
    .venv/bin/python benchmarks/bootstrap_scale.py --layers 4 --width 512 --groups 4 --shards 4 --resamples 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import fresh  # noqa: E402  (beside this file)

GIB = 1 << 30
LIMIT_GIB = 1.0


def write_store(path: str, L: int, I: int, K: int, S: int, seed: int) -> None:
    """A store as a harvest leaves it: ``S`` shards per group, each written with its digest, then reduced."""
    from analysis_scale import Generator, _fingerprint

    from harvester.store import Store, StoreAttrs

    attrs = StoreAttrs.new(_fingerprint([f"g{g:02d}" for g in range(K)], ["active"], None), layers=L, width=I,
                           specs=["synthetic"], architectures=["LlamaForCausalLM"])
    gen = Generator(L, I, K, seed)
    store = Store.create(path, attrs, n_shards=K * S)
    for g in range(K):
        p = gen.probability(g, np.random.default_rng([seed, 1, g]))
        for s in range(S):
            n = int(gen.tokens[g]) // S
            rng = np.random.default_rng([seed, 2, g, s])
            store.write_shard(g * S + s, {g: {"tokens": n, "active": rng.binomial(n, p)}})
    store.reduce(list(range(K * S)))


def child(store: str, out: str, resamples: int) -> None:
    from lsn.cli import main

    start = time.perf_counter()
    flags = ["--bootstrap", str(resamples), "--no-progress"] if resamples else []
    code = main(["analyze", "lape", "--store", store, "--out", out, *flags])
    fresh.report({"code": code, "seconds": time.perf_counter() - start, "peak_rss_gib": fresh.peak_rss_gib()})


def in_child(*args: str) -> dict:
    result, lines = fresh.run(__file__, *args)
    sys.stdout.write("".join(f"  {line}\n" for line in lines))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--width", type=int, default=28672)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--shards", type=int, default=8, help="shards per group")
    ap.add_argument("--resamples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="the store: reused if it exists (never deleted then)")
    ap.add_argument("--keep", action="store_true", help="keep the store it writes")
    ap.add_argument("--write", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_store(args.write, args.layers, args.width, args.groups, args.shards, args.seed)
        return fresh.report({"peak_rss_gib": fresh.peak_rss_gib()})
    if args.child:
        return child(args.child, args.out, args.resamples)

    work = tempfile.mkdtemp(prefix="bootstrap_scale-", dir=os.environ.get("TMPDIR", "/tmp"))
    store = args.store or str(Path(work) / "store")
    L, I, K, S, N = args.layers, args.width, args.groups, args.shards, args.resamples
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; store {store}", flush=True)
    try:
        if not Path(store).exists():
            start = time.perf_counter()
            made = in_child("--write", store, "--layers", str(L), "--width", str(I), "--groups", str(K),
                            "--shards", str(S), "--seed", str(args.seed))
            size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()) / 1e9
            print(f"wrote {L} layers x {I} neurons x {K} groups x {S} shards per group (write_shard, reduce): "
                  f"{time.perf_counter() - start:.1f} s, {size:.2f} GB on disk, writer peak RSS "
                  f"{made['peak_rss_gib']:.2f} GiB", flush=True)
        full = in_child("--child", store, "--out", str(Path(work) / "full.npz"), "--resamples", "0")
        print(f"full-data LAPE: {full['seconds']:.1f} s, peak RSS {full['peak_rss_gib']:.2f} GiB", flush=True)
        boot = in_child("--child", store, "--out", str(Path(work) / "boot.npz"), "--resamples", str(N))
        per = (boot["seconds"] - full["seconds"]) / N
        flag = "ok" if boot["peak_rss_gib"] <= LIMIT_GIB else f"OVER {LIMIT_GIB:g} GiB"
        print(f"  peak RSS {flag}; load average {os.getloadavg()[0]:.2f}", flush=True)
        print(f"bootstrap: {N} resamples of LAPE in {boot['seconds']:.1f} s ({per:.2f} s per resample; full-data "
              f"LAPE {full['seconds']:.1f} s), peak RSS {boot['peak_rss_gib']:.2f} GiB")
    finally:
        if args.store or not args.keep:  # a store given is never deleted (it is not under ``work``)
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {store}")


if __name__ == "__main__":
    main()
