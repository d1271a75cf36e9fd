"""``lsn intervene ppl --aggregate tokens|window-nll|per-prompt`` against plain references: a plain HF
forward of the tiny model on the same token ids, NLL taken the way each reference code takes it (LAPE's
RUCAIBox ``ppl.py``, the alignment study's NJUNLP ``ppl.py``), the mask's neurons zeroed by a hook on the
activation as both codes zero them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.masks import Mask
from harvester.tiny import tiny_path
from lsn.cli import main

WIDTH, LAYERS = 128, 3  # tiny:llama's MLP
EN = ["The cat sat on the mat and looked at the birds outside the window.",
      "A long road leads over the hills to a small village by the sea.",
      "Every morning the baker opens his shop before the sun comes up.",
      "Children play in the park while their parents talk on the benches.",
      "The old library holds thousands of books about history and science."]
DE = ["Die Katze sitzt auf der Matte und schaut die Vögel draußen an.",
      "Eine lange Straße führt über die Hügel zu einem kleinen Dorf am Meer.",
      "Jeden Morgen öffnet der Bäcker seinen Laden vor Sonnenaufgang."]
PROMPTS = [("en", "Write a short poem about the sea.", "The sea is wide and blue."),
           ("de", "Schreibe ein kurzes Gedicht über das Meer.", "Das Meer ist weit und blau."),
           ("en", "Explain why the sky is blue, in simple words for a child who asks about it every day.", "Light."),
           ("de", "Nenne drei Städte.", "Berlin, Hamburg, München."),
           ("en", "and", "Hello.")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text corpus, an instruct file, and a hand-made mask of two languages (no store: --mode zero)."""
    root = tmp_path_factory.mktemp("agg")
    (root / "text").mkdir()
    (root / "text" / "en.txt").write_text("\n".join(EN) + "\n")
    (root / "text" / "de.txt").write_text("\n".join(DE) + "\n")
    (root / "instruct.jsonl").write_text("".join(json.dumps({"lang": lang, "prompt": p, "response": r}) + "\n"
                                                 for lang, p, r in PROMPTS))
    selected = [np.array([3, 40, WIDTH + 7, WIDTH + 90, 2 * WIDTH + 11]),
                np.array([8, WIDTH + 64, 2 * WIDTH + 5, 2 * WIDTH + 100])]
    Mask(["en", "de"], LAYERS, WIDTH, selected, "hand").save(root / "mask.npz")
    return root


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """tiny:llama whose tokenizer puts BOS before a text, as Llama's and Mistral's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos")
    shutil.copytree(tiny_path("tiny:llama"), path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("a")["input_ids"][0] == 1
    return path


def load(model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_path(model) if str(model).startswith("tiny:") else model
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def log_probs(model, ids: list[int], zeroed=()) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1.., float64; the flat units ``zeroed`` set to 0 after the MLP's
    activation (a forward hook, removed after)."""
    hooks = []
    for layer in range(LAYERS):
        units = [u - layer * WIDTH for u in zeroed if u // WIDTH == layer]
        if units:
            def zero(module, inputs, output, units=units):
                output[..., units] = 0
                return output
            hooks.append(model.model.layers[layer].mlp.act_fn.register_forward_hook(zero))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
    finally:
        for h in hooks:
            h.remove()
    logp = torch.log_softmax(logits, -1)
    return np.array([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))])


def stream(tokenizer, lines: list[str]) -> list[int]:
    """A language's running text as a harvest tokenizes it: each line alone, without special tokens, then EOS."""
    ids = []
    for line in lines:
        ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def lape_stream(tokenizer, lines: list[str]) -> list[int]:
    """A language's ids as LAPE's are prepared (its README: tokenize, then concatenate): ``tokenizer(line)``
    each, its BOS where it adds one, nothing between documents."""
    return [t for line in lines for t in tokenizer(line)["input_ids"]]


def run(tmp_path, capsys, model, corpus, out, *flags):
    capsys.readouterr()
    code = main(["intervene", "ppl", "--model", str(model), "--mask", str(tmp_path / "mask.npz"), "--corpus", corpus,
                 "--out", str(out), "--controls", "0", "--no-ray", "--no-progress", "--batch-size", "3", *flags])
    return code, capsys.readouterr()


def test_tokens_is_exp_of_the_token_weighted_mean(data, tmp_path, capsys):
    """The default, unchanged: windows of --seq-len with the remainder kept, every predicted token weighs one."""
    code, _ = run(data, capsys, "tiny:llama", f"text:{data / 'text'}", tmp_path / "o", "--seq-len", "24")
    assert code == 0
    table = pd.read_csv(tmp_path / "o" / "ppl.csv", index_col=0)
    model, tokenizer = load("tiny:llama")
    mask = Mask.load(data / "mask.npz")
    for row, zeroed in (("none", ()), ("en", mask.selected[0])):
        for lang, lines in (("en", EN), ("de", DE)):
            ids = stream(tokenizer, lines)
            nll = [-lp for start in range(0, len(ids), 24) for lp in log_probs(model, ids[start:start + 24], zeroed)]
            assert table.loc[row, lang] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5), (row, lang)
    assert open(tmp_path / "o" / "ppl.csv").readline().startswith("intervened (PPL; aggregate tokens),")
    settings = json.loads((tmp_path / "o" / "ppl.json").read_text())["settings"]
    assert settings["aggregate"] == "tokens" and "windows" not in settings


def test_window_nll_follows_lape(data, tmp_path, capsys):
    """LAPE's code: the language's ids cut into consecutive windows of L, the remainder dropped; per window
    the mean log-prob of tokens 1..L-1; the mean over windows; printed negated, without exp."""
    seq_len = 20
    code, printed = run(data, capsys, "tiny:llama", f"text:{data / 'text'}", tmp_path / "o", "--seq-len", str(seq_len),
                        "--aggregate", "window-nll")
    assert code == 0
    table = pd.read_csv(tmp_path / "o" / "ppl.csv", index_col=0)
    model, tokenizer = load("tiny:llama")
    mask = Mask.load(data / "mask.npz")
    windows = {}
    for lang, lines in (("en", EN), ("de", DE)):
        ids = lape_stream(tokenizer, lines)
        kept = len(ids) // seq_len * seq_len
        assert kept < len(ids)  # there is a remainder to drop
        windows[lang] = np.asarray(ids[:kept]).reshape(-1, seq_len)
    for row, zeroed in (("none", ()), ("en", mask.selected[0]), ("de", mask.selected[1])):
        for lang in ("en", "de"):
            per_window = [np.mean(log_probs(model, w.tolist(), zeroed)) for w in windows[lang]]
            assert table.loc[row, lang] == pytest.approx(-np.mean(per_window), rel=1e-5), (row, lang)
    settings = json.loads((tmp_path / "o" / "ppl.json").read_text())["settings"]
    assert settings["aggregate"] == "window-nll"
    assert settings["windows"] == {lang: len(w) for lang, w in windows.items()}
    assert settings["tokens"] == {lang: len(w) * (seq_len - 1) for lang, w in windows.items()}
    assert open(tmp_path / "o" / "ppl.csv").readline().startswith("intervened (NLL; aggregate window-nll),")
    assert open(tmp_path / "o" / "ppl_relative.csv").readline().startswith("intervened (NLL; aggregate window-nll),")
    label = printed.out.splitlines()[0]
    assert label.startswith("NLL without intervention (none), then the relative NLL change") and "window-nll" in label
    assert printed.out.splitlines()[2].startswith("none (NLL)")


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_per_prompt_follows_the_alignment_study(data, bos_model, tmp_path, capsys, bos):
    """The alignment study's code: each instruction encoded alone as ``tokenizer.encode(p, max_length=L,
    truncation=True)`` (BOS first where the tokenizer adds one), its mean NLL over tokens 1.., then exp
    of the mean over prompts. The long prompt is cut at L; "and" (one token) predicts nothing without BOS."""
    seq_len = 16
    model_id = bos_model if bos else "tiny:llama"
    code, printed = run(data, capsys, model_id, f"instruct:{data / 'instruct.jsonl'}", tmp_path / "o",
                        "--seq-len", str(seq_len), "--aggregate", "per-prompt")
    assert code == 0
    table = pd.read_csv(tmp_path / "o" / "ppl.csv", index_col=0)
    model, tokenizer = load(str(model_id))
    mask = Mask.load(data / "mask.npz")
    assert max(len(tokenizer.encode(p)) for _, p, _ in PROMPTS) > seq_len  # truncation is exercised
    for row, zeroed in (("none", ()), ("de", mask.selected[1])):
        for lang in ("en", "de"):
            per_prompt = []
            for _, prompt, _ in filter(lambda e: e[0] == lang, PROMPTS):
                ids = tokenizer.encode(prompt, max_length=seq_len, truncation=True)
                if len(ids) > 1:  # the study's code gives inf for a prompt with nothing predicted
                    per_prompt.append(-np.mean(log_probs(model, ids, zeroed)))
            assert table.loc[row, f"{lang}:prompt"] == pytest.approx(np.exp(np.mean(per_prompt)), rel=1e-5)
    settings = json.loads((tmp_path / "o" / "ppl.json").read_text())["settings"]
    assert settings["prompts"]["en:prompt"] == (3 if bos else 2) and settings["prompts"]["de:prompt"] == 2
    assert open(tmp_path / "o" / "ppl.csv").readline().startswith("intervened (PPL; aggregate per-prompt),")
    assert "aggregate per-prompt" in printed.out.splitlines()[0]


def test_the_png_names_the_quantity_and_aggregate(monkeypatch, tmp_path):
    import analysis.report
    from jobs.ppl import plot_relative

    seen = {}
    monkeypatch.setattr(analysis.report, "heatmap", lambda path, data, rows, cols, title, x, y, bar, **kw:
                        seen.update(title=title, bar=bar))
    frame = pd.DataFrame([[0.0], [0.1]], index=["none", "en"], columns=["en"])
    plot_relative(frame, tmp_path / "a.png", "zero", "window-nll")
    assert seen == {"title": "Relative NLL change, (NLL - NLL none) / NLL none, mode zero, aggregate window-nll",
                    "bar": "(NLL - NLL none) / NLL none"}
    plot_relative(frame, tmp_path / "a.png", "zero")
    assert seen["title"].endswith("aggregate tokens") and seen["title"].startswith("Relative PPL change")


def test_an_aggregate_that_does_not_apply_is_refused(data, tmp_path, capsys):
    cases = [
        (f"text:{data / 'text'}", ["--aggregate", "per-prompt"], "--aggregate per-prompt averages over examples, but"),
        (f"instruct:{data / 'instruct.jsonl'}", ["--aggregate", "window-nll"],
         "--aggregate window-nll cuts running text into --seq-len windows, but"),
        (f"text:{data / 'text'}", ["--aggregate", "window-nll", "--seq-len", "512"],
         "has no full --seq-len 512 window, and --aggregate window-nll drops shorter ones"),
        (f"text:{data / 'text'}", ["--aggregate", "window-nll", "--seq-len", "4096"],  # --preset lape's, on a
         "--seq-len 4096 exceeds the model's maximum of 512 positions"),  # 512-position model: was an IndexError
        (f"text:{data / 'text'}", ["--aggregate", "window-nll", "--seq-len", "150"],
         "no predicted tokens for de in a full --seq-len 150 window"),
    ]
    for k, (corpus, flags, message) in enumerate(cases):
        code, printed = run(data, capsys, "tiny:llama", corpus, tmp_path / str(k), *flags)
        *notes, error = printed.err.splitlines()  # notes: the hand-made mask records no model
        assert code == 2 and message in error and all("the mask records no model" in n for n in notes), printed.err
        assert "Traceback" not in printed.err and not (tmp_path / str(k)).exists()
    with pytest.raises(SystemExit) as stop:  # argparse's choices, one line
        run(data, capsys, "tiny:llama", f"text:{data / 'text'}", tmp_path / "x", "--aggregate", "windows")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "--aggregate: invalid choice: 'windows' (choose from 'tokens', 'window-nll', 'per-prompt')" in err
