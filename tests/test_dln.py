"""DLN (``lsn analyze dln``) against an independent re-implementation of the study's selection
(mjkmain/Distribution-aware-language-neurons: ``overlap.py``, ``select_neurons.py``), written here with
plain loops and torch: its pmf, its overlap matrix, its bipartitions, its ``kthvalue``."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

from analysis import dln
from analysis.masks import Mask
from harvester.errors import HarvestError
from lsn.cli import main
from tests import fixtures

BASE = ["--model", "tiny:llama", "--seq-len", "64", "--shard-tokens", "4000", "--no-ray", "--no-progress"]


# -- the reference -----------------------------------------------------------------------------
def ref_sides(K: int) -> list[tuple[int, ...]]:
    """Every smaller side A of a two-sided split, by size then lexicographically; an even split's once
    (the half holding language 0)."""
    out = []
    for bits in range(1, 2 ** K - 1):
        A = tuple(k for k in range(K) if bits >> k & 1)
        if 2 * len(A) < K or (2 * len(A) == K and A[0] == 0):
            out.append(A)
    return sorted(out, key=lambda A: (len(A), A))


def ref_dln(hist: np.ndarray, pct: float) -> tuple[dict[int, tuple[int, ...]], float]:
    """``({flat neuron: its side A}, τ)`` for ``hist [K, L, I, B]``, neuron by neuron."""
    K, L, I, _ = hist.shape
    h = torch.from_numpy(hist).to(torch.float64)
    pmf = h / h.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    S = torch.zeros(L, I, K, K, dtype=torch.float32)
    for l, i, a, b in itertools.product(range(L), range(I), range(K), range(K)):
        S[l, i, a, b] = torch.minimum(pmf[a, l, i], pmf[b, l, i]).sum().to(torch.float32)
    off = [S[l, i, a, b] for l in range(L) for i in range(I) for a in range(K) for b in range(a + 1, K)]
    values = torch.stack(off)
    tau = values.kthvalue(max(1, int(values.numel() * pct / 100.0))).values.item()
    sides, chosen = ref_sides(K), {}
    for l, i in itertools.product(range(L), range(I)):
        costs = [max(S[l, i, a, b].item() for a in A for b in range(K) if b not in A) for A in sides]
        best = min(range(len(sides)), key=lambda p: costs[p])  # Python's min: the first of equal costs
        if costs[best] <= tau:
            chosen[l * I + i] = sides[best]
    return chosen, tau


def histograms(K: int, seed: int, L: int = 3, I: int = 14, B: int = 6) -> np.ndarray:
    """Small random counts (ties between neurons and languages are frequent), with a flat neuron (every
    language alike), a neuron of disjoint languages, one with two identical languages, one language
    without counts on one neuron, one language in one bin only."""
    rng = np.random.default_rng([K, seed])
    hist = rng.integers(0, 4, size=(K, L, I, B)).astype(np.int64)
    hist[:, 0, 0] = rng.integers(0, 5, size=B)  # flat: the same histogram in every language
    hist[:, 0, 1] = 0
    for k in range(K):
        hist[k, 0, 1, k % B] = 3  # disjoint, where B allows
    hist[1, 1, 2] = hist[0, 1, 2]  # two languages alike
    hist[K - 1, 2, 3] = 0  # no counts
    hist[:, 2, 4] = 0
    hist[0, 2, 4, 0] = 9
    hist[1:, 2, 4, 1:] = 2
    hist[:, 1, 5] = hist[:, 1, 6]  # two neurons alike
    hist[:, 1, 7] = 0  # languages 1 and 2 on one side (an MLN when K >= 4), the others on the other
    hist[1:3, 1, 7, :2] = 4
    hist[[k for k in range(K) if k not in (1, 2)], 1, 7, 2:] = 1
    return hist


def lazy(hist: np.ndarray):
    return da.stack([da.from_array(h, chunks=(2, 5, h.shape[2])) for h in hist])


def as_sides(result: dict) -> dict[int, tuple[int, ...]]:
    return {int(n): result["parts"][int(p)][0] for n, p in zip(result["chosen"], result["side"])}


# -- the method --------------------------------------------------------------------------------
def test_bipartitions_are_the_studys():
    for K in range(2, 9):
        assert [A for A, _ in dln.bipartitions(K)] == ref_sides(K)
    assert len(dln.bipartitions(7)) == 63 and dln.bipartitions(2) == [((0,), (1,))]
    assert dln.bipartitions(4)[4:] == [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]


@pytest.mark.parametrize("K", [2, 3, 4, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_dln_is_the_studys_selection(K, seed):
    hist = histograms(K, seed)
    mln = set()
    for pct in (0.0, 1.0, 5.0, 30.0, 100.0):
        want, tau = ref_dln(hist, pct)
        got = dln.dln(lazy(hist), pct)
        assert got["tau"] == tau and as_sides(got) == want, (K, seed, pct)
        mln |= {A for A in want.values() if len(A) > 1}
        L, I = hist.shape[1:3]
        assert got["n"] == L * I * K * (K - 1) // 2
        for k in range(K):  # each language lists the neurons whose side holds it
            assert got["selected"][k].tolist() == sorted(n for n, A in want.items() if k in A)
    assert bool(mln) == (K >= 4)  # multi-language sides are tested where there are any


def test_flat_and_disjoint_neurons():
    """Every language alike: every split costs 1, the first (A = {0}) is kept, selected only when τ is 1;
    every language apart: every split costs 0, the first again."""
    hist = np.zeros((4, 1, 2, 5), np.int64)
    hist[:, 0, 0] = [1, 2, 0, 3, 1]
    for k in range(4):
        hist[k, 0, 1, k] = 5
    low = dln.dln(lazy(hist), 1.0)
    assert low["tau"] == 0.0 and as_sides(low) == {1: (0,)}
    high = dln.dln(lazy(hist), 100.0)
    assert high["tau"] == 1.0 and as_sides(high) == {0: (0,), 1: (0,)}
    assert dln.populations(high, list("abcd")) == {"sln": {"a": 2, "b": 0, "c": 0, "d": 0},
                                                  "mln": {"a": 0, "b": 0, "c": 0, "d": 0}, "sln_total": 2,
                                                  "mln_total": 0, "sides": {"a": 2}, "even": 0}


def test_populations_count_sln_and_mln():
    hist = histograms(4, 3)
    result = dln.dln(lazy(hist), 30.0)
    want, _ = ref_dln(hist, 30.0)
    pops = dln.populations(result, ["w", "x", "y", "z"])
    assert pops["sln_total"] == sum(len(A) == 1 for A in want.values())
    assert pops["mln_total"] == sum(len(A) > 1 for A in want.values()) > 0
    for k, name in enumerate("wxyz"):
        assert pops["sln"][name] == sum(A == (k,) for A in want.values())
        assert pops["mln"][name] == sum(len(A) > 1 and k in A for A in want.values())
    assert sum(pops["sides"].values()) == len(want)


def test_small_blocks_give_the_same_overlaps(monkeypatch):
    hist = histograms(3, 5)
    whole = dln.overlaps(lazy(hist))
    monkeypatch.setattr(dln, "_BLOCK_BYTES", 1)  # one neuron at a time
    assert np.array_equal(dln.overlaps(lazy(hist)), whole)


def test_refusals_of_the_method():
    with pytest.raises(HarvestError, match="at least 2 languages"):
        dln.dln(lazy(histograms(2, 0)[:1]))
    with pytest.raises(HarvestError, match="13 languages make 4095"):
        dln.dln(lazy(np.zeros((13, 1, 2, 3), np.int64)))
    with pytest.raises(HarvestError, match=r"--pct must lie in \[0, 100\]"):
        dln.dln(lazy(histograms(2, 0)), 101)


# -- through the CLI, on a real store ----------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dln") / "store"
    assert main(["harvest", *BASE, "--corpus", "sample:docs=12,langs=en+de+zh+ru", "--store", str(path),
                 "--stats", "active,sum,sqsum,hist", "--hist-edges=-0.2:0.4:12"]) == 0
    return path


def test_cli_matches_the_reference(store, tmp_path, capsys):
    langs = ["zh", "en", "ru"]
    out = tmp_path / "dln.npz"
    assert main(["analyze", "dln", "--store", str(store), "--out", str(out), "--langs", ",".join(langs),
                 "--pct", "5", "--report", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr()
    hist = xr.open_zarr(store)["hist"].sel(group=langs).values
    want, tau = ref_dln(hist, 5.0)
    mask = Mask.load(out)
    assert mask.method == "dln" and mask.languages == langs and mask.params["pct"] == 5.0
    assert mask.extra["tau"] == tau and mask.extra["n"] == hist.shape[1] * hist.shape[2] * 3
    for k in range(3):
        assert mask.selected[k].tolist() == sorted(n for n, A in want.items() if k in A)
    sln = {lang: sum(A == (k,) for A in want.values()) for k, lang in enumerate(langs)}
    mln = {lang: sum(len(A) > 1 and k in A for A in want.values()) for k, lang in enumerate(langs)}
    assert mask.extra["sln"] == sln and mask.extra["mln"] == mln
    lines = printed.out.splitlines()
    assert lines[0].startswith(f"wrote {out}: dln, ")
    assert lines[1].startswith(f"tau {tau:.6g} (the ") and "single-language neurons (SLN)" in lines[1]
    assert lines[2] == ("SLN: " + ", ".join(f"{k} {v}" for k, v in sln.items()) + "; MLN: "
                        + ", ".join(f"{k} {v}" for k, v in mln.items()))
    assert "the histograms are on fixed edges (14 bins, -0.2 to 0.4" in printed.err
    assert (tmp_path / "report" / "counts.png").is_file()


def test_cli_default_languages_and_pct(store, tmp_path, capsys):
    assert main(["analyze", "dln", "--store", str(store), "--out", str(tmp_path / "d.npz")]) == 0
    mask = Mask.load(tmp_path / "d.npz")
    want, tau = ref_dln(xr.open_zarr(store)["hist"].values, 1.0)
    assert mask.languages == ["en", "de", "zh", "ru"] and mask.params["pct"] == 1.0 and mask.extra["tau"] == tau
    assert sum(mask.extra["sides"].values()) == len(want)


def test_even_splits_are_said(store, tmp_path, capsys):
    """Two languages: every split is 1 against 1 and lists its neuron under the first language only;
    lsn says so, with the count, and records it."""
    out = tmp_path / "d.npz"
    assert main(["analyze", "dln", "--store", str(store), "--out", str(out), "--langs", "de,zh", "--pct", "10"]) == 0
    err = capsys.readouterr().err
    mask = Mask.load(out)
    want, _ = ref_dln(xr.open_zarr(store)["hist"].sel(group=["de", "zh"]).values, 10.0)
    assert mask.extra["even"] == len(want) > 0 and mask.selected[1].size == 0
    assert (f"lsn: note: {len(want)} selected neuron(s) split the 2 languages evenly (1 against 1); as in the "
            "study's code they are listed under the side with de (the first of --langs) only") in err
    assert main(["analyze", "dln", "--store", str(store), "--out", str(out), "--langs", "de,zh,ru",
                 "--pct", "10"]) == 0
    assert "evenly" not in capsys.readouterr().err and Mask.load(out).extra["even"] == 0


@pytest.mark.parametrize("args,message", [
    (["--langs", "en"], "DLN splits each neuron's languages in two sides; it needs at least 2 languages, got 1 (en)"),
    (["--pct", "101"], "--pct must lie in [0, 100], got 101"),
    (["--pct", "-1"], "--pct must lie in [0, 100], got -1"),
    (["--langs", "en,xx"], "unknown group 'xx'"),
])
def test_cli_refusals(store, tmp_path, capsys, args, message):
    assert main(["analyze", "dln", "--store", str(store), "--out", str(tmp_path / "m.npz"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()


def test_cli_refuses_a_store_without_histograms(tmp_path, capsys):
    path = tmp_path / "nohist"
    assert main(["harvest", *BASE, "--corpus", "sample:docs=4,langs=en+de", "--store", str(path),
                 "--stats", "active"]) == 0
    capsys.readouterr()
    assert main(["analyze", "dln", "--store", str(path), "--out", str(tmp_path / "m.npz")]) == 2
    err = capsys.readouterr().err
    assert "has none: harvest with --stats ...,hist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()


def test_a_language_without_tokens_is_warned_about(tmp_path, capsys):
    """Responses cut away by a short --seq-len: the response groups have no tokens (the harvest says so, exit 2)."""
    data = fixtures.write_instruct(tmp_path / "i.jsonl", langs=("en", "de"), n=4)
    store = tmp_path / "st"
    assert main(["harvest", *BASE, "--corpus", f"instruct:{data}", "--store", str(store), "--seq-len", "12",
                 "--stats", "active,hist", "--hist-edges=-0.2:0.4:4"]) == 2
    capsys.readouterr()
    assert main(["analyze", "dln", "--store", str(store), "--out", str(tmp_path / "m.npz"),
                 "--langs", "en:prompt,en:response,de:prompt"]) == 0
    err = capsys.readouterr().err
    assert "lsn: warning: language en:response has no tokens" in err
    assert ("lsn: warning: DLN: en:response's histograms are empty, so it overlaps 0 with every language: every "
            "neuron's least cost is then 0 and every neuron is selected") in err
    mask = Mask.load(tmp_path / "m.npz")
    assert mask.extra["sln_total"] + mask.extra["mln_total"] == mask.n_layers * mask.width
    assert mask.extra["tau"] == 0.0


def test_pooled_languages_are_summed_histograms(store, tmp_path):
    """A language that pools groups (NAME=G1+G2) takes the sum of their histograms."""
    out = tmp_path / "p.npz"
    assert main(["analyze", "dln", "--store", str(store), "--out", str(out), "--langs", "west=en+de,zh,ru",
                 "--pct", "10"]) == 0
    ds = xr.open_zarr(store)["hist"]
    hist = np.stack([ds.sel(group="en").values + ds.sel(group="de").values, ds.sel(group="zh").values,
                     ds.sel(group="ru").values])
    want, tau = ref_dln(hist, 10.0)
    mask = Mask.load(out)
    assert mask.languages == ["west", "zh", "ru"] and mask.extra["tau"] == tau
    assert [s.tolist() for s in mask.selected] == [sorted(n for n, A in want.items() if k in A) for k in range(3)]


def test_a_damaged_histogram_chunk_is_one_line(store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "S"
    shutil.copytree(store, copy)
    chunk = copy / "hist" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    assert main(["analyze", "dln", "--store", str(copy), "--out", str(tmp_path / "m.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lsn: error: ") and "array 'hist' fails its crc32c checksum" in err[-1]
    assert not [line for line in err if not line.startswith("lsn: ")] and not (tmp_path / "m.npz").exists()
