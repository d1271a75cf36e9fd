"""The fused Triton kernel against the PyTorch path, on CPU with Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harvester.backends.hf import HFBackend, fused_agrees
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


def test_half_precision_models_pass_the_self_check():
    interpret("half_precision_self_check")


def test_the_self_check_rule():
    """The first layer exactly (same input on both paths); later layers exactly in float32, within 2%
    of the counted activations in bfloat16/float16; a wrong layer or wrong sums fail."""
    rng = np.random.default_rng(0)
    tokens, active, sums = 24, rng.integers(0, 25, (4, 50)), rng.normal(size=(4, 50))
    ref = {0: {"tokens": tokens, "active": active, "act_sum": sums}}

    def changed(active_delta=None, sums_factor=None) -> dict:
        a, s = active.copy(), sums.copy()
        if active_delta is not None:
            a[active_delta] += 1
        if sums_factor is not None:
            s[0] *= sums_factor
        return {0: {"tokens": tokens, "active": a, "act_sum": s}}

    later = (slice(1, None), slice(0, 5))  # 15 of 4,800 activations, in layers 1-3
    assert fused_agrees(ref, ref, True) and fused_agrees(ref, ref, False)
    assert fused_agrees(ref, changed(later), False) and not fused_agrees(ref, changed(later), True)
    assert not fused_agrees(ref, changed((0, 0)), False)  # the first layer must be exact
    assert not fused_agrees(ref, changed(sums_factor=1.1), False)
    assert fused_agrees(ref, changed(sums_factor=1 + 1e-4), False)
    zeroed = {0: {"tokens": tokens, "active": active * np.array([1, 1, 0, 1])[:, None], "act_sum": sums}}
    assert not fused_agrees(ref, zeroed, False)  # a layer lost


def test_the_kernel_is_used_only_where_it_applies():
    assert HFBackend("tiny:llama").fused is None  # CPU: the PyTorch path
    assert HFBackend("tiny:llama", unit="residual", fused=None).fused is None
    with pytest.raises(HarvestError, match="needs a gated MLP"):
        HFBackend("tiny:gpt2", fused=True)


def test_the_kernel_restores_a_wrapped_forward():
    """An MLP whose ``forward`` is an instance attribute (accelerate's device hooks with
    ``--device-map``) gets that same ``forward`` back after a fused pass, and a plain MLP its class's."""
    from harvester.backends.hf import _fused_mlps
    from harvester.stats import NeuronStats, StatsSpec

    backend = HFBackend("tiny:llama")
    mlps = [m for m in backend.model.modules() if type(m).__name__.endswith("MLP")]
    wrapped = mlps[0].forward
    mlps[0].forward = lambda x: wrapped(x)  # what accelerate's add_hook_to_module leaves there
    hooked = mlps[0].forward
    plan = [(m, "silu") for m in mlps]
    with _fused_mlps(plan, NeuronStats(StatsSpec(), len(mlps), 128), StatsSpec(), backend.device):
        assert all("forward" in vars(m) and m.forward is not hooked for m in mlps)
    assert mlps[0].forward is hooked
    assert all("forward" not in vars(m) for m in mlps[1:])
