"""``lsn harvest --preset lape`` against a plain re-implementation of RUCAIBox's ``activation.py``.

The reference shares nothing with the package: it builds each language's ids as LAPE's data preparation
does (every document tokenized with ``tokenizer(text)``, BOS included, the ids concatenated into one
tensor), cuts them as ``activation.py`` does (``l = min(l, cap) // max_length * max_length``, then
``reshape(-1, max_length)``), runs one plain forward pass with a hook on each layer's ``act_fn`` and counts
``> 0`` over every position.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvester.store import read_attrs
from lsn.cli import main
from tests.conftest import write_text_corpus
from tests.test_tokenization import copy_model

SEQ = 16
"""The reference's ``max_length`` here (vLLM's ``max_model_len`` there): passed to both."""
FAST = ["--no-ray", "--no-progress", "--batch-size", "3", "--shard-tokens", "100"]
LAPE_CAP = 99_999_744


def reference(tok, lm, path, max_length: int, cap: int) -> tuple[int, np.ndarray, list[list[int]], int]:
    """``(n, over_zero [L, I], windows, dropped)`` as ``activation.py`` computes them for one language file."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            ids += tok(line)["input_ids"]  # the data preparation: each document with the tokenizer's BOS
    ids = torch.tensor(ids, dtype=torch.long)
    n = min(ids.size(0), cap) // max_length * max_length
    input_ids = ids[:n].reshape(-1, max_length)
    layers = lm.model.layers
    over_zero = torch.zeros(len(layers), lm.config.intermediate_size, dtype=torch.int64)

    def count(k):
        def hook(module, inputs, output):
            over_zero[k] += (output.float() > 0).sum(dim=(0, 1))
        return hook

    handles = [layer.mlp.act_fn.register_forward_hook(count(k)) for k, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            lm(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return n, over_zero.numpy(), input_ids.tolist(), min(ids.size(0), cap) - n


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lape")
    model = copy_model(root, bos=True)
    corpus = write_text_corpus(root / "corpus", langs=("fr", "ru"), docs=6)
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return root, model, corpus, tok, lm


def harvest(model, corpus, store, *extra) -> int:
    return main(["harvest", "--model", str(model), "--corpus", f"text:{corpus}", "--store", str(store),
                 "--preset", "lape", "--seq-len", str(SEQ), *FAST, *extra])


@pytest.mark.parametrize("cap", [None, 50])
def test_preset_lape_counts_what_activation_py_counts(setup, cap, capsys):
    root, model, corpus, tok, lm = setup
    store = root / f"cap{cap}"
    assert harvest(model, corpus, store, *(["--max-tokens-per-lang", str(cap)] if cap else [])) == 0
    ds = xr.open_zarr(store)
    attrs = read_attrs(store)
    for s, lang in enumerate(("fr", "ru")):
        n, over_zero, windows, dropped = reference(tok, lm, corpus / f"{lang}.txt", SEQ, cap or LAPE_CAP)
        assert n > 0 and dropped > 0 and windows[0][0] == tok.bos_token_id
        assert tok.eos_token_id not in sum(windows, [])  # nothing between documents but their BOS
        assert cap or sum(w.count(tok.bos_token_id) for w in windows) > 1
        shards = sorted((store / "tokens" / f"{s:05d}").glob("*.parquet"))
        assert [list(w) for f in shards for w in pq.read_table(f).column("ids").to_pylist()] == windows
        assert int(ds["tokens"].sel(group=lang)) == n
        np.testing.assert_array_equal(ds["active"].sel(group=lang).values, over_zero)
        assert attrs.corpus.remainder_tokens_per_group[s] == dropped
    assert attrs.corpus.remainder_tokens == sum(attrs.corpus.remainder_tokens_per_group)
    s = attrs.settings
    assert (s.seq_len, s.bos_place, s.separator, s.remainder) == (SEQ, "document", "none", "drop")
    assert attrs.corpus.options["max_tokens_per_lang"] == (cap or LAPE_CAP)
    assert "which --remainder drop drops" in capsys.readouterr().err  # a tiny corpus loses > 1%: reported


def test_summary_shows_the_dropped_tokens_and_the_settings(setup, capsys):
    root, model, corpus, *_ = setup
    store = root / "capNone"
    if not store.exists():
        assert harvest(model, corpus, store) == 0
    capsys.readouterr()
    assert main(["summary", "--store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    dropped = read_attrs(store).corpus.remainder_tokens_per_group
    assert out[1].rstrip().endswith("cut docs drop tok")
    assert [int(line.split()[-1]) for line in out if line.split()[0] in ("fr", "ru")] == list(dropped)
    assert any(ln.startswith("tokens: --bos auto (ids [1] per document)") and
               ln.endswith("--separator none, --remainder drop") for ln in out)


def test_the_defaults_keep_old_fingerprints_and_another_remainder_is_refused(setup, capsys):
    root, model, corpus, *_ = setup
    plain = root / "plain"
    args = ["harvest", "--model", str(model), "--corpus", f"text:{corpus}", "--seq-len", str(SEQ), *FAST]
    assert main([*args, "--store", str(plain)]) == 0
    settings = read_attrs(plain)["fingerprint"]["settings"]
    assert "separator" not in settings and "remainder" not in settings  # an old store's digest is unchanged
    manifest = json.loads((plain / "tokens" / "00000.json").read_text())
    assert "remainder_tokens" not in manifest and read_attrs(plain).corpus.remainder_tokens_per_group is None
    capsys.readouterr()
    assert main([*args, "--store", str(plain), "--remainder", "drop"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings.remainder: store has nothing, this run has 'drop'" in err[0]


def test_max_tokens_per_lang_caps_text_corpora(setup):
    root, model, corpus, *_ = setup
    store = root / "capped"
    assert main(["harvest", "--model", str(model), "--corpus", f"text:{corpus}", "--store", str(store),
                 "--seq-len", str(SEQ), "--max-tokens-per-lang", "40", *FAST]) == 0
    ds = xr.open_zarr(store)
    assert [int(ds["tokens"].sel(group=g)) for g in ("fr", "ru")] == [40, 40]  # the last window cut there


@pytest.mark.parametrize("extra,message", [
    (["--max-tokens-per-lang", "9"], "--max-tokens-per-lang is for running text"),
    (["--remainder", "drop"], "--remainder drop is for running text packed into windows"),
    (["--separator", "none"], "--separator none is for running text packed into windows"),
])
def test_settings_for_running_text_are_refused_elsewhere(tmp_path, capsys, extra, message):
    from tests import fixtures

    data = fixtures.write_instruct(tmp_path / "i.jsonl", langs=("en",), n=2)
    assert main(["harvest", "--model", "tiny:llama", "--corpus", f"instruct:{data}", "--store",
                 str(tmp_path / "s"), *FAST, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s").exists()


def test_a_stream_shorter_than_one_window_is_one_line(setup, tmp_path, capsys):
    _, model, _, tok, _ = setup
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "en.txt").write_text("a short line\n", encoding="utf-8")
    assert main(["harvest", "--model", str(model), "--corpus", f"text:{tmp_path / 'c'}", "--store",
                 str(tmp_path / "s"), "--preset", "lape", "--seq-len", "64", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # found while tokenizing: the store made is removed
    n = len(tok('a short line')['input_ids'])
    assert err[-1] == (f"lsn: error: corpus stream 'en' has {n} tokens, less than one --seq-len 64 window, and "
                       "--remainder drop drops them; lower --seq-len or use --remainder keep "
                       "(--remainder set by --preset lape)")
    assert not (tmp_path / "s").exists()
