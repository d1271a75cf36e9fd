"""Languages by default: the response groups of prompt/response stores, EC40's languages and
directions pooled exactly (--by), one separator across specs and flags, and lsn import in the
study's own order. Through the real CLI, on real tiny stores."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analysis.masks import Mask
from lsn.cli import main
from tests import fixtures
from tests import method_reference as ref

BASE = ["--model", "tiny:llama", "--seq-len", "64", "--shard-tokens", "512", "--no-ray", "--no-progress"]


@pytest.fixture(scope="module")
def ec40(tmp_path_factory):
    root = tmp_path_factory.mktemp("ec40")
    data = fixtures.write_ec40(root / "EC40", langs=("fr", "ru"), n=8)
    assert main(["harvest", *BASE, "--corpus", f"ec40:{data}", "--store", str(root / "store")]) == 0
    return root / "store"


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    data = fixtures.write_instruct(root / "i.jsonl", langs=("en", "de", "zh"), n=4)
    assert main(["harvest", *BASE, "--corpus", f"instruct:{data}", "--store", str(root / "store")]) == 0
    return root / "store"


def lape(store, out, *flags) -> Mask:
    assert main(["analyze", "lape", "--store", str(store), "--out", str(out), "--top-rate", "0.1", *flags]) == 0
    return Mask.load(out)


def pooled_reference(store, pools: dict[str, list[str]]):
    """LAPE of the plain sums of the store's groups (numpy), the oracle for pooling."""
    ds = xr.open_zarr(store)
    active = np.stack([ds["active"].sel(group=g).values.sum(0) for g in pools.values()])
    tokens = np.array([ds["tokens"].sel(group=g).values.sum() for g in pools.values()])
    return ref.lape(ref.probabilities(active, tokens), top_rate=0.1)[0]


def as_layers(mask: Mask):
    return [[idx.tolist() for idx in mask.layers(k)] for k in range(len(mask.languages))]


def test_ec40_defaults_to_its_languages_pooled_exactly(ec40, tmp_path, capsys):
    capsys.readouterr()
    mask = lape(ec40, tmp_path / "lang.npz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "languages: the 3 languages of the EC40 sides, each pooling its sides" in err
    pools = {"en": ["en-fr:src", "fr-en:tgt", "en-ru:src", "ru-en:tgt"], "fr": ["en-fr:tgt", "fr-en:src"],
             "ru": ["en-ru:tgt", "ru-en:src"]}
    assert mask.languages == ["en", "fr", "ru"]
    assert [sorted(g) for g in mask.source["groups"]] == [sorted(g) for g in pools.values()]
    assert as_layers(mask) == pooled_reference(ec40, pools)
    # the same as naming the sums by hand, and --langs chooses among --by's languages
    by_hand = lape(ec40, tmp_path / "hand.npz", "--langs", ",".join(f"{k}={'+'.join(v)}" for k, v in pools.items()))
    assert as_layers(by_hand) == as_layers(mask)
    two = lape(ec40, tmp_path / "two.npz", "--by", "language", "--langs", "ru,fr")
    assert two.languages == ["ru", "fr"] and "languages:" not in capsys.readouterr().err


def test_ec40_by_direction_and_by_group(ec40, tmp_path, capsys):
    mask = lape(ec40, tmp_path / "dir.npz", "--by", "direction")
    pools = {d: [f"{d}:src", f"{d}:tgt"] for d in ("en-fr", "fr-en", "en-ru", "ru-en")}
    assert mask.languages == list(pools) and as_layers(mask) == pooled_reference(ec40, pools)
    groups = lape(ec40, tmp_path / "groups.npz", "--by", "group")
    assert groups.languages == [g for v in pools.values() for g in v]
    assert main(["analyze", "lape", "--store", str(ec40), "--out", str(tmp_path / "x.npz"), "--by", "direction",
                 "--langs", "en-de"]) == 2
    assert "--by direction has no language 'en-de'; it has en-fr, fr-en, en-ru, ru-en" in capsys.readouterr().err


def test_instruct_defaults_to_its_response_groups(instruct, tmp_path, capsys):
    capsys.readouterr()
    mask = lape(instruct, tmp_path / "resp.npz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "languages: the response groups of this store (en, de, zh)" in err
    assert mask.languages == ["en", "de", "zh"] and mask.source["groups"] == [["en:response"], ["de:response"],
                                                                              ["zh:response"]]
    assert as_layers(mask) == as_layers(lape(instruct, tmp_path / "ro.npz", "--response-only"))
    prompts = lape(instruct, tmp_path / "prompt.npz", "--langs", "en:prompt,de:prompt")
    assert prompts.languages == ["en:prompt", "de:prompt"]
    assert main(["analyze", "lape", "--store", str(instruct), "--out", str(tmp_path / "d.npz"), "--by", "direction"]) == 2
    assert "--by direction needs a store of translation directions" in capsys.readouterr().err


def test_one_separator_and_hints(ec40, tmp_path, capsys):
    from harvester.corpus import parse_corpus

    assert parse_corpus("sample:docs=2,langs=en,de,ru,seed=3").groups == ["en", "de", "ru"]
    assert parse_corpus("sample:langs=en+de,docs=2").groups == ["en", "de"]  # the older form is still read
    assert main(["analyze", "lape", "--store", str(ec40), "--out", str(tmp_path / "x.npz"),
                 "--langs", "en-fr:src+fr-en:tgt"]) == 2
    err = capsys.readouterr().err
    assert "separate languages with commas (--langs en-fr:src,fr-en:tgt), or name a sum of groups" in err
    for corpus, extra, said in (("wikipedia:20231101:de+fr", [], "wikipedia languages are separated by commas"),
                                (f"ec40:{tmp_path}", ["--pairs", "en-fr+fr-en"], "EC40 directions are separated")):
        assert main(["harvest", *BASE, "--corpus", corpus, *extra, "--store", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_import_keeps_the_studys_language_order(tmp_path, capsys):
    import torch

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for lang in ("ja", "zh", "xx", "en", "vi"):  # LAPE's order: en, zh, fr, es, vi, id, ja
        torch.save({"n": 50, "over_zero": torch.from_numpy(rng.integers(0, 50, (2, 4)))},
                   src / f"activation.{lang}.train.llama")
    assert main(["import", "--format", "rucaibox", "--src", str(src), "--store", str(tmp_path / "s")]) == 0
    assert "languages in the study's order: en, zh, vi, ja, xx" in capsys.readouterr().err
    assert list(xr.open_zarr(tmp_path / "s")["group"].values) == ["en", "zh", "vi", "ja", "xx"]
