"""Cost of the statistics in vLLM: the same prompts' prefill with and without them, interleaved, in one engine.

A random Llama-shaped model (8 layers, hidden 512, MLP width 1376, head size 64) is built from a
config and served by vLLM (the CPU build here; the GPU build on GPUs), eager, no prefix caching. Each
repeat times one prefill of all prompts without hooks (plain: the hooks removed from every worker)
and one with the statistics (harvest: hooks installed, statistics read back), alternating so that
machine noise hits both alike. The last line is ``harvest/plain time ratio: X``, the median over
repeats of harvest time / plain time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harvest_overhead import build_model, interleaved  # noqa: E402


def build_served_model(path: str, layers: int, hidden: int, width: int, dtype: str) -> None:
    """The benchmark Llama with head size 64 and the tiny tokenizer's 1,024 ids, which vLLM loads with it."""
    from harvester.tiny import train_tokenizer

    build_model(path, layers, hidden, width, heads=hidden // 64, kv_heads=hidden // 64, vocab=1024, dtype=dtype)
    train_tokenizer().save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=1376)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="vLLM max_num_seqs (tokens per step: x seq-len)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--stats", default="active,sum,sqsum")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tensor-parallel", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda when torch sees a GPU, else cpu")
    args = ap.parse_args()

    import torch

    from harvester.backends.vllm_engine import VLLMBackend
    from harvester.stats import StatsSpec, parse_stats
    from harvester.windows import Window

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        build_served_model(tmp, args.layers, args.hidden, args.width, args.dtype)
        backend = VLLMBackend(tmp, dtype=args.dtype, device=device, seq_len=args.seq_len,
                              batch_size=args.batch_size, tensor_parallel=args.tensor_parallel)
    spec = StatsSpec(parse_stats(args.stats))
    rng = np.random.default_rng(0)
    windows = [Window(rng.integers(3, 1024, size=args.seq_len).astype(np.int32),
                      np.full(args.seq_len, i % args.groups, dtype=np.int16)) for i in range(args.prompts)]
    rpc = backend.llm.collective_rpc

    def plain() -> None:
        rpc("lsn_remove")
        try:
            backend.prefill(windows)
        finally:
            rpc("lsn_setup", args=(backend.site, backend.unit))

    def harvest() -> None:
        backend.statistics(windows, spec, args.batch_size)

    print(f"model: llama {args.layers} layers, hidden {args.hidden}, width {args.width}, {args.dtype}, "
          f"tensor parallel {args.tensor_parallel}, {device}; {args.prompts} prompts x {args.seq_len} tokens, "
          f"max_num_seqs {args.batch_size}; stats {','.join(spec.stats)}")
    try:
        interleaved(plain, harvest, args.repeats, args.prompts * args.seq_len)
    finally:
        backend.close()

if __name__ == "__main__":
    main()
