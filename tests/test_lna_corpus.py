"""``--corpus lna:FILE.json``: the alignment study's records, harvested as its ``activation.py`` counts them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr

from harvester.config import HarvestOptions
from harvester.corpus import parse_corpus
from harvester.corpus.lna import LANGUAGES
from harvester.errors import HarvestError
from lsn.cli import main
from tests import fixtures
from tests import method_reference as ref

BOS_BRANCH = "bos" in {f.name for f in dataclasses.fields(HarvestOptions)}
ENCODING = "whole-with-bos" if BOS_BRANCH else "segments-with-eos"
"""How lsn turns a one-segment document into ids. With the ``--bos`` option: the text encoded once with
the tokenizer's own BOS and no EOS, which is the study's ``tokenizer.encode(text)``. Before it: the text
without special tokens, then EOS; the reference then encodes with ``add_special_tokens=False`` and adds
the same EOS, so that the comparison still holds count for count."""


def record(lang: str, instruction: str, *generated: str) -> dict:
    return {"lang": lang, "instruction": instruction, "answers": [{"generated": g, "score": 1} for g in generated]}


def write(path, records) -> str:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return f"lna:{path}"


def study_data(path) -> str:
    """Records in German, English and Chinese (file order), one to three answers each."""
    texts = fixtures.sentences(("en", "de", "zh"), 9, seed=11)
    names = {"en": "English", "de": "German", "zh": "Chinese"}
    records = [record(names[lang], texts[lang][3 * i] + "\n", *texts[lang][3 * i + 1: 3 * i + 2 + i])
               for i in range(3) for lang in ("de", "en", "zh")]
    return write(path, records)


def test_groups_in_the_study_order_and_one_document_per_answer(tmp_path):
    corpus = parse_corpus(write(tmp_path / "d.json", [
        record("German", "Q1 ", "a", "b"), record("English", "Q2 ", "c"), record("German", "Q3 ", "")]))
    assert corpus.groups == ["en:full", "en:prompt", "de:full", "de:prompt"]
    assert [s.name for s in corpus.streams] == corpus.groups
    assert {s.packing for s in corpus.streams} == {"sequence"}
    assert list(corpus.documents("de:full")) == [[("de:full", "Q1 a")], [("de:full", "Q1 b")], [("de:full", "Q3 ")]]
    assert list(corpus.documents("de:prompt")) == [[("de:prompt", "Q1 ")], [("de:prompt", "Q1 ")],
                                                   [("de:prompt", "Q3 ")]]
    assert list(corpus.documents("en:full")) == [[("en:full", "Q2 c")]]
    assert corpus.source()["kind"] == "lna" and corpus.source()["files"][0]["file"] == "d.json"


def test_the_import_keeps_the_same_language_order():
    from analysis.importers import FORMATS

    assert FORMATS["lna"].order == tuple(LANGUAGES) == ("en", "zh", "es", "fr", "de", "ja", "ru", "bn", "th", "sw")


@pytest.mark.parametrize("content, expected", [
    ({"lang": "English"}, "expected a JSON list of records"),
    ([record("English", "Q", "a"), "text"], "record 2: expected an object"),
    ([{"instruction": "Q", "answers": [{"generated": "a"}]}], "record 1: missing field 'lang'"),
    ([{"lang": "English", "answers": [{"generated": "a"}]}], "record 1: missing field 'instruction'"),
    ([{"lang": "English", "instruction": "Q"}], "record 1: 'answers' must be a non-empty list"),
    ([record("English", "Q")], "record 1: 'answers' must be a non-empty list of {\"generated\": ...}, got empty"),
    ([record("English", "Q", "a"), {"lang": "English", "instruction": "Q", "answers": [{}]}],
     "record 2: answer 1: missing field 'generated'"),
    ([{"lang": "English", "instruction": "Q", "answers": [{"generated": 3}]}],
     "record 1: answer 1: field 'generated' must be a string, got int"),
    ([{"lang": "English", "instruction": ["Q"], "answers": [{"generated": "a"}]}],
     "record 1: field 'instruction' must be a string, got list"),
    ([record("English", "  ", "a")], "record 1: field 'instruction' is empty"),
    ([record("en", "Q", "a")], "record 1: unknown language 'en'; the study's: English, Chinese, Spanish"),
    ([], "has no records"),
])
def test_every_record_is_checked(tmp_path, content, expected):
    spec = write(tmp_path / "d.json", content)
    with pytest.raises(HarvestError, match=None) as err:
        parse_corpus(spec)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"lang": "English", "instruction": "Q",\n "answers": [{"generated": "\xff"}]}]')
    with pytest.raises(HarvestError, match=r"bad.json: record 1: answer 1: field 'generated' is not UTF-8 text"):
        parse_corpus(f"lna:{bad}")
    bad.write_text('[{"lang": "English",\n "instruction": }]', encoding="utf-8")
    with pytest.raises(HarvestError, match=r"bad.json:2: not valid JSON"):
        parse_corpus(f"lna:{bad}")
    with pytest.raises(HarvestError, match="lna file not found"):
        parse_corpus(f"lna:{tmp_path / 'missing.json'}")
    with pytest.raises(HarvestError, match="needs a file"):
        parse_corpus("lna")


def test_a_bad_record_is_refused_before_any_store_exists(tmp_path, capsys):
    spec = write(tmp_path / "d.json", [record("English", "Q", "a"), record("Klingon", "Q", "a")])
    assert main(["harvest", "--model", "tiny:llama", "--corpus", spec, "--store", str(tmp_path / "s"),
                 "--no-ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "record 2: unknown language 'Klingon'" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


# -- the study's activation.py, re-implemented plainly ------------------------------------------------
@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """tiny:llama with a tokenizer that puts its BOS first, as Mistral's and Llama's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from harvester.tiny import tiny_path

    path = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_path("tiny:llama"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(path)
    again = AutoTokenizer.from_pretrained(path)
    assert again.encode("Hallo")[0] == again.bos_token_id != again.encode("Hallo", add_special_tokens=False)[0]
    return path


def study_counts(model_dir, prompts: list[str], encoding: str) -> tuple[int, np.ndarray]:
    """``(total_tokens, over_zero [L, I])`` as the study's ``_run_and_save``: each prompt one sequence,
    a neuron counted on every token where ``silu(gate)`` is above zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = lm.model.layers
    over_zero = np.zeros((len(layers), lm.config.intermediate_size), dtype=np.int64)

    def count(layer):
        def hook(mlp, inputs, output):
            gate = mlp.act_fn(mlp.gate_proj(inputs[0])).float()  # [1, T, I]
            over_zero[layer] += (gate > 0).reshape(-1, gate.shape[-1]).sum(0).numpy()
        return hook

    handles = [layer.mlp.register_forward_hook(count(k)) for k, layer in enumerate(layers)]
    if encoding == "whole-with-bos":
        token_ids = [tok.encode(p) for p in prompts]
    else:
        token_ids = [tok.encode(p, add_special_tokens=False) + [tok.eos_token_id] for p in prompts]
    try:
        with torch.inference_mode():
            for ids in token_ids:
                lm(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return sum(len(ids) for ids in token_ids), over_zero


def study_prompts(path, name: str, prefix_only: bool) -> list[str]:
    """The study's ``_iter_prompts``: per answer, ``instruction + generated`` (or the instruction)."""
    prompts = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        if item["lang"] == name:
            for answer in item["answers"]:
                prompts.append(item["instruction"] if prefix_only else item["instruction"] + answer["generated"])
    return [p for p in prompts if p]


@pytest.mark.parametrize("encoding", [ENCODING])
def test_full_and_prompt_groups_match_the_study_count_for_count(bos_model, tmp_path, encoding, capsys):
    spec = study_data(tmp_path / "mgsm.json")
    store = tmp_path / "store"
    bos = ["--bos", "auto"] if encoding == "whole-with-bos" else []
    assert main(["harvest", "--model", str(bos_model), "--corpus", spec, "--store", str(store), *bos,
                 "--seq-len", "256", "--batch-size", "3", "--no-ray", "--no-progress"]) == 0
    ds = xr.open_zarr(store)
    assert [str(g) for g in ds["group"].values] == ["en:full", "en:prompt", "zh:full", "zh:prompt",
                                                     "de:full", "de:prompt"]
    counts = {}
    for code in ("en", "zh", "de"):
        for role in ("full", "prompt"):
            prompts = study_prompts(tmp_path / "mgsm.json", LANGUAGES[code], role == "prompt")
            tokens, over_zero = study_counts(bos_model, prompts, encoding)
            group = f"{code}:{role}"
            assert int(ds["tokens"].sel(group=group)) == tokens, group
            np.testing.assert_array_equal(ds["active"].sel(group=group).values, over_zero, err_msg=group)
            counts[group] = (tokens, over_zero)
    check_response_only(store, counts, tmp_path, capsys)


def check_response_only(store, counts: dict, tmp_path, capsys) -> None:
    """``--response-only`` reads ``full`` minus ``prompt``, as for an imported store."""
    from analysis.data import open_counts
    from analysis.masks import Mask

    langs = ["en", "zh", "de"]
    data = open_counts(str(store), response_only=True)
    assert data.names == langs and data.subtracted == [True] * 3
    want = ref.response_only(np.stack([counts[f"{c}:full"][1] for c in langs]), [counts[f"{c}:full"][0] for c in langs],
                             np.stack([counts[f"{c}:prompt"][1] for c in langs]),
                             [counts[f"{c}:prompt"][0] for c in langs])
    np.testing.assert_array_equal(data.probabilities().compute().transpose(1, 2, 0), want)
    out = tmp_path / "el.npz"
    assert main(["analyze", "entropy-lambda", "--store", str(store), "--response-only", "--lambda", "0.05",
                 "--top-rate", "0.05", "--out", str(out)]) == 0
    mask = Mask.load(out)
    expected, _ = ref.entropy_lambda(want, 0.05, top_rate=0.05)
    assert mask.languages == langs and mask.source["subtracted"] == [True] * 3
    assert [[idx.tolist() for idx in mask.layers(k)] for k in range(len(langs))] == expected
