"""A per-group summary of a harvest store, as a plain-text table."""

from __future__ import annotations

import numpy as np

from harvester.store import open_dataset, open_finished


def summarize(path: str) -> str:
    """Tokens, mean activation probability, share of never-active neurons, mean activation per group."""
    attrs = open_finished(path)
    ds = open_dataset(path, attrs)
    model = attrs.model
    lines = [f"{attrs.corpus.spec} on {model.id} ({model.architecture}, {model.layers} layers x {model.width} neurons)",
             f"{'group':<12}{'tokens':>10}{'P(active)':>11}{'never':>8}{'mean act':>10}"]
    tokens = ds["tokens"].values
    active = ds["active"].values
    act_sum = ds["act_sum"].values if "act_sum" in ds else None
    for g, name in enumerate(ds["group"].values):
        n = max(int(tokens[g]), 1)
        prob = active[g] / n
        mean = f"{act_sum[g].mean() / n:>10.4f}" if act_sum is not None else f"{'-':>10}"
        lines.append(f"{str(name):<12}{int(tokens[g]):>10}{prob.mean():>11.4f}{np.mean(active[g] == 0):>8.3f}{mean}")
    lines.append(f"{'total':<12}{int(tokens.sum()):>10}")
    return "\n".join(lines)
