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

Without ``--langs`` the languages are the store's own (``--by language``, said in one line where
they are not simply its groups): the groups of text, sample and Wikipedia stores; the response
groups of a store of prompt and response groups (as ``--response-only``); for EC40, each language
with all its sides pooled (``fr = en-fr:tgt + fr-en:src``, English pooled over every direction).
``--by direction`` pools each EC40 direction's two sides (``en-fr = en-fr:src + en-fr:tgt``), and
``--by group`` takes every group as it is; with ``--by``, ``--langs`` chooses among its languages.

Pooling is exact: every statistic (``tokens``, ``active``, ``act_sum``, ``act_sqsum``,
``act_abssum``, ``hist``) is a sum over tokens, so a pooled language's counts are those its groups'
tokens would give as one group, and every method reads them as it reads a harvested group. The
probability is token-weighted (a direction with more tokens weighs more), and a target side was
counted in the context of its source sentence, which pooling does not change. Only the
full-minus-prompt difference of imported stores is not a sum (it is clipped at 0 per neuron).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from harvester.errors import HarvestError

from analysis.masks import model_identity, store_location

if TYPE_CHECKING:
    from harvester.store import StoreAttrs


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
    note: str | None = None
    """One line saying which languages were chosen by default, for the command to print."""
    shards: tuple | None = field(repr=False, default=None)
    """``(plan, weights)`` when the counts were recomputed from shard rows (:func:`analysis.shards.weighted`):
    every statistic is then read from the same weighted rows."""

    def probabilities(self):
        """Dask float64 ``[K, L, I]``: ``P = numer / denom``."""
        return self.numer / self.denom[:, None, None].astype(np.float64)

    def source(self) -> dict:
        """Where a mask made from these counts comes from: the store (absolute path or URL) and its
        fingerprint digest, the site, and the model it was harvested
        on (``model`` its id, ``revision``, ``weights`` its weight files' hash; see
        :func:`analysis.masks.model_identity`); per language its groups, and whether they are
        ``full - prompt`` (``subtracted``: the jobs take the response's statistics from them)."""
        from harvester.store import fingerprint_sha256

        model = model_identity(self.attrs.model.to_dict())
        return {"store": store_location(self.store), "fingerprint_sha256": fingerprint_sha256(self.attrs.fingerprint),
                "model": model["id"], "revision": model["revision"], "weights": model["weights"],
                "site": self.attrs.model.site, "unit": self.attrs.model.unit or "mlp", "groups": self.groups,
                "subtracted": self.subtracted}

    def variable(self, name: str):
        """Another statistic ``[K, L, I(, B)]`` summed over each language's groups."""
        if any(self.subtracted):
            raise HarvestError(f"'{name}' cannot be taken for full-minus-prompt languages; "
                               "only activation counts can")
        if self.shards is not None:
            import dask.array as da

            return da.stack([self._weighted(name, idx) for idx in self.index])
        return _stack(self.dataset, name, self.index)

    def pooled(self, name: str):
        """Statistic ``name`` ``[L, I(, B)]`` summed over every group of the store, whatever the languages
        are (act-prob-90p's pooled percentile); recomputed counts sum their weighted rows of every group,
        so a resample never mixes the store's totals into its own counts."""
        if self.shards is not None:
            return self._weighted(name, list(range(self.shards[0].tokens.shape[1])))
        _require(self.dataset, name)
        return self.dataset[name].data.sum(axis=0)

    def _weighted(self, name: str, groups: list[int]):
        """Statistic ``name`` of the store groups ``groups``, summed from their weighted shard rows."""
        from analysis.shards import weighted_rows

        _require(self.dataset, name)
        plan, weights = self.shards
        return weighted_rows(self.store, name, plan, weights, groups)


BY = ("language", "direction", "group")
"""What the languages of an analysis are, without --langs (``--by``): ``language`` (the default) the
store's languages as its corpus names them; ``direction`` EC40's directions, each its two sides
pooled; ``group`` every store group as it is."""


def open_counts(store: str, langs: list[str] | None = None, response_only: bool = False,
                by: str | None = None, unfinished: bool = False) -> Counts:
    """The counts of the languages named by ``langs`` (groups, ``NAME=G1+G2``) or, without them, by
    ``by`` (:data:`BY`; with ``by`` given, ``langs`` chooses among its languages). ``unfinished``: also a
    store whose harvest is still running, whose totals are zeros: only for
    :func:`analysis.shards.partial_counts`, which replaces them by its finished shards' rows."""
    from harvester.store import open_dataset, open_finished, read_attrs

    attrs = read_attrs(store) if unfinished else open_finished(store)
    if attrs is None:
        raise HarvestError(f"no store at {store}")
    ds = _unfinished(store) if unfinished else open_dataset(store, attrs)  # open_dataset checks every chunk read
    groups = [str(g) for g in ds["group"].values]
    if response_only and by not in (None, "language"):
        raise HarvestError(f"--response-only takes the response groups' languages; it does not combine with --by {by}")
    note = None
    if not response_only and (by or not langs):
        chosen, response_only, note = language_view(groups, by or "language", explicit=by is not None)
        if chosen is not None:
            return _summed(store, attrs, ds, groups, _pick(chosen, langs, by), note)
        langs = _pick([(lang, []) for lang in _response_languages(groups)], langs, by)
        langs = [name for name, _ in langs]
    if response_only:
        counts = _response_only(store, attrs, ds, groups, langs)
        counts.note = note
        return counts
    return _summed(store, attrs, ds, groups, _parse_langs(langs, groups, store), None)


def _unfinished(store: str):
    """The dataset of a store whose harvest still runs: its totals, not reduced yet, are unwritten chunks
    read as zeros, never used (:func:`analysis.shards.partial_counts` reads the finished shards' rows, checked)."""
    import xarray as xr

    from harvester.store import zarr_store

    return xr.open_zarr(zarr_store(store, read_only=True), consolidated=True)


def language_view(groups: list[str], by: str, explicit: bool) -> tuple[list | None, bool, str | None]:
    """``(languages, response_only, note)`` for ``--by``: languages as ``(name, [groups])``, or None with
    response_only for a store of prompt and response groups (its response groups are its languages);
    the note says in one line what was chosen when ``--by`` was not given and it is not every group."""
    from harvester.corpus.ec40 import parse_side

    sides = [parse_side(g) for g in groups]
    responses = _response_languages(groups)
    roles = responses and all(g.rpartition(":")[2] in ("prompt", "response", "full") for g in groups)
    if by == "group":
        return [(g, [g]) for g in groups], False, None
    if by == "direction" and not all(sides):
        raise HarvestError(f"--by direction needs a store of translation directions (EC40 groups like en-fr:src); "
                           f"group '{groups[sides.index(None)]}' is not one")
    if all(sides):
        key = 0 if by == "direction" else 1
        pooled: dict[str, list[str]] = {}
        for group, side in zip(groups, sides):
            pooled.setdefault(side[key], []).append(group)
        note = None if explicit else (f"languages: the {len(pooled)} languages of the EC40 sides, each pooling its "
                                      "sides of every direction; --by direction, --by group or --langs chooses others")
        return list(pooled.items()), False, note
    if roles:
        note = None if explicit else (f"languages: the response groups of this store ({', '.join(responses)}); "
                                      "--langs picks any groups")
        return None, True, note
    return [(g, [g]) for g in groups], False, None


def _pick(view: list[tuple[str, list[str]]], langs: list[str] | None, by: str | None) -> list[tuple[str, list[str]]]:
    """The languages of ``view`` named in ``langs``, in that order (all of them without ``langs``)."""
    if not langs:
        return view
    names = dict(view)
    unknown = [lang for lang in langs if lang not in names]
    if unknown:
        raise HarvestError(f"--by {by} has no language '{unknown[0]}'; it has {', '.join(names)}")
    return [(lang, names[lang]) for lang in langs]


def _parse_langs(langs: list[str], groups: list[str], store: str) -> list[tuple[str, list[str]]]:
    """``--langs`` items: a group (its own name, which may hold '=', is that group) or NAME=G1+G2."""
    chosen = []
    for item in langs:
        name, sep, expr = item.partition("=") if item not in groups else (item, "", "")
        members = expr.split("+") if sep else [item]
        missing = [m for m in members if m not in groups]
        if "+" in item and not sep and missing:
            raise HarvestError(f"'{item}' is not a group: separate languages with commas (--langs "
                               f"{item.replace('+', ',')}), or name a sum of groups (NAME={item})")
        if missing or not name:
            raise HarvestError(f"unknown group '{missing[0] if missing else item}' in {store}; "
                               f"groups: {', '.join(groups)}")
        chosen.append((name, members))
    return chosen


def _summed(store, attrs, ds, groups: list[str], chosen: list[tuple[str, list[str]]], note: str | None) -> Counts:
    """Each language's counts summed over its groups."""
    names = [name for name, _ in chosen]
    if len(set(names)) != len(names):
        raise HarvestError(f"a language is named twice in --langs: {', '.join(names)}")
    tokens = ds["tokens"].values.astype(np.int64)
    index = [[groups.index(m) for m in members] for _, members in chosen]
    toks = np.array([sum(int(tokens[g]) for g in idx) for idx in index], np.int64)
    return Counts(names, _stack(ds, "active", index), np.maximum(toks, 1), toks, ds.sizes["layer"],
                  ds.sizes["neuron"], str(store), attrs, [list(members) for _, members in chosen], ds, index,
                  [False] * len(names), note)


def _response_only(store, attrs, ds, groups: list[str], langs: list[str] | None) -> Counts:
    """Response-only languages: ``L:response``, or ``L:full`` minus ``L:prompt`` clipped at 0."""
    import dask.array as da

    tokens = ds["tokens"].values.astype(np.int64)
    position = {g: i for i, g in enumerate(groups)}
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


def _require(ds, name: str) -> None:
    """The one-line error for a statistic the store was not harvested with."""
    if name not in ds:
        raise HarvestError(f"the store has no '{name}' statistic; harvest with --stats including it")


def _stack(ds, name: str, index: list[list[int]]):
    import dask.array as da

    _require(ds, name)
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
