"""The built-in sample corpus: real words, many languages and scripts, deterministic, sized."""

import unicodedata

import pytest

from harvester.corpus import parse_corpus
from harvester.errors import HarvestError


def script(text: str) -> str:
    for ch in text:
        if ch.isalpha():
            return unicodedata.name(ch).split()[0]
    return "NONE"


def test_languages_and_scripts():
    corpus = parse_corpus("sample:docs=3")
    assert len(corpus.groups) >= 8
    scripts = {script(next(iter(corpus.texts(lang)))) for lang in corpus.groups}
    assert len(scripts) >= 3
    assert {"LATIN", "CYRILLIC", "CJK", "ARABIC", "DEVANAGARI"} <= scripts


def test_deterministic_and_sized():
    first = list(parse_corpus("sample:docs=5,seed=1,langs=en+hi").texts("hi"))
    again = list(parse_corpus("sample:docs=5,seed=1,langs=en+hi").texts("hi"))
    other = list(parse_corpus("sample:docs=5,seed=2,langs=en+hi").texts("hi"))
    assert first == again and first != other and len(first) == 5
    more = list(parse_corpus("sample:docs=5,seed=1,sentences=6,langs=en").texts("en"))
    assert sum(len(d) for d in more) > sum(len(d) for d in parse_corpus("sample:docs=5,seed=1,langs=en").texts("en"))


def test_words_come_from_the_word_list():
    import wordfreq

    known = set(wordfreq.get_frequency_dict("de"))
    words = " ".join(parse_corpus("sample:docs=4,langs=de").texts("de")).replace(".", "").lower().split()
    assert words and all(w in known for w in words)


@pytest.mark.parametrize("spec", ["sample:docs=0", "sample:langs=xx", "sample:size=3", "sample:seed=a"])
def test_bad_options(spec):
    with pytest.raises(HarvestError):
        parse_corpus(spec)
