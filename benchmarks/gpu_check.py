"""The GPU check: what ``benchmarks/gpu_check.sh`` runs, one step per process, then one table.

a. The fused Triton kernel against the hook path on the same batches, for one MLP of Llama-3-8B's
   shape (hidden 4096, width 14,336), in bfloat16 and float16: agreement of ``active`` and the sums,
   and the kernel's time per layer against the MLP's three matrix products.
b. ``harvest_overhead.py --preset llama3-8b --device cuda --dtype bfloat16`` (32 layers, random
   weights): the harvest/plain time ratio and tokens/s of both sides.
c. ``python -m harvester harvest --no-ray`` of the sample corpus on a random model of 8B width (4
   layers) into a Zarr store, in bfloat16 and in float32: how far bf16's counts are from float32's,
   and tokens/s.
d. ``compare_peers.py --device cuda --dtype bfloat16``: lsn against forward hooks (and nnsight and
   TransformerLens where their wheels were carried): ``best peer / lsn time ratio``.
e. Step c's bfloat16 harvest again with ``--device-map auto``, compared with step c's store.

With ``--mode dry`` (no CUDA) each step runs the same code at tiny shapes on the CPU (the kernel
under ``TRITON_INTERPRET=1``) and its line says what it skipped.

Commands (the shell script's): ``step X --mode gpu|dry --work DIR`` runs one step, prints its line
``step X: ...`` and appends its record to ``DIR/results.jsonl``; ``record X STATUS TEXT`` records a
step that did not record itself (timed out, crashed); ``table`` writes ``gpu_check.md`` and
``gpu_check.json``; ``wheels DIR`` says whether DIR's wheels install on this Python; ``assets DIR``
writes the sample corpus and tokenizer that ``make gpu-wheels`` carries.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

STEPS = {"a": "fused kernel vs hook path, one 8B MLP", "b": "harvest_overhead, 8B shape",
         "c": "lsn harvest, bf16 vs float32", "d": "compare_peers", "e": "--device-map auto"}
VERSIONS = ("torch", "transformers", "triton", "zarr", "numcodecs", "dask", "xarray", "nnsight", "transformer-lens")
"""Packages whose versions the table names."""
_START = time.perf_counter()


@dataclass(frozen=True)
class Plan:
    """The shapes each step runs at, on a GPU or in the dry run."""

    device: str
    mlp: tuple[int, int]
    """Step a: (hidden, width) of the MLP."""
    mlp_tokens: int
    mlp_batches: int
    reps: int
    """Step a: timed calls per operation."""
    mlp_dtypes: tuple[str, ...]
    overhead: tuple[str, ...]
    """Step b: ``harvest_overhead.py`` arguments."""
    model: dict
    """Steps c and e: the random model's shape."""
    docs: int | None
    """Steps c and e: documents per language (None: all carried)."""
    langs: tuple[str, ...] | None
    harvest: tuple[str, ...]
    """Steps c and e: ``lsn harvest`` arguments besides model, corpus, store, device and dtype."""
    peers: tuple[str, ...]
    """Step d: ``compare_peers.py`` arguments."""
    skipped: dict = field(default_factory=dict)
    """What the dry run leaves out, per step."""


_TINY = ("--layers", "1", "--hidden", "64", "--width", "96", "--heads", "2", "--kv-heads", "2", "--vocab", "300",
         "--batch-size", "2", "--seq-len", "32", "--batches", "1", "--repeats", "1")
_8B_WIDTH = ("--layers", "4", "--hidden", "4096", "--width", "14336", "--heads", "32", "--kv-heads", "8")
PLANS = {
    "gpu": Plan("cuda", (4096, 14336), 8192, 3, 20, ("bfloat16", "float16"),
                ("--preset", "llama3-8b", "--device", "cuda", "--dtype", "bfloat16", "--batch-size", "4",
                 "--seq-len", "2048", "--batches", "2", "--repeats", "5"),
                dict(layers=4, hidden=4096, width=14336, heads=32, kv_heads=8), None, None,
                ("--seq-len", "512", "--batch-size", "32", "--shard-tokens", "65536"),
                ("--device", "cuda", "--dtype", "bfloat16", *_8B_WIDTH, "--vocab", "4096", "--batch-size", "4",
                 "--seq-len", "512", "--batches", "2", "--repeats", "5")),
    "dry": Plan("cpu", (64, 96), 70, 2, 1, ("bfloat16", "float16"),
                (*_TINY, "--device", "cpu", "--dtype", "bfloat16"),
                dict(layers=2, hidden=64, width=128, heads=2, kv_heads=2), 6, ("en", "de", "zh"),
                ("--seq-len", "128", "--batch-size", "4", "--shard-tokens", "1024"),
                (*_TINY, "--device", "cpu", "--dtype", "bfloat16"),
                skipped={"a": "CUDA, the 4096x14336 MLP, 8192-token batches, kernel timing on the GPU",
                         "b": "CUDA, the 32-layer Llama-3-8B shape, the fused kernel's share of device time",
                         "c": "CUDA, the 4-layer model of 8B width (4096/14336), the whole carried sample corpus",
                         "d": "CUDA, the 4-layer model of 8B width, bfloat16 on the GPU",
                         "e": "CUDA (accelerate placed the model on the CPU)"}),
}


def run_step(step: str, mode: str, work: Path) -> int:
    """Run one step; print its line and record it. 0 when it ran and was within tolerance."""
    import gpu_steps

    plan = PLANS[mode]
    functions = {"a": lambda: gpu_steps.step_a(plan), "b": lambda: gpu_steps.step_b(plan),
                 "c": lambda: gpu_steps.step_c(plan, work), "d": lambda: gpu_steps.step_d(plan),
                 "e": lambda: gpu_steps.step_e(plan, work)}
    try:
        text, metrics, ok = functions[step]()
        status = "ok" if ok else "failed"
        if not ok:
            text = f"out of tolerance: {text}"
    except gpu_steps.StepError as err:
        text, metrics, status = str(err), {}, "failed"
    except Exception as err:  # noqa: BLE001 -- any failure is this step's result; the others go on
        traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        text, metrics, status = f"{type(err).__name__}: {first}", {}, "failed"
    record(work, step, status, text, time.perf_counter() - _START, metrics, plan.skipped.get(step))
    return 0 if status == "ok" else 1


def record(work: Path, step: str, status: str, text: str, seconds: float, metrics: dict | None = None,
           skipped: str | None = None) -> None:
    """Print the step's one result line and append its record."""
    label = {"ok": "", "failed": "FAILED: ", "timeout": "TIMEOUT "}[status]
    print(f"step {step}: {label}{text}" + (f"; skipped (no CUDA): {skipped}" if skipped else ""), flush=True)
    entry = {"step": step, "name": STEPS[step], "status": status, "result": text, "skipped": skipped,
             "seconds": round(seconds, 1), "metrics": metrics or {}}
    with open(work / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def read_records(work: Path, steps: str) -> list[dict]:
    """The last record of each step asked for; a step with none is 'not run'."""
    found = {}
    path = work / "results.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        entry = json.loads(line)
        found[entry["step"]] = entry
    return [found.get(s, {"step": s, "name": STEPS[s], "status": "not run", "result": "no record", "skipped": None,
                          "seconds": 0.0, "metrics": {}}) for s in steps]


def environment(mode: str) -> dict:
    """Where and with what the check ran (imports fail softly: this is a report)."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "mode": "GPU" if mode == "gpu" else "dry run (no CUDA)", "python": platform.python_version(),
           "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import torch

        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    except Exception as err:  # noqa: BLE001
        env["device"] = f"unknown ({type(err).__name__})"
    for name in VERSIONS:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    return env


def table(work: Path, out: Path | None, mode: str, steps: str) -> int:
    """Print the results table; write it as Markdown and JSON under ``out``. 1 if any step failed."""
    records, env = read_records(work, steps), environment(mode)
    versions = ", ".join(f"{k} {env[k]}" for k in VERSIONS if env[k])
    lines = [f"# gpu_check: {env['mode']}, {env['device']}, {env['date']}", "",
             f"Python {env['python']} on {env['host']} ({env['cpus']} CPUs); {versions}.", "",
             "| step | what | status | seconds | result |", "| --- | --- | --- | --- | --- |"]
    for r in records:
        result = r["result"] + (f" (skipped, no CUDA: {r['skipped']})" if r.get("skipped") else "")
        lines.append(f"| {r['step']} | {r['name']} | {r['status']} | {r['seconds']:.0f} | {result.replace('|', '/')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text, encoding="utf-8")
        (out / "gpu_check.json").write_text(json.dumps({"environment": env, "steps": records}, indent=2) + "\n",
                                             encoding="utf-8")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def wheels(directory: Path) -> int:
    """0 when every wheel in ``directory`` installs on this Python; otherwise says why not."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    found = sorted(directory.glob("*.whl"))
    supported = set(sys_tags())
    foreign = [w.name for w in found if not parse_wheel_filename(w.name)[3] & supported]
    if not found:
        print(f"no wheels in {directory}: wheel install skipped (using this Python's own packages)")
        return 1
    if foreign:
        print(f"the wheels in {directory} are not for this Python {platform.python_version()} ({foreign[0]}, ...): "
              "not installed (using this Python's own packages)")
        return 1
    return 0


def assets(directory: Path) -> int:
    """The sample corpus as text files and the tiny tokenizer, which the device cannot make (no wordfreq)."""
    import gpu_steps

    gpu_steps.write_sample(directory / "corpus", gpu_steps.SAMPLE_DOCS)
    gpu_steps.load_tokenizer().save_pretrained(directory / "tokenizer")
    print(f"wrote {directory}/corpus (sample:docs={gpu_steps.SAMPLE_DOCS}, "
          f"{len(list((directory / 'corpus').glob('*.txt')))} languages) and {directory}/tokenizer")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step")
    s.add_argument("step", choices=sorted(STEPS))
    for p in (s, sub.add_parser("table")):
        p.add_argument("--mode", choices=sorted(PLANS), required=True)
        p.add_argument("--work", type=Path, required=True)
    r = sub.add_parser("record")
    r.add_argument("step", choices=sorted(STEPS))
    r.add_argument("status", choices=["failed", "timeout"])
    r.add_argument("text")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--seconds", type=float, default=0.0)
    r.add_argument("--if-missing", action="store_true", help="only when the step recorded nothing")
    sub.choices["table"].add_argument("--out", type=Path)
    sub.choices["table"].add_argument("--steps", default="".join(STEPS))
    for name in ("wheels", "assets"):
        sub.add_parser(name).add_argument("directory", type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.command == "step":
        if args.mode == "dry":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined, on first use
        return run_step(args.step, args.mode, args.work)
    if args.command == "record":
        if args.if_missing and read_records(args.work, args.step)[0]["status"] != "not run":
            return 0
        record(args.work, args.step, args.status, args.text, args.seconds)
        return 0
    if args.command == "table":
        return table(args.work, args.out, args.mode, args.steps)
    return wheels(args.directory) if args.command == "wheels" else assets(args.directory)


if __name__ == "__main__":
    sys.exit(main())
