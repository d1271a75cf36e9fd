"""``--unit gate`` and Mondal et al.'s intervention setup: gate projection statistics written into the
activation's output, against plain hooks written here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvester.backends.hf import resolve_model
from harvester.errors import HarvestError
from harvester.store import read_attrs
from jobs.interventions import hist_quantile
from jobs.ppl import eval_windows
from jobs.rows import make_plan
from lsn.cli import main
from tests.helpers import hand_ppl
from tests.reference import reference_windows

SEQ_LEN = 48
EVAL = "sample:docs=4,langs=fr+ru,seed=9"


def harvest(store, model: str, corpus, unit: str) -> None:
    assert main(["harvest", "--model", model, "--corpus", f"text:{corpus}", "--store", str(store), "--unit", unit,
                 "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--shard-tokens", "500", "--no-ray", "--no-progress",
                 "--stats", "active,sum,sqsum,hist", "--hist-edges=-2:2:40"]) == 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory, text_corpus):
    """tiny:llama at the MLP activation and at the gate, tiny:qwen2 at the gate, and a LAPE mask of the first."""
    root = tmp_path_factory.mktemp("gate")
    out = {"mlp": root / "mlp", "gate": root / "gate", "qwen2": root / "qwen2", "mask": root / "lape.npz"}
    harvest(out["mlp"], "tiny:llama", text_corpus, "mlp")
    harvest(out["gate"], "tiny:llama", text_corpus, "gate")
    harvest(out["qwen2"], "tiny:qwen2", text_corpus, "gate")
    assert main(["analyze", "lape", "--store", str(out["mlp"]), "--out", str(out["mask"]), "--top-rate", "0.1"]) == 0
    return out


def plain_gate_stats(model_name: str, corpus):
    """Per language: tokens, and per [layer, neuron] the count of gate_proj(x) > 0, its sum and sum of squares,
    from one forward pass per window with a hook on each layer's gate_proj."""
    path = resolve_model(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = model.model.layers
    captured = {}
    handles = [layers[k].mlp.gate_proj.register_forward_hook(
        lambda m, i, out, k=k: captured.__setitem__(k, out[0].double().numpy())) for k in range(len(layers))]
    out = {}
    with torch.inference_mode():
        for lang, windows in reference_windows(corpus, AutoTokenizer.from_pretrained(path), SEQ_LEN).items():
            tokens, active, total, squares = 0, 0, 0, 0
            for window in windows:
                model(input_ids=torch.tensor([window]))
                gate = np.stack([captured[k] for k in range(len(layers))])  # [layer, token, neuron]
                tokens += len(window)
                active = active + (gate > 0).sum(1)
                total, squares = total + gate.sum(1), squares + (gate ** 2).sum(1)
            out[lang] = tokens, active, total, squares
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("key, model", [("gate", "tiny:llama"), ("qwen2", "tiny:qwen2")])
def test_gate_store_equals_plain_hooks_on_gate_proj(stores, text_corpus, key, model):
    attrs = read_attrs(stores[key])
    assert (attrs.model.unit, attrs.model.site) == ("gate", "model.layers.{layer}.mlp.gate_proj")
    ds = xr.open_zarr(stores[key])
    for lang, (tokens, active, total, squares) in plain_gate_stats(model, text_corpus).items():
        sel = ds.sel(group=lang)
        assert int(sel["tokens"]) == tokens
        np.testing.assert_array_equal(sel["active"].values, active)
        np.testing.assert_allclose(sel["act_sum"].values, total, rtol=0, atol=1e-4 * np.abs(total).max())
        np.testing.assert_allclose(sel["act_sqsum"].values, squares, rtol=1e-5)
    mlp = xr.open_zarr(stores["mlp"])
    assert key != "gate" or not np.allclose(mlp["act_sum"].values, ds["act_sum"].values)  # another quantity


@pytest.mark.parametrize("mode", ["mean", "p90"])
def test_values_from_a_gate_store_written_into_act_fn_reproduce_mondal(stores, tmp_path, mode):
    out = tmp_path / "ppl"
    assert main(["intervene", "ppl", "--model", "tiny:llama", "--mask", str(stores["mask"]), "--mode", mode,
                 "--values-from", str(stores["gate"]), "--corpus", EVAL, "--seq-len", "48", "--controls", "0",
                 "--langs", "fr,ru", "--no-ray", "--no-progress"] + ["--out", str(out)]) == 0
    settings = json.loads((out / "ppl.json").read_text())["settings"]
    assert settings["site"] == "model.layers.{layer}.mlp.act_fn" and settings["values_from"] == str(stores["gate"])
    got = pd.read_csv(out / "ppl.csv", index_col=0)
    gate = xr.open_zarr(stores["gate"])
    if mode == "mean":  # by hand: the language's gate_proj sum over its tokens
        values = {lang: (gate["act_sum"].sel(group=lang) / gate["tokens"].sel(group=lang)).values for lang in ("fr", "ru")}
    else:
        edges = gate["hist_lo"].values[1:]
        values = {lang: hist_quantile(gate["hist"].sel(group=lang).values, edges, 90) for lang in ("fr", "ru")}
    groups, windows = eval_windows("tiny:llama", [EVAL], 48, None)
    expected = hand_ppl(stores["mask"], values, windows, groups)
    for lang in ("fr", "ru"):
        np.testing.assert_allclose(got.loc[lang, groups].values, expected[lang], rtol=1e-4)


def test_values_from_is_refused_when_stores_mix_models_or_modes(stores):
    plan = ("tiny:llama", str(stores["mask"]), None, str(stores["mlp"]))
    with pytest.raises(HarvestError, match="harvested on model tiny:qwen2.*must come from one model"):
        make_plan(*plan, "mean", 0, 0, values_from=str(stores["qwen2"]))
    with pytest.raises(HarvestError, match="--values-from gives the values of --mode mean"):
        make_plan(*plan, "zero", 0, 0, values_from=str(stores["gate"]))
    with pytest.raises(HarvestError, match="--unit mlp statistics, which cannot be written into --unit gate"):
        make_plan("tiny:llama", str(stores["mask"]), None, str(stores["gate"]), "mean", 0, 0,
                  values_from=str(stores["mlp"]))
    same = make_plan(*plan, "mean", 0, 0, values_from=str(stores["gate"]))
    gate = xr.open_zarr(stores["gate"])
    lang = same.mask.languages[0]
    np.testing.assert_allclose(same.values[lang], (gate["act_sum"] / gate["tokens"]).sel(group=lang).values)
