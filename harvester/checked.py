"""Checked reads of a store's chunks: damage is a one-line error, never a number.

Every chunk of a format-2 store ends in the crc32c of its bytes (the ``crc32c`` codec), and every chunk
of an array that was written is stored (``write_empty_chunks``). A read through :class:`CheckedStore`
therefore refuses a chunk whose checksum does not match, and a chunk that is missing, naming the
array and the chunk; only the completion manifest ``shards/done`` has chunks that may be absent (a
shard not yet finished).
"""

from __future__ import annotations

import numpy as np
from zarr.storage import WrapperStore

from harvester.errors import HarvestError

SPARSE = ("shards/done",)
"""Arrays whose missing chunks mean "not written yet" (read as the fill value)."""


def chunk_of(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``("shards/active", (5, 0, 0, 0))`` for the key ``shards/active/c/5/0/0/0``; None for metadata."""
    array, sep, index = key.rpartition("/c/")
    if not sep or not all(p.isdigit() for p in index.split("/")):
        return None
    return array, tuple(int(p) for p in index.split("/"))


def checksum_ok(data: bytes | np.ndarray) -> bool:
    """Whether the last 4 bytes of a chunk are the crc32c (little-endian) of the bytes before them."""
    import google_crc32c

    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if raw.size < 4:
        return False
    return int(google_crc32c.value(raw[:-4].tobytes())) == int(raw[-4:].view("<u4")[0])


class CheckedStore(WrapperStore):
    """A zarr store whose chunk reads fail with :class:`HarvestError` on a bad checksum or a missing chunk."""

    label: str = "store"

    def _with_store(self, store):
        new = super()._with_store(store)
        new.label = self.label
        return new

    async def get(self, key, prototype=None, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        where = chunk_of(key)
        if where is None or byte_range is not None:
            return buf
        array, index = where
        if buf is None:
            if array in SPARSE:
                return None
            raise HarvestError(f"store {self.label} is damaged: chunk {index} of array '{array}' is missing "
                               f"(lsn verify {self.label} lists every problem)")
        if not checksum_ok(buf.as_numpy_array()):
            raise HarvestError(f"store {self.label} is damaged: chunk {index} of array '{array}' fails its "
                               f"crc32c checksum (lsn verify {self.label} lists every problem)")
        return buf


def checked(zstore, label: str) -> CheckedStore:
    out = CheckedStore(zstore)
    out.label = label
    return out
