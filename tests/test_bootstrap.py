"""``lsn analyze METHOD --bootstrap N``: through the CLI on real tiny stores, against a plain-loop
reference that draws the resamples by the documented protocol, sums each resample's shard rows read
straight from Zarr, and runs the reference methods of tests/method_reference.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from analysis.bootstrap import draws
from analysis.data import open_counts
from analysis.masks import Mask
from analysis.shards import shard_plan, weighted
from lsn.cli import main
from tests import fixtures
from tests import method_reference as ref

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = ["--model", "tiny:llama", "--no-ray", "--seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three languages of about 1,500 tokens each, in shards of at most 256 tokens (6 or 7 per group)."""
    path = tmp_path_factory.mktemp("bootstrap") / "S"
    assert main(["harvest", *BASE, "--corpus", "sample:docs=24,langs=en+de+fr", "--shard-tokens", "256",
                 "--stats", "active,hist", "--hist-edges", "-1:2:6", "--store", str(path)]) == 0
    return path


# -- the reference -------------------------------------------------------------------------------
def reference_weights(tokens: np.ndarray, n: int, seed: int) -> list[list[list[int]]]:
    """The documented protocol in plain loops: per resample, per store group in order, its shards
    (rows with tokens, in plan order) drawn n of n by ``rng.integers(0, n, size=n)``; groups holding
    the same shards reuse the first one's draw."""
    S, G = tokens.shape
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        weights = [[0] * G for _ in range(S)]
        shared: dict[tuple, list[int]] = {}
        for g in range(G):
            rows = [s for s in range(S) if tokens[s, g] > 0]
            if not rows:
                continue
            if tuple(rows) not in shared:
                times = [0] * len(rows)
                for pick in rng.integers(0, len(rows), size=len(rows)):
                    times[int(pick)] += 1
                shared[tuple(rows)] = times
            for j, s in enumerate(rows):
                weights[s][g] = shared[tuple(rows)][j]
        out.append(weights)
    return out


def resampled_rows(store: Path, name: str, indices, weights, groups: list[list[int]]) -> np.ndarray:
    """``[K, ...]``: each language's rows of ``name``, every shard counted its weight times (plain loops)."""
    rows = zarr.open_group(str(store), mode="r")[f"shards/{name}"]
    out = []
    for idx in groups:
        total = np.zeros(rows.shape[2:], np.int64)
        for g in idx:
            for s, index in enumerate(indices):
                for _ in range(weights[s][g]):
                    total += rows[int(index), g].astype(np.int64)
        out.append(total)
    return np.stack(out)


def resampled_tokens(store: Path, indices, weights, groups: list[list[int]]) -> np.ndarray:
    tokens = zarr.open_group(str(store), mode="r")["shards/tokens"]
    return np.array([sum(weights[s][g] * int(tokens[int(index)][g]) for g in idx for s, index in enumerate(indices))
                     for idx in groups], np.int64)


def flat(mask_layers, I: int) -> list[np.ndarray]:
    return [np.array(sorted(l * I + i for l, layer in enumerate(per) for i in layer), np.int64) for per in mask_layers]


def expected(selections: list[list[np.ndarray]], full: list[np.ndarray], stable: float):
    """Frequencies (units, times), stable masks and Jaccards of the reference's resample masks."""
    N, K = len(selections), len(full)
    counted = [{} for _ in range(K)]
    jaccard = np.zeros((N, K))
    for b, masks in enumerate(selections):
        for k, sel in enumerate(masks):
            for unit in sel.tolist():
                counted[k][unit] = counted[k].get(unit, 0) + 1
            a, c = set(full[k].tolist()), set(sel.tolist())
            jaccard[b, k] = len(a & c) / len(a | c) if a | c else 1.0
    need = math.ceil(round(stable * N, 9))
    units = [np.array(sorted(c), np.int64) for c in counted]
    times = [np.array([c[u] for u in sorted(c)], np.int64) for c in counted]
    stable_sel = [np.array(sorted(u for u, t in c.items() if t >= need), np.int64) for c in counted]
    return units, times, stable_sel, jaccard


def plan_of(store: Path, langs=None):
    counts = open_counts(str(store), langs)
    return counts, shard_plan(counts.store, counts.attrs)


def analyze(method: str, store: Path, out: Path, *flags: str) -> Mask:
    assert main(["analyze", method, "--store", str(store), "--out", str(out), "--no-progress", *flags]) == 0
    return Mask.load(out)


def assert_bootstrap(mask: Mask, want, n: int, seed: int, stable: float):
    units, times, stable_sel, jaccard = want
    boot = mask.bootstrap
    assert (boot.resamples, boot.seed, boot.stable) == (n, seed, stable)
    for k in range(len(mask.languages)):
        np.testing.assert_array_equal(boot.units[k], units[k])
        np.testing.assert_array_equal(boot.times[k], times[k])
        np.testing.assert_array_equal(boot.stable_selected()[k], stable_sel[k])
    np.testing.assert_array_equal(boot.jaccard, jaccard)


# -- the tests -----------------------------------------------------------------------------------
def test_the_draws_follow_the_documented_protocol(store):
    counts, plan = plan_of(store)
    assert all(plan.rows(g).size > 3 for g in range(plan.tokens.shape[1]))
    got = draws(plan, 5, 3)
    want = reference_weights(plan.tokens, 5, 3)
    for w, r in zip(got, want):
        np.testing.assert_array_equal(w, np.array(r))
        assert all(int(w[:, g].sum()) == plan.rows(g).size for g in range(plan.tokens.shape[1]))  # n of n


def test_draws_come_one_resample_at_a_time(store):
    """The weights ``[S, G]`` of each resample are drawn as it runs, not all N before the first: memory and
    the wait before the progress bar do not grow with N (S · G · N int64 is gigabytes at EC40 shape)."""
    counts, plan = plan_of(store)
    first = next(iter(draws(plan, 10**12, 3)))
    np.testing.assert_array_equal(first, np.array(reference_weights(plan.tokens, 1, 3)[0]))


def test_lape_bootstrap_against_the_reference(store, tmp_path, capsys):
    N, seed, top = 12, 4, 0.05
    mask = analyze("lape", store, tmp_path / "l.npz", "--top-rate", str(top), "--bootstrap", str(N), "--seed",
                   str(seed), "--stable", "0.75")
    counts, plan = plan_of(store)
    I = counts.width
    full = flat(ref.lape(ref.probabilities(counts.numer.compute(), counts.tokens), top_rate=top)[0], I)
    assert all(np.array_equal(a, b) for a, b in zip(mask.selected, full))  # the main selection: full data
    selections = []
    for weights in reference_weights(plan.tokens, N, seed):
        active = resampled_rows(store, "active", plan.indices, weights, counts.index)
        tokens = resampled_tokens(store, plan.indices, weights, counts.index)
        selections.append(flat(ref.lape(ref.probabilities(active, tokens), top_rate=top)[0], I))
    assert_bootstrap(mask, expected(selections, full, 0.75), N, seed, 0.75)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"wrote {tmp_path / 'l.npz'}: lape")
    assert out[1] == f"bootstrap: {N} resamples (seed {seed}); stable: selected in at least 9 of {N} (--stable 0.75)"
    band = mask.bootstrap.band()
    assert out[2] == (f"  en: Jaccard to the full-data mask {band[0, 0]:.3f} (5-95%: {band[0, 1]:.3f}-"
                      f"{band[0, 2]:.3f}); stable {mask.bootstrap.stable_selected()[0].size}, full {mask.selected[0].size}")


def test_act_prob_90p_pools_the_resampled_rows_of_every_group(store, tmp_path):
    """The pooled percentile is over every store group's resampled rows (en too, though not a language
    here), never the store's totals; a pooled language sums its groups' resampled rows."""
    N, seed, rate = 4, 1, 0.02
    langs = ["de", "x=de+fr"]
    mask = analyze("act-prob-90p", store, tmp_path / "p.npz", "--rate", str(rate), "--langs", ",".join(langs),
                   "--bootstrap", str(N), "--seed", str(seed))
    counts, plan = plan_of(store, langs)
    every = [list(range(plan.tokens.shape[1]))]  # en, de, fr: the pool
    languages = [[1], [1, 2]]

    def select(weights):
        pool = resampled_rows(store, "hist", plan.indices, weights, every)[0]
        hist = resampled_rows(store, "hist", plan.indices, weights, languages)
        tokens = resampled_tokens(store, plan.indices, weights, languages)
        return flat(ref.act_prob_90p_mask(ref.act_prob_90p(hist, tokens, pool=pool), rate), counts.width)

    full = select([[1 if plan.tokens[s, g] else 0 for g in range(3)] for s in range(len(plan.indices))])
    assert all(np.array_equal(a, b) for a, b in zip(mask.selected, full))
    selections = [select(weights) for weights in reference_weights(plan.tokens, N, seed)]
    assert_bootstrap(mask, expected(selections, full, 0.9), N, seed, 0.9)


def test_pooled_statistics_of_a_resample_are_its_own(store):
    """``Counts.pooled`` of recomputed counts sums the weighted rows: all-zero weights give zeros, never totals."""
    counts, plan = plan_of(store, ["de"])
    assert counts.pooled("hist").compute().sum() > 0
    np.testing.assert_array_equal(weighted(counts, plan, plan.ones()).pooled("hist").compute(),
                                  counts.pooled("hist").compute())
    assert weighted(counts, plan, 0 * plan.ones()).pooled("hist").compute().sum() == 0
    source = (Path(__file__).resolve().parents[1] / "analysis" / "cli.py").read_text()
    assert "counts.dataset" not in source  # methods read statistics through Counts, which resamples them


def test_same_seed_same_file_and_another_seed_other_draws(store, tmp_path):
    flags = ["--top-rate", "0.05", "--bootstrap", "5"]
    analyze("lape", store, tmp_path / "a.npz", *flags)
    analyze("lape", store, tmp_path / "b.npz", *flags)
    other = analyze("lape", store, tmp_path / "c.npz", *flags, "--seed", "1")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    same = Mask.load(tmp_path / "a.npz")
    assert same.bootstrap.seed == 0 and other.bootstrap.seed == 1
    assert not np.array_equal(same.bootstrap.jaccard, other.bootstrap.jaccard)
    assert all(np.array_equal(a, b) for a, b in zip(same.selected, other.selected))  # the full-data mask


def test_report_stable_mask_and_old_masks(store, tmp_path, capsys):
    mask = analyze("lape", store, tmp_path / "m.npz", "--top-rate", "0.05", "--bootstrap", "6", "--stable", "0.5",
                   "--report", str(tmp_path / "rep"))
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Bootstrap stability" in text and "| en |" in text
    for png in ("stability_frequency.png", "stability_layers.png", "counts.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000, png
    rows = (tmp_path / "rep" / "stability.csv").read_text().splitlines()
    assert rows[0] == "language,full,stable,stable_in_full,jaccard_mean,jaccard_p5,jaccard_p95" and len(rows) == 4
    assert main(["mask", "stable", str(tmp_path / "m.npz"), str(tmp_path / "s.npz")]) == 0
    stable = Mask.load(tmp_path / "s.npz")
    assert stable.bootstrap is None and "selected in at least 3 of 6" in stable.params["selection"]
    assert all(np.array_equal(a, b) for a, b in zip(stable.selected, mask.bootstrap.stable_selected()))
    assert main(["mask", "stable", str(tmp_path / "m.npz"), str(tmp_path / "s1.npz"), "--stable", "1"]) == 0
    assert all(np.array_equal(a, u[t == 6]) for a, u, t in
               zip(Mask.load(tmp_path / "s1.npz").selected, mask.bootstrap.units, mask.bootstrap.times))
    assert main(["report", "--mask", str(tmp_path / "s.npz"), "--out", str(tmp_path / "rep2")]) == 0
    assert "Bootstrap" not in (tmp_path / "rep2" / "report.md").read_text()
    capsys.readouterr()
    assert main(["mask", "stable", str(tmp_path / "s.npz"), str(tmp_path / "t.npz")]) == 2
    assert "holds no bootstrap results" in capsys.readouterr().err


def test_jaccard_per_language():
    a = Mask(["x", "y", "z"], 2, 4, [np.array([0, 1, 5]), np.array([], np.int64), np.array([2])], "m")
    b = Mask(["x", "y", "z"], 2, 4, [np.array([1, 5, 7]), np.array([], np.int64), np.array([3])], "m")
    np.testing.assert_array_equal(a.jaccard(b), [0.5, 1.0, 0.0])


def test_damaged_bootstrap_data_is_one_line(store, tmp_path, capsys):
    analyze("lape", store, tmp_path / "m.npz", "--top-rate", "0.05", "--bootstrap", "3")
    with np.load(tmp_path / "m.npz") as data:
        arrays = dict(data)
    arrays["boot_times_0"] = arrays["boot_times_0"] + 3  # more often than there were resamples
    np.savez(tmp_path / "bad.npz", **arrays)
    capsys.readouterr()
    assert main(["report", "--mask", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bootstrap frequencies of 'en'" in err


@pytest.mark.parametrize("flags, message", [
    (["--bootstrap", "0"], "--bootstrap: must be a positive integer, not 0"),
    (["--bootstrap", "3", "--stable", "0"], "--stable must lie in (0, 1], got 0.0"),
    (["--bootstrap", "3", "--stable", "1.5"], "--stable must lie in (0, 1], got 1.5"),
    (["--bootstrap", "3", "--seed", "-1"], "--seed must be 0 or more (numpy.random.default_rng), got -1"),
])
def test_bad_bootstrap_options_leave_the_mask(store, tmp_path, capsys, flags, message):
    out = tmp_path / "m.npz"
    out.write_bytes(b"an earlier mask")
    code = _exit_code(["analyze", "lape", "--store", str(store), "--out", str(out), *flags])
    assert code == 2 and out.read_bytes() == b"an earlier mask"
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse refuses a flag's value itself
        return stop.code


def test_refusals(store, tmp_path, capsys):
    from tests.test_import import write_lna, write_rucaibox
    from analysis.importers import import_published

    write_rucaibox(tmp_path / "src")
    import_published("rucaibox", tmp_path / "src", tmp_path / "imported")
    write_lna(tmp_path / "lna")
    import_published("lna", tmp_path / "lna", tmp_path / "lna-store", langs=["en", "zh"])
    capsys.readouterr()
    cases = [(["lape", "--store", str(tmp_path / "imported")], "keeps no shard rows"),
             (["lape", "--store", str(tmp_path / "lna-store"), "--response-only"], "full-minus-prompt languages"),
             (["autosweep", "--store", str(store)], "--bootstrap needs --out")]
    for args, message in cases:
        out = ["--out", str(tmp_path / "m.npz")] if args[0] != "autosweep" else []
        assert main(["analyze", *args, *out, "--bootstrap", "2"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.npz").exists()
    assert _exit_code(["analyze", "random", "--mask", "m.npz", "--out", "r.npz", "--bootstrap", "2"]) == 2


def test_a_single_shard_group_is_warned_about(tmp_path, capsys):
    store = tmp_path / "S"
    assert main(["harvest", *BASE, "--corpus", "sample:docs=3,langs=en+de", "--shard-tokens", "65536",
                 "--store", str(store)]) == 0
    capsys.readouterr()
    mask = analyze("lape", store, tmp_path / "m.npz", "--top-rate", "0.1", "--bootstrap", "3")
    warning = [line for line in capsys.readouterr().err.splitlines() if "single shard" in line]
    assert warning == ["lsn: warning: de, en have a single shard: every resample of it is the full data (harvest "
                       "with a smaller --shard-tokens for more shards)"]
    assert (mask.bootstrap.jaccard == 1).all() and mask.bootstrap.shards == {"en": 1, "de": 1}


def test_ec40_sides_of_a_direction_share_their_draw(tmp_path, capsys):
    root = fixtures.write_ec40(tmp_path / "EC40", langs=("fr", "ru"), n=12)
    store = tmp_path / "S"
    assert main(["harvest", *BASE, "--corpus", f"ec40:{root}", "--shard-tokens", "128", "--store", str(store)]) == 0
    counts, plan = plan_of(store)
    groups = [str(g) for g in counts.dataset["group"].values]
    for weights in draws(plan, 4, 0):
        for direction in ("en-fr", "fr-en", "en-ru", "ru-en"):
            src, tgt = groups.index(f"{direction}:src"), groups.index(f"{direction}:tgt")
            assert plan.rows(src).size > 1 and np.array_equal(plan.rows(src), plan.rows(tgt))
            np.testing.assert_array_equal(weights[:, src], weights[:, tgt])
    mask = analyze("lape", store, tmp_path / "m.npz", "--top-rate", "0.1", "--bootstrap", "3")
    assert mask.languages == counts.names and json.dumps(mask.bootstrap.shards)


@pytest.mark.slow
def test_a_local_cluster_gives_the_same_file(store, tmp_path):
    flags = ["--top-rate", "0.05", "--bootstrap", "4"]
    analyze("lape", store, tmp_path / "a.npz", *flags)
    analyze("lape", store, tmp_path / "b.npz", *flags, "--local-cluster", "2")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_copy_of_store_without_rows_is_refused(store, tmp_path, capsys):
    """A store whose finished shards no longer match its totals is refused before any work."""
    copy = tmp_path / "S"
    shutil.copytree(store, copy)
    counts, plan = plan_of(copy)
    from harvester.store import Store

    Store(str(copy)).array("shards/done")[int(plan.indices[0])] = 0
    assert main(["analyze", "lape", "--store", str(copy), "--out", str(tmp_path / "m.npz"), "--bootstrap", "2"]) == 2
    assert "not those its totals were summed from" in capsys.readouterr().err
