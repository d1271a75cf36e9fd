"""Names that come from data or from the user (languages, store groups, tags) and may become part of a path.

The rule, in one place:

- A name is refused when it is empty, ``.`` or ``..``, or holds a control character (NUL, newline,
  tab, ...): such a name cannot be shown on one line, in a CSV cell or a Markdown table, nor be a file.
- A name becomes one path component by keeping ``A-Z a-z 0-9 . _ + -`` and writing every other
  byte of its UTF-8 as ``%XX`` (``en-fr:src`` -> ``en-fr%3Asrc``, ``../x`` -> ``..%2Fx``,
  ``中文`` -> ``%E4%B8%AD%E6%96%87``). The mapping is one-to-one (``%`` itself is encoded) and
  ``urllib.parse.unquote`` reverses it; names that differ only in case are still refused together
  where they would share a directory, since some file systems do not tell them apart.
- A name whose path component would be longer than 255 bytes is refused: no file system takes it.
- Every path built from a name is checked to resolve inside the directory it was meant for.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from harvester.errors import HarvestError

NAME_MAX = 255
"""The longest file name (bytes) common file systems allow."""
_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")


def check_name(name, what: str = "name") -> str:
    """``name`` itself, if it may be shown and stored: a non-empty string, not ``.``/``..``, no control character."""
    if not isinstance(name, str) or not name:
        raise HarvestError(f"{what} must be a non-empty string, not {name!r}")
    if name in (".", ".."):
        raise HarvestError(f"{what} '{name}' is not allowed")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise HarvestError(f"{what} {name!r} holds the control character {bad!r}")
    return name


def path_part(name: str, what: str = "name") -> str:
    """One safe path component for a checked ``name`` (see the module docstring), at most
    :data:`NAME_MAX` bytes long, as file systems allow."""
    check_name(name, what)
    part = "".join(c if c in _KEEP else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in name)
    if len(part) > NAME_MAX:
        raise HarvestError(f"{what} '{name[:40]}...' ({len(name)} characters) is too long to name a file: "
                           f"{len(part)} bytes once encoded, at most {NAME_MAX}")
    return part


def path_parts(names: list[str], what: str = "name") -> list[str]:
    """:func:`path_part` of each name; refuses two names that would share a file (also ignoring case)."""
    parts = [path_part(n, what) for n in names]
    seen: dict[str, str] = {}
    for name, part in zip(names, parts):
        other = seen.setdefault(part.casefold(), name)
        if other != name:
            raise HarvestError(f"{what}s '{other}' and '{name}' would write to the same file ({part})")
    return parts


def inside(root: str | Path, *parts: str, follow_links: bool = True) -> Path:
    """``root / parts...``, refused unless it lies inside ``root``: resolved, symbolic links followed, for
    what lsn writes; by its spelling alone (``follow_links=False``) for inputs, which may well be links
    into a cache or a shared directory."""
    base = Path(root)
    path = base.joinpath(*parts)
    if follow_links:
        real_root, real = base.resolve(), path.resolve()
    else:
        real_root, real = Path(os.path.abspath(base)), Path(os.path.abspath(path))  # normalizes '..' lexically
    if real != real_root and real_root not in real.parents:
        raise HarvestError(f"{path} would lie outside {root}")
    return path
