"""LoRA restricted to a language's neurons: the restriction proved on the merged weights, each task end
to end on local fixtures, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from analysis.masks import Mask
from harvester.backends.hf import resolve_model
from lsn.cli import main
from harvester.errors import HarvestError
from jobs.lora import add_restricted_lora, bake, mlp_names, mlp_width
from jobs.tasks import exact_match, f1, normalize
from tests import fixtures

MODEL = "tiny:llama"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    assert main(["harvest", "--model", MODEL, "--corpus", "sample:docs=20,langs=en+de+ru", "--store", str(root / "store"),
                 "--seq-len", "64", "--no-ray", "--no-progress"]) == 0
    assert main(["analyze", "lape", "--store", str(root / "store"), "--out", str(root / "lape.npz"), "--top-rate", "0.1"]) == 0
    return {"root": root, "mask": root / "lape.npz", "xnli": fixtures.write_xnli(root / "xnli"),
            "xquad": fixtures.write_xquad(root / "xquad")}


@pytest.mark.parametrize("model_id, attention", [("tiny:llama", False), ("tiny:llama", True), ("tiny:opt", True),
                                                  ("tiny:gpt_neox", False)])
def test_only_the_selected_neurons_change(tmp_path, model_id, attention):
    """After training and merging, every other neuron's gate and up rows and down column are
    bit-identical to the base model's, and every selected neuron changed. The saved adapter loads
    with PeftModel.from_pretrained and merges to the same weights."""
    from peft import PeftModel

    path = resolve_model(model_id)
    model = AutoModelForCausalLM.from_pretrained(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    width, layers = mlp_width(model.config), model.config.num_hidden_layers
    names = mlp_names(model.config)
    selected = np.array([3, 50, 127, 2 * width + 7, 2 * width + 100])
    peft_model = add_restricted_lora(model, selected, width, rank=4, alpha=8, attention=attention)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(4, 1000, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(n.endswith("lora_B.default.parametrizations.weight.0.values") for n in trained)
    assert not any(n.endswith("original") for n in trained)  # no state for the constant zeros
    bake(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    for layer in range(layers):
        chosen = selected[selected // width == layer] - layer * width
        others = np.setdiff1d(np.arange(width), chosen)
        for name in names.inputs:
            key = f"{names.layers}.{layer}.{name}.weight"
            assert torch.equal(merged[key][others], base[key][others]), key  # bit for bit
            assert all(not torch.equal(merged[key][i], base[key][i]) for i in chosen), key
        key = f"{names.layers}.{layer}.{names.output}.weight"
        assert torch.equal(merged[key][:, others], base[key][:, others]), key
        assert all(not torch.equal(merged[key][:, i], base[key][:, i]) for i in chosen), key
    q = f"{names.layers}.0.{names.attention[0]}.weight"
    assert torch.equal(merged[q], base[q]) != attention  # attention LoRA only when asked
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").merge_and_unload()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, merged[key]), key


def test_squad_metrics():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the cat", ["Cat", "dog"]) == 1.0 and exact_match("a cat sat", ["cat"]) == 0.0
    assert f1("the black cat sat", ["black cat"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1("", ["cat"]) == 0.0


def test_xnli_all_conditions_in_process(setup, tmp_path):
    out = tmp_path / "xnli"
    assert main(["finetune", "--model", MODEL, "--mask", str(setup["mask"]), "--lang", "de", "--task", "xnli",
                 "--data", str(setup["xnli"]), "--eval-langs", "en,de,ru", "--out", str(out),
                 "--control", "none,random,full,base", "--steps", "4", "--attention-lora", "--no-ray", "--no-progress"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert set(table["condition"]) == {"language neurons", "random neurons", "full LoRA", "no fine-tuning"}
    assert set(table["eval_lang"]) == {"en", "de", "ru"} and set(table["metric"]) == {"accuracy"}
    assert table["intervened"].notna().all()
    record = json.loads((out / "de-none" / "results.json").read_text())
    assert record["changed_outside_selection"] == 0 and record["changed_neurons"] == record["units"]
    random_record = json.loads((out / "de-random" / "results.json").read_text())
    assert random_record["units"] == record["units"] and random_record["changed_outside_selection"] == 0
    full = json.loads((out / "de-full" / "results.json").read_text())
    assert full["trainable_parameters"] > record["trainable_parameters"] > 0
    assert record["optimizer_state_bytes"] > 0 and record["peak_memory_bytes"] > 0
    assert (out / "de-none" / "adapter" / "adapter_config.json").is_file()
    assert not (out / "de-base" / "adapter").exists()
    assert (out / "results.md").read_text().startswith("| lang | condition |")


def test_xquad_and_clm_on_ray(setup, tmp_path):
    out = tmp_path / "xquad"
    assert main(["finetune", "--model", MODEL, "--mask", str(setup["mask"]), "--lang", "ru", "--task", "xquad",
                 "--data", str(setup["xquad"]), "--eval-langs", "en,ru", "--out", str(out), "--control", "none,base",
                 "--steps", "3", "--no-ray", "--no-progress"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert set(table["metric"]) == {"exact_match", "f1"} and table["value"].between(0, 1).all()
    out = tmp_path / "clm"
    assert main(["finetune", "--model", MODEL, "--mask", str(setup["mask"]), "--lang", "de,ru", "--task", "clm",
                 "--data", "sample:docs=6,langs=de", "--eval-data", "sample:docs=3,seed=3,langs=en+de+ru",
                 "--seq-len", "64", "--out", str(out), "--control", "none,random", "--steps", "3", "--no-progress"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 * 2 * 3 and set(table["metric"]) == {"ppl"}
    assert (table["value"] > 1).all()


def test_bad_input(setup, tmp_path, capsys):
    mask = Mask.load(setup["mask"])
    base = ["finetune", "--model", MODEL, "--task", "xnli", "--data", str(setup["xnli"]), "--no-ray", "--no-progress"]

    def fails(argv, text):
        assert main(argv) == 2
        assert text in capsys.readouterr().err

    other = tmp_path / "other.npz"
    Mask(mask.languages, mask.n_layers, 64, [np.array([1]) for _ in mask.languages], "lape").save(other)
    fails(base + ["--mask", str(other), "--lang", "de", "--out", str(tmp_path / "a")], "a mask from another model")
    empty = tmp_path / "empty.npz"
    Mask(mask.languages, mask.n_layers, mask.width, [np.zeros(0, np.int64), *mask.selected[1:]], "lape").save(empty)
    fails(base + ["--mask", str(empty), "--lang", mask.languages[0], "--out", str(tmp_path / "b")], "selects no neuron")
    fails(["finetune", "--model", MODEL, "--mask", str(setup["mask"]), "--lang", "de", "--task", "squad",
           "--data", "x", "--out", str(tmp_path / "c"), "--no-ray"], "unknown task 'squad'")
    broken = tmp_path / "broken"
    (broken / "en").mkdir(parents=True)
    (broken / "en" / "train.jsonl").write_text('{"premise": "a", "label": 0}\n')
    fails(["finetune", "--model", MODEL, "--task", "xnli", "--data", str(broken), "--mask", str(setup["mask"]),
           "--lang", "de", "--out", str(tmp_path / "d"), "--no-ray"], "lacks the column(s) hypothesis")
    fails(base + ["--mask", str(setup["mask"]), "--lang", "xx", "--out", str(tmp_path / "e")], "language xx is not in the mask")
    fails(base + ["--mask", str(setup["mask"]), "--lang", "de", "--control", "some", "--out", str(tmp_path / "f")],
          "--control must be from")
    assert not any((tmp_path / d).exists() for d in "abcdef")
    with pytest.raises(HarvestError, match="supports"):
        from harvester.backends.hf import load_config
        mlp_names(load_config(resolve_model("tiny:gpt2")))  # Conv1D projections
