"""Perplexity matrices: each language's neurons intervened, every language evaluated.

Rows (intervened): ``none`` (no intervention), then one row per mask language, then random controls
``random:{lang}``: the same number of units per layer as that language's mask, drawn from the other
units of the layer (:func:`analysis.methods.random_control`, seeded). With ``--controls N > 1`` they
are ``random:{lang}:{k}``. Columns (evaluated): the evaluation corpus' groups.

Perplexity is the exponential of the mean next-token negative log-likelihood over a column's tokens.
The evaluation corpus is tokenized and windowed exactly as a harvest does it, and a token belongs to
the group of the token it predicts. ``PPXC`` (``ppl_change.csv``) is the PPL with the intervention
minus the PPL without. ``ppl_relative.csv`` is that change divided by the PPL without.

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
from jobs.interventions import Intervention, Mode, intervene
from jobs.rows import Job, ModelWorker, Row, intervention_for, make_plan, run_rows


@dataclass(kw_only=True)
class PPLJob(Job):
    corpus: list[str]
    seq_len: int = 256
    batch_size: int = 8
    max_tokens_per_lang: int | None = None


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
                     job.allow_other_model)
    mask, mode, rows = plan.mask, plan.mode, plan.rows
    groups, windows = eval_windows(job.model, job.corpus, job.seq_len, job.max_tokens_per_lang)
    columns = [g for g in groups if job.langs is None or g in job.langs] or groups
    calls = [(row, mode, mask.width, plan.values.get(row.language), len(groups), job.batch_size) for row in rows]
    results = run_rows(RowWorker, (job.model, job.dtype, job.device, plan.site), "row", calls, mask, use_ray=job.use_ray,
                       device=job.device, actors=job.actors, address=job.address, progress=job.progress,
                       desc="ppl rows", shared=windows)
    base_nll, base_n = results[0]
    if (base_n == 0).any():
        empty = [g for g, n in zip(groups, base_n) if n == 0]
        raise HarvestError(f"the evaluation corpus has no predicted tokens for {', '.join(empty)}")
    ppl = np.stack([np.exp(nll / n) for nll, n in results])
    col = [groups.index(c) for c in columns]
    ppl = ppl[:, col]
    settings = {"model": job.model, "mask": job.mask, "mask_method": mask.method, "mode": str(mode),
                "site": plan.site, "store": plan.store, "corpus": job.corpus, "controls": job.controls, "seed": job.seed,
                "seq_len": job.seq_len, "batch_size": job.batch_size, "dtype": job.dtype,
                "units": {r.name: len(r.selected) for r in rows}, "tokens": {g: int(base_n[groups.index(g)]) for g in columns}}
    write_outputs(Path(job.out), [r.name for r in rows], columns, ppl, settings)
    return {"rows": [r.name for r in rows], "columns": columns, "ppl": ppl, "settings": settings}


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
    heatmap(relative, out / "ppl_change.png", f"relative PPL change, mode {settings['mode']}")


def heatmap(relative, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = relative.values
    fig, ax = plt.subplots(figsize=(0.6 * len(relative.columns) + 3, 0.35 * len(relative.index) + 2))
    bound = np.nanmax(np.abs(data)) or 1.0
    im = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(relative.columns)), relative.columns, rotation=90)
    ax.set_yticks(range(len(relative.index)), relative.index)
    ax.set_xlabel("evaluated language")
    ax.set_ylabel("intervened neurons")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="(PPL - PPL none) / PPL none")
    fig.tight_layout()
    with fs.atomic_write(str(path)) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def summary(result: dict) -> str:
    """The relative change as a text table, rows x columns."""
    ppl = result["ppl"]
    rel = ppl / ppl[0] - 1
    cols = result["columns"]
    lines = ["intervened      " + " ".join(f"{c:>8s}" for c in cols)]
    for name, r in zip(result["rows"], rel):
        lines.append(f"{name:15s} " + " ".join(f"{v:+8.3f}" for v in r))
    return "\n".join(lines)

