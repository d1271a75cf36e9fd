"""The repository cites only its own copy of the methods, ``docs/METHODS.md``."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_methods_are_cited_from_the_repository():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "Makefile"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in files if f != "tests/test_docs.py" and "shared/METHODS" in (ROOT / f).read_text(encoding="utf-8", errors="replace")]
    assert outside == [], outside
    text = (ROOT / "docs" / "METHODS.md").read_text(encoding="utf-8")
    for section in ("## LAPE", "## Entropy-λ", "## Activation-probability thresholds", "## Coverage masks",
                    "## Localizer contrasts", "## DLN", "## Perplexity as each study reports it"):
        assert section in text, section
