"""Perplexity matrices: each language's neurons intervened, every language evaluated.

Rows (intervened): ``none`` (no intervention), then one row per mask language, then random controls
``random:{lang}``: the same number of units per layer as that language's mask, drawn from the other
units of the layer (:func:`analysis.methods.random_control`, seeded). With ``--controls N > 1`` they
are ``random:{lang}:{k}``. Columns (evaluated): the evaluation corpus' groups.

Perplexity is the exponential of the mean next-token negative log-likelihood over a column's tokens.
The evaluation corpus is tokenized and windowed exactly as a harvest does it, and a token belongs to
the group of the token it predicts. ``PPXC`` (``ppl_change.csv``) is the PPL with the intervention
minus the PPL without. ``ppl_relative.csv`` is that change divided by the PPL without, and
``ppl_relative.png`` its heatmap.

Rows run in parallel on Ray actors that each load the model once (or in this process with
``--no-ray``); each row is an independent job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harvester import fs
from harvester.errors import HarvestError
from jobs.interventions import Intervention, Mode, empty_rows, intervene
from jobs.rows import Job, ModelWorker, Row, intervention_for, make_plan, run_rows
from jobs.options import PPLOptions


@dataclass(kw_only=True)
class PPLJob(Job):
    corpus: list[str]
    seq_len: int = PPLOptions.seq_len
    batch_size: int = PPLOptions.batch_size
    max_tokens_per_lang: int | None = PPLOptions.max_tokens_per_lang


def eval_windows(model: str, corpus: list[str], seq_len: int, max_tokens_per_lang: int | None):
    """``(groups, windows)`` of the evaluation corpus, windowed as a harvest windows it."""
    from harvester.backends.hf import load_tokenizer, resolve_model
    from harvester.corpus import CorpusOptions, parse_corpora
    from harvester.windows import TokenSettings, Window, _Truncation, stream_windows

    tokenizer = load_tokenizer(resolve_model(model))
    if tokenizer.eos_token_id is None:  # as the harvest refuses it: -1 would enter the windows as a token id
        raise HarvestError("the tokenizer has no EOS token; documents cannot be separated")
    corpora = parse_corpora(corpus, CorpusOptions(max_tokens_per_lang=max_tokens_per_lang))
    settings = TokenSettings(seq_len, 1, "token", "", tokenizer.eos_token_id)
    windows = [Window(ids, groups) for s in range(len(corpora.streams))
               for ids, groups in stream_windows(corpora, s, tokenizer, settings, _Truncation())]
    if not windows:
        raise HarvestError(f"the evaluation corpus {' '.join(corpus)} has no text")
    return list(corpora.groups), windows


class RowWorker(ModelWorker):
    """Evaluates perplexity rows."""

    def nll(self, windows, n_groups: int, batch_size: int, intervention: Intervention | None):
        """Per evaluated group: (sum of next-token NLL, number of predicted tokens)."""
        b = self.backend
        with intervene(b.model, b.site, intervention):
            return group_nll(b.model, windows, n_groups, batch_size, b.pad_id)

    def row(self, row: Row, mode: Mode, width: int, values, n_groups: int, batch_size: int, windows):
        return self.nll(windows, n_groups, batch_size, intervention_for(row, mode, width, values))


def group_nll(model, windows, n_groups: int, batch_size: int, pad_id: int):
    """Per group: (sum of next-token NLL, number of predicted tokens); a token counts for the group of
    the token it predicts."""
    import torch

    from harvester.windows import batches

    device = next(model.parameters()).device
    total = np.zeros(n_groups, dtype=np.float64)
    count = np.zeros(n_groups, dtype=np.int64)
    with torch.inference_mode():
        for ids, mask, groups in batches(windows, batch_size, pad_id):
            ids_t = torch.from_numpy(ids).to(device)
            attention = None if mask.all() else torch.from_numpy(mask).to(device)
            logits = model(input_ids=ids_t, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids_t[:, 1:], reduction="none")
            target = torch.from_numpy(groups[:, 1:]).to(device)
            keep = target >= 0
            total += torch.bincount(target[keep], weights=nll[keep].double(), minlength=n_groups).cpu().numpy()
            count += torch.bincount(target[keep], minlength=n_groups).cpu().numpy()
    return total, count


def run_ppl(job: PPLJob) -> dict:
    """Compute and write the matrix; returns the settings and the matrices."""
    fs.output_dir(job.out, make=False)
    plan = make_plan(job.model, job.mask, job.langs, job.store, job.mode, job.controls, job.seed,
                     job.allow_other_model, job.values_from)
    mask, mode, rows = plan.mask, plan.mode, plan.rows
    groups, windows = eval_windows(job.model, job.corpus, job.seq_len, job.max_tokens_per_lang)
    columns = [g for g in groups if job.langs is None or g in job.langs] or groups
    calls = [(row, mode, mask.width, plan.values.get(row.language), len(groups), job.batch_size) for row in rows]
    results = run_rows(RowWorker, (job.model, job.dtype, job.device, plan.site), "row", calls, mask, use_ray=job.use_ray,
                       device=job.device, dtype=job.dtype, actors=job.actors, address=job.address, progress=job.progress,
                       desc="ppl rows", shared=windows)
    base_nll, base_n = results[0]
    if (base_n == 0).any():
        empty = [g for g, n in zip(groups, base_n) if n == 0]
        raise HarvestError(f"the evaluation corpus has no predicted tokens for {', '.join(empty)}")
    ppl = np.stack([np.exp(nll / n) for nll, n in results])
    col = [groups.index(c) for c in columns]
    ppl = ppl[:, col]
    settings = {"model": job.model, "mask": job.mask, "mask_method": mask.method, "mode": str(mode),
                "site": plan.site, "store": plan.store, "values_from": plan.values_from, "corpus": job.corpus, "controls": job.controls, "seed": job.seed,
                "seq_len": job.seq_len, "batch_size": job.batch_size, "dtype": job.dtype,
                "units": {r.name: len(r.selected) for r in rows}, "empty_mask": empty_rows(rows), "tokens": {g: int(base_n[groups.index(g)]) for g in columns}}
    write_outputs(Path(job.out), [r.name for r in rows], columns, ppl, settings)
    return {"rows": [r.name for r in rows], "columns": columns, "ppl": ppl, "settings": settings}


OUTPUTS = ("ppl.csv", "ppl_change.csv", "ppl_relative.csv", "ppl_relative.png", "ppl.json")
"""What :func:`write_outputs` writes; a PNG holds what the CSV of the same name holds."""


def write_outputs(out: Path, rows: list[str], columns: list[str], ppl: np.ndarray, settings: dict) -> None:
    import pandas as pd

    fs.output_dir(out)
    table = pd.DataFrame(ppl, index=pd.Index(rows, name="intervened"), columns=columns)
    change = table - table.loc["none"]
    relative = change / table.loc["none"]
    for name, frame in (("ppl", table), ("ppl_change", change), ("ppl_relative", relative)):
        fs.write_text(str(out / f"{name}.csv"), frame.to_csv(float_format="%.10g"))  # whole or not at all
    fs.write_text(str(out / "ppl.json"), json.dumps({"settings": settings, "ppl": table.to_dict(orient="index")},
                                                    indent=2))
    plot_relative(relative, out / "ppl_relative.png", settings["mode"])


def plot_relative(relative, path: Path, mode: str) -> None:
    """The heatmap of ``ppl_relative.csv`` (a DataFrame, rows x evaluated columns)."""
    from analysis.report import heatmap

    heatmap(path, relative.values, list(map(str, relative.index)), list(map(str, relative.columns)),
            f"Relative PPL change, (PPL - PPL none) / PPL none, mode {mode}", "evaluated language",
            "intervened neurons", "(PPL - PPL none) / PPL none", diverging=True)


def summary(result: dict) -> str:
    """The table printed on stdout: the PPL without intervention, then each row's relative change in %
    (``ppl_relative.csv`` x 100), columns aligned whatever the names' lengths."""
    import pandas as pd

    ppl, columns = result["ppl"], pd.Index(result["columns"], name="intervened \\ evaluated")
    base = pd.DataFrame(ppl[:1], index=["none (PPL)"], columns=columns).map(lambda v: f"{v:.4g}")
    empty = set(result["settings"].get("empty_mask", []))
    rows = [f"{name} (empty mask)" if name in empty else name for name in result["rows"][1:]]
    change = pd.DataFrame(100 * (ppl[1:] / ppl[0] - 1), index=rows, columns=columns)
    text = pd.concat([base, change.map(lambda v: f"{v:+.2f}%")]).to_string()
    mode = result["settings"]["mode"]
    return (f"PPL without intervention (none), then the relative PPL change with each row's units intervened "
            f"(mode {mode}): (PPL - PPL none) / PPL none in % (ppl_relative.csv x 100)\n{text}")
