"""The ``lsn`` command: every package's commands under one parser, dispatch, and one-line errors.

Each command's flags, help and ``--config FILE.yaml`` come from its options dataclass
(:mod:`harvester.options`); this module only assembles them and turns failures into one line.
"""

from __future__ import annotations

import signal
import sys

from analysis.cli import COMMANDS as ANALYSIS
from analysis.cli import harvest_reporting
from harvester.cli import COMMANDS as HARVESTER
from harvester.errors import HarvestError, explain, fault_of
from harvester.options import Command, Keyed, Parser, add_options, add_presets, parse
from jobs.cli import COMMANDS as JOBS
from lsn import presets


def _add(sub, path: tuple[str, ...], entry) -> None:
    parser = sub.add_parser(path[-1], help=entry.help, description=entry.help)
    if isinstance(entry, Command):
        add_options(parser, entry.options)
        add_presets(parser, presets.for_command(path))
        parser.set_defaults(_run=entry.run)
        return
    inner = parser.add_subparsers(dest=entry.dest, required=True, parser_class=Parser)
    for inner_name, inner_entry in entry.commands.items():
        _add(inner, (*path, inner_name), inner_entry)


def build_parser() -> Parser:
    parser = Parser(prog="lsn", description="Exact per-neuron MLP statistics for language-specific neuron "
                    "research. Every command takes --config FILE.yaml (keys: its flag names).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    reporting = {"harvest": HARVESTER["harvest"]._replace(run=harvest_reporting)}  # --report-every: analysis/
    for name, entry in {**HARVESTER, **reporting, **ANALYSIS, **JOBS, "presets": presets.COMMAND}.items():
        _add(sub, (name,), entry)
    return parser


def _method_flag(argv: list[str]) -> list[str]:
    """``lsn convergence --method M ...`` (issue 18's spelling) as ``lsn convergence M ...``: the method is a
    subcommand, as in ``lsn analyze M``, so that each method's own flags and help come with it."""
    if argv[:1] != ["convergence"]:
        return argv
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return [argv[0], argv[i + 1], *argv[1:i], *argv[i + 2:]]
        if arg.startswith("--method="):
            return [argv[0], arg.partition("=")[2], *argv[1:i], *argv[i + 1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    from harvester.signals import graceful

    argv = _method_flag(sys.argv[1:] if argv is None else list(argv))
    args = None
    try:
        with graceful():  # SIGINT/SIGTERM: every cleanup runs, then one line and 128 + signal
            args, options = parse(build_parser(), argv)
            args._run(options)
    except HarvestError as err:
        print(f"lsn: error: {err}{_from_preset(str(err), args, argv)}", file=sys.stderr)
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


def _from_preset(message: str, args, argv: list[str]) -> str:
    """A refusal that names a flag the user did not type but ``--preset`` set: say where it came from."""
    name = getattr(args, "preset", None)
    if not name:
        return ""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    chosen = args._presets[name]  # noqa: SLF001
    keys = {k for values in chosen.values.values() for k in values} if isinstance(chosen, Keyed) else chosen
    flags = [f"--{k.replace('_', '-')}" for k in keys]
    named = [f for f in flags if f in message and f not in typed]
    return f" ({', '.join(named)} set by --preset {name})" if named else ""


_WRITES = {"harvest": "store", "import": "store", "verify": "store", "compact": "store"}
"""Where a command writes, when not to ``--out``."""
_READS = ("store", "mask", "src", "model", "data", "prompts", "config")


def _places(args) -> list[tuple[str, str]]:
    """``(flag, path)`` of the paths the command names, the one it writes first."""
    if args is None:
        return []
    first = _WRITES.get(args.command, "out")
    names = [first, "report", *(n for n in _READS if n != first)]
    return [(f"--{n}", getattr(args, n)) for n in names if isinstance(getattr(args, n, None), str)]


if __name__ == "__main__":
    sys.exit(main())
