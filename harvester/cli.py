"""The ``lsn`` command line: parse, dispatch, and turn :class:`HarvestError` into a one-line error."""

from __future__ import annotations

import argparse
import sys

from harvester.errors import HarvestError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lsn", description="Exact per-neuron MLP statistics for language-specific neuron research.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    h = sub.add_parser("harvest", help="harvest per-neuron statistics into a Zarr store (resumable)")
    h.add_argument("--model", required=True, help="local path, hub id, or tiny:ARCH (built-in random model)")
    h.add_argument("--corpus", required=True, help="text:DIR | sample[:docs=N,seed=S,langs=a+b]")
    h.add_argument("--store", required=True, help="Zarr store directory (created, or resumed)")
    h.add_argument("--backend", default="hf")
    h.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    h.add_argument("--device", default="cpu", help="cpu | cuda")
    h.add_argument("--device-map", default=None, help="e.g. auto: one model over all visible GPUs")
    h.add_argument("--seq-len", type=_positive, default=512)
    h.add_argument("--batch-size", type=_positive, default=8)
    h.add_argument("--shard-tokens", type=_positive, default=1 << 20)
    h.add_argument("--actors", type=_positive, default=None, help="Ray actors (default: one per GPU, 1 on CPU)")
    h.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or embedded)")
    h.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    h.add_argument("--stats", default="active,sum,sqsum", help="any of active,sum,sqsum,hist")
    h.add_argument("--hist-edges", default="-1:4:100", help="histogram bins LO:HI:BINS (with --stats ...,hist)")
    h.add_argument("--site-module", default=None, help="activation module pattern, e.g. model.layers.{layer}.mlp.act_fn")
    h.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("summary", help="per-group summary of a store")
    s.add_argument("--store", required=True)
    return parser


def _harvest(args) -> None:
    from harvester.config import HarvestConfig
    from harvester.driver import harvest
    from harvester.stats import parse_edges, parse_stats
    from harvester.summary import summarize

    stats = parse_stats(args.stats)
    cfg = HarvestConfig(model=args.model, corpus=args.corpus, store=args.store, backend=args.backend,
                        dtype=args.dtype, device=args.device, device_map=args.device_map, seq_len=args.seq_len,
                        batch_size=args.batch_size, shard_tokens=args.shard_tokens, actors=args.actors,
                        address=args.address, use_ray=not args.no_ray, stats=stats,
                        hist_edges=parse_edges(args.hist_edges) if "hist" in stats else None,
                        site=args.site_module, progress=not args.no_progress)
    store = harvest(cfg)
    print(summarize(str(store.path)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "harvest":
            _harvest(args)
        elif args.command == "summary":
            from harvester.summary import summarize

            print(summarize(args.store))
    except HarvestError as err:
        print(f"lsn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lsn: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
