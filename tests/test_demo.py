"""The demo chain and its known answer, on the demo model the project trains itself."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.masks import Mask
from lsn.cli import main
from jobs.demo import BOOTSTRAP, demo_path, known_answer


@pytest.mark.ray
@pytest.mark.slow
def test_demo_has_its_known_answer(tmp_path, capsys):
    """Switching off language L's LAPE neurons raises L's perplexity relatively more than any other
    language's for at least 75% of languages, and each random control of the same per-layer size
    raises L's perplexity by less than half as much as L's own neurons do."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--actors", "2", "--no-progress"]) == 0
    assert (demo_path() / "lsn-demo.json").is_file()  # trained once, then cached
    check = known_answer(out / "ppl" / "ppl.csv")
    assert check["diagonal_share"] >= 0.75, check["diagonal"]
    assert check["controls_below_half"], check["below_half"]
    assert json.loads((out / "known_answer.json").read_text())["diagonal_share"] == check["diagonal_share"]
    table = pd.read_csv(out / "ppl" / "ppl.csv", index_col=0)
    assert table.index[0] == "none" and len(table.columns) == 12 and len(table.index) == 1 + 12 + 12
    report = (out / "report.md").read_text()
    assert "![relative PPL change](ppl/ppl_relative.png)" in report and "| random:ko |" in report
    for png in ("ppl/ppl_relative.png", "lape-report/counts.png", "lape-report/overlap_jaccard.png"):
        assert (out / png).stat().st_size > 1000, png
    generated = pd.read_csv(out / "generate" / "generate.csv")
    assert set(generated["intervened"]) == set(table.index)
    assert (out / "lape.pt").is_file()
    assert "random controls under half of that: 12 of 12" in capsys.readouterr().out
    # stability: LAPE over bootstrap resamples of the demo store's shards (several per language)
    mask = Mask.load(out / "lape.npz")
    assert mask.bootstrap.resamples == BOOTSTRAP and min(mask.bootstrap.shards.values()) >= 3
    assert "## Stability: LAPE over bootstrap resamples" in report and "| language | full | stable |" in report
    for png in ("lape-report/stability_frequency.png", "lape-report/stability_layers.png"):
        assert f"]({png})" in report and (out / png).stat().st_size > 1000, png
    assert all(0 <= j <= 1 for j in mask.bootstrap.jaccard.ravel())
