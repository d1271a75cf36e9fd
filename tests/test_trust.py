"""Stores and masks you can trust (issue 15): names from data never leave the output directory, a mask
is applied only to the model it was selected on, an unfinished store is never read, and a malformed
mask file is one line. Every case goes through the CLI as a user meets it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.masks import Mask
from lsn.cli import main
from harvester.errors import HarvestError
from harvester.names import check_name, inside, path_part, path_parts
from tests.fixtures import sentences

MODEL = "tiny:llama"
QUIET = ["--no-ray", "--no-progress"]
GROUPS = ("a=b", "中文", "zh")


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A tiny:llama store of a text corpus whose file names are ``a=b``, ``中文`` and ``zh``, with
    histograms, and its LAPE mask (languages: the groups, by default)."""
    root = tmp_path_factory.mktemp("trust")
    corpus = root / "corpus"
    corpus.mkdir()
    texts = sentences(("en", "zh", "ru"), 8, sentences_per_doc=2)
    for name, lang in zip(GROUPS, ("en", "zh", "ru")):
        (corpus / f"{name}.txt").write_text("\n".join(texts[lang]) + "\n", encoding="utf-8")
    store, mask = root / "store", root / "lape.npz"
    assert main(["harvest", "--model", MODEL, "--corpus", f"text:{corpus}", "--store", str(store), "--seq-len", "64",
                 "--stats", "active,sum,sqsum,hist", "--hist-edges=-1:2:20", *QUIET]) == 0
    assert main(["analyze", "lape", "--store", str(store), "--out", str(mask), "--top-rate", "0.1"]) == 0
    return {"root": root, "corpus": corpus, "store": store, "mask": mask}


def one_line_error(capsys, *texts) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lsn: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(t in lines[0] for t in texts), lines[0]
    return lines[0]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# -- item 6: data never becomes a path unchecked -------------------------------------------------------
def test_the_naming_rule():
    assert path_part("en-fr:src") == "en-fr%3Asrc" and path_part("../x") == "..%2Fx"
    assert path_part("a=b") == "a%3Db" and path_part("zh") == "zh" and path_part("x_1.2+y") == "x_1.2+y"
    assert path_part("中文") == "%E4%B8%AD%E6%96%87" and path_part("50%") == "50%25"  # one-to-one
    for bad in ("", ".", "..", "a\nb", "a\x00b", "a\rb", "a\u2028b", None):
        with pytest.raises(HarvestError):
            path_part(bad)
    with pytest.raises(HarvestError, match="the same file"):
        path_parts(["EN", "en"])
    with pytest.raises(HarvestError, match="outside"):
        inside("out/run", "..", "x")
    assert check_name("中文") == "中文" and inside("out", path_part("../x")) == Path("out/..%2Fx")


def test_finetune_writes_names_from_data_inside_out(harvested, tmp_path, capsys):
    """``--lang ../x --out ftout/run`` used to write ``ftout/x-none``; now every file lies inside
    ``ftout/run``. Groups named ``a=b`` and ``中文`` (from corpus file names) get safe directories, and
    ``--intervene mean`` (which used to end in a traceback) reads the store's means."""
    mask = tmp_path / "alias.npz"
    assert main(["analyze", "lape", "--store", str(harvested["store"]), "--out", str(mask), "--top-rate", "0.1",
                 "--langs", "../x=zh"]) == 0
    common = ["finetune", "--model", MODEL, "--task", "clm", "--data", f"text:{harvested['corpus']}", "--steps", "1",
              "--seq-len", "64", "--batch-size", "2", *QUIET]
    out = tmp_path / "ftout" / "run"
    assert main([*common, "--mask", str(mask), "--lang", "../x", "--out", str(out)]) == 0
    assert (out / "..%2Fx-none" / "adapter" / "adapter_config.json").is_file()
    assert files_under(tmp_path / "ftout") == files_under(out) and not (tmp_path / "ftout" / "x-none").exists()
    assert json.loads((out / "..%2Fx-none" / "results.json").read_text())["lang"] == "../x"

    out = tmp_path / "groups"
    assert main([*common, "--mask", str(harvested["mask"]), "--lang", ",".join(GROUPS), "--out", str(out),
                 "--intervene", "mean"]) == 0
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"a%3Db-none", "%E4%B8%AD%E6%96%87-none", "zh-none"}
    evaluated = json.loads((out / "%E4%B8%AD%E6%96%87-none" / "results.json").read_text())["eval"]["中文"]
    assert np.isfinite(evaluated["ppl_intervened"]) and evaluated["ppl_intervened"] != evaluated["ppl"]
    capsys.readouterr()
    assert main(["analyze", "lape", "--store", str(harvested["store"]), "--out", str(tmp_path / "nl.npz"),
                 "--langs", "a\nb=zh"]) == 2
    one_line_error(capsys, "control character")
    assert not (tmp_path / "nl.npz").exists()


def test_prompt_and_task_languages_are_checked(harvested, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = ({"lang": "en", "prompt": "hi"}, {"lang": "", "prompt": "x"})
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["intervene", "generate", "--model", MODEL, "--mask", str(harvested["mask"]), "--prompts", str(prompts),
                 "--out", str(tmp_path / "g"), *QUIET]) == 2
    one_line_error(capsys, "prompts.jsonl:2", "prompt language")
    (tmp_path / "xnli" / "en").mkdir(parents=True)
    assert main(["finetune", "--model", MODEL, "--mask", str(harvested["mask"]), "--lang", "zh", "--task", "xnli",
                 "--data", str(tmp_path / "xnli"), "--train-lang", "../x", "--out", str(tmp_path / "f"),
                 *QUIET]) == 2
    one_line_error(capsys, "would lie outside")
    assert not (tmp_path / "g").exists() and not (tmp_path / "f").exists()


# -- item 5: a mask is applied to the model it was selected on -------------------------------------------
def test_a_mask_of_another_model_is_refused_unless_asked(harvested, tmp_path, capsys):
    """tiny:qwen2 has tiny:llama's shape (3 x 128) but other weights: refused in one line naming
    both, unless --allow-other-model, which says so. A copy of tiny:llama elsewhere (another id, the
    same weights) is the same model."""
    from harvester.backends.hf import resolve_model

    ppl = ["intervene", "ppl", "--corpus", "sample:docs=2,langs=zh", "--seq-len", "64", "--controls", "0",
           "--mask", str(harvested["mask"]), *QUIET]
    assert main([*ppl, "--model", "tiny:qwen2", "--out", str(tmp_path / "a")]) == 2
    one_line_error(capsys, "selected on model tiny:llama", "--model is model tiny:qwen2", "--allow-other-model")
    assert not (tmp_path / "a").exists()
    assert main([*ppl, "--model", "tiny:qwen2", "--out", str(tmp_path / "b"), "--allow-other-model"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "as --allow-other-model asks" in line]
    assert len(notes) == 1 and "tiny:llama" in notes[0] and "tiny:qwen2" in notes[0], notes
    assert (tmp_path / "b" / "ppl.csv").is_file()
    copy = tmp_path / "llama-copy"
    shutil.copytree(resolve_model(MODEL), copy)
    assert main([*ppl, "--model", str(copy), "--out", str(tmp_path / "c")]) == 0
    assert "lsn:" not in capsys.readouterr().err
    old = tmp_path / "old.npz"  # a mask from before the source recorded the weights: its store tells them
    mask = Mask.load(harvested["mask"])
    Mask(mask.languages, mask.n_layers, mask.width, mask.selected, mask.method, mask.params,
         {k: v for k, v in mask.source.items() if k not in ("revision", "weights")}).save(old)
    assert main([*ppl, "--mask", str(old), "--model", "tiny:qwen2", "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "selected on model tiny:llama (weights", "tiny:qwen2")
    assert main(["finetune", "--model", "tiny:qwen2", "--mask", str(harvested["mask"]), "--lang", "zh", "--task", "clm",
                 "--data", "sample:docs=2,langs=zh", "--out", str(tmp_path / "d"), "--steps", "1", *QUIET]) == 2
    one_line_error(capsys, "selected on model tiny:llama", "tiny:qwen2")
    assert not (tmp_path / "d").exists()


def test_new_weights_under_the_same_name_are_another_model(tmp_path, capsys):
    from harvester.backends.hf import resolve_model
    from harvester.tiny import tiny_model

    model = tmp_path / "model"
    shutil.copytree(resolve_model(MODEL), model)
    assert main(["harvest", "--model", str(model), "--corpus", "sample:docs=3,langs=en+zh", "--store",
                 str(tmp_path / "s"), "--seq-len", "64", *QUIET]) == 0
    assert main(["analyze", "lape", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "m.npz")]) == 0
    tiny_model("llama", seed=1).save_pretrained(model)  # fine-tuned in place: same path, other weights
    capsys.readouterr()
    assert main(["intervene", "ppl", "--model", str(model), "--mask", str(tmp_path / "m.npz"), "--corpus",
                 "sample:docs=2,langs=en", "--out", str(tmp_path / "o"), *QUIET]) == 2
    line = one_line_error(capsys, f"selected on model {model} (weights", f"--model is model {model} (weights")
    assert line.count("weights") >= 2
    assert not (tmp_path / "o").exists()


def test_an_imported_mask_is_accepted_by_shape_with_a_note(harvested, tmp_path, capsys):
    assert main(["mask", "export", str(harvested["mask"]), str(tmp_path / "m.pt")]) == 0
    assert main(["mask", "import", str(tmp_path / "m.pt"), str(tmp_path / "m.npz"), "--width", "128"]) == 0
    capsys.readouterr()
    assert main(["intervene", "ppl", "--model", MODEL, "--mask", str(tmp_path / "m.npz"), "--corpus",
                 "sample:docs=2,langs=zh", "--seq-len", "64", "--controls", "0", "--langs", "lang0",
                 "--out", str(tmp_path / "o"), *QUIET]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "records no model" in line]
    assert len(notes) == 1 and "accepted on --model by shape, 3 x 128" in notes[0]


# -- item 5 (stores): readers refuse a store whose harvest did not finish -----------------------------
def test_an_unfinished_store_is_refused_by_every_reader(harvested, tmp_path, capsys):
    """As a harvest killed during the reduction leaves it: totals zeroed, ``complete`` False. The
    statistic modes used to read means of 0 from it."""
    import zarr

    store = tmp_path / "unfinished"
    shutil.copytree(harvested["store"], store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root["act_sum"][:] = 0
    root.attrs["lsn"] = {**root.attrs.asdict()["lsn"], "complete": False}
    mask, out = str(harvested["mask"]), tmp_path / "out"
    ppl = ["intervene", "ppl", "--model", MODEL, "--mask", mask, "--corpus", "sample:docs=2,langs=zh",
           "--out", str(out), "--store", str(store), *QUIET]
    runs = [[*ppl, "--mode", m] for m in ("mean", "p10", "p90", "value:1", "zero")]
    runs += [["intervene", "generate", "--model", MODEL, "--mask", mask, "--prompts", str(tmp_path / "p.jsonl"),
              "--mode", "mean", "--store", str(store), "--out", str(out), *QUIET],
             ["finetune", "--model", MODEL, "--mask", mask, "--lang", "zh", "--task", "clm", "--data",
              "sample:docs=2,langs=zh", "--intervene", "mean", "--store", str(store), "--out", str(out), *QUIET],
             ["analyze", "lape", "--store", str(store), "--out", str(out / "m.npz")],
             ["analyze", "random", "--mask", mask, "--store", str(store), "--out", str(out / "m.npz")],
             ["report", "--mask", mask, "--store", str(store), "--out", str(out)],
             ["summary", "--store", str(store)]]
    for argv in runs:
        assert main(argv) == 2, argv
        one_line_error(capsys, f"store {store} is not complete")
        assert not out.exists()


# -- item 4: malformed mask metadata ------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("width"), "lacks 'width'"),
    (lambda m: m.update(languages="zh"), "'languages' must be list"),
    (lambda m: m.update(n_layers="3"), "'n_layers' must be int"),
    (lambda m: m.update(languages=["zh", 3, "en"]), "mask language must be a non-empty string"),
    (lambda m: m["source"].update(groups="zh"), "source 'groups' must be list"),
    (lambda m: m["source"].update(weights=7), "source 'weights' must be str"),
    (lambda m: m.update(format_version=9), "newer than this lsn reads"),
])
def test_malformed_mask_metadata_is_one_line(harvested, tmp_path, capsys, edit, message):
    bad = tmp_path / "bad.npz"
    with np.load(harvested["mask"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    edit(meta)
    np.savez(bad, **{**arrays, "meta": np.array(json.dumps(meta))})
    assert main(["report", "--mask", str(bad), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, str(bad), message)
    assert main(["intervene", "ppl", "--model", MODEL, "--mask", str(bad), "--corpus", "sample:docs=2,langs=zh",
                 "--out", str(tmp_path / "o"), *QUIET]) == 2
    one_line_error(capsys, str(bad), message)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_weights_changed_only_in_the_middle_are_another_model(tmp_path):
    """A model whose MLPs alone were fine-tuned and saved (the bytes between its first and last MiB)
    is another model: the whole-file hash tells them apart, where the older sampled hash did not.
    Masks that recorded the sampled hash are still matched by it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from analysis.masks import same_model
    from harvester.backends.hf import model_identity, sampled_weights_fingerprint, weights_fingerprint

    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] += 1.0  # far from both ends of the file
    model.save_pretrained(tmp_path / "tuned")
    base, tuned = (str(tmp_path / name) for name in ("base", "tuned"))
    assert sampled_weights_fingerprint(base) == sampled_weights_fingerprint(tuned)  # the old blind spot
    assert weights_fingerprint(base) != weights_fingerprint(tuned)
    a, b = model_identity("m", base, config), model_identity("m", tuned, config)
    assert same_model(a, b) is False and same_model(a, model_identity("m", base, config)) is True
    old_mask = {"id": "m", "revision": None, "weights": sampled_weights_fingerprint(base)}
    assert same_model(old_mask, a) is True and same_model(old_mask, b) is True  # all the old hash can say
    assert weights_fingerprint(str(tmp_path)) is None  # no weight files: names nothing


def test_inputs_may_be_links_outputs_may_not_leave(tmp_path):
    """Task data and import sources are often links into a cache: read through them. What lsn writes
    must resolve inside its directory. '..' is refused either way."""
    (tmp_path / "cache" / "en").mkdir(parents=True)
    (tmp_path / "cache" / "en" / "train.jsonl").write_text("{}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "en").symlink_to(tmp_path / "cache" / "en")
    assert inside(tmp_path / "data", "en", "train.jsonl", follow_links=False).read_text() == "{}\n"
    with pytest.raises(HarvestError, match="would lie outside"):
        inside(tmp_path / "data", "en", "train.jsonl")
    for follow in (True, False):
        with pytest.raises(HarvestError, match="would lie outside"):
            inside(tmp_path / "data", "..", "cache", follow_links=follow)
