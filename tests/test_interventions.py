"""Interventions, the perplexity matrix and the generation table, against plain references."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.masks import Mask
from harvester.backends.hf import HFBackend
from lsn.cli import main
from harvester.errors import HarvestError
from jobs.generate import Detector, Prompt, metrics, read_prompts, words
from jobs.interventions import Intervention, Mode, hist_quantile, intervene, unit_statistic
from jobs.ppl import RowWorker, eval_windows
from jobs.rows import build_rows, language_statistic, mask_groups
from tests import fixtures

MODEL = "tiny:llama"


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A tiny:llama store of 4 sample languages with histograms, and a LAPE mask of it."""
    root = tmp_path_factory.mktemp("iv")
    store, mask = root / "store", root / "lape.npz"
    assert main(["harvest", "--model", MODEL, "--corpus", "sample:docs=30,langs=en+ru+zh+ar", "--store", str(store),
                 "--seq-len", "128", "--no-ray", "--no-progress", "--stats", "active,sum,sqsum,hist",
                 "--hist-edges=-1:2:30"]) == 0
    assert main(["analyze", "lape", "--store", str(store), "--out", str(mask), "--top-rate", "0.1"]) == 0
    return store, mask


@pytest.fixture(scope="module")
def backend():
    return HFBackend(MODEL)


def test_mode_parsing():
    assert Mode.parse("zero") == Mode("zero") and Mode.parse("add:-1.5") == Mode("add", -1.5)
    assert str(Mode.parse("value:2")) == "value:2"
    for bad in ("one", "value", "add:x", "mean:3", "zero:1"):
        with pytest.raises(HarvestError, match="--mode must be one of"):
            Mode.parse(bad)


def test_hist_quantile_against_a_plain_loop():
    rng = np.random.default_rng(0)
    edges = np.linspace(-1, 2, 7)
    hist = rng.integers(0, 20, size=(5, 8))
    hist[0] = 0
    hist[1] = [0, 0, 0, 5, 0, 0, 0, 0]
    got = hist_quantile(hist, edges, 10)
    for unit in range(5):
        h = hist[unit]
        n = h.sum()
        if n == 0:
            assert np.isnan(got[unit])
            continue
        target, cum = 0.1 * n, 0
        for j, c in enumerate(h):  # the first bin whose cumulative count reaches the rank
            if cum + c >= target:
                break
            cum += c
        lo = edges[0] if j == 0 else edges[j - 1]
        hi = edges[-1] if j == len(h) - 1 else edges[j]
        assert got[unit] == pytest.approx(lo + (target - cum) / c * (hi - lo)), unit
    assert got[1] == pytest.approx(0.0 + 0.1 * 0.5)  # 5 values in [0, 0.5): the rank 0.5 of 5
    # the rank 63 of 70 ends bin 1 exactly: P90 is that bin's upper edge, not the lower edge of the next
    # bin holding counts
    assert hist_quantile(np.array([0, 63, 0, 0, 7, 0, 0, 0]), edges, 90) == edges[1]


@pytest.mark.parametrize("mode", ["zero", "value:0.7", "add:-0.3", "mean"])
def test_intervened_mlp_equals_the_plain_formula(backend, mode):
    """down(act(gate(x)) * up(x)) with the selected neurons of act(gate(x)) changed, computed by hand."""
    mlp = backend.model.model.layers[1].mlp
    width = backend.width
    selected = np.array([width + 3, width + 17, width + 64, 2 * width + 5])  # layers 1 and 2
    values = np.random.default_rng(1).normal(size=(backend.n_layers, width))
    iv = Intervention(selected, Mode.parse(mode), width, values)
    x = torch.randn(2, 5, mlp.gate_proj.in_features)
    act = mlp.act_fn(mlp.gate_proj(x))
    units = torch.tensor([3, 17, 64])
    if mode == "zero":
        act[..., units] = 0
    elif mode == "mean":
        act[..., units] = torch.tensor(values[1, [3, 17, 64]], dtype=torch.float32)
    elif mode.startswith("value"):
        act[..., units] = 0.7
    else:
        act[..., units] += -0.3
    expected = mlp.down_proj(act * mlp.up_proj(x))
    with torch.no_grad(), intervene(backend.model, backend.site, iv):
        got = mlp(x)
    torch.testing.assert_close(got, expected.detach())
    with torch.no_grad():  # the hooks are gone
        torch.testing.assert_close(mlp(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_hooks_are_removed_after_an_error(backend):
    iv = Intervention(np.array([1]), Mode("zero"), backend.width)
    before = sum(len(m._forward_hooks) for m in backend.modules)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(backend.model, backend.site, iv):
            raise RuntimeError("boom")
    assert sum(len(m._forward_hooks) for m in backend.modules) == before


def test_nll_against_a_per_window_reference(backend, tmp_path):
    groups, windows = eval_windows(MODEL, ["sample:docs=6,langs=en+ko"], 64, None)
    worker = RowWorker.__new__(RowWorker)
    worker.backend = backend
    total, count = worker.nll(windows, len(groups), 3, None)
    ref_total, ref_count = np.zeros(len(groups)), np.zeros(len(groups), dtype=int)
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(backend.model(torch.tensor(w.ids[None].astype(np.int64))).logits[0].double(), -1)
            for t in range(len(w.ids) - 1):
                g = w.groups[t + 1]
                if g >= 0:
                    ref_total[g] -= float(logp[t, w.ids[t + 1]])
                    ref_count[g] += 1
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)


def test_random_controls_have_the_same_per_layer_counts(harvested):
    mask = Mask.load(harvested[1])
    rows = build_rows(mask, mask.languages, 2, seed=3)
    assert [r.name for r in rows][:5] == ["none", *mask.languages]
    assert "random:ru:2" in [r.name for r in rows]
    for row in rows[1 + len(mask.languages):]:
        lang = row.name.split(":")[1]
        own = mask.selected[mask.index(lang)]
        sel = np.array(row.selected)
        assert np.array_equal(np.bincount(sel // mask.width, minlength=mask.n_layers),
                              np.bincount(own // mask.width, minlength=mask.n_layers))
        assert not np.intersect1d(sel, own).size


def test_unit_statistics_from_the_store(harvested):
    import xarray as xr

    store = harvested[0]
    ds = xr.open_zarr(store)
    mean = unit_statistic(str(store), ["ru"], Mode("mean"))
    ru = list(ds["group"].values).index("ru")
    np.testing.assert_allclose(mean, ds["act_sum"].values[ru] / int(ds["tokens"].values[ru]))
    p90 = unit_statistic(str(store), ["ru", "zh"], Mode("p90"))
    hist = ds["hist"].values[[ru, list(ds["group"].values).index("zh")]].sum(0)
    np.testing.assert_allclose(p90, hist_quantile(hist, ds["hist_lo"].values[1:], 90))
    assert (p90 >= unit_statistic(str(store), ["ru", "zh"], Mode("p10"))).all()


@pytest.mark.ray
def test_ppl_command_end_to_end_on_ray(harvested, tmp_path):
    store, mask = harvested
    out = tmp_path / "ppl"
    assert main(["intervene", "ppl", "--model", MODEL, "--mask", str(mask), "--corpus", "sample:docs=8,seed=7,langs=en+ru+zh+ar",
                 "--out", str(out), "--seq-len", "64", "--controls", "1", "--actors", "2", "--mode", "mean",
                 "--no-progress"]) == 0
    table = pd.read_csv(out / "ppl.csv", index_col=0)
    assert list(table.index) == ["none", "en", "ru", "zh", "ar", "random:en", "random:ru", "random:zh", "random:ar"]
    assert list(table.columns) == ["en", "ru", "zh", "ar"]
    change = pd.read_csv(out / "ppl_change.csv", index_col=0)
    np.testing.assert_allclose(change.values, table.values - table.loc["none"].values, atol=1e-4)
    assert (change.loc["none"] == 0).all()
    assert (out / "ppl_relative.png").stat().st_size > 1000
    settings = json.loads((out / "ppl.json").read_text())["settings"]
    assert settings["mode"] == "mean" and settings["units"]["random:ru"] == settings["units"]["ru"]
    # the same rows in this process give the same matrix
    local = tmp_path / "local"
    assert main(["intervene", "ppl", "--model", MODEL, "--mask", str(mask), "--corpus", "sample:docs=8,seed=7,langs=en+ru+zh+ar",
                 "--out", str(local), "--seq-len", "64", "--mode", "mean", "--no-ray", "--no-progress"]) == 0
    np.testing.assert_allclose(pd.read_csv(local / "ppl.csv", index_col=0).values, table.values, rtol=1e-6)


def test_generate_command_end_to_end(harvested, tmp_path):
    _, mask = harvested
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"lang": lang, "prompt": text}, ensure_ascii=False) for lang, text in
                                 [("en", "the people who were"), ("ru", "это было очень"), ("zh", "我们的")]) + "\n")
    out = tmp_path / "gen"
    assert main(["intervene", "generate", "--model", MODEL, "--mask", str(mask), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "8", "--controls", "1", "--no-ray", "--no-progress"]) == 0
    table = pd.read_csv(out / "generate.csv")
    assert len(table) == 9 * 3  # (none + 4 languages + 4 controls) x 3 prompt languages
    assert set(table["prompt_lang"]) == {"en", "ru", "zh"}
    result = json.loads((out / "generate.json").read_text())
    assert all(0 < o["tokens"] <= 8 for o in result["outputs"]["none"])
    assert (out / "generate.md").read_text().startswith("| intervened | prompt_lang |")


def test_generation_metrics_on_known_text():
    prompts = [Prompt("de", "der Hund und die Katze"), Prompt("de", "ich bin"), Prompt("fr", "le chat")]
    outputs = [{"text": "und die Katze ist sehr groß und schön", "tokens": 9},
               {"text": "The weather is nice today and I am happy", "tokens": 10},
               {"text": "", "tokens": 0}]
    table = metrics(prompts, outputs, Detector(["de", "fr", "en"]), ["de", "fr"])
    de = table["de"]
    assert de["prompts"] == 2 and de["in_prompt_lang"] == 0.5 and de["lang:en"] == 0.5 and de["length"] == 9.5
    ws = words(outputs[0]["text"], "de")
    assert len(ws) == 8 and de["prompt_overlap"] == pytest.approx(np.mean([4 / 8, 0.0]))  # und, die, katze, und
    assert 0 < de["stopwords"] < 1
    assert table["fr"]["lang:?"] == 1.0 and table["fr"]["in_prompt_lang"] == 0.0
    assert words("我们的", "zh") == ["我", "们", "的"]


def test_bad_input(harvested, tmp_path, capsys):
    store, mask_path = harvested
    mask = Mask.load(mask_path)
    other = tmp_path / "other.npz"
    Mask(mask.languages, mask.n_layers, 64, [np.array([0, 65]) for _ in mask.languages], "lape").save(other)
    base = ["intervene", "ppl", "--model", MODEL, "--corpus", "sample:docs=2,langs=en", "--no-ray", "--no-progress"]
    assert main(base + ["--mask", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "a mask from another model" in capsys.readouterr().err
    assert main(base + ["--mask", str(mask_path), "--out", str(tmp_path / "b"), "--langs", "en,xx"]) == 2
    assert "language xx is not in the mask" in capsys.readouterr().err
    no_hist = tmp_path / "nohist"
    assert main(["harvest", "--model", MODEL, "--corpus", "sample:docs=3,langs=en+ru", "--store", str(no_hist),
                 "--seq-len", "64", "--no-ray", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(base + ["--mask", str(mask_path), "--out", str(tmp_path / "c"), "--mode", "p90", "--store", str(no_hist),
                        "--langs", "en,ru"]) == 2
    assert "needs histograms" in capsys.readouterr().err
    assert main(base + ["--mask", str(mask_path), "--out", str(tmp_path / "c"), "--mode", "mean", "--store", str(no_hist),
                        "--langs", "zh"]) == 2
    assert "has no group zh" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(HarvestError, match="has no prompts"):
        read_prompts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"lang": "en", "prompt": "x"}\n{"lang": "en"}\n')
    with pytest.raises(HarvestError, match="bad.jsonl:2"):
        read_prompts(str(bad))
    assert main(["intervene", "generate", "--model", MODEL, "--mask", str(mask_path), "--prompts", str(empty),
                 "--out", str(tmp_path / "d"), "--no-ray", "--no-progress"]) == 2
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_residual_masks_act_on_block_outputs(tmp_path):
    """A mask of residual units (a --site residual store) changes the blocks' outputs, and only them."""
    from harvester.backends.hf import load_config, resolve_model
    from jobs.rows import site_of

    store = tmp_path / "res"
    assert main(["harvest", "--model", MODEL, "--corpus", "sample:docs=3,langs=en+ru", "--store", str(store),
                 "--site", "residual", "--seq-len", "64", "--no-ray", "--no-progress"]) == 0
    site = site_of(str(store), load_config(resolve_model(MODEL)))
    assert site == "model.layers.{layer}"
    backend = HFBackend(MODEL, site=site)
    units = [5, 40]
    iv = Intervention(np.array([backend.width + u for u in units]), Mode("value", 3.0), backend.width)
    ids = torch.tensor([[5, 9, 200, 31, 7]])

    def outputs(run):
        """Each block's output as the next block receives it (hooks registered after the intervention's)."""
        seen = {}
        handles = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o[0] if isinstance(o, tuple) else o))
                   for k, m in enumerate(backend.modules)]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        return seen

    with torch.no_grad():
        plain = outputs(lambda: backend.model(ids))
        with intervene(backend.model, site, iv):
            changed = outputs(lambda: backend.model(ids))
            logits = backend.model(ids).logits
    torch.testing.assert_close(changed[0], plain[0])  # block 0's output is untouched
    assert (changed[1][..., units] == 3.0).all()  # block 1's output, the residual stream, at the units
    others = [u for u in range(backend.width) if u not in units]
    torch.testing.assert_close(changed[1][..., others], plain[1][..., others])
    assert not torch.allclose(changed[2], plain[2]) and not torch.allclose(logits, backend.model(ids).logits)


def test_evaluation_needs_an_eos_token(tmp_path):
    """Without an EOS token the documents cannot be separated: refused, as the harvest refuses it
    (it used to put -1 into the windows as a token id)."""
    import shutil

    from transformers import AutoTokenizer

    from harvester.tiny import tiny_path
    from jobs.ppl import eval_windows

    shutil.copytree(tiny_path("tiny:llama"), tmp_path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(HarvestError, match="no EOS token"):
        eval_windows(str(tmp_path), ["sample"], 64, 500)
    groups, windows = eval_windows("tiny:llama", ["sample"], 64, 500)
    assert min(int(w.ids.min()) for w in windows) >= 0


def response_statistic(ds, lang: str, mode: str) -> np.ndarray:
    """Plain reference of a full-minus-prompt language's statistic: the full run's less the prompt run's
    (tokens, sums; histogram bins clipped at 0), then the mean or the percentile, unit by unit."""
    names = list(ds["group"].values)
    f, p = names.index(f"{lang}:full"), names.index(f"{lang}:prompt")
    tokens = int(ds["tokens"].values[f]) - int(ds["tokens"].values[p])
    if mode == "mean":
        return (ds["act_sum"].values[f] - ds["act_sum"].values[p]) / tokens
    hist, edges = ds["hist"].values, ds["hist_lo"].values[1:]
    L, I, B = hist.shape[1:]
    out = np.zeros((L, I))
    for l in range(L):
        for i in range(I):
            counts = [max(int(hist[f, l, i, j]) - int(hist[p, l, i, j]), 0) for j in range(B)]
            out[l, i] = hist_quantile(np.array(counts), edges, int(mode[1:]))
    return out


def test_full_minus_prompt_languages_take_the_responses_statistic(backend, tmp_path):
    """A store of full and prompt runs (the alignment study's layout, harvested here with sums and
    histograms), a --response-only mask: intervene --mode mean|p90 sets the response's statistic, full
    minus prompt, never the sum of both runs."""
    import xarray as xr

    from jobs.rows import make_plan

    texts = tmp_path / "texts"
    texts.mkdir()
    for lang, docs in fixtures.sentences(("en", "de"), 6).items():
        prompts = [" ".join(d.split()[:3]) for d in docs]
        (texts / f"{lang}:full.txt").write_text("".join(f"{d}\n" for d in docs), encoding="utf-8")
        (texts / f"{lang}:prompt.txt").write_text("".join(f"{p}\n" for p in prompts), encoding="utf-8")
    store, mask = tmp_path / "store", tmp_path / "mask.npz"
    assert main(["harvest", "--model", MODEL, "--corpus", f"text:{texts}", "--store", str(store), "--seq-len", "64",
                 "--no-ray", "--no-progress", "--stats", "active,sum,hist", "--hist-edges=-1:2:30"]) == 0
    assert main(["analyze", "act-prob-zero", "--store", str(store), "--out", str(mask), "--response-only",
                 "--rate", "0.05"]) == 0
    ds = xr.open_zarr(store)
    assert Mask.load(mask).source["subtracted"] == [True, True]
    for mode in ("mean", "p90"):
        plan = make_plan(MODEL, str(mask), None, None, mode, 0, 0)  # what ppl and generate set
        for lang in ("en", "de"):
            want = response_statistic(ds, lang, mode)
            np.testing.assert_allclose(plan.values[lang], want, err_msg=f"{mode} {lang}")
            # what finetune --intervene sets
            np.testing.assert_allclose(language_statistic(str(store), Mask.load(mask), lang, Mode(mode)), want)
    out = tmp_path / "ppl"
    assert main(["intervene", "ppl", "--model", MODEL, "--mask", str(mask), "--corpus", "sample:docs=4,langs=en+de",
                 "--out", str(out), "--seq-len", "64", "--mode", "mean", "--no-ray", "--no-progress"]) == 0
    groups, windows = eval_windows(MODEL, ["sample:docs=4,langs=en+de"], 64, None)
    worker = RowWorker.__new__(RowWorker)
    worker.backend = backend
    loaded = Mask.load(mask)
    table = pd.read_csv(out / "ppl.csv", index_col=0)
    for lang in ("en", "de"):
        iv = Intervention(loaded.selected[loaded.index(lang)], Mode("mean"), loaded.width,
                          response_statistic(ds, lang, "mean"))
        total, count = worker.nll(windows, len(groups), 8, iv)
        np.testing.assert_allclose(table.loc[lang].values, np.exp(total / count), rtol=1e-5)


def test_which_groups_a_mask_language_subtracts():
    """Recorded (``subtracted``), or for a mask made before it was: ``L:full`` and ``L:prompt`` behind ``L``."""
    groups = [["en:full", "en:prompt"], ["en:full", "en:prompt"], ["de"]]
    mask = Mask(["en", "both", "de"], 1, 4, [np.array([0])] * 3, "t", {}, {"groups": groups})
    assert mask_groups(mask, "en") == (["en:full"], ["en:prompt"])
    assert mask_groups(mask, "both") == (["en:full", "en:prompt"], [])  # a sum, named otherwise
    assert mask_groups(mask, "de") == (["de"], [])
    mask.source["subtracted"] = [False, True, False]
    assert mask_groups(mask, "en") == (["en:full", "en:prompt"], [])
    assert mask_groups(mask, "both") == (["en:full"], ["en:prompt"])
