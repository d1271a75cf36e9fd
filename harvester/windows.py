"""Corpus -> token windows -> shards: the deterministic plan of a harvest.

Per group, each document is tokenized without special tokens and followed by the tokenizer's EOS
token; the group's tokens are concatenated and cut into consecutive windows of ``seq_len`` tokens
(the last may be shorter). Every corpus token lands in exactly one window, and every window is an
independent forward pass. Consecutive windows of one group form a shard of at most ``shard_tokens``
tokens (at least one window). Same corpus and settings -> same shards, same ids, same digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from harvester.errors import HarvestError


@dataclass
class Window:
    """One forward pass worth of tokens; every token carries its group id."""

    ids: np.ndarray  # int32 [n]
    groups: np.ndarray  # int16 [n]


@dataclass
class Shard:
    """The unit of work, of resume and of storage: consecutive windows."""

    index: int
    windows: list[Window] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(w.ids) for w in self.windows)


@dataclass
class Plan:
    groups: list[str]
    shards: list[Shard]
    tokens_per_group: list[int]
    digest: str
    """sha256 over every window's group ids and token ids, in order."""

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens_per_group)

    @property
    def n_windows(self) -> int:
        return sum(len(s.windows) for s in self.shards)


def document_tokens(tokenizer, docs: Iterable[str], eos_id: int, batch: int = 256) -> Iterator[list[int]]:
    """Each document's ids, without special tokens, followed by EOS (tokenized in batches)."""
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == batch:
            yield from _encode(tokenizer, chunk, eos_id)
            chunk = []
    if chunk:
        yield from _encode(tokenizer, chunk, eos_id)


def _encode(tokenizer, docs: list[str], eos_id: int) -> Iterator[list[int]]:
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        yield list(ids) + [eos_id]


def windows_of(token_lists: Iterable[list[int]], seq_len: int) -> Iterator[np.ndarray]:
    """Concatenate ``token_lists`` and cut the stream into consecutive windows of ``seq_len``."""
    pending: list[int] = []
    for ids in token_lists:
        pending.extend(ids)
        while len(pending) >= seq_len:
            yield np.asarray(pending[:seq_len], dtype=np.int32)
            del pending[:seq_len]
    if pending:
        yield np.asarray(pending, dtype=np.int32)


def plan_shards(corpus, tokenizer, seq_len: int, shard_tokens: int, progress: bool = False) -> Plan:
    """Tokenize ``corpus`` into windows and group them into shards."""
    from tqdm.auto import tqdm

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise HarvestError("the tokenizer has no EOS token; documents cannot be separated")
    if len(corpus.groups) > np.iinfo(np.int16).max:
        raise HarvestError(f"too many groups ({len(corpus.groups)})")
    digest, shards, counts = hashlib.sha256(), [], []
    for g, name in enumerate(tqdm(corpus.groups, desc="tokenizing", unit="group", disable=not progress)):
        shard, total = Shard(len(shards)), 0
        for ids in windows_of(document_tokens(tokenizer, corpus.documents(name), eos_id), seq_len):
            if shard.windows and shard.n_tokens + len(ids) > shard_tokens:
                shards.append(shard)
                shard = Shard(len(shards))
            groups = np.full(len(ids), g, dtype=np.int16)
            shard.windows.append(Window(ids, groups))
            digest.update(groups.tobytes())
            digest.update(ids.tobytes())
            total += len(ids)
        if not shard.windows:
            raise HarvestError(f"corpus group '{name}' has no tokens")
        shards.append(shard)
        counts.append(total)
    return Plan(list(corpus.groups), shards, counts, digest.hexdigest())


def batches(windows: list[Window], batch_size: int, pad_id: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Right-padded batches ``(ids [B, S], attention_mask [B, S], groups [B, S])``; padding has group -1."""
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(w.ids) for w in chunk)
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        groups = np.full((len(chunk), width), -1, dtype=np.int64)
        for row, w in enumerate(chunk):
            ids[row, :len(w.ids)], mask[row, :len(w.ids)], groups[row, :len(w.ids)] = w.ids, 1, w.groups
        yield ids, mask, groups
