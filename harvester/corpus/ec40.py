"""``ec40[:PATH]``: EC40, English-centric parallel text in 40 languages (80 directions).

EC40 (Tan & Monz, EMNLP 2023, "Towards a Better Understanding of Variations in Zero-Shot Neural
Machine Translation Performance"; the corpus of Tan et al., EMNLP 2024, "Neuron Specialization") is
the hub dataset ``ShaomuTan/EC40``, mirrored under ``EC40_dataset/`` in github.com/Smu-Tan/ZS-NMT-Variations.
Both hold plain, line-aligned UTF-8 text files, one sentence per line, line *i* of the English file
translating line *i* of the other::

    EC40-train-set/en-xx.en    EC40-train-set/en-xx.xx                 train (sampled from OPUS)
    Ntrex-eval-set/test.en-xx.en    Ntrex-eval-set/test.en-xx.xx       validation (NTREX-128)
    Flores200-test-set/en-test-set/test.en-xx.en    .../test.en-xx.xx  test (FLORES-200 dev+devtest)

There are only ``en-xx`` files: direction ``xx-en`` reads the same pair of files with the sides
swapped. (``Flores200-test-set/zeroshot-test-set/test.xx-yy.*`` holds the non-English directions,
which this corpus does not read.) The train layout is confirmed file by file on the hub and in the
mirror; the validation and test names are confirmed in the mirror and by single files on the hub
(``Ntrex-eval-set/test.en-es.en``, ``Flores200-test-set/{en,zeroshot}-test-set``). NTREX-128 has no
Occitan, Asturian or Kabyle, so their validation files may be missing or differ from the others:
a missing file is a clear error naming it.

Documents: the first ``max_pairs`` pairs of a direction in file order, each
``[(dir:src, source), (dir:tgt, target)]``; pairs where either side is blank are skipped (they do
not count towards ``max_pairs``). ``--sides src`` or ``tgt`` keeps one side of each pair (each a
document of its own; the groups are that side's only); ``--template`` (a format string with ``{src}``,
:mod:`harvester.corpus.template`) rewrites the source side, e.g. the Aya study's
``Translate from {src_lang} to {tgt_lang}: {src}``. Without PATH the needed files are downloaded from the hub (whole
files: a high-resource train file is hundreds of MB); with PATH they are read from a local
directory with the same layout, whose files decide which languages ``pairs=all`` takes.
"""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path
from typing import Iterator

from harvester.corpus import CorpusOptions, Segment, Stream, decode_line, file_identity, split_list
from harvester.corpus.template import ec40_template
from harvester.errors import HarvestError

HUB_REPO = "ShaomuTan/EC40"

TIERS: dict[str, tuple[str, ...]] = {
    "high": ("de", "nl", "fr", "es", "ru", "cs", "hi", "bn", "ar", "he"),  # 5M pairs each
    "medium": ("sv", "da", "it", "pt", "pl", "bg", "kn", "mr", "mt", "ha"),  # 1M
    "low": ("af", "lb", "ro", "oc", "uk", "sr", "sd", "gu", "ti", "am"),  # 100k
    "extremely-low": ("no", "is", "ast", "ca", "be", "bs", "ne", "ur", "kab", "so"),  # 50k
}
"""EC40's resource tiers (dataset card); each has two languages of each of five families
(Germanic, Romance, Slavic, Indo-Aryan, Afro-Asiatic)."""

LANGUAGES = tuple(lang for tier in TIERS.values() for lang in tier)

SPLITS = {
    "train": ("EC40-train-set", ""),
    "validation": ("Ntrex-eval-set", "test."),
    "test": ("Flores200-test-set/en-test-set", "test."),
}
"""Split -> (folder, file name prefix): files are ``{folder}/{prefix}en-{xx}.{en|xx}``."""


SIDES = ("src", "tgt")
"""A direction's two groups: its source side, then its target side."""


def side_group(direction: str, side: str) -> str:
    """The group of one side of a direction: ``en-fr:src`` (English), ``en-fr:tgt`` (French)."""
    return f"{direction}:{side}"


def parse_side(group: str) -> tuple[str, str] | None:
    """``(direction, language written on that side)`` of a group named by :func:`side_group`
    (``fr-en:src`` -> ``("fr-en", "fr")``); None for any other name."""
    direction, _, side = group.rpartition(":")
    source, dash, target = direction.partition("-")
    if side not in SIDES or not dash or not source or not target or "-" in target or "en" not in (source, target):
        return None
    return direction, source if side == "src" else target


def split_files(split: str, lang: str) -> tuple[str, str]:
    """Repository paths of the English and the other side of ``en-{lang}`` in ``split``."""
    folder, prefix = SPLITS[split]
    stem = f"{folder}/{prefix}en-{lang}"
    return f"{stem}.en", f"{stem}.{lang}"


class EC40Corpus:
    """Translation pairs, one stream per direction; groups ``{dir}:src`` and ``{dir}:tgt``."""

    def __init__(self, spec: str, path: str, options: CorpusOptions):
        self.spec = spec
        self.split = options.split
        self.max_pairs = options.max_pairs
        self.root = Path(path).expanduser() if path else None
        self.revision: str | None = None
        if self.root is not None and not self.root.is_dir():
            raise HarvestError(f"EC40 directory not found: {self.root}")
        if self.root is None:
            available, where = LANGUAGES, HUB_REPO
        else:
            available, where = self._local_languages(), self.root / SPLITS[self.split][0]
        self.directions = parse_directions(options.pairs, available, where)
        langs = dict.fromkeys(_other(d) for d in self.directions)
        self.files = {lang: self._fetch(lang) for lang in langs}
        for lang in langs:
            self._check(lang)
        self.sides = SIDES if options.sides == "both" else (options.sides,)
        self.template = ec40_template(options.template)
        if self.template is not None and "src" not in self.sides:
            raise HarvestError("--template rewrites EC40's source side, which --sides tgt leaves out")
        self.groups = [side_group(d, side) for d in self.directions for side in self.sides]
        self.streams = [Stream(d, packing="sequence") for d in self.directions]

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        english_first = stream.startswith("en-")
        src_lang, _, tgt_lang = stream.partition("-")
        for _, en, xx in islice(self._pairs(_other(stream)), self.max_pairs):
            src, tgt = (en, xx) if english_first else (xx, en)
            if self.template is not None:
                src = self.template.render(src_lang=src_lang, tgt_lang=tgt_lang, src=src)
            yield [(side_group(stream, side), text) for side, text in zip(SIDES, (src, tgt)) if side in self.sides]

    def source(self) -> dict:
        out = {"kind": "ec40", "split": self.split, "pairs": list(self.directions), "max_pairs": self.max_pairs}
        if self.root is None:
            out.update(hub=HUB_REPO, revision=self.revision)
        out["files"] = [file_identity(p) for pair in self.files.values() for p in pair]
        return out

    def _local_languages(self) -> tuple[str, ...]:
        """Languages with an ``en-xx.xx`` file in the local split folder: EC40's order, then others."""
        folder, prefix = SPLITS[self.split]
        found = set()
        if (self.root / folder).is_dir():
            for f in (self.root / folder).iterdir():
                stem, _, side = f.name[len(prefix) + 3:].rpartition(".")
                if f.name.startswith(f"{prefix}en-") and stem == side and side != "en":
                    found.add(side)
        return tuple(lang for lang in LANGUAGES if lang in found) + tuple(sorted(found - set(LANGUAGES)))

    def _fetch(self, lang: str) -> tuple[Path, Path]:
        """Local paths of the English and the other file of ``en-{lang}`` (downloaded from the hub)."""
        names = split_files(self.split, lang)
        if self.root is not None:
            paths = tuple(self.root / name for name in names)
            for p in paths:
                if not p.is_file():
                    raise HarvestError(f"EC40 file not found: {p}")
            return paths
        paths = tuple(_download(name) for name in names)
        self.revision = _snapshot(paths[0])
        return paths

    def _check(self, lang: str) -> None:
        """Both sides have the same number of lines; the pairs used are UTF-8 and not all blank."""
        en, xx = self.files[lang]
        n_en, n_xx = _count_lines(en), _count_lines(xx)
        if n_en != n_xx:
            raise HarvestError(f"EC40 files are not aligned: {en} has {n_en} lines, {xx} has {n_xx}")
        if not any(True for _ in islice(self._pairs(lang), self.max_pairs)):
            raise HarvestError(f"EC40 files {en} and {xx} have no pair of non-blank lines")

    def _pairs(self, lang: str) -> Iterator[tuple[int, str, str]]:
        """``(line number, English, other)`` for every line where neither side is blank."""
        en_path, xx_path = self.files[lang]
        with en_path.open("rb") as en, xx_path.open("rb") as xx:
            for lineno, (a, b) in enumerate(zip(en, xx), 1):
                a, b = decode_line(a, en_path, lineno), decode_line(b, xx_path, lineno)
                if a.strip() and b.strip():
                    yield lineno, a, b


def parse_directions(pairs: str | None, available: tuple[str, ...], where: object) -> list[str]:
    """``None``/``all`` -> ``en-xx, xx-en`` for every available language; else the checked list."""
    if pairs is None or pairs.strip() == "all":
        if not available:
            raise HarvestError(f"no EC40 files (en-xx.en and en-xx.xx) in {where}")
        return [d for lang in available for d in (f"en-{lang}", f"{lang}-en")]
    directions = [p for p in split_list(pairs, "EC40 directions", "--pairs en-fr,fr-en") if p]
    if not directions:
        raise HarvestError("no EC40 direction given: --pairs en-fr,fr-en,... or all")
    known = tuple(dict.fromkeys(LANGUAGES + tuple(available)))
    for d in directions:
        sides = d.split("-")
        if len(sides) != 2 or sides.count("en") != 1:
            raise HarvestError(f"EC40 directions are English-centric (en-xx or xx-en), not '{d}'")
        other = _other(d)
        if other not in known:
            raise HarvestError(f"unknown EC40 language '{other}' in '{d}'; languages: {', '.join(known)}")
    duplicates = sorted({d for d in directions if directions.count(d) > 1})
    if duplicates:
        raise HarvestError(f"EC40 direction given twice: {', '.join(duplicates)}")
    return directions


def _other(direction: str) -> str:
    a, _, b = direction.partition("-")
    return b if a == "en" else a


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _download(name: str) -> Path:
    import huggingface_hub
    import huggingface_hub.utils

    huggingface_hub.utils.logging.set_verbosity_error()  # our one-line error replaces its retry log
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=HUB_REPO, repo_type="dataset", filename=name,
                                                    local_files_only=hub_offline()))
    except Exception as err:  # offline, not cached, no such file, no network: the same advice
        raise HarvestError(f"could not get {name} from the hub dataset {HUB_REPO} ({type(err).__name__}); "
                           "pass a local copy as --corpus ec40:PATH") from None


def _snapshot(path: Path) -> str | None:
    """The commit sha of a file in the hub cache (``.../snapshots/<sha>/...``)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _count_lines(path: Path) -> int:
    """Lines as ``open()`` iterates them: a last line without a newline counts."""
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
