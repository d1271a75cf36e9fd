"""Corpus -> token windows -> token shards (Parquet): the deterministic plan of a harvest.

Each stream of the corpus is tokenized on its own, streaming (one shard of tokens in memory at a
time), into Parquet files ``TOKENS/{stream:05d}/{k:06d}.parquet`` with one row per window (columns
``ids`` list<int32> and ``groups`` list<int16>: every token carries its group id), and, once the
stream is finished, a manifest ``TOKENS/{stream:05d}.json`` listing its shards.

Documents (lists of ``(group, text)`` segments) are encoded as :class:`TokenSettings` says (see
:func:`document_tokens`): once as one string with each token in the segment its first character
is in (``whole``), or each segment on its own (``segments``, the encoding before ``--encode``); with
the tokenizer's BOS before each document (``bos="document"``) or each packed window (``"window"``),
counted in the group of the token it precedes; with token pooling a packed document ends with the
tokenizer's EOS token (a ``sequence`` document only with ``eos_per_example``; a packed one unless
``separator`` is ``none``), counted in the last segment's group. With ``pack`` packing a stream's
documents are concatenated and cut into consecutive windows of ``seq_len`` tokens (the last may be
shorter, or with ``remainder="drop"`` is dropped and counted): every token lands in exactly one window.
With ``sequence`` packing each document is its own window; a longer document is cut at ``seq_len``
(the tokens cut off are counted in the manifest), except with pooled statistics, where the last
token matters and a too-long document is an error. ``--truncate N`` first cuts every document of a
``sequence`` stream to ``N`` tokens on one side (the localizer reference's 12 tokens), counted the same way.

Consecutive windows form a shard of at most ``shard_tokens`` tokens (at least one window). Shard
``k`` of stream ``s`` has the global index ``s * SHARDS_PER_STREAM + k``: same inputs and settings
-> same shards, same ids, same digests, on any machine and in any order of work.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np

from harvester import fs
from harvester.errors import HarvestError

SHARDS_PER_STREAM = 1 << 20
TOKENS_FORMAT = 1


@dataclass
class Window:
    """One forward pass worth of tokens (one row of a batch); every token carries its group id."""

    ids: np.ndarray  # int32 [n]
    groups: np.ndarray  # int16 [n]


@dataclass
class Shard:
    """The unit of work, of resume and of storage: consecutive windows of one stream."""

    index: int
    windows: list[Window] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(w.ids) for w in self.windows)


@dataclass
class ShardInfo:
    """What the driver knows of a token shard: where it is and what it holds, not its tokens."""

    index: int
    stream: int
    path: str
    n_tokens: int
    n_windows: int
    tokens: dict[int, int]
    """Group id -> tokens of that group in the shard."""
    digest: str
    """sha256 over each window's group ids and token ids, in order."""


@dataclass(frozen=True)
class TokenSettings:
    """Everything that decides the token shards; recorded in each stream manifest."""

    seq_len: int
    shard_tokens: int
    pooling: str
    tokenizer_sha256: str
    eos_id: int
    fingerprint_sha256: str = ""
    """The harvest these tokens belong to: another harvest's token shards are never reused."""
    corpus_sha256: str = ""
    """The corpus identity (specs, groups, streams, sources and options) the tokens were made from."""
    bos: str = "none"
    """Where ``bos_ids`` go: ``document`` (before each document), ``window`` (each packed window starts
    with them) or ``none``; ``--bos auto`` is resolved to one of these by :func:`resolve_bos`."""
    bos_ids: tuple[int, ...] = ()
    """What the tokenizer's special-token processing puts before a text (its BOS), see :func:`bos_prefix`."""
    eos_per_example: bool = True
    """Token pooling: a ``sequence`` document (an example) ends with EOS too (packed documents always do)."""
    encode: str = "segments"
    """``whole``: a document is encoded once, each token in the segment its first character is in;
    ``segments``: each segment on its own. (These defaults are the encoding from before the options.)"""
    separator: str = "eos"
    """Token pooling: what ends each packed document: ``eos`` (the tokenizer's EOS) or ``none`` (documents
    follow each other as encoded, as LAPE's concatenated ids do)."""
    remainder: str = "keep"
    """A packed stream's last window shorter than ``seq_len``: ``keep`` it, or ``drop`` it (LAPE's
    ``activation.py``), its tokens counted in the manifest's ``remainder_tokens``."""

    def __post_init__(self):
        for name in ("seq_len", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise HarvestError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if (self.bos not in BOS_PLACES or self.encode not in ENCODINGS or self.separator not in SEPARATORS
                or self.remainder not in REMAINDERS):
            raise HarvestError(f"bad token settings: bos {self.bos!r}, encode {self.encode!r}, "
                               f"separator {self.separator!r}, remainder {self.remainder!r}")
        if self.bos == "window" and len(self.bos_ids) >= self.seq_len:
            raise HarvestError(f"--bos window needs --seq-len above {len(self.bos_ids)}, got {self.seq_len}")


BOS_PLACES = ("document", "window", "none")
ENCODINGS = ("whole", "segments")
SEPARATORS = ("eos", "none")
REMAINDERS = ("keep", "drop")
LEGACY = {"bos": "none", "bos_ids": [], "eos_per_example": True, "encode": "segments", "separator": "eos",
          "remainder": "keep"}
"""The token settings of a manifest (or store) written before they were recorded."""


def shard_index(stream: int, k: int) -> int:
    if k >= SHARDS_PER_STREAM:
        raise HarvestError(f"stream {stream} needs more than {SHARDS_PER_STREAM} shards; raise --shard-tokens")
    return stream * SHARDS_PER_STREAM + k


# -- tokenization -------------------------------------------------------------------------------
_PROBE = "Hello world"


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's special-token processing puts before a text: its BOS as ``tokenizer(text)``
    adds it (Llama, Mistral, Gemma, Aya), or nothing (Qwen2, GPT-2, BLOOM add none). What it appends
    (an EOS some tokenizers add) is not taken."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    raise HarvestError(f"cannot tell what the tokenizer adds before a text: its encoding of {_PROBE!r} with "
                       "special tokens does not contain the one without; use --bos none")


def resolve_bos(tokenizer, bos: str) -> tuple[str, tuple[int, ...]]:
    """``--bos`` as ``(place, ids)``: ``auto`` puts what the tokenizer prepends before each document (and
    nothing when it prepends nothing); ``document`` and ``window`` put it, or else the tokenizer's
    ``bos_token_id``, before each document or each packed window."""
    if bos == "none":
        return "none", ()
    prefix = tuple(bos_prefix(tokenizer))
    if bos == "auto":
        return ("document", prefix) if prefix else ("none", ())
    if not prefix:
        if tokenizer.bos_token_id is None:
            raise HarvestError(f"--bos {bos}: the tokenizer has no BOS token (bos_token_id); use --bos auto or none")
        prefix = (int(tokenizer.bos_token_id),)
    return bos, prefix


class _Seams:
    """Whole encoding: per group id, the segment boundaries into that group's segments (an example's
    response), and the mismatches among them: where the encoding of the text before the boundary (the
    prompt alone) is not a prefix of the whole encoding, or the offsets put another number of tokens
    before it (a token straddles the boundary). Elsewhere the group counts what the two-pass
    ``full - prefix`` counts."""

    def __init__(self):
        self.boundaries: dict[int, int] = {}
        self.mismatches: dict[int, int] = {}

    def add(self, group: int, matches: bool) -> None:
        self.boundaries[group] = self.boundaries.get(group, 0) + 1
        if not matches:
            self.mismatches[group] = self.mismatches.get(group, 0) + 1

    def record(self) -> dict:
        """The manifest's entries (JSON: group ids as strings)."""
        return {"boundaries_per_group": {str(g): n for g, n in sorted(self.boundaries.items())},
                "boundary_mismatches_per_group": {str(g): n for g, n in sorted(self.mismatches.items())}}


def document_tokens(tokenizer, docs: Iterable[list[tuple[str, str]]], group_ids: dict[str, int],
                    eos_id: int | None, batch: int = 256, *, bos_ids: tuple[int, ...] = (), whole: bool = False,
                    seams: _Seams | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Each document's ``(ids, groups)``: ``bos_ids`` (in the first segment's group; not when the text's
    own tokens begin with them, as a chat template's text does), its text encoded
    whole (``whole``: once, each token in the segment its first character is in; boundaries checked into
    ``seams``) or segment by segment, then EOS (if given, in the last segment's group). A document
    without a text token is left out."""
    chunk: list[list[tuple[str, str]]] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == batch:
            yield from _encode(tokenizer, chunk, group_ids, eos_id, bos_ids, whole, seams)
            chunk = []
    if chunk:
        yield from _encode(tokenizer, chunk, group_ids, eos_id, bos_ids, whole, seams)


def _encode(tokenizer, docs, group_ids, eos_id, bos_ids, whole, seams):
    if whole:
        encoded = _encode_whole(tokenizer, docs, group_ids, seams)
    else:
        encoded = _encode_segments(tokenizer, docs, group_ids)
    for ids, groups in encoded:
        if not ids:
            continue
        if bos_ids and ids[:len(bos_ids)] != list(bos_ids):  # a text that begins with it (a chat template
            ids, groups = [*bos_ids, *ids], [groups[0]] * len(bos_ids) + groups  # writes it) gets no second
        if eos_id is not None:
            ids.append(eos_id)
            groups.append(groups[-1])
        yield ids, groups


def _encode_segments(tokenizer, docs, group_ids):
    """Each segment encoded on its own, without special tokens (the encoding before ``--encode``)."""
    texts = [text for doc in docs for _, text in doc]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    for doc in docs:
        ids: list[int] = []
        groups: list[int] = []
        for group, _ in doc:
            seg = next(encoded)
            ids.extend(seg)
            groups.extend([group_ids[group]] * len(seg))
        yield ids, groups


def _encode_whole(tokenizer, docs, group_ids, seams):
    """Each document's segments joined and encoded once, without special tokens; a token belongs to
    the segment its first character is in (the fast tokenizer's character offsets)."""
    if not docs:
        return
    texts = ["".join(text for _, text in doc) for doc in docs]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    prefixes = [] if seams is None else [("".join(t for _, t in doc[:j]), n, j)
                                         for n, doc in enumerate(docs) for j in range(1, len(doc))]
    alone = tokenizer([p for p, _, _ in prefixes], add_special_tokens=False)["input_ids"] if prefixes else []
    segments = []
    for doc, offsets in zip(docs, encoded["offset_mapping"]):
        starts = list(itertools.accumulate((len(text) for _, text in doc[:-1]), initial=0))
        segments.append([bisect.bisect_right(starts, start) - 1 for start, _ in offsets])
    for (_, n, j), prefix in zip(prefixes, alone):
        ids = encoded["input_ids"][n]
        before = sum(1 for k in segments[n] if k < j)
        seams.add(group_ids[docs[n][j][0]], before == len(prefix) and list(ids[:len(prefix)]) == list(prefix))
    for doc, ids, segs in zip(docs, encoded["input_ids"], segments):
        yield list(ids), [group_ids[doc[k][0]] for k in segs]


def windows_of(token_lists: Iterable[list[int]], seq_len: int) -> Iterator[np.ndarray]:
    """Concatenate ``token_lists`` and cut the stream into consecutive windows of ``seq_len``."""
    for ids, _ in pack(((t, [0] * len(t)) for t in token_lists), seq_len):
        yield ids


def pack(docs: Iterable[tuple[list[int], list[int]]], seq_len: int,
         bos_ids: tuple[int, ...] = ()) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Concatenate documents and cut into consecutive windows of ``seq_len`` (the last may be shorter);
    each window starts with ``bos_ids`` (in the group of the token after them), then ``seq_len -
    len(bos_ids)`` tokens of the documents."""
    body = seq_len - len(bos_ids)
    if body <= 0:
        raise HarvestError(f"--seq-len must be positive, got {seq_len}" if seq_len <= 0 else
                           f"--seq-len must be above {len(bos_ids)} (the BOS each window starts with), got {seq_len}")
    ids: list[int] = []
    groups: list[int] = []
    for doc_ids, doc_groups in docs:
        ids.extend(doc_ids)
        groups.extend(doc_groups)
        while len(ids) >= body:
            yield _window(ids[:body], groups[:body], bos_ids)
            del ids[:body], groups[:body]
    if ids:
        yield _window(ids, groups, bos_ids)


def _window(ids: list[int], groups: list[int], bos_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray([*bos_ids, *ids], dtype=np.int32),
            np.asarray([groups[0]] * len(bos_ids) + groups, dtype=np.int16))


class _Truncation:
    """What ``sequence`` packing cut off: tokens and documents, in all and per group id (a document
    counts for every group that lost a token in it); and what ``--remainder drop`` dropped: the tokens of
    a packed stream's last, shorter window."""

    def __init__(self):
        self.tokens = 0
        self.documents = 0
        self.group_tokens: dict[int, int] = {}
        self.group_documents: dict[int, int] = {}
        self.remainder: dict[int, int] = {}

    def drop(self, groups: np.ndarray) -> None:
        """A remainder window dropped, whose tokens carry the group ids ``groups``."""
        values, counts = np.unique(np.asarray(groups, dtype=np.int64), return_counts=True)
        for g, n in zip(values.tolist(), counts.tolist()):
            self.remainder[g] = self.remainder.get(g, 0) + n

    def add(self, lost_groups: list[int]) -> None:
        """One document cut, whose tokens cut off carry the group ids ``lost_groups``."""
        self.tokens += len(lost_groups)
        self.documents += 1
        values, counts = np.unique(np.asarray(lost_groups, dtype=np.int64), return_counts=True)
        for g, n in zip(values.tolist(), counts.tolist()):
            self.group_tokens[g] = self.group_tokens.get(g, 0) + n
            self.group_documents[g] = self.group_documents.get(g, 0) + 1

    def record(self) -> dict:
        """The manifest's entries (JSON: group ids as strings)."""
        return {"truncated_tokens": self.tokens, "truncated_documents": self.documents,
                "truncated_tokens_per_group": {str(g): n for g, n in sorted(self.group_tokens.items())},
                "truncated_documents_per_group": {str(g): n for g, n in sorted(self.group_documents.items())}}

    def remainder_record(self) -> dict:
        """The manifest's entries for ``--remainder drop``."""
        return {"remainder_tokens": sum(self.remainder.values()),
                "remainder_tokens_per_group": {str(g): n for g, n in sorted(self.remainder.items())}}


def sequences(docs, seq_len: int, pooled: bool, stream: str, cut: _Truncation):
    """One window per document; longer documents are cut (an error when pooling)."""
    for n, (ids, groups) in enumerate(docs, start=1):
        if len(ids) > seq_len:
            if pooled:
                raise HarvestError(f"document {n} of stream '{stream}' has {len(ids)} tokens, more than "
                                   f"--seq-len {seq_len}; pooled statistics need whole documents")
            cut.add(groups[seq_len:])
            ids, groups = ids[:seq_len], groups[:seq_len]
        yield np.asarray(ids, dtype=np.int32), np.asarray(groups, dtype=np.int16)


def capped(docs, limit: int, side: str, cut: _Truncation, head: int = 0):
    """Each document ``(ids, groups)`` cut to ``limit`` tokens (``--truncate``): ``right`` keeps the first
    tokens, ``left`` the last. The first ``head`` tokens are never cut: a BOS the harvest prepends counts
    towards ``limit`` but stays, as tokenizers keep special tokens when they truncate (the BOS hook)."""
    keep_head = min(head, limit)
    for ids, groups in docs:
        if len(ids) > limit:
            body = limit - keep_head
            if side == "right":
                kept = list(range(body + keep_head))
            else:
                kept = list(range(keep_head)) + list(range(len(ids) - body, len(ids)))
            lost = sorted(set(range(len(ids))) - set(kept))
            cut.add([groups[i] for i in lost])
            ids, groups = [ids[i] for i in kept], [groups[i] for i in kept]
        yield ids, groups


def _limit(windows, max_tokens: int | None):
    """Stop after ``max_tokens`` tokens, cutting the last window there."""
    if max_tokens is None:
        yield from windows
        return
    left = max_tokens
    for ids, groups in windows:
        if left <= 0:
            return
        yield ids[:left], groups[:left]
        left -= len(ids)


def whole_windows(windows, seq_len: int, cut: _Truncation):
    """``--remainder drop``: only windows of ``seq_len`` tokens; a shorter one (a packed stream's last, or
    the one ``--max-tokens-per-lang`` cut) is dropped and its tokens counted in ``cut``, as LAPE's
    ``activation.py`` keeps ``min(n, cap) // seq_len * seq_len`` of a language's ``n`` tokens."""
    for ids, groups in windows:
        if len(ids) == seq_len:
            yield ids, groups
        else:
            cut.drop(groups)


def stream_windows(corpora, index: int, tokenizer, settings: TokenSettings, cut: _Truncation,
                   seams: _Seams | None = None):
    """Windows ``(ids, groups)`` of stream ``index`` of ``corpora``, in order."""
    stream = corpora.streams[index]
    pooled = settings.pooling != "token"
    packed = stream.packing == "pack"
    group_ids = {g: i for i, g in enumerate(corpora.groups)}
    ends = settings.separator == "eos" if packed else settings.eos_per_example
    eos = settings.eos_id if ends and not pooled else None
    per_window = settings.bos == "window" and packed  # a sequence document is its own window
    bos_ids = () if per_window or settings.bos == "none" else settings.bos_ids
    docs = document_tokens(tokenizer, corpora.documents(index), group_ids, eos, bos_ids=bos_ids,
                           whole=settings.encode == "whole", seams=seams)
    options = getattr(corpora, "options", None)
    if not packed and options is not None and options.truncate is not None:
        docs = capped(docs, options.truncate, options.truncation_side, cut, head=len(bos_ids))
    if packed:
        windows = pack(docs, settings.seq_len, settings.bos_ids if per_window else ())
    else:
        windows = sequences(docs, settings.seq_len, pooled, stream.name, cut)
    windows = _limit(windows, stream.max_tokens)
    return whole_windows(windows, settings.seq_len, cut) if packed and settings.remainder == "drop" else windows


def tokenize_stream(corpora, index: int, tokenizer, settings: TokenSettings, root: str) -> Iterator[ShardInfo]:
    """Tokenize stream ``index`` into Parquet shards under ``root``, yielding each as it is written.

    A stream whose manifest already exists (same settings) is not tokenized again: its shards are
    yielded from the manifest.
    """
    stream = corpora.streams[index]
    manifest_path = f"{root}/{index:05d}.json"
    manifest = read_manifest(manifest_path)
    if manifest is not None:
        _check_manifest(manifest, manifest_path, settings, stream.name)
        for info in manifest["shards"]:  # JSON object keys are strings
            yield ShardInfo(**{**info, "tokens": {int(g): n for g, n in info["tokens"].items()}})
        return
    cut, seams, infos, k = _Truncation(), _Seams(), [], 0
    current: list[tuple[np.ndarray, np.ndarray]] = []
    n_current = 0
    for ids, groups in stream_windows(corpora, index, tokenizer, settings, cut, seams):
        if current and n_current + len(ids) > settings.shard_tokens:
            infos.append(_write_shard(root, index, k, current))
            yield infos[-1]
            current, n_current, k = [], 0, k + 1
        current.append((ids, groups))
        n_current += len(ids)
    if current:
        infos.append(_write_shard(root, index, k, current))
        yield infos[-1]
    if not infos:
        raise _no_tokens(stream.name, sum(cut.remainder.values()), settings.seq_len)
    fs.write_text(manifest_path, json.dumps({
        "format": TOKENS_FORMAT, "stream": stream.name, "settings": asdict(settings),
        "shards": [asdict(i) for i in infos], **cut.record(),
        **(seams.record() if settings.encode == "whole" else {}),
        **(cut.remainder_record() if settings.remainder == "drop" else {}), "digest": stream_digest(infos),
    }))


def _no_tokens(stream: str, dropped: int = 0, seq_len: int = 0) -> HarvestError:
    if dropped:
        return HarvestError(f"corpus stream '{stream}' has {dropped} tokens, less than one --seq-len {seq_len} "
                            "window, and --remainder drop drops them; lower --seq-len or use --remainder keep")
    return HarvestError(f"corpus stream '{stream}' has no tokens")


def precheck(corpora, tokenizer, settings: TokenSettings) -> None:
    """Tokenize every stream once, writing nothing, when the harvest refuses overlong documents
    (pooled statistics need whole ones): that refusal, and a stream without tokens, then come before
    a store exists. Token statistics cut long documents instead, so nothing needs checking up front."""
    if settings.pooling == "token":
        return
    for index, stream in enumerate(corpora.streams):
        if not any(True for _ in stream_windows(corpora, index, tokenizer, settings, _Truncation())):
            raise _no_tokens(stream.name)


def _check_manifest(manifest: dict, path: str, settings: TokenSettings, stream: str) -> None:
    """Refuse token shards made by another harvest, from another corpus, or with other settings."""
    made = manifest.get("settings", {})
    if "fingerprint_sha256" not in made:
        raise HarvestError(f"token manifest {path} was made by an older lsn-harvester; use a new --store")
    if made.get("corpus_sha256", "") != settings.corpus_sha256 or manifest.get("stream") != stream:
        raise HarvestError(f"token manifest {path} was made from another corpus; use a new --store")
    if made.get("fingerprint_sha256", "") != settings.fingerprint_sha256:
        raise HarvestError(f"token manifest {path} was made by another harvest (or an older lsn-harvester); "
                           "use a new --store")
    if {**LEGACY, **made} != json.loads(json.dumps(asdict(settings))):
        raise HarvestError(f"token manifest {path} was made with other settings; use a new --store")


def read_manifest(path: str) -> dict | None:
    text = fs.read_text(path)
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except ValueError as err:  # a truncated or hand-edited file
        raise HarvestError(f"token manifest {path} is damaged ({err}); delete it and its stream's shard "
                           "directory beside it, and run the same command again to tokenize that stream anew") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise HarvestError(f"token manifest {path} is damaged (no list of shards); delete it and run the same "
                           "command again")
    return manifest


def stream_digest(infos: list[ShardInfo]) -> str:
    digest = hashlib.sha256()
    for info in infos:
        digest.update(info.digest.encode())
    return digest.hexdigest()


def _write_shard(root: str, stream: int, k: int, windows: list[tuple[np.ndarray, np.ndarray]]) -> ShardInfo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    counts: dict[int, int] = {}
    for ids, groups in windows:
        digest.update(groups.tobytes())
        digest.update(ids.tobytes())
        values, n = np.unique(groups, return_counts=True)
        for g, c in zip(values.tolist(), n.tolist()):
            counts[g] = counts.get(g, 0) + c
    table = pa.table({
        "ids": pa.array([w[0] for w in windows], type=pa.list_(pa.int32())),
        "groups": pa.array([w[1] for w in windows], type=pa.list_(pa.int16())),
    })
    path = f"{root}/{stream:05d}/{k:06d}.parquet"
    with fs.atomic_write(path) as f:
        pq.write_table(table, f, compression="zstd")
    return ShardInfo(index=shard_index(stream, k), stream=stream, path=path, n_tokens=sum(counts.values()),
                     n_windows=len(windows), tokens=counts, digest=digest.hexdigest())


def load_shard(info: ShardInfo) -> Shard:
    """The shard's windows, read back from its Parquet file and checked against its digest."""
    import pyarrow.parquet as pq

    with fs.open_read(info.path) as f:
        table = pq.read_table(f)
    digest = hashlib.sha256()
    windows = []
    for ids, groups in zip(table.column("ids").to_numpy(zero_copy_only=False),
                           table.column("groups").to_numpy(zero_copy_only=False)):
        w = Window(np.asarray(ids, dtype=np.int32), np.asarray(groups, dtype=np.int16))
        digest.update(w.groups.tobytes())
        digest.update(w.ids.tobytes())
        windows.append(w)
    if digest.hexdigest() != info.digest:
        raise HarvestError(f"token shard {info.path} does not match its manifest; delete the store's tokens/ "
                           "directory of that stream and resume")
    return Shard(info.index, windows)


# -- batching -----------------------------------------------------------------------------------
def batches(windows: list[Window], batch_size: int, pad_id: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Right-padded batches ``(ids [B, S], attention_mask [B, S], groups [B, S])``; padding has group -1."""
    if batch_size <= 0:
        raise HarvestError(f"--batch-size must be positive, got {batch_size}")
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(w.ids) for w in chunk)
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        groups = np.full((len(chunk), width), -1, dtype=np.int64)
        for row, w in enumerate(chunk):
            ids[row, :len(w.ids)], mask[row, :len(w.ids)], groups[row, :len(w.ids)] = w.ids, 1, w.groups
        yield ids, mask, groups
