"""act_prob_90p from a histogram against the exact definition on raw activations (issue 17, item 4).

Synthetic neurons with known distributions: per neuron a scale (log-uniform, so that some neurons are
narrow against the bins, as many real ones are) and per language a shift; the activation is SiLU of a
normal pre-activation. The raw values give the exact score (each language's share of its tokens above
the pooled ``np.quantile(..., 0.9)``); their histogram at store-like edges gives the score at bin
resolution (the rule before: whole bins above the percentile's bin) and interpolated inside the bin
(``analysis.methods.act_prob_90p_scores``). Printed: per rate, the mean over languages of the top-m
overlap with the exact selection, ``|selected ∩ exact| / m``. No timing.

    python benchmarks/act_prob_90p_bins.py [--neurons 8000] [--tokens 1500] [--bins 300]
"""

from __future__ import annotations

import argparse

import numpy as np


def silu(x):
    return x / (1 + np.exp(-x))


def chunk(rng, K: int, I: int, n: int):
    """Raw activations ``[K, I, n]`` of ``I`` neurons."""
    scale = np.exp(rng.uniform(np.log(0.05), np.log(1.0), I))  # [I]
    centre = rng.normal(-1.0, 0.5, I)
    shift = rng.normal(0, 0.3, (K, I)) * scale
    pre = centre[None, :, None] + shift[:, :, None] + scale[None, :, None] * rng.standard_normal((K, I, n))
    return silu(pre)


def histogram(raw, edges):
    """``[K, I, B]`` counts with the store's bins (bin 0: x < e0; bin j: e[j-1] <= x < e[j])."""
    K, I, _ = raw.shape
    out = np.zeros((K, I, len(edges) + 1), dtype=np.int64)
    for k in range(K):
        for i in range(I):
            out[k, i] = np.bincount(np.searchsorted(edges, raw[k, i], side="right"), minlength=len(edges) + 1)
    return out


def bin_resolution(hist, tokens, percent=90):
    """The rule before: whole bins above the first bin whose cumulative pooled count reaches the rank."""
    pooled = hist.sum(axis=0)
    cumulative = np.cumsum(pooled, axis=-1)
    j = np.argmax(100 * cumulative >= percent * cumulative[..., -1:], axis=-1)  # [I]
    above = np.arange(hist.shape[-1])[None, None, :] > j[None, :, None]
    return (hist * above).sum(axis=-1) / tokens[:, None]


def scores(args):
    import dask.array as da

    from analysis.methods import act_prob_90p_scores

    rng = np.random.default_rng(args.seed)
    edges = np.round(np.linspace(args.lo, args.hi, args.bins + 1), 10)
    tokens = np.full(args.langs, args.tokens)
    exact, old, new = [], [], []
    for start in range(0, args.neurons, args.chunk):
        raw = chunk(rng, args.langs, min(args.chunk, args.neurons - start), args.tokens)
        threshold = np.quantile(raw.transpose(1, 0, 2).reshape(raw.shape[1], -1), args.percent / 100, axis=-1)
        exact.append((raw > threshold[None, :, None]).sum(axis=-1) / args.tokens)
        hist = histogram(raw, edges)
        old.append(bin_resolution(hist, tokens, args.percent))
        lazy = da.from_array(hist[:, None], chunks=(1, 1, hist.shape[1], hist.shape[2]))  # [K, L=1, I, B]
        new.append(np.stack([s[0] for s in act_prob_90p_scores(lazy, tokens, args.percent)]))
    return (np.concatenate(x, axis=1) for x in (exact, old, new))


def overlap(a, b, m: int) -> float:
    """Mean over languages of ``|top m of a ∩ top m of b| / m`` (ties by index, as the method's)."""
    from analysis.methods import largest

    return float(np.mean([np.intersect1d(largest(a[k], m), largest(b[k], m)).size / m for k in range(a.shape[0])]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--langs", type=int, default=4)
    ap.add_argument("--neurons", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=1500, help="tokens per language")
    ap.add_argument("--bins", type=int, default=300, help="closed bins between --lo and --hi")
    ap.add_argument("--lo", type=float, default=-0.5)
    ap.add_argument("--hi", type=float, default=2.5)
    ap.add_argument("--percent", type=int, default=90)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    exact, old, new = scores(args)
    print(f"{args.langs} languages x {args.neurons} neurons x {args.tokens} tokens; {args.bins} bins on "
          f"[{args.lo}, {args.hi}]; P{args.percent}")
    print("mean share of a language's tokens above the threshold (exact: 0.100 pooled): "
          f"exact {exact.mean():.4f}, bin resolution {old.mean():.4f}, interpolated {new.mean():.4f}")
    print("| rate | m | bin resolution vs exact | interpolated vs exact |")
    print("| --- | --- | --- | --- |")
    for rate in (0.00125, 0.005, 0.01, 0.05):
        m = max(round(rate * args.neurons), 1)
        print(f"| {rate} | {m} | {overlap(old, exact, m):.3f} | {overlap(new, exact, m):.3f} |")


if __name__ == "__main__":
    main()
