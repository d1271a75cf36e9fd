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
      tokens/                       token shards (Parquet) and per-stream manifests, see windows.py

The shard dimension has room for ``SHARDS_PER_STREAM`` shards per corpus stream (shard ``k`` of
stream ``s`` is row ``s * SHARDS_PER_STREAM + k``); chunks never written take no space.

Each shard writes whole chunks of its own rows (an idempotent rewrite), then its ``done`` chunk;
totals are summed from the plan's shards in shard order, so they are the same however the work
was scheduled, interrupted and resumed.
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
FORMAT_VERSION = 1
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
    return zarr


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
    return attrs


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
        self._zstore = zarr_store(self.path)
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
    def done(self, indices: list[int]) -> list[bool]:
        """Which of the shards ``indices`` are recorded as finished (one small read each)."""
        done = self.root["shards/done"]
        return [bool(done[i]) for i in indices]

    def write_shard(self, index: int, result: dict[int, dict]) -> None:
        """Write one shard's statistics (whole chunks), then mark it done."""
        shards = self.root["shards"]
        tokens = np.zeros(len(self.groups), dtype=np.int64)
        for g, values in result.items():
            tokens[g] = values["tokens"]
            for var in self.variables:
                shards[var][index, g] = values[var]
        shards["tokens"][index] = tokens
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
        tokens = self.root["shards/tokens"]
        shard_tokens = np.stack([tokens[i] for i in indices]) if indices else np.zeros((0, len(self.groups)), int)
        self.root["tokens"][:] = shard_tokens.sum(axis=0)
        for g in range(len(self.groups)):
            rows = [i for i, n in zip(indices, shard_tokens[:, g]) if n > 0]
            for var in self.variables:
                source = self.root[f"shards/{var}"]
                total = np.zeros(source.shape[2:], dtype=source.dtype)
                for s in rows:
                    total += source[s, g]
                self.root[var][g] = total
        if corpus_meta:
            self.attrs["meta"]["corpus"].update(corpus_meta)
        self.set_attrs(complete=True)

    def set_attrs(self, **values) -> None:
        self.attrs.update(values)
        self.root.attrs["lsn"] = self.attrs
        _zarr().consolidate_metadata(self._zstore)


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
    encoding = {name: {"fill_value": 0} for name in data}
    xr.Dataset(data, coords=coords).to_zarr(zstore, mode="w-", compute=False, zarr_format=3,
                                            encoding=encoding, consolidated=False)


def _write_shards_skeleton(zstore, n_groups: int, n_layers: int, width: int, n_shards: int,
                           spec: StatsSpec) -> None:
    zarr = _zarr()
    shards = zarr.open_group(store=zstore, mode="r+", use_consolidated=False).create_group("shards")
    L, I = n_layers, width
    shards.create_array("done", shape=(n_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                        dimension_names=("shard",))
    shards.create_array("tokens", shape=(n_shards, n_groups), chunks=(1, n_groups), dtype="int64",
                        fill_value=0, dimension_names=("shard", "group"))
    for stat in spec.stats:
        var = VARIABLES[stat]
        tail = (spec.n_bins,) if stat == "hist" else ()
        lc = _layer_chunk(L, I * (tail[0] if tail else 1))
        shards.create_array(var, shape=(n_shards, n_groups, L, I, *tail), chunks=(1, 1, lc, I, *tail),
                            dtype=_DTYPES[var], fill_value=0,
                            dimension_names=("shard", "group", "layer", "neuron", *(("bin",) if tail else ())))
