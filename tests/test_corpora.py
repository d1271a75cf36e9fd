"""Corpus kinds ec40, wikipedia, instruct and stimuli, and the non-word generator: no model, fast."""

from __future__ import annotations

import json
import unicodedata

import pytest

from harvester.corpus import CorpusOptions, Stream, parse_corpus
from harvester.corpus import ec40 as ec40_module
from harvester.corpus.sample import is_word, nonwords, write_stimuli
from harvester.errors import HarvestError
from tests.fixtures import sentences, write_ec40, write_instruct, write_wikipedia
from tests.fixtures import write_stimuli as write_stimuli_fixture


def docs(corpus, stream: str) -> list:
    return list(corpus.documents(stream))


def error(spec: str, options: CorpusOptions | None = None) -> str:
    with pytest.raises(HarvestError) as info:
        parse_corpus(spec, options)
    message = str(info.value)
    assert "\n" not in message
    return message


def scripts(text: str) -> set[str]:
    return {unicodedata.name(c).split(" ")[0] for c in text if c.isalpha()}


# ---------------------------------------------------------------- ec40


@pytest.fixture
def ec40_dir(tmp_path):
    return write_ec40(tmp_path / "ec40")


def test_ec40_groups_streams_and_sides(ec40_dir):
    corpus = parse_corpus(f"ec40:{ec40_dir}", CorpusOptions(pairs="en-fr,fr-en"))
    assert corpus.groups == ["en-fr:src", "en-fr:tgt", "fr-en:src", "fr-en:tgt"]
    assert corpus.streams == [Stream("en-fr", packing="sequence"), Stream("fr-en", packing="sequence")]
    texts = sentences(("en", "fr"), 12)
    assert docs(corpus, "en-fr") == [[("en-fr:src", e), ("en-fr:tgt", f)] for e, f in zip(texts["en"], texts["fr"])]
    assert docs(corpus, "fr-en") == [[("fr-en:src", f), ("fr-en:tgt", e)] for e, f in zip(texts["en"], texts["fr"])]
    assert scripts(docs(corpus, "fr-en")[0][0][1]) == {"LATIN"}


def test_ec40_all_directions_come_from_the_files(ec40_dir):
    expected = ["en-fr", "fr-en", "en-ru", "ru-en", "en-zh", "zh-en"]  # EC40's order, then others
    for pairs in (None, "all"):
        corpus = parse_corpus(f"ec40:{ec40_dir}", CorpusOptions(pairs=pairs))
        assert [s.name for s in corpus.streams] == expected
        assert len(corpus.groups) == 12
    assert scripts(docs(corpus, "zh-en")[0][0][1]) == {"CJK"}
    assert "CYRILLIC" in scripts(docs(corpus, "en-ru")[0][1][1])


def test_ec40_max_pairs_and_blank_sides(ec40_dir):
    en, fr = ec40_dir / "EC40-train-set/en-fr.en", ec40_dir / "EC40-train-set/en-fr.fr"
    en_lines, fr_lines = en.read_text().splitlines(), fr.read_text().splitlines()
    en_lines[1], fr_lines[3] = "", "   "
    en.write_text("\n".join(en_lines) + "\n")
    fr.write_text("\n".join(fr_lines) + "\n")
    corpus = parse_corpus(f"ec40:{ec40_dir}", CorpusOptions(pairs="fr-en", max_pairs=5))
    assert [d[0][1] for d in docs(corpus, "fr-en")] == [fr_lines[i] for i in (0, 2, 4, 5, 6)]
    assert len(docs(parse_corpus(f"ec40:{ec40_dir}", CorpusOptions(pairs="en-fr")), "en-fr")) == 10


@pytest.mark.parametrize("split, folder", [("validation", "Ntrex-eval-set/test.en-ru"),
                                           ("test", "Flores200-test-set/en-test-set/test.en-ru")])
def test_ec40_evaluation_splits(tmp_path, split, folder):
    root = write_ec40(tmp_path, langs=("ru",), n=4, split=split)
    assert (root / f"{folder}.ru").is_file()
    corpus = parse_corpus(f"ec40:{root}", CorpusOptions(split=split))
    assert [s.name for s in corpus.streams] == ["en-ru", "ru-en"] and len(docs(corpus, "ru-en")) == 4
    assert "EC40-train-set" in error(f"ec40:{root}")  # no train files there


def test_ec40_errors(ec40_dir):
    spec = f"ec40:{ec40_dir}"
    assert "English-centric" in error(spec, CorpusOptions(pairs="fr-ru"))
    assert "English-centric" in error(spec, CorpusOptions(pairs="enfr"))
    message = error(spec, CorpusOptions(pairs="en-fr,xx-en"))
    assert "unknown EC40 language 'xx'" in message and "de, nl" in message and "zh" in message
    assert f"EC40 file not found: {ec40_dir / 'EC40-train-set/en-de.en'}" in error(spec, CorpusOptions(pairs="en-de"))
    assert "twice: en-fr" in error(spec, CorpusOptions(pairs="en-fr,fr-en,en-fr"))
    assert "no EC40 direction" in error(spec, CorpusOptions(pairs=" , "))
    assert "EC40 directory not found" in error(f"ec40:{ec40_dir / 'nope'}")
    (ec40_dir / "EC40-train-set/en-ru.ru").write_text("одна строка\n" * 13)
    message = error(spec, CorpusOptions(pairs="ru-en"))
    assert "en-ru.en has 12 lines" in message and "en-ru.ru has 13" in message


def test_ec40_language_tiers():
    assert len(ec40_module.LANGUAGES) == len(set(ec40_module.LANGUAGES)) == 40
    assert [len(t) for t in ec40_module.TIERS.values()] == [10, 10, 10, 10]
    assert {"de", "fr", "ru", "hi", "ar", "kab", "ast"} <= set(ec40_module.LANGUAGES)


def test_ec40_hub_offline_says_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = error("ec40", CorpusOptions(pairs="en-fr"))
    assert "ShaomuTan/EC40" in message and "ec40:PATH" in message


def test_ec40_from_the_hub_records_the_revision(monkeypatch, tmp_path):
    snapshot = write_ec40(tmp_path / "datasets--ShaomuTan--EC40/snapshots/abc123", langs=("de",), n=3)
    calls = []

    def download(repo_id, filename, repo_type, local_files_only):
        calls.append((repo_id, repo_type, filename, local_files_only))
        return str(snapshot / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    corpus = parse_corpus("ec40", CorpusOptions(pairs="de-en"))
    assert calls == [("ShaomuTan/EC40", "dataset", f"EC40-train-set/en-de.{side}", True) for side in ("en", "de")]
    assert len(docs(corpus, "de-en")) == 3
    source = corpus.source()
    assert source["hub"] == "ShaomuTan/EC40" and source["revision"] == "abc123"
    assert [f["file"] for f in source["files"]] == ["en-de.en", "en-de.de"]


def test_ec40_source_follows_the_files(ec40_dir):
    options = CorpusOptions(pairs="en-fr", max_pairs=3)
    source = parse_corpus(f"ec40:{ec40_dir}", options).source()
    assert source["kind"] == "ec40" and source["split"] == "train"
    assert source["pairs"] == ["en-fr"] and source["max_pairs"] == 3
    assert [f["file"] for f in source["files"]] == ["en-fr.en", "en-fr.fr"]
    json.dumps(source)
    path = ec40_dir / "EC40-train-set/en-fr.fr"
    path.write_text(path.read_text().replace("e", "é", 1))
    assert parse_corpus(f"ec40:{ec40_dir}", options).source() != source


# ---------------------------------------------------------------- wikipedia


@pytest.fixture
def wiki_dir(tmp_path):
    return write_wikipedia(tmp_path / "wiki")


def test_wikipedia_reads_files_in_order_and_skips_blank_text(wiki_dir):
    corpus = parse_corpus(f"wikipedia:20231101:de,fr:{wiki_dir}", CorpusOptions(max_tokens_per_lang=500))
    assert corpus.groups == ["de", "fr"]
    assert corpus.streams == [Stream("de", "pack", 500), Stream("fr", "pack", 500)]
    assert len(list((wiki_dir / "20231101.de").glob("*.parquet"))) == 2
    texts = sentences(("de", "fr"), 20, sentences_per_doc=3)
    assert docs(corpus, "de") == [[("de", t)] for t in texts["de"]]
    assert docs(corpus, "fr") == [[("fr", t)] for t in texts["fr"]]
    assert parse_corpus(f"wikipedia:20231101:fr,de:{wiki_dir}").groups == ["fr", "de"]


@pytest.mark.parametrize("arg, expected", [
    ("", "expected wikipedia:DATE:LANGS"),
    ("20231101", "expected wikipedia:DATE:LANGS"),
    ("20231101:de:", "expected wikipedia:DATE:LANGS"),
    ("2023-11-01:de", "YYYYMMDD"),
    ("20231101: , ", "names no languages"),
    ("20231101:de,,fr", "empty language"),
    ("20231101:de,fr,de", "given twice in 'wikipedia:20231101:de,fr,de': de"),
])
def test_wikipedia_bad_specs(arg, expected):
    assert expected in error(f"wikipedia:{arg}")


def test_wikipedia_local_errors(wiki_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert "wikipedia directory not found" in error(f"wikipedia:20231101:de:{wiki_dir / 'nope'}")
    assert "has no 20231101.es folder" in error(f"wikipedia:20231101:de,es:{wiki_dir}")
    (wiki_dir / "20231101.it").mkdir()
    assert "20231101.it has no .parquet files" in error(f"wikipedia:20231101:it:{wiki_dir}")
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), wiki_dir / "20231101.it/train-0.parquet")
    assert "has no 'text' column (columns: id, body)" in error(f"wikipedia:20231101:it:{wiki_dir}")
    (wiki_dir / "20231101.it/train-0.parquet").write_text("not parquet")
    assert "cannot read parquet file" in error(f"wikipedia:20231101:it:{wiki_dir}")


def test_wikipedia_hub_offline_suggests_a_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = error("wikipedia:20231101:de,fr")
    assert "wikimedia/wikipedia" in message and "wikipedia:20231101:de,fr:DIR" in message


def test_wikipedia_source_follows_the_files(wiki_dir):
    spec = f"wikipedia:20231101:de,fr:{wiki_dir}"
    source = parse_corpus(spec).source()
    assert source["kind"] == "wikipedia" and source["date"] == "20231101" and source["langs"] == ["de", "fr"]
    assert [f["file"] for f in source["files"]["de"]] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    json.dumps(source)
    write_wikipedia(wiki_dir, langs=("fr",), docs=5)
    assert parse_corpus(spec).source() != source


# ---------------------------------------------------------------- instruct


def write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def example(lang, prompt="Q", response="A"):
    return json.dumps({"lang": lang, "prompt": prompt, "response": response, "id": 7})


def test_instruct_groups_in_first_appearance_order(tmp_path):
    path = write_lines(tmp_path / "i.jsonl", [example("de", "p1", "r1"), "", example("en", "p2", "r2"),
                                              example("de", "p3", "r3"), example("zh", "p4", "r4")])
    corpus = parse_corpus(f"instruct:{path}")
    assert corpus.groups == ["de:prompt", "de:response", "en:prompt", "en:response", "zh:prompt", "zh:response"]
    assert corpus.streams == [Stream(lang, packing="sequence") for lang in ("de", "en", "zh")]
    assert docs(corpus, "de") == [[("de:prompt", "p1"), ("de:response", "r1")],
                                  [("de:prompt", "p3"), ("de:response", "r3")]]
    assert docs(corpus, "zh") == [[("zh:prompt", "p4"), ("zh:response", "r4")]]


def test_instruct_fixture(tmp_path):
    corpus = parse_corpus(f"instruct:{write_instruct(tmp_path / 'i.jsonl')}")
    assert [s.name for s in corpus.streams] == ["en", "de", "zh"]
    assert [len(docs(corpus, lang)) for lang in ("en", "de", "zh")] == [8, 8, 8]
    assert scripts(docs(corpus, "zh")[0][1][1]) == {"CJK"}


@pytest.mark.parametrize("line, expected", [
    ('{"lang": "de", "prompt": "x"', "not valid JSON"),
    ('["de", "x", "y"]', "expected a JSON object with lang, prompt and response, got list"),
    ('{"lang": "de", "prompt": "x"}', "missing field 'response'"),
    ('{"lang": "de", "prompt": 3, "response": "y"}', "field 'prompt' must be a string, got int"),
    ('{"lang": "", "prompt": "x", "response": "y"}', "field 'lang' is empty"),
])
def test_instruct_malformed_line(tmp_path, line, expected):
    path = write_lines(tmp_path / "i.jsonl", [example("en"), "", line, example("de")])
    assert f"{path}:3: {expected}" in error(f"instruct:{path}")


def test_instruct_file_errors(tmp_path):
    assert "instruct file not found" in error(f"instruct:{tmp_path / 'none.jsonl'}")
    assert "needs a file" in error("instruct:")
    assert "has no examples" in error(f"instruct:{write_lines(tmp_path / 'e.jsonl', [])}")
    assert "has no examples" in error(f"instruct:{write_lines(tmp_path / 'b.jsonl', ['', '  '])}")


def test_instruct_source_follows_the_file(tmp_path):
    path = write_lines(tmp_path / "i.jsonl", [example("en")])
    source = parse_corpus(f"instruct:{path}").source()
    assert source["kind"] == "instruct" and source["files"][0]["file"] == "i.jsonl"
    write_lines(path, [example("en", "other")])
    assert parse_corpus(f"instruct:{path}").source() != source


# ---------------------------------------------------------------- stimuli


def test_stimuli_groups_and_documents(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('id,condition,text\n1,B,"one, two"\n\n2,A,"three\nfour"\n3,B,five\n', encoding="utf-8")
    corpus = parse_corpus(f"stimuli:{path}")
    assert corpus.groups == ["B", "A"]
    assert corpus.streams == [Stream("B", packing="sequence"), Stream("A", packing="sequence")]
    assert docs(corpus, "B") == [[("B", "one, two")], [("B", "five")]]
    assert docs(corpus, "A") == [[("A", "three\nfour")]]


@pytest.mark.parametrize("content, expected", [
    ("text,cond\nx,S\n", "has no column condition (header: text,cond)"),
    ("words,label\nx,S\n", "has no column text or condition"),
    ('text,condition\n"a\nb",S\nx,S,extra\n', ":4: 3 fields, the header has 2"),
    ("text,condition\nx,S\n  ,N\n", ":3: empty text"),
    ("text,condition\nx,S\ny, \n", ":3: empty condition"),
    ("", "is empty"),
    ("text,condition\n", "has no rows"),
])
def test_stimuli_errors(tmp_path, content, expected):
    path = tmp_path / "s.csv"
    path.write_text(content, encoding="utf-8")
    message = error(f"stimuli:{path}")
    assert expected in message and str(path) in message


def test_stimuli_source_follows_the_file(tmp_path):
    path = write_stimuli_fixture(tmp_path / "s.csv", n=3)
    source = parse_corpus(f"stimuli:{path}").source()
    assert source["kind"] == "stimuli" and source["files"][0]["file"] == "s.csv"
    path.write_text(path.read_text(encoding="utf-8") + "extra,S\n", encoding="utf-8")
    assert parse_corpus(f"stimuli:{path}").source() != source


# ---------------------------------------------------------------- non-words


def test_write_stimuli_parses_as_sentences_and_nonwords(tmp_path):
    corpus = parse_corpus(f"stimuli:{write_stimuli_fixture(tmp_path / 's.csv', n=10)}")
    assert corpus.groups == ["S", "N"]
    assert len(docs(corpus, "S")) == len(docs(corpus, "N")) == 10
    assert docs(corpus, "N")[0][0][1] == nonwords("en", 1)[0]
    assert write_stimuli(tmp_path / "again.csv", "en", 10).read_bytes() == (tmp_path / "s.csv").read_bytes()


def test_nonwords_are_deterministic():
    assert nonwords("ru", 5, seed=3) == nonwords("ru", 5, seed=3) != nonwords("ru", 5, seed=4)
    assert len(nonwords("zh", 4)) == 4


@pytest.mark.parametrize("lang, script", [("en", "LATIN"), ("ru", "CYRILLIC"), ("hi", "DEVANAGARI")])
def test_nonwords_are_not_words_in_the_right_script(lang, script):
    strings = nonwords(lang, 20, seed=1, words_per_string=(3, 6))
    tokens = [t.strip(".।") for s in strings for t in s.split()]
    assert all(3 <= len(s.split()) <= 6 for s in strings)
    assert len(set(tokens)) > 0.8 * len(tokens)
    assert not [t for t in tokens if is_word(lang, t)]
    assert {unicodedata.name(c).split(" ")[0] for t in tokens for c in t} == {script}


def test_chinese_nonwords_contain_no_multicharacter_word():
    for text in nonwords("zh", 10, seed=2):
        body = text.rstrip("。")
        assert scripts(body) == {"CJK"}
        runs = [body[i:j] for i in range(len(body)) for j in range(i + 2, min(len(body), i + 20) + 1)]
        assert not [r for r in runs if is_word("zh", r)]


def test_nonwords_unknown_language():
    with pytest.raises(HarvestError, match="no non-words for 'xx'"):
        nonwords("xx", 3)


def test_corpora_pickle(tmp_path):
    """Workers may receive a corpus by pickling: it must still read the same documents."""
    import pickle

    specs = [f"ec40:{write_ec40(tmp_path / 'ec40', langs=('fr',), n=3)}",
             f"wikipedia:20231101:de,fr:{write_wikipedia(tmp_path / 'wiki', docs=4)}",
             f"instruct:{write_instruct(tmp_path / 'i.jsonl', n=2)}",
             f"stimuli:{write_stimuli_fixture(tmp_path / 's.csv', n=2)}"]
    for spec in specs:
        corpus = parse_corpus(spec)
        copy = pickle.loads(pickle.dumps(corpus))
        assert copy.groups == corpus.groups and copy.source() == corpus.source()
        assert [docs(copy, s.name) for s in copy.streams] == [docs(corpus, s.name) for s in corpus.streams]
