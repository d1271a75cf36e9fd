"""Mondal et al.'s act_prob_90p (``--stats batch_quantile``, then ``above`` with ``--thresholds-from``,
``analyze act-prob-90p --percentile-of batch-mean``) against a plain re-implementation of their path:
an HF forward per batch with a hook on gate_proj, ``torch.quantile`` per batch, the mean over batches,
the second pass's exceedances, each language's top m."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

from analysis.masks import Mask
from harvester.backends.hf import resolve_model
from lsn.cli import main
from tests.reference import reference_windows

SEQ, BATCH, RATE = 16, 4, 0.01
FLAGS = ["--model", "tiny:llama", "--unit", "gate", "--seq-len", str(SEQ), "--batch-size", str(BATCH),
         "--shard-tokens", str(2 * SEQ * BATCH), "--no-ray", "--no-progress"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("mondal")
    q, above = root / "q", root / "above"
    corpus = ["--corpus", f"text:{text_corpus}"]
    assert main(["harvest", *FLAGS, *corpus, "--store", str(q), "--stats", "active,batch_quantile"]) == 0
    assert main(["harvest", *FLAGS, *corpus, "--store", str(above), "--stats", "active,above",
                 "--thresholds-from", str(q)]) == 0
    mask = root / "m.npz"
    assert main(["analyze", "act-prob-90p", "--store", str(above), "--out", str(mask), "--percentile-of",
                 "batch-mean", "--rate", str(RATE)]) == 0
    return {"q": q, "above": above, "mask": mask, "root": root, "corpus": text_corpus}


def mondal_reference(corpus):
    """Per language: (mean of per-batch P90 [L, I], exceedance count [L, I], tokens), from plain batches of
    BATCH consecutive windows of SEQ tokens (a shorter last batch or window is dropped from the quantile,
    as a drop_last loader drops it; every token counts in the second pass)."""
    path = resolve_model("tiny:llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = model.model.layers
    acts = {}
    for k, layer in enumerate(layers):
        layer.mlp.gate_proj.register_forward_hook(lambda m, i, out, k=k: acts.__setitem__(k, out.flatten(0, 1)))
    out = {}
    with torch.inference_mode():
        for lang, windows in reference_windows(corpus, AutoTokenizer.from_pretrained(path), SEQ).items():
            batches = [windows[i:i + BATCH] for i in range(0, len(windows), BATCH)]
            p90, n = torch.zeros(len(layers), acts_width(model)), 0
            for batch in batches:
                if len(batch) == BATCH and all(len(w) == SEQ for w in batch):
                    model(input_ids=torch.tensor(batch))
                    p90 += torch.stack([torch.quantile(acts[k].float(), 0.90, dim=0) for k in range(len(layers))])
                    n += 1
            threshold = p90 / n
            count, tokens = 0, 0
            for window in windows:  # the second pass: every token, one window at a time
                model(input_ids=torch.tensor([window]))
                count = count + torch.stack([(acts[k] > threshold[k]).sum(0) for k in range(len(layers))]).numpy()
                tokens += len(window)
            out[lang] = (threshold.double().numpy(), count, tokens, n)
    return out


def acts_width(model) -> int:
    return model.config.intermediate_size


def top_m(score: np.ndarray, m: int) -> np.ndarray:
    """The m largest scores, ties to the smaller flat index, sorted."""
    flat = score.ravel()
    order = sorted(range(flat.size), key=lambda j: (-flat[j], j))
    return np.sort(np.array(order[:m], dtype=np.int64))


def test_harvest_and_analysis_match_mondal_path(stores):
    ref = mondal_reference(stores["corpus"])
    q, above = xr.open_zarr(stores["q"]), xr.open_zarr(stores["above"])
    mask = Mask.load(stores["mask"])
    L, I = q.sizes["layer"], q.sizes["neuron"]
    m = round(RATE * L * I)
    for k, lang in enumerate(q["group"].values):
        threshold, count, tokens, n = ref[lang]
        assert n > 1 and int(q["quantile_batches"].sel(group=lang)[0, 0]) == n
        mean = q["quantile_sum"].sel(group=lang).values / q["quantile_batches"].sel(group=lang).values
        np.testing.assert_allclose(mean, threshold, rtol=1e-6, atol=1e-7)
        assert int(above["tokens"].sel(group=lang)) == tokens
        np.testing.assert_array_equal(above["above"].sel(group=lang).values, count)  # count for count
        assert list(mask.selected[k]) == list(top_m(count / tokens, m))  # unit for unit
        assert len(mask.selected[k]) == m


def test_store_records_the_batch_and_verifies(stores, capsys):
    from harvester.store import read_attrs

    settings = read_attrs(stores["q"]).settings
    assert (settings.batch_quantile, settings.batch_size, settings.seq_len) == (0.9, BATCH, SEQ)
    source = read_attrs(stores["above"]).settings.thresholds_from
    assert source["store"] == str(stores["q"]) and source["batch_quantile"] == 0.9
    assert main(["verify", str(stores["q"])]) == 0 and main(["verify", str(stores["above"])]) == 0


def _error(argv, capsys) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()  # a refusal after the store was made also says it is removed
    errors = [line for line in err.splitlines() if line.startswith("lsn: error")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_refusals_are_one_line(stores, capsys, tmp_path):
    corpus = ["--corpus", f"text:{stores['corpus']}"]
    err = _error(["analyze", "act-prob-90p", "--store", str(stores["q"]), "--out", str(tmp_path / "x.npz"),
                  "--percentile-of", "batch-mean"], capsys)
    assert "--thresholds-from" in err and "batch_quantile" in err
    err = _error(["harvest", *FLAGS, *corpus, "--store", str(tmp_path / "a"), "--stats", "active,above",
                  "--thresholds-from", str(stores["above"])], capsys)
    assert "no batch_quantile statistic" in err
    other = [*FLAGS[:2], "--unit", "mlp", *FLAGS[4:]]
    err = _error(["harvest", *other, *corpus, "--store", str(tmp_path / "b"), "--stats", "active,above",
                  "--thresholds-from", str(stores["q"])], capsys)
    assert "its model site is" in err
    err = _error(["harvest", *FLAGS, *corpus, "--store", str(tmp_path / "e"), "--stats", "active,above",
                  "--thresholds-from", str(stores["q"]), "--dtype", "bfloat16"], capsys)
    assert "its model dtype is 'float32', this harvest's 'bfloat16'" in err  # moved 480 of 768 counts
    other_text = tmp_path / "other"  # the same languages, other text
    other_text.mkdir()
    for f in sorted(stores["corpus"].iterdir()):
        (other_text / f.name).write_text(f.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    err = _error(["harvest", *FLAGS, "--corpus", f"text:{other_text}", "--store", str(tmp_path / "f"),
                  "--stats", "active,above", "--thresholds-from", str(stores["q"])], capsys)
    assert "another corpus" in err
    groups = [f.stem for f in sorted(stores["corpus"].iterdir())]
    err = _error(["analyze", "act-prob-90p", "--store", str(stores["above"]), "--out", str(tmp_path / "y.npz"),
                  "--percentile-of", "batch-mean", "--langs", f"all={'+'.join(groups)}"], capsys)
    assert "takes one store group per language" in err and "all pools several" in err
    err = _error(["analyze", "act-prob-90p", "--store", str(stores["q"]), "--out", str(tmp_path / "z.npz")], capsys)
    assert "hist" in err  # the default (pooled) on a store without histograms: was a KeyError traceback
    err = _error(["harvest", *FLAGS, "--corpus", "sample:docs=6,langs=en+de", "--store", str(tmp_path / "c"),
                  "--stats", "active,above", "--thresholds-from", str(stores["q"])], capsys)
    assert "other groups" in err
    err = _error(["harvest", *FLAGS[:-4], "--shard-tokens", "100", "--no-ray", "--no-progress", *corpus,
                  "--store", str(tmp_path / "d"), "--stats", "active,batch_quantile"], capsys)
    assert "multiple of --batch-size x --seq-len" in err
    err = _error(["harvest", *FLAGS, *corpus, "--store", str(tmp_path / "g"), "--batch-quantile", "0.5"], capsys)
    assert "--batch-quantile 0.5 is for --stats ...,batch_quantile" in err  # was recorded and ignored


def test_a_batch_of_several_groups_is_refused(tmp_path, capsys):
    from tests.fixtures import write_instruct

    data = write_instruct(tmp_path / "i.jsonl")
    err = _error(["harvest", *FLAGS, "--corpus", f"instruct:{data}", "--store", str(tmp_path / "s"),
                  "--stats", "active,batch_quantile"], capsys)
    assert "from one group" in err


def test_tokens_outside_full_batches_are_reported(stores, tmp_path, capsys):
    """The first pass says, per group, what its batch quantile leaves out; a group with no full batch (no
    threshold for the second pass) is an error at once, not at the second pass."""
    import xarray as xr

    from harvester.store import read_attrs
    from harvester.summary import batch_losses

    attrs = read_attrs(stores["q"])
    ds = xr.open_zarr(stores["q"])
    warnings, none = batch_losses(str(stores["q"]), attrs)
    assert not none
    for g, name in enumerate(attrs.corpus.groups):  # what each group's batches leave out, by hand
        outside = int(ds["tokens"].values[g]) - int(ds["quantile_batches"].values[g, 0, 0]) * SEQ * BATCH
        assert 0 <= outside < SEQ * BATCH
        assert any(line.startswith(f"group {name}: {outside} of its") for line in warnings) == (
            outside > 0.01 * int(ds["tokens"].values[g]))
    capsys.readouterr()
    big = [*FLAGS[:6], "--batch-size", "64", "--shard-tokens", str(64 * SEQ), "--no-ray", "--no-progress"]
    assert main(["harvest", *big, "--corpus", f"text:{stores['corpus']}", "--store", str(tmp_path / "s"),
                 "--stats", "active,batch_quantile"]) == 2
    err = capsys.readouterr().err
    assert "have no full batch, so no batch quantile" in err and "Traceback" not in err
