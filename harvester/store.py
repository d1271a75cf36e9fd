"""The harvest store: a Zarr v3 directory (local, or an fsspec URL) that ``xarray.open_zarr`` reads.

Layout::

    STORE/                      root attrs ``lsn``: fingerprint, metadata, completion, compaction (:class:`StoreAttrs`)
      group, layer, neuron      coordinates (``group`` is a string coordinate)
      tokens   (group)          int64    totals, reduced from finished shards
      active   (group, layer, neuron)    int64     count of x > 0
      nonzero  (group, layer, neuron)    int64     count of x != 0 (opt-in)
      act_sum  (group, layer, neuron)    float64
      act_sqsum(group, layer, neuron)    float64
      act_abssum (group, layer, neuron)  float64   sum of |x| (opt-in, default with pooled stimuli)
      hist     (group, layer, neuron, bin) int64, with coords hist_lo / hist_hi (opt-in), or on per-neuron
                                        ranges (DLN) coords hist_range_lo / hist_range_width (layer, neuron) float32
      quantile_sum (group, layer, neuron) float64  sum over full batches of each batch's quantile (opt-in,
      quantile_batches (group, layer, neuron) int64  with the batches counted; --stats ...,batch_quantile)
      above    (group, layer, neuron)    int64    tokens above their group's threshold (opt-in, --thresholds-from)
      shards/
        tokens (shard, group)             each shard's own chunk row
        active, act_sum, ... (shard, group, layer, neuron)
        hist (shard, group, layer, neuron, bin)  int32 where a shard's tokens fit (:func:`hist_row_dtype`), else int64
        done   (shard,)                   the completion manifest: 1 once a shard's data is written
        digest (shard, 32)                sha256 of a shard's rows and tokens (:class:`ShardDigest`)
      tokens/                       token shards (Parquet) and per-stream manifests, see windows.py

``lsn compact`` (:mod:`harvester.compact`) may drop the chunks of ``shards/<var>`` of a complete store
(for histograms, most of its bytes), keeping everything else and recording it in ``compacted``
(:class:`Compacted`, written before the first row goes). Whatever needs those rows (a resampling
bootstrap, convergence, ``lsn verify --repair``, a reduce) calls :func:`require_shard_rows` first;
``lsn verify`` then checks the totals against the digest recorded when they were checked against them.

The shard dimension has room for ``SHARDS_PER_STREAM`` shards per corpus stream (shard ``k`` of
stream ``s`` is row ``s * SHARDS_PER_STREAM + k``); chunks never written take no space.

Each shard writes whole chunks of its own rows (an idempotent rewrite) and their digest, then its
``done`` chunk; totals are summed from the plan's shards in shard order, so they are the same however
the work was scheduled, interrupted and resumed.

Integrity (format 2): every chunk ends in a crc32c checksum and every chunk of a written array is
stored, so reads through :mod:`harvester.checked` turn a flipped byte or a deleted chunk into an error;
the reduce checks each shard's digest and records what the totals came from; :mod:`harvester.verify` checks all.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from harvester import fs, lease
from harvester.errors import HarvestError
from harvester.stats import VARIABLES, StatsSpec, ranges_sha256

FORMAT = "lsn-harvester-store"
FORMAT_VERSION = 2
"""2: every chunk ends in a crc32c checksum, every chunk of a written array is stored (none is left out for
being all zeros), and the totals record the shards they were summed from. 1: neither (read-only)."""
_CHUNK_ELEMENTS = 1 << 22  # ~32 MiB of float64 per chunk


def creating_marker(path: str | Path) -> str:
    """``DIR/.NAME.creating.json``: written before a store is built in place (fsspec URLs) and removed
    once its attributes are written; while it is there, a store without ``lsn`` attributes is a
    skeleton an interrupted harvest left (rebuilt by the next one that holds the lease)."""
    if not fs.is_url(str(path)):
        local = Path(path).absolute()
        return str(local.parent / f".{local.name}.creating.json")
    parent, _, name = str(path).rstrip("/").rpartition("/")
    return f"{parent}/.{name}.creating.json"

_DTYPES = {"active": "int64", "nonzero": "int64", "act_sum": "float64", "act_sqsum": "float64",
           "act_abssum": "float64", "hist": "int64", "quantile_sum": "float64", "quantile_batches": "int64",
           "above": "int64"}
"""The arrays' dtypes (totals and shard rows), but the shard rows of ``hist``: :func:`hist_row_dtype`."""


def hist_row_dtype(shard_tokens: int | None, seq_len: int | None) -> str:
    """The dtype of a store's ``hist`` shard rows: a bin of one shard counts at most the shard's tokens
    (or samples), at most ``max(shard_tokens, seq_len)`` (a shard holds at least one window), so int32
    where that stays below 2**31, else int64 (and in stores written before int32 rows: read as they are).
    The totals stay int64."""
    if shard_tokens is None or seq_len is None or max(shard_tokens, seq_len) >= 1 << 31:
        return "int64"
    return "int32"


def _zarr():
    import warnings

    import zarr

    # Consolidated metadata (one read to open the store) is a zarr-python extension of Zarr v3.
    warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
    # A chunk of zeros is written like any other, so a missing chunk is always damage, never zeros.
    zarr.config.set({"array.write_empty_chunks": True})
    return zarr


def _compressors() -> tuple:
    """zstd, then a crc32c of the compressed bytes: a flipped byte is an error, never a number."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(), Crc32cCodec())


def zarr_store(path: str | Path, read_only: bool = False):
    """A Zarr store object for a local path or an fsspec URL (``s3://...``, ``file://...``)."""
    zarr = _zarr()
    if fs.is_url(str(path)):
        options = {"auto_mkdir": True} if str(path).startswith("file://") else {}
        try:
            return zarr.storage.FsspecStore.from_url(str(path), storage_options=options, read_only=read_only)
        except (ImportError, ValueError) as err:
            raise HarvestError(f"cannot open store {path}: {str(err).splitlines()[0]}") from None
    return zarr.storage.LocalStore(str(path), read_only=read_only)


def tokens_dir(path: str | Path) -> str:
    """Where a store's token shards and stream manifests live: ``STORE/tokens``."""
    return f"{str(path).rstrip('/')}/tokens"


# -- the metadata -------------------------------------------------------------------------------
class _Malformed(Exception):
    """A value of the attributes that is not what the schema says: ``key`` (a dotted path) and what is wrong."""

    def __init__(self, key: str, what: str):
        super().__init__(f"{key or 'lsn'}: {what}")


def _shown(value) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    text = json.dumps(value, default=str)
    return kind if isinstance(value, (dict, list)) or value is None else f"{kind} {text[:40]}"


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(key, f"expected a string, found {_shown(value)}")
    return value


def _integer(value, key: str, least: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Malformed(key, f"expected an integer, found {_shown(value)}")
    if value < least:
        raise _Malformed(key, f"is negative ({value})" if value < 0 else f"is {value}; it must be at least {least}")
    return value


def _positive(value, key: str) -> int:
    return _integer(value, key, least=1)


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Malformed(key, f"expected true or false, found {_shown(value)}")
    return value


def _list_of(item):
    """A checker of a JSON list whose every item passes ``item``; read as a tuple."""
    def check(value, key: str) -> tuple:
        if not isinstance(value, list):
            raise _Malformed(key, f"expected a list, found {_shown(value)}")
        return tuple(item(v, f"{key}[{i}]") for i, v in enumerate(value))
    return check


def _number(value, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Malformed(key, f"expected a number, found {_shown(value)}")
    return value


def _stat(value, key: str) -> str:
    if _text(value, key) not in VARIABLES:
        raise _Malformed(key, f"unknown statistic {value!r} (known: {', '.join(VARIABLES)})")
    return value


def _groups(value, key: str) -> tuple[str, ...]:
    groups = _list_of(_text)(value, key)
    if not groups:
        raise _Malformed(key, "is empty")
    twice = sorted({g for g in groups if groups.count(g) > 1})
    if twice:
        raise _Malformed(key, f"names group {twice[0]!r} twice")
    return groups


def _object(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise _Malformed(key, f"expected an object, found {_shown(value)}")
    return copy.deepcopy(value)


def _anything(value, key: str):
    return copy.deepcopy(value)


def _optional(check):
    return lambda value, key: None if value is None else check(value, key)


def _field(check, required: bool = False):
    """A typed field read by ``check(value, key)``; a missing ``required`` one is malformed."""
    metadata = {"check": check, "required": required}
    return field(metadata=metadata) if required else field(default=None, metadata=metadata)


def _plain(value):
    """The JSON form of a field's value (tuples become lists, sections objects)."""
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True, kw_only=True)
class _Section:
    """Typed fields read from one JSON object of the attributes, and written back to it: keys it does not
    know are kept in ``extra`` (a newer lsn's), and a field is written when it was read or is set (so a
    key absent stays absent, and one read as null stays null)."""

    extra: dict = field(default_factory=dict, repr=False)
    read_keys: frozenset = field(default=frozenset(), repr=False)

    @classmethod
    def read(cls, value, key: str):
        d = _object(value, key)
        known = {f.name: f for f in fields(cls) if "check" in f.metadata}
        values = {}
        for name, f in known.items():
            if name in d:
                values[name] = f.metadata["check"](d[name], f"{key}.{name}".lstrip("."))
            elif f.metadata["required"]:
                raise _Malformed(f"{key}.{name}".lstrip("."), "is missing")
        return cls(**values, extra={k: v for k, v in d.items() if k not in known}, read_keys=frozenset(values))

    def to_dict(self) -> dict:
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if "check" in f.metadata
               and (f.name in self.read_keys or getattr(self, f.name) is not None)}
        return {**out, **copy.deepcopy(self.extra)}

    def replace(self, **values):
        return dataclasses.replace(self, **values)


@dataclass(frozen=True, kw_only=True)
class ModelInfo(_Section):
    """``meta.model``: the fingerprint's ``model`` (what names the model, where its statistics were
    taken) and its shape. An imported store's model is unknown: ``id`` and the rest None."""

    id: str | None = _field(_optional(_text))
    """``--model`` as given (a hub id, a path, ``tiny:ARCH``)."""
    revision: str | None = _field(_optional(_text))
    weights: str | None = _field(_optional(_text))
    """Hash of the weight files (``sha256-full:...``)."""
    weights_sampled: str | None = _field(_optional(_text))
    architecture: str | None = _field(_optional(_text))
    site: str | None = _field(_optional(_text))
    """The hooked module pattern, ``...{layer}...``."""
    unit: str | None = _field(_optional(_text))
    dtype: str | None = _field(_optional(_text))
    device: str | None = _field(_optional(_text))
    device_map: str | None = _field(_optional(_text))
    architectures: tuple[str, ...] | None = _field(_optional(_list_of(_text)))
    layers: int = _field(_positive, required=True)
    width: int = _field(_positive, required=True)
    """Units per layer (neurons, or the hidden size at the residual site)."""


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo(_Section):
    """``meta.tokenizer`` (as the fingerprint's)."""

    name: str | None = _field(_optional(_text))
    vocab_size: int | None = _field(_optional(_integer))
    eos_token_id: int | None = _field(_optional(_integer))
    sha256: str | None = _field(_optional(_text))


@dataclass(frozen=True, kw_only=True)
class CorpusInfo(_Section):
    """``meta.corpus``: the fingerprint's ``corpus`` (spec, groups, streams, sources), the specs as given,
    and what the plan turned out to be (recorded by the reduce; an import's at creation)."""

    spec: str = _field(_text, required=True)
    groups: tuple[str, ...] = _field(_groups, required=True)
    """The store's groups, in the order of its ``group`` dimension."""
    streams: tuple[str, ...] | None = _field(_optional(_list_of(_text)))
    source: object = _field(_anything)
    options: dict | None = _field(_optional(_object))
    specs: tuple[str, ...] | None = _field(_optional(_list_of(_text)))
    tokens_per_group: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    tokens: int | None = _field(_optional(_integer))
    digest: str | None = _field(_optional(_text))
    shards: int | None = _field(_optional(_integer))
    windows: int | None = _field(_optional(_integer))
    truncated_tokens: int | None = _field(_optional(_integer))
    """Tokens that ``sequence`` packing cut off documents longer than ``--seq-len`` (not harvested)."""
    truncated_documents: int | None = _field(_optional(_integer))
    truncated_tokens_per_group: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    """``truncated_tokens`` per group, in group order (absent in stores made before lsn recorded it)."""
    truncated_documents_per_group: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    """Per group: documents that lost at least one of its tokens."""
    remainder_tokens: int | None = _field(_optional(_integer))
    """``--remainder drop``: tokens of packed streams' last, shorter windows, dropped (not harvested)."""
    remainder_tokens_per_group: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    """``remainder_tokens`` per group, in group order (absent unless ``--remainder drop``)."""
    boundaries_per_group: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    """``--encode whole``: per group, the segment boundaries into its segments (an example's response)."""
    boundary_mismatches_per_group: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    """Of those, the ones where the text before the boundary (the prompt), encoded alone, is not a prefix of
    the whole encoding: there the group does not count what a two-pass ``full - prefix`` counts."""


@dataclass(frozen=True, kw_only=True)
class HistRanges(_Section):
    """``meta.settings.hist_ranges`` (as the fingerprint's): where a histogram's per-neuron ranges came
    from (:func:`harvester.stats.dln_ranges` of the first store's pooled moments) and their digest."""

    store: str = _field(_text, required=True)
    """The first store, as given (an absolute path or a URL)."""
    fingerprint_sha256: str = _field(_text, required=True)
    shards_sha256: str = _field(_text, required=True)
    """The first store's harvest and the shards its totals were reduced from."""
    bins: int = _field(_positive, required=True)
    """Inner bins; the histogram has ``bins + 2`` (underflow and overflow)."""
    hi: float = _field(_number, required=True)
    """The range's upper end in standard deviations above the mean (3: DLN's paper)."""
    ranges_sha256: str = _field(_text, required=True)
    """:func:`harvester.stats.ranges_sha256` of the arrays ``hist_range_lo``, ``hist_range_width``."""


@dataclass(frozen=True, kw_only=True)
class Settings(_Section):
    """``meta.settings`` (as the fingerprint's): the statistics kept and how they were taken; the
    harvest's own settings are None in an imported store."""

    backend: str | None = _field(_optional(_text))
    seq_len: int | None = _field(_optional(_positive))
    batch_size: int | None = _field(_optional(_positive))
    shard_tokens: int | None = _field(_optional(_positive))
    stats: tuple[str, ...] = _field(_list_of(_stat), required=True)
    hist_edges: tuple[float, ...] | None = _field(_optional(_list_of(_number)))
    pooling: str | None = _field(_optional(_text))
    bos: str | None = _field(_optional(_text))
    """``--bos`` as given; absent (a store from before the option, or ``--bos none``): none."""
    bos_place: str | None = _field(_optional(_text))
    """Where the BOS went (``document``, ``window``; absent: none), ``--bos auto`` resolved."""
    bos_ids: tuple[int, ...] | None = _field(_optional(_list_of(_integer)))
    eos_per_example: bool | None = _field(_optional(_flag))
    """Absent: true (before ``--eos-per-example``, every example ended with EOS)."""
    encode: str | None = _field(_optional(_text))
    """``whole`` or ``segments``; absent: segments (the encoding before ``--encode``)."""
    separator: str | None = _field(_optional(_text))
    """What ended each packed document: ``none``; absent: ``eos`` (the tokenizer's EOS)."""
    remainder: str | None = _field(_optional(_text))
    """A packed stream's last, shorter window: ``drop`` (dropped, counted); absent: ``keep`` (harvested)."""
    batch_quantile: float | None = _field(_optional(_number))
    """``--stats ...,batch_quantile``: the quantile taken per full batch of ``batch_size`` windows of
    ``seq_len`` tokens (the batch shape), padding never counted; absent without that statistic."""
    thresholds_from: dict | None = _field(_optional(_object))
    """``--stats ...,above``: the store whose ``quantile_sum / quantile_batches`` are the thresholds:
    ``{store, fingerprint_sha256, shards_sha256, batch_quantile, batch_size, seq_len}``."""
    hist_ranges: HistRanges | None = _field(_optional(HistRanges.read))
    """``--hist-edges from-store:STORE:BINS[:HI]``: the histogram is on per-neuron ranges (the arrays
    ``hist_range_lo``, ``hist_range_width``) computed from that store; ``hist_edges`` is then null."""

    @property
    def spec(self) -> StatsSpec:
        batch = (self.batch_size, self.seq_len) if self.batch_quantile is not None else None
        hist = "hist" in self.stats
        bins = self.hist_ranges.bins if hist and self.hist_ranges is not None else None
        return StatsSpec(self.stats, self.hist_edges if hist and bins is None else None, self.batch_quantile, batch,
                         hist_bins=bins)

    @property
    def variables(self) -> list[str]:
        """The store's statistic arrays, in the order shards write and the reduce sums them."""
        return [VARIABLES[s] for s in self.stats]


@dataclass(frozen=True, kw_only=True)
class Totals(_Section):
    """``totals``: what the totals were reduced from: the shards (count, and digest of their sorted
    indices) and the tokens per group, compared on every open and by ``lsn verify``."""

    shards: int = _field(_integer, required=True)
    shards_sha256: str = _field(_text, required=True)
    tokens: tuple[int, ...] = _field(_list_of(_integer), required=True)

    @classmethod
    def of(cls, indices, tokens) -> "Totals":
        indices = sorted(int(i) for i in indices)
        return cls(shards=len(indices), shards_sha256=hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
                   tokens=tuple(int(n) for n in tokens))


@dataclass(frozen=True, kw_only=True)
class Compacted(_Section):
    """``compacted``: ``lsn compact`` dropped the shard rows of the statistics (the chunks of
    ``shards/<var>``; their metadata stays) after checking the totals against them. ``shards/done``,
    ``shards/tokens``, ``shards/digest``, the totals and the token shards are kept. It is written before
    the first row is deleted, so a reader that finds it never trusts a missing row
    (:func:`require_shard_rows`), and rows still there are the leftovers of an interrupted compact."""

    date: str = _field(_text, required=True)
    variables: tuple[str, ...] = _field(_list_of(_text), required=True)
    """The statistics whose shard rows were dropped (``shards/<var>``), in the store's variable order."""
    rows: int = _field(_integer, required=True)
    """Shard rows dropped: (shard, group) pairs, summed over the statistics."""
    freed_bytes: int = _field(_integer, required=True)
    totals_sha256: str = _field(_text, required=True)
    """:func:`totals_sha256` of the totals once they were checked against their shards: what
    ``lsn verify`` checks them against from then on."""


@dataclass(frozen=True, kw_only=True)
class Meta(_Section):
    """``meta``: what is known about the harvest beyond its fingerprint."""

    model: ModelInfo = _field(ModelInfo.read, required=True)
    tokenizer: TokenizerInfo | None = _field(_optional(TokenizerInfo.read))
    corpus: CorpusInfo = _field(CorpusInfo.read, required=True)
    settings: Settings = _field(Settings.read, required=True)
    versions: dict | None = _field(_optional(_object))
    """lsn-harvester, torch, transformers (and vLLM) versions that wrote the store."""
    imported: dict | None = _field(_optional(_object))
    """An imported store's source: ``{format, tag, files}``."""


_FINGERPRINT = ("model", "tokenizer", "corpus", "settings")


def _fingerprint(value, key: str) -> dict:
    """The fingerprint, kept as the plain JSON object it is (its digest names the harvest)."""
    d = _object(value, key)
    for section in _FINGERPRINT:
        if section not in d:
            raise _Malformed(f"{key}.{section}", "is missing")
        _object(d[section], f"{key}.{section}")
    return d


@dataclass(frozen=True, kw_only=True)
class StoreAttrs(_Section, Mapping):
    """A store's root attributes ``lsn``, the one owner of their schema: built for a new store by
    :meth:`new` (a harvest and an import alike), read and checked by :meth:`from_dict`, written by
    :meth:`to_dict` in the JSON layout every lsn store has. Read its parts as attributes
    (``attrs.corpus.groups``, ``attrs.model.width``); as a Mapping it is a read-only view of that JSON."""

    format: str = _field(_text, required=True)
    format_version: int | None = _field(_optional(_positive))
    """Absent in the first stores: 1."""
    fingerprint: dict = _field(_fingerprint, required=True)
    """Everything that decides the numbers (model, tokenizer, corpus, settings), as plain JSON: a resumed
    harvest must match it, and :func:`fingerprint_sha256` of it names the harvest. Do not change it."""
    meta: Meta = _field(Meta.read, required=True)
    complete: bool = _field(_flag, required=True)
    created: str | None = _field(_optional(_text))
    totals: Totals | None = _field(_optional(Totals.read))
    compacted: Compacted | None = _field(_optional(Compacted.read))
    """Set by ``lsn compact``: the shard rows of the statistics are gone (absent: every finished shard's rows are kept)."""

    @classmethod
    def new(cls, fingerprint: dict, *, layers: int, width: int, specs, architectures=(), versions: dict | None = None,
            imported: dict | None = None, corpus: dict | None = None) -> "StoreAttrs":
        """The attributes of a new (incomplete) store: its metadata is the fingerprint and the model's
        shape and ``architectures``, the corpus ``specs`` as given and, for an import, the ``corpus``
        results and its source ``imported``."""
        meta = {"model": {**fingerprint["model"], "architectures": list(architectures), "layers": layers,
                          "width": width},
                "tokenizer": fingerprint["tokenizer"],
                "corpus": {**fingerprint["corpus"], "specs": list(specs), **(corpus or {})},
                "settings": fingerprint["settings"], "versions": versions or {},
                **({"imported": imported} if imported is not None else {})}
        return cls.from_dict({"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                              "meta": meta, "complete": False,
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
                             "(new)")

    @classmethod
    def from_dict(cls, d, path) -> "StoreAttrs":
        """The attributes ``d`` read from the store at ``path``, checked: anything not as the schema says
        is one error naming its key."""
        try:
            attrs = cls.read(d, "")
            attrs._check()
        except _Malformed as err:
            raise HarvestError(f"store {path} has malformed metadata: {err}") from None
        return attrs

    def _check(self) -> None:
        """What involves several keys: the metadata repeats the fingerprint, lengths agree."""
        if self.format != FORMAT:
            raise _Malformed("format", f"is {self.format!r}, not {FORMAT!r}")
        meta = self.meta.to_dict()
        for section in _FINGERPRINT:
            for key, value in self.fingerprint[section].items():
                if meta.get(section, {}).get(key, _ABSENT) != value:
                    raise _Malformed(f"meta.{section}.{key}", f"differs from fingerprint.{section}.{key}")
        n = len(self.corpus.groups)
        for key, values in (("meta.corpus.tokens_per_group", self.corpus.tokens_per_group),
                            ("meta.corpus.truncated_tokens_per_group", self.corpus.truncated_tokens_per_group),
                            ("meta.corpus.truncated_documents_per_group",
                             self.corpus.truncated_documents_per_group),
                            ("meta.corpus.remainder_tokens_per_group", self.corpus.remainder_tokens_per_group),
                            ("meta.corpus.boundaries_per_group", self.corpus.boundaries_per_group),
                            ("meta.corpus.boundary_mismatches_per_group", self.corpus.boundary_mismatches_per_group),
                            ("totals.tokens", self.totals and self.totals.tokens)):
            if values is not None and len(values) != n:
                raise _Malformed(key, f"has {len(values)} entries for {n} groups")
        self._check_sums()
        if self.compacted is not None and not self.complete:
            raise _Malformed("compacted", "is set, but the store is not complete (only a complete store is compacted)")
        try:
            self.settings.spec
        except HarvestError as err:
            raise _Malformed("meta.settings.hist_edges", str(err)) from None

    def _check_sums(self) -> None:
        """Counts recorded twice agree: per group and in all."""
        corpus = self.corpus
        for key, per_group, total in (("tokens_per_group", corpus.tokens_per_group, corpus.tokens),
                                      ("truncated_tokens_per_group", corpus.truncated_tokens_per_group,
                                       corpus.truncated_tokens),
                                      ("remainder_tokens_per_group", corpus.remainder_tokens_per_group,
                                       corpus.remainder_tokens)):
            if per_group is not None and total is not None and sum(per_group) != total:
                raise _Malformed(f"meta.corpus.{key}", f"sums to {sum(per_group)}, but meta.corpus."
                                 f"{key.replace('_per_group', '')} is {total}")

    # -- the parts, as attributes
    @property
    def model(self) -> ModelInfo:
        return self.meta.model

    @property
    def corpus(self) -> CorpusInfo:
        return self.meta.corpus

    @property
    def settings(self) -> Settings:
        return self.meta.settings

    @property
    def version(self) -> int:
        return self.format_version or 1

    def finished(self, indices, tokens, **corpus) -> "StoreAttrs":
        """These attributes once the totals are reduced from the shards ``indices`` (``tokens`` per
        group), with the ``corpus`` results recorded."""
        return self.replace(complete=True, totals=Totals.of(indices, tokens),
                            meta=self.meta.replace(corpus=self.corpus.replace(**corpus)))

    # -- a read-only view of the JSON layout
    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


_ABSENT = object()


def read_attrs(path: str | Path) -> StoreAttrs | None:
    """The store's ``lsn`` attributes, checked; None if nothing is there. Errors for a file, a foreign
    directory, a store of a newer format or malformed attributes."""
    fsys, p = fs.filesystem(str(path))
    if not fsys.exists(p):
        return None
    if fsys.isfile(p):
        raise HarvestError(f"store path {path} is a file, not a directory")
    half_made = fsys.isfile(fs.filesystem(creating_marker(path))[1])
    if not fsys.isfile(f"{p}/zarr.json"):
        if fsys.ls(p) and not half_made:
            raise HarvestError(f"{path} is a non-empty directory that is not an lsn store")
        return None
    try:
        root = _zarr().open_group(store=zarr_store(path, read_only=True), mode="r", use_consolidated=False)
        attrs = root.attrs.asdict().get("lsn")
    except HarvestError:
        raise
    except Exception as err:  # noqa: BLE001 - a torn zarr.json (a creator killed mid-write), a foreign file
        if half_made:
            return None
        raise HarvestError(f"cannot read store {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                           ) from None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        if half_made:
            return None  # rebuilt by the next harvest that holds the lease
        raise HarvestError(f"{path} is a Zarr store but not an lsn-harvester store")
    version = attrs.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:  # before its layout is read: it may differ
        raise HarvestError(f"store {path} has format version {version}, newer than this lsn "
                           f"reads ({FORMAT_VERSION}); upgrade lsn-harvester")
    return StoreAttrs.from_dict(attrs, path)


def open_finished(path: str | Path) -> StoreAttrs:
    """The attributes of a store whose harvest (or import) finished; every reader of a store's totals
    (summary, analysis/, jobs/) opens it through here, since an unfinished store's totals are zeros."""
    attrs = read_attrs(path)
    if attrs is None:
        raise HarvestError(f"no store at {path}")
    if not attrs.complete:
        raise HarvestError(f"store {path} is not complete (its harvest did not finish): run the same "
                           "lsn harvest again to finish it")
    return attrs


def require_shard_rows(attrs: StoreAttrs, path: str | Path, what: str) -> None:
    """Refuse, in one line naming ``what`` (``"lsn analyze lape --bootstrap"``), a use of the shard rows of
    the store at ``path`` (``attrs``: its attributes) once ``lsn compact`` dropped them. Call it before
    reading any ``shards/<var>`` row; the totals, ``shards/done``, ``shards/tokens`` and ``shards/digest``
    are always kept."""
    if attrs.compacted is not None:
        raise HarvestError(f"{what} needs the shard rows of store {path}, but lsn compact dropped them on "
                           f"{attrs.compacted.date} (its totals are kept, for every analysis of the totals); "
                           "harvest again into a new --store to have them")


def totals_sha256(root, attrs: StoreAttrs) -> str:
    """sha256 of a store's totals (``root``: its Zarr group, read checked): ``tokens`` (int64), then each
    statistic's totals in the store's variable order, group by group, in their arrays' dtypes."""
    sha = hashlib.sha256(np.ascontiguousarray(root["tokens"][:], dtype=np.int64).tobytes())
    for var in attrs.settings.variables:
        for g in range(len(attrs.corpus.groups)):
            sha.update(np.ascontiguousarray(root[var][g]).tobytes())
    return sha.hexdigest()


def open_dataset(path: str | Path, attrs: StoreAttrs):
    """The lazy xarray Dataset of a finished store's totals, every chunk read checked (format 2); a
    format-1 store (no checksums) is read as it is, with a one-line note."""
    import xarray as xr

    from harvester.checked import checked

    zstore = zarr_store(path, read_only=True)
    if attrs.version < 2:
        print(f"lsn: note: store {path} has format version 1 (no checksums): read as it is, and read-only; "
              "harvest into a new --store for a checked one", file=sys.stderr)
    else:
        zstore = checked(zstore, str(path))
    ds = xr.open_zarr(zstore, consolidated=True)
    described = (list(attrs.corpus.groups), attrs.model.layers, attrs.model.width)
    if ([str(g) for g in ds["group"].values], ds.sizes.get("layer"), ds.sizes.get("neuron")) != described:
        raise HarvestError(f"store {path} is damaged: its attributes' groups or model shape differ from its "
                           f"arrays' (lsn verify {path} lists every problem)")
    recorded = attrs.totals.tokens if attrs.totals else None
    if recorded is not None and tuple(int(n) for n in ds["tokens"].values) != recorded:
        raise HarvestError(f"store {path} is damaged: its tokens totals differ from those recorded when they "
                           f"were reduced (lsn verify {path} lists every problem)")
    return ds


def read_thresholds(path: str | Path) -> tuple[StoreAttrs, np.ndarray]:
    """A finished store's ``batch_quantile`` thresholds, ``quantile_sum / quantile_batches`` float64
    ``[group, layer, neuron]`` (Mondal et al.'s ``mean_p90_act`` per group), with its attributes; an error
    if it has no such statistic or a group has no full batch."""
    attrs = open_finished(path)
    if "batch_quantile" not in attrs.settings.stats:
        raise HarvestError(f"--thresholds-from {path}: that store has no batch_quantile statistic; harvest it with "
                           "--stats active,batch_quantile --batch-quantile 0.9")
    ds = open_dataset(path, attrs)
    total = np.asarray(ds["quantile_sum"].values, dtype=np.float64)
    batches = np.asarray(ds["quantile_batches"].values, dtype=np.int64)
    empty = [g for g, n in zip(attrs.corpus.groups, batches[:, 0, 0]) if n == 0]
    if empty:
        raise HarvestError(f"--thresholds-from {path}: group {empty[0]!r} has no full batch of "
                           f"{attrs.settings.batch_size} x {attrs.settings.seq_len} tokens, so no threshold; give it "
                           "more text or lower --batch-size")
    return attrs, total / batches


def read_moments(path: str | Path, flag: str) -> tuple[StoreAttrs, np.ndarray, np.ndarray]:
    """A finished store's pooled mean and population standard deviation of each unit over all its groups'
    tokens, float64 ``[layer, neuron]``: ``m = Σ act_sum / Σ tokens``, ``σ = sqrt(max(Σ act_sqsum / Σ tokens
    - m², 0))``, with its attributes; one-line errors (prefixed ``flag``, which names the store) for a store
    missing, unfinished, without ``sum`` and ``sqsum``, without tokens, or with sums that are not finite."""
    try:
        attrs = open_finished(path)
    except HarvestError as err:
        raise HarvestError(f"{flag}: {err}") from None
    missing = [s for s in ("sum", "sqsum") if s not in attrs.settings.stats]
    if missing:
        raise HarvestError(f"{flag}: that store has no {' and no '.join(missing)} statistic; harvest it "
                           "with --stats active,sum,sqsum")
    ds = open_dataset(path, attrs)
    n = int(np.asarray(ds["tokens"].values, dtype=np.int64).sum())
    if n <= 0:
        raise HarvestError(f"{flag}: that store counted no tokens")
    mean = np.asarray(ds["act_sum"].values, dtype=np.float64).sum(axis=0) / n
    square = np.asarray(ds["act_sqsum"].values, dtype=np.float64).sum(axis=0) / n
    bad = int(np.sum(~np.isfinite(mean) | ~np.isfinite(square)))
    if bad:
        raise HarvestError(f"{flag}: {bad} units have sums that are not finite (an overflowed float16 "
                           "model?); harvest the first store again in another --dtype")
    return attrs, mean, np.sqrt(np.maximum(square - mean * mean, 0))


def read_hist_ranges(root) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-neuron histogram ranges ``(lo, width)`` (float32 ``[layer, neuron]``) of an open Zarr group
    ``root``; None for a store without them."""
    if "hist_range_lo" not in root:
        return None
    return (np.asarray(root["hist_range_lo"][...], np.float32), np.asarray(root["hist_range_width"][...], np.float32))


def fingerprint_sha256(fingerprint: dict) -> str:
    """The digest that names one harvest (its fingerprint as canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """Human-readable ``key: old != new`` lines for every differing fingerprint entry."""
    lines = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append(f"{section}.{key}: store has {_entry(a, key)}, this run has {_entry(b, key)}")
    return lines


def _entry(section: dict, key: str) -> str:
    """A fingerprint entry as shown; an absent one (e.g. a tokenization setting left at the value lsn used
    before it was recorded, see ``harvester.driver._tokenization_settings``) is ``nothing``, not ``None``."""
    return repr(section[key]) if key in section else "nothing"


def _layer_chunk(n_layers: int, per_layer: int) -> int:
    return max(1, min(n_layers, _CHUNK_ELEMENTS // max(per_layer, 1)))


class Store:
    """An open harvest store."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        from harvester.checked import checked

        self._zstore = checked(zarr_store(self.path), self.path)  # every chunk read checked
        self.root = _zarr().open_group(store=self._zstore, mode="r+", use_consolidated=False)
        self.attrs = StoreAttrs.from_dict(self.root.attrs.asdict().get("lsn"), self.path)
        self.groups: list[str] = list(self.attrs.corpus.groups)
        self.variables: list[str] = self.attrs.settings.variables

    @classmethod
    def open_for_writing(cls, path: str | Path, fingerprint: dict) -> "Store | None":
        """The store at ``path`` if it holds the harvest ``fingerprint`` describes; None if there is none;
        an error if it holds another. Every open for writing goes through here, under the lease."""
        attrs = read_attrs(path)
        if attrs is None:
            return None
        diffs = fingerprint_differences(attrs.fingerprint, fingerprint)
        if diffs:
            raise HarvestError(f"store {path} holds a different harvest ({diffs[0]}); "
                               "use a new --store, or the same settings to resume")
        if attrs.version < FORMAT_VERSION:
            raise HarvestError(f"store {path} has format version {attrs.version} (no checksums) "
                               "and is read-only: lsn reads it, but harvests only into a new --store")
        fsys, marker = fs.filesystem(creating_marker(path))
        if fsys.exists(marker):  # left by a creator killed after the attributes (by URL or by path)
            fsys.rm(marker)
        return cls(path)

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, attrs: StoreAttrs, *, n_shards: int, owner: dict | None = None,
               ranges: tuple | None = None) -> "Store":
        """Build the whole skeleton of a store with the attributes ``attrs`` (:meth:`StoreAttrs.new`: its
        groups, model shape and statistics); on local disk in a sibling temporary directory renamed into place,
        elsewhere (fsspec URLs) in place, behind a marker written first and removed after the ``lsn``
        attributes that make it a store. Call it holding the store's lease (``owner``: its record;
        by default this process).

        ``n_shards`` is the capacity of the shard dimension: unwritten chunks take no space. ``ranges``:
        the per-neuron histogram ranges ``(lo, width)`` the attributes' ``settings.hist_ranges`` describe.
        """
        _check_ranges(attrs, ranges)
        if read_attrs(path) is not None:
            raise HarvestError(f"store {path} already exists")
        owner = owner or lease.owner_record()
        marker = json.dumps({k: owner.get(k) for k in ("owner", "host", "machine", "pid", "pid_start")})
        if fs.is_url(str(path)):
            fsys, p = fs.filesystem(str(path))
            if fsys.exists(p) and fsys.ls(p):  # read_attrs let it through: a half-made skeleton
                _check_skeleton_only(fsys, p, path)
                print(f"lsn: rebuilding the skeleton of store {path}, left half-made by an interrupted harvest",
                      file=sys.stderr)
                fsys.rm(p, recursive=True)
            fs.write_text(creating_marker(path), marker)
            _write_skeleton(zarr_store(path), attrs, n_shards, ranges)
            fsys.rm(fs.filesystem(creating_marker(path))[1])
            return cls(path)
        return cls(_create_local(Path(os.path.abspath(path)), attrs, n_shards, marker, ranges))

    # -- shards -----------------------------------------------------------------------------
    def array(self, name: str):
        """The store's array ``name``; an error naming it if its metadata is gone."""
        try:
            return self.root[name]
        except KeyError:
            raise HarvestError(f"store {self.path} is damaged: array '{name}' is missing (its zarr.json is gone)"
                               ) from None

    def done(self, indices: list[int]) -> list[bool]:
        """Which of the shards ``indices`` are recorded as finished (one small read each)."""
        done = self.array("shards/done")
        return [bool(done[i]) for i in indices]

    def write_shard(self, index: int, result: dict[int, dict]) -> None:
        """Write one shard's statistics (whole chunks) and their digest, then mark it done."""
        shards = {name: self.array(f"shards/{name}") for name in ("done", "tokens", "digest", *self.variables)}
        tokens = np.zeros(len(self.groups), dtype=np.int64)
        digest = ShardDigest()
        for g in sorted(result):
            values = result[g]
            tokens[g] = values["tokens"]
            for var in self.variables:
                if shards[var].dtype == np.int32 and tokens[g] > np.iinfo(np.int32).max:  # a bin counts <= tokens
                    raise HarvestError(f"shard {index} holds {tokens[g]} tokens of one group, too many for the "
                                       f"int32 rows of '{var}'")
                row = np.asarray(values[var], dtype=shards[var].dtype)
                shards[var][index, g] = row
                if tokens[g] > 0:  # the rows the reduce sums, in its order
                    digest.add(row)
        shards["tokens"][index] = tokens
        shards["digest"][index] = np.frombuffer(digest.digest(tokens), dtype=np.uint8)
        shards["done"][index] = 1

    # -- totals -----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.attrs.complete

    def reduce(self, indices: list[int], corpus_meta: dict | None = None) -> None:
        """Sum the shards ``indices`` into the totals (in index order: deterministic), record
        ``corpus_meta`` (digest, tokens per group, ...), and mark the store complete."""
        require_shard_rows(self.attrs, self.path, "summing the totals")
        indices = sorted(indices)
        missing = [i for i, d in zip(indices, self.done(indices)) if not d]
        if missing:
            raise HarvestError(f"{len(missing)} of {len(indices)} shards are not finished")
        tokens = self.array("shards/tokens")
        shard_tokens = np.stack([tokens[i] for i in indices]) if indices else np.zeros((0, len(self.groups)), int)
        totals = shard_tokens.sum(axis=0)
        self.array("tokens")[:] = totals
        digests = {i: ShardDigest() for i in indices}  # each shard's rows, as write_shard hashed them
        for g in range(len(self.groups)):
            rows = [i for i, n in zip(indices, shard_tokens[:, g]) if n > 0]
            for var in self.variables:
                source = self.array(f"shards/{var}")
                total = np.zeros(source.shape[2:], dtype=self.array(var).dtype)  # int32 hist rows: int64 totals
                for s in rows:
                    row = source[s, g]
                    digests[s].add(row)
                    total += row
                self.array(var)[g] = total
        self._check_digests(digests, shard_tokens)
        meta = self.attrs.meta.replace(corpus=self.attrs.corpus.replace(**(corpus_meta or {})))
        self.set_attrs(meta=meta, complete=True, totals=Totals.of(indices, totals))

    def _check_digests(self, digests: dict, shard_tokens: np.ndarray) -> None:
        """Every shard summed holds the rows it wrote (not rows copied from elsewhere, nor an older write)."""
        stored = self.array("shards/digest")
        for (index, digest), tokens in zip(digests.items(), shard_tokens):
            if digest.digest(tokens) != bytes(stored[index]):
                raise HarvestError(f"store {self.path} is damaged: the rows of shard {index} do not match the "
                                   f"digest written with them (lsn verify {self.path} lists every problem)")

    def set_attrs(self, **values) -> None:
        """Replace fields of the attributes (``complete=True, totals=...``) and write them, checked as
        every read checks them."""
        attrs = StoreAttrs.from_dict(self.attrs.replace(**values).to_dict(), self.path)
        self.root.attrs["lsn"] = attrs.to_dict()
        _zarr().consolidate_metadata(self._zstore)
        self.attrs = attrs


class ShardDigest:
    """The sha256 written with each shard, and checked by the reduce and by ``lsn verify``: the shard's
    rows of every group with tokens, in group order and within a group in the store's variable order
    (each row's bytes in the array's dtype), then its tokens per group (int64)."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def add(self, row: np.ndarray) -> None:
        """The next row (``[L, I(, B)]``), in the order above."""
        self._sha.update(np.ascontiguousarray(row).tobytes())

    def digest(self, tokens) -> bytes:
        """The digest, once every row is in: the shard's ``tokens [group]`` close it."""
        self._sha.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
        return self._sha.digest()


def _remove_dead_partials(path: Path) -> None:
    """Remove temporary directories of earlier creators of this store whose process is gone from this
    host (the marker ``.NAME.partial-ID.json`` written before each says who made it); any other
    directory is left alone."""
    for marker in path.parent.glob(f".{path.name}.partial-*.json"):
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and lease.process_gone(owner):
            shutil.rmtree(Path(str(marker)[:-len(".json")]), ignore_errors=True)
            marker.unlink(missing_ok=True)


_SKELETON = {"zarr.json", "group", "layer", "neuron", "bin", "hist_lo", "hist_hi", "hist_range_lo",
             "hist_range_width", "tokens", "shards",
             *VARIABLES.values()}
"""What a store's skeleton holds at its top level (before any shard or token shard is written)."""


def _finished_shards(fsys, p: str) -> bool:
    """Whether any shard of the store at ``p`` is marked done (a ``done`` chunk is written only then)."""
    return bool(fsys.exists(f"{p}/shards/done/c") and fsys.ls(f"{p}/shards/done/c", detail=False))


def _create_local(path: Path, attrs: "StoreAttrs", n_shards: int, marker: str, ranges: tuple | None) -> Path:
    """:meth:`Store.create` on local disk: built in a sibling temporary directory renamed into place."""
    if path.is_symlink():
        raise HarvestError(f"store path {path} is a symbolic link (to {os.path.realpath(path)}); give the real "
                           "path as --store")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and any(path.iterdir()):  # read_attrs let it through: a creation marker beside it
        _check_skeleton_only(fs.filesystem(str(path))[0], str(path), path)
        print(f"lsn: rebuilding the skeleton of store {path}, left half-made by an interrupted harvest",
              file=sys.stderr)
        shutil.rmtree(path)
    _remove_dead_partials(path)
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    Path(f"{tmp}.json").write_text(marker)  # first: says whose directory this is
    _write_skeleton(zarr_store(tmp), attrs, n_shards, ranges)
    if path.exists():  # an empty directory given as the store path
        path.rmdir()
    tmp.rename(path)
    Path(f"{tmp}.json").unlink()
    marker_path = Path(creating_marker(path))
    if marker_path.exists():  # a file:// creation's, now superseded
        marker_path.unlink()
    return path


def discard(path: str | Path, unless_finished_shards: bool = False) -> bool:
    """Remove the store at ``path`` with its token shards; call it holding the store's lease. With
    ``unless_finished_shards`` a store holding any finished shard is kept (False returned). A local
    store is first renamed aside, so a fault while deleting never leaves a half-deleted store in place."""
    fsys, p = fs.filesystem(str(path))
    if not fsys.exists(p) or (unless_finished_shards and _finished_shards(fsys, p)):
        return False
    if fs.is_url(str(path)):
        fsys.rm(p, recursive=True)
    else:
        local = Path(os.path.abspath(path))
        if local.is_symlink():
            raise HarvestError(f"store path {path} is a symbolic link (to {os.path.realpath(local)}); give the "
                               "store's real path to discard it")
        aside = local.parent / f".{local.name}.discarded-{uuid.uuid4().hex[:8]}"
        local.rename(aside)
        shutil.rmtree(aside)
    marker_fs, marker = fs.filesystem(creating_marker(path))
    if marker_fs.exists(marker):
        marker_fs.rm(marker)
    return True


def _check_skeleton_only(fsys, p: str, path) -> None:
    """Refuse to remove ``p`` unless it holds nothing but a skeleton: names of the skeleton only, no
    finished shard, no token shard. A leftover marker beside other data must never cost that data."""
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fsys.ls(p, detail=False)}
    extra = sorted(names - _SKELETON)
    done = _finished_shards(fsys, p)
    token_shards = fsys.exists(f"{p}/tokens") and any(
        n.rstrip("/").rsplit("/", 1)[-1] not in ("zarr.json", "c") for n in fsys.ls(f"{p}/tokens", detail=False))
    if extra or done or token_shards:
        what = f"'{extra[0]}'" if extra else "finished shards" if done else "token shards"
        raise HarvestError(f"{path} has the marker of an interrupted creation ({creating_marker(path)}) but holds "
                           f"{what}, more than a half-made skeleton; it is left as it is: remove the marker if "
                           "this store is yours and should be resumed, or use another --store")


def _check_ranges(attrs: StoreAttrs, ranges: tuple | None) -> None:
    """The ranges given to :meth:`Store.create` are those its attributes describe (shape and digest)."""
    record = attrs.settings.hist_ranges if "hist" in attrs.settings.stats else None
    if (record is None) != (ranges is None):
        raise HarvestError("a store on per-neuron histogram ranges is created with its ranges, and only such a store")
    if record is not None:
        shape = (attrs.model.layers, attrs.model.width)
        if any(np.shape(a) != shape for a in ranges) or ranges_sha256(*ranges) != record.ranges_sha256:
            raise HarvestError(f"the per-neuron histogram ranges do not match the store's record (shape {shape})")


def _write_skeleton(zstore, attrs: StoreAttrs, n_shards: int, ranges: tuple | None = None) -> None:
    groups, spec = list(attrs.corpus.groups), attrs.settings.spec
    _write_totals_skeleton(zstore, groups, attrs.model.layers, attrs.model.width, spec, ranges)
    rows = hist_row_dtype(attrs.settings.shard_tokens, attrs.settings.seq_len)
    _write_shards_skeleton(zstore, len(groups), attrs.model.layers, attrs.model.width, n_shards, spec, rows)
    root = _zarr().open_group(store=zstore, mode="r+", use_consolidated=False)
    root.attrs["lsn"] = attrs.to_dict()
    _zarr().consolidate_metadata(zstore)


def _write_totals_skeleton(zstore, groups: list[str], n_layers: int, width: int, spec: StatsSpec,
                           ranges: tuple | None = None) -> None:
    """Coordinates and empty (unwritten, zero-filled) total arrays, written by xarray so it reads them back;
    per-neuron histogram ranges ``ranges`` as the coordinates ``hist_range_lo``, ``hist_range_width``."""
    import dask.array as da
    import xarray as xr

    G, L, I = len(groups), n_layers, width
    lc = _layer_chunk(L, I)
    data = {"tokens": (("group",), da.zeros((G,), dtype="int64", chunks=G))}
    for var in (VARIABLES[s] for s in spec.stats if s != "hist"):
        data[var] = (("group", "layer", "neuron"), da.zeros((G, L, I), dtype=_DTYPES[var], chunks=(1, lc, I)))
    coords = {"group": np.array(groups, dtype=object), "layer": np.arange(L), "neuron": np.arange(I)}
    if "hist" in spec.stats:
        B = spec.n_bins
        edges = np.asarray(spec.hist_edges or (), dtype=np.float64)
        data["hist"] = (("group", "layer", "neuron", "bin"),
                        da.zeros((G, L, I, B), dtype="int64", chunks=(1, _layer_chunk(L, I * B), I, B)))
        if ranges is not None:
            coords["hist_range_lo"] = (("layer", "neuron"), np.asarray(ranges[0], np.float32))
            coords["hist_range_width"] = (("layer", "neuron"), np.asarray(ranges[1], np.float32))
        else:
            coords["hist_lo"] = ("bin", np.concatenate([[-np.inf], edges]))
            coords["hist_hi"] = ("bin", np.concatenate([edges, [np.inf]]))
    encoding = {name: {"fill_value": 0, "compressors": _compressors()} for name in data}
    encoding.update({name: {"compressors": _compressors()} for name in coords})
    xr.Dataset(data, coords=coords).to_zarr(zstore, mode="w-", compute=False, zarr_format=3,
                                            encoding=encoding, consolidated=False)


def _write_shards_skeleton(zstore, n_groups: int, n_layers: int, width: int, n_shards: int,
                           spec: StatsSpec, hist_rows: str = "int64") -> None:
    zarr = _zarr()
    shards = zarr.open_group(store=zstore, mode="r+", use_consolidated=False).create_group("shards")
    L, I = n_layers, width
    shards.create_array("done", shape=(n_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                        dimension_names=("shard",), compressors=_compressors())
    shards.create_array("digest", shape=(n_shards, 32), chunks=(1, 32), dtype="uint8", fill_value=0,
                        dimension_names=("shard", "sha256"), compressors=_compressors())
    shards.create_array("tokens", shape=(n_shards, n_groups), chunks=(1, n_groups), dtype="int64",
                        fill_value=0, dimension_names=("shard", "group"), compressors=_compressors())
    for stat in spec.stats:
        var = VARIABLES[stat]
        tail = (spec.n_bins,) if stat == "hist" else ()
        lc = _layer_chunk(L, I * (tail[0] if tail else 1))
        shards.create_array(var, shape=(n_shards, n_groups, L, I, *tail), chunks=(1, 1, lc, I, *tail),
                            dtype=hist_rows if var == "hist" else _DTYPES[var], fill_value=0,
                            compressors=_compressors(),
                            dimension_names=("shard", "group", "layer", "neuron", *(("bin",) if tail else ())))
