"""``lsn analyze METHOD``, ``lsn mask export|import``, ``lsn import``, ``lsn report``."""

from __future__ import annotations

import contextlib
import json
import sys

from analysis.data import BY
from harvester.errors import HarvestError
from harvester.fs import output_dir, output_file

METHODS = ("lape", "lape-variant", "entropy-lambda", "autosweep", "act-prob-zero", "act-prob-90p", "coverage",
           "localizer", "random")


def _langs(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def add_commands(sub, positive) -> None:
    a = sub.add_parser("analyze", help="select language neurons from a store with a published method")
    methods = a.add_subparsers(dest="method", required=True, parser_class=type(a))
    for name in METHODS:
        m = methods.add_parser(name)
        if name == "random":
            m.add_argument("--mask", required=True, help="the mask to control for")
            m.add_argument("--seed", type=int, default=0)
            m.add_argument("--out", required=True)
            m.add_argument("--store", default=None, help="check that the mask fits this store")
            continue
        m.add_argument("--store", required=True)
        m.add_argument("--out", required=name != "autosweep", help="mask file to write (.npz)")
        m.add_argument("--langs", default=None, help="languages in mask order, comma-separated: groups, or "
                       "NAME=G1+G2 (a sum of groups); with --by, names of its languages")
        m.add_argument("--by", default=None, choices=BY, help="languages without --langs (default language: the "
                       "store's languages; EC40 sides pooled per language; the response groups of prompt/"
                       "response stores); direction: EC40 directions, both sides pooled; group: every group")
        m.add_argument("--report", default=None, help="also write a report (CSV, Markdown, PNG) into this directory")
        m.add_argument("--dask-address", default=None, help="an existing Dask scheduler (tcp://host:8786)")
        m.add_argument("--local-cluster", type=positive, default=None, help="run on a dask.distributed "
                       "LocalCluster of N workers (default: Dask's threaded scheduler)")
        if name in ("lape", "lape-variant", "entropy-lambda", "autosweep"):
            m.add_argument("--bar-ratio", type=float, default=0.95)
            m.add_argument("--response-only", action="store_true")
        if name in ("lape", "entropy-lambda", "autosweep"):
            m.add_argument("--top-rate", type=float, default=0.01)
        if name in ("lape", "lape-variant"):
            m.add_argument("--filter-rate", type=float, default=0.95)
        if name == "lape-variant":
            m.add_argument("--rate", type=float, default=0.01)
        if name == "entropy-lambda":
            m.add_argument("--lambda", dest="lam", type=float, required=True)
        if name == "autosweep":
            m.add_argument("--lo", type=float, default=0.0)
            m.add_argument("--hi", type=float, default=0.2)
            m.add_argument("--eps", type=float, default=1e-3)
            m.add_argument("--json", action="store_true", help="last line: {\"lambda\": ..., \"appear\": [...]}")
        if name in ("act-prob-zero", "act-prob-90p"):
            m.add_argument("--rate", type=float, default=0.00125)
            m.add_argument("--response-only", action="store_true")
        if name == "act-prob-90p":
            m.add_argument("--percent", type=int, default=90)
        if name == "coverage":
            m.add_argument("--k", type=float, default=0.95, help="share of each layer's total count to cover")
        if name == "localizer":
            m.add_argument("--a", required=True, help="groups of condition A, comma-separated (e.g. S)")
            m.add_argument("--b", required=True, help="groups of condition B (e.g. N)")
            m.add_argument("--top-percent", type=float, default=1.0)
            m.add_argument("--per-layer", action="store_true")
            m.add_argument("--statistic", default="t", choices=["t", "mean-diff"])
            m.add_argument("--signed", action="store_true", help="use act_sum instead of the absolute act_abssum")

    k = sub.add_parser("mask", help="convert masks to and from the published format")
    kinds = k.add_subparsers(dest="mask_command", required=True, parser_class=type(k))
    e = kinds.add_parser("export")
    e.add_argument("--format", default="rucaibox", choices=["rucaibox"])
    e.add_argument("mask")
    e.add_argument("out")
    i = kinds.add_parser("import")
    i.add_argument("--format", default="rucaibox", choices=["rucaibox"])
    i.add_argument("src")
    i.add_argument("out")
    i.add_argument("--langs", default=None, help="names of the file's languages, in order")
    i.add_argument("--width", type=positive, default=None, help="neurons per layer (default: largest index + 1)")

    p = sub.add_parser("import", help="import published statistics (LAPE, alignment study) into a store")
    p.add_argument("--format", required=True, choices=["rucaibox", "lna"])
    p.add_argument("--src", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--langs", default=None)
    p.add_argument("--tag", default=None)

    r = sub.add_parser("report", help="tables and PNG plots of a mask")
    r.add_argument("--mask", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--store", default=None, help="check that the mask fits this store")


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


def run(args) -> None:
    if args.command == "analyze":
        with _scheduler(args):
            _analyze(args)
    elif args.command == "mask":
        from analysis.masks import Mask

        if args.mask_command == "export":
            path = Mask.load(args.mask).export_rucaibox(args.out)
            print(f"wrote {path}")
        else:
            mask = Mask.import_rucaibox(args.src, _langs(args.langs), args.width)
            print(f"wrote {mask.save(args.out)}: {_describe(mask)}")
    elif args.command == "import":
        from analysis.importers import import_published
        from harvester.summary import summarize

        store = import_published(args.format, args.src, args.store, _langs(args.langs), args.tag)
        print(summarize(str(store.path)))
    elif args.command == "report":
        from analysis.masks import Mask
        from analysis.report import write_report

        mask = Mask.load(args.mask)
        if args.store:
            _note(mask.check_store(args.store))
        print(f"wrote {write_report(mask, args.out)}")


def _note(notes: list[str]) -> None:
    for note in notes:
        print(f"lsn: {note}", file=sys.stderr)


def _describe(mask) -> str:
    return ", ".join(f"{lang} {len(sel)}" for lang, sel in zip(mask.languages, mask.selected))


def _analyze(args) -> None:
    from analysis import methods
    from analysis.data import open_counts
    from analysis.masks import Mask

    if args.method == "random":
        base = Mask.load(args.mask)
        if args.store:
            _note(base.check_store(args.store))
        selected = methods.random_control(base.selected, base.n_layers, base.width, args.seed)
        mask = Mask(base.languages, base.n_layers, base.width, selected, "random",
                    {"seed": args.seed, "controls": base.method, "of": args.mask}, base.source)
        print(f"wrote {mask.save(args.out)}: {_describe(mask)}")
        _warn_empty_masks(mask)
        return
    _check_rates(args)
    if args.out:
        output_file(args.out, make=False)
    if args.report:
        output_dir(args.report, "--report", make=False)
    counts = open_counts(args.store, _langs(args.langs), getattr(args, "response_only", False), args.by)
    _note([counts.note] if counts.note else [])
    _warn_empty_groups(counts)
    P = counts.probabilities()
    names, params, extra = counts.names, {}, {}
    if args.method == "lape":
        params = dict(top_rate=args.top_rate, filter_rate=args.filter_rate, bar_ratio=args.bar_ratio)
        result = methods.lape(P, **params)
        extra = {"tau": result["tau"], "beta": result["beta"]}
    elif args.method == "lape-variant":
        params = dict(rate=args.rate, filter_rate=args.filter_rate, bar_ratio=args.bar_ratio)
        result = methods.lape_variant(P, **params)
        extra = {k: result[k] for k in ("threshold", "tau", "beta") if k in result}
    elif args.method in ("entropy-lambda", "autosweep"):
        model = methods.EntropyLambda(P, args.top_rate, args.bar_ratio)
        if args.method == "autosweep":
            lam, appear = model.autosweep(args.lo, args.hi, args.eps)
            params = dict(top_rate=args.top_rate, bar_ratio=args.bar_ratio, lo=args.lo, hi=args.hi, eps=args.eps)
            if lam is None:
                print(f"no λ in [{args.lo}, {args.hi}] leaves appear[K] = 0 (appear at lo: {appear})")
            else:
                print(f"λ = {lam} (appear = {appear})")
            if args.out and lam is not None:
                _write(args, Mask(names, counts.n_layers, counts.width, model.masks(lam), "entropy-lambda",
                                  {**params, "lambda": lam, "autosweep": True}, counts.source(),
                                  {"appear": appear, "beta": model.beta}))
            if args.json:
                print(json.dumps({"lambda": lam, "appear": appear}))
            return
        params = dict(top_rate=args.top_rate, bar_ratio=args.bar_ratio, **{"lambda": args.lam})
        result = {"selected": model.masks(args.lam)}
        extra = {"appear": model.appear(args.lam), "beta": model.beta}
    elif args.method == "act-prob-zero":
        params = dict(rate=args.rate)
        result = methods.act_prob_zero(P, args.rate)
    elif args.method == "act-prob-90p":
        params = dict(rate=args.rate, percent=args.percent,
                      percentile="the neuron's own, over all harvested groups pooled, at histogram-bin resolution")
        result = methods.act_prob_90p(counts.variable("hist"), counts.tokens, args.percent, args.rate)
        result.pop("percentile_bin")
    elif args.method == "coverage":
        params = dict(k=args.k)
        result = methods.coverage(counts.numer, args.k)
    elif args.method == "localizer":
        a, b = _langs(args.a), _langs(args.b)
        unknown = [g for g in a + b if g not in names]
        if unknown:
            raise HarvestError(f"unknown group '{unknown[0]}'; groups: {', '.join(names)}")
        sums = counts.variable("act_sum" if args.signed else "act_abssum")
        result = methods.localizer(counts.tokens, sums, counts.variable("act_sqsum"),
                                   [names.index(g) for g in a], [names.index(g) for g in b],
                                   args.top_percent, args.per_layer, args.statistic)
        params = dict(a=a, b=b, top_percent=args.top_percent, per_layer=args.per_layer, statistic=args.statistic,
                      values="signed" if args.signed else "absolute")
        extra = {"n_a": result["n_a"], "n_b": result["n_b"]}
        names = [f"{'+'.join(a)}>{'+'.join(b)}"]
    mask = Mask(names, counts.n_layers, counts.width, result["selected"], args.method, params, counts.source(), extra)
    _write(args, mask)


def _write(args, mask) -> None:
    path = mask.save(args.out)
    print(f"wrote {path}: {mask.method}, {_describe(mask)}")
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
    for name in ("top_percent", "percent"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 100:
            raise HarvestError(f"--{name.replace('_', '-')} must lie in [0, 100], got {value}")
    if getattr(args, "eps", None) is not None and not args.eps > 0:
        raise HarvestError(f"--eps must be positive, got {args.eps}")
