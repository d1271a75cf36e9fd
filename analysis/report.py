"""A mask's report: per-language and per-layer counts, language overlaps and ``appear[]`` as CSV,
two heatmaps (PNG) and a Markdown summary that links them.

Everything works on the masks' sorted flat indices ``layer * width + neuron``; nothing builds the
dense ``[K, L, I]`` array, so a report of 80 languages x 80 layers x 28672 neurons takes a second.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from analysis.masks import Mask
from harvester import fs
from harvester.errors import HarvestError

TOP_PAIRS = 10
MAX_LAYER_TABLE = 40


# -- statistics ----------------------------------------------------------------------------------
def appear_counts(mask: Mask) -> list[int]:
    """``appear[c]``, ``c = 0..K``: units ``(layer, neuron)`` in exactly ``c`` languages' masks,
    counting only units in at least one (so ``appear[0] = 0``), as docs/METHODS.md (Entropy-λ step 6)."""
    K = len(mask.languages)
    flat = np.concatenate(mask.selected) if K else np.zeros(0, np.int64)
    if not flat.size:
        return [0] * (K + 1)
    _, in_masks = np.unique(flat, return_counts=True)  # [units in some mask]: languages holding it
    appear = np.bincount(in_masks, minlength=K + 1)
    appear[0] = 0
    return [int(a) for a in appear]


def overlap(mask: Mask) -> np.ndarray:
    """``[K, K]`` int64: units selected for both languages; the diagonal is each language's own count."""
    K = len(mask.languages)
    out = np.zeros((K, K), dtype=np.int64)
    if not K:
        return out
    flat = np.concatenate(mask.selected)  # [all selections]
    owner = np.repeat(np.arange(K), [s.size for s in mask.selected])  # [all selections]: language
    member = np.zeros(mask.n_layers * mask.width, dtype=bool)  # [layer * neuron] of one language
    for j, sel in enumerate(mask.selected):
        member[sel] = True
        # column j: how many of each language's units language j also holds (exact: counts < 2**53)
        out[:, j] = np.bincount(owner, weights=member[flat], minlength=K).astype(np.int64)
        member[sel] = False
    return out


def jaccard(shared: np.ndarray) -> np.ndarray:
    """``|A ∩ B| / |A ∪ B|`` from an overlap matrix; 0 where both sets are empty."""
    own = np.diag(shared).astype(np.float64)
    union = own[:, None] + own[None, :] - shared
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, shared / np.where(union > 0, union, 1), 0.0)


def checked_appear(mask: Mask) -> list[int]:
    """``appear[]`` from the selections; a different ``extra["appear"]`` means the mask's writer is wrong."""
    appear = appear_counts(mask)
    recorded = mask.extra.get("appear")
    if recorded is not None and [int(a) for a in recorded] != appear:
        raise HarvestError(f"the mask records appear = {list(recorded)}, but its selections give {appear}")
    return appear


# -- text ----------------------------------------------------------------------------------------
def describe(mask: Mask) -> str:
    """``method (name=value, ...)`` with the parameters and the recorded thresholds, for titles."""
    items = dict(mask.params)
    items.update({k: mask.extra[k] for k in ("tau", "beta", "lambda") if k in mask.extra})
    text = ", ".join(f"{k}={_short(v)}" for k, v in items.items())
    return f"{mask.method} ({text})" if text else mask.method


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list, rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def top_pairs(mask: Mask, shared: np.ndarray, n: int = TOP_PAIRS) -> list[tuple[str, str, int, float]]:
    """The ``n`` language pairs sharing the most units by Jaccard (then by count, then mask order)."""
    jac = jaccard(shared)
    K = len(mask.languages)
    pairs = [(a, b) for a in range(K) for b in range(a + 1, K) if shared[a, b] > 0]
    pairs.sort(key=lambda p: (-jac[p], -shared[p], p))
    return [(mask.languages[a], mask.languages[b], int(shared[a, b]), float(jac[a, b])) for a, b in pairs[:n]]


# -- files ---------------------------------------------------------------------------------------
def _write_csv(path: Path, header: list, rows: list[list]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    fs.write_text(str(path), text.getvalue())  # whole or not at all, on a full disk too


def write_tables(mask: Mask, out: Path, counts: np.ndarray, shared: np.ndarray, appear: list[int]) -> None:
    langs = mask.languages
    _write_csv(out / "counts.csv", ["language", *(f"layer_{l}" for l in range(mask.n_layers)), "total"],
               [[lang, *map(int, row), int(row.sum())] for lang, row in zip(langs, counts)])
    _write_csv(out / "overlap.csv", ["language", *langs],
               [[lang, *map(int, row)] for lang, row in zip(langs, shared)])
    _write_csv(out / "overlap_jaccard.csv", ["language", *langs],
               [[lang, *(repr(float(v)) for v in row)] for lang, row in zip(langs, jaccard(shared))])
    _write_csv(out / "appear.csv", ["c", "appear"], [[c, a] for c, a in enumerate(appear)])


LABEL_PT = 8
"""Tick label size: at the PNGs' 100 dpi about 11 pixels, whatever the number of labels."""
LABEL_STEP_IN = 0.17
"""Inches per label: the plot grows with its labels (8 pt with room between them) instead of
shrinking the font."""
MAX_LABELS = 250
"""More labels than this on an axis are shown every n-th (the CSV beside the plot has them all)."""


def heatmap_figure(data: np.ndarray, rows: list[str], cols: list[str], title: str, xlabel: str, ylabel: str,
                   bar: str, diverging: bool = False):
    """One labelled heatmap as a matplotlib Figure, sized so that every label is LABEL_PT points:
    80 x 80 labels give a plot of about 16 x 16 inches. ``diverging``: a red-blue scale centred on 0."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state and no display, Agg renders PNG

    n_rows, n_cols = data.shape
    width = max(6.0, 3.5 + LABEL_STEP_IN * min(n_cols, MAX_LABELS))
    fig = Figure(figsize=(width, max(4.5, 2.5 + LABEL_STEP_IN * min(n_rows, MAX_LABELS))), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    values = np.ma.masked_invalid(data)
    if diverging:
        bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 0.0
        kw = dict(cmap=matplotlib.colormaps["RdBu_r"], vmin=-(bound or 1.0), vmax=bound or 1.0)
    else:
        kw = dict(cmap=matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey"))
    image = ax.imshow(values, aspect="auto", interpolation="nearest", **kw)
    for axis, labels, count in ((ax.xaxis, cols, n_cols), (ax.yaxis, rows, n_rows)):
        step = max(1, math.ceil(count / MAX_LABELS))
        axis.set_ticks(range(0, count, step), [labels[i] for i in range(0, count, step)], fontsize=LABEL_PT)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(_wrap(title, int(width * 11))), fontsize=9)
    fig.colorbar(image, ax=ax, label=bar, shrink=0.8)
    return fig


def heatmap(path: Path, *args, **kw) -> None:
    """Write :func:`heatmap_figure` as a PNG; it plots what the CSV of its name holds."""
    with fs.atomic_write(str(path)) as f:  # whole or not at all, on a full disk too
        heatmap_figure(*args, **kw).savefig(f, format="png", backend="agg")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def write_plots(mask: Mask, out: Path, counts: np.ndarray, shared: np.ndarray) -> list[str]:
    """``counts.png`` and, for two languages or more, ``overlap_jaccard.png``: each plots the CSV of its
    name. Returns the names written."""
    what = describe(mask)
    layers = [str(l) for l in range(mask.n_layers)]
    heatmap(out / "counts.png", counts.astype(float), mask.languages, layers,
            f"Selected neurons per layer: {what}", "layer", "language", "selected neurons")
    if len(mask.languages) < 2:
        print(f"lsn: one language ({mask.languages[0]}): no overlap plot", file=sys.stderr)
        return ["counts.png"]
    jac = jaccard(shared)
    np.fill_diagonal(jac, np.nan)  # the diagonal (1) would flatten the colour scale of the pairs
    heatmap(out / "overlap_jaccard.png", jac, mask.languages, mask.languages,
            f"Language overlap (Jaccard, diagonal omitted): {what}", "language", "language", "Jaccard")
    return ["counts.png", "overlap_jaccard.png"]


def markdown(mask: Mask, title: str, counts: np.ndarray, shared: np.ndarray, appear: list[int],
             plots: list[str]) -> str:
    units = mask.n_layers * mask.width
    lines = [f"# {title}", "", f"- method: `{mask.method}`", f"- parameters: {_short(mask.params)}"]
    lines += [f"- {k}: {_short(mask.extra[k])}" for k in ("tau", "beta", "lambda") if k in mask.extra]
    src = mask.source
    lines += [f"- source store: {src.get('store') or src.get('file') or 'not recorded'}"]
    lines += [f"- source {k}: {_short(src[k])}" for k in src if k not in ("store", "file")]
    lines += [f"- model: {mask.n_layers} layers x {mask.width} neurons = {units} units (L·I)",
              f"- languages ({len(mask.languages)}): {', '.join(mask.languages)}",
              f"- units in at least one language: {sum(appear)}", "", "## Neurons per language", ""]
    lines += _table(["language", "neurons", "share of L·I"],
                    [[lang, int(row.sum()), f"{100 * row.sum() / units:.4f}%"]
                     for lang, row in zip(mask.languages, counts)])
    lines += ["", "## Neurons per layer", ""]
    if mask.n_layers <= MAX_LAYER_TABLE:
        lines += _table(["language", *range(mask.n_layers)],
                        [[lang, *map(int, row)] for lang, row in zip(mask.languages, counts)])
    else:
        lines += [f"{mask.n_layers} layers are too many for a table: see [counts.csv](counts.csv) "
                  "and [counts.png](counts.png)."]
    lines += ["", "## Units by number of languages (appear[c])", ""]
    lines += _table(["c", "appear"], [[c, a] for c, a in enumerate(appear)])
    lines += ["", f"## Top overlapping language pairs (by Jaccard, up to {TOP_PAIRS})", ""]
    pairs = top_pairs(mask, shared)
    lines += _table(["language", "language", "shared", "Jaccard"], [[a, b, n, f"{j:.4f}"] for a, b, n, j in pairs]) \
        if pairs else ["No two languages share a unit."]
    lines += ["", "## Files", "", "![neurons per layer](counts.png)", ""]
    lines += ["![language overlap](overlap_jaccard.png)", ""] if "overlap_jaccard.png" in plots else \
        ["One language: no overlap plot.", ""]
    lines += [f"- [{name}]({name})" for name in ("counts.csv", "overlap.csv", "overlap_jaccard.csv", "appear.csv",
                                                 *plots)]
    return "\n".join(lines) + "\n"


# -- bootstrap stability ---------------------------------------------------------------------------
PANEL_IN = (3.2, 2.4)
"""Inches per language panel of the stability plots (small multiples, up to 6 per row)."""


def frequency_table(mask: Mask) -> np.ndarray:
    """``[K, N]`` int64: per language, how many units were selected in exactly ``c = 1 .. N`` resamples."""
    boot = mask.bootstrap
    return np.stack([np.bincount(t, minlength=boot.resamples + 1)[1:] for t in boot.times])


def stable_counts(mask: Mask) -> np.ndarray:
    """``[K, L]`` units of the stable mask per language and layer (as :meth:`Mask.counts` for the full one)."""
    return np.stack([np.bincount(s // mask.width, minlength=mask.n_layers) for s in mask.bootstrap.stable_selected()])


def _panels(path: Path, languages: list[str], title: str, draw) -> None:
    """One small plot per language (``draw(ax, k)``), up to 6 in a row, written as a PNG."""
    from matplotlib.figure import Figure

    K = len(languages)
    cols = min(K, 6)
    rows = math.ceil(K / cols)
    fig = Figure(figsize=(PANEL_IN[0] * cols, PANEL_IN[1] * rows + 0.6), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        if k >= K:
            ax.set_axis_off()
            continue
        draw(ax, k)
        ax.set_title(languages[k], fontsize=9)
        ax.tick_params(labelsize=LABEL_PT)
    fig.suptitle("\n".join(_wrap(title, int(PANEL_IN[0] * cols * 11))), fontsize=9)
    with fs.atomic_write(str(path)) as f:
        fig.savefig(f, format="png", backend="agg")


def write_stability(mask: Mask, out: Path, counts: np.ndarray) -> list[str]:
    """The bootstrap's CSVs and PNGs: selection frequencies, stable against full counts per layer, Jaccards."""
    from matplotlib.ticker import MaxNLocator

    boot, langs = mask.bootstrap, mask.languages
    freq, stable, band = frequency_table(mask), stable_counts(mask), boot.band()
    _write_csv(out / "stability.csv", ["language", "full", "stable", "stable_in_full", "jaccard_mean", "jaccard_p5",
                                       "jaccard_p95"],
               [[lang, full.size, st.size, np.intersect1d(full, st).size, *(repr(float(v)) for v in b)]
                for lang, full, st, b in zip(langs, mask.selected, boot.stable_selected(), band)])
    _write_csv(out / "stability_frequency.csv", ["language", *(f"in_{c}" for c in range(1, boot.resamples + 1))],
               [[lang, *map(int, row)] for lang, row in zip(langs, freq)])
    _write_csv(out / "stability_layers.csv", ["language", "mask", *(f"layer_{l}" for l in range(mask.n_layers))],
               [[lang, kind, *map(int, row)] for lang, f, st in zip(langs, counts, stable)
                for kind, row in (("full", f), ("stable", st))])
    _write_csv(out / "stability_jaccard.csv", ["resample", *langs],
               [[b, *(repr(float(v)) for v in row)] for b, row in enumerate(boot.jaccard)])
    share = np.arange(1, boot.resamples + 1) / boot.resamples

    def frequency(ax, k):
        ax.bar(share, freq[k], width=1 / boot.resamples, color="tab:blue")
        ax.axvline((boot.need - 0.5) / boot.resamples, color="tab:red", linestyle="--", linewidth=1)  # bars right:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # stable
        ax.set_xlim(0, 1 + 0.5 / boot.resamples)
        ax.set_xlabel("share of resamples selecting it", fontsize=LABEL_PT)
        ax.set_ylabel("neurons", fontsize=LABEL_PT)

    def layers(ax, k):
        marker = "o" if mask.n_layers <= MAX_LAYER_TABLE else None
        ax.plot(range(mask.n_layers), counts[k], label="full", color="tab:blue", marker=marker)
        ax.plot(range(mask.n_layers), stable[k], label="stable", color="tab:orange", marker=marker)
        ax.set_ylim(bottom=0, top=max(1, int(counts[k].max()), int(stable[k].max())) * 1.1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer", fontsize=LABEL_PT)
        ax.set_ylabel("neurons", fontsize=LABEL_PT)
        ax.legend(fontsize=LABEL_PT)

    what = f"{describe(mask)}; {boot.resamples} bootstrap resamples (seed {boot.seed})"
    _panels(out / "stability_frequency.png", langs, f"Selection frequency (right of the dashed line: stable, in at least {boot.need}): "
            f"{what}", frequency)
    _panels(out / "stability_layers.png", langs, f"Neurons per layer, full-data and stable mask: {what}", layers)
    return ["stability_frequency.png", "stability_layers.png"]


def stability_markdown(mask: Mask) -> list[str]:
    boot = mask.bootstrap
    lines = ["", "## Bootstrap stability", "",
             f"{boot.resamples} resamples of the store's shards (seed {boot.seed}; {boot.meta()['draw']}). "
             f"Stable: selected in at least {boot.need} of {boot.resamples} resamples (`--stable {boot.stable:g}`). "
             "Jaccard: each resample's mask against the full-data mask (this mask's selection), per language. "
             f"Shards drawn from, per store group: {_short(boot.shards)}.", ""]
    lines += _table(["language", "full", "stable", "stable in full", "Jaccard mean", "Jaccard 5%", "Jaccard 95%"],
                    [[lang, full.size, st.size, np.intersect1d(full, st).size, f"{m:.4f}", f"{lo:.4f}", f"{hi:.4f}"]
                     for lang, full, st, (m, lo, hi) in zip(mask.languages, mask.selected, boot.stable_selected(),
                                                            boot.band())])
    lines += ["", "![selection frequency](stability_frequency.png)", "",
              "![stable and full neurons per layer](stability_layers.png)", ""]
    lines += [f"- [{name}]({name})" for name in ("stability.csv", "stability_frequency.csv", "stability_layers.csv",
                                                 "stability_jaccard.csv")]
    return lines


def write_report(mask: Mask, out: str | Path, title: str | None = None) -> Path:
    """Write the CSVs, the PNGs (no overlap plot for one language) and ``report.md`` into directory ``out``; returns ``report.md``."""
    if not mask.languages:
        raise HarvestError("the mask has no languages; there is nothing to report")
    out = fs.output_dir(out)
    appear = checked_appear(mask)
    counts = mask.counts()  # [language, layer]
    shared = overlap(mask)  # [language, language]
    write_tables(mask, out, counts, shared, appear)
    plots = write_plots(mask, out, counts, shared)
    text = markdown(mask, title or f"Mask report: {mask.method}", counts, shared, appear, plots)
    if mask.bootstrap is not None:
        write_stability(mask, out, counts)
        text += "\n".join(stability_markdown(mask)) + "\n"
    path = out / "report.md"
    fs.write_text(str(path), text)
    return path
