"""``--hist-edges from-store:STORE:BINS[:HI]``: DLN's per-neuron histogram ranges, against plain references.

The references here share nothing with the package's kernels: the ranges are recomputed with NumPy from
the first store's totals (and with torch as DLN's ``build_hist_cache.py`` writes them), and every token's
bin is found in a plain loop, per token and per neuron, with NumPy float32 scalars (``np.floor_divide``
has ``torch.div(..., rounding_mode="floor")``'s semantics).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvester.backends.hf import resolve_model
from harvester.errors import HarvestError
from harvester.stats import NeuronStats, StatsSpec, dln_ranges
from harvester.store import read_attrs
from lsn.cli import main
from tests.helpers import assert_same_totals
from tests.reference import reference_windows

SEQ = 32
FLAGS = ["--model", "tiny:llama", "--no-ray", "--no-progress", "--seq-len", str(SEQ), "--batch-size", "4",
         "--shard-tokens", "256"]
BINS = 24
NTH = 3
"""The plain loop checks every third neuron (every token, layer, unit and language), to stay fast."""
F = np.float32


def _harvest(corpus, store, *extra) -> None:
    assert main(["harvest", *FLAGS, "--corpus", f"text:{corpus}", "--store", str(store), *extra]) == 0


@pytest.fixture(scope="module")
def stores(text_corpus, tmp_path_factory):
    """Per unit a first store (sum, sqsum) and a histogram store on its ranges."""
    root = tmp_path_factory.mktemp("hist-ranges")
    out = {"corpus": text_corpus}
    for unit in ("mlp", "gate", "down-input"):
        first, second = root / f"first-{unit}", root / f"hist-{unit}"
        _harvest(text_corpus, first, "--unit", unit)
        _harvest(text_corpus, second, "--unit", unit, "--stats", "active,sum,sqsum,hist",
                 "--hist-edges", f"from-store:{first}:{BINS}")
        out[unit] = (first, second)
    return out


def _numpy_ranges(first, bins: int, hi: float = 3.0):
    """The ranges from the first store's totals, in plain NumPy: float64 moments, then float32 arithmetic."""
    ds = xr.open_zarr(str(first))
    n = int(ds["tokens"].values.sum())
    m = ds["act_sum"].values.sum(axis=0) / n
    var = ds["act_sqsum"].values.sum(axis=0) / n - m * m
    m, s = m.astype(F), np.sqrt(np.where(var > 0, var, 0.0)).astype(F)
    lo = np.where(m - F(3) * s > F(-0.4), m - F(3) * s, F(-0.4))
    top = m + F(hi) * s
    flat = top - lo < F(0.001)
    lo, top = np.where(flat, m - F(0.05), lo), np.where(flat, m + F(0.05), top)
    width = (top - lo) / F(bins)
    return lo, np.where(width > F(1e-6), width, F(1e-6))


def _study_ranges(mean, std, n_bins: int, hi: float = 3.0):
    """DLN's ``build_hist_cache.py`` (``run_pass2`` and ``HistAccum``), in torch float32."""
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    bin_lo = torch.maximum(mean - 3.0 * std, torch.full_like(mean, -0.4))
    bin_hi = mean + hi * std
    flat = (bin_hi - bin_lo) < 1e-3
    if flat.any():
        bin_lo = torch.where(flat, mean - 0.05, bin_lo)
        bin_hi = torch.where(flat, mean + 0.05, bin_hi)
    return bin_lo.numpy(), ((bin_hi - bin_lo) / float(n_bins)).clamp_min(1e-6).numpy()


def _bin(x, lo, width, bins: int) -> int:
    """One value's bin, as the study computes it (NaN and +inf: the overflow bin, lsn's rule)."""
    shifted = F(x) - F(lo)
    if np.isnan(shifted) or shifted == np.inf:
        return bins + 1
    if shifted == -np.inf:
        return 0
    q = np.floor_divide(shifted, F(width))
    return int(min(max(q, -1.0), float(bins))) + 1


def _activations(text_corpus):
    """Per language, per layer, every token's value at each unit ``{unit: [T, I]}`` (float32)."""
    path = resolve_model("tiny:llama")
    tok, lm = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    captured = {}
    for k, layer in enumerate(lm.model.layers):
        layer.mlp.register_forward_hook(lambda m, inputs, out, k=k: captured.__setitem__(k, inputs[0][0]))
    out = {}
    with torch.inference_mode():
        for lang, windows in reference_windows(text_corpus, tok, SEQ).items():
            rows = {}
            for window in windows:
                lm(input_ids=torch.tensor([window]))
                for k, x in captured.items():
                    mlp = lm.model.layers[k].mlp
                    gate = mlp.gate_proj(x)
                    units = {"gate": gate, "mlp": mlp.act_fn(gate), "down-input": mlp.act_fn(gate) * mlp.up_proj(x)}
                    for unit, value in units.items():
                        rows.setdefault((unit, k), []).append(value.float().numpy())
            out[lang] = {key: np.concatenate(v) for key, v in rows.items()}
    return out


def test_ranges_are_the_studys_of_the_first_store(stores):
    for unit in ("mlp", "gate", "down-input"):
        first, second = stores[unit]
        ds = xr.open_zarr(str(second))
        lo, width = ds["hist_range_lo"].values, ds["hist_range_width"].values
        assert lo.dtype == width.dtype == np.float32 and ds.sizes["bin"] == BINS + 2
        ref_lo, ref_width = _numpy_ranges(first, BINS)
        np.testing.assert_array_equal(lo, ref_lo)
        np.testing.assert_array_equal(width, ref_width)
        f = xr.open_zarr(str(first))
        n = int(f["tokens"].values.sum())
        m = f["act_sum"].values.sum(axis=0) / n
        s = np.sqrt(np.maximum(f["act_sqsum"].values.sum(axis=0) / n - m * m, 0))
        study_lo, study_width = _study_ranges(m, s, BINS)
        np.testing.assert_array_equal(lo, study_lo)
        np.testing.assert_array_equal(width, study_width)
        if unit == "gate":  # negative pre-activations: some ranges start at the floor
            assert (lo == F(-0.4)).any() and (lo > F(-0.4)).any()
        record = read_attrs(second).settings.hist_ranges
        assert (record.store, record.bins, record.hi) == (str(first), BINS, 3.0)


def test_counts_match_a_plain_loop_at_each_unit(stores, text_corpus):
    acts = _activations(text_corpus)
    for unit in ("mlp", "gate", "down-input"):
        ds = xr.open_zarr(str(stores[unit][1]))
        lo, width, hist = ds["hist_range_lo"].values, ds["hist_range_width"].values, ds["hist"].values
        groups = [str(g) for g in ds["group"].values]
        for lang, by_layer in acts.items():
            expected = np.zeros(hist.shape[1:], dtype=np.int64)
            for layer in range(hist.shape[1]):
                values = by_layer[(unit, layer)]
                for t in range(values.shape[0]):
                    for i in range(0, values.shape[1], NTH):
                        expected[layer, i, _bin(values[t, i], lo[layer, i], width[layer, i], BINS)] += 1
            np.testing.assert_array_equal(hist[groups.index(lang)][:, ::NTH], expected[:, ::NTH],
                                          err_msg=f"{unit} {lang}")
        assert (hist[..., 0] > 0).any() or unit == "mlp"
        assert (hist[..., -1] > 0).any()  # the tails beyond 3 sigma are counted


def test_kernels_agree_with_the_loop_on_chosen_values():
    """Values on bin edges, beyond both ends, NaN and infinities, a flat range and the floor, on the numba
    kernel and the torch path alike."""
    mean = np.array([[0.2, 0.0, -0.1, 1.0, 0.5]])
    std = np.array([[1e-5, 0.5, 0.2, 0.1, 0.0]])  # flat; floor hit (0 - 1.5 < -0.4); floor hit; normal; zero
    lo, width = dln_ranges(mean, std, 10)
    assert lo[0, 0] == F(0.2) - F(0.05) and lo[0, 1] == F(-0.4) and lo[0, 2] == F(-0.4) and lo[0, 4] == F(0.5) - F(0.05)
    assert width[0, 0] == (F(0.2) + F(0.05) - (F(0.2) - F(0.05))) / F(10)
    edges = lo + width * np.arange(-2, 13, dtype=F)[:, None, None]  # every edge (float32), and beyond
    special = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0], dtype=F)
    x = np.concatenate([edges[:, 0, :].astype(F), np.nextafter(edges[:, 0, :], -np.inf).astype(F),
                        np.repeat(special[:, None], 5, axis=1)])
    spec = StatsSpec(("active", "hist"), hist_bins=10, hist_ranges=(lo, width))
    for kernel in ("numba", "matmul"):
        stats = NeuronStats(spec, 1, 5, kernel=kernel)
        stats.begin(torch.zeros(x.shape[0], dtype=torch.long))
        stats.update(0, torch.from_numpy(x))
        got = stats.result()[0]["hist"][0]
        expected = np.zeros((5, 12), np.int64)
        for t in range(x.shape[0]):
            for i in range(5):
                expected[i, _bin(x[t, i], lo[0, i], width[0, i], 10)] += 1
        np.testing.assert_array_equal(got, expected, err_msg=kernel)


def test_flat_rule_is_strict():
    """``hi - lo < 1e-3`` widens a range; a range of exactly that width (in float32) stays."""
    half = F(0.001) / F(2)  # with m = 0, hi - lo = 2 * float32(3 s): find the s that makes it 1e-3 exactly
    s = F(half / F(3))
    for _ in range(64):
        if F(3) * s == half:
            break
        s = np.nextafter(s, F(np.inf) if F(3) * s < half else F(0))
    assert F(3) * s == half
    lo, width = dln_ranges(np.zeros(1), np.array([float(s)]), 4)
    assert lo[0] == -half and width[0] == F(0.001) / F(4)  # not flat: the rule is strict
    lo, width = dln_ranges(np.zeros(1), np.array([float(np.nextafter(s, F(0)))]), 4)
    assert lo[0] == F(-0.05) and width[0] == F(0.1) / F(4)  # just under: m +- 0.05
    lo, width = dln_ranges(np.array([1.0]), np.array([0.01]), 4, hi=6.0)
    assert lo[0] == F(1) - F(3) * F(0.01) and width[0] == ((F(1) + F(6) * F(0.01)) - lo[0]) / F(4)


def test_store_layout_resume_and_verify(stores, tmp_path, capsys):
    first, second = stores["mlp"]
    root = zarr.open_group(str(second), mode="r")
    assert root["shards/hist"].dtype == np.int32 and root["hist"].dtype == np.int64  # rows int32, totals int64
    assert "hist_lo" not in root and main(["verify", str(second)]) == 0
    assert main(["summary", "--store", str(second)]) == 0
    assert f"per-neuron ranges from store {first}" in capsys.readouterr().out
    # the same command finishes an interrupted harvest (killed with SIGKILL mid-shard) to the same numbers
    store, marker = tmp_path / "resumed", tmp_path / "fault"
    argv = ["harvest", *FLAGS, "--unit", "mlp", "--corpus", f"text:{stores['corpus']}", "--store", str(store),
            "--stats", "active,sum,sqsum,hist", "--hist-edges", f"from-store:{first}:{BINS}"]
    env = {**os.environ, "LSN_FAULT_INJECT": f"1:{marker}"}
    proc = subprocess.run([sys.executable, "-m", "lsn", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and marker.exists()
    assert main(argv) == 0
    assert_same_totals(store, second)
    assert main(["verify", str(store)]) == 0
    # another first store (the same model and unit, other text): other ranges, and the resume is refused
    other = tmp_path / "other-first"
    assert main(["harvest", *FLAGS, "--corpus", "sample:docs=6,langs=en,de", "--store", str(other)]) == 0
    capsys.readouterr()
    assert main([*argv[:-1], f"from-store:{other}:{BINS}"]) != 0
    err = capsys.readouterr().err
    assert "holds a different harvest (settings.hist_ranges" in err and "Traceback" not in err


def test_a_damaged_range_is_found_by_verify(stores, tmp_path, capsys):
    store = tmp_path / "S"
    shutil.copytree(stores["mlp"][1], store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    lo = root["hist_range_lo"][...]
    lo[0, 0] += 1
    root["hist_range_lo"][...] = lo  # rewritten with a valid checksum: only the digest tells
    assert main(["verify", str(store)]) != 0
    assert "per-neuron histogram ranges differ" in capsys.readouterr().out


def _error(argv, capsys) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("lsn: error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_refusals_are_one_line(stores, tmp_path, capsys):
    first = stores["mlp"][0]
    base = ["harvest", *FLAGS, "--corpus", f"text:{stores['corpus']}", "--stats", "active,hist"]

    def refused(spec, *extra, store="x") -> str:
        return _error([*base, "--store", str(tmp_path / store), "--hist-edges", spec, *extra], capsys)

    assert "no store at" in refused(f"from-store:{tmp_path / 'none'}:8")
    for spec in (f"from-store:{first}:0", f"from-store:{first}:-3"):
        assert "BINS must be a positive integer" in refused(spec)
    for spec in (f"from-store:{first}", f"from-store:{first}:4.5", "from-store:", "from-store::8"):
        assert "must be from-store:STORE:BINS[:HI]" in refused(spec)
    for spec in (f"from-store:{first}:8:0", f"from-store:{first}:8:-1", f"from-store:{first}:8:nan"):
        assert "HI (the range's upper end" in refused(spec)
    assert "its model unit is 'mlp', this harvest's 'gate'" in refused(f"from-store:{first}:8", "--unit", "gate")
    assert "its model id is 'tiny:llama'" in _error(
        ["harvest", *FLAGS[2:], "--model", "tiny:qwen2", "--corpus", f"text:{stores['corpus']}", "--stats",
         "active,hist", "--store", str(tmp_path / "q"), "--hist-edges", f"from-store:{first}:8"], capsys)
    assert "needs --backend hf" in refused(f"from-store:{first}:8", "--backend", "vllm")
    assert "names the store being harvested" in refused(f"from-store:{first}:8", store=str(first))
    assert "is for --stats ...,hist" in _error(
        ["harvest", *FLAGS, "--corpus", f"text:{stores['corpus']}", "--store", str(tmp_path / "n"),
         "--hist-edges", f"from-store:{first}:8"], capsys)
    counts_only = tmp_path / "active-only"
    _harvest(stores["corpus"], counts_only, "--stats", "active")
    assert "no sum and no sqsum statistic" in refused(f"from-store:{counts_only}:8")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(first, unfinished)
    root = zarr.open_group(str(unfinished), mode="r+", use_consolidated=False)
    root.attrs["lsn"] = {**root.attrs.asdict()["lsn"], "complete": False, "totals": None}
    assert "is not complete" in refused(f"from-store:{unfinished}:8")
    assert not any((tmp_path / name).exists() for name in ("x", "q", "n"))  # a refusal leaves nothing behind


def test_a_store_path_with_colons(stores, tmp_path):
    """BINS and HI are read from the right: a first store whose path holds ':' is read as it is."""
    first = tmp_path / "a:b:7"
    shutil.copytree(stores["mlp"][0], first)
    store = tmp_path / "s"
    _harvest(stores["corpus"], store, "--stats", "active,hist", "--hist-edges", f"from-store:{first}:{BINS}:3")
    ds, ref = xr.open_zarr(str(store)), xr.open_zarr(str(stores["mlp"][1]))
    np.testing.assert_array_equal(ds["hist"].values, ref["hist"].values)
    assert read_attrs(store).settings.hist_ranges.store == str(first)


def test_act_prob_90p_and_p90_read_per_neuron_ranges(stores, tmp_path):
    """act-prob-90p needs counts only (bins shared by the groups); p90 reads each unit's own edges."""
    from analysis.histogram import bin_edges, hist_quantile

    second = stores["mlp"][1]
    assert main(["analyze", "act-prob-90p", "--store", str(second), "--out", str(tmp_path / "p.npz")]) == 0
    ds = xr.open_zarr(str(second))
    edges = bin_edges(ds)
    lo, width = ds["hist_range_lo"].values, ds["hist_range_width"].values
    assert edges.shape == (*lo.shape, BINS + 1)
    np.testing.assert_allclose(edges[..., BINS], lo.astype(float) + BINS * width.astype(float))
    hist = ds["hist"].values.sum(axis=0)
    p90 = hist_quantile(hist, edges, 90)
    layer, unit = 1, 5
    one = hist_quantile(hist[layer, unit], edges[layer, unit], 90)  # one unit, its edges as fixed ones
    assert p90[layer, unit] == one


def test_hist_rows_int32_where_a_shard_fits_else_int64(tmp_path):
    """Shard rows of hist are int32 when a shard's tokens stay below 2**31, int64 otherwise; the totals are
    int64 and equal either way (the digest is over each row's own dtype)."""
    from harvester.store import hist_row_dtype

    assert hist_row_dtype(1 << 20, 512) == "int32" and hist_row_dtype((1 << 31) - 1, 512) == "int32"
    assert hist_row_dtype(1 << 31, 512) == "int64" and hist_row_dtype(None, None) == "int64"
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--corpus", "sample:docs=6,langs=en,de", "--stats", "active,hist", "--hist-edges", "-1:1:8"]
    assert main(["harvest", *FLAGS, *common, "--store", str(a)]) == 0
    assert main(["harvest", *[f for f in FLAGS if f != "256"][:-1], "--shard-tokens", str(1 << 31), *common,
                 "--store", str(b)]) == 0
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert (ra["shards/hist"].dtype, rb["shards/hist"].dtype) == (np.int32, np.int64)
    np.testing.assert_array_equal(ra["hist"][...], rb["hist"][...])
    assert main(["verify", str(a)]) == 0 and main(["verify", str(b)]) == 0


def test_intervention_p90_on_per_neuron_ranges(stores):
    from analysis.histogram import bin_edges, hist_quantile
    from jobs.interventions import Mode, unit_statistic

    second = stores["mlp"][1]
    ds = xr.open_zarr(str(second))
    group = str(ds["group"].values[0])
    p90 = unit_statistic(str(second), [group], Mode("p90"))
    np.testing.assert_array_equal(p90, hist_quantile(ds["hist"].values[0], bin_edges(ds), 90))
    lo = ds["hist_range_lo"].values
    assert (p90 >= lo - 1e-6).all() or np.isnan(p90).any()


def test_bins_no_machine_can_hold_are_refused_before_anything_is_allocated(tmp_path, capsys):
    """BINS of 10^9 (a typo, or 1e9 meant as a count) is refused in one line before any accumulator,
    edge list or store exists; so are counts no memory holds at the model's shape, and ranges that
    overflow float32 (HI = 1e39: NaN and infinite widths would put every value in one bin)."""
    from harvester.stats import MAX_HIST_BINS, check_hist_memory

    first = tmp_path / "first"
    assert main(["harvest", *FLAGS, "--corpus", "sample:docs=4,langs=en,de", "--store", str(first)]) == 0
    base = ["harvest", *FLAGS, "--corpus", "sample:docs=4,langs=en,de", "--stats", "active,hist"]
    for spec in (f"from-store:{first}:1000000000", f"from-store:{first}:{MAX_HIST_BINS + 1}", "-1:4:1000000000"):
        assert f"at most {MAX_HIST_BINS}" in _error([*base, "--store", str(tmp_path / "x"), "--hist-edges", spec],
                                                    capsys)
    assert "not finite" in _error([*base, "--store", str(tmp_path / "x"), "--hist-edges",
                                   f"from-store:{first}:8:1e39"], capsys)
    assert not (tmp_path / "x").exists()
    with pytest.raises(HarvestError, match="more than this machine's"):
        check_hist_memory(1 << 20, 1 << 20, 402)
    check_hist_memory(32, 14336, 402)  # DLN's 400 bins at Llama-3-8B's shape: 1.5 GiB a group


def test_a_first_store_pooled_otherwise_is_refused(tmp_path, capsys):
    """The ranges of a --pooling mean first store are those of per-document means, far narrower than a token's
    values (on tiny:llama 28% of the tokens fell in the open bins instead of 0.4%): refused for a token
    histogram, in one line; a first store pooled the same way is taken."""
    flags = [f if f != str(SEQ) else "256" for f in FLAGS]
    corpus = ["--corpus", "sample:docs=4,langs=en,de"]
    pooled = tmp_path / "pooled"
    assert main(["harvest", *flags, *corpus, "--pooling", "mean", "--stats", "active,sum,sqsum", "--store",
                 str(pooled)]) == 0
    hist = ["harvest", *flags, *corpus, "--stats", "active,hist", "--hist-edges", f"from-store:{pooled}:8"]
    err = _error([*hist, "--store", str(tmp_path / "x")], capsys)
    assert "its settings pooling is 'mean', this harvest's 'token'" in err and not (tmp_path / "x").exists()
    assert main([*hist, "--pooling", "mean", "--store", str(tmp_path / "y")]) == 0
