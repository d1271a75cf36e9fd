"""Perplexity matrices: each language's neurons intervened, every language evaluated.

Rows (intervened): ``none`` (no intervention), then one row per mask language, then random controls
``random:{lang}``: the same number of units per layer as that language's mask, drawn from the other
units of the layer (:func:`analysis.methods.random_control`, seeded). With ``--controls N > 1`` they
are ``random:{lang}:{k}``. Columns (evaluated): the evaluation corpus' groups.

The evaluation corpus is tokenized and windowed exactly as a harvest does it, and a token belongs to
the group of the token it predicts. A column's next-token NLLs become one number as ``--aggregate``
says (:data:`AGGREGATES`):

- ``tokens`` (the default): PPL = exp of their mean over all the column's predicted tokens.
- ``window-nll``, as LAPE's code (RUCAIBox ``ppl.py``): running text is cut into consecutive,
  non-overlapping windows of ``--seq-len`` tokens (theirs: the model's 4096), a shorter remainder is
  dropped, and the value is the mean over windows of each window's mean NLL, without exp. A window's
  first token is context only; no BOS is added.
- ``per-prompt``, as the alignment study's code (NJUNLP ``ppl.py``): each example (an ``instruct:``
  prompt) is its own window, preceded by what the tokenizer puts before a text (BOS for Llama or
  Mistral) and cut at ``--seq-len`` tokens; PPL = exp of the mean over examples of each example's mean
  NLL. An example with no predicted token of a column is left out of that column.

``PPXC`` (``ppl_change.csv``) is the value with the intervention minus the value without.
``ppl_relative.csv`` is that change divided by the value without, and ``ppl_relative.png`` its heatmap.
Every output names the quantity and the aggregate.

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

AGGREGATES = {
    "tokens": ("PPL", "tokens", "exp of the mean NLL over a column's predicted tokens"),
    "window-nll": ("NLL", "windows", "mean over full --seq-len windows of each window's mean NLL, LAPE's code"),
    "per-prompt": ("PPL", "prompts", "exp of the mean over examples of each example's mean NLL, the alignment "
                   "study's code"),
}
"""Per ``--aggregate``: the quantity, what its mean runs over, and its definition (printed and plotted)."""


@dataclass(kw_only=True)
class PPLJob(Job):
    corpus: list[str]
    seq_len: int = PPLOptions.seq_len
    batch_size: int = PPLOptions.batch_size
    max_tokens_per_lang: int | None = PPLOptions.max_tokens_per_lang
    aggregate: str = PPLOptions.aggregate


def eval_windows(model: str, corpus: list[str], seq_len: int, max_tokens_per_lang: int | None,
                 aggregate: str = "tokens"):
    """``(groups, windows)`` of the evaluation corpus, windowed as a harvest with its default tokenization
    windows it (:func:`eval_settings`), then as ``aggregate`` needs (:func:`for_aggregate`)."""
    from harvester.backends.hf import load_config, load_tokenizer, max_positions, resolve_model
    from harvester.corpus import CorpusOptions, parse_corpora
    from harvester.windows import Window, _Truncation, bos_prefix, stream_windows

    path = resolve_model(model)
    config = load_config(path)
    max_positions(config, seq_len)  # a window beyond the model's positions is an IndexError in its forward
    tokenizer = load_tokenizer(path, config)
    corpora = parse_corpora(corpus, CorpusOptions(max_tokens_per_lang=max_tokens_per_lang))
    check_corpus(corpora, aggregate)
    settings = eval_settings(tokenizer, seq_len, aggregate)
    windows = [Window(ids, groups) for s in range(len(corpora.streams))
               for ids, groups in stream_windows(corpora, s, tokenizer, settings, _Truncation())]
    if not windows:
        raise HarvestError(f"the evaluation corpus {' '.join(corpus)} has no text")
    windows = for_aggregate(windows, aggregate, seq_len, bos_prefix(tokenizer) if aggregate == "per-prompt" else [])
    if not windows:
        raise HarvestError(f"the evaluation corpus {' '.join(corpus)} has no full --seq-len {seq_len} window, and "
                           "--aggregate window-nll drops shorter ones; lower --seq-len")
    return list(corpora.groups), windows


def check_corpus(corpora, aggregate: str) -> None:
    """Refuse a corpus ``aggregate`` does not apply to: window-nll cuts running text (``pack`` streams) into
    windows; per-prompt averages over examples (``sequence`` streams: one window per example)."""
    if aggregate not in AGGREGATES:
        raise HarvestError(f"--aggregate must be one of {', '.join(AGGREGATES)}, not '{aggregate}'")
    for part in corpora.parts:
        packings = {s.packing for s in part.streams}
        if aggregate == "window-nll" and "sequence" in packings:
            raise HarvestError(f"--aggregate window-nll cuts running text into --seq-len windows, but '{part.spec}' "
                               "is a corpus of separate examples; use --aggregate per-prompt or tokens")
        if aggregate == "per-prompt" and "pack" in packings:
            raise HarvestError(f"--aggregate per-prompt averages over examples, but '{part.spec}' is running text; "
                               "evaluate a corpus of examples (instruct:FILE.jsonl), or use window-nll or tokens")


def for_aggregate(windows: list, aggregate: str, seq_len: int, prefix: list[int]) -> list:
    """window-nll: only full ``seq_len`` windows (the remainder dropped, as LAPE's code drops it);
    per-prompt: ``prefix`` (context, of no group) before each example, cut at ``seq_len`` tokens."""
    from harvester.windows import Window

    if aggregate == "window-nll":
        return [w for w in windows if len(w.ids) == seq_len]
    if aggregate == "per-prompt" and prefix:
        head, none = np.asarray(prefix, dtype=np.int32), np.full(len(prefix), -1, dtype=np.int16)
        return [Window(np.concatenate([head, w.ids])[:seq_len], np.concatenate([none, w.groups])[:seq_len])
                for w in windows]
    return windows


def eval_settings(tokenizer, seq_len: int, aggregate: str):
    """The evaluation windows' tokenization: a harvest's defaults (``--bos auto``, no EOS inside an example,
    ``--encode whole``). ``window-nll`` (LAPE's ``ppl.py``) puts nothing between documents, as its
    concatenated ids; ``per-prompt`` leaves the BOS to :func:`for_aggregate`, which puts it before each
    example as context."""
    from harvester.windows import TokenSettings, resolve_bos

    if tokenizer.eos_token_id is None and aggregate == "tokens":  # -1 would enter the windows as a token id
        raise HarvestError("the tokenizer has no EOS token; documents cannot be separated")
    place, bos_ids = resolve_bos(tokenizer, "none" if aggregate == "per-prompt" else "auto")
    encode = "whole" if getattr(tokenizer, "is_fast", False) else "segments"
    return TokenSettings(seq_len, 1, "token", "", tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                         else -1, bos=place, bos_ids=bos_ids, eos_per_example=False, encode=encode,
                         separator="none" if aggregate == "window-nll" else "eos")


class RowWorker(ModelWorker):
    """Evaluates perplexity rows."""

    def nll(self, windows, n_groups: int, batch_size: int, intervention: Intervention | None,
            per_window: bool = False):
        """Per evaluated group (and window, ``per_window``): (sum of next-token NLL, predicted tokens)."""
        b = self.backend
        with intervene(b.model, b.site, intervention, b.inputs):
            return (window_nll if per_window else group_nll)(b.model, windows, n_groups, batch_size, b.pad_id)

    def row(self, row: Row, mode: Mode, width: int, values, n_groups: int, batch_size: int, aggregate: str, windows):
        return self.nll(windows, n_groups, batch_size, intervention_for(row, mode, width, values),
                        per_window=aggregate != "tokens")


def batch_nll(model, windows, batch_size: int, pad_id: int):
    """Per batch: the next-token NLL ``[B, S-1]`` and the group each predicted token counts for, that of the
    token it predicts ``[B, S-1]`` (-1: padding or context only). Run it under ``torch.inference_mode``."""
    import torch

    from harvester.windows import batches

    device = next(model.parameters()).device
    for ids, mask, groups in batches(windows, batch_size, pad_id):
        ids_t = torch.from_numpy(ids).to(device)
        attention = None if mask.all() else torch.from_numpy(mask).to(device)
        logits = model(input_ids=ids_t, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids_t[:, 1:], reduction="none")
        yield nll, torch.from_numpy(groups[:, 1:]).to(device)


def group_nll(model, windows, n_groups: int, batch_size: int, pad_id: int):
    """Per group: (sum of next-token NLL, number of predicted tokens); a token counts for the group of
    the token it predicts."""
    import torch

    total = np.zeros(n_groups, dtype=np.float64)
    count = np.zeros(n_groups, dtype=np.int64)
    with torch.inference_mode():
        for nll, target in batch_nll(model, windows, batch_size, pad_id):
            keep = target >= 0
            total += torch.bincount(target[keep], weights=nll[keep].double(), minlength=n_groups).cpu().numpy()
            count += torch.bincount(target[keep], minlength=n_groups).cpu().numpy()
    return total, count


def window_nll(model, windows, n_groups: int, batch_size: int, pad_id: int):
    """Per window and group, ``[windows, groups]``: (sum of next-token NLL, number of predicted tokens)."""
    import torch

    total = np.zeros((len(windows), n_groups), dtype=np.float64)
    count = np.zeros((len(windows), n_groups), dtype=np.int64)
    start = 0
    with torch.inference_mode():
        for nll, target in batch_nll(model, windows, batch_size, pad_id):
            n, keep = len(nll), target >= 0
            cell = (torch.arange(n, device=target.device)[:, None] * n_groups + target)[keep]  # window * G + group
            total[start:start + n] = torch.bincount(cell, weights=nll[keep].double(), minlength=n * n_groups
                                                    ).reshape(n, n_groups).cpu().numpy()
            count[start:start + n] = torch.bincount(cell, minlength=n * n_groups).reshape(n, n_groups).cpu().numpy()
            start += n
    return total, count


def reduce_nll(aggregate: str, total: np.ndarray, count: np.ndarray):
    """``(value, units)`` per group from a row's NLL sums and token counts (``[groups]`` for tokens, else
    ``[windows, groups]``); units are what the mean runs over: tokens, windows or examples. A window with no
    token of a group is not one of its units. Groups without units are refused before this is called."""
    if aggregate == "tokens":
        return np.exp(total / count), count
    has = count > 0
    mean = np.where(has, total / np.maximum(count, 1), 0.0).sum(0) / has.sum(0)  # mean of the per-window means
    return (mean if aggregate == "window-nll" else np.exp(mean)), has.sum(0)


def run_ppl(job: PPLJob) -> dict:
    """Compute and write the matrix; returns the settings and the matrices."""
    fs.output_dir(job.out, make=False)
    plan = make_plan(job.model, job.mask, job.langs, job.store, job.mode, job.controls, job.seed,
                     job.allow_other_model, job.values_from)
    mask, mode, rows = plan.mask, plan.mode, plan.rows
    groups, windows = eval_windows(job.model, job.corpus, job.seq_len, job.max_tokens_per_lang, job.aggregate)
    columns = [g for g in groups if job.langs is None or g in job.langs] or groups
    _check_columns(groups, job.aggregate, job.seq_len, windows)
    calls = [(row, mode, mask.width, plan.values.get(row.language), len(groups), job.batch_size, job.aggregate)
             for row in rows]
    results = run_rows(RowWorker, (job.model, job.dtype, job.device, plan.site, plan.unit), "row", calls, mask, use_ray=job.use_ray,
                       device=job.device, dtype=job.dtype, actors=job.actors, address=job.address, progress=job.progress,
                       desc="ppl rows", shared=windows)
    ppl = np.stack([reduce_nll(job.aggregate, nll, n)[0] for nll, n in results])
    col = [groups.index(c) for c in columns]
    ppl = ppl[:, col]
    tokens, units = results[0][1].reshape(-1, len(groups)).sum(0), reduce_nll(job.aggregate, *results[0])[1]
    over = AGGREGATES[job.aggregate][1]
    settings = {"model": job.model, "mask": job.mask, "mask_method": mask.method, "mode": str(mode),
                "site": plan.site, "store": plan.store, "values_from": plan.values_from, "corpus": job.corpus, "controls": job.controls, "seed": job.seed,
                "seq_len": job.seq_len, "batch_size": job.batch_size, "dtype": job.dtype,
                "aggregate": job.aggregate, "units": {r.name: len(r.selected) for r in rows},
                "empty_mask": empty_rows(rows),
                "tokens": {g: int(tokens[groups.index(g)]) for g in columns},
                **({over: {g: int(units[groups.index(g)]) for g in columns}} if over != "tokens" else {})}
    write_outputs(Path(job.out), [r.name for r in rows], columns, ppl, settings)
    return {"rows": [r.name for r in rows], "columns": columns, "ppl": ppl, "settings": settings}


def _check_columns(groups: list[str], aggregate: str, seq_len: int, windows) -> None:
    """Refuse, before any row runs, a group that no window predicts a token of."""
    count = np.zeros(len(groups), dtype=np.int64)
    for w in windows:
        target = w.groups[1:]
        count += np.bincount(target[target >= 0], minlength=len(groups))
    empty = [g for g, n in zip(groups, count) if n == 0]
    if empty:
        hint = ""
        if aggregate == "window-nll":
            hint = f" in a full --seq-len {seq_len} window (window-nll drops shorter ones)"
        raise HarvestError(f"the evaluation corpus has no predicted tokens for {', '.join(empty)}{hint}")


OUTPUTS = ("ppl.csv", "ppl_change.csv", "ppl_relative.csv", "ppl_relative.png", "ppl.json")
"""What :func:`write_outputs` writes; a PNG holds what the CSV of the same name holds."""


def write_outputs(out: Path, rows: list[str], columns: list[str], ppl: np.ndarray, settings: dict) -> None:
    import pandas as pd

    fs.output_dir(out)
    aggregate = settings.get("aggregate", "tokens")
    index = pd.Index(rows, name=f"intervened ({AGGREGATES[aggregate][0]}; aggregate {aggregate})")
    table = pd.DataFrame(ppl, index=index, columns=columns)
    change = table - table.loc["none"]
    relative = change / table.loc["none"]
    for name, frame in (("ppl", table), ("ppl_change", change), ("ppl_relative", relative)):
        fs.write_text(str(out / f"{name}.csv"), frame.to_csv(float_format="%.10g"))  # whole or not at all
    fs.write_text(str(out / "ppl.json"), json.dumps({"settings": settings, "ppl": table.to_dict(orient="index")},
                                                    indent=2))
    plot_relative(relative, out / "ppl_relative.png", settings["mode"], aggregate)


def plot_relative(relative, path: Path, mode: str, aggregate: str = "tokens") -> None:
    """The heatmap of ``ppl_relative.csv`` (a DataFrame, rows x evaluated columns)."""
    from analysis.report import heatmap

    q = AGGREGATES[aggregate][0]
    heatmap(path, relative.values, list(map(str, relative.index)), list(map(str, relative.columns)),
            f"Relative {q} change, ({q} - {q} none) / {q} none, mode {mode}, aggregate {aggregate}",
            "evaluated language", "intervened neurons", f"({q} - {q} none) / {q} none", diverging=True)


def summary(result: dict) -> str:
    """The table printed on stdout: the value without intervention, then each row's relative change in %
    (``ppl_relative.csv`` x 100), columns aligned whatever the names' lengths; the label names the
    quantity and the aggregate."""
    import pandas as pd

    aggregate = result["settings"].get("aggregate", "tokens")
    q, _, definition = AGGREGATES[aggregate]
    ppl, columns = result["ppl"], pd.Index(result["columns"], name="intervened \\ evaluated")
    base = pd.DataFrame(ppl[:1], index=[f"none ({q})"], columns=columns).map(lambda v: f"{v:.4g}")
    empty = set(result["settings"].get("empty_mask", []))
    rows = [f"{name} (empty mask)" if name in empty else name for name in result["rows"][1:]]
    change = pd.DataFrame(100 * (ppl[1:] / ppl[0] - 1), index=rows, columns=columns)
    text = pd.concat([base, change.map(lambda v: f"{v:+.2f}%")]).to_string()
    mode = result["settings"]["mode"]
    return (f"{q} without intervention (none), then the relative {q} change with each row's units intervened "
            f"(mode {mode}; aggregate {aggregate}: {definition}): ({q} - {q} none) / {q} none in % "
            f"(ppl_relative.csv x 100)\n{text}")
