"""``text:DIR``: one file ``DIR/{lang}.txt`` per language, one document per line."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from harvester.corpus import Segment, Stream, file_identity
from harvester.errors import HarvestError


class TextCorpus:
    """Plain text per language; blank lines are not documents."""

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
            if not any(line.strip() for line in f.open(encoding="utf-8")):
                raise HarvestError(f"corpus file {f} is empty")
        self.groups = [f.stem for f in files]
        self.streams = [Stream(g) for g in self.groups]

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        with (self.dir / f"{stream}.txt").open(encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield [(stream, line)]

    def source(self) -> dict:
        return {"kind": "text", "files": [file_identity(self.dir / f"{g}.txt") for g in self.groups]}
