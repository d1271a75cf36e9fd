"""Neuron masks: one on-disk format, and the published list-of-LongTensor format.

A mask selects, for each of its languages (groups, in a chosen order), a set of units
``(layer, neuron)`` of a model with ``n_layers`` layers of ``width`` units. On disk (``.npz``, read
with ``allow_pickle=False``)::

    meta            a JSON string: format, format_version, method, params, languages, n_layers, width,
                    source {store, fingerprint_sha256, model, groups used}, extra (appear, tau, ...)
    sel_{k}         int64, the sorted flat indices ``layer * width + neuron`` of language k

The published format (``lsn mask export --format rucaibox``) is a ``torch.save``d list over
languages of lists over layers of sorted ``LongTensor`` neuron indices, ``mask[k][l]``, as the LAPE
code and its successors load it with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harvester.errors import HarvestError

FORMAT = "lsn-mask"
FORMAT_VERSION = 1


def fingerprint_sha(fingerprint: dict) -> str:
    """A short, stable identity of a store's fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


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

    def __post_init__(self):
        if len(self.selected) != len(self.languages):
            raise HarvestError(f"mask has {len(self.languages)} languages but {len(self.selected)} selections")
        total = self.n_layers * self.width
        for k, sel in enumerate(self.selected):
            sel = np.asarray(sel, dtype=np.int64)
            if sel.size and (sel.min() < 0 or sel.max() >= total or np.any(np.diff(sel) <= 0)):
                raise HarvestError(f"mask selection of '{self.languages[k]}' is not sorted unique indices "
                                   f"below {self.n_layers} x {self.width}")
            self.selected[k] = sel

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

    def index(self, language: str) -> int:
        if language not in self.languages:
            raise HarvestError(f"language '{language}' is not in the mask; it has {', '.join(self.languages)}")
        return self.languages.index(language)

    def check_store(self, store: str) -> None:
        """Refuse a store of another shape or another model than the mask was selected on."""
        from harvester.store import read_attrs

        attrs = read_attrs(store)
        if attrs is None:
            raise HarvestError(f"no store at {store}")
        model = attrs["meta"]["model"]
        if (model.get("layers"), model.get("width")) != (self.n_layers, self.width):
            raise HarvestError(f"the mask is for {self.n_layers} layers x {self.width} units, but store {store} "
                               f"has {model.get('layers')} x {model.get('width')}")
        if self.source.get("model") and model.get("id") and self.source["model"] != model["id"]:
            raise HarvestError(f"the mask was selected on model {self.source['model']}, store {store} holds "
                               f"{model['id']}")

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method, "params": self.params,
                "languages": self.languages, "n_layers": self.n_layers, "width": self.width,
                "source": self.source, "extra": self.extra}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, meta=np.array(json.dumps(meta)),
                            **{f"sel_{k}": s for k, s in enumerate(self.selected)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        path = Path(path)
        if not path.is_file():
            raise HarvestError(f"mask file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                selected = [data[f"sel_{k}"] for k in range(len(meta["languages"]))]
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise HarvestError(f"{path} is not an lsn mask file ({type(err).__name__})") from None
        if meta.get("format") != FORMAT:
            raise HarvestError(f"{path} is not an lsn mask file")
        return cls(meta["languages"], meta["n_layers"], meta["width"], selected, meta["method"],
                   meta.get("params", {}), meta.get("source", {}), meta.get("extra", {}))

    # -- the published format ------------------------------------------------------------------
    def to_rucaibox(self) -> list:
        import torch

        return [[torch.as_tensor(idx, dtype=torch.long) for idx in self.layers(k)] for k in range(len(self.languages))]

    def export_rucaibox(self, path: str | Path) -> Path:
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_rucaibox(), path)
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
