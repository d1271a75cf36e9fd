"""Import published per-neuron activation counts into an lsn store, so the analysis reads them as
if they had been harvested here.

Formats (``fmt``), each one file per language in a directory ``DIR``:

``rucaibox``  the LAPE code of Tang et al.: ``activation.{lang}.train.{tag}``, a ``torch.save``d
              dict ``{"n": int tokens, "over_zero": int tensor [L, I]}``. One group per language,
              named ``{lang}``.
``lna``       the alignment study: ``activation.{lang}.{tag}.pt`` (full sequences) and
              ``prefix.activation.{lang}.{tag}.pt`` (the prompts alone), each ``{"total_tokens": int,
              "over_zero": int64 tensor [L, I]}``. Two groups per language, ``{lang}:full`` and
              ``{lang}:prompt`` (in that order, language by language), so that the response-only view
              is ``max(active_full - active_prompt, 0) / max(tokens_full - tokens_prompt, 1)``.

``tag`` (usually the model's name) is found when ``DIR`` holds files of exactly one tag. Every file
is loaded with ``torch.load(weights_only=True)`` (never an arbitrary unpickle) and checked (keys,
integer counts, no negatives, ``over_zero <= tokens``, one shape ``[L, I]`` for all) before anything
is written, and the store is written holding its lease (:mod:`harvester.lease`), as a harvest does, so
an import and a harvest into one new path never mix. The store holds the statistic ``active`` only: the totals ``tokens (group)`` and
``active (group, layer, neuron)``, an empty shard dimension, and attributes shaped like a harvest's
with the model unknown (``model.id`` None) and ``meta.imported = {format, tag, files}``.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harvester import __version__, fs, lease
from harvester.corpus import file_identity
from harvester.corpus.lna import LANGUAGES as LNA_LANGUAGES
from harvester.errors import HarvestError
from harvester.names import check_name, inside
from harvester.stats import StatsSpec
from harvester.store import Store, StoreAttrs, Totals, read_attrs

SPEC = StatsSpec(("active",))


@dataclass(frozen=True)
class Format:
    """Where one published format keeps a language's counts."""

    pattern: str
    """Regex over file names: group 1 the language, group 2 the tag."""
    full: str
    """File name of a language's (full-sequence) counts, from ``lang`` and ``tag``."""
    tokens_key: str
    """The dict key of the token count."""
    prefix: str | None = None
    """File name of a language's prompt-only counts (``lna``), or None."""
    order: tuple[str, ...] = ()
    """The study's own language order (its masks' order), which an import without --langs keeps."""

    def parts(self, lang: str, tag: str) -> list[tuple[str, str]]:
        """``(group name, file name)`` of one language, in store order."""
        if self.prefix is None:
            return [(lang, self.full.format(lang=lang, tag=tag))]
        return [(f"{lang}:full", self.full.format(lang=lang, tag=tag)),
                (f"{lang}:prompt", self.prefix.format(lang=lang, tag=tag))]


FORMATS = {
    # LAPE's released masks: "the language 0-6 indices stand for en, zh, fr, es, vi, id, ja"
    "rucaibox": Format(r"activation\.([^.]+)\.train\.(.+)", "activation.{lang}.train.{tag}", "n",
                       order=("en", "zh", "fr", "es", "vi", "id", "ja")),
    # the alignment study's languages (MGSM's), in its README's order: the order `--corpus lna:` harvests
    "lna": Format(r"activation\.([^.]+)\.(.+)\.pt", "activation.{lang}.{tag}.pt", "total_tokens",
                  prefix="prefix.activation.{lang}.{tag}.pt", order=tuple(LNA_LANGUAGES)),
}


@dataclass
class Counts:
    """One validated file: its group, token count and ``over_zero [L, I]``."""

    group: str
    path: Path
    tokens: int
    active: np.ndarray  # [L, I], integer


def import_published(fmt: str, src: str | Path, store: str | Path, langs: list[str] | None = None,
                     tag: str | None = None) -> Store:
    """Validate every file of ``fmt`` in ``src``, then write them as a new, complete store at ``store``."""
    if fmt not in FORMATS:
        raise HarvestError(f"unknown import format '{fmt}'; choose from {', '.join(FORMATS)}")
    src = Path(src)
    if not src.is_dir():
        raise HarvestError(f"import source {src} is not a directory")
    if read_attrs(store) is not None:
        raise HarvestError(f"store {store} already exists; an import never overwrites a store")
    form = FORMATS[fmt]
    found = _scan(form, src)
    tag = check_name(tag if tag is not None else _only_tag(fmt, src, found), "tag")
    langs = _languages(form, src, found, tag, langs)
    counts = [_load(src / name, group, form.tokens_key) for lang in langs for group, name in form.parts(lang, tag)]
    _check_shapes(counts)
    with lease.acquire(str(store), say=lambda text: print(f"lsn: {text}", file=sys.stderr)) as held:
        return _write(store, _attrs(fmt, src, tag, counts), counts, held.info)


def _scan(form: Format, src: Path) -> dict[str, list[str]]:
    """``{tag: [languages]}`` of the (full-sequence) files in ``src``."""
    found: dict[str, list[str]] = {}
    for path in sorted(src.iterdir()):
        match = re.fullmatch(form.pattern, path.name)
        if match and path.is_file():
            found.setdefault(match.group(2), []).append(match.group(1))
    return found


def _only_tag(fmt: str, src: Path, found: dict[str, list[str]]) -> str:
    if not found:
        raise HarvestError(f"no activation.* files for format {fmt} in {src}")
    if len(found) > 1:
        raise HarvestError(f"{src} holds files of several tags ({', '.join(sorted(found))}); "
                           "choose one with --tag")
    return next(iter(found))


def _languages(form: Format, src: Path, found: dict[str, list[str]], tag: str,
               langs: list[str] | None) -> list[str]:
    """The requested languages in order, each with all its files. Default: all of ``tag``, in the study's
    own order (:attr:`Format.order`), then any others alphabetically, as one line says."""
    if langs is None:
        present = set(found.get(tag, []))
        langs = [lang for lang in form.order if lang in present] + sorted(present - set(form.order))
        if not langs:
            raise HarvestError(f"no {form.full.format(lang='*', tag=tag)} files in {src}"
                               + (f" (tags there: {', '.join(sorted(found))})" if found else ""))
        print(f"lsn: languages in the study's order: {', '.join(langs)} (--langs sets another)", file=sys.stderr)
    seen = set()
    for lang in langs:
        check_name(lang, "language")
        if lang in seen:
            raise HarvestError(f"language '{lang}' is given twice")
        seen.add(lang)
        for _, name in form.parts(lang, tag):
            if not inside(src, name, follow_links=False).is_file():
                raise HarvestError(f"language '{lang}': file {src / name} not found")
    return list(langs)


def _load(path: Path, group: str, tokens_key: str) -> Counts:
    """Load one file safely and check that it holds integer counts ``0 <= over_zero <= tokens``."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to unpickle safely is the same user error
        raise HarvestError(f"{path}: cannot be loaded with torch.load(weights_only=True) ({_reason(err)})") from None
    if not isinstance(data, dict) or tokens_key not in data or "over_zero" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise HarvestError(f"{path}: expected a dict with keys '{tokens_key}' and 'over_zero', found {keys}")
    tokens = _integer(data[tokens_key], path, tokens_key)
    over_zero = data["over_zero"]
    if not isinstance(over_zero, torch.Tensor) or over_zero.dim() != 2:
        raise HarvestError(f"{path}: over_zero must be a 2-D tensor [layers, neurons]")
    if over_zero.dtype == torch.bool or over_zero.is_floating_point() or over_zero.is_complex():
        raise HarvestError(f"{path}: over_zero has dtype {over_zero.dtype}; expected integer counts")
    active = over_zero.detach().cpu().numpy()  # [L, I]
    if active.size == 0:
        raise HarvestError(f"{path}: over_zero is empty (shape {tuple(active.shape)})")
    if tokens < 0 or active.min() < 0:
        raise HarvestError(f"{path}: negative counts ({tokens_key}={tokens}, min over_zero={int(active.min())})")
    if active.max() > tokens:
        layer, neuron = np.unravel_index(int(active.argmax()), active.shape)
        raise HarvestError(f"{path}: over_zero[{layer}, {neuron}] = {int(active.max())} exceeds "
                           f"{tokens_key} = {tokens}")
    return Counts(group, path, tokens, active)


def _integer(value, path: Path, key: str) -> int:
    """A token count: a Python/NumPy integer or a one-element integer tensor (not a bool or a float)."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value.item())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise HarvestError(f"{path}: '{key}' must be an integer token count, found {type(value).__name__} {value!r:.40}")


def _reason(err: Exception) -> str:
    """One line from torch's (long, multi-line) load errors."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds a pickled {found.group(1)}, not only tensors and plain containers"
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _check_shapes(counts: list[Counts]) -> None:
    first = counts[0]
    for c in counts[1:]:
        if c.active.shape != first.active.shape:
            raise HarvestError(f"{c.path}: over_zero has shape {tuple(c.active.shape)}, but {first.path.name} "
                               f"has {tuple(first.active.shape)}")


def _write(store: str | Path, attrs: StoreAttrs, counts: list[Counts], owner: dict) -> Store:
    """Create the store (holding its lease: ``owner``), write the totals, mark it complete; on any
    failure, remove what was made."""
    out = Store.create(store, attrs, n_shards=0, owner=owner)
    tokens = np.array([c.tokens for c in counts], dtype=np.int64)
    try:
        out.root["tokens"][:] = tokens
        for g, c in enumerate(counts):
            out.root["active"][g] = c.active.astype(np.int64)  # [L, I]
        out.set_attrs(complete=True, totals=Totals.of([], tokens))
    except BaseException:
        _remove(store)
        raise
    return out


def _attrs(fmt: str, src: Path, tag: str, counts: list[Counts]) -> StoreAttrs:
    """Attributes made as a harvest's: what is unknown about the source is None."""
    import torch

    files = [{**file_identity(c.path), "group": c.group} for c in counts]
    groups = [c.group for c in counts]
    fingerprint = {
        "model": {"id": None, "revision": None, "weights": None, "architecture": None, "site": None,
                  "unit": None, "dtype": None, "device": None, "device_map": None},
        "tokenizer": {"name": None, "vocab_size": None, "eos_token_id": None, "sha256": None},
        "corpus": {"spec": f"import:{fmt}:{src}", "groups": groups, "streams": [],
                   "source": [{k: f[k] for k in ("file", "size", "sha256")} for f in files], "options": None},
        "settings": {"backend": None, "seq_len": None, "batch_size": None, "shard_tokens": None,
                     "stats": list(SPEC.stats), "hist_edges": None, "pooling": "token"},
    }
    tokens = [c.tokens for c in counts]
    n_layers, width = counts[0].active.shape
    return StoreAttrs.new(fingerprint, layers=int(n_layers), width=int(width), specs=[fingerprint["corpus"]["spec"]],
                          versions={"lsn-harvester": __version__, "torch": torch.__version__},
                          imported={"format": fmt, "tag": tag, "files": files},
                          corpus={"tokens_per_group": tokens, "tokens": sum(tokens), "shards": 0, "digest": None})


def _remove(store: str | Path) -> None:
    if fs.is_url(str(store)):
        fsys, p = fs.filesystem(str(store))
        if fsys.exists(p):
            fsys.rm(p, recursive=True)
    else:
        shutil.rmtree(store, ignore_errors=True)
