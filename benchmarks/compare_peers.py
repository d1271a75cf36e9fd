"""lsn's statistics against the tools researchers use today, on the same model and the same batches.

In one process, on a random Llama-shaped model (8 layers, hidden 512, MLP width 1376, float32 on CPU
by default; ``--device cuda --dtype bfloat16`` on a GPU):

| method | what it does per batch |
| --- | --- |
| ``plain`` | the forward pass alone: the limit |
| ``lsn`` | ``HFBackend.statistics``: one hook per layer and the one-pass CPU kernel (``harvester.cpu_kernel``); on CUDA the fused Triton kernel (``harvester.fused``) |
| ``hooks`` | plain forward hooks on ``act_fn`` that count and sum per group with boolean masks (the original LAPE approach, made group-aware) |
| ``nnsight`` | ``LanguageModel.trace``, saving every layer's ``act_fn`` output, then the same reductions |
| ``transformer_lens`` | ``TransformerBridge.run_with_cache`` on ``blocks.{l}.mlp.gate.hook_out``, then ``act_fn`` and the same reductions |

Each method computes the same statistics per token group: active count, sum, sum of squares. Before
timing, every peer's numbers are checked against lsn's. In float32 with lsn's hook path, the methods
that run the model itself (hooks, nnsight) must give equal counts and sums within 1e-4. Elsewhere the
methods round differently: TransformerLens' bridge runs its own attention and normalization code
(even in float32), and in bfloat16 or float16 the fused kernel's float32 ``exp`` may differ from
PyTorch's by an ulp; later layers then see inputs that differ by rounding, so the counts must agree
within 1% of a group's tokens (at least 3 tokens) and the sums within 2%,
and the agreement is printed. nnsight and TransformerLens each get their own copy of the model (the
same weights): TransformerLens replaces the modules of the model it is given with its own wrappers
and switches it to eager attention, which must not change what the other methods run; its copy is
switched back to the attention lsn's model uses, so that every method runs the same attention. The
repeats are interleaved, in a rotating order, so that machine noise hits
all methods alike. The table gives the median time per pass over all batches. The last line is
``best peer / lsn time ratio: X``: the fastest peer's median over lsn's, where above 1 means lsn is
faster.

The peers are an optional extra (``pip install 'lsn-harvester[peers]'``: nnsight, transformer-lens);
a peer that is not installed, or fails to start or run (say, with another torch), is skipped and named.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harvest_overhead import (apply_preset, build_model, kernel_name, steady_allocator,  # noqa: E402
                              workload_arguments)

from harvester.backends.hf import DTYPES, HFBackend, quiet_transformers  # noqa: E402
from harvester.stats import StatsSpec  # noqa: E402
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


def empty(n_groups: int, layers: int, width: int, device: torch.device | str = "cpu") -> dict:
    return {"active": torch.zeros((n_groups, layers, width), dtype=torch.int64, device=device),
            "sum": torch.zeros((n_groups, layers, width), dtype=torch.float64, device=device),
            "sqsum": torch.zeros((n_groups, layers, width), dtype=torch.float64, device=device)}


@dataclass
class Workload:
    """The model (as lsn loads it), its saved directory, and the batches every method runs."""

    args: argparse.Namespace
    path: str
    backend: HFBackend
    windows: list[Window]
    data: list[tuple[torch.Tensor, torch.Tensor]]
    """``(ids [B, S], groups [B, S])`` on the model's device."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.args.groups, self.backend.n_layers, self.backend.width

    def copy_model(self):
        """Another instance of the same model (same weights, dtype and device), for a peer to wrap."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=DTYPES[self.args.dtype])
        return model.to(self.backend.device).eval()

    def sync(self) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(ap, repeats=7)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA lsn uses the fused Triton kernel)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--tokenizer", help="a saved tokenizer directory to put beside the model (default: the "
                    "tiny tokenizer, trained from the sample corpus, which needs wordfreq)")
    return apply_preset(ap.parse_args())


def prepare(args: argparse.Namespace, tmp: str) -> Workload:
    build_model(tmp, args.layers, args.hidden, args.width, args.heads, args.kv_heads, args.vocab,
                args.dtype, args.device)
    if args.tokenizer:
        from harvester.backends.hf import load_tokenizer

        load_tokenizer(args.tokenizer).save_pretrained(tmp)
    else:
        from harvester.tiny import train_tokenizer

        train_tokenizer().save_pretrained(tmp)
    backend = HFBackend(tmp, dtype=args.dtype, device=args.device)
    rng = np.random.default_rng(0)
    n = args.batch_size * args.batches
    groups = np.repeat(np.arange(args.groups, dtype=np.int16), args.seq_len // args.groups + 1)[: args.seq_len]
    windows = [Window(rng.integers(3, args.vocab, size=args.seq_len).astype(np.int32), groups) for _ in range(n)]
    data = [(torch.from_numpy(ids).to(backend.device), torch.from_numpy(groups).to(backend.device))
            for ids, _, groups in batches(windows, args.batch_size, 0)]
    return Workload(args, tmp, backend, windows, data)


def own_methods(w: Workload) -> dict:
    """``plain``, ``lsn`` and ``hooks`` on lsn's model."""
    backend, (G, L, I) = w.backend, w.shape
    spec = StatsSpec(("active", "sum", "sqsum"))
    acts_fns = [backend.model.model.layers[layer].mlp.act_fn for layer in range(L)]

    @torch.inference_mode()
    def plain():
        for ids, _ in w.data:
            backend.body(input_ids=ids, use_cache=False)

    def lsn():
        return backend.statistics(w.windows, spec, w.args.batch_size)

    @torch.inference_mode()
    def hooks():
        out, seen = empty(G, L, I, backend.device), {}
        handles = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, m in enumerate(acts_fns)]
        try:
            for ids, groups in w.data:
                backend.body(input_ids=ids, use_cache=False)
                reduce([seen[k] for k in range(L)], groups, G, out)
        finally:
            for h in handles:
                h.remove()
        return out

    return {"plain": plain, "lsn": lsn, "hooks": hooks}


def nnsight_method(w: Workload):
    from nnsight import LanguageModel

    (G, L, I), traced = w.shape, LanguageModel(w.copy_model(), tokenizer=None)

    @torch.inference_mode()
    def nnsight_stats():
        out = empty(G, L, I, w.backend.device)
        for ids, groups in w.data:
            saved: list = []  # made outside the trace: nnsight runs the block's body itself
            with traced.trace(ids):
                for k in range(L):
                    saved.append(traced.model.layers[k].mlp.act_fn.output.save())
            reduce(saved, groups, G, out)
        return out

    return nnsight_stats


def transformer_lens_method(w: Workload):
    from transformer_lens.model_bridge import TransformerBridge

    (G, L, I), model = w.shape, w.copy_model()
    acts_fns = [model.model.layers[k].mlp.act_fn for k in range(L)]  # before the bridge wraps the modules
    bridge = TransformerBridge.boot_transformers(w.path, hf_model=model, tokenizer=None, dtype=DTYPES[w.args.dtype])
    model.set_attn_implementation(w.backend.model.config._attn_implementation)  # it forced eager; as lsn's model runs
    gate_names = [f"blocks.{k}.mlp.gate.hook_out" for k in range(L)]
    wanted = set(gate_names)

    @torch.inference_mode()
    def transformer_lens_stats():
        out = empty(G, L, I, w.backend.device)
        for ids, groups in w.data:
            _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in wanted)
            reduce([acts_fns[k](cache[name]) for k, name in enumerate(gate_names)], groups, G, out)
        return out

    return transformer_lens_stats


def all_methods(w: Workload) -> tuple[dict, list[str], dict[str, str]]:
    """Every method that can run here, the peers that are not installed, and those that failed to
    start (name -> error), which are left out rather than ending the run."""
    methods, skipped, failed = own_methods(w), [], {}
    for name, make in (("nnsight", nnsight_method), ("transformer_lens", transformer_lens_method)):
        try:
            methods[name] = make(w)
        except ImportError:
            skipped.append(name)
        except Exception as err:  # noqa: BLE001 -- a peer's own failure, e.g. with another torch
            failed[name] = one_line(err)
    return methods, skipped, failed


def one_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def check(w: Workload, methods: dict, failed: dict[str, str]) -> list[str]:
    """Every peer's numbers against lsn's (module docstring): an AssertionError names the first peer
    that differs. A peer of the extra that fails to run is taken out of ``methods`` into ``failed``.
    Returns the agreement lines, printed where the methods round differently."""
    reference, lines = methods["lsn"](), []
    for name, fn in list(methods.items()):
        if name in ("plain", "lsn"):
            continue
        try:
            got = {key: value.cpu().numpy() for key, value in fn().items()}
        except Exception as err:  # noqa: BLE001
            if name == "hooks":  # lsn's own reference: its failure is a failure of the run
                raise
            failed[name] = one_line(err)
            del methods[name]
            continue
        tokens, share, sums = differences(got, reference, w.args.groups)
        # TransformerLens' bridge computes normalization and attention itself: rounding, even in float32
        exact = w.backend.fused is None and w.args.dtype == "float32" and name != "transformer_lens"
        if exact:
            assert tokens == 0, f"{name}: active differs"
            assert sums <= 1e-4, f"{name}: sums differ (max rel {sums:.2e})"
            continue
        allowed = max(3, int(0.01 * min(reference[g]["tokens"] for g in range(w.args.groups))))
        assert tokens <= allowed, f"{name}: active differs by {tokens} tokens ({share:.2%} of a group's)"
        assert sums <= 2e-2, f"{name}: sums differ (max rel {sums:.2e})"
        lines.append(f"agreement {name} vs lsn: active within {tokens} tokens ({share:.3%} of a group's), "
                     f"sums within {sums:.1e} of the largest")
    return lines


def differences(got: dict, reference: dict, n_groups: int) -> tuple[int, float, float]:
    """Largest ``active`` difference (tokens, and as a share of its group's tokens) and largest sum
    difference relative to the largest sum."""
    tokens, share, sums = 0, 0.0, 0.0
    for g in range(n_groups):
        diff = int(np.abs(got["active"][g] - reference[g]["active"]).max())
        tokens, share = max(tokens, diff), max(share, diff / reference[g]["tokens"])
        for key, var in (("sum", "act_sum"), ("sqsum", "act_sqsum")):
            ref = reference[g][var]
            sums = max(sums, float(np.abs(got[key][g] - ref).max() / np.abs(ref).max()))
    return tokens, share, sums


def time_methods(w: Workload, methods: dict) -> dict[str, list[float]]:
    """Seconds per pass of each method, interleaved in a rotating order."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(w.args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each repeat
            start = time.perf_counter()
            methods[name]()
            w.sync()
            times[name].append(time.perf_counter() - start)
    return times


def report(w: Workload, times: dict, skipped: list[str], failed: dict[str, str], allocator: str) -> None:
    args, backend = w.args, w.backend
    where = (f"CPU threads {torch.get_num_threads()}" if backend.device.type == "cpu"
             else torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else str(backend.device))
    print(f"model: llama {backend.n_layers} layers, hidden {args.hidden}, width {backend.width}, {args.dtype}, "
          f"{where}; "
          f"{args.batches} batches of {args.batch_size}x{args.seq_len} tokens, {args.groups} groups; "
          f"statistics active, sum, sqsum ({kernel_name(backend)} kernel); {args.repeats} interleaved "
          f"repeats; {allocator}")
    if skipped:
        print(f"skipped (not installed): {', '.join(skipped)}; pip install 'lsn-harvester[peers]'")
    for name, error in failed.items():
        print(f"skipped (failed): {name}: {error}")
    tokens = args.batch_size * args.batches * args.seq_len
    plain_median = statistics.median(times["plain"])
    print(f"{'method':18s} {'median ms':>10s} {'tok/s':>9s} {'/ plain':>8s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18s} {med * 1e3:10.1f} {tokens / med:9.0f} {med / plain_median:8.3f}")
    peers = [statistics.median(times[name]) for name in times if name not in ("plain", "lsn")]
    print(f"best peer / lsn time ratio: {min(peers) / statistics.median(times['lsn']):.3f}")


def main() -> None:
    args = parse_args()
    allocator = "default allocator" if args.default_malloc else steady_allocator()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        w = prepare(args, tmp)
        methods, skipped, failed = all_methods(w)
        agreement = check(w, methods, failed)
        times = time_methods(w, methods)
    for line in agreement:
        print(line)
    report(w, times, skipped, failed, allocator)


if __name__ == "__main__":
    main()
