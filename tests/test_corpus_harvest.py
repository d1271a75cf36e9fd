"""Every corpus kind harvested end to end on local fixtures, against plain per-example references.

The references run one plain forward pass per example with their own hooks, slicing and pooling in
NumPy; they share nothing with the package's tokenization, batching, pooling or statistics code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvester.backends.hf import resolve_model
from lsn.cli import main
from harvester.store import read_attrs
from tests import fixtures
from tests.helpers import assert_same_totals

MODEL = "tiny:llama"
BASE = ["--model", MODEL, "--seq-len", "128", "--batch-size", "3", "--shard-tokens", "700", "--no-progress"]


@pytest.fixture(scope="module")
def model():
    path = resolve_model(MODEL)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"ec40": fixtures.write_ec40(root / "ec40", langs=("fr", "zh"), n=6),
            "wiki": fixtures.write_wikipedia(root / "wiki", langs=("de", "ru"), docs=30),
            "instruct": fixtures.write_instruct(root / "instruct.jsonl", langs=("en", "zh"), n=4),
            "stimuli": fixtures.write_stimuli(root / "stimuli.csv", "en", n=6)}


def per_example(model, sequences, site="mlp"):
    """Each sequence's activations ``[L, T, I]`` from a plain forward pass, one sequence at a time."""
    tok, lm = model
    L = lm.config.num_hidden_layers
    captured = {}

    def hook(layer, fn):
        return lambda m, inputs, output: captured.__setitem__(layer, fn(inputs, output)[0].double().numpy())

    handles = []
    for layer in range(L):
        if site == "mlp":
            mlp = lm.model.layers[layer].mlp
            handles.append(mlp.register_forward_hook(hook(layer, lambda i, o, mlp=mlp: mlp.act_fn(mlp.gate_proj(i[0])))))
        else:
            handles.append(lm.model.layers[layer].register_forward_hook(
                hook(layer, lambda i, o: o[0] if isinstance(o, tuple) else o)))
    out = []
    with torch.inference_mode():
        for ids in sequences:
            lm(input_ids=torch.tensor([ids]))
            out.append(np.stack([captured[layer] for layer in range(L)]))
    for h in handles:
        h.remove()
    return out


def enc(model, text):
    return model[0](text, add_special_tokens=False)["input_ids"]


def totals(store):
    ds = xr.open_zarr(store)
    return {str(g): {v: ds[v].sel(group=g).values for v in ds.data_vars} for g in ds["group"].values}


@pytest.fixture(scope="module")
def combined(tmp_path_factory, data):
    """EC40 (three directions), local Wikipedia (capped) and instruction pairs in one harvest, from YAML."""
    root = tmp_path_factory.mktemp("combined")
    config = root / "harvest.yaml"
    config.write_text(yaml.safe_dump({
        "model": MODEL, "store": str(root / "store"), "seq-len": 128, "batch-size": 3, "shard-tokens": 700,
        "corpus": [f"ec40:{data['ec40']}", f"wikipedia:20231101:de,ru:{data['wiki']}", f"instruct:{data['instruct']}"],
        "pairs": "en-fr,fr-en,zh-en", "max-pairs": 5, "max-tokens-per-lang": 900, "actors": 2,
        # the encoding the references below re-implement (lsn's before these options); the defaults are
        # checked against the alignment study's own encoding in test_tokenization.py
        "bos": "none", "eos-per-example": True, "encode": "segments",
    }))
    assert main(["harvest", "--config", str(config), "--no-progress"]) == 0
    return root / "store"


def test_combined_groups_and_token_counts(combined, data, model):
    attrs = read_attrs(combined)
    assert attrs["complete"]
    groups = attrs["meta"]["corpus"]["groups"]
    assert groups == ["en-fr:src", "en-fr:tgt", "fr-en:src", "fr-en:tgt", "zh-en:src", "zh-en:tgt",
                      "de", "ru", "en:prompt", "en:response", "zh:prompt", "zh:response"]
    t = totals(combined)
    en = (data["ec40"] / "EC40-train-set" / "en-fr.en").read_text(encoding="utf-8").splitlines()[:5]
    fr = (data["ec40"] / "EC40-train-set" / "en-fr.fr").read_text(encoding="utf-8").splitlines()[:5]
    n_en, n_fr = sum(len(enc(model, x)) for x in en), sum(len(enc(model, x)) for x in fr)
    # the source side is tokenized the same way in both directions; EOS ends the target side
    assert t["en-fr:src"]["tokens"] == n_en and t["fr-en:tgt"]["tokens"] == n_en + 5
    assert t["fr-en:src"]["tokens"] == n_fr and t["en-fr:tgt"]["tokens"] == n_fr + 5
    assert t["de"]["tokens"] == 900 and t["ru"]["tokens"] == 900  # --max-tokens-per-lang, cut exactly
    assert attrs["meta"]["corpus"]["truncated_tokens"] == 0


def test_direction_and_response_statistics_match_a_plain_forward(combined, data, model):
    """One pass gives per-side and response-only statistics equal to per-example plain forwards."""
    t = totals(combined)
    eos = model[0].eos_token_id
    zh = (data["ec40"] / "EC40-train-set" / "en-zh.zh").read_text(encoding="utf-8").splitlines()[:5]
    en = (data["ec40"] / "EC40-train-set" / "en-zh.en").read_text(encoding="utf-8").splitlines()[:5]
    records = [json.loads(line) for line in data["instruct"].read_text(encoding="utf-8").splitlines() if line.strip()]
    zh_records = [r for r in records if r["lang"] == "zh"]
    cases = {"zh-en": [(enc(model, a), enc(model, b) + [eos]) for a, b in zip(zh, en)],
             "zh:": [(enc(model, r["prompt"]), enc(model, r["response"]) + [eos]) for r in zh_records]}
    for name, pairs in cases.items():
        acts = per_example(model, [a + b for a, b in pairs])
        first = [x[:, :len(a)] for x, (a, _) in zip(acts, pairs)]
        second = [x[:, len(a):] for x, (a, _) in zip(acts, pairs)]
        keys = ("zh-en:src", "zh-en:tgt") if name == "zh-en" else ("zh:prompt", "zh:response")
        for key, parts in zip(keys, (first, second)):
            x = np.concatenate(parts, axis=1)  # [L, T, I]
            assert t[key]["tokens"] == x.shape[1]
            np.testing.assert_array_equal(t[key]["active"], (x > 0).sum(axis=1))
            np.testing.assert_allclose(t[key]["act_sum"], x.sum(axis=1), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(t[key]["act_sqsum"], (x ** 2).sum(axis=1), rtol=1e-4, atol=1e-6)


def test_wikipedia_matches_packed_windows(combined, data, model):
    """Wikipedia is packed like plain text: the capped token stream, cut into seq-len windows."""
    import pyarrow.parquet as pq

    stream = []
    for f in sorted((data["wiki"] / "20231101.ru").glob("*.parquet")):
        for text in pq.read_table(f).column("text").to_pylist():
            if text.strip():
                stream += enc(model, text) + [model[0].eos_token_id]
    stream = stream[:900]
    x = np.concatenate(per_example(model, [stream[i:i + 128] for i in range(0, 900, 128)]), axis=1)
    t = totals(combined)["ru"]
    np.testing.assert_array_equal(t["active"], (x > 0).sum(axis=1))
    np.testing.assert_allclose(t["act_sum"], x.sum(axis=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling,site", [("last", "residual"), ("mean", "mlp")])
def test_pooled_stimuli_are_samples_not_tokens(pooling, site, data, model, tmp_path):
    store = tmp_path / "store"
    assert main(["harvest", *BASE, "--corpus", f"stimuli:{data['stimuli']}", "--store", str(store),
                 "--pooling", pooling, "--site", site, "--no-ray"]) == 0
    rows = data["stimuli"].read_text(encoding="utf-8").splitlines()[1:]
    import csv

    rows = list(csv.DictReader(data["stimuli"].read_text(encoding="utf-8").splitlines()))
    t = totals(store)
    assert list(t) == ["S", "N"]
    for condition in ("S", "N"):
        texts = [r["text"] for r in rows if r["condition"] == condition]
        acts = per_example(model, [enc(model, x) for x in texts], site=site)  # no EOS: the stimulus alone
        pooled = np.stack([x[:, -1] if pooling == "last" else x.mean(axis=1) for x in acts], axis=1)  # [L, n, I]
        got = t[condition]
        assert got["tokens"] == len(texts)
        np.testing.assert_array_equal(got["active"], (pooled > 0).sum(axis=1))
        np.testing.assert_allclose(got["act_sum"], pooled.sum(axis=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["act_abssum"], np.abs(pooled).sum(axis=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["act_sqsum"], (pooled ** 2).sum(axis=1), rtol=1e-4, atol=1e-6)
    attrs = read_attrs(store)
    width = 64 if site == "residual" else 128  # hidden size vs MLP width of the tiny model
    assert attrs["meta"]["model"]["width"] == width and attrs["meta"]["settings"]["pooling"] == pooling


def test_fsspec_url_store_equals_local_path(data, tmp_path):
    args = [*BASE, "--corpus", f"instruct:{data['instruct']}", "--no-ray"]
    assert main(["harvest", *args, "--store", str(tmp_path / "local")]) == 0
    assert main(["harvest", *args, "--store", f"file://{tmp_path / 'url'}"]) == 0
    assert read_attrs(f"file://{tmp_path / 'url'}")["complete"]
    assert_same_totals(tmp_path / "url", tmp_path / "local")
    assert main(["harvest", *args, "--store", f"file://{tmp_path / 'url'}"]) == 0  # resumes: already complete


def test_flags_override_the_config_file(data, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "corpus": "sample:docs=1", "seq-len": 64, "store": "unused"}))
    store = tmp_path / "store"
    assert main(["harvest", "--config", str(config), "--store", str(store), "--corpus", f"stimuli:{data['stimuli']}",
                 "--no-ray", "--no-progress"]) == 0
    attrs = read_attrs(store)
    assert attrs["meta"]["corpus"]["groups"] == ["S", "N"] and attrs["fingerprint"]["settings"]["seq_len"] == 64
    config.write_text(yaml.safe_dump({"model": MODEL, "seq_length": 64}))
    assert main(["harvest", "--config", str(config), "--store", str(tmp_path / "x")]) == 2
    assert "unknown option 'seq_length'" in capsys.readouterr().err
