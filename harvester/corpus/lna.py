"""``lna:FILE.json``: the alignment study's own data (NJUNLP/Language-Neurons-Alignment, ``datasets/mgsm.json``).

The file is one JSON list of records ``{"lang": "German", "instruction": "...", "answers":
[{"generated": "..."}, ...]}`` (other fields are ignored). ``lang`` is an English language name, mapped
to a code as the study's ``config.py`` maps them (:data:`LANGUAGES`). The study's ``activation.py`` makes
two runs per language, one sequence per answer in each: the instruction and the answer concatenated
as they are (``instruction + generated``, no separator), and the instruction alone. Here they are the
groups ``{code}:full`` and ``{code}:prompt`` of one harvest: each its own ``sequence`` stream whose
documents are one segment each (one window per example, nothing packed across examples), in file
order, languages in the study's order. ``--response-only`` then reads ``full`` minus ``prompt``, as for
an ``lsn import --format lna`` store.

Every record is checked when the corpus is opened: a record that is not an object, lacks a field, has
a non-string or non-UTF-8 field, a blank instruction (the study's prompt run drops it, its full run
does not) or no answers is an error ``FILE: record N: ...`` (records counted from 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from harvester.corpus import Segment, Stream, file_identity, json_value
from harvester.errors import HarvestError

LANGUAGES: dict[str, str] = {
    "en": "English", "zh": "Chinese", "es": "Spanish", "fr": "French", "de": "German",
    "ja": "Japanese", "ru": "Russian", "bn": "Bengali", "th": "Thai", "sw": "Swahili",
}
"""Code -> the study's English name (its ``config.py`` ``LANG_MAPPING``), in the order of its README
and of its released masks, which ``lsn import --format lna`` keeps too."""

ROLES = ("full", "prompt")


class LnaCorpus:
    """Full sequences (instruction + answer) and prompts (instruction) per language."""

    def __init__(self, spec: str, path: str):
        if not path:
            raise HarvestError("lna corpus needs a file: --corpus lna:FILE.json")
        self.spec = spec
        self.file = Path(path).expanduser()
        if not self.file.is_file():
            raise HarvestError(f"lna file not found: {self.file}")
        present = {code for code, _, _ in self._examples()}
        if not present:
            raise HarvestError(f"lna file {self.file} has no records")
        langs = [code for code in LANGUAGES if code in present]
        self.groups = [f"{code}:{role}" for code in langs for role in ROLES]
        self.streams = [Stream(group, packing="sequence") for group in self.groups]

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        code, _, role = stream.rpartition(":")
        for lang, instruction, generated in self._examples():
            if lang == code:
                yield [(stream, instruction + generated if role == "full" else instruction)]

    def source(self) -> dict:
        return {"kind": "lna", "files": [file_identity(self.file)]}

    def _examples(self) -> Iterator[tuple[str, str, str]]:
        """``(code, instruction, generated)`` per answer of every record, in file order, each checked."""
        for n, record in enumerate(_records(self.file), 1):
            yield from _answers(record, f"{self.file}: record {n}")


def _records(path: Path) -> list:
    raw = path.read_bytes()
    # undecodable bytes survive as lone surrogates, so that the record holding them can be named
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    records = json_value(text, str(path), whole_file=True)
    if not isinstance(records, list):
        raise HarvestError(f"{path}: expected a JSON list of records (the study's format), "
                           f"got {type(records).__name__}")
    return records


def _answers(record, where: str) -> Iterator[tuple[str, str, str]]:
    if not isinstance(record, dict):
        raise HarvestError(f"{where}: expected an object with lang, instruction and answers, "
                           f"got {type(record).__name__}")
    name, instruction = _text(record, "lang", where), _text(record, "instruction", where)
    codes = {v: k for k, v in LANGUAGES.items()}
    if name not in codes:
        raise HarvestError(f"{where}: unknown language '{name}'; the study's: {', '.join(LANGUAGES.values())}")
    if not instruction.strip():
        raise HarvestError(f"{where}: field 'instruction' is empty")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers:
        got = "missing" if answers is None else "empty" if answers == [] else f"a {type(answers).__name__}"
        raise HarvestError(f"{where}: 'answers' must be a non-empty list of {{\"generated\": ...}}, got {got}")
    for k, answer in enumerate(answers, 1):
        if not isinstance(answer, dict):
            raise HarvestError(f"{where}: answer {k} must be an object with 'generated', got {type(answer).__name__}")
        yield codes[name], instruction, _text(answer, "generated", f"{where}: answer {k}")


def _text(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise HarvestError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise HarvestError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HarvestError(f"{where}: field '{key}' is not UTF-8 text") from None
    return value
