"""benchmarks/gpu_check.sh on a machine without a GPU: the dry run of every step at tiny shapes, its
result lines and tables, failures and timeouts recorded without stopping the other steps, and bad
arguments refused in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The script as the device call runs it, with this Python, $OUT under ``tmp`` and its work
    directory there too."""
    environ = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp / "out"), TMPDIR=str(tmp), **env)
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=600)


def step_lines(stdout: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if re.match(r"step [a-e]: ", line):
            lines.setdefault(line[5], []).append(line)
    return lines


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check")
    return gpu_check(tmp, "--dry-run"), tmp / "out"


def test_the_dry_run_runs_every_step_and_says_what_it_skipped(dry_run):
    run, _ = dry_run
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "dry run (--dry-run)" in run.stdout
    assert re.search(r"^(no \.whl folder|the wheels in \.whl are not for this Python)", run.stdout, re.MULTILINE)
    lines = step_lines(run.stdout)
    assert sorted(lines) == list("abcde") and all(len(v) == 1 for v in lines.values()), lines
    for step, (line,) in lines.items():
        assert re.search(r"; skipped \(no CUDA\): CUDA", line), line
    a, b, c, d, e = (lines[s][0] for s in "abcde")
    assert re.search(r"bfloat16: active identical, sums rel err [\d.e+-]+ .*kernel [\d.]+ ms/layer", a)
    assert "float16: active identical" in a
    assert re.search(r"harvest/plain time ratio \d+\.\d{3}; plain [\d,]+ tok/s, harvest [\d,]+ tok/s", b)
    assert re.search(r"bfloat16 vs float32: active .*; float32 [\d,]+ tok/s .*bfloat16 [\d,]+ tok/s", c)
    assert re.search(r"best peer / lsn time ratio \d+\.\d{3}; per pass: plain [\d.]+ ms, lsn [\d.]+ ms, hooks", d)
    assert "--device-map auto vs step c's bfloat16 store: active identical" in e


def test_the_dry_run_writes_its_table_as_markdown_and_json(dry_run):
    run, out = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"]["mode"] == "dry run (no CUDA)"
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == list("abcde") and all(s["status"] == "ok" and s["skipped"] for s in steps.values())
    assert steps["a"]["metrics"]["bfloat16"]["agreement"]["differing"] == 0
    c = steps["c"]["metrics"]["agreement"]
    assert 0 < c["max_share"] <= 0.01 and c["act_sum"] < 5e-2  # bf16 rounds, but stays close to float32
    assert steps["e"]["metrics"]["agreement"]["differing"] == 0
    markdown = (out / "gpu_check.md").read_text()
    for step in "abcde":
        assert re.search(rf"^\| {step} \| [^|]+ \| ok \| \d+ \| ", markdown, re.MULTILINE), step
    log = (out / "gpu_check.log").read_text()
    assert all(line in log for line in run.stdout.splitlines() if line.startswith("step "))


def test_a_timeout_and_a_failure_are_recorded_and_the_next_step_still_runs(tmp_path):
    run = gpu_check(tmp_path, "--dry-run", "--steps", "a,e", GPU_CHECK_BUDGET_A="1")
    assert run.returncode == 1
    lines = step_lines(run.stdout)
    assert lines["a"] == ["step a: TIMEOUT after 1s"]
    assert lines["e"][0].startswith("step e: FAILED: needs step c's model and bfloat16 store")
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("a", "timeout"), ("e", "failed")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: the real check would run")
def test_without_cuda_it_does_the_dry_run_and_says_so(tmp_path):
    run = gpu_check(tmp_path, "--steps", "e")
    assert "no CUDA device (torch.cuda.is_available() is False): doing the dry run" in run.stdout
    assert "mode dry, steps e" in run.stdout


@pytest.mark.parametrize("args", [["--steps", "ax"], ["--bogus"]])
def test_bad_arguments_are_one_line_errors(tmp_path, args):
    run = gpu_check(tmp_path, *args)
    assert run.returncode == 2 and run.stderr.startswith("gpu_check.sh: error: ") and run.stderr.count("\n") == 1
