"""A store written before the tokenization and corpus options (lsn at commit 85429fe) keeps its
fingerprint: the same harvest at the earlier behaviour records exactly what that version recorded, so such
a store resumes (and ``verify --repair`` then a re-harvest works) instead of being refused as another
harvest. ``data/fingerprint_85429fe.json`` is that version's fingerprint of the command below, as written."""

from __future__ import annotations

import json
from pathlib import Path

from harvester.store import read_attrs
from lsn.cli import main

RECORDED = Path(__file__).parent / "data" / "fingerprint_85429fe.json"
COMMAND = ["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=3,langs=en,de", "--seq-len", "32",
           "--shard-tokens", "64", "--no-ray", "--no-progress"]
EARLIER = ["--bos", "none", "--eos-per-example", "--encode", "segments"]


def test_the_earlier_behaviour_records_the_earlier_fingerprint(tmp_path):
    assert main([*COMMAND, *EARLIER, "--store", str(tmp_path / "s")]) == 0
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    assert read_attrs(tmp_path / "s").fingerprint == recorded


def test_the_new_defaults_are_another_harvest(tmp_path):
    """Only where the numbers may differ: the defaults record their settings (a BOS, no EOS per example)."""
    assert main([*COMMAND, "--store", str(tmp_path / "s")]) == 0
    fingerprint = read_attrs(tmp_path / "s").fingerprint
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    assert fingerprint != recorded and fingerprint["corpus"] == recorded["corpus"]
