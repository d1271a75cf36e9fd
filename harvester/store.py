"""The harvest store: a Zarr v3 directory (local, or an fsspec URL) that ``xarray.open_zarr`` reads.

Layout::

    STORE/                      root attrs ``lsn``: fingerprint, metadata, completion
      group, layer, neuron      coordinates (``group`` is a string coordinate)
      tokens   (group)          int64    totals, reduced from finished shards
      active   (group, layer, neuron)    int64
      act_sum  (group, layer, neuron)    float64
      act_sqsum(group, layer, neuron)    float64
      act_abssum (group, layer, neuron)  float64   sum of |x| (opt-in, default with pooled stimuli)
      hist     (group, layer, neuron, bin) int64, with coords hist_lo / hist_hi (opt-in)
      shards/
        tokens (shard, group)             each shard's own chunk row
        active, act_sum, ... (shard, group, layer, neuron)
        done   (shard,)                   the completion manifest: 1 once a shard's data is written
        digest (shard, 32)                sha256 of a shard's rows (groups with tokens, in reduce order) and tokens
      tokens/                       token shards (Parquet) and per-stream manifests, see windows.py

The shard dimension has room for ``SHARDS_PER_STREAM`` shards per corpus stream (shard ``k`` of
stream ``s`` is row ``s * SHARDS_PER_STREAM + k``); chunks never written take no space.

Each shard writes whole chunks of its own rows (an idempotent rewrite) and their digest, then its
``done`` chunk; totals are summed from the plan's shards in shard order, so they are the same however
the work was scheduled, interrupted and resumed.

Integrity (format 2): every chunk ends in a crc32c checksum and every chunk of a written array is
stored, so reads through :mod:`harvester.checked` turn a flipped byte or a deleted chunk into an error;
the reduce checks each shard's digest and records what the totals came from; :mod:`harvester.verify` checks all.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from harvester import fs, lease
from harvester.errors import HarvestError
from harvester.stats import VARIABLES, StatsSpec

FORMAT = "lsn-harvester-store"
FORMAT_VERSION = 2
"""2: every chunk ends in a crc32c checksum, every chunk of a written array is stored (none is left out for
being all zeros), and the totals record the shards they were summed from. 1: neither (read-only)."""
_CHUNK_ELEMENTS = 1 << 22  # ~32 MiB of float64 per chunk


def creating_marker(path: str | Path) -> str:
    """``DIR/.NAME.creating.json``: written before a store is built in place (fsspec URLs) and removed
    once its attributes are written; while it is there, a store without ``lsn`` attributes is a
    skeleton an interrupted harvest left (rebuilt by the next one that holds the lease)."""
    if not fs.is_url(str(path)):
        local = Path(path).absolute()
        return str(local.parent / f".{local.name}.creating.json")
    parent, _, name = str(path).rstrip("/").rpartition("/")
    return f"{parent}/.{name}.creating.json"

_DTYPES = {"active": "int64", "act_sum": "float64", "act_sqsum": "float64", "act_abssum": "float64", "hist": "int64"}


def _zarr():
    import warnings

    import zarr

    # Consolidated metadata (one read to open the store) is a zarr-python extension of Zarr v3.
    warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
    # A chunk of zeros is written like any other, so a missing chunk is always damage, never zeros.
    zarr.config.set({"array.write_empty_chunks": True})
    return zarr


def _compressors() -> tuple:
    """zstd, then a crc32c of the compressed bytes: a flipped byte is an error, never a number."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(), Crc32cCodec())


def zarr_store(path: str | Path, read_only: bool = False):
    """A Zarr store object for a local path or an fsspec URL (``s3://...``, ``file://...``)."""
    zarr = _zarr()
    if fs.is_url(str(path)):
        options = {"auto_mkdir": True} if str(path).startswith("file://") else {}
        try:
            return zarr.storage.FsspecStore.from_url(str(path), storage_options=options, read_only=read_only)
        except (ImportError, ValueError) as err:
            raise HarvestError(f"cannot open store {path}: {str(err).splitlines()[0]}") from None
    return zarr.storage.LocalStore(str(path), read_only=read_only)


def tokens_dir(path: str | Path) -> str:
    """Where a store's token shards and stream manifests live: ``STORE/tokens``."""
    return f"{str(path).rstrip('/')}/tokens"


def read_attrs(path: str | Path) -> dict | None:
    """The store's ``lsn`` attributes; None if nothing is there. Errors for a file or a foreign directory."""
    fsys, p = fs.filesystem(str(path))
    if not fsys.exists(p):
        return None
    if fsys.isfile(p):
        raise HarvestError(f"store path {path} is a file, not a directory")
    half_made = fsys.isfile(fs.filesystem(creating_marker(path))[1])
    if not fsys.isfile(f"{p}/zarr.json"):
        if fsys.ls(p) and not half_made:
            raise HarvestError(f"{path} is a non-empty directory that is not an lsn store")
        return None
    try:
        root = _zarr().open_group(store=zarr_store(path, read_only=True), mode="r", use_consolidated=False)
        attrs = root.attrs.asdict().get("lsn")
    except HarvestError:
        raise
    except Exception as err:  # noqa: BLE001 - a torn zarr.json (a creator killed mid-write), a foreign file
        if half_made:
            return None
        raise HarvestError(f"cannot read store {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                           ) from None
    if not attrs or attrs.get("format") != FORMAT:
        if half_made:
            return None  # rebuilt by the next harvest that holds the lease
        raise HarvestError(f"{path} is a Zarr store but not an lsn-harvester store")
    if attrs.get("format_version", 1) > FORMAT_VERSION:
        raise HarvestError(f"store {path} has format version {attrs['format_version']}, newer than this lsn "
                           f"reads ({FORMAT_VERSION}); upgrade lsn-harvester")
    return attrs


def open_finished(path: str | Path) -> dict:
    """The attributes of a store whose harvest (or import) finished; every reader of a store's totals
    (summary, analysis/, jobs/) opens it through here, since an unfinished store's totals are zeros."""
    attrs = read_attrs(path)
    if attrs is None:
        raise HarvestError(f"no store at {path}")
    if attrs.get("complete") is not True:
        raise HarvestError(f"store {path} is not complete (its harvest did not finish): run the same "
                           "lsn harvest again to finish it")
    return attrs


def open_dataset(path: str | Path, attrs: dict):
    """The lazy xarray Dataset of a finished store's totals, every chunk read checked (format 2); a
    format-1 store (no checksums) is read as it is, with a one-line note."""
    import xarray as xr

    from harvester.checked import checked

    zstore = zarr_store(path, read_only=True)
    if attrs.get("format_version", 1) < 2:
        print(f"lsn: note: store {path} has format version 1 (no checksums): read as it is, and read-only; "
              "harvest into a new --store for a checked one", file=sys.stderr)
    else:
        zstore = checked(zstore, str(path))
    ds = xr.open_zarr(zstore, consolidated=True)
    recorded = (attrs.get("totals") or {}).get("tokens")
    if recorded is not None and [int(n) for n in ds["tokens"].values] != recorded:
        raise HarvestError(f"store {path} is damaged: its tokens totals differ from those recorded when they "
                           f"were reduced (lsn verify {path} lists every problem)")
    return ds


def fingerprint_sha256(fingerprint: dict) -> str:
    """The digest that names one harvest (its fingerprint as canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """Human-readable ``key: old != new`` lines for every differing fingerprint entry."""
    lines = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append(f"{section}.{key}: store has {a.get(key)!r}, this run has {b.get(key)!r}")
    return lines


def _layer_chunk(n_layers: int, per_layer: int) -> int:
    return max(1, min(n_layers, _CHUNK_ELEMENTS // max(per_layer, 1)))


class Store:
    """An open harvest store."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        from harvester.checked import checked

        self._zstore = checked(zarr_store(self.path), self.path)  # every chunk read checked
        self.root = _zarr().open_group(store=self._zstore, mode="r+", use_consolidated=False)
        self.attrs = self.root.attrs.asdict()["lsn"]
        self.groups: list[str] = self.attrs["meta"]["corpus"]["groups"]
        self.variables: list[str] = [VARIABLES[s] for s in self.attrs["fingerprint"]["settings"]["stats"]]

    @classmethod
    def open_for_writing(cls, path: str | Path, fingerprint: dict) -> "Store | None":
        """The store at ``path`` if it holds the harvest ``fingerprint`` describes; None if there is none;
        an error if it holds another. Every open for writing goes through here, under the lease."""
        attrs = read_attrs(path)
        if attrs is None:
            return None
        diffs = fingerprint_differences(attrs["fingerprint"], fingerprint)
        if diffs:
            raise HarvestError(f"store {path} holds a different harvest ({diffs[0]}); "
                               "use a new --store, or the same settings to resume")
        if attrs.get("format_version", 1) < FORMAT_VERSION:
            raise HarvestError(f"store {path} has format version {attrs.get('format_version', 1)} (no checksums) "
                               "and is read-only: lsn reads it, but harvests only into a new --store")
        fsys, marker = fs.filesystem(creating_marker(path))
        if fsys.exists(marker):  # left by a creator killed after the attributes (by URL or by path)
            fsys.rm(marker)
        return cls(path)

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, fingerprint: dict, meta: dict, n_layers: int, width: int,
               n_shards: int, spec: StatsSpec, owner: dict | None = None) -> "Store":
        """Build the whole skeleton; on local disk in a sibling temporary directory renamed into place,
        elsewhere (fsspec URLs) in place, behind a marker written first and removed after the ``lsn``
        attributes that make it a store. Call it holding the store's lease (``owner``: its record;
        by default this process).

        ``n_shards`` is the capacity of the shard dimension: unwritten chunks take no space.
        """
        if read_attrs(path) is not None:
            raise HarvestError(f"store {path} already exists")
        groups = meta["corpus"]["groups"]
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "meta": meta,
                 "complete": False, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        owner = owner or lease.owner_record()
        marker = json.dumps({k: owner.get(k) for k in ("owner", "host", "machine", "pid", "pid_start")})
        if fs.is_url(str(path)):
            fsys, p = fs.filesystem(str(path))
            if fsys.exists(p) and fsys.ls(p):  # read_attrs let it through: a half-made skeleton
                _check_skeleton_only(fsys, p, path)
                print(f"lsn: rebuilding the skeleton of store {path}, left half-made by an interrupted harvest",
                      file=sys.stderr)
                fsys.rm(p, recursive=True)
            fs.write_text(creating_marker(path), marker)
            _write_skeleton(zarr_store(path), groups, n_layers, width, n_shards, spec, attrs)
            fsys.rm(fs.filesystem(creating_marker(path))[1])
            return cls(path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(path)
        tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        Path(f"{tmp}.json").write_text(marker)  # first: says whose directory this is
        _write_skeleton(zarr_store(tmp), groups, n_layers, width, n_shards, spec, attrs)
        if path.exists():  # an empty directory given as the store path
            path.rmdir()
        tmp.rename(path)
        Path(f"{tmp}.json").unlink()
        return cls(path)

    # -- shards -----------------------------------------------------------------------------
    def array(self, name: str):
        """The store's array ``name``; an error naming it if its metadata is gone."""
        try:
            return self.root[name]
        except KeyError:
            raise HarvestError(f"store {self.path} is damaged: array '{name}' is missing (its zarr.json is gone)"
                               ) from None

    def done(self, indices: list[int]) -> list[bool]:
        """Which of the shards ``indices`` are recorded as finished (one small read each)."""
        done = self.array("shards/done")
        return [bool(done[i]) for i in indices]

    def write_shard(self, index: int, result: dict[int, dict]) -> None:
        """Write one shard's statistics (whole chunks) and their digest, then mark it done."""
        shards = {name: self.array(f"shards/{name}") for name in ("done", "tokens", "digest", *self.variables)}
        tokens = np.zeros(len(self.groups), dtype=np.int64)
        digest = hashlib.sha256()
        for g in sorted(result):
            values = result[g]
            tokens[g] = values["tokens"]
            for var in self.variables:
                row = np.asarray(values[var], dtype=shards[var].dtype)
                shards[var][index, g] = row
                if tokens[g] > 0:  # the rows the reduce sums, in its order
                    digest.update(np.ascontiguousarray(row).tobytes())
        shards["tokens"][index] = tokens
        digest.update(tokens.tobytes())
        shards["digest"][index] = np.frombuffer(digest.digest(), dtype=np.uint8)
        shards["done"][index] = 1

    # -- totals -----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def reduce(self, indices: list[int], corpus_meta: dict | None = None) -> None:
        """Sum the shards ``indices`` into the totals (in index order: deterministic), record
        ``corpus_meta`` (digest, tokens per group, ...), and mark the store complete."""
        indices = sorted(indices)
        missing = [i for i, d in zip(indices, self.done(indices)) if not d]
        if missing:
            raise HarvestError(f"{len(missing)} of {len(indices)} shards are not finished")
        tokens = self.array("shards/tokens")
        shard_tokens = np.stack([tokens[i] for i in indices]) if indices else np.zeros((0, len(self.groups)), int)
        totals = shard_tokens.sum(axis=0)
        self.array("tokens")[:] = totals
        digests = {i: hashlib.sha256() for i in indices}  # each shard's rows, as write_shard hashed them
        for g in range(len(self.groups)):
            rows = [i for i, n in zip(indices, shard_tokens[:, g]) if n > 0]
            for var in self.variables:
                source = self.array(f"shards/{var}")
                total = np.zeros(source.shape[2:], dtype=source.dtype)
                for s in rows:
                    row = source[s, g]
                    digests[s].update(np.ascontiguousarray(row).tobytes())
                    total += row
                self.array(var)[g] = total
        self._check_digests(digests, shard_tokens)
        if corpus_meta:
            self.attrs["meta"]["corpus"].update(corpus_meta)
        self.set_attrs(complete=True, totals=totals_record(indices, totals))

    def _check_digests(self, digests: dict, shard_tokens: np.ndarray) -> None:
        """Every shard summed holds the rows it wrote (not rows copied from elsewhere, nor an older write)."""
        stored = self.array("shards/digest")
        for (index, digest), tokens in zip(digests.items(), shard_tokens):
            digest.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
            if digest.digest() != bytes(stored[index]):
                raise HarvestError(f"store {self.path} is damaged: the rows of shard {index} do not match the "
                                   f"digest written with them (lsn verify {self.path} lists every problem)")

    def set_attrs(self, **values) -> None:
        self.attrs.update(values)
        self.root.attrs["lsn"] = self.attrs
        _zarr().consolidate_metadata(self._zstore)


def totals_record(indices: list[int], tokens) -> dict:
    """What the totals were reduced from: the shards (count and digest of their sorted indices) and the
    tokens per group, compared on every open and by ``lsn verify``."""
    indices = sorted(int(i) for i in indices)
    return {"shards": len(indices), "shards_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
            "tokens": [int(n) for n in tokens]}


def _remove_dead_partials(path: Path) -> None:
    """Remove temporary directories of earlier creators of this store whose process is gone from this
    host (the marker ``.NAME.partial-ID.json`` written before each says who made it); any other
    directory is left alone."""
    for marker in path.parent.glob(f".{path.name}.partial-*.json"):
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and lease.process_gone(owner):
            shutil.rmtree(Path(str(marker)[:-len(".json")]), ignore_errors=True)
            marker.unlink(missing_ok=True)


_SKELETON = {"zarr.json", "group", "layer", "neuron", "bin", "hist_lo", "hist_hi", "tokens", "shards",
             *VARIABLES.values()}
"""What a store's skeleton holds at its top level (before any shard or token shard is written)."""


def _check_skeleton_only(fsys, p: str, path) -> None:
    """Refuse to remove ``p`` unless it holds nothing but a skeleton: names of the skeleton only, no
    finished shard, no token shard. A leftover marker beside other data must never cost that data."""
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fsys.ls(p, detail=False)}
    extra = sorted(names - _SKELETON)
    done = fsys.exists(f"{p}/shards/done/c") and fsys.ls(f"{p}/shards/done/c", detail=False)
    token_shards = fsys.exists(f"{p}/tokens") and any(
        n.rstrip("/").rsplit("/", 1)[-1] not in ("zarr.json", "c") for n in fsys.ls(f"{p}/tokens", detail=False))
    if extra or done or token_shards:
        what = f"'{extra[0]}'" if extra else "finished shards" if done else "token shards"
        raise HarvestError(f"{path} has the marker of an interrupted creation ({creating_marker(path)}) but holds "
                           f"{what}, more than a half-made skeleton; it is left as it is: remove the marker if "
                           "this store is yours and should be resumed, or use another --store")


def _write_skeleton(zstore, groups, n_layers, width, n_shards, spec, attrs) -> None:
    _write_totals_skeleton(zstore, groups, n_layers, width, spec)
    _write_shards_skeleton(zstore, len(groups), n_layers, width, n_shards, spec)
    root = _zarr().open_group(store=zstore, mode="r+", use_consolidated=False)
    root.attrs["lsn"] = attrs
    _zarr().consolidate_metadata(zstore)


def _write_totals_skeleton(zstore, groups: list[str], n_layers: int, width: int, spec: StatsSpec) -> None:
    """Coordinates and empty (unwritten, zero-filled) total arrays, written by xarray so it reads them back."""
    import dask.array as da
    import xarray as xr

    G, L, I = len(groups), n_layers, width
    lc = _layer_chunk(L, I)
    data = {"tokens": (("group",), da.zeros((G,), dtype="int64", chunks=G))}
    for var in (VARIABLES[s] for s in spec.stats if s != "hist"):
        data[var] = (("group", "layer", "neuron"), da.zeros((G, L, I), dtype=_DTYPES[var], chunks=(1, lc, I)))
    coords = {"group": np.array(groups, dtype=object), "layer": np.arange(L), "neuron": np.arange(I)}
    if "hist" in spec.stats:
        B = spec.n_bins
        edges = np.asarray(spec.hist_edges, dtype=np.float64)
        data["hist"] = (("group", "layer", "neuron", "bin"),
                        da.zeros((G, L, I, B), dtype="int64", chunks=(1, _layer_chunk(L, I * B), I, B)))
        coords["hist_lo"] = ("bin", np.concatenate([[-np.inf], edges]))
        coords["hist_hi"] = ("bin", np.concatenate([edges, [np.inf]]))
    encoding = {name: {"fill_value": 0, "compressors": _compressors()} for name in data}
    encoding.update({name: {"compressors": _compressors()} for name in coords})
    xr.Dataset(data, coords=coords).to_zarr(zstore, mode="w-", compute=False, zarr_format=3,
                                            encoding=encoding, consolidated=False)


def _write_shards_skeleton(zstore, n_groups: int, n_layers: int, width: int, n_shards: int,
                           spec: StatsSpec) -> None:
    zarr = _zarr()
    shards = zarr.open_group(store=zstore, mode="r+", use_consolidated=False).create_group("shards")
    L, I = n_layers, width
    shards.create_array("done", shape=(n_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                        dimension_names=("shard",), compressors=_compressors())
    shards.create_array("digest", shape=(n_shards, 32), chunks=(1, 32), dtype="uint8", fill_value=0,
                        dimension_names=("shard", "sha256"), compressors=_compressors())
    shards.create_array("tokens", shape=(n_shards, n_groups), chunks=(1, n_groups), dtype="int64",
                        fill_value=0, dimension_names=("shard", "group"), compressors=_compressors())
    for stat in spec.stats:
        var = VARIABLES[stat]
        tail = (spec.n_bins,) if stat == "hist" else ()
        lc = _layer_chunk(L, I * (tail[0] if tail else 1))
        shards.create_array(var, shape=(n_shards, n_groups, L, I, *tail), chunks=(1, 1, lc, I, *tail),
                            dtype=_DTYPES[var], fill_value=0, compressors=_compressors(),
                            dimension_names=("shard", "group", "layer", "neuron", *(("bin",) if tail else ())))
