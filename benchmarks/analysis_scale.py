"""Scale of the analysis: every selection method, out of core on Dask, on a Llama-3-70B-shaped store.

A synthetic store (default 80 layers x 28,672 neurons x 80 groups; ``active``, ``act_sum``,
``act_sqsum``) is written through ``Store.create`` one group at a time from a seeded generator:
``active ~ Binomial(tokens, p)`` with ``p`` from a Beta distribution tilted per language, plus
neurons specific to one or two languages and neurons active on nearly every token, so that the masks
are not trivial (and entropy-lambda's autosweep bisects). Each method then runs in a fresh process
on Dask's default threaded scheduler, which prints its wall time and peak RSS (``ru_maxrss``, the
whole process: imports, opening the store, the method), against the 8 GiB target.

``act_prob_90p`` needs the histogram statistic (16 bins here); at 70B shape that is 23.5 GB raw,
so it runs on the reduced store only. The reduced store (default 80 x 28,672 x 8 groups) also holds
the exactness and speed cross-check: LAPE on Dask against an in-memory torch LAPE written straight
from docs/METHODS.md (``torch.kthvalue`` for tau and beta, a stable sort for the top-k), the masks
compared as flat indices. The last line is ``dask/torch time ratio: X``: the median Dask time over
the median torch time, the torch time including one read of the counts from the store into memory
(the compute-only ratio is printed above it). ``--compare-full`` runs the same cross-check on the
full store too (torch then needs about 9 GiB).

    .venv/bin/python benchmarks/analysis_scale.py                # 70B shape: ~4.5 GiB disk, ~6 min
    .venv/bin/python benchmarks/analysis_scale.py --layers 8 --width 2048 --groups 8   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fresh  # noqa: E402  (beside this file)

GIB = 1 << 30
LIMIT_GIB = 8.0
EDGES = (-2.0, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)  # 16 bins
METHODS = ("lape", "lape_variant", "entropy_lambda", "act_prob_zero", "coverage", "localizer", "random_control")


# -- the synthetic store ---------------------------------------------------------------------
def _fingerprint(groups: list[str], stats: list[str], edges) -> dict:
    """A fingerprint shaped like a harvest's, for a synthetic 70B-shaped model."""
    model = {"id": "synthetic:llama-3-70b-shaped", "revision": None, "weights": None, "architecture": "llama",
             "site": "mlp.act_fn", "unit": "mlp", "dtype": None, "device": None, "device_map": None}
    fingerprint = {
        "model": model,
        "tokenizer": {"name": None, "vocab_size": None, "eos_token_id": None, "sha256": None},
        "corpus": {"spec": "synthetic", "groups": groups, "streams": [], "source": None, "options": None},
        "settings": {"backend": None, "seq_len": None, "batch_size": None, "shard_tokens": None,
                     "stats": stats, "hist_edges": list(edges) if edges else None, "pooling": "token"},
    }
    return fingerprint


class Generator:
    """Counts of group ``g`` from ``seed`` alone (any group, in any order, gives the same numbers)."""

    def __init__(self, L: int, I: int, K: int, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.L, self.I, self.K, self.seed = L, I, K, seed
        self.p = rng.beta(0.4, 2.5, size=(L, I))  # [L, I] shared activation probability
        kind = rng.random((L, I))
        self.specific = kind < 0.008  # language-specific neurons ...
        self.owner = rng.integers(0, K, size=(L, I))  # ... of one language,
        self.second = np.where(rng.random((L, I)) < 0.3, rng.integers(0, K, size=(L, I)), -1)  # or two
        self.shared = kind > 0.997  # neurons active on nearly every token of every language
        self.mu = rng.normal(0.0, 0.2, size=(L, I))  # per-token activation mean and spread (localizer)
        self.sd = rng.gamma(2.0, 0.25, size=(L, I))
        self.contrast = rng.random((L, I)) < 0.02  # neurons whose mean differs between the halves
        self.tokens = rng.integers(1_000_000, 10_000_000, size=K, endpoint=True).astype(np.int64)

    def probability(self, g: int, rng) -> np.ndarray:
        """Group ``g``'s activation probability ``[L, I]`` (drawn from ``rng``, the group's generator)."""
        p = np.clip(self.p * np.exp(rng.normal(0.0, 0.15, size=self.p.shape)), 0.0, 1.0)
        mine = (self.owner == g) | (self.second == g)
        p[self.specific] = np.where(mine[self.specific], rng.uniform(0.5, 0.95, size=mine.shape)[self.specific], 1e-4)
        p[self.shared] = rng.uniform(0.9, 0.99, size=p.shape)[self.shared]
        return p

    def group(self, g: int, hist: bool = False) -> dict:
        rng = np.random.default_rng([self.seed, 1, g])
        n = int(self.tokens[g])
        p = self.probability(g, rng)
        active = rng.binomial(n, p)  # [L, I] int64
        mean = self.mu + np.where(self.contrast & (g < self.K // 2), 0.05, 0.0)
        sums = n * mean + np.sqrt(n) * self.sd * rng.standard_normal(size=mean.shape)
        sqsums = n * (mean ** 2 + self.sd ** 2) * (1.0 + 1e-3 * rng.standard_normal(size=mean.shape))
        out = {"active": active.astype(np.int64), "act_sum": sums, "act_sqsum": sqsums}
        if hist:
            out["hist"] = _histogram(rng, active, n, len(EDGES) + 1)
        return out


def _histogram(rng, active: np.ndarray, n: int, B: int) -> np.ndarray:
    """[L, I, B] counts summing to ``n``: the inactive tokens over the bins below 0, the active ones
    over the bins from 0 up, with a per-neuron tilt so that the pooled percentiles differ."""
    zero = EDGES.index(0.0) + 1  # first bin whose values are >= 0
    out = np.zeros((*active.shape, B), dtype=np.int64)
    _spread(rng, out[..., :zero], n - active, np.full(zero, 1.0 / zero))
    tilt = rng.uniform(0.3, 3.0, size=active.shape)
    weights = np.exp(-np.arange(B - zero)[None, None, :] / tilt[..., None])
    _spread(rng, out[..., zero:], active, weights / weights.sum(axis=-1, keepdims=True))
    return out


def _spread(rng, out: np.ndarray, total: np.ndarray, weights: np.ndarray) -> None:
    """Multinomial(total, weights) along the last axis, one binomial per bin (vectorised over neurons)."""
    left, mass = total.astype(np.int64), np.ones(total.shape)
    for b in range(out.shape[-1] - 1):
        w = weights[..., b] if weights.ndim > 1 else weights[b]
        out[..., b] = rng.binomial(left, np.clip(w / np.maximum(mass, 1e-300), 0.0, 1.0))
        left, mass = left - out[..., b], mass - w
    out[..., -1] = left


def write_store(path: str, L: int, I: int, K: int, seed: int, hist: bool) -> None:
    """Create the store and write it group by group (one group's arrays in memory at a time)."""
    from harvester.store import Store, StoreAttrs, Totals

    stats = ["active", "sum", "sqsum"] + (["hist"] if hist else [])
    groups = [f"g{g:02d}" for g in range(K)]
    attrs = StoreAttrs.new(_fingerprint(groups, stats, EDGES if hist else None), layers=L, width=I,
                           specs=["synthetic"], architectures=["LlamaForCausalLM"])
    attrs = attrs.replace(meta=attrs.meta.replace(extra={"synthetic": {"generator": "benchmarks/analysis_scale.py"}}))
    gen = Generator(L, I, K, seed)
    store = Store.create(path, attrs, n_shards=0)
    for g in range(K):
        for name, values in gen.group(g, hist).items():
            store.root[name][g] = values
    store.root["tokens"][:] = gen.tokens
    corpus = store.attrs.corpus.replace(tokens_per_group=gen.tokens.tolist(), tokens=int(gen.tokens.sum()))
    store.set_attrs(meta=store.attrs.meta.replace(corpus=corpus), complete=True, totals=Totals.of([], gen.tokens))


# -- one method in this process (the child) --------------------------------------------------
def run_method(method: str, store: str, work: str) -> dict:
    from analysis import methods
    from analysis.data import open_counts

    counts = open_counts(store)
    P = counts.probabilities()
    K, L, I = P.shape
    info = {}
    if method == "lape":
        out = methods.lape(P)
        np.savez(Path(work) / "lape_mask.npz", *out["selected"])
        info = {"tau": out["tau"], "beta": out["beta"]}
    elif method == "lape_variant":
        out = methods.lape_variant(P)
        info = {"threshold": out["threshold"], "tau": out["tau"]}
    elif method == "entropy_lambda":
        el = methods.EntropyLambda(P)
        lam, appear = el.autosweep()
        out = {"selected": el.masks(lam if lam is not None else 0.0)}
        info = {"lambda": lam, "appear_K": appear[K], "beta": el.beta}
    elif method == "act_prob_zero":
        out = methods.act_prob_zero(P)
    elif method == "act_prob_90p":
        out = methods.act_prob_90p(counts.variable("hist"), counts.tokens)
    elif method == "coverage":
        out = methods.coverage(counts.numer)
    elif method == "localizer":
        half = K // 2
        out = methods.localizer(counts.tokens, counts.variable("act_sum"), counts.variable("act_sqsum"),
                                list(range(half)), list(range(half, K)), top_percent=1.0)
    elif method == "random_control":
        with np.load(Path(work) / "lape_mask.npz") as z:
            mask = [z[f"arr_{k}"] for k in range(len(z.files))]
        start = time.perf_counter()
        out = {"selected": methods.random_control(mask, L, I, seed=0)}
        info = {"timed": "random_control only", "seconds_alone": time.perf_counter() - start}
    else:
        raise SystemExit(f"unknown method {method}")
    sizes = [len(s) for s in out["selected"]]
    return {**info, "masks": len(sizes), "selected_total": int(sum(sizes)), "selected_min": min(sizes),
            "selected_max": max(sizes)}


def child(method: str, store: str, work: str) -> None:
    start = time.perf_counter()
    result = run_method(method, store, work) if method != "compare" else compare(store, work)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_gib"] = fresh.peak_rss_gib()
    fresh.report(result)


def in_child(method: str, store: str, work: str) -> dict:
    """Run one method in a fresh interpreter; its last ``RESULT`` line, parsed."""
    return fresh.run(__file__, "--child", method, "--store", store, "--work", work, check=False)[0]


# -- LAPE in memory, with torch (the cross-check) ----------------------------------------------
def torch_lape(active, denom, top_rate=0.01, filter_rate=0.95, bar_ratio=0.95) -> tuple[list, float, float]:
    """LAPE exactly as docs/METHODS.md writes it, on an in-memory ``active [K, L, I]`` (torch int64)."""
    import torch

    K, L, I = active.shape
    P = active.double() / denom.double()[:, None, None]  # [K, L, I]
    flat, N = P.reshape(-1), P.numel()
    tau = torch.kthvalue(flat, round(filter_rate * N)).values.item()  # step 3
    same = round(bar_ratio * N) == round(filter_rate * N)
    beta = tau if same else torch.kthvalue(flat, round(bar_ratio * N)).values.item()  # step 5
    total = P.sum(dim=0)  # [L, I]
    q = torch.where(total > 0, P / total, torch.zeros((), dtype=P.dtype))  # step 1
    terms = torch.where(q > 0, q * torch.log(torch.where(q > 0, q, torch.ones((), dtype=P.dtype))), 0.0)
    H = -terms.sum(dim=0)  # step 2
    H = torch.where((P > tau).any(dim=0), H, torch.full((), float("inf"), dtype=H.dtype))
    chosen = torch.sort(H.reshape(-1), stable=True).indices[:round(top_rate * L * I)]  # step 4, ties by index
    chosen = torch.sort(chosen).values
    member = P.reshape(K, L * I)[:, chosen] > beta  # [K, selected]
    return [chosen[member[k]].numpy().astype(np.int64) for k in range(K)], tau, beta


def compare(store: str, work: str, repeats: int | None = None) -> dict:
    """LAPE on Dask and in memory with torch, alternating; the masks must be identical."""
    import torch

    from analysis import methods
    from analysis.data import open_counts

    repeats = repeats or int(os.environ.get("SCALE_REPEATS", "3"))
    counts = open_counts(store)
    denom = torch.from_numpy(counts.denom)
    times = {"dask": [], "torch_load": [], "torch_compute": []}
    for _ in range(repeats):
        start = time.perf_counter()
        got = methods.lape(counts.probabilities())
        times["dask"].append(time.perf_counter() - start)
        start = time.perf_counter()
        active = torch.from_numpy(counts.numer.compute())  # [K, L, I] int64, read once
        times["torch_load"].append(time.perf_counter() - start)
        start = time.perf_counter()
        want, tau, beta = torch_lape(active, denom)
        times["torch_compute"].append(time.perf_counter() - start)
        del active
    same = (got["tau"], got["beta"]) == (tau, beta) and all(
        np.array_equal(g, w) for g, w in zip(got["selected"], want, strict=True))
    if not same:
        raise SystemExit("MISMATCH: the Dask and torch LAPE masks differ")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": list(counts.numer.shape), "identical": same, "selected_total": sum(len(s) for s in want),
            "tau": tau, "torch_threads": torch.get_num_threads(), "times": times, "median": med,
            "ratio_compute": med["dask"] / med["torch_compute"],
            "ratio_end_to_end": med["dask"] / (med["torch_load"] + med["torch_compute"])}


# -- the parent ------------------------------------------------------------------------------
def raw_gib(L: int, I: int, K: int, hist: bool) -> float:
    return K * L * I * 8 * (3 + (len(EDGES) + 1 if hist else 0)) / GIB


def ensure_store(path: str, L: int, I: int, K: int, seed: int, hist: bool, work: str) -> tuple[bool, dict]:
    """Reuse a complete store of the right shape, or write one (in a child, for its peak RSS)."""
    from harvester.store import read_attrs

    attrs = read_attrs(path)
    if attrs is not None:
        shape = (attrs.model.layers, attrs.model.width, len(attrs.corpus.groups))
        if not attrs.complete or shape != (L, I, K):
            raise SystemExit(f"{path}: a store of shape {shape} (complete={attrs.complete}), not {(L, I, K)}")
        print(f"reusing {path} ({L} layers x {I} neurons x {K} groups)", flush=True)
        return False, {}
    free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else work).free / GIB
    if free < raw_gib(L, I, K, hist) + 2:
        raise SystemExit(f"{path}: needs up to {raw_gib(L, I, K, hist):.1f} GiB, {free:.1f} GiB free")
    start = time.perf_counter()
    info, _ = fresh.run(__file__, "--write", path, "--layers", L, "--width", I, "--groups", K, "--seed", seed,
                        *(["--hist"] if hist else []))
    info["seconds"] = time.perf_counter() - start
    info["disk_gib"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / GIB
    print(f"wrote {path}: {L} x {I} x {K}{' + hist' if hist else ''}, {info['seconds']:.1f} s, "
          f"{info['disk_gib']:.2f} GiB on disk ({raw_gib(L, I, K, hist):.2f} raw), "
          f"writer peak RSS {info['peak_rss_gib']:.2f} GiB", flush=True)
    return True, info


def report(name: str, r: dict) -> None:
    if "error" in r:
        print(f"{name:>15}: FAILED {r['error']}", flush=True)
        return
    flag = "ok" if r["peak_rss_gib"] <= LIMIT_GIB else f"OVER {LIMIT_GIB:g} GiB"
    extra = {k: v for k, v in r.items() if k not in ("seconds", "peak_rss_gib")}
    print(f"{name:>15}: {r['seconds']:8.1f} s  peak RSS {r['peak_rss_gib']:5.2f} GiB ({flag})  "
          f"load average {os.getloadavg()[0]:.2f}  {json.dumps(extra)}", flush=True)


def compare_report(store: str, work: str, repeats: int) -> float | None:
    os.environ["SCALE_REPEATS"] = str(repeats)
    r = in_child("compare", store, work)
    if "error" in r:
        print(f"LAPE dask vs torch: FAILED {r['error']}", flush=True)
        return None
    med = r["median"]
    print(f"LAPE on {r['shape']} (K, L, I): masks identical (flat indices, tau, beta): "
          f"{r['identical']}; {r['selected_total']} memberships", flush=True)
    print(f"  median of {repeats}: dask {med['dask']:.2f} s; torch ({r['torch_threads']} threads) "
          f"load {med['torch_load']:.2f} s + compute {med['torch_compute']:.2f} s; "
          f"child peak RSS {r['peak_rss_gib']:.2f} GiB; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"  dask/torch compute-only ratio: {r['ratio_compute']:.3f}; "
          f"with torch's read of the store: {r['ratio_end_to_end']:.3f}", flush=True)
    return r["ratio_end_to_end"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--width", type=int, default=28672)
    ap.add_argument("--groups", type=int, default=80)
    ap.add_argument("--reduced-groups", type=int, default=8, help="groups of the store for act_prob_90p and torch")
    ap.add_argument("--store", help="the full-size store: reused if it exists (never deleted then)")
    ap.add_argument("--reduced-store", help="the reduced store (with hist): reused if it exists")
    ap.add_argument("--methods", default=",".join(METHODS + ("act_prob_90p", "compare")))
    ap.add_argument("--repeats", type=int, default=3, help="Dask/torch LAPE pairs on the reduced store")
    ap.add_argument("--compare-full", action="store_true",
                    help="also LAPE on Dask against torch on the full store (torch needs ~6x its raw counts in RAM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stores it writes")
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    ap.add_argument("--hist", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.store, args.work)
    if args.write:
        write_store(args.write, args.layers, args.width, args.groups, args.seed, args.hist)
        return fresh.report({"peak_rss_gib": fresh.peak_rss_gib()})

    wanted = args.methods.split(",")
    work = tempfile.mkdtemp(prefix="analysis_scale-", dir=os.environ.get("TMPDIR", "/tmp"))
    full = args.store or str(Path(work) / "store")
    reduced = args.reduced_store or str(Path(work) / "reduced")
    L, I, K, Kr = args.layers, args.width, args.groups, args.reduced_groups
    import dask
    import torch

    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB; "
          f"dask {dask.__version__} threaded scheduler, torch {torch.__version__}; work dir {work}", flush=True)
    made = []
    try:
        if any(m in wanted for m in METHODS):
            print(f"\n== full store: {L} layers x {I} neurons x {K} groups "
                  f"({K * L * I / 1e6:.1f}M values per statistic) ==", flush=True)
            if ensure_store(full, L, I, K, args.seed, False, work)[0]:
                made.append(full)
            for m in METHODS:
                if m in wanted and not (m == "random_control" and "lape" not in wanted):
                    report(m, in_child(m, full, work))
            if args.compare_full:
                print("torch LAPE in memory at full size (about 6 x the counts' raw size in RAM):", flush=True)
                compare_report(full, work, args.repeats)
        ratio = None
        if "act_prob_90p" in wanted or "compare" in wanted:
            print(f"\n== reduced store: {L} layers x {I} neurons x {Kr} groups, hist {len(EDGES) + 1} bins ==",
                  flush=True)
            if ensure_store(reduced, L, I, Kr, args.seed, True, work)[0]:
                made.append(reduced)
            if "act_prob_90p" in wanted:
                report("act_prob_90p", in_child("act_prob_90p", reduced, work))
            if "compare" in wanted:
                ratio = compare_report(reduced, work, args.repeats)
        if ratio is not None:
            print(f"dask/torch time ratio: {ratio:.3f}")
    finally:
        for path in made:
            if args.keep:
                print(f"kept {path}")
            else:
                shutil.rmtree(path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
