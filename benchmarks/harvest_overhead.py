"""Cost of the statistics: the same batches with and without them, interleaved, in one process.

A random Llama-shaped model (8 layers, hidden 512, MLP width 1376) is built from a config, saved,
and loaded through the HF backend. Each repeat times one pass over the batches without hooks (plain)
and one with the statistics (harvest), alternating so that machine noise hits both alike.
The last line is ``harvest/plain time ratio: X``: the median over repeats of harvest time / plain time
(the ratio of medians and of the fastest passes are printed above it).

glibc's allocator is set to keep freed memory (``steady_allocator``) unless ``--default-malloc``: by
default it maps each big tensor afresh and faults its pages in, and how often depends on the
process' allocation history, which made the two sides differ by up to ±8% from one process to the
next whatever was timed.

Before it, a separate, instrumented pass prints the time spent in the statistics themselves
(``NeuronStats.update``, per layer call and as a share of the pass): a figure this machine's noise
moves far less than the paired ratio. ``--kernel`` picks the CPU statistics kernel
(``LSN_STATS_KERNEL``): the one-pass numba kernel or the older matrix products.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harvester.backends.hf import HFBackend, quiet_transformers
from harvester.stats import KERNELS, NeuronStats, StatsSpec, parse_edges, parse_stats
from harvester.windows import Window, batches


PRESETS = {"llama3-8b": {"layers": 32, "hidden": 4096, "width": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}}
"""Shapes of released models (random weights: no download). Llama-3.1-8B: 32 layers x 14,336 neurons."""


def build_model(path: str, layers: int, hidden: int, width: int, heads: int = 8, kv_heads: int = 8,
                vocab: int = 4096, dtype: str = "float32", device: str = "cpu") -> None:
    """A random Llama of this shape, saved to ``path`` (initialized on ``device``, stored in ``dtype``)."""
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=width,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=8192, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    del model


def steady_allocator() -> str:
    """Fix glibc's mmap threshold at its maximum (32 MiB) and never trim the heap, as
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` would: freed activations are then reused
    rather than unmapped and faulted in again. Returns what was done, for the header line."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator (not glibc)"
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1):  # int params
        return "glibc: mmap threshold 32 MiB, no trimming"
    return "default allocator (mallopt refused)"


def workload_arguments(ap: argparse.ArgumentParser, repeats: int) -> None:
    """The model shape and the batches, shared by the benchmarks that time the HF backend."""
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a released model's shape (overrides the sizes above)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--groups", type=int, default=2, help="token groups per batch (languages)")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is")


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """``--preset`` sets the model sizes of :func:`workload_arguments`."""
    for name, value in PRESETS.get(args.preset, {}).items():
        setattr(args, name, value)
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(ap, repeats=21)
    ap.add_argument("--stats", default="active,sum,sqsum")
    ap.add_argument("--kernel", choices=KERNELS, default="auto", help="CPU statistics kernel (LSN_STATS_KERNEL)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the fused Triton kernel is used)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default float32, bfloat16 with --preset")
    args = apply_preset(ap.parse_args())
    args.dtype = args.dtype or ("bfloat16" if args.preset else "float32")
    if args.kernel != "auto":
        os.environ["LSN_STATS_KERNEL"] = args.kernel
    allocator = "default allocator" if args.default_malloc else steady_allocator()

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp, args.layers, args.hidden, args.width, args.heads, args.kv_heads, args.vocab,
                    args.dtype, args.device)
        backend = HFBackend(tmp, dtype=args.dtype, device=args.device)
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    stats = parse_stats(args.stats)
    spec = StatsSpec(stats, parse_edges("-1:4:100") if "hist" in stats else None)
    rng = np.random.default_rng(0)
    n = args.batch_size * args.batches
    windows = [Window(rng.integers(3, args.vocab, size=args.seq_len).astype(np.int32),
                      np.full(args.seq_len, i % args.groups, dtype=np.int16)) for i in range(n)]

    def plain() -> None:
        for ids, mask, _ in batches(windows, args.batch_size, backend.pad_id):
            backend.forward(ids, mask)
        sync()

    def harvest() -> None:
        backend.statistics(windows, spec, args.batch_size)  # its result is copied to the host: synchronized

    shape = f"llama {args.preset or ''} {args.layers} layers, hidden {args.hidden}, width {args.width}".replace("  ", " ")
    print(f"model: {shape}, {args.dtype} on {backend.device}; "
          f"{args.batches} batches of {args.batch_size}x{args.seq_len} tokens; stats {','.join(stats)}; "
          f"torch threads {torch.get_num_threads()}; statistics kernel {kernel_name(backend)}; {allocator}")
    share = (lambda: kernel_share(harvest)) if backend.fused is not None else (lambda: statistics_share(harvest))
    interleaved(plain, harvest, args.repeats, n * args.seq_len, before_last=share)


def kernel_name(backend: HFBackend) -> str:
    return "fused (Triton)" if backend.fused is not None else NeuronStats(StatsSpec(), 1, 1, backend.device).kernel


def statistics_share(harvest, passes: int = 3) -> None:
    """Time inside ``NeuronStats.update`` over a few instrumented passes: per call, and as a share of
    the pass."""
    inner, calls = [0.0], [0]
    update = NeuronStats.update

    def timed(self, layer, act):
        sync = torch.cuda.synchronize if act.is_cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        update(self, layer, act)
        sync()
        inner[0] += time.perf_counter() - t
        calls[0] += 1

    NeuronStats.update = timed
    try:
        t = time.perf_counter()
        for _ in range(passes):
            harvest()
        total = time.perf_counter() - t
    finally:
        NeuronStats.update = update
    if calls[0]:
        print(f"statistics in situ: {inner[0] / calls[0] * 1000:.3f} ms per layer call, "
              f"{inner[0] / total * 100:.2f}% of the harvest pass")


def kernel_share(harvest) -> None:
    """With the fused kernel: its share of the device time of one harvest step (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        harvest()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    fused = [e for e in events if "fused_gated_stats" in e.key]
    kernel = sum(e.self_device_time_total for e in fused)
    calls = sum(e.count for e in fused)
    if total and calls:
        print(f"fused kernel: {kernel / calls / 1000:.3f} ms per layer call, {kernel / total * 100:.2f}% of the "
              f"harvest step's device time")


def interleaved(plain, harvest, repeats: int, tokens: int, before_last=None) -> None:
    """Time ``plain`` and ``harvest`` alternately (after one warm-up each), print the figures, and as
    the last line ``harvest/plain time ratio: X``, the median of the per-repeat ratios (``before_last``
    runs just before that line)."""
    plain(), harvest()  # warm-up
    ratios, times = [], {"plain": [], "harvest": []}
    for r in range(repeats):
        pair = {}
        for name, fn in ((("plain", plain), ("harvest", harvest)) if r % 2 == 0 else (("harvest", harvest), ("plain", plain))):
            t = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - t
            times[name].append(pair[name])
        ratios.append(pair["harvest"] / pair["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>8}: median {med * 1000:8.1f} ms per pass, {tokens / med:9.0f} tokens/s")
    medians = statistics.median(times["harvest"]) / statistics.median(times["plain"])
    fastest = min(times["harvest"]) / min(times["plain"])  # noise only ever adds time
    print(f"ratio of medians: {medians:.3f}; ratio of fastest passes: {fastest:.3f}")
    print(f"per-repeat ratios: {' '.join(f'{r:.3f}' for r in ratios)}")
    if before_last is not None:
        before_last()
    print(f"harvest/plain time ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
