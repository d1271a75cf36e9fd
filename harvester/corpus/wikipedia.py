"""``wikipedia:DATE:LANGS[:DIR]``: Wikipedia articles per language, packed into windows.

The hub dataset ``wikimedia/wikipedia`` has one config ``DATE.LANG`` per dump and language (e.g.
``20231101.de``), stored as ``DATE.LANG/train-0000k-of-0000n.parquet`` with columns ``id``, ``url``,
``title`` and ``text``. Without DIR each language is streamed from the hub with
``datasets.load_dataset(..., streaming=True)``, pinned to the commit read when the corpus is
opened; with DIR the parquet files are read from ``DIR/DATE.LANG/*.parquet`` (the hub layout, e.g.
a ``huggingface-cli download`` of the configs needed), in file-name order and in row batches, so
memory holds one parquet row group at a time, never a whole file.

Documents: ``[(lang, text)]`` per article, in order; articles with a null or blank text are skipped.
Each language is one ``pack`` stream, cut at ``--max-tokens-per-lang`` tokens when given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from harvester.corpus import CorpusOptions, Segment, Stream, file_identity, split_list
from harvester.corpus.ec40 import hub_offline
from harvester.errors import HarvestError

HUB_ID = "wikimedia/wikipedia"
_BATCH_ROWS = 256
_USAGE = "wikipedia:DATE:LANGS[:DIR], e.g. wikipedia:20231101:de,fr"


class WikipediaCorpus:
    """One stream and one group per language, in the order given."""

    def __init__(self, spec: str, arg: str, options: CorpusOptions):
        self.spec = spec
        self.date, self.groups, self.dir = _parse(spec, arg)
        self.max_tokens = options.max_tokens_per_lang
        self.streams = [Stream(lang, packing="pack", max_tokens=self.max_tokens) for lang in self.groups]
        self.revision: str | None = None
        if self.dir is not None:
            self.files = {lang: self._local_files(lang) for lang in self.groups}
        else:
            self._open_hub()

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        for text in self._texts(stream):
            if text and text.strip():
                yield [(stream, text)]

    def source(self) -> dict:
        out = {"kind": "wikipedia", "date": self.date, "langs": list(self.groups)}
        if self.dir is None:
            out.update(hub=HUB_ID, revision=self.revision)
        else:
            out["files"] = {lang: [file_identity(f) for f in files] for lang, files in self.files.items()}
        return out

    def _texts(self, lang: str) -> Iterator[str | None]:
        if self.dir is None:
            for row in self._hub_stream(lang):
                yield row["text"]
            return
        import pyarrow.parquet as pq

        for path in self.files[lang]:
            with pq.ParquetFile(path) as f:
                for batch in f.iter_batches(batch_size=_BATCH_ROWS, columns=["text"]):
                    yield from batch.column(0).to_pylist()

    def _local_files(self, lang: str) -> list[Path]:
        import pyarrow.parquet as pq

        if not self.dir.is_dir():
            raise HarvestError(f"wikipedia directory not found: {self.dir}")
        folder = self.dir / f"{self.date}.{lang}"
        if not folder.is_dir():
            raise HarvestError(f"wikipedia directory {self.dir} has no {folder.name} folder")
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise HarvestError(f"wikipedia folder {folder} has no .parquet files")
        for path in files:
            try:
                names = pq.read_schema(path).names
            except Exception as err:  # pyarrow's errors for a truncated or foreign file vary
                raise HarvestError(f"cannot read parquet file {path}: {_first_line(err)}") from None
            if "text" not in names:
                raise HarvestError(f"parquet file {path} has no 'text' column (columns: {', '.join(names)})")
        return files

    def _open_hub(self) -> None:
        """Pin the hub revision and check that every config exists (network; fails fast offline)."""
        advice = f"pass a local copy of the parquet files as wikipedia:{self.date}:{','.join(self.groups)}:DIR"
        if hub_offline():
            raise HarvestError(f"cannot stream {HUB_ID} with HF_HUB_OFFLINE set; {advice}")
        try:
            from huggingface_hub import HfApi

            self.revision = HfApi().dataset_info(HUB_ID, timeout=30).sha
            for lang in self.groups:
                self._hub_stream(lang)
        except Exception as err:  # no network, no such config, hub errors: the same advice
            raise HarvestError(f"cannot stream {HUB_ID} ({type(err).__name__}: {_first_line(err)}); {advice}") from None

    def _hub_stream(self, lang: str):
        from datasets import load_dataset

        return load_dataset(HUB_ID, f"{self.date}.{lang}", split="train", streaming=True, revision=self.revision)


def _parse(spec: str, arg: str) -> tuple[str, list[str], Path | None]:
    parts = arg.split(":", 2)
    if len(parts) < 2 or (len(parts) == 3 and not parts[2].strip()):
        raise HarvestError(f"bad wikipedia corpus '{spec}'; expected {_USAGE}")
    date, langs = parts[0].strip(), split_list(parts[1], "wikipedia languages", "wikipedia:20231101:de,fr")
    if not re.fullmatch(r"\d{8}", date):
        raise HarvestError(f"wikipedia dump date must be YYYYMMDD, not '{date}' in '{spec}'; expected {_USAGE}")
    if not any(langs):
        raise HarvestError(f"wikipedia corpus '{spec}' names no languages; expected {_USAGE}")
    if not all(langs):
        raise HarvestError(f"empty language in '{spec}'; expected {_USAGE}")
    duplicates = sorted({lang for lang in langs if langs.count(lang) > 1})
    if duplicates:
        raise HarvestError(f"wikipedia language given twice in '{spec}': {', '.join(duplicates)}")
    return date, langs, Path(parts[2]).expanduser() if len(parts) == 3 else None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
