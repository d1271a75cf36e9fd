"""``instruct:FILE.jsonl``: instruction data, one JSON object per line.

Each line is ``{"lang": "de", "prompt": "...", "response": "..."}`` (other fields are ignored); blank
lines are skipped. A language is one ``sequence`` stream (an example's prompt must not see another
example) with groups ``{lang}:prompt`` and ``{lang}:response``, languages in order of first appearance.
A document is ``[(lang:prompt, prompt), (lang:response, response)]``, in file order; ``--template``
(:mod:`harvester.corpus.template`) rewrites both texts first (``chat``) or the prompt alone (a format
string with ``{prompt}``).

The whole file is checked when the corpus is opened, one line at a time: a line that is not a JSON
object, lacks a field, has a non-string or blank field (an empty segment has no token to count) is
an error ``FILE:LINE: ...``; so is a template that fails on any example (``FILE: example N: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from harvester.corpus import Segment, Stream, file_identity, json_value
from harvester.corpus.template import ChatTemplate, instruct_template
from harvester.errors import HarvestError

FIELDS = ("lang", "prompt", "response")


class InstructCorpus:
    """Prompt/response pairs per language."""

    def __init__(self, spec: str, path: str, template: str | None = None, tokenizer=None):
        if not path:
            raise HarvestError("instruct corpus needs a file: --corpus instruct:FILE.jsonl")
        self.spec = spec
        self.file = Path(path).expanduser()
        if not self.file.is_file():
            raise HarvestError(f"instruct file not found: {self.file}")
        langs = dict.fromkeys(lang for lang, _, _ in self._examples())
        if not langs:
            raise HarvestError(f"instruct file {self.file} has no examples")
        self.groups = [f"{lang}:{role}" for lang in langs for role in ("prompt", "response")]
        self.streams = [Stream(lang, packing="sequence") for lang in langs]
        self.template = instruct_template(template, tokenizer)
        if self.template is not None:  # a template that fails on any example fails before a store exists
            for n, (_, prompt, response) in enumerate(self._examples(), 1):
                try:
                    self._render(prompt, response)
                except HarvestError as err:
                    raise HarvestError(f"{self.file}: example {n}: {err}") from None

    def documents(self, stream: str) -> Iterator[list[Segment]]:
        for lang, prompt, response in self._examples():
            if lang == stream:
                prompt, response = self._render(prompt, response)
                yield [(f"{lang}:prompt", prompt), (f"{lang}:response", response)]

    def source(self) -> dict:
        out = {"kind": "instruct", "files": [file_identity(self.file)]}
        if isinstance(self.template, ChatTemplate):  # the template's text is the tokenizer's, not an option
            out["chat_template_sha256"] = self.template.sha256
        return out

    def _render(self, prompt: str, response: str) -> tuple[str, str]:
        if self.template is None:
            return prompt, response
        if isinstance(self.template, ChatTemplate):
            return self.template.render(prompt, response)
        return self.template.render(prompt=prompt), response

    def _examples(self) -> Iterator[tuple[str, str, str]]:
        """``(lang, prompt, response)`` per non-blank line, each checked."""
        with self.file.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield _parse(raw, f"{self.file}:{lineno}")


def _parse(raw: bytes, where: str) -> tuple[str, str, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HarvestError(f"{where}: not UTF-8 text") from None
    record = json_value(text, where)
    if not isinstance(record, dict):
        raise HarvestError(f"{where}: expected a JSON object with lang, prompt and response, "
                           f"got {type(record).__name__}")
    for key in FIELDS:
        if key not in record:
            raise HarvestError(f"{where}: missing field '{key}'")
        if not isinstance(record[key], str):
            raise HarvestError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
        if not record[key].strip():
            raise HarvestError(f"{where}: field '{key}' is empty")
    return record["lang"], record["prompt"], record["response"]
