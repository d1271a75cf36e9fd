"""Interventions on a ``--unit down-input`` mask (the aya preset's harvest): the units are the down
projection's input, changed by a forward pre-hook, against a hook written here (was refused as "a mask
from another model": the jobs hooked the projection's output, of the hidden size)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from analysis.masks import Mask
from jobs.ppl import eval_windows
from lsn.cli import main
from tests.helpers import hand_ppl

EVAL = "sample:docs=4,langs=fr+ru,seed=9"


@pytest.fixture(scope="module")
def down_input(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("down")
    assert main(["harvest", "--model", "tiny:llama", "--corpus", f"text:{text_corpus}", "--store", str(root / "s"),
                 "--unit", "down-input", "--stats", "active,nonzero,sum", "--seq-len", "48", "--no-ray",
                 "--no-progress"]) == 0
    assert main(["analyze", "lape", "--store", str(root / "s"), "--out", str(root / "m.npz"), "--top-rate", "0.05"]) == 0
    assert Mask.load(root / "m.npz").source["unit"] == "down-input"
    return root


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_intervening_on_down_projection_inputs(down_input, tmp_path, mode):
    out = tmp_path / "ppl"
    assert main(["intervene", "ppl", "--model", "tiny:llama", "--mask", str(down_input / "m.npz"), "--mode", mode,
                 "--corpus", EVAL, "--seq-len", "48", "--controls", "0", "--no-ray", "--no-progress",
                 "--out", str(out)]) == 0
    got = pd.read_csv(out / "ppl.csv", index_col=0)
    mask = Mask.load(down_input / "m.npz")
    values = None
    if mode == "mean":
        ds = xr.open_zarr(down_input / "s")
        values = {lang: (ds["act_sum"].sel(group=lang) / ds["tokens"].sel(group=lang)).values for lang in mask.languages}
    groups, windows = eval_windows("tiny:llama", [EVAL], 48, None)
    expected = hand_ppl(down_input / "m.npz", values, windows, groups, pre=True, module="down_proj")
    assert any(len(sel) for sel in mask.selected)
    for lang in mask.languages:
        if len(mask.selected[mask.index(lang)]):
            np.testing.assert_allclose(got.loc[lang, groups].values, expected[lang], rtol=1e-4)


def test_mean_others_sets_the_other_languages_mean(down_input, tmp_path, capsys):
    """``--mode mean-others`` (DLN's selectivity experiment): a language's units become the unweighted mean
    of the other mask languages' means, here at the down projection's input; against the hand hook."""
    out = tmp_path / "ppl"
    assert main(["intervene", "ppl", "--model", "tiny:llama", "--mask", str(down_input / "m.npz"), "--mode",
                 "mean-others", "--corpus", EVAL, "--seq-len", "48", "--controls", "0", "--no-ray",
                 "--no-progress", "--out", str(out)]) == 0
    got = pd.read_csv(out / "ppl.csv", index_col=0)
    mask = Mask.load(down_input / "m.npz")
    ds = xr.open_zarr(down_input / "s")
    means = {lang: (ds["act_sum"].sel(group=lang) / ds["tokens"].sel(group=lang)).values for lang in mask.languages}
    values = {lang: sum(means[o] for o in mask.languages if o != lang) / (len(mask.languages) - 1)
              for lang in mask.languages}
    groups, windows = eval_windows("tiny:llama", [EVAL], 48, None)
    expected = hand_ppl(down_input / "m.npz", values, windows, groups, pre=True, module="down_proj")
    for lang in mask.languages:
        if len(mask.selected[mask.index(lang)]):
            np.testing.assert_allclose(got.loc[lang, groups].values, expected[lang], rtol=1e-4)
    one = tmp_path / "one.npz"
    assert main(["analyze", "lape", "--store", str(down_input / "s"), "--out", str(one), "--langs",
                 mask.languages[0]]) == 0
    capsys.readouterr()
    assert main(["intervene", "ppl", "--model", "tiny:llama", "--mask", str(one), "--mode", "mean-others",
                 "--corpus", EVAL, "--no-ray", "--no-progress", "--out", str(tmp_path / "x")]) == 2
    assert "--mode mean-others needs a mask of two languages or more" in capsys.readouterr().err
