"""The analysis through the command line, on real harvested stores, against the plain references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from analysis.masks import Mask
from lsn.cli import main
from tests import fixtures
from tests import method_reference as ref

BASE = ["--model", "tiny:llama", "--seq-len", "64", "--shard-tokens", "4000", "--no-ray", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "store"
    assert main(["harvest", *BASE, "--corpus", "sample:docs=25,langs=en+de+zh+ru", "--store", str(path),
                 "--stats", "active,sum,sqsum,hist", "--hist-edges=-0.2:0.4:12"]) == 0
    return path


@pytest.fixture(scope="module")
def pooled_store(tmp_path_factory):
    """Stimuli with one pooled sample each (the localizer's input), without the absolute sums."""
    root = tmp_path_factory.mktemp("pooled")
    data = fixtures.write_stimuli(root / "s.csv", "en", n=8)
    assert main(["harvest", *BASE, "--corpus", f"stimuli:{data}", "--store", str(root / "store"), "--pooling", "last",
                 "--unit", "residual", "--stats", "active,sum,sqsum", "--seq-len", "256"]) == 0
    return root / "store"


@pytest.fixture(scope="module")
def instruct_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    data = fixtures.write_instruct(root / "i.jsonl", langs=("en", "de", "zh"), n=6)
    assert main(["harvest", *BASE, "--corpus", f"instruct:{data}", "--store", str(root / "store")]) == 0
    return root / "store"


def arrays(store, langs=None):
    ds = xr.open_zarr(store)
    if langs:
        ds = ds.sel(group=langs)
    return ds["active"].values, ds["tokens"].values


def as_layers(mask: Mask):
    return [[idx.tolist() for idx in mask.layers(k)] for k in range(len(mask.languages))]


def test_lape_in_the_order_given_matches_the_reference(store, tmp_path, capsys):
    out = tmp_path / "lape.npz"
    langs = ["zh", "en", "ru"]
    assert main(["analyze", "lape", "--store", str(store), "--out", str(out), "--langs", ",".join(langs),
                 "--top-rate", "0.05", "--report", str(tmp_path / "report")]) == 0
    mask = Mask.load(out)
    active, tokens = arrays(store, langs)
    want, tau, beta = ref.lape(ref.probabilities(active, tokens), top_rate=0.05)
    assert mask.languages == langs and as_layers(mask) == want
    assert mask.extra["tau"] == tau and mask.params["top_rate"] == 0.05
    assert mask.source["fingerprint_sha256"] and mask.source["store"] == str(store)
    assert (tmp_path / "report" / "counts.png").is_file() and (tmp_path / "report" / "report.md").is_file()


def test_export_loads_with_weights_only_and_imports_back(store, tmp_path):
    out = tmp_path / "m.npz"
    assert main(["analyze", "lape", "--store", str(store), "--out", str(out), "--top-rate", "0.05"]) == 0
    assert main(["mask", "export", "--format", "rucaibox", str(out), str(tmp_path / "m.pt")]) == 0
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    mask = Mask.load(out)
    assert len(loaded) == len(mask.languages) and all(len(per) == mask.n_layers for per in loaded)
    assert all(t.dtype == torch.long for per in loaded for t in per)
    assert [[t.tolist() for t in per] for per in loaded] == as_layers(mask)
    assert main(["mask", "import", str(tmp_path / "m.pt"), str(tmp_path / "back.npz"), "--langs",
                 ",".join(mask.languages), "--width", str(mask.width)]) == 0
    assert as_layers(Mask.load(tmp_path / "back.npz")) == as_layers(mask)


def test_autosweep_json_and_entropy_lambda_response_only(instruct_store, tmp_path, capsys):
    assert main(["analyze", "autosweep", "--store", str(instruct_store), "--response-only", "--top-rate", "0.05",
                 "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ds = xr.open_zarr(instruct_store)
    resp = [f"{lang}:response" for lang in ("en", "de", "zh")]
    active, tokens = ds["active"].sel(group=resp).values, ds["tokens"].sel(group=resp).values
    Pr = ref.probabilities(active, tokens)
    lam, appear = ref.autosweep(Pr, 0.05)
    assert last == {"lambda": lam, "appear": appear}
    out = tmp_path / "el.npz"
    assert main(["analyze", "entropy-lambda", "--store", str(instruct_store), "--response-only", "--lambda", "0.05",
                 "--top-rate", "0.05", "--out", str(out)]) == 0
    want, appear = ref.entropy_lambda(Pr, 0.05, top_rate=0.05)
    mask = Mask.load(out)
    assert mask.languages == ["en", "de", "zh"] and as_layers(mask) == want and mask.extra["appear"] == appear


def test_thresholds_coverage_localizer_random(store, pooled_store, tmp_path):
    active, tokens = arrays(store)
    ds = xr.open_zarr(store)
    L, I = active.shape[1:]
    out = tmp_path / "x.npz"
    assert main(["analyze", "act-prob-90p", "--store", str(store), "--out", str(out), "--rate", "0.02"]) == 0
    score = ref.act_prob_90p(ds["hist"].values, tokens)
    assert as_layers(Mask.load(out)) == ref.act_prob_90p_mask(score, 0.02)
    assert Mask.load(out).params["percentile_of"] == "pooled"
    assert main(["analyze", "act-prob-90p", "--store", str(store), "--out", str(out), "--rate", "0.02",
                 "--percentile-of", "own"]) == 0
    score = ref.act_prob_90p(ds["hist"].values, tokens, percentile_of="own")
    assert as_layers(Mask.load(out)) == ref.act_prob_90p_mask(score, 0.02)
    first = str(ds["group"].values[0])  # one language: still the percentile of every harvested group pooled
    assert main(["analyze", "act-prob-90p", "--store", str(store), "--out", str(out), "--rate", "0.02",
                 "--langs", first]) == 0
    score = ref.act_prob_90p(ds["hist"].values, tokens)[:, :, :1]
    assert as_layers(Mask.load(out)) == ref.act_prob_90p_mask(score, 0.02)
    assert main(["analyze", "coverage", "--store", str(store), "--out", str(out), "--k", "0.5"]) == 0
    assert as_layers(Mask.load(out)) == ref.coverage(active, 0.5)
    assert main(["analyze", "localizer", "--store", str(pooled_store), "--out", str(out), "--a", "S", "--b", "N",
                 "--signed", "--top-percent", "5", "--per-layer"]) == 0
    pooled = xr.open_zarr(pooled_store)
    want, _ = ref.localizer(pooled["tokens"].values, pooled["act_sum"].values, pooled["act_sqsum"].values, [0], [1], 5,
                            per_layer=True)
    mask = Mask.load(out)
    assert mask.languages == ["S>N"] and as_layers(mask) == [want]
    assert main(["analyze", "random", "--mask", str(out), "--out", str(tmp_path / "r.npz"), "--seed", "1"]) == 0
    control = Mask.load(tmp_path / "r.npz")
    assert (control.counts() == mask.counts()).all() and not np.intersect1d(control.selected[0], mask.selected[0]).size


def test_local_cluster_gives_the_same_mask(store, tmp_path):
    args = ["analyze", "lape", "--store", str(store), "--top-rate", "0.05"]
    assert main([*args, "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.npz"), "--local-cluster", "2"]) == 0
    assert as_layers(Mask.load(tmp_path / "a.npz")) == as_layers(Mask.load(tmp_path / "b.npz"))


def test_import_published_then_analyze(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "lape"
    src.mkdir()
    for lang in ("en", "fr", "zh"):
        n = int(rng.integers(500, 900))
        torch.save({"n": n, "over_zero": torch.from_numpy(rng.integers(0, n, size=(3, 20)))},
                   src / f"activation.{lang}.train.llama")
    assert main(["import", "--format", "rucaibox", "--src", str(src), "--store", str(tmp_path / "s")]) == 0
    assert main(["analyze", "lape", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "m.npz"),
                 "--top-rate", "0.1"]) == 0
    active, tokens = arrays(tmp_path / "s")
    assert as_layers(Mask.load(tmp_path / "m.npz")) == ref.lape(ref.probabilities(active, tokens), 0.1)[0]


@pytest.mark.parametrize("args,message", [
    (["analyze", "lape", "--langs", "en,xx"], "unknown group 'xx'"),
    (["analyze", "entropy-lambda", "--lambda", "0.1", "--response-only"], "no response groups"),
    (["analyze", "lape", "--top-rate", "2"], "--top-rate must lie in [0, 1]"),
    (["analyze", "localizer", "--a", "en", "--b", "de"], "counts tokens (pooling token), not one sample per"),
    (["analyze", "localizer", "--a", "S", "--b", "N", "pooled"], "no 'act_abssum' statistic"),
])
def test_bad_analysis_input(store, pooled_store, tmp_path, capsys, args, message):
    if args[-1] == "pooled":
        args, store = args[:-1], pooled_store
    assert main([*args, "--store", str(store), "--out", str(tmp_path / "m.npz")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


def test_malformed_mask_files(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main(["mask", "export", str(tmp_path / "bad.npz"), str(tmp_path / "o.pt")]) == 2
    assert "not an lsn mask file" in capsys.readouterr().err
    torch.save([[torch.tensor([0.5])]], tmp_path / "float.pt")
    assert main(["mask", "import", str(tmp_path / "float.pt"), str(tmp_path / "o.npz")]) == 2
    assert "1-d integer tensors" in capsys.readouterr().err


def test_mask_of_another_model_or_shape_is_refused(store, tmp_path, capsys):
    other, residual = tmp_path / "gpt2", tmp_path / "residual"
    assert main(["harvest", *BASE, "--model", "tiny:gpt2", "--corpus", "sample:docs=2,langs=en", "--store",
                 str(other)]) == 0
    assert main(["harvest", *BASE, "--site", "residual", "--corpus", "sample:docs=2,langs=en", "--store",
                 str(residual)]) == 0
    assert main(["analyze", "lape", "--store", str(store), "--out", str(tmp_path / "m.npz"), "--top-rate", "0.05"]) == 0
    capsys.readouterr()
    for target, message in [(other, "was selected on model tiny:llama"), (residual, "the mask is for 3 layers x 128")]:
        assert main(["report", "--mask", str(tmp_path / "m.npz"), "--out", str(tmp_path / "r"),
                     "--store", str(target)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_full_minus_prompt_languages(tmp_path):
    """Imported alignment-study runs: response-only P from full minus prompt; other statistics refused."""
    from analysis.data import open_counts
    from harvester.errors import HarvestError

    rng = np.random.default_rng(1)
    src = tmp_path / "lna"
    src.mkdir()
    full, prompt = {}, {}
    for lang in ("en", "zh"):
        full[lang] = rng.integers(0, 400, size=(2, 6))
        prompt[lang] = rng.integers(0, 300, size=(2, 6))
        torch.save({"total_tokens": 500, "over_zero": torch.from_numpy(full[lang])}, src / f"activation.{lang}.x.pt")
        torch.save({"total_tokens": 320, "over_zero": torch.from_numpy(prompt[lang])},
                   src / f"prefix.activation.{lang}.x.pt")
    assert main(["import", "--format", "lna", "--src", str(src), "--store", str(tmp_path / "s")]) == 0
    counts = open_counts(str(tmp_path / "s"), response_only=True)
    assert counts.names == ["en", "zh"] and counts.subtracted == [True, True]
    want = ref.response_only(np.stack([full["en"], full["zh"]]), [500, 500],
                             np.stack([prompt["en"], prompt["zh"]]), [320, 320])
    np.testing.assert_array_equal(counts.probabilities().compute().transpose(1, 2, 0), want)
    with pytest.raises(HarvestError, match="full-minus-prompt"):
        counts.variable("active")
