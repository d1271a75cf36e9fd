"""Windows and token shards: every corpus token exactly once, deterministic plans, Parquet round trip."""

import json

import numpy as np
import pytest

from harvester.backends.hf import load_tokenizer, resolve_model
from harvester.corpus import Corpora, CorpusOptions, Stream, parse_corpora
from harvester.errors import HarvestError
from harvester.windows import (SHARDS_PER_STREAM, TokenSettings, batches, load_shard, tokenize_stream,
                               windows_of)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny:llama"))


def settings(tok, seq_len=50, shard_tokens=300, pooling="token"):
    return TokenSettings(seq_len, shard_tokens, pooling, "test", tok.eos_token_id)


def plan(corpora, tok, root, **kw):
    return [list(tokenize_stream(corpora, s, tok, settings(tok, **kw), str(root))) for s in range(len(corpora.streams))]


class Paired:
    """Two streams of two-segment documents, like translation pairs."""

    spec = "paired"
    groups = ["a:src", "a:tgt", "b:src", "b:tgt"]
    streams = [Stream("a", "sequence"), Stream("b", "sequence", max_tokens=9)]
    docs = {"a": [("hello world", "bonjour le monde"), ("one two three four five six seven eight nine ten", "x")],
            "b": [("good morning", "guten morgen"), ("cat", "katze")]}

    def documents(self, stream):
        for src, tgt in self.docs[stream]:
            yield [(f"{stream}:src", src), (f"{stream}:tgt", tgt)]

    def source(self):
        return {"kind": "paired"}


def test_windows_are_consecutive_cuts():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    windows = list(windows_of(docs, 4))
    assert [w.tolist() for w in windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]


def test_text_plan_counts_every_token_once(text_corpus, tokenizer, tmp_path):
    corpora = parse_corpora(f"text:{text_corpus}")
    streams = plan(corpora, tokenizer, tmp_path / "a")
    for g, lang in enumerate(corpora.groups):
        expected = []
        for line in (text_corpus / f"{lang}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                expected += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        shards = [load_shard(info) for info in streams[g]]
        got = [t for s in shards for w in s.windows for t in w.ids.tolist()]
        assert got == expected
        assert all((w.groups == g).all() for s in shards for w in s.windows)
        assert sum(i.n_tokens for i in streams[g]) == len(expected) == sum(i.tokens[g] for i in streams[g])
        assert [i.index for i in streams[g]] == [g * SHARDS_PER_STREAM + k for k in range(len(streams[g]))]
        for s in shards:
            assert sum(len(w.ids) for w in s.windows) <= 300 and all(len(w.ids) <= 50 for w in s.windows)
    again = plan(corpora, tokenizer, tmp_path / "b")
    assert [[i.digest for i in s] for s in again] == [[i.digest for i in s] for s in streams]
    other = plan(corpora, tokenizer, tmp_path / "c", seq_len=49)
    assert [i.digest for i in other[0]] != [i.digest for i in streams[0]]


def test_finished_stream_is_read_from_its_manifest(text_corpus, tokenizer, tmp_path):
    corpora = parse_corpora(f"text:{text_corpus}")
    first = list(tokenize_stream(corpora, 1, tokenizer, settings(tokenizer), str(tmp_path)))
    manifest = json.loads((tmp_path / "00001.json").read_text())
    assert [s["digest"] for s in manifest["shards"]] == [i.digest for i in first]
    again = list(tokenize_stream(corpora, 1, None, settings(tokenizer), str(tmp_path)))  # no tokenizer needed
    assert again == first
    with pytest.raises(HarvestError, match="other settings"):
        list(tokenize_stream(corpora, 1, tokenizer, settings(tokenizer, seq_len=51), str(tmp_path)))


def test_paired_documents_are_sequences_with_groups(tokenizer, tmp_path):
    corpora = Corpora([Paired()])
    streams = plan(corpora, tokenizer, tmp_path, seq_len=8)
    windows = [w for info in streams[0] for w in load_shard(info).windows]
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    src, tgt = enc("hello world"), enc("bonjour le monde")
    first = (src + tgt + [tokenizer.eos_token_id])[:8]
    assert windows[0].ids.tolist() == first
    assert windows[0].groups.tolist() == ([0] * len(src) + [1] * (len(tgt) + 1))[:8]
    assert len(windows) == 2 and len(windows[1].ids) == 8  # one document per window, cut at seq_len
    manifest = json.loads((tmp_path / "00000.json").read_text())
    long = len(enc("one two three four five six seven eight nine ten")) + len(enc("x")) + 1
    assert manifest["truncated_documents"] == 1 + (len(src) + len(tgt) + 1 > 8)
    assert manifest["truncated_tokens"] == long - 8 + max(0, len(src) + len(tgt) + 1 - 8)
    b = [w for info in streams[1] for w in load_shard(info).windows]
    assert sum(len(w.ids) for w in b) == 9  # max_tokens cuts the stream exactly
    assert set(np.concatenate([w.groups for w in b]).tolist()) <= {2, 3}


def test_pooled_documents_have_no_eos_and_must_fit(tokenizer, tmp_path):
    corpora = Corpora([Paired()], CorpusOptions(pooling="last"))
    with pytest.raises(HarvestError, match="more than --seq-len 8"):
        plan(corpora, tokenizer, tmp_path / "a", seq_len=8, pooling="last")
    streams = plan(corpora, tokenizer, tmp_path / "b", seq_len=64, pooling="last")
    w = load_shard(streams[1][0]).windows[0]
    assert tokenizer.eos_token_id not in w.ids.tolist()


def test_corrupt_token_shard_is_refused(text_corpus, tokenizer, tmp_path):
    corpora = parse_corpora(f"text:{text_corpus}")
    info = next(tokenize_stream(corpora, 0, tokenizer, settings(tokenizer), str(tmp_path)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(info.path)
    ids = [list(r) for r in table.column("ids").to_pylist()]
    ids[0][0] += 1
    pq.write_table(pa.table({"ids": pa.array(ids, type=pa.list_(pa.int32())), "groups": table.column("groups")}),
                   info.path)
    with pytest.raises(HarvestError, match="does not match its manifest"):
        load_shard(info)


def test_batches_pad_with_group_minus_one(tokenizer, tmp_path):
    corpora = Corpora([Paired()])
    windows = [w for info in plan(corpora, tokenizer, tmp_path, seq_len=8)[1] for w in load_shard(info).windows]
    ids, mask, groups = next(batches(windows, 4, pad_id=0))
    assert ids.shape == mask.shape == groups.shape
    assert ((groups == -1) == (mask == 0)).all()
