"""Bytes on disk of histogram shard rows at Llama-3-8B shape (32 layers x 14,336 neurons, 400 inner bins + 2),
int64 rows (stores before int32 rows) against int32 rows, after the store's compression (zstd + crc32c, its
chunking: one chunk per shard, group and layer at this shape), and the planning figure for a 100M-token-per-
language histogram harvest of 7 languages.

How the rows are made: running the model's kernel at 8B shape is too slow on 2 cores, so each neuron's
counts for a shard of T tokens are drawn: its pre-activation is normal (mean ~ N(-0.6, 0.5), standard
deviation ~ lognormal around 0.8), its activation SiLU of that (the skewed shape DLN's floor is for); its
range is DLN's ([max(m - 3s, -0.4), m + 3s] of the activation's exact mean m and standard deviation s,
:func:`harvester.stats.dln_ranges`, 400 bins plus under- and overflow); the probability of each bin is
exact (SiLU inverted on each branch, the normal CDF), and the counts one multinomial draw of T tokens over
them (the sampling noise real counts have). The rows go through the real ``Store.write_shard`` into a
store of the harvest's layout; int32 or int64 is the store's own choice (:func:`harvester.store.hist_row_dtype`,
from its ``shard_tokens``: 2**31 makes it choose int64). ``--layers`` of the model's 32 are written (chunks
are per layer, so the figures scale by 32 / layers exactly in structure).

    .venv/bin/python benchmarks/hist_bytes.py                      # 2 layers, 1M and 16M-token shards (~2 min)
    .venv/bin/python benchmarks/hist_bytes.py --layers 1 --width 256 --shard-tokens 4096   # seconds

The last line: ``hist rows: int32/int64 bytes ratio X``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

GIB = 1 << 30
_SILU_MIN_AT = -1.2784645


def _silu_tables():
    """SiLU's two monotone branches as lookup tables ``(values, pre-activations)``, values ascending."""
    right = np.linspace(_SILU_MIN_AT, 40, 400_001)
    left = np.linspace(-40, _SILU_MIN_AT, 400_001)
    silu = lambda g: g / (1 + np.exp(-g))  # noqa: E731
    return (silu(right), right), (silu(left)[::-1], left[::-1])


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(z))).numpy()


def layer_probabilities(rng, width: int, bins: int, tables) -> np.ndarray:
    """Each neuron's bin probabilities ``[width, bins + 2]`` on its DLN range (see the docstring)."""
    from harvester.stats import dln_ranges

    mu = rng.normal(-0.6, 0.5, width)[:, None]
    sd = np.exp(rng.normal(math.log(0.8), 0.3, width))[:, None]
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # E[f(g)], g ~ N(mu, sd)
    g = mu + sd * nodes[None, :]
    a = g / (1 + np.exp(-g))
    w = weights / weights.sum()
    m = (a * w).sum(axis=1)
    s = np.sqrt(np.maximum((a * a * w).sum(axis=1) - m * m, 0))
    lo, step = dln_ranges(m, s, bins)
    edges = lo.astype(np.float64)[:, None] + step.astype(np.float64)[:, None] * np.arange(bins + 1)  # [I, B+1]
    (right_v, right_g), (left_v, left_g) = tables
    cdf_right = _normal_cdf((np.interp(edges, right_v, right_g) - mu) / sd)  # P(g < g2(e))
    cdf_left = np.where(edges < 0, _normal_cdf((np.interp(edges, left_v, left_g) - mu) / sd), 0.0)
    cdf = np.where(edges <= right_v[0], 0.0, cdf_right - cdf_left)
    cdf = np.concatenate([np.zeros((width, 1)), np.maximum.accumulate(cdf, axis=1), np.ones((width, 1))], axis=1)
    p = np.clip(np.diff(cdf, axis=1), 0, None)
    return p / p.sum(axis=1, keepdims=True)


def shard_rows(rng, probabilities: list[np.ndarray], tokens: int) -> np.ndarray:
    """One shard's counts ``[layers, width, bins + 2]`` of ``tokens`` tokens (int64)."""
    return np.stack([rng.multinomial(tokens, p) for p in probabilities])


def _fingerprint(shard_tokens: int, bins: int) -> dict:
    from analysis_scale import _fingerprint as fingerprint

    edges = list(np.round(np.linspace(-1, 4, bins + 1), 9))  # only the shape counts: bins + 2
    fp = fingerprint(["lang"], ["active", "hist"], edges)
    fp["model"]["id"] = "synthetic:llama-3-8b-shaped"
    fp["settings"].update(shard_tokens=shard_tokens, seq_len=4096)
    return fp


def _bytes(path: Path, shard: int) -> int:
    return sum(f.stat().st_size for f in (path / "shards" / "hist" / "c" / str(shard)).rglob("*") if f.is_file())


def measure(root: Path, rows: list[np.ndarray], tokens: int, layers: int, width: int, bins: int,
            shard_tokens: int) -> tuple[str, float]:
    """Write ``rows`` (one per shard) through the real Store; ``(row dtype, mean bytes per shard)``."""
    from harvester.store import Store, StoreAttrs

    path = root / f"s{shard_tokens}-{tokens}"
    attrs = StoreAttrs.new(_fingerprint(shard_tokens, bins), layers=layers, width=width, specs=["synthetic"])
    store = Store.create(path, attrs, n_shards=len(rows))
    for k, row in enumerate(rows):
        store.write_shard(k, {0: {"tokens": tokens, "active": np.zeros((layers, width), np.int64), "hist": row}})
    dtype = str(store.array("shards/hist").dtype)
    return dtype, float(np.mean([_bytes(path, k) for k in range(len(rows))]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="layers written (of --model-layers)")
    ap.add_argument("--model-layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=14336)
    ap.add_argument("--bins", type=int, default=400)
    ap.add_argument("--shard-tokens", default="1048576,16777216", help="shard sizes in tokens, comma-separated")
    ap.add_argument("--shards", type=int, default=2, help="shards drawn per shard size")
    ap.add_argument("--tokens-per-lang", type=int, default=100_000_000)
    ap.add_argument("--langs", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    tables = _silu_tables()
    probabilities = [layer_probabilities(rng, args.width, args.bins, tables) for _ in range(args.layers)]
    scale = args.model_layers / args.layers
    raw = args.model_layers * args.width * (args.bins + 2)
    print(f"shape: {args.model_layers} layers x {args.width} neurons x {args.bins + 2} bins ({args.layers} layers "
          f"written, scaled by {scale:g}); raw row {raw * 8 / GIB:.2f} GiB int64, {raw * 4 / GIB:.2f} GiB int32")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="hist-bytes-") as tmp:
        for tokens in (int(t) for t in args.shard_tokens.split(",")):
            rows = [shard_rows(rng, probabilities, tokens) for _ in range(args.shards)]
            sizes = {}
            for shard_tokens in (tokens, 1 << 31):  # the store picks int32, then int64
                dtype, size = measure(Path(tmp), rows, tokens, args.layers, args.width, args.bins, shard_tokens)
                sizes[dtype] = size * scale
            shards = math.ceil(args.tokens_per_lang / tokens) * args.langs
            for dtype, size in sizes.items():
                print(f"shard of {tokens} tokens, {dtype} rows: {size / 2**20:.1f} MiB per shard, "
                      f"{size / tokens:.1f} bytes per token; {args.langs} x {args.tokens_per_lang / 1e6:g}M tokens: "
                      f"{shards} shards, {shards * size / GIB:.1f} GiB of hist shard rows")
            ratios.append(sizes["int32"] / sizes["int64"])
            totals = args.langs * raw * 8 / GIB
            print(f"  totals (int64, {args.langs} groups, uncompressed at most): {totals:.1f} GiB")
    print(f"hist rows: int32/int64 bytes ratio {np.mean(ratios):.3f}")


if __name__ == "__main__":
    main()
