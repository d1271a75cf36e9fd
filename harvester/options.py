"""A command's options as one dataclass: its flags, their help and defaults, and ``--config FILE.yaml``.

Every field is a flag of the same name (``seq_len`` is ``--seq-len``, ``lambda_`` is ``--lambda``); its
help is the docstring under the field, read with :mod:`ast`. The type decides the flag: ``bool`` a switch,
``Literal[...]`` its choices, ``list[str]`` a repeatable flag, ``Annotated[T, check]`` a checked value.
A field without a default is required, on the command line or in the YAML file. Class attributes:
``POSITIONAL`` names fields given without a flag, ``ALIASES`` maps old flag names to fields (hidden).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing

from harvester.errors import HarvestError

CONFIG_HELP = "YAML file of these options (keys: the flag names); flags given here override it"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts with a minus and a digit is a value, not a flag (no flag looks like
        # that): ``--hist-edges -1:4:100``, not only the plain numbers argparse knows (``-1``, ``-.5``).
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


class Command(typing.NamedTuple):
    """One command: its one-line help, its options dataclass and the function that runs them."""

    help: str
    options: type
    run: typing.Callable


class Group(typing.NamedTuple):
    """Commands under one name (``lsn analyze lape``): ``dest`` holds the chosen one."""

    help: str
    dest: str
    commands: dict


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


Positive = typing.Annotated[int, positive]
"""A count: a positive integer, refused otherwise in one line."""


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of ``cls`` and of the dataclasses it extends."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or not klass.__dict__.get("__annotations__"):
            continue  # a class declaring no field of its own (one made by a function) adds no docstring
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def flag(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _kind(hint) -> dict:
    """argparse keywords for a field's type: a switch, choices, a repeatable flag or a checked value."""
    check = None
    while typing.get_origin(hint) in (typing.Annotated, typing.Union, types.UnionType):
        if typing.get_origin(hint) is typing.Annotated:
            hint, check = hint.__origin__, hint.__metadata__[0]
        else:  # X | None: the flag's default is None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return {"action": "store_true"}
    if typing.get_origin(hint) is list:
        return {"action": "append", "metavar": "SPEC"}
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    return {"type": check or hint}


def _help(text: str, default) -> str:
    text = text.replace("%", "%%")
    if default is dataclasses.MISSING:
        return f"{text} (required)"
    if default is False:
        return f"{text} (default: off)"
    shown = "none" if default is None else default
    return f"{text} (default: {str(shown).replace('%', '%%')})"


def add_options(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """The flags of ``cls``'s fields, ``--config`` and the hidden old names, on ``parser``."""
    hints, docs = typing.get_type_hints(cls, include_extras=True), field_docs(cls)
    positional = getattr(cls, "POSITIONAL", ())
    parser.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    required_first = sorted(dataclasses.fields(cls), key=lambda f: _default(f) is not dataclasses.MISSING)
    for f in required_first:  # stable: otherwise in the order declared (base classes first)
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring")
        default = _default(f)
        kwargs = dict(_kind(hints[f.name]), help=_help(docs[f.name], default))
        kwargs["default"] = None if default is dataclasses.MISSING or kwargs.get("action") == "append" else default
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", **kwargs)
        else:
            parser.add_argument(flag(f.name), dest=f.name, **kwargs)
    for old, name in getattr(cls, "ALIASES", {}).items():
        kwargs = dict(_kind(hints[name]), help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        parser.add_argument(flag(old), dest=name, **kwargs)
    parser.set_defaults(_options=cls, _parser=parser)
    return parser


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise HarvestError(f"cannot read config {path}: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise HarvestError(f"cannot read config {path}: not UTF-8 text") from None
    if not isinstance(values, dict):
        raise HarvestError(f"config {path} must be a mapping of option names to values")
    return values


def _value(action: argparse.Action, key: str, value, where: str):
    """A YAML (or preset) value checked (and converted) as the flag's own value would be."""
    bad = HarvestError(f"{where}: bad value {value!r} for '{key}'")
    if value is None:
        return None
    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HarvestError(f"{where}: {key} must be a value or a list of values")
        return value
    if isinstance(value, (bool, list, dict)):
        raise bad
    try:
        value = action.type(str(value)) if action.type else str(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError, HarvestError):
        raise bad from None
    if action.choices and value not in action.choices:
        raise bad
    return value


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """``dest: value`` of the YAML file at ``path``; an unknown key is refused in one line."""
    return _defaults_from(parser, read_yaml(path), f"config {path}")


def _defaults_from(parser: argparse.ArgumentParser, items: dict, where: str) -> dict:
    """``dest: value`` of ``items`` (flag names, ``seq-len`` or ``seq_len``), each checked as its flag."""
    known = {}
    for action in parser._actions:  # noqa: SLF001
        for option in action.option_strings:
            if action.dest not in ("help", "config"):
                known[option.lstrip("-")] = action
        if not action.option_strings and action.dest != "help":
            known[action.dest.replace("_", "-")] = action
    values = {}
    for key, value in items.items():
        action = known.get(str(key).replace("_", "-"))
        if action is None or action.dest == "preset":
            shown = sorted(k for k, a in known.items() if a.help is not argparse.SUPPRESS and k != "preset")
            raise HarvestError(f"{where}: unknown option '{key}'; known: {', '.join(shown)}")
        values[action.dest] = _value(action, str(key), value, where)
    return values


class Keyed(typing.NamedTuple):
    """A preset's values for a command that depend on one of its options (``finetune``'s on ``--task``)."""

    option: str
    """the option whose value chooses (a field name)"""
    values: dict
    """that option's value -> the preset's values for it"""


def add_presets(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    """``--preset NAME``: ``presets[NAME]`` (flag names to values) as this command's defaults."""
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help=PRESET_HELP)
        parser.set_defaults(_presets=presets)


PRESET_HELP = ("the settings of a published study's code for this command (lsn presets NAME lists them); "
               "--config and flags given win over it")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """``(args, options)``: the command's dataclass from ``--preset``, then ``--config FILE.yaml``,
    then the flags (each later one wins)."""
    args = parser.parse_args(argv)
    cls, leaf = getattr(args, "_options", None), getattr(args, "_parser", None)
    if cls is None:
        return args, None
    values, config = {}, _config_defaults(leaf, args.config) if args.config else {}
    if getattr(args, "preset", None):
        chosen = _preset_values(args, config, argv)
        values.update(_defaults_from(leaf, chosen, f"preset {args.preset}"))
    values.update(config)
    appended = {k: values.pop(k) for k in list(values)
                if isinstance(_action(leaf, k), argparse._AppendAction)}  # noqa: SLF001
    if values or appended:
        leaf.set_defaults(**values)
        args = parser.parse_args(argv)
    return args, _options(args, cls, appended)


def _preset_values(args, config: dict, argv: list[str] | None) -> dict:
    """The chosen preset's values for this command; a :class:`Keyed` one by its option's value (typed, else
    from ``--config``, else the option's default)."""
    import sys

    chosen = args._presets[args.preset]  # noqa: SLF001
    if not isinstance(chosen, Keyed):
        return chosen
    typed = any(a.split("=", 1)[0] == flag(chosen.option) for a in (sys.argv[1:] if argv is None else argv))
    key = getattr(args, chosen.option) if typed or chosen.option not in config else config[chosen.option]
    if key is None:  # a required option not given: its own error follows
        return {}
    if key not in chosen.values:
        raise HarvestError(f"--preset {args.preset} has settings for {flag(chosen.option)} "
                           f"{'|'.join(chosen.values)}, not {key}")
    return chosen.values[key]


def _action(parser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)  # noqa: SLF001


def _options(args, cls, appended: dict):
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is None:
            value = appended.get(f.name)
        if value is None:
            default = _default(f)
            if default is dataclasses.MISSING:
                name = f.name if f.name in getattr(cls, "POSITIONAL", ()) else flag(f.name)
                raise HarvestError(f"{name} is required (on the command line or in --config)")
            value = default
        values[f.name] = value
    return cls(**values)
