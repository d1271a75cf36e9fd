"""What people read and what masks find: a mask's store from any directory, the PPL table, the
PNGs beside their CSVs, legible many-label plots. Through the real CLI, on real tiny stores."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from analysis.masks import Mask
from lsn.cli import main

BASE = ["--model", "tiny:llama", "--seq-len", "64", "--shard-tokens", "512", "--no-ray", "--no-progress"]
PPL = ["intervene", "ppl", "--model", "tiny:llama", "--corpus", "sample:docs=3,seed=7,langs=en,de", "--seq-len", "64",
       "--controls", "0", "--no-ray", "--no-progress"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A residual-site store and its LAPE mask, both made with relative paths from ``root/work``."""
    root = tmp_path_factory.mktemp("where")
    (root / "work").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "work")
        assert main(["harvest", *BASE, "--corpus", "sample:docs=6,langs=en,de", "--store", "store",
                     "--site", "residual", "--stats", "active,sum,sqsum"]) == 0
        assert main(["analyze", "lape", "--store", "store", "--out", "lape.npz", "--top-rate", "0.1"]) == 0
    return root


def test_a_mask_records_its_store_absolute_and_finds_it_from_elsewhere(made, tmp_path, monkeypatch, capsys):
    mask = Mask.load(made / "work" / "lape.npz")
    assert mask.source["store"] == str(made / "work" / "store") and mask.source["site"] == "model.layers.{layer}"
    assert len(mask.source["fingerprint_sha256"]) == 64
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([*PPL, "--mask", str(made / "work" / "lape.npz"), "--out", "ppl", "--mode", "mean"]) == 0
    settings = json.loads((tmp_path / "ppl" / "ppl.json").read_text())["settings"]
    assert settings["site"] == "model.layers.{layer}" and settings["store"] == str(made / "work" / "store")


def test_a_moved_store_is_found_with_store(made, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(made / "work" / "store", tmp_path / "old" / "store")
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "lape", "--store", "old/store", "--out", "old/lape.npz", "--top-rate", "0.1"]) == 0
    moved = tmp_path / "moved"
    (tmp_path / "old" / "store").rename(moved)
    mask = str(tmp_path / "old" / "lape.npz")
    capsys.readouterr()
    assert main([*PPL, "--mask", mask, "--out", "a", "--mode", "mean"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mode mean needs the store the mask was made from" in err
    assert f"{tmp_path / 'old' / 'store'} is not there; pass --store" in err and not (tmp_path / "a").exists()
    # zero needs no statistics: the mask's recorded site is used, and the note says how to check the store
    assert main([*PPL, "--mask", mask, "--out", "b"]) == 0
    assert "pass --store with where it is now; intervening at the site the mask records" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "ppl.json").read_text())["settings"]["site"] == "model.layers.{layer}"
    assert main([*PPL, "--mask", mask, "--out", "c", "--mode", "mean", "--store", str(moved)]) == 0
    assert "lsn:" not in capsys.readouterr().err


def test_another_harvest_is_named(made, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["harvest", *BASE, "--corpus", "sample:docs=5,langs=en,de", "--store", "other",
                 "--site", "residual", "--stats", "active,sum,sqsum"]) == 0
    capsys.readouterr()
    mask = Mask.load(made / "work" / "lape.npz")
    assert main([*PPL, "--mask", str(made / "work" / "lape.npz"), "--out", "a", "--mode", "mean",
                 "--store", "other"]) == 0
    err = capsys.readouterr().err
    assert "store other holds another harvest (fingerprint sha256 " in err
    assert f"than the mask's store {made / 'work' / 'store'} ({mask.source['fingerprint_sha256'][:12]})" in err
    # the recorded path now holding another harvest is refused, naming both digests and --store
    stale = Mask(mask.languages, mask.n_layers, mask.width, mask.selected, mask.method, mask.params,
                 {**mask.source, "store": str(tmp_path / "other")})
    stale.save(tmp_path / "stale.npz")
    assert main([*PPL, "--mask", "stale.npz", "--out", "b"]) == 2
    err = capsys.readouterr().err
    assert "holds another harvest (fingerprint sha256" in err and mask.source["fingerprint_sha256"][:12] in err
    assert "pass --store with the mask's store" in err and not (tmp_path / "b").exists()


def test_an_older_mask_with_a_relative_store(made, tmp_path, monkeypatch, capsys):
    """Masks made before stores were recorded absolute (and before the site was recorded) work from
    the directory they were made in; elsewhere the error names --store, not 'another model'."""
    mask = Mask.load(made / "work" / "lape.npz")
    source = {k: v for k, v in mask.source.items() if k != "site"} | {"store": "store"}
    old = made / "work" / "old.npz"
    Mask(mask.languages, mask.n_layers, mask.width, mask.selected, mask.method, mask.params, source).save(old)
    monkeypatch.chdir(made / "work")
    assert main([*PPL, "--mask", "old.npz", "--out", str(tmp_path / "here")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([*PPL, "--mask", str(old), "--out", "there"]) == 2
    err = capsys.readouterr().err
    assert f"the mask's store store (a relative path, read from {tmp_path}) is not there; pass --store" in err
    assert "another model" not in err
    assert main([*PPL, "--mask", str(old), "--out", "there", "--store", str(made / "work" / "store")]) == 0


# -- what people read ----------------------------------------------------------------------------
def test_the_ppl_table_names_its_quantity_and_aligns(made, tmp_path, capsys):
    """Stdout: the PPL without intervention, then the relative change in %, equal to ppl_relative.csv,
    columns aligned with a 40-character language name; every PNG has the CSV of its name."""
    import pandas as pd

    mask = Mask.load(made / "work" / "lape.npz")
    long = "a-language-name-of-forty-characters-long"
    renamed = Mask([long, "de"], mask.n_layers, mask.width, mask.selected, mask.method, mask.params, mask.source)
    renamed.save(tmp_path / "long.npz")
    capsys.readouterr()
    assert main([*PPL, "--mask", str(tmp_path / "long.npz"), "--out", str(tmp_path / "ppl"), "--controls", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PPL without intervention (none), then the relative PPL change")
    assert "(PPL - PPL none) / PPL none in % (ppl_relative.csv x 100)" in lines[0]
    table = lines[1:7]
    assert table[0].split() == ["intervened", "\\", "evaluated", "en", "de"] and lines[7].startswith("wrote ")
    assert [t.split()[0] for t in table[1:]] == ["none", long, "de", f"random:{long}", "random:de"]
    ends = {tuple(m.end() for m in re.finditer(r"\S+", t))[-2:] for t in table}
    assert len(ends) == 1  # both columns end at the same character on every line
    relative = pd.read_csv(tmp_path / "ppl" / "ppl_relative.csv", index_col=0)
    printed = [[float(v.rstrip("%")) for v in t.split()[-2:]] for t in table[2:]]
    np.testing.assert_allclose(printed, 100 * relative.values[1:], atol=0.006)
    ppl = pd.read_csv(tmp_path / "ppl" / "ppl.csv", index_col=0)
    np.testing.assert_allclose([float(v) for v in table[1].split()[-2:]], ppl.values[0], rtol=1e-3)
    written = {p.name for p in (tmp_path / "ppl").iterdir()}
    pngs = [n for n in written if n.endswith(".png")]
    assert pngs == ["ppl_relative.png"] and all(n[:-4] + ".csv" in written for n in pngs)
    # the PNG is the heatmap of its CSV, not of another quantity (the PPXC of ppl_change.csv)
    from PIL import Image

    from jobs.ppl import plot_relative

    def pixels(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    for name in ("ppl_relative", "ppl_change"):
        plot_relative(pd.read_csv(tmp_path / "ppl" / f"{name}.csv", index_col=0), tmp_path / f"{name}.png", "zero")
    assert (pixels(tmp_path / "ppl" / "ppl_relative.png") == pixels(tmp_path / "ppl_relative.png")).all()
    assert (pixels(tmp_path / "ppl" / "ppl_relative.png") != pixels(tmp_path / "ppl_change.png")).any()


def eighty_language_mask(tmp_path) -> str:
    rng = np.random.default_rng(0)
    n_layers, width = 80, 64
    selected = [np.sort(rng.choice(n_layers * width, size=40, replace=False)) for _ in range(80)]
    langs = [f"xx{k:02d}-en:src" for k in range(80)]
    return str(Mask(langs, n_layers, width, selected, "lape").save(tmp_path / "m80.npz"))


def test_eighty_labels_stay_legible(tmp_path, capsys):
    """An 80-language report: every tick label is drawn at 8 pt (11 pixels at the PNG's 100 dpi) and no
    two neighbouring labels overlap; the PNG written by lsn report is that figure."""
    from PIL import Image

    from analysis.report import heatmap_figure, jaccard, overlap

    path = eighty_language_mask(tmp_path)
    assert main(["report", "--mask", path, "--out", str(tmp_path / "r")]) == 0
    mask = Mask.load(path)
    fig = heatmap_figure(jaccard(overlap(mask)), mask.languages, mask.languages, "t", "language", "language", "J")
    fig.draw_without_rendering()
    ax = fig.axes[0]
    for labels, along in ((ax.get_xticklabels(), 0), (ax.get_yticklabels(), 1)):
        assert len(labels) == 80
        assert min(t.get_fontsize() * fig.dpi / 72 for t in labels) >= 11
        boxes = sorted((b.get_points()[:, along] for b in (t.get_window_extent() for t in labels)),
                       key=lambda p: p[0])
        assert min(b[1] - b[0] for b in boxes) >= 10  # the text's own height, in pixels
        assert all(a[1] <= b[0] for a, b in zip(boxes, boxes[1:]))  # no overlap
    with Image.open(tmp_path / "r" / "overlap_jaccard.png") as png:
        assert png.size == tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    with Image.open(tmp_path / "r" / "counts.png") as png:
        assert png.size[1] >= 80 * 12  # 80 language rows of at least 12 pixels


def test_one_language_has_no_overlap_plot(tmp_path, capsys):
    path = Mask(["en"], 2, 8, [np.array([1, 9])], "lape").save(tmp_path / "one.npz")
    assert main(["report", "--mask", str(path), "--out", str(tmp_path / "r")]) == 0
    assert "lsn: one language (en): no overlap plot" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["counts.png"]
