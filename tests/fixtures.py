"""Tiny local copies of the corpus formats, in their real layouts, for corpus and end-to-end tests.

Texts come from the sample generator, so each language has its own script and words; everything is
deterministic and small enough that a harvest with a tiny model takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from harvester.corpus import sample
from harvester.corpus.ec40 import split_files
from harvester.corpus.sample import SampleCorpus


def sentences(langs, n: int, seed: int = 5, sentences_per_doc: int = 1) -> dict[str, list[str]]:
    """``n`` sample documents per language."""
    corpus = SampleCorpus(spec="sample", groups=list(langs), docs=n, seed=seed, sentences=sentences_per_doc)
    return {lang: list(corpus.texts(lang)) for lang in langs}


def write_ec40(root: Path, langs=("fr", "ru", "zh"), n: int = 12, split: str = "train") -> Path:
    """``root`` laid out like the hub's ``ShaomuTan/EC40``: ``en-xx.en``/``en-xx.xx`` of ``n`` lines,
    line i of both sides made from document i (so a pair is recognisable)."""
    texts = sentences(("en", *langs), n)
    for lang in langs:
        en_name, xx_name = split_files(split, lang)
        (root / en_name).parent.mkdir(parents=True, exist_ok=True)
        (root / en_name).write_text("".join(f"{t}\n" for t in texts["en"]), encoding="utf-8")
        (root / xx_name).write_text("".join(f"{t}\n" for t in texts[lang]), encoding="utf-8")
    return root


def write_wikipedia(root: Path, date: str = "20231101", langs=("de", "fr"), docs: int = 20) -> Path:
    """``root/DATE.LANG/train-*.parquet`` like ``wikimedia/wikipedia``: the first language in two
    files (the first with a blank article), the others in one; small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sentences(langs, docs, sentences_per_doc=3)
    for k, lang in enumerate(langs):
        rows = texts[lang]
        if k == 0:
            rows = rows[:2] + ["  "] + rows[2:]
        parts = [rows[: len(rows) // 2], rows[len(rows) // 2:]] if k == 0 else [rows]
        folder = root / f"{date}.{lang}"
        folder.mkdir(parents=True, exist_ok=True)
        start = 0
        for i, part in enumerate(parts):
            ids = [str(start + j) for j in range(len(part))]
            table = pa.table({"id": ids, "url": [f"https://{lang}.wikipedia.org/wiki?curid={x}" for x in ids],
                              "title": [f"Article {x}" for x in ids], "text": part})
            pq.write_table(table, folder / f"train-{i:05d}-of-{len(parts):05d}.parquet", row_group_size=4)
            start += len(part)
    return root


def write_instruct(path: Path, langs=("en", "de", "zh"), n: int = 8) -> Path:
    """``n`` prompt/response lines per language, languages interleaved, one blank line."""
    prompts = sentences(langs, n, seed=6)
    responses = sentences(langs, n, seed=7, sentences_per_doc=2)
    lines = [json.dumps({"lang": lang, "prompt": prompts[lang][i], "response": responses[lang][i]},
                        ensure_ascii=False) for i in range(n) for lang in langs]
    lines.insert(len(langs), "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_stimuli(path: Path, lang: str = "en", n: int = 10) -> Path:
    """``n`` sentences (``S``) and ``n`` non-word strings (``N``), alternating."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return sample.write_stimuli(path, lang, n)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_xnli(root: Path, langs=("en", "de", "ru"), n: int = 12) -> Path:
    """``root/{lang}/{train,test}.jsonl`` in ``facebook/xnli``'s schema (premise, hypothesis, label).
    The hypothesis repeats the premise (0, entailment), cuts it in half (1, neutral), or is another
    document (2, contradiction)."""
    for split, seed in (("train", 5), ("test", 6)):
        texts = sentences(langs, n + 1, seed=seed)
        for lang in langs:
            rows = []
            for i in range(n):
                premise, label = texts[lang][i], i % 3
                words = premise.split()
                hypothesis = [premise, " ".join(words[: max(1, len(words) // 2)]), texts[lang][i + 1]][label]
                rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
            _write_jsonl(root / lang / f"{split}.jsonl", rows)
    return root


def write_xquad(root: Path, langs=("en", "de", "ru"), n: int = 8) -> Path:
    """``root/{lang}/{train,validation}.jsonl`` in ``google/xquad``'s (SQuAD's) schema: the answer is
    the context's first word, found at character 0."""
    for split, seed in (("train", 5), ("validation", 6)):
        texts = sentences(langs, n, seed=seed)
        for lang in langs:
            rows = []
            for i, context in enumerate(texts[lang]):
                first = context.split()[0]
                rows.append({"id": f"{lang}-{split}-{i}", "context": context, "question": "Which word comes first?",
                             "answers": {"text": [first], "answer_start": [0]}})
            _write_jsonl(root / lang / f"{split}.jsonl", rows)
    return root


def sentencepiece_llama(root: Path) -> dict:
    """A SentencePiece BPE model normalized as Llama-2's is (dummy prefix, extra whitespace kept, identity
    rules, byte fallback), as ``slow`` (sentencepiece itself, legacy, as Llama-2 ships) and ``fast``
    (transformers' conversion), with a tiny Llama of its vocabulary."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, SentencePieceBackend

    lines = [s for texts in sentences(("en", "de"), 40, seed=3).values() for s in texts]
    lines += [f"Question: is it {w}? True, False or Neither?\nAnswer: {w}" for w in ("True", "False", "Neither")] * 20
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    (root / "tok").mkdir()
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tok" / "tokenizer"),
                                   vocab_size=400, model_type="bpe", add_dummy_prefix=True, byte_fallback=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    slow = SentencePieceBackend(vocab_file=str(root / "tok" / "tokenizer.model"), legacy=True, bos_token="<s>",
                                eos_token="</s>", unk_token="<unk>")
    fast = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(slow), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return {"slow": slow, "fast": fast, "model": AutoModelForCausalLM.from_config(config).eval()}
