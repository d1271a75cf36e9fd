"""Did the harvest count enough tokens? Masks from growing prefixes of a store's shards, compared with the
full-data mask (``lsn convergence``), and the partial look a running harvest gives (``lsn harvest
--report-every``).

A prefix is what the harvest had summed after each group's first shards, in plan order
(:mod:`analysis.shards`). With ``J`` points, point ``j`` takes the first ``ceil(j · n_g / J)`` of the
``n_g`` shards of every store group ``g`` (those the languages do not use too: act-prob-90p pools every
group), so that groups of different sizes grow in proportion; ``J`` is ``--points`` (default
:data:`DEFAULT_POINTS`) but at most the largest shard count of a group the languages use. The last point is the totals: its mask is the one ``lsn analyze`` writes (the final mask), and
each point's Jaccard ``|A ∩ B| / |A ∪ B|`` to it, per language, against that language's tokens in the
prefix, is the curve. A curve that flattens near 1 says that more tokens would hardly change the mask.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from analysis.masks import Mask
from analysis.shards import ShardPlan, partial_counts, shard_plan, weighted
from harvester import fs
from harvester.errors import HarvestError

DEFAULT_POINTS = 20
"""Points on the curve without ``--points`` (fewer when the largest group has fewer shards)."""
STABLE = 0.9
"""The Jaccard the printed table reports reaching (and keeping) from some number of tokens on."""


@dataclass(frozen=True)
class Point:
    """One language at one point of the curve."""

    point: int
    shards: int
    """shards summed (of any group)"""
    language: str
    tokens: int
    """the language's tokens in the prefix"""
    selected: int
    jaccard_final: float
    jaccard_previous: float | None
    """to the previous point's mask (None at the first point)"""


def prefix_shards(plan: ShardPlan, groups: list[int], points: int) -> np.ndarray:
    """int64 ``[J, G]``: the shards of each store group taken at each point, ``ceil(j · n_g / J)`` of its
    ``n_g``, ``J = min(points, max n_g over groups)``. Every store group grows, those not in ``groups``
    too: a method may read them (act-prob-90p's pooled percentile is over every group), and the last
    point is the totals of every group."""
    n = np.array([len(plan.rows(g)) for g in range(plan.tokens.shape[1])], np.int64)
    count = min(points, int(n[groups].max(initial=0)))
    steps = np.arange(1, count + 1, dtype=np.int64)[:, None]
    return -(-steps * n[None, :] // max(count, 1))


def prefix_weights(plan: ShardPlan, taken: np.ndarray) -> np.ndarray:
    """Weights ``[S, G]``: 1 for the first ``taken[g]`` shards of each group ``g`` in plan order."""
    weights = np.zeros_like(plan.tokens)
    for g, k in enumerate(taken):
        weights[plan.rows(g)[:int(k)], g] = 1
    return weights


def _check_points(plan: ShardPlan, counts, groups: list[int]) -> None:
    """One point is no curve; a group of one shard cannot grow (said in one line)."""
    shard_tokens = counts.attrs.settings.shard_tokens
    sizes = {counts.attrs.corpus.groups[g]: len(plan.rows(g)) for g in groups}
    if max(sizes.values(), default=0) < 2:
        raise HarvestError(f"store {counts.store}: every group has one shard, so the curve has one point only; "
                           f"--shard-tokens sets the granularity (this harvest: {shard_tokens}): harvest again "
                           "with a smaller one")
    single = [g for g, n in sizes.items() if n == 1]
    if single:
        print(f"lsn: warning: {', '.join(single)} {'has' if len(single) == 1 else 'have'} one shard, whole from the "
              f"first point on (--shard-tokens {shard_tokens} sets the granularity)", file=sys.stderr)


def language_tokens(mask: Mask, counts) -> list[int]:
    """Each mask language's tokens in ``counts`` (a language the counts do not name, the localizer's
    ``A>B``: all their tokens)."""
    return [int(counts.tokens[counts.names.index(lang)]) if lang in counts.names else int(counts.tokens.sum())
            for lang in mask.languages]


IN_MEMORY = 1 << 29
"""Activation counts ``[K, L, I]`` up to this many bytes are summed in memory, each shard read once for
all the points; larger ones are summed from the shard rows at every point (and every pass of the method)."""


class _Prefixes:
    """Counts over growing sets of shards (:func:`analysis.shards.weighted`); their activation counts, when
    they fit :data:`IN_MEMORY`, those of the previous call plus the shards added since (integers: the same
    sums), so that each shard is read once."""

    def __init__(self, counts):
        self.counts = counts
        self.numer = np.zeros(counts.numer.shape, np.int64) if counts.numer.nbytes <= IN_MEMORY else None
        self.summed: dict[int, np.ndarray] = {}  # shard index -> its weights [G] in self.numer

    def at(self, plan: ShardPlan, weights: np.ndarray):
        import dask.array as da

        part = weighted(self.counts, plan, weights)
        if self.numer is None or part.numer.dtype != np.int64:
            return part
        before = np.zeros_like(weights)
        for s, index in enumerate(plan.indices):
            before[s] = self.summed.get(int(index), 0)
        self.numer = self.numer + weighted(self.counts, plan, weights - before).numer.compute()
        self.summed.update({int(index): weights[s] for s, index in enumerate(plan.indices)})
        return replace(part, numer=da.from_array(self.numer, chunks=self.counts.numer.chunks))


def curve(counts, select, points: int = DEFAULT_POINTS, progress: bool = True) -> tuple[list[Point], Mask]:
    """The points of the convergence curve of ``select`` (counts -> :class:`Mask`) over the store of
    ``counts``, and the final mask (the last point's: from the totals, as ``lsn analyze`` selects)."""
    from tqdm.auto import tqdm

    plan = shard_plan(counts.store, counts.attrs, "lsn convergence")
    groups = sorted({g for idx in counts.index for g in idx})
    _check_points(plan, counts, groups)
    taken = prefix_shards(plan, groups, points)
    prefixes = _Prefixes(counts)
    steps = []  # (shards, mask, tokens) per point
    for j in tqdm(range(len(taken)), unit="point", desc="convergence", disable=not progress, file=sys.stderr):
        weights = prefix_weights(plan, taken[j])
        part = counts if j == len(taken) - 1 else prefixes.at(plan, weights)
        mask = select(part)
        steps.append((int((weights.sum(axis=1) > 0).sum()), mask, language_tokens(mask, part)))
    final = steps[-1][1]
    rows = []
    for j, (shards, mask, tokens) in enumerate(steps):
        to_final = mask.jaccard(final)
        to_previous = steps[j - 1][1].jaccard(mask) if j else None
        rows += [Point(j + 1, shards, lang, tokens[k], int(mask.selected[k].size), float(to_final[k]),
                       None if to_previous is None else float(to_previous[k]))
                 for k, lang in enumerate(mask.languages)]
    return rows, final


# -- outputs -------------------------------------------------------------------------------------
HEADER = ["point", "shards", "language", "tokens", "selected", "jaccard_final", "jaccard_previous"]


def csv_text(rows: list[Point]) -> str:
    """``convergence.csv``: one row per point and language (Jaccards as Python writes floats exactly)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(HEADER)
    writer.writerows([r.point, r.shards, r.language, r.tokens, r.selected, repr(r.jaccard_final),
                      "" if r.jaccard_previous is None else repr(r.jaccard_previous)] for r in rows)
    return text.getvalue()


def figure(rows: list[Point], title: str):
    """Jaccard to the final mask against the language's tokens, one line per language; log x when the
    tokens span more than a factor 10."""
    from matplotlib.figure import Figure

    from analysis.report import _wrap

    languages = list(dict.fromkeys(r.language for r in rows))
    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for lang in languages:
        mine = [r for r in rows if r.language == lang]
        ax.plot([r.tokens for r in mine], [r.jaccard_final for r in mine], marker="o", markersize=3, label=lang)
    positive = [r.tokens for r in rows if r.tokens > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_xscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("tokens of the language in the prefix")
    ax.set_ylabel("Jaccard to the full-data mask")
    ax.set_title("\n".join(_wrap(title, 90)), fontsize=9)
    if len(languages) <= 40:
        ax.legend(fontsize=7, ncol=max(1, len(languages) // 12), loc="lower right")
    return fig


def write(rows: list[Point], final: Mask, out: Path) -> list[Path]:
    """``convergence.csv``, ``convergence.png`` and the final mask ``mask.npz`` in ``out``, each whole or
    not at all."""
    from analysis.report import describe

    fs.write_text(str(out / "convergence.csv"), csv_text(rows))
    with fs.atomic_write(str(out / "convergence.png")) as f:
        figure(rows, f"Convergence in tokens: {describe(final)}").savefig(f, format="png", backend="agg")
    return [out / "convergence.csv", out / "convergence.png", final.save(out / "mask.npz")]


def table(rows: list[Point]) -> str:
    """Per language: its tokens and selected units, the Jaccard to the final mask at half the points and
    at the point before the last, and the tokens from which it stays at least :data:`STABLE`."""
    count = max(r.point for r in rows)
    lines = [f"{'language':<12} {'tokens':>12} {'selected':>9} {'J half':>7} {'J before last':>13} "
             f"{f'J >= {STABLE} from':>15}"]
    for lang in dict.fromkeys(r.language for r in rows):
        mine = {r.point: r for r in rows if r.language == lang}
        last, half, before = mine[count], mine[-(-count // 2)], mine[count - 1]
        stable = [p for p in range(1, count + 1) if all(mine[q].jaccard_final >= STABLE for q in range(p, count + 1))]
        lines.append(f"{lang:<12} {last.tokens:>12} {last.selected:>9} {half.jaccard_final:>7.3f} "
                     f"{before.jaccard_final:>13.3f} {mine[stable[0]].tokens:>15}")
    return "\n".join(lines)


HOW_TO_READ = ("Jaccard of each prefix's mask to the full-data mask; a curve that flattens near 1 (J before last "
               "close to 1) says more tokens would hardly change the mask; one still rising says harvest more")


# -- a running harvest ---------------------------------------------------------------------------
class PartialReport:
    """``lsn harvest --report-every K``: called once per shard the harvest finishes; every ``every``-th
    call prints, per language, the tokens so far, the selected count of ``select`` over the shards
    finished so far (:func:`analysis.shards.partial_counts`) and the Jaccard to the previous report's
    mask, every line labelled partial. It only reads the store; a report that fails says so in one line
    and the harvest goes on."""

    def __init__(self, store: str, every: int, select, method: str):
        self.store, self.every, self.select, self.method = store, every, select, method
        self.finished, self.previous, self.prefixes = 0, None, None

    def __call__(self) -> None:
        self.finished += 1
        if self.finished % self.every:
            return
        try:
            lines = self.lines()
        except Exception as err:  # noqa: BLE001 - a look at the data so far never stops the harvest
            lines = [f"lsn: warning: partial report after {self.finished} shards failed "
                     f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); the harvest goes on"]
        from tqdm.auto import tqdm

        for line in lines:
            tqdm.write(line, file=sys.stderr if line.startswith("lsn:") else sys.stdout)

    def lines(self) -> list[str]:
        counts = partial_counts(self.store)
        plan = counts.shards[0]
        self.prefixes = self.prefixes or _Prefixes(counts)
        counts = self.prefixes.at(plan, plan.ones())
        mask = self.select(counts)
        tokens = language_tokens(mask, counts)
        same = self.previous is not None and self.previous.languages == mask.languages
        to_previous = self.previous.jaccard(mask) if same else None
        self.previous = mask
        done = len(plan.indices)
        return [f"partial [{done} shards done, store not complete] {lang}: "
                f"{f'{tokens[k]} tokens so far' if tokens[k] else 'no tokens yet'}, "
                f"{mask.selected[k].size} selected ({self.method}), Jaccard to the previous report "
                f"{'-' if to_previous is None else f'{to_previous[k]:.3f}'}"
                for k, lang in enumerate(mask.languages)]
