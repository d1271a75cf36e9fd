"""The built-in sample corpus: pseudo-sentences of real words from wordfreq's offline word lists.

Each language draws words from its ``TOP_WORDS`` most frequent words, weighted by frequency (Zipf's
law as in real text), into sentences and documents. Everything is deterministic from the seed; no
text is stored in the repository.

For localizer designs (sentences against non-word strings), :func:`nonwords` makes strings of
pronounceable non-words from the same words, and :func:`write_stimuli` writes both as a stimuli CSV.
"""

from __future__ import annotations

import collections
import csv
import functools
import itertools
import unicodedata
from dataclasses import dataclass
from pathlib import Path
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
    """``sample[:docs=N,seed=S,sentences=K,langs=a,b,c]`` (``langs=a+b+c`` is read too)"""

    spec: str
    groups: list[str]
    docs: int = 200
    seed: int = 0
    sentences: int = 3

    @classmethod
    def from_spec(cls, spec: str, arg: str) -> "SampleCorpus":
        opts = dict(docs=200, seed=0, sentences=3)
        langs, listing = list(LANGUAGES), False
        for item in filter(None, arg.split(",")):
            key, eq, value = item.partition("=")
            if not eq and listing:  # languages are a comma list like everywhere: langs=en,de,fr
                langs.append(key)
            elif key == "langs":
                langs = value.split("+")  # the older form langs=en+de is still read
            elif key in opts:
                try:
                    opts[key] = int(value)
                except ValueError:
                    raise HarvestError(f"sample corpus option {key} must be an integer, got '{value}'") from None
            else:
                raise HarvestError(f"unknown sample corpus option '{key}'; options: docs, seed, sentences, langs")
            listing = listing and not eq or key == "langs"
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


_LIMITS = (2, 12)
"""Length in characters of a non-word (a non-word unit in zh/ja)."""
_TRIES = 10_000
_SYLLABARY = 300
"""Scripts with more distinct characters than this in the frequent words write syllables."""


def nonwords(lang: str, n: int, seed: int = 0, words_per_string: tuple[int, int] = (4, 12)) -> list[str]:
    """``n`` sentence-like strings of ``words_per_string`` (inclusive range) non-words of ``lang``.

    A non-word is drawn from a character chain (trigrams; bigrams of syllables in Hangul) of the
    language's frequent words, so it has the language's script and letter statistics, and is
    rejected if it is in wordfreq's word list for the language. zh and ja are written without
    spaces and nearly every character is a word there, so a non-word is a unit of 2-3 characters of
    frequent words, and no run of 2 or more characters anywhere in the string is a listed word: a
    segmenter finds single characters only. Strings look like the sample corpus's sentences (first
    letter upper case, the language's full stop); the same seed gives the same strings.
    """
    if lang not in LANGUAGES:
        raise HarvestError(f"no non-words for '{lang}'; languages: {', '.join(LANGUAGES)}")
    low, high = words_per_string
    if n < 0 or not 1 <= low <= high:
        raise HarvestError(f"non-words need n >= 0 and 1 <= words per string, got {n} and {words_per_string}")
    rng = np.random.default_rng([seed, LANGUAGES.index(lang), 1])  # not the sample corpus's streams
    make = _unspaced_string if lang in _NO_SPACES else _spaced_string
    out = []
    for _ in range(n):
        text = make(lang, int(rng.integers(low, high + 1)), rng)
        out.append(text[:1].upper() + text[1:] + _END.get(lang, "."))
    return out


def write_stimuli(path: Path | str, lang: str, n: int, seed: int = 0) -> Path:
    """A stimuli CSV (``text,condition``): ``n`` one-sentence sample documents ``S`` and ``n``
    non-word strings ``N``, both of 4-12 words, alternating S, N, S, N, ..."""
    if n <= 0:
        raise HarvestError(f"stimuli need a positive number of items, got {n}")
    strings = nonwords(lang, n, seed)
    sentences = SampleCorpus(spec="sample", groups=[lang], docs=n, seed=seed, sentences=1).texts(lang)
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "condition"])
        for sentence, string in zip(sentences, strings):
            writer.writerows([[sentence, "S"], [string, "N"]])
    return path


def is_word(lang: str, token: str) -> bool:
    """Whether ``token`` is in wordfreq's word list for ``lang`` (case-insensitive)."""
    listed = _lexicon(lang)
    return token in listed or token.lower() in listed or token.casefold() in listed


def _spaced_string(lang: str, count: int, rng: np.random.Generator) -> str:
    return " ".join(_nonword(lang, rng) for _ in range(count))


def _nonword(lang: str, rng: np.random.Generator) -> str:
    order, chain = _chain(lang)
    for _ in range(_TRIES):
        context, chars = "^^", []
        while len(chars) <= _LIMITS[1]:
            options, cumulative = chain[context[-order:].rjust(2, "^")]
            char = options[int(np.searchsorted(cumulative, rng.random(), side="right"))]
            if char == "$":
                break
            chars.append(char)
            context = context[1] + char
        word = "".join(chars)
        if _LIMITS[0] <= len(word) <= _LIMITS[1] and not is_word(lang, word):
            return word
    raise HarvestError(f"could not make a non-word for '{lang}'")  # not seen: most draws pass


def _unspaced_string(lang: str, count: int, rng: np.random.Generator) -> str:
    chars, cumulative = _characters(lang)
    longest = _longest(lang)
    text = ""
    for _ in range(count):
        for _ in range(_TRIES):
            picks = np.searchsorted(cumulative, rng.random(int(rng.integers(2, 4))), side="right")
            candidate = text + "".join(chars[i] for i in picks)
            # every run of 2+ characters that ends in the new unit (earlier ones were checked before)
            if not any(is_word(lang, candidate[i:j]) for j in range(len(text) + 1, len(candidate) + 1)
                       for i in range(max(0, j - longest), j - 1)):
                text = candidate
                break
        else:
            raise HarvestError(f"could not make a non-word for '{lang}'")
    return text


@functools.lru_cache(maxsize=None)
def _lexicon(lang: str) -> dict[str, float]:
    import wordfreq

    return wordfreq.get_frequency_dict(lang)


@functools.lru_cache(maxsize=None)
def _longest(lang: str) -> int:
    return max(map(len, _lexicon(lang)))


@functools.lru_cache(maxsize=None)
def _letters(lang: str) -> tuple[list[str], set[str]]:
    """The frequent words written only in the language's main scripts (those of >= 5% of their
    letters: loanwords in another script are left out), and those scripts."""
    words, _ = _vocabulary(lang)
    counts = collections.Counter(_script(c) for w in words for c in w if _is_letter(c))
    total = sum(counts.values())
    scripts = {s for s, k in counts.items() if k >= 0.05 * total}
    return [w for w in words if all(_is_letter(c) and _script(c) in scripts for c in w)], scripts


@functools.lru_cache(maxsize=None)
def _chain(lang: str) -> tuple[int, dict[str, tuple[list[str], np.ndarray]]]:
    """Character chain over the word types (``^`` starts a word, ``$`` ends it): its order and
    the last two characters (one in a syllabary such as Hangul, whose two-syllable contexts only
    replay real words), ``^``-padded -> next characters and their cumulative probabilities."""
    words = _letters(lang)[0]
    order = 1 if len({c for w in words for c in w}) > _SYLLABARY else 2
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for word in words:
        padded = "^^" + word + "$"
        for i in range(2, len(padded)):
            counts[padded[i - order:i].rjust(2, "^")][padded[i]] += 1
    chain = {}
    for context, following in counts.items():
        options = sorted(following)
        cumulative = np.cumsum([following[c] for c in options], dtype=float)
        chain[context] = (options, cumulative / cumulative[-1])
    return order, chain


@functools.lru_cache(maxsize=None)
def _characters(lang: str) -> tuple[list[str], np.ndarray]:
    """The characters of the frequent words and their cumulative probabilities (by word type)."""
    counts = collections.Counter(c for w in _letters(lang)[0] for c in w)
    chars = sorted(counts)
    cumulative = np.cumsum([counts[c] for c in chars], dtype=float)
    return chars, cumulative / cumulative[-1]


def _is_letter(char: str) -> bool:
    """A letter or a combining mark (Devanagari vowel signs are marks, not letters)."""
    return char.isalpha() or unicodedata.category(char).startswith("M")


def _script(char: str) -> str:
    return unicodedata.name(char, "UNKNOWN").split(" ")[0]
