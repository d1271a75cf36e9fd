"""DLN's selection (``lsn analyze dln``) at Llama-3-8B shape: its wall time and peak memory.

A synthetic store of ``--langs`` languages (default 7) × 32 layers × 14,336 neurons × 402 histogram bins
(400 inner bins, an underflow and an overflow bin; ``hist`` int64, 10.3 GB raw, about 1.2 GB on disk after
zstd) is written through ``Store.create`` one layer of one language at a time. Each neuron's histogram is
a discretised normal bump (``floor(tokens · mass)`` per bin, the rest in the underflow bin, so every
histogram sums to the language's tokens): its centre and width are the neuron's, shifted slightly per
language; about 1% of the neurons have one language, and 0.5% two languages, shifted far away, so
that single- and multi-language neurons exist. The histogram's bins are the fixed edges the store
records (the overlap does not read them).

``lsn analyze dln --store S --out M`` then runs in a fresh process on Dask's threaded scheduler, which
prints its wall time and peak RSS (``ru_maxrss``: imports, opening the store, the one pass over the
histograms, the split and threshold, writing the mask) and CPU time (user + system). The last line is
``dln: X s (C s CPU), Y GiB peak RSS, ...``.

    .venv/bin/python benchmarks/dln_scale.py                                # 8B shape: ~12 GB written
    .venv/bin/python benchmarks/dln_scale.py --layers 2 --width 256 --bins 16   # seconds
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fresh  # noqa: E402  (beside this file)

GIB = 1 << 30
TOKENS = 1_000_000


def histograms(rng, K: int, I: int, B: int, tokens: int) -> list[np.ndarray]:
    """One layer's ``[I, B]`` int64 histograms of each of ``K`` languages."""
    inner = B - 2
    centre = rng.uniform(0.25, 0.75, size=I) * inner
    width = rng.uniform(0.01, 0.15, size=I) * inner
    far = rng.random(I)
    owner, second = rng.integers(0, K, size=I), rng.integers(0, K, size=I)
    bins = np.arange(inner) + 0.5
    out = []
    for k in range(K):
        shift = rng.normal(0.0, 0.05, size=I) * width
        apart = (far < 0.01) & (owner == k) | (far > 0.995) & ((owner == k) | (second == k))
        c = centre + shift + np.where(apart, 6 * width, 0.0)
        mass = np.exp(-0.5 * ((bins[None, :] - c[:, None]) / width[:, None]) ** 2)
        counts = np.floor(tokens * mass / mass.sum(axis=1, keepdims=True)).astype(np.int64)
        h = np.zeros((I, B), np.int64)
        h[:, 1:-1] = counts
        h[:, 0] = tokens - counts.sum(axis=1)
        out.append(h)
    return out


def write_store(path: str, L: int, I: int, K: int, B: int, seed: int) -> None:
    """The store, written a chunk of layers of every language at a time."""
    from analysis_scale import _fingerprint

    from harvester.store import Store, StoreAttrs, Totals

    groups = [f"l{k}" for k in range(K)]
    edges = np.linspace(-0.4, 1.6, B - 1).tolist()
    attrs = StoreAttrs.new(_fingerprint(groups, ["active", "hist"], edges), layers=L, width=I,
                           specs=["synthetic"], architectures=["LlamaForCausalLM"])
    attrs = attrs.replace(meta=attrs.meta.replace(extra={"synthetic": {"generator": "benchmarks/dln_scale.py"}}))
    store = Store.create(path, attrs, n_shards=0)
    rng = np.random.default_rng(seed)
    active = np.zeros((K, L, I), np.int64)
    zero = int(np.searchsorted(edges, 0.0, side="right"))  # the first bin of values >= 0
    step = store.root["hist"].chunks[1]  # whole chunks: layers of every language at a time
    for l0 in range(0, L, step):
        layers = [histograms(rng, K, I, B, TOKENS) for _ in range(l0, min(l0 + step, L))]
        for k in range(K):
            h = np.stack([per[k] for per in layers])
            store.root["hist"][k, l0:l0 + len(layers)] = h
            active[k, l0:l0 + len(layers)] = h[..., zero:].sum(axis=-1)
    store.root["active"][:] = active
    tokens = np.full(K, TOKENS, np.int64)
    store.root["tokens"][:] = tokens
    corpus = store.attrs.corpus.replace(tokens_per_group=tokens.tolist(), tokens=int(tokens.sum()))
    store.set_attrs(meta=store.attrs.meta.replace(corpus=corpus), complete=True, totals=Totals.of([], tokens))


def child(store: str, out: str, pct: float) -> None:
    """``lsn analyze dln`` in this (fresh) process; its time and peak RSS as the last line."""
    from lsn.cli import main

    start = time.perf_counter()
    code = main(["analyze", "dln", "--store", store, "--out", out, "--pct", str(pct)])
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fresh.report({"code": code, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "peak_rss_gib": fresh.peak_rss_gib()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=14336)
    ap.add_argument("--langs", type=int, default=7)
    ap.add_argument("--bins", type=int, default=402, help="bins in all, the under- and overflow bins included")
    ap.add_argument("--pct", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="the store: reused if it exists (never deleted then)")
    ap.add_argument("--keep", action="store_true", help="keep the store it writes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.store, args.out, args.pct)
    if args.write:
        write_store(args.store, args.layers, args.width, args.langs, args.bins, args.seed)
        return fresh.report({"peak_rss_gib": fresh.peak_rss_gib()})

    L, I, K, B = args.layers, args.width, args.langs, args.bins
    work = tempfile.mkdtemp(prefix="dln_scale-", dir=os.environ.get("TMPDIR", "/tmp"))
    store = args.store or str(Path(work) / "store")
    made = not Path(store).exists()
    me = [__file__, "--store", store]
    print(f"machine: {os.cpu_count()} cores; {K} languages x {L} layers x {I} neurons x {B} bins "
          f"(hist int64, {K * L * I * B * 8 / GIB:.2f} GiB raw)", flush=True)
    try:
        if made:
            start = time.perf_counter()
            info, _ = fresh.run(*me, "--write", "--layers", L, "--width", I, "--langs", K, "--bins", B,
                                "--seed", args.seed)
            disk = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()) / GIB
            print(f"wrote {store}: {time.perf_counter() - start:.1f} s, {disk:.2f} GiB on disk, "
                  f"writer peak RSS {info['peak_rss_gib']:.2f} GiB", flush=True)
        result, printed = fresh.run(*me, "--child", "--out", str(Path(work) / "dln.npz"), "--pct", str(args.pct))
        print("\n".join(printed), flush=True)
        print(f"dln: {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} s CPU), {result['peak_rss_gib']:.2f} GiB "
              f"peak RSS, load average "
              f"{os.getloadavg()[0]:.2f} ({K} x {L} x {I} x {B}, pct {args.pct:g})", flush=True)
    finally:
        if made and not args.keep:
            shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
