"""The mask report: every CSV value against hand-computed numbers, appear[] against the plain-loop
reference, valid PNGs, the Markdown summary, and a full-size (80 x 80 x 28672) smoke run."""

from __future__ import annotations

import csv
from fractions import Fraction

import numpy as np
import pytest

from analysis.masks import Mask
from analysis.report import appear_counts, jaccard, overlap, top_pairs, write_report
from harvester.errors import HarvestError
from tests.method_reference import appearances

L, I = 4, 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def units(*pairs) -> np.ndarray:
    return np.array(sorted(l * I + i for l, i in pairs), dtype=np.int64)


def hand_mask(**kw) -> Mask:
    """en: (0,0) (0,1) (1,2) (3,5); fr: (0,1) (1,2) (2,0); de: (0,1) (3,5).
    Unit (0,1) is in all three, (1,2) in en+fr, (3,5) in en+de, (0,0) and (2,0) in one each."""
    selected = [units((0, 0), (0, 1), (1, 2), (3, 5)), units((0, 1), (1, 2), (2, 0)), units((0, 1), (3, 5))]
    return Mask(["en", "fr", "de"], L, I, selected, "entropy_lambda",
                params={"top_rate": 0.01, "bar_ratio": 0.95}, source={"store": "runs/tiny.zarr"}, **kw)


def read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def as_layers(mask: Mask) -> list[list[list[int]]]:
    return [[idx.tolist() for idx in mask.layers(k)] for k in range(len(mask.languages))]


# -- statistics by hand --------------------------------------------------------------------------
def test_appear_by_hand():
    assert appear_counts(hand_mask()) == [0, 2, 2, 1]


def test_appear_with_an_empty_language():
    mask = hand_mask()
    mask = Mask([*mask.languages, "zh"], L, I, [*mask.selected, np.zeros(0, np.int64)], mask.method)
    assert appear_counts(mask) == [0, 2, 2, 1, 0]
    assert overlap(mask)[3].tolist() == [0, 0, 0, 0] and overlap(mask)[:, 3].tolist() == [0, 0, 0, 0]
    assert jaccard(overlap(mask))[3, 3] == 0.0


def test_appear_single_language():
    assert appear_counts(Mask(["en"], L, I, [units((0, 0), (2, 3), (3, 5))], "m")) == [0, 3]
    assert appear_counts(Mask(["en"], L, I, [np.zeros(0, np.int64)], "m")) == [0, 0]
    assert overlap(Mask(["en"], L, I, [units((1, 1))], "m")).tolist() == [[1]]


def test_overlap_and_jaccard_by_hand():
    shared = overlap(hand_mask())
    assert shared.tolist() == [[4, 2, 2], [2, 3, 1], [2, 1, 2]]
    assert jaccard(shared).tolist() == [[1.0, 2 / 5, 2 / 4], [2 / 5, 1.0, 1 / 4], [2 / 4, 1 / 4, 1.0]]
    assert top_pairs(hand_mask(), shared) == [("en", "de", 2, 0.5), ("en", "fr", 2, 0.4), ("fr", "de", 1, 0.25)]


@pytest.mark.parametrize("seed", range(5))
def test_against_plain_references(seed):
    rng = np.random.default_rng(seed)
    K, n_layers, width = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 7))
    selected = [np.flatnonzero(rng.random(n_layers * width) < rng.random()) for _ in range(K)]
    mask = Mask([f"l{k}" for k in range(K)], n_layers, width, selected, "m")
    assert appear_counts(mask) == appearances(as_layers(mask), n_layers, width)
    dense = mask.dense().reshape(K, -1)
    expected = [[sum(int(a and b) for a, b in zip(dense[x], dense[y])) for y in range(K)] for x in range(K)]
    assert overlap(mask).tolist() == expected


# -- files ---------------------------------------------------------------------------------------
def test_csvs_by_hand(tmp_path):
    write_report(hand_mask(), tmp_path)
    assert read_csv(tmp_path / "counts.csv") == [
        ["language", "layer_0", "layer_1", "layer_2", "layer_3", "total"],
        ["en", "2", "1", "0", "1", "4"], ["fr", "1", "1", "1", "0", "3"], ["de", "1", "0", "0", "1", "2"]]
    assert read_csv(tmp_path / "overlap.csv") == [
        ["language", "en", "fr", "de"], ["en", "4", "2", "2"], ["fr", "2", "3", "1"], ["de", "2", "1", "2"]]
    rows = read_csv(tmp_path / "overlap_jaccard.csv")
    assert rows[0] == ["language", "en", "fr", "de"] and [r[0] for r in rows[1:]] == ["en", "fr", "de"]
    hand = [[1, Fraction(2, 5), Fraction(1, 2)], [Fraction(2, 5), 1, Fraction(1, 4)],
            [Fraction(1, 2), Fraction(1, 4), 1]]
    assert [[float(v) for v in r[1:]] for r in rows[1:]] == [[float(v) for v in r] for r in hand]
    assert read_csv(tmp_path / "appear.csv") == [["c", "appear"], ["0", "0"], ["1", "2"], ["2", "2"], ["3", "1"]]


def test_pngs_are_valid(tmp_path):
    write_report(hand_mask(), tmp_path)
    for name in ("counts.png", "overlap_jaccard.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 2000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 200 <= width <= 2000 and 200 <= height <= 2000


def test_markdown_summary(tmp_path):
    path = write_report(hand_mask(extra={"appear": [0, 2, 2, 1], "beta": 0.25, "lambda": 0.125}), tmp_path / "r",
                        title="Tiny report")
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "r" / "report.md" and text.startswith("# Tiny report\n")
    assert "entropy_lambda" in text and "top_rate" in text and "runs/tiny.zarr" in text and "0.125" in text
    for lang in ("en", "fr", "de"):
        assert f"| {lang} |" in text
    assert "| en | 4 | 16.6667% |" in text  # 4 of L·I = 24 units
    assert "| en | 2 | 1 | 0 | 1 |" in text  # the per-layer table (L <= 40)
    assert "| 3 | 1 |" in text  # appear[3]
    assert "| en | de | 2 | 0.5000 |" in text.split("Top overlapping")[1]
    for name in ("counts.png", "overlap_jaccard.png", "counts.csv", "overlap.csv", "overlap_jaccard.csv", "appear.csv"):
        assert f"]({name})" in text and (tmp_path / "r" / name).is_file()


def test_many_layers_point_to_the_csv(tmp_path):
    mask = Mask(["a", "b"], 41, 2, [np.array([0, 81]), np.array([81])], "lape")
    text = write_report(mask, tmp_path).read_text(encoding="utf-8")
    assert "see [counts.csv](counts.csv)" in text and "| a | 1 | 0 |" not in text
    assert read_csv(tmp_path / "counts.csv")[1][-2:] == ["1", "2"]  # layer_40 = 1, total = 2


def test_no_shared_units(tmp_path):
    mask = Mask(["a", "b"], 2, 2, [np.array([0]), np.array([3])], "lape")
    assert "No two languages share a unit." in write_report(mask, tmp_path).read_text(encoding="utf-8")


def test_mismatching_recorded_appear_raises(tmp_path):
    with pytest.raises(HarvestError, match="appear"):
        write_report(hand_mask(extra={"appear": [0, 3, 1, 1]}), tmp_path)
    with pytest.raises(HarvestError, match="appear"):
        write_report(hand_mask(extra={"appear": [0, 2, 2]}), tmp_path)


def test_saved_mask_reports_the_same(tmp_path):
    mask = hand_mask(extra={"appear": [0, 2, 2, 1]})
    loaded = Mask.load(mask.save(tmp_path / "m.npz"))
    write_report(loaded, tmp_path / "r")
    assert read_csv(tmp_path / "r" / "appear.csv")[1:] == [["0", "0"], ["1", "2"], ["2", "2"], ["3", "1"]]


# -- full size -----------------------------------------------------------------------------------
def test_full_size_smoke(tmp_path):
    """K = 80, L = 80, I = 28672, 1% per language: exact against a bincount oracle, and quick."""
    K, n_layers, width = 80, 80, 28672
    rng = np.random.default_rng(0)
    total = n_layers * width
    selected = [np.sort(rng.choice(total, size=total // 100, replace=False)) for _ in range(K)]
    mask = Mask([f"x{k:02d}" for k in range(K)], n_layers, width, selected, "lape", params={"top_rate": 0.01})
    in_masks = np.bincount(np.concatenate(selected), minlength=total)
    oracle = np.bincount(in_masks, minlength=K + 1)
    oracle[0] = 0
    assert appear_counts(mask) == oracle.tolist()
    shared = overlap(mask)
    assert np.diag(shared).tolist() == [total // 100] * K and (shared == shared.T).all()
    for a, b in ((0, 1), (5, 79), (42, 17)):
        assert shared[a, b] == np.intersect1d(selected[a], selected[b], assume_unique=True).size
    write_report(mask, tmp_path)
    assert len(read_csv(tmp_path / "counts.csv")) == K + 1


def test_single_language_and_empty_masks_report(tmp_path, capsys):
    text = write_report(Mask(["en"], L, I, [units((0, 1), (0, 2))], "lape"), tmp_path / "one").read_text()
    assert read_csv(tmp_path / "one" / "overlap_jaccard.csv") == [["language", "en"], ["en", "1.0"]]
    assert not (tmp_path / "one" / "overlap_jaccard.png").exists() and "One language: no overlap plot." in text
    assert "one language (en): no overlap plot" in capsys.readouterr().err
    write_report(Mask(["en", "fr"], L, I, [np.zeros(0, np.int64)] * 2, "lape"), tmp_path / "none")
    assert read_csv(tmp_path / "none" / "appear.csv")[1:] == [["0", "0"], ["1", "0"], ["2", "0"]]
    with pytest.raises(HarvestError, match="no languages"):
        write_report(Mask([], L, I, [], "lape"), tmp_path / "zero")
