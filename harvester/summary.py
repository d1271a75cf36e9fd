"""A per-group summary of a harvest store, as a plain-text table, and what the harvest lost per group."""

from __future__ import annotations

import sys

import numpy as np

from harvester.errors import HarvestError
from harvester.store import StoreAttrs, open_dataset, open_finished

LOSS_WARNING = 0.01
"""A group that lost more than this share of its tokens to truncation is warned about."""


def summarize(path: str) -> str:
    """Tokens, mean activation probability, share of never-active neurons, mean activation per group,
    the tokens and documents that truncation at ``--seq-len`` cut off, and the tokens ``--remainder drop``
    dropped (when the store records them)."""
    attrs = open_finished(path)
    ds = open_dataset(path, attrs)
    model = attrs.model
    cut_tokens, cut_docs = _cut(attrs)
    dropped = attrs.corpus.remainder_tokens_per_group
    width = max([12, *(len(str(g)) + 2 for g in ds["group"].values)])
    cut_head = f"{'cut tok':>9}{'cut docs':>9}" if cut_tokens is not None else ""
    cut_head += f"{'drop tok':>9}" if dropped is not None else ""
    lines = [f"{attrs.corpus.spec} on {model.id} ({model.architecture}, {model.layers} layers x {model.width} neurons)",
             f"{'group':<{width}}{'tokens':>10}{'P(active)':>11}{'never':>8}{'mean act':>10}{cut_head}"]
    tokens = ds["tokens"].values
    active = ds["active"].values
    act_sum = ds["act_sum"].values if "act_sum" in ds else None
    for g, name in enumerate(ds["group"].values):
        n = max(int(tokens[g]), 1)
        prob = active[g] / n
        mean = f"{act_sum[g].mean() / n:>10.4f}" if act_sum is not None else f"{'-':>10}"
        cut = f"{cut_tokens[g]:>9}{cut_docs[g]:>9}" if cut_tokens is not None else ""
        cut += f"{dropped[g]:>9}" if dropped is not None else ""
        lines.append(f"{str(name):<{width}}{int(tokens[g]):>10}{prob.mean():>11.4f}{np.mean(active[g] == 0):>8.3f}"
                     f"{mean}{cut}")
    total_cut = f"{sum(cut_tokens):>9}{attrs.corpus.truncated_documents or 0:>9}" if cut_tokens is not None else ""
    total_cut += f"{sum(dropped):>9}" if dropped is not None else ""
    lines.append(f"{'total':<{width}}{int(tokens.sum()):>10}{'':>29}{total_cut}")
    return "\n".join(lines + [line for line in (tokenization(attrs), boundaries(attrs), histogram(attrs)) if line])


def histogram(attrs: StoreAttrs) -> str:
    """What the histogram's bins are, when each unit has its own range (DLN); empty otherwise."""
    record = attrs.settings.hist_ranges
    if record is None or "hist" not in attrs.settings.stats:
        return ""
    return (f"histogram: per-neuron ranges from store {record.store} (DLN: [max(m - 3s, -0.4), m + {record.hi:g}s] "
            f"of its pooled mean m and standard deviation s), {record.bins} bins + underflow and overflow")


def tokenization(attrs: StoreAttrs) -> str:
    """How documents became tokens, in a line; a setting the store does not record (it predates it) is the
    value lsn used then: no BOS, EOS after every example and document, segments encoded alone, the last
    shorter window kept (those two are shown only when they differ). Empty for an import."""
    s = attrs.settings
    if s.backend is None:
        return ""
    place = s.bos_place or "none"
    bos = f"--bos {s.bos or 'none'}"
    if place != "none":
        bos += f" (ids {list(s.bos_ids or ())} per {place})"
    elif s.bos not in (None, "none"):
        bos += " (the tokenizer adds none)"
    if s.pooling not in (None, "token"):  # a pooled sample never had an EOS (stream_windows drops it)
        eos = "no EOS (pooled samples)"
    else:
        eos = "EOS after every example" if s.eos_per_example in (None, True) else "no EOS inside examples"
    packed = "".join(f", --{flag} {value}" for flag, value in (("separator", s.separator), ("remainder", s.remainder))
                     if value not in (None, "eos", "keep"))
    return f"tokens: {bos}, {eos}, --encode {s.encode or 'segments'}{packed}"


def boundaries(attrs: StoreAttrs) -> str:
    """Per group after a segment boundary (a response), the examples whose prompt, encoded alone, is not
    a prefix of the whole encoding (there the group differs from the two-pass full - prompt)."""
    corpus = attrs.corpus
    if corpus.boundaries_per_group is None or corpus.boundary_mismatches_per_group is None:
        return ""
    parts = [f"{name} {bad} of {n}" for name, n, bad in
             zip(corpus.groups, corpus.boundaries_per_group, corpus.boundary_mismatches_per_group) if n]
    if not parts:
        return ""
    return "boundary mismatches (prompt encoded alone not a prefix of the whole): " + ", ".join(parts)


def _cut(attrs: StoreAttrs) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Tokens and documents cut off per group; None when the store does not record them per group."""
    corpus = attrs.corpus
    if corpus.truncated_tokens_per_group is None or corpus.truncated_documents_per_group is None:
        return None, None
    return corpus.truncated_tokens_per_group, corpus.truncated_documents_per_group


def losses(attrs: StoreAttrs) -> tuple[list[str], list[str]]:
    """``(warnings, empty)``: a line per group that lost more than :data:`LOSS_WARNING` of its tokens
    to truncation, and a description of each group that ended with no tokens."""
    tokens = attrs.totals.tokens if attrs.totals else attrs.corpus.tokens_per_group
    if tokens is None:
        return [], []
    cut_tokens, cut_docs = _cut(attrs)
    dropped = attrs.corpus.remainder_tokens_per_group
    seq_len = attrs.settings.seq_len
    limit = _limit(attrs)
    warnings, empty = [], []
    for g, name in enumerate(attrs.corpus.groups):
        cut = cut_tokens[g] if cut_tokens is not None else 0
        drop = dropped[g] if dropped is not None else 0
        if tokens[g] == 0:
            empty.append(f"{name} (all {cut} cut off at {limit})" if cut else
                         f"{name} (all {drop} dropped by --remainder drop)" if drop else name)
        elif attrs.settings.pooling not in (None, "token") and cut:  # tokens counts samples, not tokens
            warnings.append(f"group {name}: {cut} tokens cut from {cut_docs[g]} of its {tokens[g]} samples "
                            f"longer than {limit}")
        elif cut > LOSS_WARNING * (tokens[g] + cut):
            advice = "a larger --seq-len keeps them" if limit.startswith("--seq-len") else "as --truncate asks"
            warnings.append(f"group {name} lost {cut} of its {tokens[g] + cut} tokens "
                            f"({100 * cut / (tokens[g] + cut):.1f}%) in {cut_docs[g]} documents longer than "
                            f"{limit}; {advice}")
        if tokens[g] and drop > LOSS_WARNING * (tokens[g] + drop):
            warnings.append(f"group {name} lost {drop} of its {tokens[g] + drop} tokens "
                            f"({100 * drop / (tokens[g] + drop):.1f}%) in a last window shorter than --seq-len "
                            f"{seq_len}, which --remainder drop drops")
    return warnings, empty


def _limit(attrs: StoreAttrs) -> str:
    """What cut the documents: ``--truncate N`` where it is below ``--seq-len`` (pooled documents longer
    than ``--seq-len`` are refused before the harvest, so their cuts are all ``--truncate``'s)."""
    seq_len = attrs.settings.seq_len
    truncate = (attrs.corpus.options or {}).get("truncate")
    if isinstance(truncate, int) and (truncate < seq_len or attrs.settings.pooling not in (None, "token")):
        return f"--truncate {truncate}"
    return f"--seq-len {seq_len}"


def report_losses(attrs: StoreAttrs, fail: bool = True) -> None:
    """Print :func:`losses`' warnings to stderr; with ``fail``, a group without tokens is an error
    (the store stays complete: its numbers for the other groups are exact and nothing is left to resume)."""
    warnings, empty = losses(attrs)
    for line in warnings:
        print(f"lsn: warning: {line}", file=sys.stderr)
    if not empty:
        return
    text = (f"{len(empty)} group(s) ended with no tokens: {', '.join(empty)}; the store is complete for the "
            "other groups; harvest again with a larger --seq-len and --overwrite (or a new --store)")
    if fail:
        raise HarvestError(text)
    print(f"lsn: warning: {text}", file=sys.stderr)


def batch_losses(store: str, attrs: StoreAttrs) -> tuple[list[str], list[str]]:
    """``--stats ...,batch_quantile``: ``(warnings, none)``, a line per group whose tokens partly fell
    outside its full batches (a shorter last batch of each stream is not counted), and the groups with no
    full batch at all, which have no threshold for ``--thresholds-from``."""
    if "batch_quantile" not in attrs.settings.stats:
        return [], []
    ds = open_dataset(store, attrs)
    batches = np.asarray(ds["quantile_batches"].values[:, 0, 0], dtype=np.int64)
    tokens = np.asarray(ds["tokens"].values, dtype=np.int64)
    shape = f"{attrs.settings.batch_size} x {attrs.settings.seq_len}"
    per_batch = attrs.settings.batch_size * attrs.settings.seq_len
    warnings, none = [], []
    for g, name in enumerate(attrs.corpus.groups):
        outside = int(tokens[g] - batches[g] * per_batch)
        if batches[g] == 0:
            none.append(f"{name} ({tokens[g]} tokens, no full batch of {shape})")
        elif outside > LOSS_WARNING * tokens[g]:
            warnings.append(f"group {name}: {outside} of its {tokens[g]} tokens ({100 * outside / tokens[g]:.1f}%) "
                            f"are outside its {batches[g]} full batches of {shape}, so not in its batch quantile")
    return warnings, none


def report_batches(store: str, attrs: StoreAttrs, fail: bool = True) -> None:
    """Print :func:`batch_losses`' warnings; with ``fail``, a group without a full batch is an error (the
    store stays complete; the second pass would refuse it)."""
    warnings, none = batch_losses(store, attrs)
    for line in warnings:
        print(f"lsn: warning: {line}", file=sys.stderr)
    if none:
        text = (f"{len(none)} group(s) have no full batch, so no batch quantile: {', '.join(none)}; "
                "--thresholds-from this store would refuse them; more tokens per group, or a smaller "
                "--batch-size or --seq-len")
        if fail:
            raise HarvestError(text)
        print(f"lsn: warning: {text}", file=sys.stderr)
