"""Windows and shards: every corpus token exactly once, deterministic plans."""

import numpy as np

from harvester.backends.hf import load_tokenizer, resolve_model
from harvester.corpus import parse_corpus
from harvester.windows import batches, plan_shards, windows_of


def test_windows_are_consecutive_cuts():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    windows = list(windows_of(docs, 4))
    assert [w.tolist() for w in windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]


def test_plan_counts_every_token_once(text_corpus):
    tokenizer = load_tokenizer(resolve_model("tiny:llama"))
    corpus = parse_corpus(f"text:{text_corpus}")
    plan = plan_shards(corpus, tokenizer, seq_len=50, shard_tokens=300)
    for g, lang in enumerate(corpus.groups):
        expected = []
        for line in (text_corpus / f"{lang}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                expected += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        got = [t for s in plan.shards for w in s.windows if w.groups[0] == g for t in w.ids.tolist()]
        assert got == expected
        assert plan.tokens_per_group[g] == len(expected)
    for shard in plan.shards:
        assert len({int(w.groups[0]) for w in shard.windows}) == 1
        assert shard.n_tokens <= 300 and all(len(w.ids) <= 50 for w in shard.windows)
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))
    again = plan_shards(corpus, tokenizer, seq_len=50, shard_tokens=300)
    assert again.digest == plan.digest and len(again.shards) == len(plan.shards)
    assert plan_shards(corpus, tokenizer, seq_len=49, shard_tokens=300).digest != plan.digest


def test_batches_pad_right_with_group_minus_one(text_corpus):
    tokenizer = load_tokenizer(resolve_model("tiny:llama"))
    plan = plan_shards(parse_corpus(f"text:{text_corpus}"), tokenizer, seq_len=40, shard_tokens=10_000)
    windows = plan.shards[0].windows[-3:]
    ids, mask, groups = next(batches(windows, 3, pad_id=0))
    for row, w in enumerate(windows):
        n = len(w.ids)
        assert ids[row, :n].tolist() == w.ids.tolist() and mask[row, :n].all() and not mask[row, n:].any()
        assert (groups[row, n:] == -1).all() and (groups[row, :n] == w.groups).all()
    assert np.count_nonzero(groups >= 0) == sum(len(w.ids) for w in windows)
