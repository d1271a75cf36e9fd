"""The cost of ``lsn verify`` on a Llama-3-70B-shaped store: seconds, peak RSS, chunks checked, bytes read.

``analysis_scale.py``'s store holds totals only (no shard rows, no totals record), so ``lsn verify`` would
find it damaged; this script writes one as a harvest does instead: ``Store.create``, then one shard per
group through ``Store.write_shard`` (its rows and digest; counts from ``analysis_scale.Generator``), then
``Store.reduce``. Default 80 layers x 28,672 neurons x 80 groups and 80 shards: 4.4 GB of raw totals and
as much of shard rows (6.9 GB on disk). A real harvest has more shards (one per ``--shard-tokens``); verify
reads each chunk twice (its checksum, then its values), so its cost grows with the store's size.

``verify`` then runs in a fresh interpreter, under cProfile, which prints its wall and CPU time, peak RSS
(``ru_maxrss``: imports included), the chunks it checked, the bytes it read (``rchar`` of /proc/self/io:
every read verify made, page cache included) and where the time went (verify's own functions,
cumulative). Peak RSS is checked against 2 GiB. The last line:
``verify: X s, Y GiB peak RSS, N chunks, Z GB read, store W GB``.

    .venv/bin/python benchmarks/verify_cost.py                      # 70B shape: 6.9 GB of disk, ~5 min to write
    .venv/bin/python benchmarks/verify_cost.py --layers 4 --width 512 --groups 4   # seconds
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import fresh  # noqa: E402  (beside this file)

GIB = 1 << 30
LIMIT_GIB = 2.0


def write_store(path: str, L: int, I: int, K: int, seed: int) -> None:
    """A store as a harvest leaves it: one shard per group written with its digest, then reduced."""
    from analysis_scale import Generator, _fingerprint

    from harvester.store import Store, StoreAttrs

    stats = ["active", "sum", "sqsum"]
    attrs = StoreAttrs.new(_fingerprint([f"g{g:02d}" for g in range(K)], stats, None), layers=L, width=I,
                           specs=["synthetic"], architectures=["LlamaForCausalLM"])
    gen = Generator(L, I, K, seed)
    store = Store.create(path, attrs, n_shards=K)
    for g in range(K):
        store.write_shard(g, {g: {"tokens": int(gen.tokens[g]), **gen.group(g)}})
    store.reduce(list(range(K)))


def measure(store: str) -> dict:
    """``verify`` in this process, profiled: its figures and the time of each of its steps."""
    import cProfile
    import pstats

    from harvester.verify import verify

    rchar, cpu = _rchar(), time.process_time()
    start = time.perf_counter()
    profile = cProfile.Profile()
    problems, checked = profile.runcall(verify, store)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = pstats.Stats(profile).stats
    steps = {fn: v[3] for (file, _, fn), v in stats.items()  # verify's own functions, by cumulative time
             if file.endswith("harvester/verify.py") and fn not in ("verify", "inspect") and not fn.startswith("<") and v[3] > 0.01 * seconds}
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gib": fresh.peak_rss_gib(),
            "chunks": int(re.search(r"(\d+) chunks", checked).group(1)), "read_gb": (_rchar() - rchar) / 1e9,
            "problems": problems, "checked": checked, "steps": steps}


def _rchar() -> int:
    """Bytes this process has read so far (every read call, page cache included)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def in_child(*args: str) -> dict:
    return fresh.run(__file__, *args)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--width", type=int, default=28672)
    ap.add_argument("--groups", type=int, default=80, help="groups, and shards (one per group)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="the store: reused if it exists (never deleted then)")
    ap.add_argument("--keep", action="store_true", help="keep the store it writes")
    ap.add_argument("--write", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_store(args.write, args.layers, args.width, args.groups, args.seed)
        return fresh.report({"peak_rss_gib": fresh.peak_rss_gib()})
    if args.child:
        return fresh.report(measure(args.child))

    work = tempfile.mkdtemp(prefix="verify_cost-", dir=os.environ.get("TMPDIR", "/tmp"))
    store = args.store or str(Path(work) / "store")
    L, I, K = args.layers, args.width, args.groups
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; store {store}", flush=True)
    try:
        if not Path(store).exists():
            start = time.perf_counter()
            made = in_child("--write", store, "--layers", str(L), "--width", str(I), "--groups", str(K),
                            "--seed", str(args.seed))
            print(f"wrote {L} layers x {I} neurons x {K} groups, {K} shards (write_shard, reduce): "
                  f"{time.perf_counter() - start:.1f} s, writer peak RSS {made['peak_rss_gib']:.2f} GiB", flush=True)
        size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()) / 1e9
        r = in_child("--child", store)
        if r["problems"]:
            raise SystemExit(f"verify found problems in the store it measures: {r['problems'][:3]}")
        print(f"{r['checked']}: no problem found", flush=True)
        for name, seconds in sorted(r["steps"].items(), key=lambda item: -item[1]):
            print(f"  {name:>15}: {seconds:7.1f} s (cumulative: _read runs inside the others)", flush=True)
        flag = "ok" if r["peak_rss_gib"] <= LIMIT_GIB else f"OVER {LIMIT_GIB:g} GiB"
        print(f"  CPU {r['cpu_seconds']:.1f} s; read {r['read_gb'] / size:.2f} x the store's size; "
              f"{size / r['seconds']:.2f} GB of store per s; "
              f"peak RSS {flag}; load average {os.getloadavg()[0]:.2f}", flush=True)
        print(f"verify: {r['seconds']:.1f} s, {r['peak_rss_gib']:.2f} GiB peak RSS, {r['chunks']} chunks, "
              f"{r['read_gb']:.2f} GB read, store {size:.2f} GB")
    finally:
        if args.store or not args.keep:  # a store given is never deleted (it is not under ``work``)
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {store}")


if __name__ == "__main__":
    main()
