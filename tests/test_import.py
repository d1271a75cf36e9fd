"""Importing published activation counts (LAPE / alignment-study files) into a store."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from analysis.importers import import_published
from harvester.errors import HarvestError
from harvester.store import read_attrs
from harvester.summary import summarize
from tests.helpers import tree_digest

L, I = 3, 5
LANGS = ["zh", "en", "fr"]
LAPE_ORDER = ["en", "zh", "fr"]  # the order of LAPE's released masks: en, zh, fr, es, vi, id, ja


class Opaque:
    """Any class outside torch's allow-list: a file holding one must not be unpickled."""


def counts(seed: int, n: int | None = None) -> tuple[int, torch.Tensor]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 500)) if n is None else n
    return n, torch.from_numpy(rng.integers(0, n + 1, size=(L, I))).to(torch.int32)


def write_rucaibox(directory: Path, langs=LANGS, tag="llama-7b") -> dict[str, tuple[int, torch.Tensor]]:
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for k, lang in enumerate(langs):
        data[lang] = counts(k)
        torch.save({"n": data[lang][0], "over_zero": data[lang][1]}, directory / f"activation.{lang}.train.{tag}")
    return data


def write_lna(directory: Path, langs=LANGS, tag="qwen") -> dict[str, tuple[int, torch.Tensor]]:
    """Full-sequence and prompt-only counts, keyed ``{lang}:full`` / ``{lang}:prompt``."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for k, lang in enumerate(langs):
        for part, name in (("full", f"activation.{lang}.{tag}.pt"), ("prompt", f"prefix.activation.{lang}.{tag}.pt")):
            n, over_zero = counts(10 * k + (part == "prompt"))
            data[f"{lang}:{part}"] = (n, over_zero.long())
            torch.save({"total_tokens": n, "over_zero": over_zero.long()}, directory / name)
    return data


def assert_store_holds(store: Path, expected: dict[str, tuple[int, torch.Tensor]], groups: list[str]) -> None:
    ds = xr.open_zarr(store)
    assert [str(g) for g in ds["group"].values] == groups
    assert ds["tokens"].dtype == np.int64 and ds["active"].dtype == np.int64
    np.testing.assert_array_equal(ds["tokens"].values, [expected[g][0] for g in groups])
    np.testing.assert_array_equal(ds["active"].values, np.stack([expected[g][1].numpy() for g in groups]))
    assert set(ds.data_vars) == {"tokens", "active"}


def test_rucaibox_import_is_exact_and_in_lapes_order_by_default(tmp_path):
    data = write_rucaibox(tmp_path / "src")
    store = import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    assert store.complete and store.groups == LAPE_ORDER
    assert_store_holds(tmp_path / "store", data, LAPE_ORDER)
    attrs = read_attrs(tmp_path / "store")
    meta = attrs["meta"]
    assert meta["imported"]["format"] == "rucaibox" and meta["imported"]["tag"] == "llama-7b"
    assert [f["file"] for f in meta["imported"]["files"]] == [f"activation.{g}.train.llama-7b" for g in LAPE_ORDER]
    assert all(len(f["sha256"]) == 64 for f in attrs["fingerprint"]["corpus"]["source"])
    assert meta["corpus"]["tokens_per_group"] == [data[g][0] for g in LAPE_ORDER]
    assert attrs["fingerprint"]["model"]["id"] is None and meta["model"]["layers"] == L and meta["model"]["width"] == I
    assert attrs["fingerprint"]["settings"]["stats"] == ["active"]
    assert meta["corpus"]["spec"] == f"import:rucaibox:{tmp_path / 'src'}"


def test_langs_choose_and_order_the_groups(tmp_path):
    data = write_rucaibox(tmp_path / "src")
    import_published("rucaibox", tmp_path / "src", tmp_path / "store", langs=["fr", "zh"])
    assert_store_holds(tmp_path / "store", data, ["fr", "zh"])


def test_lna_import_stores_full_and_prompt_groups(tmp_path):
    data = write_lna(tmp_path / "src")
    import_published("lna", tmp_path / "src", tmp_path / "store", langs=["en", "zh"])
    assert_store_holds(tmp_path / "store", data, ["en:full", "en:prompt", "zh:full", "zh:prompt"])
    files = read_attrs(tmp_path / "store")["meta"]["imported"]["files"]
    assert [f["file"] for f in files[:2]] == ["activation.en.qwen.pt", "prefix.activation.en.qwen.pt"]


def test_summary_reads_an_imported_store(tmp_path):
    data = write_rucaibox(tmp_path / "src")
    import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    lines = summarize(str(tmp_path / "store")).splitlines()
    row = next(line for line in lines if line.startswith("en "))
    n, over_zero = data["en"]
    assert f"{n:>10}{(over_zero.numpy() / n).mean():>11.4f}" in row
    assert lines[-1].split() == ["total", str(sum(t for t, _ in data.values()))]


def test_tag_is_found_or_must_be_chosen(tmp_path):
    src = tmp_path / "src"
    data = write_rucaibox(src, tag="a")
    write_rucaibox(src, langs=["en"], tag="b.v2")
    with pytest.raises(HarvestError, match=r"several tags \(a, b\.v2\).*--tag"):
        import_published("rucaibox", src, tmp_path / "s1")
    assert not (tmp_path / "s1").exists()
    import_published("rucaibox", src, tmp_path / "s2", tag="a")
    assert_store_holds(tmp_path / "s2", data, LAPE_ORDER)
    import_published("rucaibox", src, tmp_path / "s3", tag="b.v2")
    assert read_attrs(tmp_path / "s3")["meta"]["corpus"]["groups"] == ["en"]


def test_no_files_of_the_format(tmp_path):
    write_lna(tmp_path / "src")  # the other format's names
    with pytest.raises(HarvestError, match="no activation.* files for format rucaibox in"):
        import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_missing_language_names_the_expected_file(tmp_path):
    write_rucaibox(tmp_path / "src")
    expected = tmp_path / "src" / "activation.de.train.llama-7b"
    with pytest.raises(HarvestError, match=f"'de'.*{expected}"):
        import_published("rucaibox", tmp_path / "src", tmp_path / "store", langs=["en", "de"])
    assert not (tmp_path / "store").exists()


def test_missing_prefix_file_is_named(tmp_path):
    write_lna(tmp_path / "src")
    (tmp_path / "src" / "prefix.activation.fr.qwen.pt").unlink()
    with pytest.raises(HarvestError, match="prefix.activation.fr.qwen.pt not found"):
        import_published("lna", tmp_path / "src", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def _not_weights_only(path: Path, payload) -> None:
    torch.save(payload, path)
    with pytest.raises(pickle.UnpicklingError):  # the fixture really is refused by torch itself
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", ["class", "object", "corrupt", "float", "bool", "no_key", "not_dict",
                                  "negative", "negative_n", "float_n", "exceeds", "shape"])
def test_bad_file_is_refused_by_name_and_nothing_is_written(tmp_path, case):
    src = tmp_path / "src"
    write_rucaibox(src)
    bad = src / "activation.fr.train.llama-7b"
    n, over_zero = counts(7, n=100)
    if case == "class":
        _not_weights_only(bad, {"n": n, "over_zero": over_zero, "meta": Opaque()})
    elif case == "object":
        _not_weights_only(bad, {"n": n, "over_zero": over_zero, "x": object()})
    elif case == "corrupt":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        payload = {
            "float": {"n": n, "over_zero": over_zero.float()},
            "bool": {"n": n, "over_zero": over_zero > 50},
            "no_key": {"tokens": n, "over_zero": over_zero},
            "not_dict": [n, over_zero],
            "negative": {"n": n, "over_zero": over_zero - 200},
            "negative_n": {"n": -1, "over_zero": torch.zeros(L, I, dtype=torch.int32)},
            "float_n": {"n": 100.5, "over_zero": over_zero},
            "exceeds": {"n": n, "over_zero": over_zero + 101},
            "shape": {"n": n, "over_zero": torch.zeros(L, I + 1, dtype=torch.int32)},
        }[case]
        torch.save(payload, bad)
    with pytest.raises(HarvestError) as err:
        import_published("rucaibox", src, tmp_path / "store")
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store*"))  # no partial skeleton either


def test_lna_prompt_file_is_validated_too(tmp_path):
    write_lna(tmp_path / "src")
    bad = tmp_path / "src" / "prefix.activation.en.qwen.pt"
    torch.save({"total_tokens": 10, "over_zero": torch.full((L, I), 11)}, bad)
    with pytest.raises(HarvestError, match=f"{bad}: over_zero\\[0, 0\\] = 11 exceeds total_tokens = 10"):
        import_published("lna", tmp_path / "src", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_count_as_integer_tensor_is_accepted(tmp_path):
    src = tmp_path / "src"
    n, over_zero = counts(3)
    src.mkdir()
    torch.save({"total_tokens": torch.tensor(n), "over_zero": over_zero.long()}, src / "activation.en.m.pt")
    torch.save({"total_tokens": n, "over_zero": over_zero.long()}, src / "prefix.activation.en.m.pt")
    import_published("lna", src, tmp_path / "store")
    assert_store_holds(tmp_path / "store", {"en:full": (n, over_zero), "en:prompt": (n, over_zero)},
                       ["en:full", "en:prompt"])


def test_existing_store_is_refused_and_unchanged(tmp_path):
    write_rucaibox(tmp_path / "src")
    import_published("rucaibox", tmp_path / "src", tmp_path / "store", langs=["en"])
    before = tree_digest(tmp_path / "store")
    with pytest.raises(HarvestError, match="already exists"):
        import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    assert tree_digest(tmp_path / "store") == before


def test_foreign_directory_is_refused_and_kept(tmp_path):
    write_rucaibox(tmp_path / "src")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match="not an lsn store"):
        import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    assert (tmp_path / "store" / "notes.txt").read_text() == "mine"


def test_unknown_format_and_missing_directory(tmp_path):
    with pytest.raises(HarvestError, match="unknown import format 'lape'"):
        import_published("lape", tmp_path, tmp_path / "store")
    with pytest.raises(HarvestError, match="not a directory"):
        import_published("rucaibox", tmp_path / "absent", tmp_path / "store")


def test_failure_while_writing_removes_the_new_store(tmp_path, monkeypatch):
    from harvester.store import Store

    write_rucaibox(tmp_path / "src")

    def broken(self, **values):
        raise OSError("disk full")

    monkeypatch.setattr(Store, "set_attrs", broken)
    with pytest.raises(OSError, match="disk full"):
        import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    assert not (tmp_path / "store").exists()
