"""Corpus specs: ``text:DIR`` and ``sample[:docs=N,seed=S,langs=a+b+c]``.

A corpus yields, for each of its groups (for plain text: languages), an iterator of documents.
"""

from __future__ import annotations

from typing import Iterator, Protocol

from harvester.errors import HarvestError


class Corpus(Protocol):
    spec: str
    """The spec as given; recorded in the store."""
    groups: list[str]
    """Group names in harvest order."""

    def documents(self, group: str) -> Iterator[str]:
        """The group's documents, in order."""


KINDS = ("text", "sample")


def parse_corpus(spec: str) -> Corpus:
    """Build the corpus named by ``spec``; a clear error for an unknown kind or missing data."""
    kind, _, arg = spec.partition(":")
    if kind == "text":
        from harvester.corpus.text import TextCorpus

        return TextCorpus(spec, arg)
    if kind == "sample":
        from harvester.corpus.sample import SampleCorpus

        return SampleCorpus.from_spec(spec, arg)
    raise HarvestError(f"unknown corpus kind '{kind}' in '{spec}'; known kinds: {', '.join(KINDS)}")
