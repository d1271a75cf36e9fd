"""Corpus specs and the interface every corpus kind implements.

A corpus has **groups** (what the store counts per: a language, a direction side ``en-fr:src``, a
role ``de:response``, a condition ``S``) and **streams** (independent units of tokenization, each
cut into its own token shards: a language's text, one translation direction, one condition).
A stream yields **documents**; a document is a list of segments ``(group, text)`` that follow each
other in one sequence (a translation example: source then target; an instruction: prompt then
response). How a document becomes tokens (one encoding of the whole, BOS, EOS) is the harvest's
``--encode``, ``--bos`` and ``--eos-per-example`` (see :mod:`harvester.windows`).

Packing (per stream): ``pack`` concatenates documents and cuts the stream into windows of
``seq_len`` tokens (plain text, sample, Wikipedia; at most ``--max-tokens-per-lang`` of them); ``sequence`` gives each document its own window (paired
data and stimuli, whose context must not leak across examples).

Several specs combine into one harvest (:func:`parse_corpora`); group names must not collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Protocol

from harvester.errors import HarvestError

Segment = tuple[str, str]
"""``(group name, text)``."""


@dataclass(frozen=True)
class Stream:
    """One unit of tokenization: its documents are tokenized in order into consecutive shards."""

    name: str
    packing: Literal["pack", "sequence"] = "pack"
    max_tokens: int | None = None
    """Stop the stream after this many tokens (the last window is cut there)."""


@dataclass(frozen=True)
class CorpusOptions:
    """Options that apply to the corpus kinds that use them (CLI flags or YAML keys)."""

    pairs: str | None = None
    """EC40 directions: ``en-fr,fr-en,...`` or ``all`` (default all 80)."""
    split: str = "train"
    """EC40 split: train, validation (NTREX-128) or test (FLORES-200)."""
    max_pairs: int = 30_000
    """EC40 examples per direction."""
    max_tokens_per_lang: int | None = None
    """Tokens per packed stream (a language of text, sample or Wikipedia), the last window cut there."""
    pooling: Literal["token", "last", "mean"] = "token"
    """``last``/``mean``: one pooled sample per document segment instead of one per token."""
    lowercase: bool = False
    """Stimuli: lowercase each stimulus (``str.lower``) before tokenizing, as the localizer reference does."""
    truncate: int | None = None
    """Cut every document of a ``sequence`` stream to this many tokens (the reference localizer's 12); the
    tokens cut off are counted as truncated. None: only ``--seq-len`` cuts."""
    truncation_side: Literal["right", "left"] = "right"
    """Which end ``truncate`` cuts: ``right`` keeps the first tokens (the reference's, transformers'
    default), ``left`` the last."""
    template: str | None = None
    """``chat`` (instruct: the tokenizer's chat template) or a format string (instruct ``{prompt}``; EC40
    ``{src_lang}``, ``{tgt_lang}``, ``{src}``), see :mod:`harvester.corpus.template`. None: the texts as they are."""
    sides: Literal["src", "tgt", "both"] = "both"
    """EC40: the sides of each pair that are harvested (``src`` or ``tgt`` alone, or source then target)."""

    def __post_init__(self):
        if self.split not in ("train", "validation", "test"):
            raise HarvestError(f"--split must be train, validation or test, not '{self.split}'")
        if self.max_pairs <= 0:
            raise HarvestError(f"--max-pairs must be positive, got {self.max_pairs}")
        if self.max_tokens_per_lang is not None and self.max_tokens_per_lang <= 0:
            raise HarvestError(f"--max-tokens-per-lang must be positive, got {self.max_tokens_per_lang}")
        if self.pooling not in ("token", "last", "mean"):
            raise HarvestError(f"--pooling must be token, last or mean, not '{self.pooling}'")
        if self.truncate is not None and self.truncate <= 0:
            raise HarvestError(f"--truncate must be positive, got {self.truncate}")
        if self.truncation_side not in ("right", "left"):
            raise HarvestError(f"--truncation-side must be right or left, not '{self.truncation_side}'")
        if self.sides not in ("src", "tgt", "both"):
            raise HarvestError(f"--sides must be src, tgt or both, not '{self.sides}'")
        if self.template is not None and not self.template.strip():
            raise HarvestError("--template is empty")

    LATER = {"lowercase": False, "truncate": None, "truncation_side": "right", "template": None, "sides": "both"}
    """Options added after stores recorded their options, at the value that behaves as before them."""

    def fingerprint(self) -> dict:
        """The options as a store's fingerprint records them: an option of :attr:`LATER` at its earlier
        behaviour is left out, so a store written before it keeps its fingerprint and resumes."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.LATER or self.LATER[k] != v}


class Corpus(Protocol):
    spec: str
    """The spec as given; recorded in the store."""
    groups: list[str]
    """Group names in store order."""
    streams: list[Stream]
    """Streams in shard order."""

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        """The stream's documents, in order, each a list of ``(group, text)`` segments."""

    def source(self) -> dict:
        """A JSON-able identity of the inputs (files with sizes and hashes, hub ids and revisions)."""


KINDS = ("text", "sample", "ec40", "wikipedia", "instruct", "lna", "stimuli")


def split_list(text: str, what: str, example: str) -> list[str]:
    """A comma list (languages, directions), the one separator of specs and flags; ``+`` sums groups
    in ``--langs NAME=G1+G2`` only, so a ``+`` list is refused with the comma form as a hint."""
    items = [item.strip() for item in text.split(",")]
    joined = next((item for item in items if "+" in item), None)
    if joined is not None:
        raise HarvestError(f"{what} are separated by commas, not '+': {joined.replace('+', ',')} "
                           f"(e.g. {example})")
    return items


def parse_corpus(spec: str, options: CorpusOptions | None = None, tokenizer=None) -> Corpus:
    """Build the corpus named by ``spec``; a clear error for an unknown kind or missing data. The
    model's ``tokenizer`` is needed by ``--template chat`` only."""
    options = options or CorpusOptions()
    kind, _, arg = spec.partition(":")
    if kind == "text":
        from harvester.corpus.text import TextCorpus

        return TextCorpus(spec, arg)
    if kind == "sample":
        from harvester.corpus.sample import SampleCorpus

        return SampleCorpus.from_spec(spec, arg)
    if kind == "ec40":
        from harvester.corpus.ec40 import EC40Corpus

        return EC40Corpus(spec, arg, options)
    if kind == "wikipedia":
        from harvester.corpus.wikipedia import WikipediaCorpus

        return WikipediaCorpus(spec, arg, options)
    if kind == "instruct":
        from harvester.corpus.instruct import InstructCorpus

        return InstructCorpus(spec, arg, options.template, tokenizer)
    if kind == "lna":
        from harvester.corpus.lna import LnaCorpus

        return LnaCorpus(spec, arg)
    if kind == "stimuli":
        from harvester.corpus.stimuli import StimuliCorpus

        return StimuliCorpus(spec, arg, options.lowercase)
    raise HarvestError(f"unknown corpus kind '{kind}' in '{spec}'; known kinds: {', '.join(KINDS)}")


@dataclass
class Corpora:
    """Several corpora harvested together: their groups and streams, in the order given."""

    parts: list[Corpus]
    options: CorpusOptions = field(default_factory=CorpusOptions)

    def __post_init__(self):
        from harvester.names import check_name

        seen: dict[str, str] = {}
        for part in self.parts:
            for group in part.groups:
                check_name(group, f"group name from '{part.spec}'")  # it becomes a label, a CSV cell, a path
                if group in seen:
                    raise HarvestError(f"group '{group}' comes from both '{seen[group]}' and '{part.spec}'; "
                                       "harvest them into separate stores")
                seen[group] = part.spec
        self.groups = [g for part in self.parts for g in part.groups]
        cap = self.options.max_tokens_per_lang
        self._streams = [(part, s if s.packing != "pack" or s.max_tokens is not None or cap is None
                          else dataclasses.replace(s, max_tokens=cap)) for part in self.parts for s in part.streams]
        if self.options.pooling != "token":  # a pooled sample is one document segment: never pack
            self._streams = [(part, Stream(s.name, "sequence", s.max_tokens)) for part, s in self._streams]

    @property
    def spec(self) -> str:
        return " + ".join(p.spec for p in self.parts)

    @property
    def streams(self) -> list[Stream]:
        return [s for _, s in self._streams]

    def documents(self, index: int) -> Iterator[list[Segment]]:
        """Documents of stream number ``index`` (streams are numbered across all parts)."""
        part, stream = self._streams[index]
        return part.documents(stream.name)

    def source(self) -> list[dict]:
        return [p.source() for p in self.parts]


def parse_corpora(specs: list[str] | str, options: CorpusOptions | None = None, tokenizer=None) -> Corpora:
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise HarvestError("no corpus given: --corpus SPEC (repeatable)")
    options = options or CorpusOptions()
    return Corpora([parse_corpus(s, options, tokenizer) for s in specs], options)


_SAMPLE = 1 << 20


def decode_line(line: bytes, path: Path, lineno: int) -> str:
    """One line of a text file, without its line break; not UTF-8 is a one-line error naming the line."""
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise HarvestError(f"{path}:{lineno}: not UTF-8 text") from None


def json_value(text: str, where: str, whole_file: bool = False):
    """``json.loads(text)``; malformed or too deeply nested JSON is one line at ``where`` (of a whole file,
    with the line the error is on)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"{where}:{err.lineno}" if whole_file else where
        raise HarvestError(f"{at}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise HarvestError(f"{where}: not valid JSON (nested too deeply)") from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, line breaks removed (see :func:`decode_line`)."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, decode_line(raw, path, lineno)


def file_identity(path: Path) -> dict:
    """Name, size and sha256 of a file (of its first and last MiB when it is larger than 4 MiB)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= 4 * _SAMPLE:
            digest.update(f.read())
        else:
            digest.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            digest.update(f.read())
    return {"file": path.name, "size": size, "sha256": digest.hexdigest()}
