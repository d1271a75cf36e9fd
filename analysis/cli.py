"""``lsn analyze METHOD``, ``lsn mask export|import``, ``lsn import``, ``lsn report``: their options
(one dataclass per command, a docstring under each field) and what each runs."""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from dataclasses import dataclass
from typing import ClassVar, Literal

from analysis import dln, methods
from analysis.convergence import DEFAULT_POINTS
from analysis.data import BY
from harvester.errors import HarvestError
from harvester.fs import output_dir, output_file
from harvester.options import Command, Group, Positive


def _langs(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _default(function, name: str):
    """The default of ``function``'s parameter ``name``: the method's own, shown by ``--help``."""
    return inspect.signature(function).parameters[name].default


def _summary(function) -> str:
    """The first line of ``function``'s docstring: the method in one line."""
    return inspect.getdoc(function).splitlines()[0]


@dataclass(kw_only=True)
class MethodOptions:
    """What every selection method takes: the store, the languages, the outputs and the Dask scheduler."""

    METHOD: ClassVar[str] = ""
    store: str
    """the store to select from"""
    out: str
    """mask file to write (.npz)"""
    langs: str | None = None
    """languages in mask order, comma-separated: groups, or NAME=G1+G2 (a sum of groups); with --by, names of
    its languages (none: as --by)"""
    by: Literal[BY] | None = None
    """languages without --langs (none: language): language: the store's languages (EC40 sides pooled per
    language; the response groups of prompt/response stores); direction: EC40 directions, both sides pooled;
    group: every group"""
    report: str | None = None
    """also write a report (CSV, Markdown, PNG) into this directory"""
    dask_address: str | None = None
    """an existing Dask scheduler (tcp://host:8786)"""
    local_cluster: Positive | None = None
    """run on a dask.distributed LocalCluster of N workers (none: Dask's threaded scheduler)"""
    bootstrap: Positive | None = None
    """also select on N bootstrap resamples of the store's shards (each group's shards drawn with
    replacement) and store in the mask how often each neuron was selected, the stable mask and each
    resample's Jaccard to the full-data mask (see README); needs a harvested store's shard rows"""
    seed: int = 0
    """seed of the bootstrap's draws (numpy.random.default_rng): the same seed gives the same mask file"""
    stable: float = 0.9
    """with --bootstrap: the stable mask holds the neurons selected in at least ceil(F * N) resamples"""
    no_progress: bool = False
    """no progress bar over the bootstrap resamples"""

    HOLD_ACTIVE: ClassVar[bool] = False
    """The method reads the activation counts in several passes: a bootstrap resample computes them once
    and holds them (analysis.bootstrap.HOLD_BYTES) instead of summing its shard rows again for each pass."""

    def select(self, counts):
        """The mask of this method over ``counts`` (None: no mask). It prints nothing: a bootstrap runs it
        once per resample (see :meth:`run`)."""
        raise NotImplementedError

    def summary(self, mask) -> list[str]:
        """Lines printed after ``wrote MASK`` (none by default)."""
        return []

    def run(self, counts) -> tuple:
        """The full-data selection as the command shows it: ``(mask or None, lines to print last)``; what
        a method says about its result (a warning, λ) it prints here, once."""
        return self.select(counts), []


@dataclass(kw_only=True)
class ProbabilityOptions(MethodOptions):
    """Methods over activation probabilities, which can count the response tokens alone."""

    response_only: bool = False
    """prompt/response stores: count the response groups only"""


def _mask(options: MethodOptions, counts, params: dict, result: dict, extra: dict | None = None, names=None):
    from analysis.masks import Mask

    return Mask(names or counts.names, counts.n_layers, counts.width, result["selected"], options.METHOD, params,
                counts.source(), extra or {})


@dataclass(kw_only=True)
class LapeFamilyOptions(ProbabilityOptions):
    """The two thresholds LAPE and its variant share."""

    HOLD_ACTIVE: ClassVar[bool] = True

    filter_rate: float = _default(methods.lape, "filter_rate")
    """quantile of the activation probabilities a neuron must exceed in some language"""
    bar_ratio: float = _default(methods.lape, "bar_ratio")
    """quantile of a selected neuron's probabilities that makes a language its own"""


@dataclass(kw_only=True)
class LapeOptions(LapeFamilyOptions):
    METHOD: ClassVar[str] = "lape"
    top_rate: float = _default(methods.lape, "top_rate")
    """share of all neurons selected (over all languages)"""

    def select(self, counts):
        params = dict(top_rate=self.top_rate, filter_rate=self.filter_rate, bar_ratio=self.bar_ratio)
        result = methods.lape(counts.probabilities(), **params)
        return _mask(self, counts, params, result, {"tau": result["tau"], "beta": result["beta"]})


@dataclass(kw_only=True)
class LapeVariantOptions(LapeFamilyOptions):
    METHOD: ClassVar[str] = "lape-variant"
    rate: float = _default(methods.lape_variant, "rate")
    """share of all neurons: the m-th smallest entropy is the threshold"""

    def select(self, counts):
        params = dict(rate=self.rate, filter_rate=self.filter_rate, bar_ratio=self.bar_ratio)
        result = methods.lape_variant(counts.probabilities(), **params)
        return _mask(self, counts, params, result, {k: result[k] for k in ("threshold", "tau", "beta") if k in result})


@dataclass(kw_only=True)
class EntropyFamilyOptions(ProbabilityOptions):
    """What entropy-λ and its autosweep share."""

    HOLD_ACTIVE: ClassVar[bool] = True

    METHOD: ClassVar[str] = "entropy-lambda"
    top_rate: float = _default(methods.EntropyLambda, "top_rate")
    """share of neurons with the highest activation probability considered"""
    bar_ratio: float = _default(methods.EntropyLambda, "bar_ratio")
    """quantile of the probabilities that makes a language a neuron's own"""


@dataclass(kw_only=True)
class EntropyLambdaOptions(EntropyFamilyOptions):
    lambda_: float
    """the threshold λ on the normalised entropy"""

    def select(self, counts):
        model = methods.EntropyLambda(counts.probabilities(), self.top_rate, self.bar_ratio)
        params = dict(top_rate=self.top_rate, bar_ratio=self.bar_ratio, **{"lambda": self.lambda_})
        extra = {"appear": model.appear(self.lambda_), "beta": model.beta}
        return _mask(self, counts, params, {"selected": model.masks(self.lambda_)}, extra)


@dataclass(kw_only=True)
class AutosweepOptions(EntropyFamilyOptions):
    out: str | None = None
    """mask file to write (.npz) at the λ found (none: print λ only)"""
    lo: float = _default(methods.EntropyLambda.autosweep, "lo")
    """lowest λ searched"""
    hi: float = _default(methods.EntropyLambda.autosweep, "hi")
    """highest λ searched"""
    eps: float = _default(methods.EntropyLambda.autosweep, "eps")
    """precision of the bisection on λ"""
    json: bool = False
    """last line: {"lambda": ..., "appear": [...]}"""

    def select(self, counts):
        return self._search(counts)[0]

    def run(self, counts):
        mask, lam, appear = self._search(counts)
        if lam is None:
            print(f"no λ in [{self.lo}, {self.hi}] leaves appear[K] = 0 (appear at lo: {appear})")
        else:
            print(f"λ = {lam} (appear = {appear})")
        return mask, [json.dumps({"lambda": lam, "appear": appear})] if self.json else []

    def _search(self, counts) -> tuple:
        """``(mask at the λ found or None, λ, appear)``."""
        model = methods.EntropyLambda(counts.probabilities(), self.top_rate, self.bar_ratio)
        lam, appear = model.autosweep(self.lo, self.hi, self.eps)
        if lam is None:
            return None, lam, appear
        params = dict(top_rate=self.top_rate, bar_ratio=self.bar_ratio, lo=self.lo, hi=self.hi, eps=self.eps)
        mask = _mask(self, counts, {**params, "lambda": lam, "autosweep": True}, {"selected": model.masks(lam)},
                     {"appear": appear, "beta": model.beta})
        return mask, lam, appear


@dataclass(kw_only=True)
class ActProbZeroOptions(ProbabilityOptions):
    METHOD: ClassVar[str] = "act-prob-zero"
    rate: float = _default(methods.act_prob_zero, "rate")
    """share of each layer's neurons (L * I) each language keeps"""

    def select(self, counts):
        return _mask(self, counts, dict(rate=self.rate), methods.act_prob_zero(counts.probabilities(), self.rate))


@dataclass(kw_only=True)
class ActProb90pOptions(ProbabilityOptions):
    METHOD: ClassVar[str] = "act-prob-90p"
    rate: float = _default(methods.act_prob_90p, "rate")
    """share of each layer's neurons (L * I) each language keeps"""
    percent: int = _default(methods.act_prob_90p, "percent")
    """the percentile of each neuron's activations (pooled, own: needs --stats ...,hist; batch-mean: the harvest's)"""
    percentile_of: Literal[methods.PERCENTILE_OF] = _default(methods.act_prob_90p, "percentile_of")
    """whose activations the percentile is of: pooled, all the store's groups together; own, each language's
    (read from a histogram every neuron then scores 1 - percent/100, see README); batch-mean, each language's
    mean over batches of per-batch percentiles, Mondal et al.'s code (a store harvested with --stats
    active,above --thresholds-from a --stats active,batch_quantile store, see README)"""

    def select(self, counts):
        if self.percentile_of == "batch-mean":
            return self._batch_mean(counts)
        params = dict(rate=self.rate, percent=self.percent, percentile_of=self.percentile_of,
                      percentile=f"{PERCENTILE_OVER[self.percentile_of]}, interpolated linearly inside its "
                                 "histogram bin")
        hist = counts.variable("hist")  # a store without it: one line naming --stats
        pool = counts.pooled("hist") if self.percentile_of == "pooled" else None  # every harvested group
        result = methods.act_prob_90p(hist, counts.tokens, self.percent, self.rate,  # pooled, whatever
                                      self.percentile_of, pool)  # --langs picks
        return _mask(self, counts, params, result)

    def run(self, counts):
        if self.percentile_of == "own":
            print("lsn: warning: --percentile-of own: each language's share above its own percentile is "
                  f"{100 - self.percent}% for every neuron with tokens; the mask is decided by ties (flat index)",
                  file=sys.stderr)
        return super().run(counts)

    def _batch_mean(self, counts):
        """The share of each language's tokens above its mean batch percentile, counted by the harvest."""
        source = counts.attrs.settings.thresholds_from
        if "above" not in counts.attrs.settings.stats or not source:
            raise HarvestError(f"--percentile-of batch-mean needs a store harvested with --stats active,above "
                               f"--thresholds-from STORE (itself harvested with --stats active,batch_quantile "
                               f"--batch-quantile {self.percent / 100:g}); {counts.store} has no 'above' statistic")
        pooled = [name for name, groups in zip(counts.names, counts.groups) if len(groups) != 1]
        if pooled:  # each group's above counts its own threshold: their sum is above no threshold at all
            raise HarvestError(f"--percentile-of batch-mean takes one store group per language (each group's "
                               f"'above' counts its own threshold); {', '.join(pooled)} pools several: pass "
                               "--by group, or --langs naming single groups")
        if round(100 * source["batch_quantile"], 9) != self.percent:
            raise HarvestError(f"--percent {self.percent}: the store's thresholds are batch quantiles "
                               f"{source['batch_quantile']:g}; pass --percent {100 * source['batch_quantile']:g}")
        params = dict(rate=self.rate, percent=self.percent, percentile_of=self.percentile_of,
                      percentile=f"{PERCENTILE_OVER['batch-mean']} {source['batch_size']} x {source['seq_len']} "
                                 f"tokens, from {source['store']}")
        return _mask(self, counts, params, methods.act_prob_90p_batch_mean(counts.variable("above"), counts.tokens,
                                                                           self.rate))


MONDAL_90P: dict = {"percentile_of": "batch-mean", "percent": 90, "rate": 0.00125}
"""Mondal et al.'s act_prob_90p (``activation.py``, ``lang_neurons.py``) for ``--preset mondal``: each
language's share of tokens above its own mean batch P90, its top 0.125% of L * I."""

MONDAL_LAPE: dict = {"rate": 0.01}
"""Mondal et al.'s LAPE variant for ``--preset mondal``: every neuron with entropy at most the m-th smallest,
m = round(0.01 * L * I)."""


PERCENTILE_OVER = {"pooled": "the neuron's, over all harvested groups pooled",
                   "own": "the neuron's, over each language's own tokens",
                   "batch-mean": "each language's mean of per-batch percentiles, over full batches of"}


@dataclass(kw_only=True)
class CoverageOptions(MethodOptions):
    METHOD: ClassVar[str] = "coverage"
    k: float = _default(methods.coverage, "k")
    """share of each layer's total count to cover"""
    rule: Literal[methods.COVERAGE_RULES] = _default(methods.coverage, "rule")
    """reach: the shortest prefix of neurons (most counted first, ties by index) whose cumulative count reaches
    k of the layer's total (Tan et al.); within: the neurons whose cumulative share, their own count included,
    is at most k (the Aya study's cumsum / total <= k: one fewer unless a prefix hits k exactly)"""
    statistic: Literal["active", "nonzero"] = "active"
    """the count the neurons are sorted by: active (values > 0), or nonzero (values != 0; harvested with
    --stats ...,nonzero, as the Aya study counted at --unit down-input)"""

    def select(self, counts):
        values = counts.numer if self.statistic == "active" else counts.variable(self.statistic)
        params = dict(k=self.k, rule=self.rule, statistic=self.statistic)
        return _mask(self, counts, params, methods.coverage(values, self.k, self.rule))


@dataclass(kw_only=True)
class LocalizerOptions(MethodOptions):
    METHOD: ClassVar[str] = "localizer"
    a: str
    """groups of condition A, comma-separated (e.g. S)"""
    b: str
    """groups of condition B (e.g. N)"""
    top_percent: float = 1.0
    """percent of units selected"""
    per_layer: bool = _default(methods.localizer, "per_layer")
    """select the top percent of each layer instead of over all layers"""
    statistic: Literal["t", "mean-diff"] = _default(methods.localizer, "statistic")
    """Welch's t, or the difference of the means"""
    signed: bool = False
    """use act_sum instead of the absolute act_abssum"""
    count: Literal["round", "int"] = _default(methods.localizer, "rule")
    """how many units the percent is: round(p·n/100), or int((p/100)·n) as the localizer reference"""
    ties: Literal["index", "all"] = _default(methods.localizer, "ties")
    """index: exactly that many, ties to the smaller index; all: every unit whose statistic is among that
    many largest distinct values (the reference's np.unique rank), so possibly more"""

    def select(self, counts):
        _check_pooled(counts)
        names = counts.names
        a, b = _langs(self.a), _langs(self.b)
        unknown = [g for g in a + b if g not in names]
        if unknown:
            raise HarvestError(f"unknown group '{unknown[0]}'; groups: {', '.join(names)}")
        sums = counts.variable("act_sum" if self.signed else "act_abssum")
        result = methods.localizer(counts.tokens, sums, counts.variable("act_sqsum"), [names.index(g) for g in a],
                                   [names.index(g) for g in b], self.top_percent, self.per_layer, self.statistic,
                                   self.count, self.ties)
        params = dict(a=a, b=b, top_percent=self.top_percent, per_layer=self.per_layer, statistic=self.statistic,
                      values="signed" if self.signed else "absolute", count=self.count, ties=self.ties)
        return _mask(self, counts, params, result, {"n_a": result["n_a"], "n_b": result["n_b"],
                                                    "count": result["count"]}, [f"{'+'.join(a)}>{'+'.join(b)}"])


@dataclass(kw_only=True)
class DlnOptions(MethodOptions):
    METHOD: ClassVar[str] = "dln"
    pct: float = _default(dln.dln, "pct")
    """bottom percentile P of all n pairwise overlaps (every neuron, every pair of languages): tau is the
    max(1, int(n·P/100))-th smallest, and a neuron is selected when the largest overlap across its best
    split is at most tau (the study's default)"""

    def select(self, counts):
        self._check(counts)
        result = dln.dln(counts.variable("hist"), self.pct)
        extra = {"tau": result["tau"], "n": result["n"], "rank": result["rank"],
                 **dln.populations(result, counts.names)}
        params = dict(pct=self.pct, bipartitions=len(result["parts"]),
                      rule="per neuron the first two-sided split of least largest cross overlap; selected when "
                           "that is <= tau; listed under the languages of its smaller side")
        return _mask(self, counts, params, result, extra)

    @staticmethod
    def _check(counts) -> None:
        if len(counts.names) < 2:
            raise HarvestError(f"DLN splits each neuron's languages in two sides; it needs at least 2 languages, "
                               f"got {len(counts.names)} ({', '.join(counts.names)})")
        if "hist" not in counts.attrs.settings.stats:
            raise HarvestError(f"DLN reads each language's activation histograms; store {counts.store} has none: "
                               "harvest with --stats ...,hist")

    def run(self, counts) -> tuple:
        self._check(counts)
        _dln_notes(counts)
        return self.select(counts), []

    def summary(self, mask) -> list[str]:
        e = mask.extra
        return [f"tau {e['tau']:.6g} (the {e['rank']}-th smallest of {e['n']} pairwise overlaps, pct {mask.params['pct']:g}): "
                f"{e['sln_total']} single-language neurons (SLN), {e['mln_total']} multi-language (MLN)",
                "SLN: " + ", ".join(f"{k} {v}" for k, v in e["sln"].items()) + "; MLN: "
                + ", ".join(f"{k} {v}" for k, v in e["mln"].items()), *_even_splits(mask)]


def _even_splits(mask) -> list[str]:
    """A note on neurons whose best split halves an even number of languages: neither side is the smaller,
    and (as in the study's code) they are listed under the side holding the first language only."""
    K, even = len(mask.languages), mask.extra.get("even", 0)
    if not even:
        return []
    return [f"lsn: note: {even} selected neuron(s) split the {K} languages evenly ({K // 2} against {K // 2}); as "
            f"in the study's code they are listed under the side with {mask.languages[0]} (the first of --langs) "
            "only, so the other side's languages get none of them; the mask's extra['sides'] counts each split"]


def _dln_notes(counts) -> None:
    """DLN's one-line notes: a language without tokens, and histograms on fixed edges."""
    for name, n in zip(counts.names, counts.tokens):
        if n == 0:
            print(f"lsn: warning: DLN: {name}'s histograms are empty, so it overlaps 0 with every language: "
                  f"every neuron's least cost is then 0 and every neuron is selected (mostly as an SLN of {name}); "
                  "leave it out with --langs", file=sys.stderr)
    edges = counts.attrs.settings.hist_edges
    if edges:
        _note([f"note: the histograms are on fixed edges ({len(edges) + 1} bins, {edges[0]:g} to {edges[-1]:g}, the "
               "same for every neuron); the study bins each neuron on its own range (--hist-edges from-store:...)"])


def _check_pooled(counts) -> None:
    """The localizer compares samples (one pooled vector per stimulus), never token counts."""
    pooling = counts.attrs.settings.pooling
    if pooling not in ("last", "mean"):
        raise HarvestError(f"store {counts.store} counts tokens (pooling {pooling or 'not recorded'}), not one "
                           "sample per stimulus; the localizer needs a store harvested with --pooling last "
                           "(or mean)")


LOCALIZER: dict = {"top_percent": 1.0, "statistic": "t", "count": "int", "ties": "all"}
"""The localizer reference's selection as ``analyze localizer`` values (``--preset localizer``): the top 1 %
of all units (global) by Welch t on absolute values, ``int()`` of the count, every tie at the cut-off in."""


AYA: dict = {"statistic": "nonzero", "k": 0.9, "rule": "within", "by": "direction"}
"""The Aya EC40 study's selection as ``analyze coverage`` values (``--preset aya``; its
``visualization-scripts/*-IoU.py``, after Tan et al.'s notebook): per direction (one count file per
language pair) and layer, neurons sorted by their non-zero count, kept while ``cumsum / total <= 0.9``.
Its ``np.argsort`` (quicksort) orders tied counts as it happens to; lsn breaks ties by neuron index."""


@dataclass(kw_only=True)
class RandomOptions:
    mask: str
    """the mask to control for"""
    out: str
    """mask file to write (.npz)"""
    seed: int = 0
    """seed of the generator"""
    store: str | None = None
    """check that the mask fits this store"""
    scope: Literal["layer", "global"] = _default(methods.random_control, "scope")
    """layer: as many per layer as the mask has there, from that layer's other neurons; global: from all
    neurons outside the mask, over all layers (the localizer reference's random_mask.py)"""
    generator: Literal["default", "legacy"] = _default(methods.random_control, "generator")
    """default: numpy.random.default_rng(seed); legacy: numpy.random.seed(seed) then numpy.random.choice, as
    the localizer reference (its seeds 42, 43, 44 then draw the same units)"""
    size: Literal["mask", "count"] = "mask"
    """mask: as many units as the mask selects; count: as many as its method asked for before ties were
    added (a localizer mask's count; the reference draws int(p·units/100)), with --scope global"""


LOCALIZER_RANDOM: dict = {"scope": "global", "generator": "legacy", "size": "count", "seed": 42}
"""The localizer reference's random control as ``analyze random`` values (``--preset localizer``); it also
draws seeds 43 and 44."""


@contextlib.contextmanager
def _scheduler(args):
    """Dask's threaded scheduler, a LocalCluster, or an existing cluster."""
    if getattr(args, "dask_address", None) or getattr(args, "local_cluster", None):
        from dask.distributed import Client, LocalCluster

        from harvester.signals import deferred

        with contextlib.ExitStack() as running:
            with deferred():  # SIGINT/SIGTERM while it starts: stop once it can be shut down
                if args.dask_address:
                    client = running.enter_context(Client(args.dask_address))
                else:
                    cluster = running.enter_context(LocalCluster(
                        n_workers=args.local_cluster, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None))
                    client = running.enter_context(Client(cluster))
            yield client
    else:
        yield None


def _note(notes: list[str]) -> None:
    for note in notes:
        print(f"lsn: {note}", file=sys.stderr)


def _describe(mask) -> str:
    return ", ".join(f"{lang} {len(sel)}" for lang, sel in zip(mask.languages, mask.selected))


def analyze(options: MethodOptions) -> None:
    """Select with ``options``' method and write its mask (and report); with ``--bootstrap``, its
    stability over shard resamples too."""
    from analysis import bootstrap

    bootstrap.check_options(options.bootstrap, options.stable, options.seed)
    if options.bootstrap and not options.out:
        raise HarvestError("--bootstrap needs --out: the mask file holds the bootstrap's results")
    if options.out:
        output_file(options.out, make=False)
    with _opened(options) as counts:
        plan = bootstrap.prepare(counts) if options.bootstrap else None  # refused before any work
        mask, last = options.run(counts)
        if mask is not None and options.out:
            if plan is not None:
                mask.bootstrap = bootstrap.stability(options, counts, plan, mask)
            _write(options, mask)
        for line in last:
            print(line)


@contextlib.contextmanager
def _opened(options: MethodOptions):
    """A method's checks before any work, then its store's counts (said in one line when chosen by
    default, warned about when a language has no tokens) on its Dask scheduler."""
    from analysis.data import open_counts

    _check_rates(options)
    if options.report:
        output_dir(options.report, "--report", make=False)
    with _scheduler(options):
        counts = open_counts(options.store, _langs(options.langs), getattr(options, "response_only", False),
                             options.by)
        _note([counts.note] if counts.note else [])
        _warn_empty_groups(counts)
        yield counts


@dataclass(kw_only=True)
class ConvergenceOptions:
    """What ``lsn convergence METHOD`` adds to the method's own options (those of ``lsn analyze METHOD``)."""

    out: str
    """directory for convergence.csv, convergence.png and the full-data mask (mask.npz)"""
    points: Positive = DEFAULT_POINTS
    """points on the curve, J (2 or more): at point j each store group takes its first ceil(j·n/J) of its n
    shards (in plan order); at most the largest group's shard count; the last point is all the data"""
    no_progress: bool = False
    """no progress bar"""


def _convergence_options(options: type) -> type:
    """``options`` (a method's) with :class:`ConvergenceOptions`' fields; ``--out`` names a directory."""
    name = options.__name__.removesuffix("Options") + "ConvergenceOptions"
    return dataclass(kw_only=True)(type(name, (ConvergenceOptions, options), {}))


def convergence(options) -> None:
    """Masks from growing prefixes of each group's shards against the full-data mask: CSV, PNG, a table."""
    from analysis.convergence import HOW_TO_READ, curve, table, write

    if options.bootstrap:
        raise HarvestError("lsn convergence takes no --bootstrap: it grows prefixes of the shards; "
                           "resample them with lsn analyze ... --bootstrap N")
    if options.points < 2:
        raise HarvestError(f"--points must be 2 or more, got {options.points}: one point is the full-data mask only")
    output_dir(options.out, make=False)
    with _opened(options) as counts:
        rows, final = curve(counts, options.select, options.points, not options.no_progress)
    written = write(rows, final, output_dir(options.out))
    print(f"{final.method} on {max(r.point for r in rows)} growing prefixes of {options.store}: {HOW_TO_READ}")
    print(table(rows))
    print(f"wrote {', '.join(str(p) for p in written)}")
    _warn_empty_masks(final)
    if options.report:
        from analysis.report import write_report

        print(f"report: {write_report(final, options.report)}")


def random_mask(options: RandomOptions) -> None:
    from analysis.masks import Mask

    base = Mask.load(options.mask)
    if options.store:
        _note(base.check_store(options.store))
    selected = methods.random_control(base.selected, base.n_layers, base.width, options.seed, options.scope,
                                      options.generator, _sizes(options, base))
    mask = Mask(base.languages, base.n_layers, base.width, selected, "random",
                {"seed": options.seed, "controls": base.method, "of": options.mask, "scope": options.scope,
                 "generator": options.generator, "size": options.size}, base.source)
    print(f"wrote {mask.save(options.out)}: {_describe(mask)}")
    _warn_empty_masks(mask)


def _sizes(options: RandomOptions, base) -> list[int] | None:
    """``--size count``: the count the mask's method asked for (recorded in the mask), not its size."""
    if options.size == "mask":
        return None
    if options.scope != "global":
        raise HarvestError("--size count needs --scope global (a count is over all layers)")
    if not isinstance(base.extra.get("count"), int):
        raise HarvestError(f"mask {options.mask} records no count (only localizer masks do); use --size mask")
    return [base.extra["count"]] * len(base.selected)


def _write(args, mask) -> None:
    path = mask.save(args.out)
    print(f"wrote {path}: {mask.method}, {_describe(mask)}")
    for line in args.summary(mask):
        print(line, file=sys.stderr if line.startswith("lsn: ") else sys.stdout)
    if mask.bootstrap is not None:
        from analysis.bootstrap import summary

        print("\n".join(summary(mask)))
    _warn_empty_masks(mask)
    if getattr(args, "report", None):
        from analysis.report import write_report

        print(f"report: {write_report(mask, args.report)}")


def _warn_empty_groups(counts) -> None:
    """A language counted over no token: its probabilities are zeros, not a measurement."""
    for name, n, groups in zip(counts.names, counts.tokens, counts.groups):
        if n == 0:
            print(f"lsn: warning: language {name} has no tokens in {counts.store} (groups {', '.join(groups)}); "
                  "its probabilities are all zero, and nothing selected for it is evidence", file=sys.stderr)


def _warn_empty_masks(mask) -> None:
    empty = mask.empty_languages()
    if empty:
        print(f"lsn: warning: the mask selects no unit for {', '.join(empty)}; interventions on "
              f"{'it' if len(empty) == 1 else 'them'} change nothing", file=sys.stderr)


def _check_rates(args) -> None:
    for name in ("top_rate", "filter_rate", "bar_ratio", "rate", "k"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:
            raise HarvestError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
    for name in ("filter_rate", "bar_ratio"):  # quantiles of the probabilities: 0 names no value
        if getattr(args, name, None) == 0:
            raise HarvestError(f"--{name.replace('_', '-')} is a quantile and must lie in (0, 1], got 0")
    for name in ("top_percent", "percent", "pct"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 100:
            raise HarvestError(f"--{name.replace('_', '-')} must lie in [0, 100], got {value}")
    if getattr(args, "eps", None) is not None and not args.eps > 0:
        raise HarvestError(f"--eps must be positive, got {args.eps}")


@dataclass(kw_only=True)
class ExportOptions:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("mask", "out")
    mask: str
    """mask file (.npz)"""
    out: str
    """file to write"""
    format: Literal["rucaibox"] = "rucaibox"
    """the published format: rucaibox (LAPE's per-language, per-layer index tensors, .pt)"""


def export_mask(options: ExportOptions) -> None:
    from analysis.masks import Mask

    print(f"wrote {Mask.load(options.mask).export_rucaibox(options.out)}")


@dataclass(kw_only=True)
class MaskImportOptions:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("src", "out")
    src: str
    """the published mask file"""
    out: str
    """mask file to write (.npz)"""
    format: Literal["rucaibox"] = "rucaibox"
    """the published format: rucaibox (LAPE's per-language, per-layer index tensors, .pt)"""
    langs: str | None = None
    """names of the file's languages, in order, comma-separated"""
    width: Positive | None = None
    """neurons per layer (none: largest index + 1)"""


def import_mask(options: MaskImportOptions) -> None:
    from analysis.masks import Mask

    mask = Mask.import_rucaibox(options.src, _langs(options.langs), options.width)
    print(f"wrote {mask.save(options.out)}: {_describe(mask)}")


@dataclass(kw_only=True)
class StableOptions:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("mask", "out")
    mask: str
    """mask file written with lsn analyze ... --bootstrap N"""
    out: str
    """mask file to write, whose selection is the stable mask (.npz)"""
    stable: float | None = None
    """the stable threshold F: neurons selected in at least ceil(F * N) resamples (none: the mask's own)"""


def stable_mask(options: StableOptions) -> None:
    """Write the stable mask of a bootstrapped mask as a mask of its own, for intervene, finetune and report."""
    from dataclasses import replace
    from pathlib import Path

    from analysis.bootstrap import check_options
    from analysis.masks import Mask

    base = Mask.load(options.mask)
    if base.bootstrap is None:
        raise HarvestError(f"mask {options.mask} holds no bootstrap results; write it with lsn analyze METHOD "
                           "... --bootstrap N")
    if Path(options.out).resolve() == Path(options.mask).resolve():
        raise HarvestError(f"{options.out} is the bootstrapped mask itself; name another file")
    check_options(None, base.bootstrap.stable if options.stable is None else options.stable)
    boot = replace(base.bootstrap, stable=base.bootstrap.stable if options.stable is None else options.stable)
    extra = {k: v for k, v in base.extra.items() if k != "appear"}  # appear[] was the full-data mask's
    extra["stable_of"] = {"mask": str(Path(options.mask).resolve()), **boot.meta(),
                          "full": [int(s.size) for s in base.selected]}
    params = {**base.params, "selection": f"stable: selected in at least {boot.need} of {boot.resamples} "
                                          f"bootstrap resamples (seed {boot.seed})"}
    mask = Mask(base.languages, base.n_layers, base.width, boot.stable_selected(), base.method, params, base.source,
                extra)
    print(f"wrote {mask.save(options.out)}: stable {mask.method} (at least {boot.need} of {boot.resamples}), "
          f"{_describe(mask)}")
    _warn_empty_masks(mask)


@dataclass(kw_only=True)
class ImportOptions:
    format: Literal["rucaibox", "lna"]
    """rucaibox: LAPE's activation counts; lna: the alignment study's"""
    src: str
    """directory of the published statistics"""
    store: str
    """Zarr store to create"""
    langs: str | None = None
    """names of the languages, in order, comma-separated"""
    tag: str | None = None
    """which files of --src to import, when it holds several (none: the only one)"""


def import_stats(options: ImportOptions) -> None:
    from analysis.importers import import_published
    from harvester.summary import summarize

    store = import_published(options.format, options.src, options.store, _langs(options.langs), options.tag)
    print(summarize(str(store.path)))


@dataclass(kw_only=True)
class ReportOptions:
    mask: str
    """mask file (.npz)"""
    out: str
    """directory for the tables and plots"""
    store: str | None = None
    """check that the mask fits this store"""


def report(options: ReportOptions) -> None:
    from analysis.masks import Mask
    from analysis.report import write_report

    mask = Mask.load(options.mask)
    if options.store:
        _note(mask.check_store(options.store))
    print(f"wrote {write_report(mask, options.out)}")


def _method(options: type, function, run=analyze) -> Command:
    return Command(_summary(function), options, run)


METHODS = {
    "lape": _method(LapeOptions, methods.lape),
    "lape-variant": _method(LapeVariantOptions, methods.lape_variant),
    "entropy-lambda": _method(EntropyLambdaOptions, methods.EntropyLambda),
    "autosweep": _method(AutosweepOptions, methods.EntropyLambda.autosweep),
    "act-prob-zero": _method(ActProbZeroOptions, methods.act_prob_zero),
    "act-prob-90p": _method(ActProb90pOptions, methods.act_prob_90p),
    "coverage": _method(CoverageOptions, methods.coverage),
    "localizer": _method(LocalizerOptions, methods.localizer),
    "dln": _method(DlnOptions, dln.dln),
    "random": _method(RandomOptions, methods.random_control, random_mask),
}

def harvest_reporting(options) -> None:
    """``lsn harvest``, with ``--report-every N``: LAPE at its defaults over the shards finished so far, every N
    shards (the harvester cannot import analysis/, so lsn's CLI runs the harvest from here)."""
    from analysis.convergence import PartialReport
    from harvester.cli import harvest

    every, store = options.report_every, options.store
    harvest(options, every and PartialReport(store, every, LapeOptions(store=store, out="").select,
                                             LapeOptions.METHOD))


CONVERGENCE = {name: Command(command.help, _convergence_options(command.options), convergence)
               for name, command in METHODS.items() if name not in ("autosweep", "random")}
"""``lsn convergence METHOD``: every method that selects one mask from a store's counts."""

COMMANDS = {
    "analyze": Group("select language neurons from a store with a published method", "method", METHODS),
    "convergence": Group("did the harvest count enough tokens? a method's masks from growing prefixes of the "
                         "store's shards against its full-data mask (CSV, PNG)", "method", CONVERGENCE),
    "mask": Group("convert masks to and from the published format; take a bootstrapped mask's stable mask", "mask_command", {
        "export": Command("write a mask in the published format", ExportOptions, export_mask),
        "import": Command("read a mask in the published format", MaskImportOptions, import_mask),
        "stable": Command("write the stable mask of a mask made with --bootstrap, as a mask of its own",
                          StableOptions, stable_mask)}),
    "import": Command("import published statistics (LAPE, alignment study) into a store", ImportOptions,
                      import_stats),
    "report": Command("tables and PNG plots of a mask", ReportOptions, report),
}
