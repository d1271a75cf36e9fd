"""GPU-aware defaults and no Ray where it buys nothing (issue 16, items 2 and 7), met as a user meets them.

The CUDA branch is decided by :func:`harvester.devices.resolve` from explicit capabilities, so it is
tested here without a GPU; the refusals on this machine's CPU build of torch are run for real.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsn.cli import main
from harvester.devices import Capabilities, resolve
from harvester.errors import HarvestError
from tests.helpers import assert_same_totals, tree_digest

HARVEST = ["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=20,langs=en+de", "--seq-len", "64",
           "--shard-tokens", "512"]
GPU = Capabilities(cuda_built=True, cuda_devices=2, bf16_supported=True)
cpu_build = pytest.mark.skipif(torch.backends.cuda.is_built(), reason="the refusals of a CPU build of torch")
# runs the CLI in a fresh process and says on stderr whether Ray was ever imported
PROBE = "import sys; from lsn.cli import main; rc = main(sys.argv[1:]); " \
        "print('ray imported:', 'ray' in sys.modules, file=sys.stderr); sys.exit(rc)"


def lsn(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("device, dtype, caps, expected", [
    ("auto", "auto", GPU, ("cuda", "bfloat16")),
    ("auto", "auto", Capabilities(cuda_built=True, cuda_devices=1, bf16_supported=False), ("cuda", "float32")),
    ("auto", "auto", Capabilities(), ("cpu", "float32")),
    ("auto", "auto", Capabilities(cuda_built=True), ("cpu", "float32")),  # a CUDA build, no GPU visible
    ("auto", "auto", Capabilities(mps_available=True), ("cpu", "float32")),
    ("auto", "float16", GPU, ("cuda", "float16")),
    ("cpu", "auto", GPU, ("cpu", "float32")),
    ("cpu", "bfloat16", Capabilities(), ("cpu", "bfloat16")),  # half precision works on CPU in torch 2.13
    ("cuda:1", "auto", GPU, ("cuda:1", "bfloat16")),
    ("mps", "auto", Capabilities(mps_available=True), ("mps", "float32")),
])
def test_resolve_decides_from_capabilities(device, dtype, caps, expected):
    assert resolve(device, dtype, caps) == expected


@pytest.mark.parametrize("device, caps, words", [
    ("gpu", GPU, "unknown --device 'gpu' (a GPU is --device cuda)"),
    ("cuda:x", GPU, "unknown --device 'cuda:x'"),
    ("cpu:0", GPU, "unknown --device 'cpu:0'"),
    ("cuda", Capabilities(), "CPU-only build"),
    ("cuda", Capabilities(cuda_built=True), "no CUDA GPU is visible"),
    ("cuda:2", GPU, "only 2 GPU(s) are visible (cuda:0 to cuda:1)"),
    ("mps", GPU, "MPS backend is not available"),
])
def test_resolve_refuses_impossible_devices(device, caps, words):
    with pytest.raises(HarvestError) as err:
        resolve(device, "auto", caps)
    assert words in str(err.value)


def test_a_cluster_checks_its_own_devices():
    """Joining a Ray cluster, this machine's capabilities do not decide an explicit device; its spelling does."""
    assert resolve("cuda:3", "bfloat16", Capabilities(), check=False) == ("cuda:3", "bfloat16")
    with pytest.raises(HarvestError, match="unknown --device 'gpu'"):
        resolve("gpu", "auto", Capabilities(), check=False)


def one_line_error(argv: list[str], capsys, words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lsn: error: ") and words in err, err


@cpu_build
@pytest.mark.parametrize("extra, words", [
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--device", "cuda"], "CPU-only build"),
    (["--device", "cuda", "--no-ray"], "CPU-only build"),
    (["--device", "cuda:7"], "--device cuda:7: this torch is a CPU-only build"),
    (["--device", "mps"], "MPS backend is not available"),
])
def test_impossible_device_on_this_machine_is_one_line_and_writes_nothing(extra, words, tmp_path, capsys):
    one_line_error([*HARVEST, "--store", str(tmp_path / "S"), *extra], capsys, words)
    assert not (tmp_path / "S").exists()


@cpu_build
def test_jobs_refuse_impossible_devices_too(tmp_path, capsys):
    base = ["--model", "tiny:llama", "--mask", str(tmp_path / "m.npz"), "--out", str(tmp_path / "o")]
    one_line_error(["intervene", "ppl", *base, "--corpus", "sample:docs=2,langs=en", "--device", "cuda"], capsys,
                   "CPU-only build")
    one_line_error(["intervene", "generate", *base, "--prompts", str(tmp_path / "p.jsonl"), "--device", "gpu"],
                   capsys, "unknown --device 'gpu'")
    one_line_error(["finetune", "--model", "tiny:llama", "--mask", str(tmp_path / "m.npz"), "--lang", "en",
                    "--task", "clm", "--data", "sample:docs=2,langs=en", "--out", str(tmp_path / "o"),
                    "--device", "cuda:1"], capsys, "CPU-only build")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["harvest"], ["intervene", "ppl"], ["intervene", "generate"], ["finetune"]])
def test_help_shows_the_device_and_dtype_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE auto (cuda when a GPU is visible, else cpu)" in text
    assert "bfloat16 (default: auto)" in text and "cuda:N | mps (default: auto)" in text


@pytest.fixture(scope="module")
def default_store(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    store = tmp_path_factory.mktemp("defaults") / "S"
    return store, lsn(*HARVEST, "--store", store)


def test_default_harvest_runs_in_this_process_and_says_what_it_resolved(default_store):
    store, run = default_store
    assert run.returncode == 0, run.stderr[-2000:]
    expected = "cuda, dtype bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else \
        "cuda, dtype float32" if torch.cuda.is_available() else "cpu, dtype float32"
    assert f"lsn: device {expected}, in this process" in run.stderr.splitlines()
    assert "ray imported: False" in run.stderr  # no Ray instance, no session directory, no raylet
    assert "Token authentication" not in run.stderr


def test_resume_with_default_flags_matches_the_resolved_store(default_store, tmp_path):
    """``auto`` is resolved before the fingerprint: the same defaults, or the values they resolved to,
    resume the store; another dtype is another harvest."""
    store, _ = default_store
    before = tree_digest(store)
    resolved = lsn(*HARVEST, "--store", store, "--no-progress")
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    attrs_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert main([*HARVEST, "--store", str(store), "--device", attrs_device, "--no-progress"]) == 0
    assert tree_digest(store) == before
    assert main([*HARVEST, "--store", str(store), "--dtype", "float16", "--no-progress"]) == 2
    assert tree_digest(store) == before


@pytest.mark.ray
def test_two_actors_use_ray_without_its_token_notice_and_give_the_same_store(default_store, tmp_path):
    store, _ = default_store
    run = lsn(*HARVEST, "--store", tmp_path / "R", "--actors", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ray imported: True" in run.stderr and any(line.endswith(", on Ray") for line in run.stderr.splitlines())
    assert "Token authentication is enabled" not in run.stderr
    assert_same_totals(tmp_path / "R", store)


def test_only_rays_token_notice_is_dropped():
    """The filter drops Ray's own 'enabled' notice (the real function that logs it), nothing else, and
    only while the embedded instance starts."""
    from ray._private.authentication import authentication_token_setup as setup

    from harvester.driver import _quiet_token_notice

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(setup.__name__)
    logger.addHandler(handler)
    try:
        with _quiet_token_notice():
            setup._warn_token_auth_enabled()
            setup._warn_token_auth_disabled()
        setup._warn_token_auth_enabled()
    finally:
        logger.removeHandler(handler)
    assert [m.split(".")[0] for m in seen] == ["Token authentication is disabled for this Ray cluster",
                                                "Token authentication is enabled for this Ray cluster"]


def test_intervene_with_default_flags_runs_in_this_process(default_store, tmp_path):
    """The row jobs follow the same rule: one local actor, no Ray; the resolved dtype is what they record."""
    store, _ = default_store
    mask = tmp_path / "lape.npz"
    assert main(["analyze", "lape", "--store", str(store), "--out", str(mask)]) == 0
    run = lsn("intervene", "ppl", "--model", "tiny:llama", "--mask", mask, "--corpus", "sample:docs=4,seed=7,langs=en+de",
              "--out", tmp_path / "ppl", "--seq-len", "64", "--controls", "0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ray imported: False" in run.stderr
    resolved = json.loads((tmp_path / "ppl" / "ppl.json").read_text())["settings"]["dtype"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"lsn: device {device}, dtype {resolved}, in this process" in run.stderr.splitlines()
    assert resolved != "auto"
