"""``stimuli:FILE.csv``: experimental stimuli labelled by condition (a localizer design).

A UTF-8 CSV file whose header names at least the columns ``text`` and ``condition`` (other columns
are ignored), e.g. sentences ``S`` against non-word strings ``N`` as written by
:func:`harvester.corpus.sample.write_stimuli`. Each condition is one group and one ``sequence``
stream (a stimulus is seen alone, in its own window), conditions in order of first appearance;
a document is ``[(condition, text)]``, in file order. Blank lines are skipped. With ``lowercase``
(``--lowercase``) each text is lowercased, as the localizer reference does with its stimuli.

The whole file is checked when the corpus is opened: a row with the wrong number of fields or an
empty text or condition is an error ``FILE:LINE: ...`` (the header is line 1).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from harvester.corpus import Segment, Stream, file_identity
from harvester.errors import HarvestError


class StimuliCorpus:
    """One group and one stream per condition."""

    def __init__(self, spec: str, path: str, lowercase: bool = False):
        if not path:
            raise HarvestError("stimuli corpus needs a file: --corpus stimuli:FILE.csv")
        self.spec = spec
        self.lowercase = lowercase
        self.file = Path(path).expanduser()
        if not self.file.is_file():
            raise HarvestError(f"stimuli file not found: {self.file}")
        conditions = dict.fromkeys(condition for condition, _ in self._rows())
        if not conditions:
            raise HarvestError(f"stimuli file {self.file} has no rows")
        self.groups = list(conditions)
        self.streams = [Stream(c, packing="sequence") for c in self.groups]

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        for condition, text in self._rows():
            if condition == stream:
                yield [(condition, text.lower() if self.lowercase else text)]

    def source(self) -> dict:
        return {"kind": "stimuli", "files": [file_identity(self.file)]}

    def _rows(self) -> Iterator[tuple[str, str]]:
        """``(condition, text)`` per row, each checked."""
        try:
            with self.file.open(encoding="utf-8-sig", newline="") as f:
                yield from _checked_rows(csv.reader(f), self.file)
        except UnicodeDecodeError:
            raise HarvestError(f"stimuli file {self.file} is not UTF-8 text") from None


def _checked_rows(reader, file: Path) -> Iterator[tuple[str, str]]:
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise HarvestError(f"stimuli file {file} is empty")
    missing = [c for c in ("text", "condition") if c not in header]
    if missing:
        raise HarvestError(f"stimuli file {file} has no column {' or '.join(missing)} "
                           f"(header: {','.join(header)}); it needs text and condition")
    text_at, condition_at = header.index("text"), header.index("condition")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader, None)
        except csv.Error as err:
            raise HarvestError(f"{file}:{start}: {err}") from None
        if row is None:
            return
        lineno, start = start, reader.line_num + 1  # a quoted field may span lines
        if not row:
            continue
        if len(row) != len(header):
            raise HarvestError(f"{file}:{lineno}: {len(row)} fields, the header has {len(header)}")
        text, condition = row[text_at], row[condition_at].strip()
        if not text.strip():
            raise HarvestError(f"{file}:{lineno}: empty text")
        if not condition:
            raise HarvestError(f"{file}:{lineno}: empty condition")
        yield condition, text
