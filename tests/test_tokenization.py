"""How documents become tokens (``--bos``, ``--eos-per-example``, ``--encode``), against plain references.

The references share nothing with the package's tokenization: they encode with ``tokenizer.encode``
and plain list slicing, run one plain forward pass per sequence with their own hooks, and count in NumPy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvester.backends.hf import resolve_model
from harvester.errors import HarvestError
from harvester.store import read_attrs
from harvester.windows import resolve_bos
from lsn.cli import main
from tests import fixtures
from tests.conftest import write_text_corpus
from tests.helpers import assert_same_totals
from tests.test_integrity import flip_byte

FAST = ["--no-ray", "--no-progress", "--batch-size", "3", "--shard-tokens", "400"]
OLD = ["--bos", "none", "--eos-per-example", "--encode", "segments"]
"""lsn's encoding before these options."""


def copy_model(root: Path, bos: bool) -> Path:
    """``tiny:llama`` with a tokenizer that prepends ``<s>`` as Llama's does (``bos``), or one without any
    BOS token (the built-in tokenizer has a BOS token but adds no special token)."""
    from tokenizers.processors import TemplateProcessing

    path = root / ("bos" if bos else "no-bos")
    shutil.copytree(resolve_model("tiny:llama"), path)
    tok = AutoTokenizer.from_pretrained(path)
    if bos:
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    else:
        tok.bos_token = None
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> Path:
    return copy_model(tmp_path_factory.mktemp("models"), bos=True)


@pytest.fixture(scope="module")
def model(bos_model):
    return (AutoTokenizer.from_pretrained(bos_model),
            AutoModelForCausalLM.from_pretrained(bos_model, dtype=torch.float32).eval())


def activations(lm, sequences):
    """Each sequence's MLP activations ``[L, T, I]`` (``act_fn(gate_proj(x))``), one forward pass each."""
    layers = lm.model.layers
    captured = {}
    handles = [layer.mlp.register_forward_hook(
        lambda m, inputs, output, k=k: captured.__setitem__(k, m.act_fn(m.gate_proj(inputs[0]))[0].double().numpy()))
        for k, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for ids in sequences:
                lm(input_ids=torch.tensor([ids]))
                yield np.stack([captured[k] for k in range(len(layers))])
    finally:
        for h in handles:
            h.remove()


def over_zero(lm, sequences) -> tuple[int, np.ndarray]:
    """``(total_tokens, over_zero [L, I])`` as the alignment study's activation.py counts them."""
    total, counts = 0, 0
    for acts in activations(lm, sequences):
        total += acts.shape[1]
        counts = counts + (acts > 0).sum(axis=1)
    return total, counts


def group(store: Path, name: str) -> dict:
    ds = xr.open_zarr(store)
    return {v: ds[v].sel(group=name).values for v in ds.data_vars}


def harvest(model_path, corpus: str, store: Path, *extra) -> int:
    return main(["harvest", "--model", str(model_path), "--corpus", corpus, "--store", str(store), *FAST, *extra])


# -- (a) the alignment study's two passes, in one ---------------------------------------------------------
def test_response_group_is_the_studys_full_minus_prefix(model, bos_model, tmp_path):
    """Under the defaults, an instruct harvest's groups are what NJUNLP's activation.py counts:
    ``tokenizer.encode(instruction + generated)`` and ``tokenizer.encode(instruction)`` (BOS, no EOS),
    the response being full - prefix, count for count."""
    tok, lm = model
    data = fixtures.write_instruct(tmp_path / "i.jsonl", langs=("en", "de"), n=5)
    assert harvest(bos_model, f"instruct:{data}", tmp_path / "s", "--seq-len", "256") == 0
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    for lang in ("en", "de"):
        ours = [r for r in records if r["lang"] == lang]
        full = [tok.encode(r["prompt"] + r["response"]) for r in ours]
        prefix = [tok.encode(r["prompt"]) for r in ours]
        assert all(f[0] == tok.bos_token_id and f[:len(p)] == p for f, p in zip(full, prefix))
        n_full, active_full = over_zero(lm, full)
        n_prefix, active_prefix = over_zero(lm, prefix)
        prompt, response = group(tmp_path / "s", f"{lang}:prompt"), group(tmp_path / "s", f"{lang}:response")
        assert response["tokens"] == n_full - n_prefix and prompt["tokens"] == n_prefix
        np.testing.assert_array_equal(response["active"], active_full - active_prefix)
        np.testing.assert_array_equal(prompt["active"], active_prefix)
    attrs = read_attrs(tmp_path / "s")
    assert attrs.corpus.boundaries_per_group == (0, 5, 0, 5)
    assert attrs.corpus.boundary_mismatches_per_group == (0, 0, 0, 0)
    s = attrs.settings
    assert (s.bos, s.bos_place, s.bos_ids, s.eos_per_example, s.encode) == ("auto", "document", (1,), False, "whole")


# -- (b) BOS per document, per window, none -----------------------------------------------------------------
def reference_windows(corpus: Path, tok, seq_len: int, bos: str) -> dict[str, list[list[int]]]:
    """Each language's windows with plain loops: lines encoded alone, each followed by EOS; BOS before
    each line (document), or before each window's ``seq_len - 1`` tokens (window), or nowhere."""
    out = {}
    for file in sorted(corpus.glob("*.txt")):
        stream = []
        for line in file.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                head = [tok.bos_token_id] if bos == "document" else []
                stream += head + tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if bos == "window":
            out[file.stem] = [[tok.bos_token_id] + stream[i:i + seq_len - 1] for i in range(0, len(stream), seq_len - 1)]
        else:
            out[file.stem] = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return out


SEQ = 24


@pytest.fixture(scope="module")
def text_stores(bos_model, tmp_path_factory):
    """A text corpus harvested with each --bos: ``(corpus, {mode: store})``."""
    root = tmp_path_factory.mktemp("text")
    corpus = write_text_corpus(root / "corpus", langs=("fr", "ru"), docs=6)
    stores = {}
    for mode in ("auto", "document", "window", "none"):
        stores[mode] = root / mode
        assert harvest(bos_model, f"text:{corpus}", stores[mode], "--seq-len", str(SEQ), "--bos", mode) == 0
    return corpus, stores


@pytest.mark.parametrize("mode", ["document", "window", "none"])
def test_bos_placement_on_packed_text_matches_plain_windows(text_stores, model, mode):
    tok, lm = model
    corpus, stores = text_stores
    expected = reference_windows(corpus, tok, SEQ, mode)
    for s, (lang, windows) in enumerate(expected.items()):
        shards = sorted((stores[mode] / "tokens" / f"{s:05d}").glob("*.parquet"))
        got = [list(w) for f in shards for w in pq.read_table(f).column("ids").to_pylist()]
        assert got == windows, lang
        acts = np.concatenate(list(activations(lm, windows)), axis=1)  # [L, T, I]
        totals = group(stores[mode], lang)
        assert totals["tokens"] == acts.shape[1]
        np.testing.assert_array_equal(totals["active"], (acts > 0).sum(axis=1))
        np.testing.assert_allclose(totals["act_sum"], acts.sum(axis=1), rtol=1e-4, atol=1e-5)
    bos_tokens = sum(w.count(tok.bos_token_id) for ws in expected.values() for w in ws)
    assert (bos_tokens > 0) == (mode != "none")


def test_auto_is_per_document_for_packed_text(text_stores):
    _, stores = text_stores
    assert_same_totals(stores["auto"], stores["document"])
    assert read_attrs(stores["auto"]).settings.bos_place == "document"


def test_bos_follows_what_the_tokenizer_adds(tmp_path):
    """A tokenizer that prepends nothing gets no BOS under auto, its bos_token_id when asked; without a BOS
    token, document and window are refused in one line."""
    plain = AutoTokenizer.from_pretrained(resolve_model("tiny:llama"))  # has <s>, adds no special token
    assert resolve_bos(plain, "auto") == ("none", ())
    assert resolve_bos(plain, "window") == ("window", (plain.bos_token_id,))
    none = copy_model(tmp_path, bos=False)
    with pytest.raises(HarvestError, match="the tokenizer has no BOS token"):
        resolve_bos(AutoTokenizer.from_pretrained(none), "document")


def test_a_missing_bos_token_is_one_line(tmp_path, capsys):
    none = copy_model(tmp_path, bos=False)
    assert harvest(none, "sample:docs=2,langs=en", tmp_path / "s", "--bos", "window") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lsn: error: --bos window: the tokenizer has no BOS token (bos_token_id); use --bos auto or none"]
    assert not (tmp_path / "s").exists()


# -- (c) boundaries a token straddles --------------------------------------------------------------------
def test_boundary_mismatches_are_counted_reported_and_roles_follow_characters(model, bos_model, tmp_path, capsys):
    tok, _ = model
    examples = [("en", "Hello wi", "th more text."), ("en", "Tell me.", " Fine."), ("en", "One comp", "uter here."),
                ("de", "Gut.", " Ja."), ("de", "Sag pa", "ra mich.")]
    data = tmp_path / "i.jsonl"
    data.write_text("".join(json.dumps({"lang": lang, "prompt": p, "response": r}) + "\n" for lang, p, r in examples))
    expected = {"en:response": 0, "de:response": 0}
    tokens = {"en:prompt": 0, "en:response": 0, "de:prompt": 0, "de:response": 0}
    for lang, p, r in examples:
        whole = tok(p + r, add_special_tokens=False)["input_ids"]
        if tok.encode(p) != tok.encode(p + r)[:len(tok.encode(p))]:
            expected[f"{lang}:response"] += 1
        # a token is the prompt's when its first character is: the text before it is shorter than the prompt
        in_prompt = sum(1 for i in range(len(whole)) if len(tok.decode(whole[:i], clean_up_tokenization_spaces=False)) < len(p))
        tokens[f"{lang}:prompt"] += 1 + in_prompt  # BOS counts for the prompt
        tokens[f"{lang}:response"] += len(whole) - in_prompt
    en, de = expected["en:response"], expected["de:response"]
    assert en >= 1 and de >= 1 and en + de < len(examples)  # the case is built to straddle, not everywhere
    assert harvest(bos_model, f"instruct:{data}", tmp_path / "s", "--seq-len", "64") == 0
    printed = capsys.readouterr().out
    attrs = read_attrs(tmp_path / "s")
    assert attrs.corpus.boundary_mismatches_per_group == (0, en, 0, de)
    assert attrs.corpus.boundaries_per_group == (0, 3, 0, 2)
    assert {g: int(group(tmp_path / "s", g)["tokens"]) for g in tokens} == tokens
    line = f"boundary mismatches (prompt encoded alone not a prefix of the whole): en:response {en} of 3, de:response {de} of 2"
    assert line in printed.splitlines()
    assert main(["summary", "--store", str(tmp_path / "s")]) == 0
    assert line in capsys.readouterr().out.splitlines()


def test_eos_per_example_ends_each_example(model, bos_model, tmp_path):
    tok, _ = model
    examples = [("en", "Hello wi", "th more text."), ("en", "Tell me.", " Fine.")]
    data = tmp_path / "i.jsonl"
    data.write_text("".join(json.dumps({"lang": lang, "prompt": p, "response": r}) + "\n" for lang, p, r in examples))
    assert harvest(bos_model, f"instruct:{data}", tmp_path / "a", "--seq-len", "64") == 0
    assert harvest(bos_model, f"instruct:{data}", tmp_path / "b", "--seq-len", "64", "--eos-per-example") == 0
    rows = [pq.read_table(f).column("ids").to_pylist() for f in sorted((tmp_path / "a" / "tokens").rglob("*.parquet"))]
    assert [list(w) for r in rows for w in r] == [tok.encode(p + r) for _, p, r in examples]
    assert group(tmp_path / "b", "en:response")["tokens"] == group(tmp_path / "a", "en:response")["tokens"] + 2
    assert group(tmp_path / "b", "en:prompt")["tokens"] == group(tmp_path / "a", "en:prompt")["tokens"]


# -- (d) the fingerprint -------------------------------------------------------------------------------
def test_another_bos_on_resume_is_refused(text_stores, bos_model, capsys):
    corpus, stores = text_stores
    capsys.readouterr()
    assert harvest(bos_model, f"text:{corpus}", stores["document"], "--seq-len", str(SEQ), "--bos", "window") == 2
    err = capsys.readouterr().err
    assert "holds a different harvest (settings.bos: store has 'document', this run has 'window')" in err
    assert harvest(bos_model, f"text:{corpus}", stores["document"], "--seq-len", str(SEQ), "--bos", "document") == 0


def test_a_store_from_before_the_options_reads_verifies_and_resumes(tmp_path, capsys):
    """A store written before --bos existed has none of the new settings, in its fingerprint or its token
    manifests: it reads as --bos none, verifies, and a repaired shard is harvested again with the old
    encoding's flags (the defaults are refused: they would count other tokens)."""
    args = ["--model", "tiny:llama", "--corpus", "sample:docs=12,langs=en+de", "--seq-len", "64", *FAST]
    store = tmp_path / "old"
    assert main(["harvest", "--store", str(store), *args, *OLD]) == 0
    settings = read_attrs(store)["fingerprint"]["settings"]
    assert not {"bos", "bos_place", "bos_ids", "eos_per_example", "encode", "separator", "remainder"} & set(settings)
    manifests = sorted((store / "tokens").glob("[0-9]*.json"))
    assert len(manifests) == 2
    for manifest in manifests:  # the stream manifests, as lsn wrote them before
        made = json.loads(manifest.read_text())
        for key in ("bos", "bos_ids", "eos_per_example", "encode", "separator", "remainder"):
            del made["settings"][key]
        manifest.write_text(json.dumps(made))
    shutil.copytree(store, tmp_path / "before")
    assert main(["verify", str(store)]) == 0
    assert main(["summary", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "tokens: --bos none, EOS after every example, --encode segments" in out.splitlines()
    assert main(["harvest", "--store", str(store), *args]) == 2
    assert "settings.bos: store has nothing, this run has 'auto'" in capsys.readouterr().err
    flip_byte(store / "shards" / "act_sum" / "c" / "0" / "0" / "0" / "0")  # shard 0's row
    assert main(["verify", "--repair", str(store)]) == 0
    assert main(["harvest", "--store", str(store), *args, *OLD]) == 0
    assert read_attrs(store).complete
    assert_same_totals(store, tmp_path / "before")


# -- a Llama-2-style SentencePiece tokenizer (dummy prefix), the kind transformers #26273 is about ------------
@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    built = fixtures.sentencepiece_llama(root)
    built["model"].save_pretrained(root / "model")
    built["fast"].save_pretrained(root / "model")
    return root / "model", built["model"]


@pytest.mark.parametrize("joint", ["space", "mid-word"])
def test_sentencepiece_roles_are_the_studys_full_minus_prefix(sentencepiece_model, tmp_path, joint):
    """With a dummy-prefix SentencePiece tokenizer the response group is what the study's two encodings
    subtract wherever the prompt's encoding is a prefix of the whole one; every other example is counted
    as a boundary mismatch, exactly those. ``joint``: the response starts with a space (the prefix holds),
    or the prompt ends in the middle of a word the response finishes (a token straddles the boundary)."""
    path, lm = sentencepiece_model
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("Answer")["input_ids"][0] == tok.bos_token_id
    texts = fixtures.sentences(("en",), 6, seed=5)["en"]
    if joint == "space":
        records = [{"lang": "en", "prompt": f"Question: is it {t.split()[0]}?", "response": " " + t} for t in texts]
    else:
        records = [{"lang": "en", "prompt": f"Question: {t[:3]}", "response": t[3:]} for t in texts]
    data = tmp_path / "i.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert harvest(path, f"instruct:{data}", tmp_path / "s", "--seq-len", "200") == 0
    full = [tok.encode(r["prompt"] + r["response"]) for r in records]
    prefix = [tok.encode(r["prompt"]) for r in records]
    holds = [f[:len(p)] == p for f, p in zip(full, prefix)]
    attrs = read_attrs(tmp_path / "s")
    assert attrs.corpus.boundary_mismatches_per_group == (0, holds.count(False))
    assert all(holds) if joint == "space" else not all(holds)
    kept = [k for k, ok in enumerate(holds) if ok]
    if len(kept) == len(records):  # every example: the response group is the study's full - prefix exactly
        n_full, active_full = over_zero(lm, full)
        n_prefix, active_prefix = over_zero(lm, prefix)
        response = group(tmp_path / "s", "en:response")
        assert response["tokens"] == n_full - n_prefix
        np.testing.assert_array_equal(response["active"], active_full - active_prefix)
