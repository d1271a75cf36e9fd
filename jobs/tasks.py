"""Fine-tuning tasks for a causal LM: language modelling, XNLI and XQuAD, with loaders and metrics.

Every task turns examples into ``(prompt ids, target ids)``; the loss is on the target tokens only
(all tokens for ``clm``).

- ``clm``: windows of any corpus spec (:mod:`harvester.corpus`); metric: perplexity per language.
- ``xnli``: premise and hypothesis, three classes. The prompt is ``"{premise}\\nQuestion:
  {hypothesis} True, False or Neither?\\nAnswer:"`` and the target is `` True``, `` Neither`` or
  `` False`` (labels 0 entailment, 1 neutral, 2 contradiction, as in ``facebook/xnli``). The
  prediction is the label whose continuation has the highest log-likelihood; metric: accuracy.
- ``xquad``: extractive QA. The prompt is ``"{context}\\nQuestion: {question}\\nAnswer:"``, the target
  `` {first answer}``, and the prediction is a greedy continuation up to a newline. Metrics: exact
  match and F1 with SQuAD v1.1's answer normalization (lower case, no punctuation, no English
  articles, single spaces) and whitespace tokens.

Mondal et al.'s variants (options of ``lsn finetune``): ``xnli`` as a classifier over ``"{premise}
{eos} {hypothesis}"`` (no verbalizer), and ``xquad`` in their Alpaca template (:data:`ALPACA`), trained
on the first 80% of ``google/xquad``'s validation rows (:func:`split_rows`).

Data: a hub id (``facebook/xnli``: config per language; ``google/xquad``: configs ``xquad.{lang}``,
``validation`` only) or a local directory in the same schema, ``DIR/{lang}/{split}.jsonl``.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from pathlib import Path

from harvester.errors import HarvestError

TASKS = ("clm", "xnli", "xquad")
XNLI_LABELS = (" True", " Neither", " False")
COLUMNS = {"xnli": ("premise", "hypothesis", "label"), "xquad": ("context", "question", "answers")}


_I = " " * 12  # their template is an indented triple-quoted string; .strip() keeps the inner indentation
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          f"{_I}### Instruction:\n{_I}Answer the question based on the given context.\n\n"
          f"{_I}### Input:\n{_I}Context: {{context}} \n{_I}Question: {{question}}\n\n{_I}### Response:")
"""Mondal et al.'s XQuAD prompt, character for character (``dataset.py``, ``XQADatasetHF``); context and
question are stripped. The training text appends ``" {answer}{eos}"``, the answer stripped."""


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    label: int | None = None
    answers: tuple[str, ...] = ()


def check_task(task: str) -> None:
    if task not in TASKS:
        raise HarvestError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")


def load_rows(task: str, source: str, lang: str, split: str, limit: int | None) -> list[dict]:
    """Rows of ``source`` (a local directory or a hub id) for ``lang`` and ``split``, checked for the
    task's columns."""
    from harvester.corpus import json_value, text_lines
    from harvester.names import check_name, inside

    check_name(lang, f"{task} language")
    path = Path(source).expanduser()
    if path.is_dir():
        file = inside(path, lang, f"{split}.jsonl", follow_links=False)
        if not file.is_file():
            raise HarvestError(f"{task} data: no file {file}")
        rows = []
        for n, line in text_lines(file):
            if line.strip():
                rows.append(json_value(line, f"{file}:{n}"))
    else:
        rows = _hub_rows(task, source, lang, split)
    if not rows:
        raise HarvestError(f"{task} data {source} has no {split} examples for {lang}")
    missing = [c for c in COLUMNS[task] if not all(c in r for r in rows)]
    if missing:
        raise HarvestError(f"{task} data {source} ({lang}, {split}) lacks the column(s) {', '.join(missing)}")
    return rows[:limit] if limit else rows


def _hub_rows(task: str, source: str, lang: str, split: str) -> list[dict]:
    import datasets

    config = f"xquad.{lang}" if task == "xquad" and source == "google/xquad" else lang
    try:
        return list(datasets.load_dataset(source, config, split=split))
    except Exception as err:  # noqa: BLE001 -- datasets raises many kinds; one line for all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HarvestError(f"could not load {task} data {source} ({config}, {split}): {first}") from None


def examples(task: str, rows: list[dict], form: str = "plain", eos: str = "") -> list[Example]:
    """``form``: xnli ``verbalizer`` or ``classifier`` (``eos``: the tokenizer's EOS text between premise
    and hypothesis); xquad ``plain`` or ``alpaca`` (``eos`` ends the answer)."""
    if task == "xnli":
        out = []
        for r in rows:
            label = int(r["label"])
            if label not in (0, 1, 2):
                raise HarvestError(f"xnli label must be 0, 1 or 2, not {r['label']!r}")
            if form == "classifier":
                out.append(Example(f"{r['premise']} {eos} {r['hypothesis']}", "", label=label))
            else:
                out.append(Example(f"{r['premise']}\nQuestion: {r['hypothesis']} True, False or Neither?\nAnswer:",
                                   XNLI_LABELS[label], label=label))
        return out
    out = []
    for r in rows:
        answers = r["answers"]["text"] if isinstance(r["answers"], dict) else r["answers"]
        if not answers:
            raise HarvestError("an xquad example has no answer text")
        if form == "alpaca":
            prompt = ALPACA.format(context=r["context"].strip(), question=r["question"].strip())
            out.append(Example(prompt, f" {answers[0].strip()}{eos}", answers=tuple(answers)))
        else:
            out.append(Example(f"{r['context']}\nQuestion: {r['question']}\nAnswer:", f" {answers[0]}",
                               answers=tuple(answers)))
    return out


def split_rows(rows: list[dict], rule: str, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, eval)``: the first 80% of ``rows`` (``int(0.8 n)``, as Mondal et al.) and the rest, in file
    order (``first80``) or after a permutation seeded by ``seed`` (``shuffled80``)."""
    import numpy as np

    if rule == "shuffled80":
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    cut = int(len(rows) * 0.8)
    return rows[:cut], rows[cut:]


def encode(tokenizer, prompt: str, target: str, special: bool) -> tuple[list[int], list[int]]:
    """``(prompt ids, target ids)`` of ``prompt + target`` tokenized as one string, split where the target's
    characters begin. Tokenizing the two apart would differ for SentencePiece tokenizers with a dummy prefix
    (Llama-2, Mistral: a spurious "▁" before " True"; transformers #26273). A token that straddles the
    boundary stays with the prompt."""
    whole = tokenizer(prompt + target, add_special_tokens=special, return_offsets_mapping=tokenizer.is_fast)
    ids = whole["input_ids"]
    if not target:
        return ids, []
    if tokenizer.is_fast:
        spans = whole["offset_mapping"]
        # special tokens have empty spans; those after the text (an EOS) go with the target
        k = next((i for i, (a, b) in enumerate(spans) if a >= len(prompt) and (b > a or i > 0)), len(ids))
        return ids[:k], ids[k:]
    alone = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    k = 0
    while k < min(len(alone), len(ids)) and alone[k] == ids[k]:
        k += 1
    return ids[:k], ids[k:]


# -- SQuAD v1.1 metrics ---------------------------------------------------------------------------
def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers) -> float:
    return float(max(normalize(prediction) == normalize(a) for a in answers))


def f1(prediction: str, answers) -> float:
    def one(pred: str, truth: str) -> float:
        p, t = normalize(pred).split(), normalize(truth).split()
        common = collections.Counter(p) & collections.Counter(t)
        same = sum(common.values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(t)
        return 2 * precision * recall / (precision + recall)

    return max(one(prediction, a) for a in answers)
