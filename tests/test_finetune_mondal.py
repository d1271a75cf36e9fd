"""Mondal et al.'s fine-tuning setup (``jobs.options.MONDAL_FINETUNE``), each piece against a plain
re-implementation: gate-row LoRA with q/k/v LoRA, the XNLI classifier head, the Alpaca XQuAD data with
its 80/20 split and length rule, truncation counts, and verbalizer scoring under a Llama-style
SentencePiece tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from harvester.backends.hf import load_tokenizer, resolve_model
from jobs.finetune import FinetuneJob, _batch, continuation_scores, last_hidden, prepare_data
from jobs.lora import add_restricted_lora, bake, mlp_width
from jobs.options import MONDAL_FINETUNE
from jobs.tasks import XNLI_LABELS, examples
from lsn.cli import main
from tests import fixtures

MODEL = "tiny:llama"


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    root = tmp_path_factory.mktemp("mondal")
    assert main(["harvest", "--model", MODEL, "--corpus", "sample:docs=20,langs=en+de", "--store", str(root / "store"),
                 "--seq-len", "64", "--no-ray", "--no-progress"]) == 0
    assert main(["analyze", "lape", "--store", str(root / "store"), "--out", str(root / "lape.npz"), "--top-rate", "0.1"]) == 0
    return root / "lape.npz"


def test_gate_rows_and_qkv_only():
    """After training and merging: the selected neurons' gate rows and every q/k/v weight changed; all
    other gate rows, up, down and o are bit-identical (plain comparison of the state dicts)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    width = mlp_width(model.config)
    selected = np.array([5, 90, width + 3, 2 * width + 127])
    peft_model = add_restricted_lora(model, selected, width, rank=4, alpha=8, attention=True, modules=("gate",),
                                     attention_modules=("q", "k", "v"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bake(peft_model)
    merged = peft_model.merge_and_unload().state_dict()
    for key, before in base.items():
        after = merged[key]
        if ".mlp.gate_proj." in key:
            layer = int(key.split(".")[2])
            rows = selected[selected // width == layer] - layer * width
            changed = [i for i in range(width) if not torch.equal(after[i], before[i])]
            assert changed == sorted(rows.tolist()), key
        elif any(f".self_attn.{m}_proj." in key for m in "qkv"):
            assert not torch.equal(after, before), key
        else:
            assert torch.equal(after, before), key


def test_xnli_classifier_head_against_reference(mask, tmp_path, capsys):
    """The head's logits are ``W h + b`` with ``h`` the base model's last hidden state at the last position
    of ``premise {eos} hypothesis`` encoded as the reference encodes it (the tokenizer's default special
    tokens, one example, no padding), also when batched with a longer, right-padded example."""
    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [{"premise": "a short premise", "hypothesis": "short", "label": 1},
            {"premise": "a much longer premise with many more words in it", "hypothesis": "long one", "label": 2}]
    items = examples("xnli", rows, "classifier", tokenizer.eos_token)
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 3)
    ids, attention, _ = _batch(tokenizer, [(ex.prompt, "") for ex in items], 256, tokenizer.pad_token_id, True)
    with torch.no_grad():
        ours = head(last_hidden(model, ids, attention))
        for k, r in enumerate(rows):
            text = r["premise"] + f" {tokenizer.eos_token} " + r["hypothesis"]  # the reference's input
            reference_ids = torch.tensor([tokenizer(text)["input_ids"]])
            h = model.model(input_ids=reference_ids).last_hidden_state[0, -1]  # last position
            expected = h @ head.weight.T + head.bias
            torch.testing.assert_close(ours[k], expected, rtol=1e-5, atol=1e-5)
    xnli = fixtures.write_xnli(tmp_path / "xnli", langs=("en", "de"))
    out = tmp_path / "out"
    assert main(["finetune", "--model", MODEL, "--mask", str(mask), "--lang", "de", "--task", "xnli", "--data", str(xnli),
                 "--eval-langs", "en,de", "--out", str(out), "--xnli-head", "classifier", "--lora-modules", "gate",
                 "--attention-lora", "--attention-modules", "q,k,v", "--steps", "3", "--no-ray", "--no-progress"]) == 0
    record = json.loads((out / "de-none" / "results.json").read_text())
    assert record["changed_outside_selection"] == 0 and 0 <= record["eval"]["de"]["accuracy"] <= 1
    assert (out / "de-none" / "head.pt").is_file()
    assert "truncation: en/train 0 of 12 cut" in capsys.readouterr().err


# -- the reference's XQuAD data code, re-implemented plainly -----------------------------------------
def reference_text(example: dict, eos: str, is_train: bool) -> str:
    context, question = example["context"].strip(), example["question"].strip()
    if is_train:
        answer_text = example["answers"]["text"][0].strip() + eos
        template = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

            ### Instruction:
            Answer the question based on the given context.

            ### Input:
            Context: {context} 
            Question: {question}

            ### Response: {answer_text}""".strip()
        return template.format(context=context, question=question, answer_text=answer_text)
    template = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

            ### Instruction:
            Answer the question based on the given context.

            ### Input:
            Context: {context} 
            Question: {question}

            ### Response:""".strip()
    return template.format(context=context, question=question)


def reference_dataset(rows: list[dict], tokenizer, is_train: bool, tmax: int = 512) -> list[str]:
    """First 80% (train) or the rest, in order; dropped when ``seq_len >= Tmax - 1``."""
    rows = rows[: int(len(rows) * 0.80)] if is_train else rows[int(len(rows) * 0.80):]
    kept = []
    for r in rows:
        text = reference_text(r, tokenizer.eos_token, is_train)
        seq_len = sum(tokenizer(text, truncation=True, max_length=tmax)["attention_mask"])
        if seq_len >= tmax - 1:
            continue
        kept.append(text)
    return kept


def write_long_xquad(root, langs=("en", "de"), n: int = 15):
    """``validation.jsonl`` only, as on the hub; contexts from a few words to well over 512 tokens."""
    texts = fixtures.sentences(langs, n, seed=9, sentences_per_doc=2)
    for lang in langs:
        rows = []
        for i, context in enumerate(texts[lang]):
            context = " ".join([context] * (1 + 6 * (i % 4)))  # i % 4 == 3: far over 512 tokens
            first = context.split()[0]
            rows.append({"id": f"{lang}-{i}", "context": f" {context} ", "question": "Which word comes first? ",
                         "answers": {"text": [f" {first}"], "answer_start": [0]}})
        fixtures._write_jsonl(root / lang / "validation.jsonl", rows)
    return root


def test_alpaca_split_and_length_rule_against_reference(tmp_path, capsys):
    data = write_long_xquad(tmp_path / "xquad")
    tokenizer = load_tokenizer(resolve_model(MODEL))
    rows = {lang: [json.loads(line) for line in (data / lang / "validation.jsonl").read_text().splitlines()]
            for lang in ("en", "de")}
    job = FinetuneJob(model=MODEL, mask="unused", langs=["de"], task="xquad", data=str(data), out=str(tmp_path / "o"),
                      eval_langs=["en", "de"], use_ray=False, device="cpu", dtype="float32",
                      **{k: v for k, v in MONDAL_FINETUNE["xquad"].items() if k not in ("lr", "rank", "alpha")})
    prepared = prepare_data(job)
    train = reference_dataset(rows["en"], tokenizer, True)
    assert 0 < len(train) < int(0.8 * len(rows["en"]))  # some dropped
    assert [ex.prompt + ex.target for ex in prepared["train"]] == train
    for lang in ("en", "de"):
        assert [ex.prompt for ex in prepared["eval"][lang]] == reference_dataset(rows[lang], tokenizer, False)
    counts = prepared["truncation"]
    assert counts["en/train"]["examples"] == 12 and counts["en/train"]["dropped_over_max_example_tokens"] == 12 - len(train)
    assert counts["de/eval"]["examples"] == 3


def test_truncation_counted_and_printed(mask, tmp_path, capsys):
    """Cut examples are counted per language and split against a plain count, printed and recorded."""
    data = fixtures.write_xquad(tmp_path / "xquad", langs=("en", "de"))
    out = tmp_path / "out"
    assert main(["finetune", "--model", MODEL, "--mask", str(mask), "--lang", "de", "--task", "xquad", "--data", str(data),
                 "--eval-langs", "en,de", "--out", str(out), "--control", "base", "--seq-len", "24", "--steps", "1",
                 "--no-ray", "--no-progress"]) == 0
    tokenizer = load_tokenizer(resolve_model(MODEL))
    err = capsys.readouterr().err
    recorded = json.loads((out / "results.json").read_text())["truncation"]
    for lang, split, file, limit, whole in (("en", "train", "train", 24, True), ("de", "eval", "validation", 24 - 16, False)):
        rows = [json.loads(line) for line in (data / lang / f"{file}.jsonl").read_text().splitlines()]
        texts = [f"{r['context']}\nQuestion: {r['question']}\nAnswer:" + (f" {r['answers']['text'][0]}" if whole else "")
                 for r in rows]
        cut = sum(len(tokenizer(t)["input_ids"]) > limit for t in texts)
        assert cut > 0 and recorded["data"][f"{lang}/{split}"]["cut_to_seq_len"] == cut
        assert f"{lang}/{split} {cut} of {len(rows)} cut to --seq-len" in err
    caps = recorded["conditions"]["de-base"]["en/eval"]
    assert caps["answers"] == 8 and 0 <= caps["answers_at_cap"] <= 8
    assert "truncation de-base: en/eval" in err


# -- a Llama-2-style SentencePiece tokenizer, built offline --------------------------------------------
@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory):
    """A Llama-2-style SentencePiece tokenizer (``slow`` and ``fast``) and a tiny Llama of its vocabulary."""
    return fixtures.sentencepiece_llama(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("kind", ["slow", "fast"])
def test_verbalizer_scores_on_whole_string_tokenization(sentencepiece_llama, kind):
    """Each label's score is log p(prompt + label) - log p(prompt), both on the whole string's tokens; the
    separate tokenization that transformers #26273 describes would give other tokens (a lone '▁')."""
    tokenizer, model = sentencepiece_llama[kind], sentencepiece_llama["model"]
    prompt = "der Hund\nQuestion: is it True? True, False or Neither?\nAnswer:"
    with torch.no_grad():
        ours = continuation_scores(model, tokenizer, prompt, XNLI_LABELS, 256, True)
        for k, label in enumerate(XNLI_LABELS):
            whole = tokenizer(prompt + label)["input_ids"]
            alone = tokenizer(prompt)["input_ids"]
            assert whole[: len(alone)] == alone
            if kind == "slow":  # the pitfall this guards against, present in the fixture
                assert tokenizer(label, add_special_tokens=False)["input_ids"] != whole[len(alone):]
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            expected = sum(logp[i - 1, whole[i]] for i in range(len(alone), len(whole)))
            torch.testing.assert_close(ours[k], expected, rtol=1e-5, atol=1e-5)
