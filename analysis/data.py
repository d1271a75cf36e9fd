"""Open a harvest store lazily and choose the groups an analysis runs over.

``open_counts(store, langs, response_only)`` gives Dask arrays of shape ``[K, L, I]`` (language,
layer, neuron) in the store's own chunks (one group, several layers, all neurons): nothing is read
until a method computes. Languages are named by ``--langs``, in that order, each

- a group of the store (``de``, ``en-fr:tgt``, ``S``);
- ``NAME=G1+G2+...``: the groups' counts summed (``fr=en-fr:tgt+fr-en:src`` pools both sides of
  EC40 that are French); a group whose own name holds ``=`` is chosen as ``NAME=GROUP`` (without
  ``--langs`` every group is taken by its own name);
- with ``--response-only``, a language ``L`` whose store has ``L:response`` (harvested prompt and
  response in one pass: the response group is already response-only), or ``L:full`` and
  ``L:prompt`` (imported from two runs: ``max(active_full - active_prompt, 0)`` over
  ``max(tokens_full - tokens_prompt, 1)``).

Default languages: every group (per language for text and Wikipedia, per direction side for EC40),
or with ``--response-only`` every language that has response counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask.array as da
import numpy as np

from harvester.errors import HarvestError
from harvester.store import StoreAttrs, fingerprint_sha256, open_finished

from analysis.masks import model_identity


@dataclass
class Counts:
    names: list[str]
    numer: object
    """Dask int64 ``[K, L, I]``: active counts (response-only: clipped differences)."""
    denom: np.ndarray
    """int64 ``[K]``: the probability's denominator (tokens, at least 1)."""
    tokens: np.ndarray
    """int64 ``[K]``: tokens (or samples) counted."""
    n_layers: int
    width: int
    store: str
    attrs: StoreAttrs
    groups: list[list[str]]
    """The store groups behind each language."""
    dataset: object = field(repr=False, default=None)
    """The store's lazy xarray Dataset."""
    index: list[list[int]] = field(default_factory=list)
    """Positions of :attr:`groups` in the store."""
    subtracted: list[bool] = field(default_factory=list)
    """Per language: counts are ``full - prompt`` (imported from two runs), not a sum of groups."""

    def probabilities(self):
        """Dask float64 ``[K, L, I]``: ``P = numer / denom``."""
        return self.numer / self.denom[:, None, None].astype(np.float64)

    def source(self) -> dict:
        """Where a mask made from these counts comes from: the store, and the model it was harvested
        on (``model`` its id, ``revision``, ``weights`` its weight files' hash; see
        :func:`analysis.masks.model_identity`)."""
        model = model_identity(self.attrs.model.to_dict())
        return {"store": self.store, "fingerprint_sha256": fingerprint_sha256(self.attrs.fingerprint),
                "model": model["id"], "revision": model["revision"], "weights": model["weights"],
                "groups": self.groups}

    def variable(self, name: str):
        """Another statistic ``[K, L, I(, B)]`` summed over each language's groups."""
        if any(self.subtracted):
            raise HarvestError(f"'{name}' cannot be taken for full-minus-prompt languages; "
                               "only activation counts can")
        return _stack(self.dataset, name, self.index)


def open_counts(store: str, langs: list[str] | None = None, response_only: bool = False) -> Counts:
    from harvester.store import open_dataset

    attrs = open_finished(store)
    ds = open_dataset(store, attrs)  # every chunk read is checked: damage is an error, never a number
    groups = [str(g) for g in ds["group"].values]
    tokens = ds["tokens"].values.astype(np.int64)
    position = {g: i for i, g in enumerate(groups)}
    if response_only:
        spec = langs or _response_languages(groups)
        if not spec:
            raise HarvestError(f"store {store} has no response groups (LANG:response, or LANG:full with LANG:prompt)")
        rows, denom, toks, behind, subtracted = [], [], [], [], []
        for lang in spec:
            if f"{lang}:response" in position:
                g = position[f"{lang}:response"]
                rows.append(ds["active"].data[g])
                toks.append(tokens[g])
                denom.append(max(tokens[g], 1))
                behind.append([f"{lang}:response"])
                subtracted.append(False)
            elif f"{lang}:full" in position and f"{lang}:prompt" in position:
                f, p = position[f"{lang}:full"], position[f"{lang}:prompt"]
                rows.append(da.maximum(ds["active"].data[f] - ds["active"].data[p], 0))
                toks.append(max(tokens[f] - tokens[p], 0))
                denom.append(max(tokens[f] - tokens[p], 1))
                behind.append([f"{lang}:full", f"{lang}:prompt"])
                subtracted.append(True)
            else:
                raise HarvestError(f"language '{lang}' has no response counts in {store} "
                                   f"(needs group {lang}:response, or {lang}:full and {lang}:prompt)")
        return Counts(list(spec), da.stack(rows), np.array(denom, np.int64), np.array(toks, np.int64),
                      ds.sizes["layer"], ds.sizes["neuron"], str(store), attrs, behind, ds,
                      [[position[g] for g in b] for b in behind], subtracted)
    names, index = [], []
    for item in (langs or groups):
        # a group's own name, which may hold '=', is that group; otherwise NAME=G1+G2 sums groups
        name, sep, expr = item.partition("=") if langs and item not in position else (item, "", "")
        members = expr.split("+") if sep else [item]
        missing = [m for m in members if m not in position]
        if missing or not name:
            raise HarvestError(f"unknown group '{missing[0] if missing else item}' in {store}; "
                               f"groups: {', '.join(groups)}")
        names.append(name if sep else item)
        index.append([position[m] for m in members])
    if len(set(names)) != len(names):
        raise HarvestError(f"a language is named twice in --langs: {', '.join(names)}")
    toks = np.array([sum(int(tokens[g]) for g in idx) for idx in index], np.int64)
    return Counts(names, _stack(ds, "active", index), np.maximum(toks, 1), toks, ds.sizes["layer"],
                  ds.sizes["neuron"], str(store), attrs, [[groups[g] for g in idx] for idx in index], ds, index,
                  [False] * len(names))


def _stack(ds, name: str, index: list[list[int]]):
    if name not in ds:
        raise HarvestError(f"the store has no '{name}' statistic; harvest with --stats including it")
    data = ds[name].data
    rows = []
    for idx in index:
        row = data[idx[0]]
        for g in idx[1:]:
            row = row + data[g]
        rows.append(row)
    return da.stack(rows)


def _response_languages(groups: list[str]) -> list[str]:
    langs = []
    for g in groups:
        lang, _, role = g.rpartition(":")
        if lang and (role == "response" or (role == "full" and f"{lang}:prompt" in groups)) and lang not in langs:
            langs.append(lang)
    return langs
