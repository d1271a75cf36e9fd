"""Neuron masks: one on-disk format, and the published list-of-LongTensor format.

A mask selects, for each of its languages (groups, in a chosen order), a set of units
``(layer, neuron)`` of a model with ``n_layers`` layers of ``width`` units. On disk (``.npz``, read
with ``allow_pickle=False``)::

    meta            a JSON string: format, format_version, method, params, languages, n_layers, width,
                    source {store (absolute path or URL), fingerprint_sha256,
                    model, site, groups used, subtracted: per language, full - prompt},
                    extra (appear, tau, ...), and with ``lsn analyze --bootstrap`` bootstrap
                    {resamples N, seed, stable F, need ⌈F·N⌉, draw, shards per store group}
    sel_{k}         int64, the sorted flat indices ``layer * width + neuron`` of language k
    boot_units_{k}  (bootstrap) int64, the sorted flat indices selected for language k in at least
                    one resample (sparse: a dense [K, L, I] is too large at 70B shape)
    boot_times_{k}  (bootstrap) int64, in how many of the N resamples each of them was selected
    boot_stable_{k} (bootstrap) int64, the stable mask: those selected in at least ⌈F·N⌉ resamples
    boot_jaccard    (bootstrap) float64 [N, K], each resample's Jaccard to the full-data mask

The published format (``lsn mask export --format rucaibox``) is a ``torch.save``d list over
languages of lists over layers of sorted ``LongTensor`` neuron indices, ``mask[k][l]``, as the LAPE
code and its successors load it with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harvester import fs
from harvester.errors import FAULTS, HarvestError
from harvester.names import check_name

FORMAT = "lsn-mask"
FORMAT_VERSION = 1


def model_identity(model: dict) -> dict:
    """What names a model's weights, from a store fingerprint's ``model`` (or the model loaded now):
    ``id`` (as given to --model), ``revision`` (the hub commit) and ``weights`` (hash of the weight files)."""
    return {k: model.get(k) for k in ("id", "revision", "weights", "weights_sampled")}


def same_model(a: dict, b: dict) -> bool | None:
    """Whether two identities are one model: by the weights' hash when both have one (a model moved
    to another path is the same; new weights under the same name are not), else by id and (where both
    know it) revision; None when one side names nothing."""
    if a.get("weights") and b.get("weights"):
        full_a, full_b = (str(x["weights"]).startswith("sha256-full:") for x in (a, b))
        if full_a == full_b:
            return a["weights"] == b["weights"]
        old, new = (a, b) if full_b else (b, a)  # a mask or store from before the full hash
        if new.get("weights_sampled"):
            return old["weights"] == new["weights_sampled"]
    if a.get("id") and b.get("id"):
        return a["id"] == b["id"] and (not a.get("revision") or not b.get("revision") or a["revision"] == b["revision"])
    return None


def check_applied(origin: dict | None, subject: str, target: dict | None, where: str, shape: str,
                  allow_other: bool | None = False) -> str | None:
    """Refuse what came from model ``origin`` (a mask, a store's statistics) on another model ``target``
    in one line naming both, unless ``allow_other`` (None: the command has no --allow-other-model).
    Returns a one-line note to print when it goes ahead anyway, or by shape alone because one side
    records no model (an imported mask or store); None when both are the same model."""
    same = same_model(origin, target) if origin and target else None
    if same:
        return None
    if same is None:
        if not origin:
            return (f"{subject.split(' was ')[0]} records no model (imported, or made from an imported store): "
                    f"accepted on {where} by shape, {shape}")
        return f"{where} records no model to compare with {describe_model(origin)}: accepted by shape, {shape}"
    if allow_other:
        return (f"{subject} {describe_model(origin)}; applied to {describe_model(target)} ({where}) "
                "as --allow-other-model asks")
    hint = "" if allow_other is None else "; pass --allow-other-model to apply it to another model"
    raise HarvestError(f"{subject} {describe_model(origin)}, but {where} is {describe_model(target)}{hint}")


def store_location(store: str) -> str:
    """How a mask records its store: a URL as given, a local path made absolute, so that the mask
    finds it from any directory."""
    from harvester import fs

    return str(store) if fs.is_url(str(store)) else str(Path(store).expanduser().resolve())


def is_located(store: str) -> bool:
    """Whether a recorded store names one place wherever it is read from (not an older relative path)."""
    from harvester import fs

    return fs.is_url(store) or Path(store).is_absolute()


def describe_model(identity: dict) -> str:
    """``ID (revision R, weights 1a2b3c4d)``, for messages."""
    extra = [f"revision {identity['revision']}"] if identity.get("revision") else []
    weights = str(identity.get("weights") or "").removeprefix("sha256-full:")
    extra += [f"weights {weights[:12]}"] if weights else []
    return f"model {identity.get('id') or '(unnamed)'}" + (f" ({', '.join(extra)})" if extra else "")


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two sorted unique index arrays; 1.0 when both are empty."""
    shared = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - shared
    return 1.0 if union == 0 else shared / union


@dataclass
class Bootstrap:
    """How stable a mask is over bootstrap resamples of its store's shards (``lsn analyze METHOD
    --bootstrap N``; docs/METHODS.md, "Bootstrap stability"). The mask's own selection stays the
    full-data one; :meth:`stable_selected` is the stable mask beside it."""

    resamples: int
    """N: the resamples drawn."""
    seed: int
    """the seed of ``numpy.random.default_rng`` that drew them"""
    stable: float
    """F: a unit is stable for a language when selected in at least ⌈F·N⌉ resamples"""
    units: list[np.ndarray]
    """Per language: sorted flat indices of the units selected in at least one resample (int64)."""
    times: list[np.ndarray]
    """Per language: in how many resamples each of :attr:`units` was selected (int64, 1..N)."""
    jaccard: np.ndarray
    """float64 ``[N, K]``: each resample's mask against the full-data mask, per language."""
    shards: dict = field(default_factory=dict)
    """Store group -> the shards its resamples were drawn from (``--shard-tokens`` sets how many)."""

    @property
    def need(self) -> int:
        """⌈F·N⌉: the resamples a stable unit is selected in (F·N rounded to 9 places first, so that
        0.7 · 10 is 7)."""
        return max(1, math.ceil(round(self.stable * self.resamples, 9)))

    def stable_selected(self) -> list[np.ndarray]:
        """Per language, the stable mask: the units selected in at least :attr:`need` resamples."""
        return [u[t >= self.need] for u, t in zip(self.units, self.times)]

    def band(self) -> np.ndarray:
        """``[K, 3]``: per language the mean Jaccard and its 5th and 95th percentiles (NumPy's linear)."""
        return np.column_stack([self.jaccard.mean(axis=0), *np.percentile(self.jaccard, [5, 95], axis=0)])

    def meta(self) -> dict:
        return {"resamples": self.resamples, "seed": self.seed, "stable": self.stable, "need": self.need,
                "draw": DRAW, "shards": self.shards}

    def arrays(self) -> dict:
        out = {"boot_jaccard": np.asarray(self.jaccard, np.float64)}
        for k, (units, times, stable) in enumerate(zip(self.units, self.times, self.stable_selected())):
            out.update({f"boot_units_{k}": units, f"boot_times_{k}": times, f"boot_stable_{k}": stable})
        return out

    @classmethod
    def read(cls, meta: dict, data, languages: list[str], total: int) -> "Bootstrap":
        """From a mask file's ``bootstrap`` meta and arrays; an error naming what is wrong."""
        K = len(languages)
        ok = (isinstance(meta, dict) and isinstance(meta.get("resamples"), int) and meta["resamples"] >= 1
              and isinstance(meta.get("seed"), int) and isinstance(meta.get("stable"), (int, float))
              and 0 < meta["stable"] <= 1 and isinstance(meta.get("shards", {}), dict))
        if not ok:
            raise HarvestError("mask metadata 'bootstrap' needs resamples >= 1, an integer seed and stable in (0, 1]")
        boot = cls(meta["resamples"], meta["seed"], float(meta["stable"]),
                   [np.asarray(data[f"boot_units_{k}"]) for k in range(K)],
                   [np.asarray(data[f"boot_times_{k}"]) for k in range(K)],
                   np.asarray(data["boot_jaccard"]), meta.get("shards", {}))
        boot.check(languages, total)
        stored = [np.asarray(data[f"boot_stable_{k}"]) for k in range(K)]
        if any(not np.array_equal(a, b) for a, b in zip(stored, boot.stable_selected())):
            raise HarvestError("its bootstrap stable mask is not the units selected in at least "
                               f"{boot.need} of {boot.resamples} resamples")
        return boot

    def check(self, languages: list[str], total: int) -> None:
        N, K = self.resamples, len(languages)
        if len(self.units) != K or len(self.times) != K or self.jaccard.shape != (N, K):
            raise HarvestError(f"its bootstrap data are not {K} languages x {N} resamples")
        if self.jaccard.dtype.kind != "f" or not np.all((self.jaccard >= 0) & (self.jaccard <= 1)):
            raise HarvestError("its bootstrap Jaccards must be numbers in [0, 1]")
        for lang, units, times in zip(languages, self.units, self.times):
            if units.ndim != 1 or times.shape != units.shape or units.dtype.kind not in "iu" \
                    or times.dtype.kind not in "iu":
                raise HarvestError(f"its bootstrap frequencies of '{lang}' are not two equally long integer arrays")
            if units.size and (units.min() < 0 or units.max() >= total or np.any(np.diff(units) <= 0)
                               or times.min() < 1 or times.max() > N):
                raise HarvestError(f"its bootstrap frequencies of '{lang}' are not sorted unique units below "
                                   f"{total}, each selected 1 to {N} times")


DRAW = ("each store group's shards (plan order) drawn n of n with replacement, group by group in store "
        "order, by numpy.random.default_rng(seed).integers(0, n, size=n); groups holding exactly the same "
        "shards share one draw")
"""The bootstrap's drawing protocol, recorded in each mask it writes (analysis.bootstrap.draw_weights)."""


@dataclass
class Mask:
    languages: list[str]
    n_layers: int
    width: int
    selected: list[np.ndarray]
    """Per language: sorted, unique flat indices ``layer * width + neuron`` (int64)."""
    method: str
    params: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    bootstrap: Bootstrap | None = None
    """How often each unit was selected over bootstrap resamples (``--bootstrap``), or None."""

    def __post_init__(self):
        for name in self.languages:
            check_name(name, "mask language")
        if len(set(self.languages)) != len(self.languages):
            raise HarvestError(f"a mask language is named twice: {', '.join(self.languages)}")
        if len(self.selected) != len(self.languages):
            raise HarvestError(f"mask has {len(self.languages)} languages but {len(self.selected)} selections")
        total = self.n_layers * self.width
        for k, sel in enumerate(self.selected):
            sel = np.asarray(sel, dtype=np.int64)
            if sel.size and (sel.min() < 0 or sel.max() >= total or np.any(np.diff(sel) <= 0)):
                raise HarvestError(f"mask selection of '{self.languages[k]}' is not sorted unique indices "
                                   f"below {self.n_layers} x {self.width}")
            self.selected[k] = sel
        if self.bootstrap is not None:
            self.bootstrap.check(self.languages, total)

    # -- views ---------------------------------------------------------------------------------
    @classmethod
    def from_layers(cls, layers: list[list], languages: list[str], n_layers: int, width: int, method: str,
                    **kw) -> "Mask":
        """From ``mask[k][l]`` neuron indices."""
        if len(layers) != len(languages) or any(len(per) != n_layers for per in layers):
            raise HarvestError(f"a mask needs {len(languages)} languages x {n_layers} layers of indices")
        selected = []
        for per in layers:
            flat = [np.asarray(idx, dtype=np.int64).reshape(-1) + l * width for l, idx in enumerate(per)]
            for l, idx in enumerate(per):
                idx = np.asarray(idx).reshape(-1)
                if idx.size and (idx.min() < 0 or idx.max() >= width):
                    raise HarvestError(f"mask index out of range 0..{width - 1} in layer {l}")
            selected.append(np.unique(np.concatenate(flat)) if flat else np.zeros(0, np.int64))
        return cls(list(languages), n_layers, width, selected, method, **kw)

    def layers(self, k: int) -> list[np.ndarray]:
        """Language ``k``'s sorted neuron indices per layer."""
        sel = self.selected[k]
        cuts = np.searchsorted(sel, np.arange(self.n_layers + 1) * self.width)
        return [sel[cuts[l]:cuts[l + 1]] - l * self.width for l in range(self.n_layers)]

    def counts(self) -> np.ndarray:
        """``[K, L]`` selected units per language and layer."""
        return np.stack([np.bincount(s // self.width, minlength=self.n_layers) for s in self.selected]) \
            if self.selected else np.zeros((0, self.n_layers), int)

    def dense(self) -> np.ndarray:
        """Boolean ``[K, L, I]``."""
        out = np.zeros((len(self.languages), self.n_layers * self.width), dtype=bool)
        for k, sel in enumerate(self.selected):
            out[k, sel] = True
        return out.reshape(len(self.languages), self.n_layers, self.width)

    def jaccard(self, other: "Mask") -> np.ndarray:
        """``[K]``: per language, ``|A ∩ B| / |A ∪ B|`` of this mask's and ``other``'s units (flat indices),
        1.0 where both are empty; ``other`` must have the same languages, in order, and shape."""
        if other.languages != self.languages or (other.n_layers, other.width) != (self.n_layers, self.width):
            raise HarvestError(f"masks of different languages or shapes cannot be compared: {', '.join(self.languages)} "
                               f"({self.n_layers} x {self.width}) and {', '.join(other.languages)} "
                               f"({other.n_layers} x {other.width})")
        return np.array([set_jaccard(a, b) for a, b in zip(self.selected, other.selected)], np.float64)

    def empty_languages(self) -> list[str]:
        """Languages with no selected unit: intervening on them changes nothing."""
        return [lang for lang, sel in zip(self.languages, self.selected) if sel.size == 0]

    def index(self, language: str) -> int:
        if language not in self.languages:
            raise HarvestError(f"language '{language}' is not in the mask; it has {', '.join(self.languages)}")
        return self.languages.index(language)

    def identity(self) -> dict | None:
        """The model the mask was selected on (``id``, ``revision``, ``weights``), from its source; a mask
        made before the source recorded the weights takes them from its store when that is still the
        same store (same fingerprint). None when the mask records no model (an imported mask, or one
        selected on an imported store)."""
        src = self.source
        found = {k: src.get("model" if k == "id" else k) for k in ("id", "revision", "weights")}
        if not found["weights"] and src.get("fingerprint_sha256"):
            with contextlib.suppress(HarvestError, OSError, ValueError, KeyError, TypeError):
                from harvester.store import read_attrs

                store, _ = self.find_store()
                if store:
                    found = model_identity(read_attrs(store).model.to_dict())
        return found if found["id"] or found["weights"] else None

    def find_store(self, given: str | None = None) -> tuple[str | None, str | None]:
        """``(store, note)``: the store of the mask's statistics and site. ``given`` (--store) is used as
        asked, with a note when it holds another harvest than the mask's (another fingerprint digest).
        Otherwise the recorded store (an absolute path or URL; an older mask's relative path is read
        from the current directory), which must still hold the mask's harvest. ``(None, note)`` when
        it is not there, the note naming --store; ``(None, None)`` when the mask records none."""
        from harvester.store import fingerprint_sha256, read_attrs

        recorded, digest = self.source.get("store"), self.source.get("fingerprint_sha256")
        where = "" if not recorded or is_located(recorded) else f" (a relative path, read from {Path.cwd()})"
        if given:
            attrs = read_attrs(given)
            found = fingerprint_sha256(attrs.fingerprint) if attrs else None
            if digest and found and found != digest:
                return given, (f"store {given} holds another harvest (fingerprint sha256 {found[:12]}) than the "
                               f"mask's store {recorded} ({digest[:12]}); its statistics and site are used, "
                               "as --store asks")
            return given, None
        if not recorded:
            return None, None
        attrs = read_attrs(recorded)
        if attrs is None:
            return None, f"the mask's store {recorded}{where} is not there; pass --store with where it is now"
        found = fingerprint_sha256(attrs.fingerprint)
        if digest and found != digest:
            raise HarvestError(f"{recorded}{where} holds another harvest (fingerprint sha256 {found[:12]}) than the "
                               f"mask was made from ({digest[:12]}); pass --store with the mask's store")
        return recorded, None

    def check_model(self, target: dict, where: str, allow_other: bool | None = False) -> str | None:
        """Refuse to apply the mask to another model than it was selected on (:func:`check_applied`)."""
        return check_applied(self.identity(), "the mask was selected on", target, where,
                             f"{self.n_layers} x {self.width}", allow_other)

    def check_store(self, store: str, allow_other: bool | None = None) -> list[str]:
        """Refuse a store of another shape or another model than the mask was selected on, or one whose
        harvest did not finish; returns the notes to print (another harvest, as :meth:`find_store`;
        another or no model, as :meth:`check_model`)."""
        from harvester.store import open_finished

        model = open_finished(store).model
        if (model.layers, model.width) != (self.n_layers, self.width):
            raise HarvestError(f"the mask is for {self.n_layers} layers x {self.width} units, but store {store} "
                               f"has {model.layers} x {model.width}")
        notes = [self.find_store(store)[1], self.check_model(model_identity(model.to_dict()), f"store {store}",
                                                            allow_other)]
        return [n for n in notes if n]

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = fs.output_file(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method, "params": self.params,
                "languages": self.languages, "n_layers": self.n_layers, "width": self.width,
                "source": self.source, "extra": self.extra}
        arrays = {f"sel_{k}": s for k, s in enumerate(self.selected)}
        if self.bootstrap is not None:
            meta["bootstrap"] = self.bootstrap.meta()
            arrays.update(self.bootstrap.arrays())
        with fs.atomic_write(str(path)) as f:  # a full disk leaves no partial mask
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        path = Path(path)
        if not path.is_file():
            raise HarvestError(f"mask {path} is a directory, not a mask file" if path.is_dir()
                               else f"mask file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise _unreadable(path, "its meta names no lsn mask format")
                _check_meta(meta, path)
                selected = [data[f"sel_{k}"] for k in range(len(meta["languages"]))]
                boot = _read_bootstrap(meta, data, path)
        except OSError as err:
            if err.errno in FAULTS:
                raise  # a filesystem fault, not the file's: the CLI names it and what to do
            raise _unreadable(path, _reason(err)) from None
        except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise _unreadable(path, _reason(err)) from None  # truncated, garbage, a flipped byte, a hand edit
        for k, sel in enumerate(selected):
            if sel.ndim != 1 or sel.dtype.kind not in "iu":
                raise HarvestError(f"{path}: sel_{k} must be a 1-d integer array, not {sel.dtype} of shape {sel.shape}")
        try:
            return cls(meta["languages"], meta["n_layers"], meta["width"], selected, meta["method"],
                       meta.get("params", {}), meta.get("source", {}), meta.get("extra", {}), boot)
        except HarvestError as err:
            raise HarvestError(f"{path}: {err}") from None

    # -- the published format ------------------------------------------------------------------
    def to_rucaibox(self) -> list:
        import torch

        return [[torch.as_tensor(idx, dtype=torch.long) for idx in self.layers(k)] for k in range(len(self.languages))]

    def export_rucaibox(self, path: str | Path) -> Path:
        import torch

        path = fs.output_file(path)
        with fs.atomic_write(str(path)) as f:
            torch.save(self.to_rucaibox(), f)
        return path

    @classmethod
    def import_rucaibox(cls, path: str | Path, languages: list[str] | None = None, width: int | None = None) -> "Mask":
        """Read ``mask[k][l]`` LongTensors (``weights_only=True``); languages default to ``lang0, lang1, ...``;
        the width, unless given, is taken as one more than the largest index (record the real one if known)."""
        import pickle

        import torch

        path = Path(path)
        if not path.is_file():
            raise HarvestError(f"mask file not found: {path}")
        try:
            obj = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise HarvestError(f"{path}: not a torch file that loads with weights_only=True "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        ok = isinstance(obj, (list, tuple)) and obj and all(
            isinstance(per, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dim() == 1 and
                                                   not t.is_floating_point() for t in per) for per in obj)
        if not ok or len({len(per) for per in obj}) != 1:
            raise HarvestError(f"{path}: expected a list over languages of equally long lists over layers "
                               "of 1-d integer tensors")
        languages = list(languages) if languages else [f"lang{k}" for k in range(len(obj))]
        if len(languages) != len(obj):
            raise HarvestError(f"{path} holds {len(obj)} languages, but {len(languages)} names were given")
        n_layers = len(obj[0])
        largest = max((int(t.max()) for per in obj for t in per if t.numel()), default=-1)
        width = width or largest + 1
        if largest >= width:
            raise HarvestError(f"{path}: index {largest} does not fit width {width}")
        layers = [[t.numpy() for t in per] for per in obj]
        return cls.from_layers(layers, languages, n_layers, width, "imported:rucaibox",
                               source={"file": str(path)})


def _read_bootstrap(meta: dict, data, path: Path) -> Bootstrap | None:
    """A mask file's bootstrap data (None in a mask without, as every mask before --bootstrap)."""
    if "bootstrap" not in meta:
        return None
    try:
        return Bootstrap.read(meta["bootstrap"], data, meta["languages"], meta["n_layers"] * meta["width"])
    except HarvestError as err:
        raise HarvestError(f"{path}: {err}") from None


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0][:120] if str(err) else ""
    text = "not a NumPy .npz archive" if "pickle" in text else text  # not numpy's advice to unpickle
    return f"{type(err).__name__}{': ' + text if text else ''}"


def _unreadable(path: Path, reason: str) -> HarvestError:
    return HarvestError(f"{path} is not an lsn mask file, or it is damaged ({reason}); write it again "
                        "(lsn analyze), or pass another mask")


# what Mask.load requires of the meta JSON: key -> (types, required)
_META = {"format_version": (int, True), "method": (str, True), "languages": (list, True), "n_layers": (int, True),
         "width": (int, True), "params": (dict, False), "source": (dict, False), "extra": (dict, False)}
# what the checks against a model read from the source: key -> types (None allowed)
_SOURCE = {"store": str, "fingerprint_sha256": str, "model": str, "revision": str, "weights": str, "file": str,
           "groups": list, "site": str, "subtracted": list}


def _check_meta(meta: dict, path: Path) -> None:
    """Types and keys of a mask file's meta, each fault one line naming the file."""
    for key, (types, required) in _META.items():
        if key not in meta:
            if required:
                raise HarvestError(f"{path}: mask metadata lacks '{key}'")
            continue
        value = meta[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise HarvestError(f"{path}: mask metadata '{key}' must be {types.__name__}, not {type(value).__name__}")
    if meta["format_version"] > FORMAT_VERSION:
        raise HarvestError(f"{path}: mask format version {meta['format_version']} is newer than this lsn "
                           f"reads ({FORMAT_VERSION})")
    if meta["n_layers"] <= 0 or meta["width"] <= 0:
        raise HarvestError(f"{path}: mask metadata n_layers and width must be positive")
    for key, types in _SOURCE.items():
        value = meta.get("source", {}).get(key)
        if value is not None and not isinstance(value, types):
            raise HarvestError(f"{path}: mask metadata source '{key}' must be {types.__name__}, "
                               f"not {type(value).__name__}")
    subtracted = meta.get("source", {}).get("subtracted")
    if subtracted is not None and not all(isinstance(x, bool) for x in subtracted):
        raise HarvestError(f"{path}: mask metadata source 'subtracted' must be a list of booleans")
    groups = meta.get("source", {}).get("groups")
    if groups is not None and not all(isinstance(g, list) and all(isinstance(x, str) for x in g) for g in groups):
        raise HarvestError(f"{path}: mask metadata source 'groups' must be lists of group names")
