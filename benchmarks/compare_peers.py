"""lsn's statistics against the tools researchers use today, on the same model and the same batches.

In one process, on a random Llama-shaped model (8 layers, hidden 512, MLP width 1376, float32):

| method | what it does per batch |
| --- | --- |
| ``plain`` | the forward pass alone: the limit |
| ``lsn`` | ``HFBackend.statistics``: one hook per layer, the one-pass CPU kernel (``harvester.cpu_kernel``) |
| ``hooks`` | plain forward hooks on ``act_fn`` that count and sum per group with boolean masks (the original LAPE approach, made group-aware) |
| ``nnsight`` | ``LanguageModel.trace``, saving every layer's ``act_fn`` output, then the same reductions |
| ``transformer_lens`` | ``TransformerBridge.run_with_cache`` on ``blocks.{l}.mlp.gate.hook_out``, then ``act_fn`` and the same reductions |

Each method computes the same statistics per token group: active count, sum, sum of squares. Before
timing, every peer's numbers are checked against lsn's. The repeats are interleaved, in a rotating
order, so that machine noise hits all methods alike. The table gives the median time per pass over
all batches. The last line is ``best peer / lsn time ratio: X``: the fastest peer's median over
lsn's, where above 1 means lsn is faster.

The peers are an optional extra (``pip install 'lsn-harvester[peers]'``: nnsight, transformer-lens);
a peer that is not installed is skipped and named.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harvest_overhead import apply_preset, build_model, steady_allocator, workload_arguments  # noqa: E402

from harvester.backends.hf import HFBackend, quiet_transformers  # noqa: E402
from harvester.stats import NeuronStats, StatsSpec  # noqa: E402
from harvester.windows import Window, batches  # noqa: E402


def reduce(acts: list[torch.Tensor], groups: torch.Tensor, n_groups: int, out: dict) -> None:
    """Add per-group active, sum and sum of squares of each layer's ``[B, S, I]`` activation."""
    flat_groups = groups.reshape(-1)
    for layer, a in enumerate(acts):
        x = a.reshape(-1, a.shape[-1]).float()
        for g in range(n_groups):
            sel = x[flat_groups == g]
            out["active"][g, layer] += (sel > 0).sum(0)
            out["sum"][g, layer] += sel.sum(0).double()
            out["sqsum"][g, layer] += (sel * sel).sum(0).double()


def empty(n_groups: int, layers: int, width: int) -> dict:
    return {"active": torch.zeros((n_groups, layers, width), dtype=torch.int64),
            "sum": torch.zeros((n_groups, layers, width), dtype=torch.float64),
            "sqsum": torch.zeros((n_groups, layers, width), dtype=torch.float64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(ap, repeats=7)
    args = apply_preset(ap.parse_args())
    allocator = "default allocator" if args.default_malloc else steady_allocator()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()

    tmp = tempfile.TemporaryDirectory()
    build_model(tmp.name, args.layers, args.hidden, args.width, args.heads, args.kv_heads, args.vocab)
    from harvester.tiny import train_tokenizer

    train_tokenizer().save_pretrained(tmp.name)
    backend = HFBackend(tmp.name, fused=False)
    model, L, I = backend.model, backend.n_layers, backend.width
    rng = np.random.default_rng(0)
    n = args.batch_size * args.batches
    windows = [Window(rng.integers(3, args.vocab, size=args.seq_len).astype(np.int32),
                      np.repeat(np.arange(args.groups, dtype=np.int16), args.seq_len // args.groups + 1)[: args.seq_len])
               for _ in range(n)]
    data = [(torch.from_numpy(ids), torch.from_numpy(groups)) for ids, _, groups in batches(windows, args.batch_size, 0)]
    spec = StatsSpec(("active", "sum", "sqsum"))
    acts_fns = [model.model.layers[layer].mlp.act_fn for layer in range(L)]

    @torch.inference_mode()
    def plain():
        for ids, _ in data:
            backend.body(input_ids=ids, use_cache=False)

    def lsn():
        return backend.statistics(windows, spec, args.batch_size)

    @torch.inference_mode()
    def hooks():
        out, seen = empty(args.groups, L, I), {}
        handles = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, m in enumerate(acts_fns)]
        try:
            for ids, groups in data:
                backend.body(input_ids=ids, use_cache=False)
                reduce([seen[k] for k in range(L)], groups, args.groups, out)
        finally:
            for h in handles:
                h.remove()
        return out

    methods = {"plain": plain, "lsn": lsn, "hooks": hooks}
    skipped = []
    try:
        from nnsight import LanguageModel

        traced = LanguageModel(model, tokenizer=None)

        @torch.inference_mode()
        def nnsight_stats():
            out = empty(args.groups, L, I)
            for ids, groups in data:
                saved: list = []  # made outside the trace: nnsight runs the block's body itself
                with traced.trace(ids):
                    for k in range(L):
                        saved.append(traced.model.layers[k].mlp.act_fn.output.save())
                reduce(saved, groups, args.groups, out)
            return out

        methods["nnsight"] = nnsight_stats
    except ImportError:
        skipped.append("nnsight")
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(tmp.name, hf_model=model, tokenizer=None)
        gate_names = [f"blocks.{k}.mlp.gate.hook_out" for k in range(L)]
        wanted = set(gate_names)

        @torch.inference_mode()
        def transformer_lens_stats():
            out = empty(args.groups, L, I)
            for ids, groups in data:
                _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in wanted)
                reduce([acts_fns[k](cache[name]) for k, name in enumerate(gate_names)], groups, args.groups, out)
            return out

        methods["transformer_lens"] = transformer_lens_stats
    except ImportError:
        skipped.append("transformer_lens")

    reference = lsn()
    for name, fn in methods.items():
        if name in ("plain", "lsn"):
            continue
        got = fn()
        for g in range(args.groups):
            assert torch.equal(got["active"][g], torch.from_numpy(reference[g]["active"])), f"{name}: active differs"
            for key, var in (("sum", "act_sum"), ("sqsum", "act_sqsum")):
                ref = reference[g][var]
                assert np.allclose(got[key][g].numpy(), ref, rtol=0, atol=1e-4 * np.abs(ref).max()), f"{name}: {key} differs"

    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each repeat
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    tokens = n * args.seq_len
    print(f"model: llama {L} layers, hidden {args.hidden}, width {I}, float32, CPU threads {torch.get_num_threads()}; "
          f"{args.batches} batches of {args.batch_size}x{args.seq_len} tokens, {args.groups} groups; "
          f"statistics active, sum, sqsum ({NeuronStats(spec, 1, 1).kernel} kernel); {args.repeats} interleaved "
          f"repeats; {allocator}")
    if skipped:
        print(f"skipped (not installed): {', '.join(skipped)}; pip install 'lsn-harvester[peers]'")
    plain_median = statistics.median(times["plain"])
    print(f"{'method':18s} {'median ms':>10s} {'tok/s':>9s} {'/ plain':>8s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18s} {med * 1e3:10.1f} {tokens / med:9.0f} {med / plain_median:8.3f}")
    peers = [statistics.median(times[name]) for name in methods if name not in ("plain", "lsn")]
    print(f"best peer / lsn time ratio: {min(peers) / statistics.median(times['lsn']):.3f}")


if __name__ == "__main__":
    main()
