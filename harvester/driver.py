"""Orchestration of a harvest: plan, check or create the store, run the shards, reduce the totals.

The only module that imports Ray, and only when Ray is used.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque

from harvester import __version__, arch
from harvester.backends.hf import load_config, load_tokenizer, max_positions, resolve_model, weights_fingerprint
from harvester.config import HarvestConfig
from harvester.corpus import parse_corpus
from harvester.errors import HarvestError
from harvester.stats import StatsSpec
from harvester.store import Store, fingerprint_differences, read_attrs
from harvester.windows import Plan, plan_shards
from harvester.worker import ShardWorker, WorkerConfig

_MAX_ATTEMPTS = 3


def harvest(cfg: HarvestConfig) -> Store:
    """Run (or resume) the harvest ``cfg`` describes; returns the completed store."""
    spec = StatsSpec(cfg.stats, cfg.hist_edges if "hist" in cfg.stats else None)
    existing = read_attrs(cfg.store)  # a file, or a foreign directory, is refused before any work
    model_path = resolve_model(cfg.model)
    config = load_config(model_path)
    site = arch.resolve_site(config, cfg.site)
    limit = max_positions(config)
    if limit is not None and cfg.seq_len > limit:
        raise HarvestError(f"--seq-len {cfg.seq_len} exceeds the model's maximum of {limit} positions")
    tokenizer = load_tokenizer(model_path)
    corpus = parse_corpus(cfg.corpus)
    plan = plan_shards(corpus, tokenizer, cfg.seq_len, cfg.shard_tokens, progress=cfg.progress)
    fingerprint = _fingerprint(cfg, config, model_path, site, tokenizer, plan, spec)
    if existing is not None:
        diffs = fingerprint_differences(existing["fingerprint"], fingerprint)
        if diffs:
            raise HarvestError(f"store {cfg.store} holds a different harvest ({diffs[0]}); "
                               "use a new --store, or the same settings to resume")
        store = Store(cfg.store)
        if store.complete:
            _say(cfg, f"store {cfg.store} is already complete")
            return store
    meta = _meta(cfg, config, model_path, plan, fingerprint)
    wcfg = WorkerConfig(cfg.backend, model_path, cfg.dtype, cfg.device, cfg.device_map, site, cfg.store,
                        spec, cfg.batch_size)
    runner = _run_ray if cfg.use_ray else _run_local
    runner(cfg, wcfg, plan, lambda shape: _open_or_create(cfg.store, fingerprint, meta, shape, plan, spec))
    store = Store(cfg.store)
    store.reduce()
    return store


def _open_or_create(path, fingerprint, meta, shape, plan: Plan, spec) -> Store:
    layers, width = shape
    if read_attrs(path) is None:
        meta["model"].update(layers=layers, width=width)
        return Store.create(path, fingerprint=fingerprint, meta=meta, n_layers=layers, width=width,
                            n_shards=len(plan.shards), spec=spec)
    return Store(path)


def _progress(cfg: HarvestConfig, plan: Plan, done_tokens: int):
    from tqdm.auto import tqdm

    return tqdm(total=plan.n_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="harvest",
                disable=not cfg.progress, smoothing=0.1, file=sys.stderr)


def _todo(store: Store, plan: Plan):
    done = store.done()
    todo = [s for s in plan.shards if not done[s.index]]
    return todo, plan.n_tokens - sum(s.n_tokens for s in todo)


def _run_local(cfg: HarvestConfig, wcfg: WorkerConfig, plan: Plan, open_store) -> None:
    worker = ShardWorker(wcfg)
    todo, done_tokens = _todo(open_store(worker.shape()), plan)
    with _progress(cfg, plan, done_tokens) as bar:
        for shard in todo:
            bar.update(worker.run(shard))


def _run_ray(cfg: HarvestConfig, wcfg: WorkerConfig, plan: Plan, open_store) -> None:
    import ray

    started = _ray_init(cfg)
    try:
        actor_cls, n_actors = _actor_class(cfg, ray)
        actors = [actor_cls.remote(wcfg) for _ in range(n_actors)]
        todo, done_tokens = _todo(open_store(_ray_get(ray, actors[0].shape.remote())), plan)
        with _progress(cfg, plan, done_tokens) as bar:
            _dispatch(ray, actors, actor_cls, wcfg, todo, bar)
    finally:
        if started:
            ray.shutdown()


def _ray_init(cfg: HarvestConfig) -> bool:
    """Join ``--address``/``$RAY_ADDRESS``, or start an embedded local instance on loopback."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise HarvestError(f"could not connect to Ray at {address or 'a new local instance'}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return True


def _actor_class(cfg: HarvestConfig, ray):
    """The actor class with its resources: one GPU each on cuda, an equal share of CPUs otherwise."""
    if cfg.device.startswith("cuda"):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            raise HarvestError("--device cuda, but the Ray cluster has no GPUs")
        n = cfg.actors or gpus
        per_actor = dict(num_gpus=gpus if cfg.device_map else 1, num_cpus=1)
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = cfg.actors or 1
        per_actor = dict(num_cpus=max(1, cpus // n))
    threads = None if cfg.device.startswith("cuda") else per_actor["num_cpus"]

    class ShardActor(ShardWorker):
        def __init__(self, wcfg):
            super().__init__(WorkerConfig(**{**wcfg.__dict__, "threads": threads}))

    return ray.remote(max_restarts=0, **per_actor)(ShardActor), n


def _ray_get(ray, ref):
    """``ray.get`` that re-raises our own errors from inside actors (method or constructor) as they are."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as err:
        cause = err
        for _ in range(3):  # RayTaskError.cause, or ActorDiedError -> creation task error -> cause
            cause = getattr(cause, "cause", None)
            if isinstance(cause, HarvestError):
                raise HarvestError(str(cause)) from None
        raise


def _dispatch(ray, actors, actor_cls, wcfg, todo, bar) -> None:
    """Keep two shards in flight per actor; replace a dead actor and re-run its shard."""
    pending, inflight, attempts = deque(todo), {}, {}
    load = {id(a): 0 for a in actors}
    while pending or inflight:
        for actor in list(actors):
            while pending and load[id(actor)] < 2:
                shard = pending.popleft()
                inflight[actor.run.remote(shard)] = (actor, shard)
                load[id(actor)] += 1
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        actor, shard = inflight.pop(ref)
        load[id(actor)] -= 1
        try:
            bar.update(_ray_get(ray, ref))
        except ray.exceptions.RayActorError:
            attempts[shard.index] = attempts.get(shard.index, 0) + 1
            if attempts[shard.index] >= _MAX_ATTEMPTS:
                raise HarvestError(f"shard {shard.index} failed {_MAX_ATTEMPTS} times; its actor kept dying")
            pending.appendleft(shard)
            if actor in actors:
                actors.remove(actor)
                replacement = actor_cls.remote(wcfg)
                actors.append(replacement)
                load[id(replacement)] = 0


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprint(cfg, config, model_path, site, tokenizer, plan: Plan, spec: StatsSpec) -> dict:
    """Everything that decides the numbers in the store; a resumed run must match it exactly."""
    return {
        "model": {"id": cfg.model, "revision": getattr(config, "_commit_hash", None),
                  "weights": weights_fingerprint(model_path), "architecture": config.model_type,
                  "site": site, "dtype": cfg.dtype, "device": cfg.device.split(":")[0],
                  "device_map": cfg.device_map},
        "tokenizer": {"name": tokenizer.name_or_path if not cfg.model.startswith("tiny:") else cfg.model,
                      "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                      "sha256": _tokenizer_hash(tokenizer)},
        "corpus": {"spec": cfg.corpus, "groups": plan.groups, "digest": plan.digest, "tokens": plan.n_tokens,
                   "windows": plan.n_windows, "shards": len(plan.shards)},
        "settings": {"backend": cfg.backend, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                     "shard_tokens": cfg.shard_tokens, "stats": list(spec.stats),
                     "hist_edges": list(spec.hist_edges) if spec.hist_edges else None},
    }


def _meta(cfg, config, model_path, plan: Plan, fingerprint: dict) -> dict:
    import torch
    import transformers

    return {
        "model": {**fingerprint["model"], "architectures": list(getattr(config, "architectures", None) or [])},
        "tokenizer": fingerprint["tokenizer"],
        "corpus": {**fingerprint["corpus"], "tokens_per_group": plan.tokens_per_group},
        "settings": fingerprint["settings"],
        "versions": {"lsn-harvester": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def _say(cfg: HarvestConfig, text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr)
