"""The benchmarks run end to end on a tiny shape and print their last lines (no timing is checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "64", "--width", "96", "--heads", "2", "--kv-heads", "2", "--vocab", "300",
        "--batch-size", "2", "--seq-len", "32", "--batches", "1", "--repeats", "1"]


def bench(script: str, *args: str) -> list[str]:
    run = subprocess.run([sys.executable, f"benchmarks/{script}", *TINY, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()


@pytest.mark.parametrize("kernel", ["numba", "matmul"])
def test_harvest_overhead(kernel):
    lines = bench("harvest_overhead.py", "--kernel", kernel, "--stats", "active,sum,hist")
    assert f"statistics kernel {kernel}" in lines[0] and "float32 on cpu" in lines[0]
    assert re.fullmatch(r"statistics in situ: [\d.]+ ms per layer call, [\d.]+% of the harvest pass", lines[-2])
    assert re.fullmatch(r"harvest/plain time ratio: \d+\.\d{3}", lines[-1])


def test_compare_peers():
    lines = bench("compare_peers.py")
    assert any(line.startswith("hooks ") for line in lines)  # the peers of the [peers] extra may be skipped
    assert re.fullmatch(r"best peer / lsn time ratio: \d+\.\d{3}", lines[-1])


@pytest.mark.ray
def test_pipeline_capacity():
    """The whole harvest path with the null backend, in process and on Ray with 1 and 2 actors."""
    run = subprocess.run([sys.executable, "benchmarks/pipeline_capacity.py", "--layers", "2", "--width", "64",
                          "--langs", "en,zh", "--docs", "300", "--tokenizer", "tiny", "--shard-tokens", "8192",
                          "--seq-len", "256"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    for stage in ("tokenize", "load shard", "write shard", "reduce"):
        assert any(re.fullmatch(rf"\s*{stage}: +[\d,]+ tokens/s", line) for line in lines), stage
    for name in ("no Ray", "1 actor\\(s\\)", "2 actor\\(s\\)"):
        assert any(re.match(rf"\s*{name}: [\d,]+ tokens, \d+ shards in .* sustained\)", line) for line in lines), name
    assert re.fullmatch(r"pipeline tokens/s \(sustained, best of 1 and 2 actors\): [\d,]+", lines[-1])


def test_hist_bytes():
    run = subprocess.run([sys.executable, "benchmarks/hist_bytes.py", "--layers", "1", "--width", "64", "--bins",
                          "16", "--shard-tokens", "2048", "--shards", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert any("int32 rows" in line for line in lines) and any("int64 rows" in line for line in lines)
    assert re.fullmatch(r"hist rows: int32/int64 bytes ratio \d+\.\d{3}", lines[-1])

def test_dln_scale():
    """DLN's benchmark writes its synthetic store and selects from it in a fresh process."""
    run = subprocess.run([sys.executable, "benchmarks/dln_scale.py", "--layers", "2", "--width", "128", "--langs", "4",
                          "--bins", "12"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"tau [\d.e-]+ \(the \d+-th smallest of 1536 pairwise overlaps, pct 1\): \d+ single-language "
                        r"neurons \(SLN\), \d+ multi-language \(MLN\)", lines[-3])
    assert re.fullmatch(r"dln: [\d.]+ s \([\d.]+ s CPU\), [\d.]+ GiB peak RSS, load average [\d.]+ "
                        r"\(4 x 2 x 128 x 12, pct 1\)", lines[-1])

def test_bootstrap_scale():
    """A store with shard rows written through the real Store, then LAPE with and without --bootstrap."""
    run = subprocess.run([sys.executable, "benchmarks/bootstrap_scale.py", "--layers", "2", "--width", "64",
                          "--groups", "3", "--shards", "3", "--resamples", "3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert any(line.startswith("wrote 2 layers x 64 neurons x 3 groups x 3 shards per group") for line in lines)
    assert re.fullmatch(r"bootstrap: 3 resamples of LAPE in [\d.]+ s \([\d.-]+ s per resample; full-data LAPE "
                        r"[\d.]+ s\), peak RSS [\d.]+ GiB", lines[-1])
