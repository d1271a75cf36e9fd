"""``text:DIR``: one file ``DIR/{lang}.txt`` per language, one document per line."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from harvester.corpus import Segment, Stream, file_identity, text_lines
from harvester.errors import HarvestError
from harvester.names import check_name


class TextCorpus:
    """Plain UTF-8 text per language; blank lines are not documents. Every file is read through once
    up front, so that a file that is empty or not UTF-8 is refused before anything is harvested."""

    def __init__(self, spec: str, directory: str):
        if not directory:
            raise HarvestError("text corpus needs a directory: --corpus text:DIR")
        self.spec = spec
        self.dir = Path(directory).expanduser()
        if not self.dir.is_dir():
            raise HarvestError(f"corpus directory not found: {self.dir}")
        files = sorted(self.dir.glob("*.txt"))
        if not files:
            raise HarvestError(f"corpus directory {self.dir} has no {{lang}}.txt files")
        for f in files:
            _check_file(f)
        self.groups = [f.stem for f in files]
        self.streams = [Stream(g) for g in self.groups]

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        for line in _lines(self.dir / f"{stream}.txt"):
            line = line.rstrip("\n")
            if line.strip():
                yield [(stream, line)]

    def source(self) -> dict:
        return {"kind": "text", "files": [file_identity(self.dir / f"{g}.txt") for g in self.groups]}


def _check_file(path: Path) -> None:
    """A ``{lang}.txt`` file with a language name, that is a file, UTF-8, and not blank."""
    if path.suffix != ".txt" or not path.stem:
        raise HarvestError(f"corpus file {path} has no language name: name it {{lang}}.txt, e.g. en.txt")
    check_name(path.stem, f"the language of corpus file {path}")
    if not path.is_file():
        raise HarvestError(f"corpus entry {path} is not a file")
    blank = True
    for line in _lines(path):
        blank = blank and not line.strip()
    if blank:
        raise HarvestError(f"corpus file {path} is empty")


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as text mode reads them; not UTF-8 is a one-line error naming the first bad line."""
    try:
        with path.open(encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError:
        for _ in text_lines(path):  # raises, naming the first line that is not UTF-8
            pass
        raise HarvestError(f"{path}: not UTF-8 text") from None
