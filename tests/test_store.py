"""The store contract: xarray layout, metadata without secrets, compression, refusal without change."""

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from lsn.cli import main
from harvester.stats import parse_edges
from tests.helpers import tree_digest

ARGS = ["--seq-len", "40", "--batch-size", "4", "--shard-tokens", "300", "--no-ray", "--no-progress"]


def harvest(store, corpus, *extra, model="tiny:llama"):
    return main(["harvest", "--model", model, "--corpus", corpus, "--store", str(store), *ARGS, *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory, text_corpus):
    path = tmp_path_factory.mktemp("store") / "s"
    assert harvest(path, f"text:{text_corpus}", "--stats", "active,sum,sqsum,hist") == 0
    return path


def test_xarray_layout(store):
    ds = xr.open_zarr(store)
    assert list(ds["group"].values) == ["fr", "ru", "zh"]
    assert ds["tokens"].dims == ("group",)
    for var in ("active", "act_sum", "act_sqsum"):
        assert ds[var].dims == ("group", "layer", "neuron")
    assert ds["active"].dtype == np.int64 and ds["act_sum"].dtype == np.float64
    assert ds.sizes["layer"] == 3 and ds.sizes["neuron"] == 128
    assert ds["hist"].dims == ("group", "layer", "neuron", "bin")
    edges = np.array(parse_edges("-1:4:100"))
    np.testing.assert_array_equal(ds["hist_lo"].values[1:], edges)
    np.testing.assert_array_equal(ds["hist_hi"].values[:-1], edges)


def test_histogram_agrees_with_counts(store):
    ds = xr.open_zarr(store)
    hist = ds["hist"].values
    tokens = ds["tokens"].values
    assert (hist.sum(axis=-1) == tokens[:, None, None]).all()
    # no SiLU output is exactly 0 here, so the bins at or above 0 hold exactly the active tokens
    above = hist[..., ds["hist_lo"].values >= 0].sum(axis=-1)
    np.testing.assert_array_equal(above, ds["active"].values)


def test_metadata_records_the_harvest(store):
    attrs = zarr.open_group(str(store), mode="r").attrs["lsn"]
    meta = attrs["meta"]
    assert attrs["complete"] is True
    assert meta["model"]["architecture"] == "llama" and meta["model"]["layers"] == 3
    assert meta["model"]["width"] == 128 and meta["model"]["dtype"] == "float32"
    assert meta["model"]["weights"].startswith("sha256-full:") and len(meta["model"]["weights"]) == 12 + 64
    assert meta["tokenizer"]["vocab_size"] == 1024 and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["corpus"]["groups"] == ["fr", "ru", "zh"]
    assert sum(meta["corpus"]["tokens_per_group"]) == int(xr.open_zarr(store)["tokens"].sum())
    assert meta["settings"]["seq_len"] == 40 and meta["settings"]["stats"] == ["active", "sum", "sqsum", "hist"]
    assert meta["versions"]["lsn-harvester"]


def test_no_secret_in_metadata(tmp_path, text_corpus, monkeypatch):
    secret = "hf_SECRETTOKEN1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    assert harvest(tmp_path / "s", f"text:{text_corpus}") == 0
    for file in (tmp_path / "s").rglob("zarr.json"):
        assert secret not in file.read_text()


def test_chunks_are_compressed(store):
    root = zarr.open_group(str(store), mode="r")
    for name in ("active", "act_sum", "shards/active", "shards/act_sum"):
        codecs = json.loads((store / name / "zarr.json").read_text())["codecs"]
        assert any(c["name"] in ("zstd", "blosc", "gzip") for c in codecs), name
    assert root.attrs["lsn"]["meta"]["corpus"]["shards"] == len(list((store / "shards" / "done" / "c").iterdir()))


@pytest.mark.parametrize("change", [
    ["--seq-len", "41"], ["--model", "tiny:gpt2"], ["--stats", "active"], ["--corpus", "sample:docs=2"],
    ["--batch-size", "2"],
])
def test_different_harvest_is_refused_and_store_unchanged(store, text_corpus, change, capsys):
    before = tree_digest(store)
    args = {"--model": "tiny:llama", "--corpus": f"text:{text_corpus}", "--seq-len": "40", "--batch-size": "4",
            "--stats": "active,sum,sqsum,hist"}
    args.update(dict(zip(change[::2], change[1::2])))
    flat = [x for kv in args.items() for x in kv]
    rc = main(["harvest", "--store", str(store), *flat, "--shard-tokens", "300", "--no-ray", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds a different harvest" in err and len(err.strip().splitlines()) == 1
    assert tree_digest(store) == before


def test_rerun_of_complete_store_changes_nothing(store, text_corpus):
    before = tree_digest(store)
    assert harvest(store, f"text:{text_corpus}", "--stats", "active,sum,sqsum,hist") == 0
    assert tree_digest(store) == before
