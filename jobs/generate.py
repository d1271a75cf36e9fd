"""Generation under interventions: what language a model answers in when a language's neurons are changed.

Prompts come from a JSONL file, one ``{"lang": "fr", "prompt": "..."}`` per line. Rows are built as
for the perplexity matrix: ``none``, each mask language, then random controls. Every row generates a
continuation of every prompt, greedy or sampled (seeded per prompt, the same seeds in every row).
Per row and prompt language the table gives:

| column | meaning |
| --- | --- |
| ``prompts`` | prompts of that language |
| ``in_prompt_lang`` | share of outputs whose detected language is the prompt's |
| ``lang:{xx}`` | share of outputs detected as ``xx`` (``lang:?`` when the detector abstains, e.g. empty output) |
| ``length`` | mean output length in tokens |
| ``stopwords`` | share of output words that are stop words of the prompt language (stopwordsiso) |
| ``prompt_overlap`` | share of output words that also occur in the prompt |

Language identification is lingua (``lingua-language-detector``), offline, restricted to the
languages of the prompts and the mask when lingua knows them all (all of lingua's languages
otherwise). Words are whitespace-separated tokens of letters, and characters for Chinese and Japanese.

A prompt is encoded as the references encode theirs: with the BOS the tokenizer's special-token
processing prepends (none for a tokenizer that adds none), and nothing appended.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harvester import fs
from harvester.corpus import json_value, text_lines
from harvester.errors import HarvestError
from harvester.names import check_name
from jobs.interventions import Mode, empty_rows, intervene
from jobs.rows import Job, ModelWorker, Row, intervention_for, make_plan, run_rows
from jobs.options import GenerateOptions

_CHARACTER_WORDS = {"zh", "ja"}
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Prompt:
    lang: str
    text: str


@dataclass(kw_only=True)
class GenerateJob(Job):
    prompts: str
    max_new_tokens: int = GenerateOptions.max_new_tokens
    sample: bool = GenerateOptions.sample
    temperature: float = GenerateOptions.temperature
    top_p: float = GenerateOptions.top_p


def read_prompts(path: str) -> list[Prompt]:
    """``{"lang", "prompt"}`` per line; a malformed line is an error naming ``FILE:LINE``."""
    if not Path(path).is_file():
        raise HarvestError(f"prompts file not found: {path}")
    prompts = []
    for n, line in text_lines(Path(path)):
        if not line.strip():
            continue
        item = json_value(line, f"{path}:{n}")
        if not isinstance(item, dict) or not isinstance(item.get("lang"), str) or not isinstance(item.get("prompt"), str):
            raise HarvestError(f"{path}:{n}: each line needs string fields 'lang' and 'prompt'")
        if not item["prompt"].strip():
            raise HarvestError(f"{path}:{n}: empty prompt")
        try:
            check_name(item["lang"], "prompt language")
        except HarvestError as err:
            raise HarvestError(f"{path}:{n}: {err}") from None
        prompts.append(Prompt(item["lang"], item["prompt"]))
    if not prompts:
        raise HarvestError(f"prompts file {path} has no prompts")
    return prompts


def words(text: str, lang: str) -> list[str]:
    found = _WORD.findall(text.lower())
    if lang in _CHARACTER_WORDS:
        return [c for w in found for c in w]
    return found


class Detector:
    """lingua restricted to ``langs`` when it knows every one of them (ISO 639-1 codes)."""

    def __init__(self, langs: list[str]):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        codes = [getattr(IsoCode639_1, lang.upper(), None) for lang in sorted(set(langs))]
        if len(codes) >= 2 and all(codes):
            self.detector = LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()
        else:
            self.detector = LanguageDetectorBuilder.from_all_languages().build()

    def __call__(self, text: str) -> str:
        if not text.strip():
            return "?"
        found = self.detector.detect_language_of(text)
        return found.iso_code_639_1.name.lower() if found is not None else "?"


def stopword_set(lang: str) -> frozenset[str]:
    import stopwordsiso

    return frozenset(stopwordsiso.stopwords(lang)) if stopwordsiso.has_lang(lang) else frozenset()


class GenerateWorker(ModelWorker):
    """Generates a row's continuations."""

    def __init__(self, model: str, dtype: str, device: str, site: str, unit: str = "mlp", threads: int | None = None):
        from harvester.backends.hf import load_tokenizer

        from harvester.windows import bos_prefix

        super().__init__(model, dtype, device, site, unit, threads)
        self.tokenizer = load_tokenizer(self.backend.path)
        self.bos = bos_prefix(self.tokenizer)  # a prompt starts as the tokenizer starts a text (its BOS, if any)

    def row(self, row: Row, mode: Mode, width: int, values, settings: dict, prompts: list[Prompt]) -> list[dict]:
        """Each prompt's continuation: ``{"text", "tokens"}`` in prompt order."""
        import torch

        b, tok = self.backend, self.tokenizer
        out = []
        with torch.inference_mode(), intervene(b.model, b.site, intervention_for(row, mode, width, values), b.inputs):
            for k, prompt in enumerate(prompts):
                text_ids = tok(prompt.text, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([self.bos + text_ids], device=b.device)
                kwargs = dict(max_new_tokens=settings["max_new_tokens"], pad_token_id=b.pad_id,
                              eos_token_id=tok.eos_token_id)
                if settings["sample"]:
                    torch.manual_seed(settings["seed"] * 1_000_003 + k)  # the same draw in every row
                    kwargs.update(do_sample=True, temperature=settings["temperature"], top_p=settings["top_p"])
                else:
                    kwargs.update(do_sample=False)
                new = b.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:]
                if tok.eos_token_id is not None and (new == tok.eos_token_id).any():
                    new = new[: int((new == tok.eos_token_id).nonzero()[0, 0])]
                out.append({"text": tok.decode(new.tolist(), skip_special_tokens=True), "tokens": int(new.numel())})
        return out


def metrics(prompts: list[Prompt], outputs: list[dict], detector: Detector, languages: list[str]) -> dict:
    """Per prompt language: the table's columns (see the module docstring)."""
    table = {}
    for lang in sorted({p.lang for p in prompts}, key=[p.lang for p in prompts].index):
        pairs = [(p, o) for p, o in zip(prompts, outputs) if p.lang == lang]
        detected = [detector(o["text"]) for _, o in pairs]
        stops = stopword_set(lang)
        stop_share, overlap = [], []
        for p, o in pairs:
            ws = words(o["text"], lang)
            if ws:
                stop_share.append(sum(w in stops for w in ws) / len(ws))
                prompt_words = set(words(p.text, lang))
                overlap.append(sum(w in prompt_words for w in ws) / len(ws))
        row = {"prompts": len(pairs), "in_prompt_lang": float(np.mean([d == lang for d in detected])),
               "length": float(np.mean([o["tokens"] for _, o in pairs])),
               "stopwords": float(np.mean(stop_share)) if stop_share else 0.0,
               "prompt_overlap": float(np.mean(overlap)) if overlap else 0.0}
        for code in [*languages, *sorted(set(detected) - set(languages))]:
            row[f"lang:{code}"] = detected.count(code) / len(detected)
        table[lang] = row
    return table


def run_generate(job: GenerateJob) -> dict:
    if job.max_new_tokens <= 0:
        raise HarvestError(f"--max-new-tokens must be positive, got {job.max_new_tokens}")
    if not job.temperature > 0:
        raise HarvestError(f"--temperature must be positive, got {job.temperature}")
    if not 0 < job.top_p <= 1:
        raise HarvestError(f"--top-p must lie in (0, 1], got {job.top_p}")
    fs.output_dir(job.out, make=False)
    plan = make_plan(job.model, job.mask, job.langs, job.store, job.mode, job.controls, job.seed,
                     job.allow_other_model, job.values_from)
    mask, mode, rows = plan.mask, plan.mode, plan.rows
    prompts = read_prompts(job.prompts)
    settings = {"max_new_tokens": job.max_new_tokens, "sample": job.sample, "temperature": job.temperature,
                "top_p": job.top_p, "seed": job.seed}
    calls = [(row, mode, mask.width, plan.values.get(row.language), settings) for row in rows]
    outputs = run_rows(GenerateWorker, (job.model, job.dtype, job.device, plan.site, plan.unit), "row", calls, mask,
                       use_ray=job.use_ray, device=job.device, dtype=job.dtype, actors=job.actors, address=job.address,
                       progress=job.progress, desc="generate rows", shared=prompts)
    prompt_langs = list(dict.fromkeys(p.lang for p in prompts))
    detector = Detector(prompt_langs + list(mask.languages))
    table = {row.name: {lang: {"units": len(row.selected), **values}  # 0 units: the row repeats none
                        for lang, values in metrics(prompts, out, detector, prompt_langs).items()}
             for row, out in zip(rows, outputs)}
    result = {"settings": {"model": job.model, "mask": job.mask, "mode": str(mode), "site": plan.site,
                           "values_from": plan.values_from,
                           "controls": job.controls, **settings, "prompts": job.prompts,
                           "units": {r.name: len(r.selected) for r in rows}, "empty_mask": empty_rows(rows)},
              "table": table,
              "outputs": {row.name: [{"lang": p.lang, "prompt": p.text, **o} for p, o in zip(prompts, out)]
                          for row, out in zip(rows, outputs)}}
    write_outputs(Path(job.out), result)
    return result


def flat_table(table: dict):
    """``DataFrame`` with one row per (intervened, prompt language)."""
    import pandas as pd

    records = [{"intervened": row, "prompt_lang": lang, **values}
               for row, per_lang in table.items() for lang, values in per_lang.items()]
    return pd.DataFrame.from_records(records).fillna(0.0)


def markdown(frame) -> str:
    """A pipe table; numbers with three decimals (counts as integers)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: dict) -> None:
    fs.output_dir(out)
    frame = flat_table(result["table"])
    fs.write_text(str(out / "generate.csv"), frame.to_csv(index=False, float_format="%.4g"))  # whole or not at all
    fs.write_text(str(out / "generate.md"), markdown(frame))
    fs.write_text(str(out / "generate.json"), json.dumps(result, indent=2, ensure_ascii=False))
