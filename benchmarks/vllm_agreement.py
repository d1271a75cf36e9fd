"""How far the vLLM backend's statistics are from the Hugging Face backend's, in float32 and bfloat16.

The same windows (packed, three groups) go through both backends on the same tiny model, loaded in
the dtype under test. Per dtype it prints: tokens equal or not; for ``active``, the share of
(group, layer, neuron) cells that differ, the largest difference, and the largest difference as a
share of the group's tokens; for ``act_sum``/``act_sqsum``, the largest difference relative to the
largest magnitude. The float32 line is the agreement the tests require (``active`` within 0.01% of
tokens, sums within 1e-4); bfloat16 is measured, not required: the two engines round the bf16
matmuls and activations differently. For scale, each bf16 run is also compared with float32 HF.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def windows(n: int, seq: int, seed: int = 0):
    from harvester.windows import Window

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        groups = np.full(seq, k % 3, dtype=np.int16)
        groups[: seq // 3] = (k + 1) % 3
        out.append(Window(rng.integers(4, 1024, seq).astype(np.int32), groups))
    return out


def compare(ref: dict, got: dict) -> dict:
    cells = differing = 0
    worst = worst_share = 0.0
    sums = {"act_sum": 0.0, "act_sqsum": 0.0}
    for g in ref:
        assert ref[g]["tokens"] == got[g]["tokens"], f"group {g}: tokens differ"
        diff = np.abs(ref[g]["active"] - got[g]["active"])
        cells += diff.size
        differing += int((diff > 0).sum())
        worst = max(worst, float(diff.max()))
        worst_share = max(worst_share, float(diff.max()) / ref[g]["tokens"])
        for var in sums:
            sums[var] = max(sums[var], float(np.abs(ref[g][var] - got[g][var]).max() / np.abs(ref[g][var]).max()))
    return {"cells": cells, "differing": differing, "worst": worst, "worst_share": worst_share, **sums}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--windows", type=int, default=120)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    from harvester.backends.hf import HFBackend
    from harvester.backends.vllm_engine import VLLMBackend
    from harvester.stats import StatsSpec

    spec = StatsSpec(("active", "sum", "sqsum"))
    data = windows(args.windows, args.seq_len)
    tokens = sum(len(w.ids) for w in data)
    print(f"model {args.model}; {len(data)} windows, {tokens} tokens, 3 groups")
    exact = HFBackend(args.model, dtype="float32").statistics(data, spec, batch_size=4)

    def line(name: str, r: dict) -> None:
        print(f"{name:26s} active: {r['differing']} of {r['cells']} cells differ "
              f"({100 * r['differing'] / r['cells']:.3f}%), max {r['worst']:.0f} tokens "
              f"({100 * r['worst_share']:.4f}% of the group's tokens); act_sum max rel {r['act_sum']:.2e}, "
              f"act_sqsum max rel {r['act_sqsum']:.2e}")

    for dtype in args.dtypes.split(","):
        ref = HFBackend(args.model, dtype=dtype).statistics(data, spec, batch_size=4)
        backend = VLLMBackend(args.model, dtype=dtype, seq_len=args.seq_len, batch_size=4)
        try:
            got = backend.statistics(data, spec, batch_size=4)
        finally:
            backend.close()
        line(f"{dtype} vllm vs hf", compare(ref, got))
        if dtype != "float32":
            line(f"{dtype} hf vs float32 hf", compare(exact, ref))
            line(f"{dtype} vllm vs float32 hf", compare(exact, got))


if __name__ == "__main__":
    main()
