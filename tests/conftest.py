"""Shared fixtures: a per-session model cache, a small text corpus, and a finished store to damage copies of."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harvester.corpus.sample import SampleCorpus


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Built-in tiny models are built once per test session, in a private cache (subprocesses inherit it)."""
    path = Path(os.environ.get("LSN_TEST_CACHE") or tmp_path_factory.mktemp("lsn-cache"))
    os.environ["LSN_CACHE"] = str(path)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub
    return path


def write_text_corpus(directory: Path, langs=("fr", "ru", "zh"), docs=12, seed=3) -> Path:
    """``{lang}.txt`` files made from the sample generator, with blank lines that must be skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = SampleCorpus.from_spec("sample", f"docs={docs},seed={seed},langs={'+'.join(langs)}")
    for lang in langs:
        lines = []
        for i, doc in enumerate(corpus.texts(lang)):
            lines.append(doc)
            if i % 5 == 2:
                lines.append("   ")
        (directory / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A finished store of :data:`tests.helpers.HARVEST`, never changed: tests damage copies (``store``)."""
    from lsn.cli import main
    from tests.helpers import harvest

    store = tmp_path_factory.mktemp("pristine") / "S"
    assert main(harvest(store)) == 0
    return store


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of :func:`pristine`, to damage or edit."""
    shutil.copytree(pristine, tmp_path / "S")
    return tmp_path / "S"
