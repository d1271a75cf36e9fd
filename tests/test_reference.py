"""The statistics in the store equal a plain reference harvest, through the CLI and the store."""

import numpy as np
import pytest
import xarray as xr

from harvester.backends.hf import resolve_model
from lsn.cli import main
from tests.reference import reference_stats

SEQ_LEN = 48
SUM_RTOL = 1e-5  # worst-case float32 summation error for <= 192 tokens per pass


def check_against_reference(store, model, corpus_dir):
    tokens, active, act_sum, act_sqsum, abs_sum = reference_stats(resolve_model(model), corpus_dir, SEQ_LEN)
    ds = xr.open_zarr(store)
    assert list(ds["group"].values) == sorted(tokens)
    for lang in tokens:
        sel = ds.sel(group=lang)
        assert int(sel["tokens"]) == tokens[lang]
        np.testing.assert_array_equal(sel["active"].values, active[lang])
        # float32 within a forward pass: the error bound scales with the sum of |x|, not with the sum
        assert np.all(np.abs(sel["act_sum"].values - act_sum[lang]) <= SUM_RTOL * abs_sum[lang])
        np.testing.assert_allclose(sel["act_sqsum"].values, act_sqsum[lang], rtol=SUM_RTOL)


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_cli_store_matches_reference(model, text_corpus, tmp_path):
    store = tmp_path / "store"
    rc = main(["harvest", "--model", model, "--corpus", f"text:{text_corpus}", "--store", str(store),
               "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--shard-tokens", "500", "--no-ray", "--no-progress"])
    assert rc == 0
    check_against_reference(store, model, text_corpus)


@pytest.mark.ray
def test_ray_actors_match_reference(text_corpus, tmp_path):
    store = tmp_path / "store"
    rc = main(["harvest", "--model", "tiny:llama", "--corpus", f"text:{text_corpus}", "--store", str(store),
               "--seq-len", str(SEQ_LEN), "--batch-size", "3", "--shard-tokens", "400", "--actors", "2",
               "--no-progress"])
    assert rc == 0
    check_against_reference(store, "tiny:llama", text_corpus)
