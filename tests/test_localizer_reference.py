"""The localizer preset against an independent re-implementation of the reference's code path.

The reference (BKHMSI/llm-localization ``localize.py``, ``datasets.py``, ``random_mask.py``) runs one
stimulus at a time: lowercase, its tokenizer call with ``truncation=True, max_length=12`` (which keeps a
BOS inside the 12), a forward hook on every transformer block, the last token, Welch's t on absolute
values, ``int()`` of the count with every tie at the cut-off in, then a random control drawn over all
layers from the unselected units after ``numpy.random.seed``. Here that path is written again with plain
NumPy and compared unit for unit with ``lsn harvest`` + ``lsn analyze localizer|random`` configured by
the exported ``LOCALIZER`` option values, on a tiny model whose units are copied so that t ties exactly.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from analysis import cli as analysis_cli
from analysis.masks import Mask
from harvester import config as harvest_config
from harvester.backends.hf import resolve_model
from harvester.corpus.sample import SampleCorpus, nonwords
from harvester.windows import _Truncation, capped
from lsn.cli import main

TIED = (5, 17, 40)
"""Residual units made copies of one another (the first's writes copied into the others)."""
HAS_BOS = "bos" in {f.name for f in dataclasses.fields(harvest_config.HarvestOptions)}
"""The --bos option (another branch); until it is merged the harvest adds no BOS."""


def bos_flags(on: bool) -> list[str]:
    if not HAS_BOS:
        assert not on
        return []
    return ["--bos", "auto" if on else "none"]


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """tiny:llama with residual units ``TIED`` identical in every layer (exact ties of t), saved locally."""
    path = resolve_model("tiny:llama")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    first, *copies = TIED
    with torch.no_grad():
        writes = [lm.model.embed_tokens.weight.T] + [w for layer in lm.model.layers
                                                     for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
        for weight in writes:  # [hidden, ...]: row j is what writes residual unit j
            for unit in copies:
                weight[unit] = weight[first]
    out = tmp_path_factory.mktemp("tied") / "model"
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory):
    """Sentences (S) and non-word strings (N) in mixed case, some longer than 12 tokens."""
    texts = list(SampleCorpus(spec="sample", groups=["en"], docs=12, seed=4, sentences=1).texts("en"))
    strings = nonwords("en", 12, seed=4, words_per_string=(2, 9))
    rows = []
    for i, (text, string) in enumerate(zip(texts, strings)):
        sentence = text.capitalize() if i % 3 else text.upper()
        rows += [(sentence, "S"), (string.title(), "N")]
    path = tmp_path_factory.mktemp("stimuli") / "stimuli.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "condition"), *rows])
    return path, rows


# ---------------------------------------------------------------- the reference, written again


def reference_activations(tok, lm, texts):
    """``[n, L, H]``: each text alone, lowercased, ``tokenizer(.., truncation=True, max_length=12)``, each
    block's output hooked, the last token (batch size 1: no padding)."""
    captured = {}
    handles = [block.register_forward_hook(
        lambda m, i, o, layer=layer: captured.__setitem__(layer, o[0] if isinstance(o, (tuple, list)) else o))
        for layer, block in enumerate(lm.model.layers)]
    rows, lengths = [], []
    try:
        with torch.no_grad():
            for text in texts:
                encoded = tok([text.lower().strip()], truncation=True, max_length=12, return_tensors="pt")
                lm(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
                lengths.append(encoded["input_ids"].shape[1])
                rows.append(np.stack([captured[layer][0][-1].numpy() for layer in range(len(lm.model.layers))]))
    finally:
        for handle in handles:
            handle.remove()
    return np.asarray(rows, dtype=np.float64), lengths


def welch_t_of_values(a, b):
    """Welch's t of ``|a|`` against ``|b|`` per unit, from the values (ddof 1), as ``ttest_ind(equal_var=False)``."""
    a, b = np.abs(a), np.abs(b)
    t = np.zeros(a.shape[1:])
    for idx in np.ndindex(t.shape):
        x, y = a[(slice(None), *idx)], b[(slice(None), *idx)]
        t[idx] = (x.mean() - y.mean()) / np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    return t


def reference_topk(t, percent):
    """``int((p/100) * H * L)``, then every unit whose t is among that many largest distinct values."""
    k = int((percent / 100) * t.size)
    flat = [float(v) for v in t.ravel()]
    best = set(sorted(set(flat), reverse=True)[:k])
    return [i for i, v in enumerate(flat) if v in best], k


def reference_random(selected, n_units, k, seed):
    """``random_mask.py``: ``np.random.seed(seed)``, then ``k`` of the unselected flat indices (ascending)."""
    chosen = set(selected)
    free = np.array([i for i in range(n_units) if i not in chosen])
    np.random.seed(seed)
    return sorted(int(i) for i in np.random.choice(free, size=k, replace=False))


# ---------------------------------------------------------------- lsn, through the CLI


def write_yaml(path, values):
    path.write_text(yaml.safe_dump({key.replace("_", "-"): value for key, value in values.items()}))
    return str(path)


@pytest.fixture(scope="module")
def harvested(tied_model, stimuli, tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest")
    store = root / "store"
    assert main(["harvest", "--config", write_yaml(root / "preset.yaml", harvest_config.LOCALIZER),
                 "--model", str(tied_model), "--corpus", f"stimuli:{stimuli[0]}", "--store", str(store),
                 "--seq-len", "16", "--batch-size", "3", "--no-ray", "--no-progress", *bos_flags(False)]) == 0
    return store


def localize(store, tmp_path, percent, extra=()):
    out = tmp_path / f"loc-{percent}.npz"
    assert main(["analyze", "localizer", "--config", write_yaml(tmp_path / "loc.yaml", analysis_cli.LOCALIZER),
                 "--store", str(store), "--out", str(out), "--a", "S", "--b", "N", "--top-percent", str(percent),
                 *extra]) == 0
    return Mask.load(out)


def test_preset_matches_the_reference_unit_for_unit(tied_model, stimuli, harvested, tmp_path):
    import xarray as xr

    tok, lm = AutoTokenizer.from_pretrained(tied_model), AutoModelForCausalLM.from_pretrained(tied_model).eval()
    acts, lengths = {}, {}
    for condition in ("S", "N"):
        acts[condition], lengths[condition] = reference_activations(
            tok, lm, [text for text, c in stimuli[1] if c == condition])
    assert max(lengths["S"] + lengths["N"]) == 12 and min(lengths["S"] + lengths["N"]) < 12  # truncation bites
    a, b = acts["S"], acts["N"]
    first, *copies = TIED
    for unit in copies:  # the ties are exact in the reference's own activations
        assert np.array_equal(a[:, :, unit], a[:, :, first]) and np.array_equal(b[:, :, unit], b[:, :, first])

    ds = xr.open_zarr(harvested)
    for k, condition in enumerate(("S", "N")):  # the pooled samples, before any selection
        assert int(ds["tokens"].values[k]) == len(acts[condition])
        np.testing.assert_allclose(ds["act_abssum"].values[k], np.abs(acts[condition]).sum(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ds["act_sqsum"].values[k], (acts[condition] ** 2).sum(axis=0), rtol=1e-4, atol=1e-5)

    t = welch_t_of_values(a, b)
    L, H = t.shape
    tied_values = sorted({float(t[layer, first]) for layer in range(L)}, reverse=True)
    rank = sorted(set(t.ravel().tolist()), reverse=True).index(tied_values[0])
    at_tie = (rank + 1.6) * 100 / (L * H)  # int() gives rank + 1: the cut-off falls on the tied units
    for percent in (at_tie, 5.0, 1.0):
        want, k = reference_topk(t, percent)
        mask = localize(harvested, tmp_path, percent)
        assert mask.selected[0].tolist() == want and mask.extra["count"] == k
        if percent == at_tie:
            assert len(want) == k + len(copies)  # every tie in: more than k
            default = localize(harvested, tmp_path, percent, ["--count", "round", "--ties", "index"])
            assert default.selected[0].tolist() != want  # the options matter here

    mask_path = tmp_path / "loc-5.0.npz"
    want, k = reference_topk(t, 5.0)
    for seed in (42, 43):
        out = tmp_path / f"random-{seed}.npz"
        assert main(["analyze", "random", "--config", write_yaml(tmp_path / "r.yaml", analysis_cli.LOCALIZER_RANDOM),
                     "--mask", str(mask_path), "--out", str(out), "--seed", str(seed)]) == 0
        assert Mask.load(out).selected[0].tolist() == reference_random(want, L * H, k, seed)


@pytest.mark.skipif(not HAS_BOS, reason="the --bos harvest option comes from another branch")
def test_bos_counts_inside_the_12_tokens(tied_model, stimuli, tmp_path):
    """With the model's BOS (as a Llama tokenizer adds it), the reference keeps BOS + 11 tokens."""
    import xarray as xr
    from tokenizers.processors import TemplateProcessing

    import shutil

    model = tmp_path / "model"  # the tied model, its tokenizer adding <s> as a Llama tokenizer does
    shutil.copytree(tied_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    assert tok("a b")["input_ids"][0] == tok.bos_token_id
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    store = tmp_path / "store"
    assert main(["harvest", "--config", write_yaml(tmp_path / "p.yaml", harvest_config.LOCALIZER), "--model",
                 str(model), "--corpus", f"stimuli:{stimuli[0]}", "--store", str(store), "--seq-len", "16",
                 "--no-ray", "--no-progress", *bos_flags(True)]) == 0
    ds = xr.open_zarr(store)
    for k, condition in enumerate(("S", "N")):
        acts, lengths = reference_activations(tok, lm, [text for text, c in stimuli[1] if c == condition])
        assert max(lengths) == 12
        np.testing.assert_allclose(ds["act_abssum"].values[k], np.abs(acts).sum(axis=0), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- pieces and refusals


@pytest.mark.parametrize("side,head", [("right", 0), ("left", 0), ("right", 1), ("left", 1)])
def test_capped_keeps_one_side_and_the_head(side, head):
    docs = [(list(range(100, 100 + n)), [n % 3] * n) for n in (3, 5, 9)]
    cut = _Truncation()
    got = list(capped(iter(docs), 5, side, cut, head))
    for (ids, groups), (kept, kept_groups) in zip(docs, got):
        want = ids if len(ids) <= 5 else ids[:head] + (ids[head:5] if side == "right" else ids[len(ids) - (5 - head):])
        assert kept == want and kept_groups == groups[:len(want)]
    assert cut.tokens == 4 and cut.documents == 1 and cut.group_tokens == {0: 4}


def test_lowercase_reaches_the_tokens(tied_model, tmp_path):
    from harvester.corpus import CorpusOptions, parse_corpus

    path = tmp_path / "s.csv"
    path.write_text("text,condition\nThe CAT Sat,S\nGorp Blick,N\n", encoding="utf-8")
    corpus = parse_corpus(f"stimuli:{path}", CorpusOptions(lowercase=True))
    assert list(corpus.documents("S")) == [[("S", "the cat sat")]]
    assert list(parse_corpus(f"stimuli:{path}").documents("N")) == [[("N", "Gorp Blick")]]


def test_localizer_refuses_a_token_store(tied_model, stimuli, tmp_path, capsys):
    store = tmp_path / "tokens"
    assert main(["harvest", "--model", str(tied_model), "--corpus", f"stimuli:{stimuli[0]}", "--store", str(store),
                 "--seq-len", "64", "--stats", "active,sum,sqsum,abs", "--no-ray", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "m.npz"
    assert main(["analyze", "localizer", "--store", str(store), "--out", str(out), "--a", "S", "--b", "N"]) == 2
    err = capsys.readouterr().err
    assert "counts tokens" in err and "--pooling last" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_lowercase_without_stimuli_is_refused(tmp_path, capsys):
    assert main(["harvest", "--model", "tiny:llama", "--store", str(tmp_path / "s"), "--no-ray",
                 "--corpus", "sample:docs=1", "--lowercase"]) == 2
    assert "--lowercase is for stimuli corpora" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_random_size_count_needs_a_count_and_global_scope(tmp_path, capsys):
    mask = Mask(["en"], 2, 4, [np.array([1, 5])], "lape")
    mask.save(tmp_path / "m.npz")
    base = ["analyze", "random", "--mask", str(tmp_path / "m.npz"), "--out", str(tmp_path / "r.npz"), "--size", "count"]
    assert main(base) == 2 and "needs --scope global" in capsys.readouterr().err
    assert main([*base, "--scope", "global"]) == 2 and "records no count" in capsys.readouterr().err
    assert main(["analyze", "random", "--mask", str(tmp_path / "m.npz"), "--out", str(tmp_path / "r.npz"),
                 "--scope", "global", "--seed", "3"]) == 0
    drawn = Mask.load(tmp_path / "r.npz").selected[0]
    assert drawn.size == 2 and not np.intersect1d(drawn, [1, 5]).size
