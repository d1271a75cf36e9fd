"""What people read and what masks find: a mask's store from any directory, the PPL table, the
PNGs beside their CSVs, legible many-label plots. Through the real CLI, on real tiny stores."""

from __future__ import annotations

import json

import pytest

from analysis.masks import Mask
from harvester.cli import main

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
