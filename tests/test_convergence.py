"""``lsn convergence`` and ``lsn harvest --report-every``: against plain loops over the shard rows read
straight from the store (zarr, NumPy) and the plain method references (tests/method_reference.py)."""

from __future__ import annotations

import csv
import math
import re
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from analysis.convergence import PartialReport
from analysis.masks import Mask
from analysis.shards import partial_counts, partial_plan, shard_plan
from harvester.errors import HarvestError
from harvester.windows import SHARDS_PER_STREAM
from lsn.cli import main
from tests import method_reference as ref
from tests.helpers import assert_same_totals

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HARVEST = ["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=24,langs=en+de+fr", "--no-ray",
           "--seq-len", "64", "--shard-tokens", "256", "--no-progress"]
GROUPS = ["en", "de", "fr"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three groups of 6 or 7 shards each."""
    path = tmp_path_factory.mktemp("convergence") / "S"
    assert main([*HARVEST, "--store", str(path)]) == 0
    return path


# -- plain references ----------------------------------------------------------------------------
def finished_rows(path):
    """``[(index, tokens [G], active [G, L, I])]`` of every shard marked done, in index order, read with zarr."""
    root = zarr.open_group(str(path), mode="r")
    done, tokens, active = root["shards/done"], root["shards/tokens"], root["shards/active"]
    rows = []
    for stream in range(len(GROUPS)):
        k = 0
        while done[stream * SHARDS_PER_STREAM + k] == 1:
            i = stream * SHARDS_PER_STREAM + k
            rows.append((i, np.asarray(tokens[i], np.int64), np.asarray(active[i], np.int64)))
            k += 1
    return rows


def summed(rows, taken: list[int]):
    """``(active [K, L, I], tokens [K], shards)``: each group's first ``taken[g]`` shards holding its tokens
    summed by loops, and the indices of the shards taken."""
    active = np.zeros((len(GROUPS), *rows[0][2].shape[1:]), np.int64)
    tokens, shards = [0] * len(GROUPS), set()
    for g in range(len(GROUPS)):
        for index, n, rows_active in [r for r in rows if r[1][g] > 0][:taken[g]]:
            shards.add(index)
            tokens[g] += int(n[g])
            for l in range(rows_active.shape[1]):
                for i in range(rows_active.shape[2]):
                    active[g, l, i] += int(rows_active[g, l, i])
    return active, tokens, shards


def flat_sets(mask, width: int) -> list[set[int]]:
    return [{l * width + int(i) for l, idx in enumerate(per) for i in idx} for per in mask]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def reference_curve(path, points: int, top_rate: float) -> list[list[str]]:
    """The CSV rows ``lsn convergence lape`` must write: prefixes by loops, LAPE by the plain reference."""
    rows = finished_rows(path)
    n = [sum(1 for r in rows if r[1][g] > 0) for g in range(len(GROUPS))]
    count = min(points, max(n))
    masks, out = [], []
    for j in range(1, count + 1):
        taken = [math.ceil(j * n_g / count) for n_g in n]
        active, tokens, shards = summed(rows, taken)
        mask, _, _ = ref.lape(ref.probabilities(active, tokens), top_rate=top_rate)
        masks.append((flat_sets(mask, active.shape[2]), tokens, len(shards)))
    final = masks[-1][0]
    for j, (sets, tokens, shards) in enumerate(masks):
        for g, lang in enumerate(GROUPS):
            previous = repr(jaccard(masks[j - 1][0][g], sets[g])) if j else ""
            out.append([str(j + 1), str(shards), lang, str(tokens[g]), str(len(sets[g])),
                        repr(jaccard(sets[g], final[g])), previous])
    return out


def read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# -- lsn convergence -----------------------------------------------------------------------------
@pytest.mark.parametrize("points", [4, 20])
def test_curve_is_the_plain_loops(store, tmp_path, capsys, points):
    out = tmp_path / "out"
    assert main(["convergence", "lape", "--store", str(store), "--out", str(out), "--top-rate", "0.1",
                 "--points", str(points), "--no-progress"]) == 0
    got = read_csv(out / "convergence.csv")
    assert got[0] == ["point", "shards", "language", "tokens", "selected", "jaccard_final", "jaccard_previous"]
    assert got[1:] == reference_curve(store, points, 0.1)
    last = got[-len(GROUPS):]
    totals = xr.open_zarr(store)["tokens"].values
    assert [r[5] for r in last] == ["1.0"] * len(GROUPS)
    assert [int(r[3]) for r in last] == [int(n) for n in totals]
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Mask.load(out / "mask.npz").languages == GROUPS
    text = capsys.readouterr().out
    assert "flattens near 1" in text and re.search(r"^en\s+1604\s", text, re.M)


def test_method_flag_is_the_subcommand(store, tmp_path):
    """The issue's spelling, ``--method M``, and the method's own flags after it."""
    for name, argv in (("a", ["convergence", "coverage"]), ("b", ["convergence", "--method", "coverage"]),
                       ("c", ["convergence", "--method=coverage"])):
        assert main([*argv, "--store", str(store), "--out", str(tmp_path / name), "--k", "0.5",
                     "--no-progress"]) == 0
    assert read_csv(tmp_path / "a" / "convergence.csv") == read_csv(tmp_path / "b" / "convergence.csv") \
        == read_csv(tmp_path / "c" / "convergence.csv")


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_refusals(store, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    err = _refused(["convergence", "lape", "--store", str(store), "--out", str(blocked / "out")], capsys)
    assert "is a file, not a directory" in err
    with pytest.raises(SystemExit) as exit_:
        main(["convergence", "nosuch", "--store", str(store), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err
    err = _refused(["convergence", "lape", "--store", str(store), "--out", str(tmp_path / "o"), "--top-rate", "2"],
                   capsys)
    assert "--top-rate must lie in [0, 1]" in err
    err = _refused(["convergence", "lape", "--store", str(store), "--out", str(tmp_path / "o"), "--points", "1"],
                   capsys)
    assert "--points must be 2 or more" in err
    assert not (tmp_path / "o").exists()


def test_a_store_without_shard_rows_is_refused(tmp_path, capsys):
    from tests.test_import import write_rucaibox

    write_rucaibox(tmp_path / "src")
    assert main(["import", "--format", "rucaibox", "--src", str(tmp_path / "src"), "--store", str(tmp_path / "I")]) == 0
    capsys.readouterr()
    err = _refused(["convergence", "lape", "--store", str(tmp_path / "I"), "--out", str(tmp_path / "o")], capsys)
    assert "keeps no shard rows" in err and not (tmp_path / "o").exists()


def test_one_shard_per_group_is_one_point(tmp_path, capsys):
    argv = [a for a in HARVEST if a not in ("--shard-tokens", "256")]
    assert main([*argv, "--store", str(tmp_path / "S")]) == 0
    capsys.readouterr()
    err = _refused(["convergence", "lape", "--store", str(tmp_path / "S"), "--out", str(tmp_path / "o")], capsys)
    assert "one point only" in err and "--shard-tokens" in err and not (tmp_path / "o").exists()


def test_mask_jaccard():
    a = Mask(["x", "y", "z"], 2, 4, [np.array([0, 1, 5]), np.array([], np.int64), np.array([7])], "m")
    b = Mask(["x", "y", "z"], 2, 4, [np.array([1, 5, 6, 7]), np.array([], np.int64), np.array([2])], "m")
    np.testing.assert_array_equal(a.jaccard(b), [2 / 5, 1.0, 0.0])
    np.testing.assert_array_equal(a.jaccard(a), [1.0, 1.0, 1.0])
    with pytest.raises(HarvestError, match="different languages or shapes"):
        a.jaccard(Mask(["x"], 2, 4, [np.array([0])], "m"))


# -- partial plans and lsn harvest --report-every ------------------------------------------------
def test_partial_plan_lists_only_done_shards(store, tmp_path):
    copy = tmp_path / "S"
    shutil.copytree(store, copy)
    from analysis.data import open_counts
    from harvester.store import Store

    counts = open_counts(str(copy))
    full = shard_plan(counts.store, counts.attrs)
    np.testing.assert_array_equal(partial_plan(str(copy), 3).indices, full.indices)
    Store(str(copy)).array("shards/done")[int(full.indices[2])] = 0  # rows there, but not marked done
    plan = partial_plan(str(copy), 3)
    assert list(plan.indices) == [i for i in full.indices if i != full.indices[2]]
    assert list(partial_counts(str(copy)).tokens) == list(full.tokens.sum(axis=0) - full.tokens[2])


def _partial_lines(text: str) -> list[tuple[int, str, int, int]]:
    """``(shards done, language, tokens, selected)`` of each partial line."""
    pattern = re.compile(r"^partial \[(\d+) shards done, store not complete\] (\w+): (?:(\d+) tokens so far|"
                         r"no tokens yet), (\d+) selected \(lape\), Jaccard to the previous report (-|[\d.]+)$")
    found = []
    for line in text.splitlines():
        if line.startswith("partial"):
            m = pattern.match(line)
            assert m, line
            found.append((int(m[1]), m[2], int(m[3] or 0), int(m[4])))
    return found


def test_report_every_prints_partial_lines_and_changes_nothing(store, tmp_path, capsys):
    assert main([*HARVEST, "--store", str(tmp_path / "R"), "--report-every", "2"]) == 0
    lines = _partial_lines(capsys.readouterr().out)
    assert_same_totals(tmp_path / "R", store)
    rows = finished_rows(store)  # --no-ray runs the shards in index order: report r saw the first 2r
    assert [d for d, *_ in lines] == [2 * r for r in range(1, len(rows) // 2 + 1) for _ in GROUPS]
    for r in range(1, len(rows) // 2 + 1):
        seen = rows[:2 * r]
        tokens = [sum(int(n[g]) for _, n, _ in seen) for g in range(len(GROUPS))]
        active = sum(a for _, _, a in seen)
        mask, _, _ = ref.lape(ref.probabilities(active, tokens))
        expected = [(2 * r, lang, tokens[g], sum(len(idx) for idx in mask[g])) for g, lang in enumerate(GROUPS)]
        assert lines[(r - 1) * len(GROUPS):r * len(GROUPS)] == expected


def test_a_failing_report_only_warns(store, capsys):
    def broken(counts):
        raise HarvestError("no tokens yet, say")

    report = PartialReport(str(store), 1, broken, "lape")
    report()
    report()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lsn: warning: partial report after {n} shards failed (no tokens yet, say); the harvest goes on"
                   for n in (1, 2)]


@pytest.mark.ray
@pytest.mark.slow
def test_report_every_on_ray(store, tmp_path, capsys):
    argv = [a for a in HARVEST if a != "--no-ray"]
    assert main([*argv, "--store", str(tmp_path / "R"), "--actors", "2", "--report-every", "3"]) == 0
    lines = _partial_lines(capsys.readouterr().out)
    assert lines and all(d >= 3 * (k // len(GROUPS) + 1) for k, (d, *_) in enumerate(lines))
    assert_same_totals(tmp_path / "R", store)


# -- methods that read every store group ---------------------------------------------------------
@pytest.fixture(scope="module")
def hist_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("convergence-hist") / "S"
    assert main([*HARVEST, "--stats", "active,hist", "--hist-edges", "-1:2:6", "--store", str(path)]) == 0
    return path


def test_a_pooled_percentile_grows_every_group(hist_store, tmp_path):
    """act-prob-90p's pooled percentile is over every store group (en too, though --langs leaves it out):
    each prefix pools every group's first shards, as the final point pools every group's totals."""
    points, rate = 3, 0.05
    out = tmp_path / "o"
    assert main(["convergence", "act-prob-90p", "--store", str(hist_store), "--out", str(out), "--langs", "de,fr",
                 "--rate", str(rate), "--points", str(points), "--no-progress"]) == 0
    root = zarr.open_group(str(hist_store), mode="r")
    done, tokens, hist = root["shards/done"], root["shards/tokens"], root["shards/hist"]
    rows = [i for i in range(done.shape[0]) if i % SHARDS_PER_STREAM < 64 and done[i] == 1]
    per_group = [[i for i in rows if tokens[i][g] > 0] for g in range(len(GROUPS))]
    count = min(points, max(len(per_group[1]), len(per_group[2])))
    masks = []
    for j in range(1, count + 1):
        taken = [p[:math.ceil(j * len(p) / count)] for p in per_group]
        summed_hist = [sum(np.asarray(hist[i, g], np.int64) for i in taken[g]) for g in range(len(GROUPS))]
        n = [sum(int(tokens[i][g]) for i in taken[g]) for g in (1, 2)]
        score = ref.act_prob_90p(np.stack(summed_hist[1:]), n, pool=sum(summed_hist))
        masks.append(flat_sets(ref.act_prob_90p_mask(score, rate), score.shape[1]))
    got = read_csv(out / "convergence.csv")[1:]
    want = [[str(len(m[k])), repr(jaccard(m[k], masks[-1][k]))] for m in masks for k in range(2)]
    assert [r[4:6] for r in got] == want
