"""The built-in sample corpus: pseudo-sentences of real words from wordfreq's offline word lists.

Each language draws words from its ``TOP_WORDS`` most frequent words, weighted by frequency (Zipf's
law as in real text), into sentences and documents. Everything is deterministic from the seed; no
text is stored in the repository.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from harvester.corpus import Segment, Stream
from harvester.errors import HarvestError

LANGUAGES = ("en", "de", "fr", "es", "ru", "uk", "el", "ar", "hi", "zh", "ja", "ko")
"""Twelve languages in eight scripts: Latin, Cyrillic, Greek, Arabic, Devanagari, Han, Kana, Hangul."""

_NO_SPACES = {"zh", "ja"}
_END = {"zh": "。", "ja": "。", "ar": ".", "hi": "।", "el": "."}
TOP_WORDS = 2000


@dataclass
class SampleCorpus:
    """``sample[:docs=N,seed=S,langs=a+b+c,sentences=K]``"""

    spec: str
    groups: list[str]
    docs: int = 200
    seed: int = 0
    sentences: int = 3

    @classmethod
    def from_spec(cls, spec: str, arg: str) -> "SampleCorpus":
        opts = dict(docs=200, seed=0, sentences=3)
        langs = list(LANGUAGES)
        for item in filter(None, arg.split(",")):
            key, _, value = item.partition("=")
            if key == "langs":
                langs = value.split("+")
            elif key in opts:
                try:
                    opts[key] = int(value)
                except ValueError:
                    raise HarvestError(f"sample corpus option {key} must be an integer, got '{value}'") from None
            else:
                raise HarvestError(f"unknown sample corpus option '{key}'; options: docs, seed, sentences, langs")
        unknown = [lang for lang in langs if lang not in LANGUAGES]
        if unknown or not langs:
            raise HarvestError(f"sample corpus has no language {', '.join(unknown)}; languages: {', '.join(LANGUAGES)}")
        if opts["docs"] <= 0 or opts["sentences"] <= 0:
            raise HarvestError("sample corpus sizes (docs, sentences) must be positive")
        return cls(spec=spec, groups=langs, **opts)

    @property
    def streams(self) -> list[Stream]:
        return [Stream(g) for g in self.groups]

    def source(self) -> dict:
        from importlib.metadata import version

        return {"kind": "sample", "wordfreq": version("wordfreq")}

    def documents(self, group: str) -> Iterator[list[Segment]]:
        for text in self.texts(group):
            yield [(group, text)]

    def texts(self, group: str) -> Iterator[str]:
        """The language's documents as plain strings."""
        words, cumulative = _vocabulary(group)
        rng = np.random.default_rng([self.seed, LANGUAGES.index(group)])
        sep = "" if group in _NO_SPACES else " "
        end = _END.get(group, ".")
        for _ in range(self.docs):
            sentences = []
            for _ in range(self.sentences):
                picks = np.searchsorted(cumulative, rng.random(int(rng.integers(4, 13))), side="right")
                text = sep.join(words[i] for i in picks)
                sentences.append(text[:1].upper() + text[1:] + end)
            yield " ".join(sentences)


@functools.lru_cache(maxsize=None)
def _vocabulary(lang: str) -> tuple[list[str], np.ndarray]:
    """The language's most frequent words and their cumulative sampling probabilities."""
    import wordfreq

    table = wordfreq.get_frequency_dict(lang).items()  # most frequent first
    # words only: the lists also hold digit placeholders such as "0000"
    pairs = list(itertools.islice(((w, f) for w, f in table if any(c.isalpha() for c in w)), TOP_WORDS))
    freqs = np.array([f for _, f in pairs])
    cumulative = np.cumsum(freqs / freqs.sum())
    cumulative[-1] = 1.0
    return [w for w, _ in pairs], cumulative
