"""What the scale benchmarks share: a measurement in a fresh interpreter (so that its peak RSS is its
own), which prints its result as one last ``RESULT {json}`` line for the parent to read."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

GIB = 1 << 30
PREFIX = "RESULT "


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def report(result: dict) -> None:
    """Print ``result`` as the ``RESULT`` line :func:`run` reads."""
    print(PREFIX + json.dumps(result), flush=True)


def run(script: str, *args: str, check: bool = True) -> tuple[dict, list[str]]:
    """Run ``script`` with ``args`` in a fresh interpreter: its last ``RESULT`` line, parsed, and its other
    stdout lines. A failure ends the benchmark with the child's output (``check``), or is returned as
    ``{"error": ...}`` after writing that output to stderr."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    results = [line for line in lines if line.startswith(PREFIX)]
    if proc.returncode != 0 or not results:
        if check:
            raise SystemExit(proc.stdout + proc.stderr)
        sys.stderr.write(proc.stdout + proc.stderr)
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}, []
    return json.loads(results[-1][len(PREFIX):]), [line for line in lines if not line.startswith(PREFIX)]
