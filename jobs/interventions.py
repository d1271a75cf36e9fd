"""Interventions on a mask's units: set them to zero, to a per-language statistic, to a value, or steer them.

The units are changed at the site the statistics were taken:
- MLP neurons: the activation module's output, ``act_fn(gate_proj(x))``. This is the value that
  multiplies ``up_proj(x)`` (gated MLPs) or feeds the output projection (non-gated MLPs).
- ``residual`` units: a transformer block's output.

Modes (``--mode``):

| mode | each selected unit becomes |
| --- | --- |
| ``zero`` | 0 (deactivation, as in LAPE) |
| ``mean`` | the language's mean activation, ``act_sum / tokens`` |
| ``mean-others`` | the unweighted mean, over the mask's other languages, of each one's mean activation (DLN's selectivity experiment) |
| ``p10``, ``p90`` | the language's 10th or 90th percentile, from the store's histogram (:func:`analysis.histogram.hist_quantile`) |
| ``value:X`` | ``X`` |
| ``add:X`` | its own value plus ``X`` (steering) |

A mask language counted as full minus prompt (``--response-only`` over ``L:full`` and ``L:prompt``)
takes the response's statistic: the full run's counts, sums and histograms less the prompt run's.

:func:`intervene` is a context manager that always removes its hooks.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made, so that the CLI starts without it
    import torch

from analysis.histogram import bin_edges, hist_quantile
from harvester import arch
from harvester.errors import HarvestError

STATISTIC_MODES = ("mean", "mean-others", "p10", "p90")
MODES = ("zero", *STATISTIC_MODES, "value:X", "add:X")


@dataclass(frozen=True)
class Mode:
    kind: str
    """``zero``, ``mean``, ``p10``, ``p90``, ``value`` or ``add``."""
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Mode":
        kind, sep, value = text.partition(":")
        if kind in ("zero", *STATISTIC_MODES) and not sep:
            return cls(kind)
        if kind in ("value", "add") and sep:
            try:
                return cls(kind, float(value))
            except ValueError:
                pass
        raise HarvestError(f"--mode must be one of {', '.join(MODES)} (X a number), not '{text}'")

    @property
    def needs_store(self) -> bool:
        return self.kind in STATISTIC_MODES

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def unit_statistic(store: str, groups: list[str], mode: Mode, minus: list[str] | tuple = ()) -> np.ndarray:
    """``[L, I]``: the mode's statistic of the language made of store ``groups``, less ``minus`` (a
    language imported as full minus prompt: the response's statistic, from the differences of token
    counts and sums, and of histograms clipped at 0 per bin as the activation counts are)."""
    from harvester.store import open_finished
    from harvester.store import open_dataset

    ds = open_dataset(store, open_finished(store))
    names = list(ds["group"].values)
    missing = [g for g in [*groups, *minus] if g not in names]
    if missing:
        raise HarvestError(f"store {store} has no group {', '.join(missing)}; it has {', '.join(names)}")

    def summed(var: str) -> np.ndarray:  # read only these groups' chunks, not the whole variable
        plus = ds[var].isel(group=[names.index(g) for g in groups]).values.sum(axis=0)
        return plus - ds[var].isel(group=[names.index(g) for g in minus]).values.sum(axis=0) if minus else plus

    tokens = int(summed("tokens"))
    what = "+".join(groups) + "".join(f" - {g}" for g in minus)
    if tokens <= 0:
        raise HarvestError(f"store {store} counted no tokens for {what}" + (f" ({tokens})" if tokens else ""))
    if mode.kind in ("mean", "mean-others"):
        if "act_sum" not in ds:
            raise HarvestError(f"--mode mean needs activation sums, and store {store} has none; harvest with "
                               "--stats active,sum")
        return summed("act_sum") / tokens
    if "hist" not in ds:
        raise HarvestError(f"--mode {mode} needs histograms, and store {store} has none; harvest with "
                           "--stats active,sum,sqsum,hist")
    return hist_quantile(np.maximum(summed("hist"), 0), bin_edges(ds), {"p10": 10, "p90": 90}[mode.kind])


def empty_rows(rows) -> list[str]:
    """The rows (``none`` aside) whose mask selects no unit, each warned about on stderr: their numbers
    are the baseline's, never an effect of zero size."""
    empty = [row.name for row in rows if row.language is not None and not row.selected]
    for name in empty:
        print(f"lsn: warning: row {name} intervenes on no unit (its mask is empty); it repeats the row none",
              file=sys.stderr)
    return empty


@dataclass
class Intervention:
    """Units to change (flat indices ``layer * width + unit``) and how."""

    selected: np.ndarray
    mode: Mode
    width: int
    values: np.ndarray | None = None
    """``[L, I]`` per-unit values for the statistic modes."""

    def per_layer(self, n_layers: int, device) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        import torch

        out = {}
        for layer in range(n_layers):
            units = self.selected[self.selected // self.width == layer] - layer * self.width
            if units.size == 0:
                continue
            if self.mode.kind in STATISTIC_MODES:
                vals = torch.as_tensor(self.values[layer, units], dtype=torch.float32)
            elif self.mode.kind in ("value", "add"):
                vals = torch.full((units.size,), self.mode.value, dtype=torch.float32)
            else:
                vals = None
            out[layer] = (torch.as_tensor(units, dtype=torch.long, device=device),
                          None if vals is None else vals.to(device))
        return out


@contextlib.contextmanager
def intervene(model: torch.nn.Module, site: str, intervention: Intervention | None, inputs: bool = False):
    """Forward hooks on ``site``'s modules that change the selected units of their output (``inputs``: forward
    pre-hooks that change their input, the ``--unit down-input`` units); always removed. ``None`` intervenes
    on nothing (the baseline row)."""
    if intervention is None:
        yield
        return
    modules = arch.site_modules(model, site)
    device = next(model.parameters()).device
    plans = intervention.per_layer(len(modules), device)
    if inputs:
        handles = [modules[layer].register_forward_pre_hook(partial(_apply_input, intervention.mode.kind, *plan))
                   for layer, plan in plans.items()]
    else:
        handles = [modules[layer].register_forward_hook(partial(_apply, intervention.mode.kind, *plan))
                   for layer, plan in plans.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _apply_input(kind: str, units: torch.Tensor, values: torch.Tensor | None, module, inputs):
    """The pre-hook form of :func:`_apply`: the module's first input changed, the others as they are."""
    return (_apply(kind, units, values, module, None, inputs[0]), *inputs[1:])


def _apply(kind: str, units: torch.Tensor, values: torch.Tensor | None, module, inputs, output):
    out = output[0] if isinstance(output, tuple) else output
    if kind == "zero":
        new = out.index_fill(-1, units, 0.0)
    else:
        new = out.clone()
        vals = values.to(out.dtype)
        if kind == "add":
            new[..., units] += vals
        else:
            new[..., units] = vals
    return (new, *output[1:]) if isinstance(output, tuple) else new
