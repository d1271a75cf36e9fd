"""``--preset aya`` against a plain re-implementation of the Aya EC40 study's path
(KatharinaTrinley/MechInterp-Aya-Neuron-Specialization ``aya_get_neurons_EC40.py`` and the selection of
its ``visualization-scripts/all-langs-IoU.py``): per direction, one prompt string per source sentence,
its own tokenizer call, one example per forward pass, a forward hook on each ``mlp.down_proj`` keeping
``input[0]``, ``torch.nonzero`` per neuron; then neurons sorted by count, kept while ``cumsum / total <= 0.9``.

The tiny Llama's MLP uses ReLU here so that its down projection's input has exact zeros (with SiLU
almost every value is non-zero and every count would equal the token count), and its tokenizer adds
``<s>`` as Aya's Cohere tokenizer adds its BOS.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr

from analysis.masks import Mask
from lsn.cli import main
from tests import fixtures

PAIRS = ("en-fr", "fr-en", "en-ru", "ru-en")


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    """tiny:llama with a ReLU MLP and a tokenizer that puts ``<s>`` first."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from harvester.tiny import tiny_path

    path = tmp_path_factory.mktemp("aya") / "model"
    shutil.copytree(tiny_path("tiny:llama"), path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(path)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(path)
    return path


def study_prompts(root, pair: str, max_samples: int = 30000) -> list[str]:
    """The study's prompt strings for one direction: EC40's ``en-xx`` files, sides swapped for ``xx-en``,
    a blank source skipped, the first ``max_samples`` kept."""
    src_lang, tgt_lang = pair.split("-")
    other = tgt_lang if src_lang == "en" else src_lang
    lines = {lang: (root / "Ntrex-eval-set" / f"test.en-{other}.{lang}").read_text(encoding="utf-8").split("\n")
             for lang in ("en", other)}
    prompts = []
    for en, xx in zip(lines["en"], lines[other]):
        src_text = en if src_lang == "en" else xx
        if not src_text:
            continue
        prompts.append(f"Translate from {src_lang} to {tgt_lang}: {src_text}")
    return prompts[:max_samples]


def study_counts(model_dir, prompts: list[str]) -> tuple[np.ndarray, int]:
    """``[L, I]`` non-zero counts of down_proj's input over every position, and the tokens fed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ffn_dim = model.model.layers[0].mlp.up_proj.out_features
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0]))
             for i, layer in enumerate(model.model.layers)]
    counts = np.zeros((len(model.model.layers), ffn_dim), np.int64)
    tokens = 0
    try:
        for text in prompts:  # its batch size 1: nothing is padded
            inputs = tokenizer([text], return_tensors="pt", padding=True, truncation=True, max_length=512)
            with torch.no_grad():
                model(**inputs)
            tokens += int(inputs["input_ids"].numel())
            for i, x in seen.items():
                counts[i] += torch.bincount(torch.nonzero(x)[:, -1], minlength=ffn_dim).numpy()
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
    return counts, tokens


def study_selection(counts: np.ndarray, threshold: float = 0.9) -> list[list[int]]:
    """Per layer, the neurons kept while ``cumsum / total <= threshold`` (ties by index: the study's
    ``np.argsort`` quicksort leaves their order to chance)."""
    kept = []
    for layer in counts:
        order = np.argsort(-np.abs(layer), kind="stable")
        cumsum = np.cumsum(np.abs(layer[order]))
        kept.append(sorted(int(i) for i in order[cumsum / cumsum[-1] <= threshold]))
    return kept


def test_preset_aya_counts_and_selects_as_the_study(relu_model, tmp_path):
    root = fixtures.write_ec40(tmp_path / "ec40", langs=("fr", "ru"), n=6, split="validation")
    store, out = tmp_path / "store", tmp_path / "aya.npz"
    assert main(["harvest", "--preset", "aya", "--model", str(relu_model), "--corpus", f"ec40:{root}",
                 "--pairs", ",".join(PAIRS), "--store", str(store), "--batch-size", "4", "--no-ray",
                 "--no-progress"]) == 0
    ds = xr.open_zarr(store)
    assert [str(g) for g in ds["group"].values] == [f"{p}:src" for p in PAIRS]
    assert main(["analyze", "coverage", "--preset", "aya", "--store", str(store), "--out", str(out)]) == 0
    mask = Mask.load(out)
    assert mask.languages == list(PAIRS)
    L, I = ds.sizes["layer"], ds.sizes["neuron"]
    for k, pair in enumerate(PAIRS):
        want, tokens = study_counts(relu_model, study_prompts(root, pair))
        assert int(ds["tokens"].values[k]) == tokens
        np.testing.assert_array_equal(ds["nonzero"].values[k], want)
        active = ds["active"].values[k]
        # counts that vary (not every neuron at the token count), and != 0 is not > 0 (negative products)
        assert (want < tokens).any() and (want > 0).any() and (active < want).any()
        selected = mask.selected[k]
        got = [sorted(int(u) - layer * I for u in selected if u // I == layer) for layer in range(L)]
        assert got == study_selection(want)


def test_down_input_is_refused_on_vllm(tmp_path, capsys):
    assert main(["harvest", "--model", "tiny:llama", "--corpus", "sample", "--store", str(tmp_path / "s"),
                 "--backend", "vllm", "--unit", "down-input", "--no-ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--unit down-input needs --backend hf" in err and len(err.strip().splitlines()) == 1
