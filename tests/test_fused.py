"""The fused Triton kernel against the PyTorch path, on CPU with Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harvester.backends.hf import HFBackend
from harvester.errors import HarvestError

ROOT = Path(__file__).resolve().parents[1]


def interpret(*args: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tests.fused_checks", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_kernel_against_plain_loops():
    interpret("kernel_against_loops")


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gemma", "tiny:qwen3"])
def test_backend_with_the_kernel_matches_the_hooks(model):
    interpret("backend_against_hooks", model)


def test_the_kernel_is_used_only_where_it_applies():
    assert HFBackend("tiny:llama").fused is None  # CPU: the PyTorch path
    assert HFBackend("tiny:llama", unit="residual", fused=None).fused is None
    with pytest.raises(HarvestError, match="needs a gated MLP"):
        HFBackend("tiny:gpt2", fused=True)
