"""The five steps of ``benchmarks/gpu_check.sh`` (see ``gpu_check.py``). Each returns
``(result text, metrics, within tolerance)`` and raises :class:`StepError` when it cannot run.

Heavy imports (torch, the harvester, xarray) happen inside the steps, so that ``gpu_check.py``'s
bookkeeping commands start fast and run without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ASSETS = ROOT / ".whl" / "assets"
"""What ``make gpu-wheels`` writes beside the wheels: the sample corpus as text and the tiny tokenizer
(the device has no wordfreq, whose word lists the sample corpus and the tokenizer are made from)."""
SAMPLE_DOCS = 600
"""Documents per language in the carried sample corpus (``sample:docs=600``)."""
GROUPS = 4
"""Token groups in step a's batches (plus padding)."""


class StepError(Exception):
    """A step cannot run (a missing input); its message is the step's one-line result."""


def agreement(ref: dict, got: dict, tokens: np.ndarray) -> dict:
    """How far ``got`` is from ``ref`` (each ``{"active", "act_sum", "act_sqsum"}: [group, ...]``):
    the share of ``active`` cells that differ, the largest difference in tokens and as a share of
    its group's tokens, and each sum's largest difference relative to its largest magnitude."""
    diff = np.abs(got["active"].astype(np.int64) - ref["active"].astype(np.int64))
    per_group = diff.reshape(len(tokens), -1).max(axis=1) / np.maximum(tokens, 1)
    out = {"cells": int(diff.size), "differing": int((diff > 0).sum()), "max_tokens": int(diff.max()),
           "max_share": float(per_group.max())}
    for var in ("act_sum", "act_sqsum"):
        scale = max(float(np.abs(ref[var]).max()), 1e-30)
        out[var] = float(np.abs(got[var] - ref[var]).max() / scale)
    return out


def within(a: dict, share: float, sums: float) -> bool:
    return a["max_share"] <= share and a["act_sum"] <= sums and a["act_sqsum"] <= sums


def describe(a: dict) -> str:
    if a["differing"] == 0:
        active = "active identical"
    else:
        active = (f"active differs in {a['differing'] / a['cells']:.3%} of {a['cells']:,} cells, by at most "
                  f"{a['max_tokens']} tokens ({a['max_share']:.3%} of a group's)")
    return f"{active}, sums rel err {a['act_sum']:.1e} (squares {a['act_sqsum']:.1e})"


def stacked(result: dict[int, dict]) -> tuple[dict, np.ndarray]:
    """``NeuronStats.result()`` as ``({var: [group, ...]}, tokens [group])``."""
    groups = sorted(result)
    arrays = {v: np.stack([result[g][v] for g in groups]) for v in ("active", "act_sum", "act_sqsum")}
    return arrays, np.array([result[g]["tokens"] for g in groups])


def read_store(path: Path) -> tuple[dict, np.ndarray]:
    import xarray as xr

    ds = xr.open_zarr(path)
    return {v: ds[v].values for v in ("active", "act_sum", "act_sqsum")}, ds["tokens"].values


def run(cmd: list[str], what: str) -> tuple[str, float]:
    """Run ``cmd`` (a benchmark or ``python -m harvester``) with the repo importable; its output
    (stdout and stderr) is echoed indented into the log as it comes, so a step stopped at its time
    limit still shows how far it got. Returns (output, seconds); a failure is a StepError."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    print(f"  $ {' '.join(cmd)}", flush=True)
    start, lines = time.perf_counter(), []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"  | {lines[-1]}", flush=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = next((line for line in reversed(lines) if line.strip()), "no output")
        raise StepError(f"{what} exited with {proc.returncode}: {tail.strip()}")
    return "\n".join(lines), seconds


def find(pattern: str, text: str, what: str) -> re.Match:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise StepError(f"no '{what}' line in the output")
    return match


# -- step a: the fused kernel against the hook path ------------------------------------------------------

def step_a(plan) -> tuple[str, dict, bool]:
    """One gated MLP of Llama-3-8B's shape (random weights), the same batches through the hook path
    (``NeuronStats.update`` on ``silu(gate)``, as the forward hook sees it) and the fused kernel."""
    import torch

    parts, metrics, ok = [], {}, True
    for dtype in plan.mlp_dtypes:
        m = fused_against_hooks(plan, getattr(torch, dtype))
        metrics[dtype] = m
        ok = ok and within(m["agreement"], 1e-3, 1e-2) and m["out_err"] <= 1e-2
        t = m["ms"]
        parts.append(f"{dtype}: {describe(m['agreement'])}, h rel err {m['out_err']:.1e}; kernel "
                     f"{t['kernel']:.3f} ms/layer (replaces silu*up {t['act_mul']:.3f}) vs the 3 matmuls "
                     f"{t['matmuls']:.3f} ms (net {(t['kernel'] - t['act_mul']) / t['matmuls']:+.1%}); hook-path "
                     f"statistics {t['hooks']:.3f} ms")
    hidden, width = plan.mlp
    return f"MLP {hidden}x{width}, {plan.mlp_batches} batches of {plan.mlp_tokens} tokens; " + "; ".join(parts), \
        metrics, ok


def fused_against_hooks(plan, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from harvester.fused import fused_gated
    from harvester.stats import NeuronStats, StatsSpec

    (H, I), T, dev = plan.mlp, plan.mlp_tokens, torch.device(plan.device)
    torch.manual_seed(0)
    w_gate, w_up, w_down = (torch.randn(shape, device=dev, dtype=dtype) * 0.02 for shape in ((I, H), (I, H), (H, I)))
    spec = StatsSpec(("active", "sum", "sqsum"))
    hooks, fused = NeuronStats(spec, 1, I, device=dev), NeuronStats(spec, 1, I, device=dev)
    out_err = 0.0
    for _ in range(plan.mlp_batches):
        x = torch.randn(T, H, device=dev, dtype=dtype)
        groups = torch.randint(-1, GROUPS, (T,))  # -1: padding
        gate, up = x @ w_gate.T, x @ w_up.T
        act = F.silu(gate)
        hooks.begin(groups)
        hooks.update(0, act)
        fused.begin(groups)
        h, part = fused_gated(gate, up, fused.positions(dev), fused.n_present, "silu")
        fused.add_fused(0, part)
        ref = (act * up).float()  # the HF MLP's own product
        out_err = max(out_err, float((h.float() - ref).abs().max() / ref.abs().max()))
    (ref_stats, tokens), (got_stats, _) = stacked(hooks.result()), stacked(fused.result())
    pos, n = fused.positions(dev), fused.n_present
    ms = {"kernel": per_call_ms(lambda: fused_gated(gate, up, pos, n, "silu"), dev, plan.reps),
          "act_mul": per_call_ms(lambda: F.silu(gate) * up, dev, plan.reps),
          "matmuls": per_call_ms(lambda: (x @ w_gate.T, x @ w_up.T, h @ w_down.T), dev, plan.reps),
          "hooks": per_call_ms(lambda: hooks.update(0, act), dev, plan.reps)}
    return {"agreement": agreement(ref_stats, got_stats, tokens), "out_err": out_err, "ms": ms}


def per_call_ms(fn, dev, reps: int) -> float:
    """Milliseconds per call of ``fn`` after one warm-up call (CUDA events on a GPU)."""
    import torch

    fn()
    if dev.type != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(dev)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps


# -- step b: harvest_overhead.py at the 8B shape ---------------------------------------------------------

def step_b(plan) -> tuple[str, dict, bool]:
    out, seconds = run([sys.executable, str(BENCH / "harvest_overhead.py"), *plan.overhead], "harvest_overhead.py")
    ratio = float(find(r"^harvest/plain time ratio: ([\d.]+)$", out, "harvest/plain time ratio").group(1))
    rates = {side: float(find(rf"^\s*{side}: median\s+([\d.]+) ms per pass,\s+([\d.]+) tokens/s", out,
                              f"{side}: median").group(2)) for side in ("plain", "harvest")}
    share = re.search(r"^(fused kernel|statistics in situ): (.*)$", out, re.MULTILINE)
    text = (f"harvest/plain time ratio {ratio:.3f}; plain {rates['plain']:,.0f} tok/s, harvest "
            f"{rates['harvest']:,.0f} tok/s" + (f"; {share.group(1)} {share.group(2)}" if share else ""))
    return text, {"ratio": ratio, "tokens_per_s": rates, "seconds": seconds}, True


# -- step c: lsn harvest, bfloat16 against float32 -------------------------------------------------------

def step_c(plan, work: Path) -> tuple[str, dict, bool]:
    """A random model of 8B width with fewer layers, harvested twice from the sample corpus."""
    model, corpus = make_model(plan, work / "c" / "model"), make_corpus(plan, work / "c" / "corpus")
    runs = {dtype: lsn_harvest(plan, model, corpus, work / "c" / f"store-{dtype}", dtype)
            for dtype in ("float32", "bfloat16")}
    (ref, tokens), (got, got_tokens) = (read_store(work / "c" / f"store-{dtype}") for dtype in ("float32", "bfloat16"))
    if not np.array_equal(tokens, got_tokens):
        raise StepError("the two harvests counted different tokens")
    a = agreement(ref, got, tokens)
    m = plan.model
    text = (f"model {m['layers']}x{m['hidden']}/{m['width']}, {int(tokens.sum()):,} tokens in {len(tokens)} "
            f"groups; bfloat16 vs float32: {describe(a)}; "
            + ", ".join(f"{dtype} {rates(r)}" for dtype, r in runs.items()))
    return text, {"agreement": a, "runs": runs}, within(a, 1e-2, 5e-2)


def make_model(plan, path: Path) -> Path:
    """A random Llama of ``plan.model``'s shape (float32) with the tiny tokenizer beside it."""
    sys.path.insert(0, str(BENCH))
    from harvest_overhead import build_model

    from harvester.backends.hf import quiet_transformers

    quiet_transformers()  # no progress bars from save_pretrained in the log
    tokenizer = load_tokenizer()
    m = plan.model
    build_model(str(path), m["layers"], m["hidden"], m["width"], m["heads"], m["kv_heads"], len(tokenizer),
                "float32", plan.device)
    tokenizer.save_pretrained(path)  # ids < the model's vocab
    return path


def load_tokenizer():
    """The tiny tokenizer: carried in ``.whl/assets``, else trained here from the sample corpus."""
    from harvester.backends.hf import load_tokenizer as load

    if (ASSETS / "tokenizer").is_dir():
        return load(str(ASSETS / "tokenizer"))
    from harvester.tiny import train_tokenizer

    return train_tokenizer()


def make_corpus(plan, path: Path) -> Path:
    """``{lang}.txt`` for ``text:`` from the sample corpus (``plan.docs`` documents of ``plan.langs``,
    all when None): from ``.whl/assets`` where carried, else generated here."""
    path.mkdir(parents=True, exist_ok=True)
    source = ASSETS / "corpus"
    if not source.is_dir():
        write_sample(path.parent / "sample", plan.docs or SAMPLE_DOCS, plan.langs)
        source = path.parent / "sample"
    langs = plan.langs or sorted(p.stem for p in source.glob("*.txt"))
    for lang in langs:
        lines = (source / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        (path / f"{lang}.txt").write_text("\n".join(lines[: plan.docs or len(lines)]) + "\n", encoding="utf-8")
    return path


def write_sample(path: Path, docs: int, langs=None) -> None:
    """The sample corpus (``sample:docs=N``) as one ``{lang}.txt`` per language (needs wordfreq)."""
    try:
        from harvester.corpus.sample import SampleCorpus

        corpus = SampleCorpus.from_spec("sample", f"docs={docs}")
        path.mkdir(parents=True, exist_ok=True)
        for lang in langs or corpus.groups:
            (path / f"{lang}.txt").write_text("\n".join(corpus.texts(lang)) + "\n", encoding="utf-8")
    except ImportError as err:
        raise StepError(f"no {ASSETS.relative_to(ROOT)} and the sample corpus cannot be made here ({err}); "
                        "run make gpu-wheels") from None


def lsn_harvest(plan, model: Path, corpus: Path, store: Path, dtype: str, *extra: str) -> dict:
    """``python -m harvester harvest --no-ray`` into ``store``; tokens/s over the whole command and
    from the store's creation (after the model is loaded) to its last finished shard."""
    shutil.rmtree(store, ignore_errors=True)
    _, seconds = run([sys.executable, "-m", "harvester", "harvest", "--no-ray", "--no-progress", "--model", str(model),
                      "--corpus", f"text:{corpus}", "--store", str(store), "--device", plan.device, "--dtype", dtype,
                      *plan.harvest, *extra], f"lsn harvest ({dtype})")
    n = int(read_store(store)[1].sum())
    return {"tokens": n, "seconds": seconds, "whole_rate": n / seconds, "rate": shard_rate(store, n)}


def shard_rate(store: Path, tokens: int) -> float | None:
    """Tokens/s from the store's creation to its last finished shard (None if the layout is not the
    one this reads: ``shards/done``, whose metadata is written with the store and a chunk per shard)."""
    done = store / "shards" / "done"
    try:
        created = (done / "zarr.json").stat().st_mtime
        finished = max(p.stat().st_mtime for p in done.rglob("*") if p.is_file() and p.name != "zarr.json")
    except (OSError, ValueError):
        return None
    return tokens / max(finished - created, 1e-3)


def rates(r: dict) -> str:
    shards = f"{r['rate']:,.0f} tok/s" if r["rate"] is not None else "tok/s n/a"
    return f"{shards} ({r['whole_rate']:,.0f} over the whole command)"


# -- step d: compare_peers.py ----------------------------------------------------------------------------

def step_d(plan) -> tuple[str, dict, bool]:
    tokenizer = ["--tokenizer", str(ASSETS / "tokenizer")] if (ASSETS / "tokenizer").is_dir() else []
    out, seconds = run([sys.executable, str(BENCH / "compare_peers.py"), *plan.peers, *tokenizer], "compare_peers.py")
    ratio = float(find(r"^best peer / lsn time ratio: ([\d.]+)$", out, "best peer / lsn time ratio").group(1))
    rows = dict(re.findall(r"^(\w+)\s+([\d.]+)\s+\d+\s+[\d.]+$", out, re.MULTILINE))
    missing = re.search(r"^skipped \(not installed\): (.*?);", out, re.MULTILINE)
    failed = re.findall(r"^skipped \(failed\): (\w+): (.*)$", out, re.MULTILINE)
    times = ", ".join(f"{name} {float(ms):.1f} ms" for name, ms in rows.items())
    text = f"best peer / lsn time ratio {ratio:.3f}; per pass: {times}"
    if missing:
        text += f"; not installed: {missing.group(1)}"
    if failed:
        text += "; failed: " + ", ".join(f"{name} ({error})" for name, error in failed)
    if not set(rows) - {"plain", "lsn", "hooks"}:
        text += " (hooks only)"
    return text, {"ratio": ratio, "ms": {k: float(v) for k, v in rows.items()}, "seconds": seconds}, True


# -- step e: --device-map auto ---------------------------------------------------------------------------

def step_e(plan, work: Path) -> tuple[str, dict, bool]:
    """Step c's bfloat16 harvest again with ``--device-map auto``, against step c's store."""
    model, corpus, ref_store = work / "c" / "model", work / "c" / "corpus", work / "c" / "store-bfloat16"
    if not (model / "config.json").is_file() or not (ref_store / "zarr.json").is_file():
        raise StepError("needs step c's model and bfloat16 store (did step c run and finish?)")
    r = lsn_harvest(plan, model, corpus, work / "e" / "store-auto", "bfloat16", "--device-map", "auto")
    (ref, tokens), (got, got_tokens) = read_store(ref_store), read_store(work / "e" / "store-auto")
    if not np.array_equal(tokens, got_tokens):
        raise StepError("--device-map auto counted different tokens")
    a = agreement(ref, got, tokens)
    text = f"--device-map auto vs step c's bfloat16 store: {describe(a)}; {rates(r)}"
    return text, {"agreement": a, "run": r}, within(a, 1e-3, 1e-2)
